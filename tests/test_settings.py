"""Server settings: one documented place, file < environment < overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedlib.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]


def test_committed_example_is_current_and_parses_to_defaults():
    example = (ROOT / "fl-server.example.toml").read_text()
    assert example == ServerSettings.example_toml(), "run: fl-admin config --example"
    assert ServerSettings.model_validate(tomllib.loads(example)) == ServerSettings()
    assert all(f.description for f in ServerSettings.model_fields.values())


def test_precedence_file_env_overrides(tmp_path, monkeypatch):
    path = tmp_path / "fl.toml"
    path.write_text('min_clients = 4\nschedule = "none"\nnorm_bound = 3.5\n')
    monkeypatch.setenv("FL_NORM_BOUND", "7")
    settings = ServerSettings.load(path, overrides={"min_clients": 9})
    assert settings.min_clients == 9 and settings.norm_bound == 7.0
    assert settings.dag_schedule is None
    assert settings.aggregation("autoencoder").norm_bound == 7.0  # an iterative kind's bound


def test_unknown_keys_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "fl.toml"
    path.write_text("min_clientz = 4\n")
    with pytest.raises(ValidationError):
        ServerSettings.load(path)
    with pytest.raises(ValidationError):
        ServerSettings.load(overrides={"server_momentum": 1.5})
    with pytest.raises(FileNotFoundError):
        ServerSettings.load(tmp_path / "missing.toml")


def test_robust_aggregation_needs_an_iterative_kind():
    """Refused, not silently ignored: an exact kind's round is only exact as the mean."""
    assert ServerSettings(robust_aggregation="fltrust", model_kind="autoencoder")
    for kind in ("gaussian", "gmm"):
        with pytest.raises(ValidationError, match="iterative model kinds"):
            ServerSettings(robust_aggregation="fltrust", model_kind=kind)
        assert ServerSettings(model_kind=kind).aggregation().robust == "none"


def test_em_step_is_the_mixture_kinds_server_step():
    """em_step reaches the mixture's rounds only: the Gaussian is one exact round (any
    other step would no longer be the pooled fit) and the autoencoder has server_lr."""
    settings = ServerSettings(em_step=0.25, server_lr=0.5)
    assert settings.aggregation("gmm").server_lr == 0.25
    assert settings.aggregation("gaussian").server_lr == 1.0
    assert settings.aggregation("autoencoder").server_lr == 0.5
    assert ServerSettings().aggregation("gmm").server_lr == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError):
            ServerSettings(em_step=bad)

"""Benchmarks run once at a tiny size: they work and print the promised JSON (no timing)."""

from __future__ import annotations

import json

from bench.quality import main as quality_main


def test_quality_prints_every_field(small_dataset, capsys):
    assert quality_main(["--dataset", str(small_dataset), "--rounds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for field in (
        "federated_auc",
        "federated_ap",
        "centralized_auc",
        "local_only_auc",
        "isolation_forest_auc",
        "no_training_auc",
        "bytes_per_update",
        "dense_bytes_per_update",
    ):
        assert 0 <= result[field] <= (1 if field.endswith(("auc", "ap")) else 1e9), field
    assert result["per_seed"] and result["bytes_per_update"] < result["dense_bytes_per_update"]


def test_quality_gaussian_federated_equals_centralized(small_dataset, capsys):
    assert quality_main(["--dataset", str(small_dataset), "--kind", "gaussian", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["federated_auc"] - result["centralized_auc"]) < 1e-9

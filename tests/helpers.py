"""Builders shared by fixtures and tests that need a deployment of their own."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any


def build_deployment(s3_config: Any, keys_dir: Path, dataset_path: Path, **settings: Any) -> Any:
    """A fresh deployment on ``s3_config``: its own buckets, keys, holdout and version 1."""
    from bench.make_dataset import load_dataset
    from fedlib.ops.admin import initial_package
    from fedlib.server import state_keys
    from fedlib.server.deployment import Deployment, Holdout
    from fedlib.server.records import HoldoutSplitKey
    from fedlib.server.settings import ServerSettings

    tag = uuid.uuid4().hex[:10]
    dep = Deployment(
        ServerSettings(
            inbox_bucket=f"inbox-{tag}",
            models_bucket=f"models-{tag}",
            state_bucket=f"state-{tag}",
            airgap_bucket=f"airgap-{tag}",
            keys_dir=keys_dir,
            **{"min_clients": 2, **settings},
        ),
        s3_config,
    )
    dep.ensure_keys()
    dep.ensure_buckets()
    dep.init_channel()
    # one holdout split for every test deployment (a real one draws its key at random)
    split_key = HoldoutSplitKey(key=hashlib.sha256(b"tests: holdout split").hexdigest())
    dep.state.put(state_keys.HOLDOUT_SPLIT_KEY, split_key.to_json(), if_absent=True)
    data = load_dataset(dataset_path)
    holdout = Holdout.from_bytes(Path(dataset_path).read_bytes())  # as fl-admin init reads it
    dep.save_holdout(holdout)
    dep.registry(signing=True).publish(initial_package(dep, holdout))
    dep.dataset = data
    return dep


def write_server_toml(deployment: Any, path: Path, extra: str = "") -> Path:
    """``deployment``'s buckets, keys and min_clients as an fl-server.toml (+ ``extra``)."""
    settings = deployment.settings
    names = ("inbox_bucket", "models_bucket", "state_bucket", "airgap_bucket", "keys_dir")
    path.write_text(
        "\n".join(f'{n} = "{getattr(settings, n)}"' for n in names)
        + f"\nmin_clients = {settings.min_clients}\n"
        + extra
    )
    return path


def expose_to_airflow(deployment: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Make the DAGs see ``deployment``: an fl-server.toml and the fl_s3 connection."""
    toml = write_server_toml(deployment, tmp_path / "fl-server.toml")
    conn = deployment.s3.airflow_connection()
    monkeypatch.setenv("FL_SERVER_CONFIG", str(toml))
    monkeypatch.setenv("AIRFLOW_CONN_FL_S3", json.dumps(conn))

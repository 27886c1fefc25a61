"""Shared pytest fixtures.

Sections (append new ones at the end, e.g. Airflow):

* path setup - make ``fedlib``/``client`` importable when pytest runs from the venv;
* S3 - one real SeaweedFS server per session (no mocks: conditional writes, grants and
  listing quirks are exactly what a mock would get wrong), a fresh bucket per test, and
  a factory for extra servers with their own identities.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# ----------------------------------------------------------------------------- path setup

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from fedlib.storage.store import S3Config, S3Store
    from scripts.seaweed import SeaweedServer

# ----------------------------------------------------------------------------- S3

S3_FIXTURES = frozenset({"seaweed_factory", "s3_server", "s3_config", "s3_bucket"})
AIRFLOW_FIXTURES = frozenset({"airflow_home", "dagbag", "airflow_deployment", "dashboard_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real services they start: ``s3`` (the S3 fixtures) and
    ``airflow`` (a metadata DB, DAG runs or an API server), so ``make test-fast`` can
    deselect them (``-m "not s3 and not airflow and not slow"``)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if S3_FIXTURES & names:
            item.add_marker(pytest.mark.s3)
        if AIRFLOW_FIXTURES & names:
            item.add_marker(pytest.mark.airflow)


@pytest.fixture(scope="session")
def seaweed_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SeaweedServer]]:
    """Start extra SeaweedFS servers (e.g. with client identities); all stop at session end."""
    from scripts.seaweed import SeaweedServer

    started: list[SeaweedServer] = []

    def make(identities: list[dict[str, Any]] | None = None, **kwargs: Any) -> SeaweedServer:
        kwargs.setdefault("die_with_parent", True)  # a killed pytest must not leak servers
        server = SeaweedServer(tmp_path_factory.mktemp("seaweed"), identities=identities, **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def s3_server(seaweed_factory: Callable[..., SeaweedServer]) -> SeaweedServer:
    """The session's SeaweedFS server; only the admin identity exists on it."""
    return seaweed_factory()


@pytest.fixture(scope="session")
def s3_config(s3_server: SeaweedServer) -> S3Config:
    """Endpoint and admin credentials of :func:`s3_server`."""
    return s3_server.s3_config()


@pytest.fixture
def s3_bucket(s3_config: S3Config) -> S3Store:
    """A new, empty, uniquely named bucket on the session server."""
    from fedlib.storage.store import S3Store

    store = S3Store(f"test-{uuid.uuid4().hex[:16]}", s3_config)
    store.ensure_bucket()
    return store


# ----------------------------------------------------------------------------- deployment


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic fleet (6 clients) written once per session."""
    from bench.make_dataset import make_dataset, save_dataset

    path = tmp_path_factory.mktemp("data") / "fleet.npz"
    save_dataset(
        make_dataset(
            clients=6, windows_per_client=200, holdout_benign=400, holdout_anomalies=100, seed=7
        ),
        path,
    )
    return path


@pytest.fixture(scope="session")
def large_holdout_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small fleet with 80 holdout anomalies per class (the per-class gate judges
    classes of at least 30 rows)."""
    from bench.make_dataset import make_dataset, save_dataset

    path = tmp_path_factory.mktemp("data") / "fleet-classes.npz"
    save_dataset(
        make_dataset(
            clients=6, windows_per_client=200, holdout_benign=400, holdout_anomalies=400, seed=7
        ),
        path,
    )
    return path


@pytest.fixture
def deployment(s3_config: S3Config, tmp_path: Path, small_dataset: Path) -> Any:
    """A fresh deployment: its own buckets, keys in tmp, holdout and model version 1."""
    from tests.helpers import build_deployment

    return build_deployment(s3_config, tmp_path / "server-keys", small_dataset)


@pytest.fixture
def admin_env(s3_server: Any, tmp_path: Path, small_dataset: Path, monkeypatch: Any) -> dict:
    """What ``fl-admin`` needs: an fl-server.toml with fresh buckets (append settings to
    ``config`` before ``init``), S3 credentials in the environment, a holdout file."""
    import uuid

    import numpy as np

    from bench.make_dataset import load_dataset

    tag = uuid.uuid4().hex[:8]
    config = tmp_path / "fl-server.toml"
    config.write_text(
        "\n".join(
            [
                f'inbox_bucket = "inbox-{tag}"',
                f'models_bucket = "models-{tag}"',
                f'state_bucket = "state-{tag}"',
                f'airgap_bucket = "airgap-{tag}"',
                f'keys_dir = "{tmp_path / "keys"}"',
                f's3_endpoint_url = "{s3_server.endpoint_url}"',
            ]
        )
        + "\n"
    )
    monkeypatch.setenv("FL_SERVER_CONFIG", str(config))
    monkeypatch.setenv("FL_S3_ACCESS_KEY", s3_server.admin_credentials.access_key)
    monkeypatch.setenv("FL_S3_SECRET_KEY", s3_server.admin_credentials.secret_key)
    data = load_dataset(small_dataset)
    holdout = tmp_path / "holdout.npz"
    np.savez(holdout, holdout_X=data.holdout_X, holdout_y=data.holdout_y)
    return {"tag": tag, "holdout": holdout, "data": data, "server": s3_server, "config": config}


# ----------------------------------------------------------------------------- Airflow


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temp AIRFLOW_HOME (SQLite) per session, migrated once, DAGs from ``dags/``."""
    import os
    import subprocess

    home = tmp_path_factory.mktemp("airflow-home")
    os.environ.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="True",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
    )
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True
    )
    dags = str(ROOT / "dags")
    if dags not in sys.path:
        sys.path.insert(0, dags)
    return home


@pytest.fixture(scope="session")
def dagbag(airflow_home: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture
def airflow_deployment(deployment: Any, airflow_home: Path, tmp_path: Path, monkeypatch) -> Any:
    """The test deployment as the DAGs see it: fl-server.toml plus the fl_s3 connection."""
    from tests.helpers import expose_to_airflow

    expose_to_airflow(deployment, tmp_path, monkeypatch)
    return deployment


# ----------------------------------------------------------------------------- dashboard plugin


@pytest.fixture(scope="session")
def dashboard_server(
    s3_config: S3Config, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """One ``airflow api-server`` (SimpleAuthManager, the repo's plugins/ and dags/) over a
    deployment with a known history; shared by test_plugin_api and test_plugin_browser."""
    from tests.helpers import build_deployment
    from tests.plugin_fixtures import airflow_api_server, build_history

    root = tmp_path_factory.mktemp("dashboard")
    dep = build_deployment(s3_config, root / "server-keys", small_dataset)
    home = root / "airflow-home"
    home.mkdir()
    with airflow_api_server(home, dep, lambda: build_history(dep)) as server:
        yield server

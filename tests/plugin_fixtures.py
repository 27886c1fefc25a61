"""What the dashboard tests share: a deployment with a known history, and an Airflow
API server (real auth: SimpleAuthManager, JWTs) with the repo's plugins folder.

The fixtures themselves live in ``tests/conftest.py`` (section "dashboard plugin") so
that ``test_plugin_api`` and ``test_plugin_browser`` share one server per session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD = "/dadm-fl"

#: Airflow-shaped run ids: ``:`` and ``+`` must survive URLs and report keys.
RUN_PUBLISH = "manual__2027-01-01T00:00:00+00:00"
RUN_QUARANTINE = "manual__2027-01-01T01:00:00+00:00"
RUN_REJECTED = "scheduled__2027-01-01T02:00:00+00:00"
RUN_ROLLBACK = "manual__2027-01-01T03:00:00+00:00"


@dataclass
class History:
    """What :func:`build_history` did, as the tests expect the dashboard to show it."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # inbox key -> reason (quarantine run)
    degraded_version: int = 0
    rollback_version: int = 0


def build_history(deployment: Any) -> History:
    """Four rounds over real S3: published, published with refused updates, rejected by
    the gate, and a waiting round whose first step rolls back a degraded model."""
    from fedlib.crypto import sealing
    from fedlib.server.pipeline import run_round
    from tests.test_rollback import publish_degraded
    from tests.test_round_runner import enroll, forged_payload_update, upload_updates

    history = History()

    upload_updates(deployment, 2)
    history.reports[RUN_PUBLISH] = run_round(deployment, RUN_PUBLISH).as_dict()

    upload_updates(deployment, 2, seed=10, start=2)
    active = deployment.registry().read_active().metadata
    dim, base = active.num_params, active.version
    key, stranger = enroll(deployment, "mallory"), sealing.generate_signing_key()
    for signer, delta, reason in (
        (stranger, np.zeros(dim), "unknown_client"),
        (key, np.full(dim, 1e3), "norm_exceeded"),
    ):
        forged = forged_payload_update(deployment, "mallory", signer, delta, base_version=base)
        history.refused[forged] = reason
    history.reports[RUN_QUARANTINE] = run_round(deployment, RUN_QUARANTINE).as_dict()

    settings = deployment.settings
    deployment.settings = settings.model_copy(update={"auc_floor": 0.9999})  # gate refuses
    try:
        upload_updates(deployment, 2, seed=20)
        history.reports[RUN_REJECTED] = run_round(deployment, RUN_REJECTED).as_dict()
    finally:
        deployment.settings = settings

    history.degraded_version = publish_degraded(deployment).version
    report = run_round(deployment, RUN_ROLLBACK).as_dict()  # nothing pending: waits
    history.reports[RUN_ROLLBACK] = report
    history.rollback_version = int(report["rollback"]["published_version"])
    return history


# -- the Airflow API server ---------------------------------------------------------------------


@dataclass
class AirflowServer:
    """A running API server: its URL, the users' generated passwords, what it shows."""

    url: str
    home: Path
    passwords: dict[str, str]
    log: Path
    history: History
    deployment: Any

    def token(self, user: str = "admin") -> str:
        """A JWT from Airflow's own login endpoint (SimpleAuthManager)."""
        import requests

        resp = requests.post(
            f"{self.url}/auth/token",
            json={"username": user, "password": self.passwords[user]},
            timeout=10,
        )
        resp.raise_for_status()
        return resp.json()["access_token"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def airflow_env(home: Path, deployment: Any, port: int) -> dict[str, str]:
    """A clean environment for the server: no AIRFLOW_* of the test process leaks in
    (the in-process fixtures set unit-test mode and their own home)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FL_"))}
    settings = deployment.settings
    names = ("inbox_bucket", "models_bucket", "state_bucket", "airgap_bucket", "keys_dir")
    toml = home / "fl-server.toml"
    toml.write_text("\n".join(f'{n} = "{getattr(settings, n)}"' for n in names) + "\n")
    conn = deployment.s3.airflow_connection()
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__AUTH_MANAGER=(
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin,viewer:viewer",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__API_AUTH__JWT_SECRET=os.urandom(32).hex(),
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        AIRFLOW_CONN_FL_S3=json.dumps(conn),
        FL_SERVER_CONFIG=str(toml),
        OPENBLAS_NUM_THREADS="1",
    )
    return env


@contextlib.contextmanager
def airflow_api_server(
    home: Path,
    deployment: Any,
    prepare: Callable[[], History],
    *,
    timeout: float = 150,
) -> Iterator[AirflowServer]:
    """``airflow db migrate`` then ``airflow api-server`` (one worker) in their own process
    group, while ``prepare()`` builds the history in this process; the whole group is
    stopped on exit."""
    import requests

    port = free_port()
    env = airflow_env(home, deployment, port)
    log = home / "api-server.log"
    airflow = BIN / "airflow"
    script = f'"{airflow}" db migrate && exec "{airflow}" api-server --port {port}'
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", script],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=home,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        history = prepare()
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"airflow api-server exited: {log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/api/v2/monitor/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"airflow api-server not up in {timeout}s; see {log}")
            time.sleep(0.5)
        passwords = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())
        yield AirflowServer(url, home, passwords, log, history, deployment)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

"""Fault: Airflow's metadata database (a real PostgreSQL server) restarted between two tasks
of a real ``fl_round`` run. The round still publishes and every update is counted once.

PostgreSQL comes from PyPI (``pgserver`` ships the server binaries in its wheel; only those
binaries are used, not its wrapper, which serves on a Unix socket and cannot restart). The
fixture runs ``initdb`` and ``pg_ctl`` itself on 127.0.0.1 and a free port. PostgreSQL
refuses to run as root, and tests and CI run as root: then every server command runs as
``nobody`` (``subprocess`` ``user=``/``group=``, no extra groups) on a copy of the binaries
in a fresh ``/tmp`` folder owned by ``nobody``, so nothing depends on the checkout's
permissions (pytest's temp folders are root-only, mode 0700).

Airflow runs in a child process (this file run as a script): its configuration and engine
are process-global, and the rest of the session uses the SQLite ``airflow_home``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from scripts.postgres import Postgres, start_postgres

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2027, 9, 1, tzinfo=UTC)
RESTART_AFTER = "reduce"  # partial sums are in S3, the candidate is not built yet
DOWN_SECONDS = 1.0  # stopped, then started again: a new postmaster, every connection cut


def airflow_env(home: Path, pg: Postgres) -> dict[str, str]:
    """The child's environment: its own AIRFLOW_HOME whose metadata DB is ``pg``."""
    return {
        **os.environ,  # FL_SERVER_CONFIG and AIRFLOW_CONN_FL_S3 from expose_to_airflow
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url("airflow", "postgresql+psycopg2"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


# ----------------------------------------------------------------------------- child process


def child_main(spec_path: str) -> None:
    """Run fl_round once with dag.test(); restart ``pg`` when RESTART_AFTER succeeds."""
    spec = json.loads(Path(spec_path).read_text())
    pg = Postgres(**spec["postgres"])
    sys.path.insert(0, str(ROOT / "dags"))
    from airflow.configuration import conf as airflow_conf
    from airflow.dag_processing.dagbag import DagBag
    from airflow.listeners import hookimpl
    from airflow.sdk.listener import get_listener_manager

    restarts: list[dict[str, Any]] = []

    class RestartMetadataDb:
        @hookimpl
        def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
            if task_instance.task_id == RESTART_AFTER and not restarts:
                before = pg.postmaster_pid()
                pg.stop()
                time.sleep(DOWN_SECONDS)
                pg.start()
                restarts.append({"after": RESTART_AFTER, "pid": [before, pg.postmaster_pid()]})

    get_listener_manager().add_listener(RestartMetadataDb())
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["fl_round"]
    conf = {"min_clients": None, "dry_run": False, "max_updates": None}
    dag_run = dag.test(logical_date=datetime.fromisoformat(spec["logical_date"]), run_conf=conf)
    tries = {
        f"{ti.task_id}[{ti.map_index}]": [ti.state, ti.try_number]
        for ti in dag_run.get_task_instances()
    }
    pre_ping = airflow_conf.getboolean("database", "sql_alchemy_pool_pre_ping")
    result = {"run_id": dag_run.run_id, "state": dag_run.state, "tries": tries}
    Path(spec["result"]).write_text(
        json.dumps({**result, "restarts": restarts, "pool_pre_ping": pre_ping})
    )


# ----------------------------------------------------------------------------- test


@pytest.fixture
def metadata_postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server for Airflow's metadata; stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="fl-metadata-pg-"))  # /tmp: reachable by nobody
    pg: Postgres | None = None
    try:
        pg = start_postgres(base)
        yield pg
    finally:
        if pg is not None and pg.postmaster_pid() is not None:
            with contextlib.suppress(RuntimeError):  # a stale pid file: already gone
                pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def test_metadata_db_restarted_between_tasks_round_still_publishes(
    metadata_postgres, deployment, tmp_path, monkeypatch
):
    """Three real device updates; Postgres stopped and started after ``reduce``. Every
    task still succeeds on its first try: the round publishes, each update has exactly one
    ledger verdict, and Airflow's own record of the run is in the restarted server."""
    from client.agent import run_cycle
    from fedlib.server.ledger import Ledger
    from tests.helpers import expose_to_airflow
    from tests.test_client import make_client
    from tests.test_fl_round_dag import report_of

    pg = metadata_postgres
    dep = deployment
    expose_to_airflow(dep, tmp_path, monkeypatch)
    env = airflow_env(tmp_path / "airflow-home", pg)
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    data = dep.dataset
    sent: list[str] = []
    for cid in data.client_ids[:3]:
        report = run_cycle(make_client(dep, tmp_path / "devices", cid, data.clients[cid]))
        sent += report.uploaded
    assert len(sent) == 3
    queued = sorted(info.key for info in dep.inbox.list("updates/"))
    assert sorted(key.rsplit("/", 1)[1] for key in queued) == sorted(sent)

    before = pg.query("SELECT pg_postmaster_start_time()")[0][0], pg.postmaster_pid()
    spec = tmp_path / "spec.json"
    result_path = tmp_path / "result.json"
    spec.write_text(
        json.dumps(
            {"postgres": asdict(pg), "logical_date": T0.isoformat(), "result": str(result_path)}
        )
    )
    child = subprocess.run(
        [sys.executable, "-m", "tests.security.test_metadata_db", str(spec)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-5000:]
    result = json.loads(result_path.read_text())
    print(child.stdout[-20000:], child.stderr[-20000:], json.dumps(result), sep="\n")  # on failure

    # the server really went away and came back while the run was between two tasks
    after = pg.query("SELECT pg_postmaster_start_time()")[0][0], pg.postmaster_pid()
    assert after[0] > before[0] and after[1] != before[1], (before, after)
    assert result["restarts"] == [{"after": RESTART_AFTER, "pid": [before[1], after[1]]}]

    # What survival needs: [database] sql_alchemy_pool_pre_ping (Airflow's default, True).
    # With it False, dag.test's next query takes a cut pooled connection and ``reduce``
    # ends failed (OperationalError: server closed the connection unexpectedly).
    assert result["pool_pre_ping"] is True
    assert result["state"] == "success", result
    assert all(state_try == ["success", 1] for state_try in result["tries"].values()), result
    report = report_of(dep, SimpleNamespace(run_id=result["run_id"]))
    assert report["decision"] == "published" and report["accepted"] == 3, report
    assert dep.registry().active_version() == 2
    verdicts = list(Ledger(dep.state).verdicts())
    assert sorted(v.key for v in verdicts) == queued  # each update exactly once
    assert {v.run_id for v in verdicts} == {result["run_id"]}
    assert list(dep.inbox.list("updates/")) == []

    # and Airflow's record of the run is in the restarted server
    rows = pg.query(
        "SELECT state FROM dag_run WHERE run_id = %s", (result["run_id"],), database="airflow"
    )
    assert rows == [("success",)]


if __name__ == "__main__":
    child_main(sys.argv[1])

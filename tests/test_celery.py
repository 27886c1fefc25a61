"""``fl_round`` on CeleryExecutor with two workers that share nothing on disk (issue 18).

The stack: PostgreSQL (metadata database and Celery result backend), Redis (the broker),
the API server, DAG processor and scheduler each in their own process, and two
``airflow celery worker`` processes (:meth:`bench.scaleout.Airflow.start_worker`), each
with its own AIRFLOW_HOME, working directory, temporary directory, copy of the DAG files
and copy of the keys. The scheduler, DAG processor and API server get a settings file
whose ``keys_dir`` does not exist: a task that read a key, a file or a module only the
scheduler's machine has would fail here.

The same inbox is first aggregated by a LocalExecutor dry run (consumes and publishes
nothing), then by the Celery run; both aggregates must be the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from bench.crafted import enroll_fleet, upload_crafted
from bench.scaleout import Airflow, Redis, celery_env, init_deployment, ledger_keys, private_copy
from fedlib.server.state_keys import RunKeys
from scripts.postgres import start_postgres

UPDATES = 240
SHARD_SIZE = 30  # 8 shards: both workers get some whatever the timing
WORKERS = ("worker-1", "worker-2")


@pytest.mark.airflow
@pytest.mark.slow
def test_fl_round_on_celery_workers_that_share_nothing(s3_server, tmp_path):
    home = tmp_path / "stack"
    home.mkdir()
    deployment, env = init_deployment(home, s3_server, SHARD_SIZE, 10_000)
    clients = enroll_fleet(deployment, UPDATES, "celery")
    keys = sorted(key for key, _ in upload_crafted(deployment, clients, UPDATES, seed=18))
    with_keys = Path(env["FL_SERVER_CONFIG"])  # what fl-admin init wrote: keys_dir = its keys
    central = home / "central"
    central.mkdir()
    env["FL_SERVER_CONFIG"] = str(private_copy(with_keys, central, keys=False))

    pg_base = Path(tempfile.mkdtemp(prefix="fl-celery-pg-"))  # /tmp: reachable by nobody
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, pg_base, True)
        postgres = start_postgres(pg_base)
        stack.callback(postgres.stop, "immediate")
        redis = Redis(home / "redis").start()
        stack.callback(redis.stop)
        airflow = Airflow(
            home / "airflow",
            env,
            deployment.s3.airflow_connection(),
            heartbeat_s=1,
            executor_env=celery_env(postgres, redis),
        )
        stack.callback(airflow.stop)
        airflow.start()

        # 1. LocalExecutor, dry run: the reference aggregate of this very inbox
        # (LocalExecutor's tasks run on the scheduler's machine: that one has the keys)
        local = {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "FL_SERVER_CONFIG": str(with_keys)}
        airflow.start_scheduler(2, **local)
        state, local_run, _, _ = airflow.run_dag({"dry_run": True}, timeout=600)
        assert state == "success", (local_run, airflow.home)
        airflow.stop_scheduler()
        assert sorted(info.key for info in deployment.inbox.list("updates/")) == keys

        # 2. CeleryExecutor, two workers
        for name in WORKERS:
            airflow.start_worker(name, with_keys)
        airflow.start_scheduler(4)
        state, run, tis, _ = airflow.run_dag({}, timeout=600)
        assert state == "success", (run, [t for t in tis if t["state"] != "success"], home)

    shards = [t for t in tis if t["task_id"] == "process_shard"]
    assert len(shards) == -(-UPDATES // SHARD_SIZE)
    assert {t["hostname"] for t in shards} == set(WORKERS), [t["hostname"] for t in shards]
    assert {t["hostname"] for t in tis if t["state"] == "success"} <= set(WORKERS)

    report = json.loads(deployment.state.get(RunKeys(run["dag_run_id"]).report))
    assert report["decision"] == "published" and report["accepted"] == UPDATES, report
    assert deployment.registry().active_version() == 2
    assert ledger_keys(deployment) == set(keys)  # one verdict per update, no other
    assert list(deployment.inbox.list("updates/")) == []

    def digest(run_id: str) -> str:
        return hashlib.sha256(deployment.state.get(RunKeys(run_id).aggregate)).hexdigest()

    assert digest(run["dag_run_id"]) == digest(local_run["dag_run_id"])

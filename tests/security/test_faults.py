"""Faults against the real services: the S3 server dies mid-round; a worker is killed
(SIGKILL, by a failpoint) between a shard's partial sum and its verdicts under Airflow's
LocalExecutor. Nothing is lost or counted twice."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.scaleout import Airflow
from fedlib import failpoints
from fedlib.server import pipeline
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import RoundRun
from fedlib.server.records import AggregateResult, Decision, RoundPlan, RoundReport
from fedlib.server.round_runner import load_plan
from fedlib.server.state_keys import RunKeys
from tests.helpers import build_deployment, expose_to_airflow
from tests.test_fl_round_dag import report_of, run_dag
from tests.test_round_runner import upload_updates

T0 = datetime(2027, 6, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


def stop_s3_after(task_id: str, server):
    """An Airflow listener: when ``task_id`` succeeds, kill the S3 server (in whatever
    process runs the task)."""
    from airflow.listeners import hookimpl

    class KillS3:
        @hookimpl
        def on_task_instance_success(self, previous_state, task_instance):
            if task_instance.task_id == task_id:
                server.stop()

    return KillS3()


def restart_when_down(server, down_seconds: float, stop: threading.Event) -> threading.Thread:
    """From the test process: notice S3 is gone, wait, bring it back (same data, ports)."""
    host, port = server.endpoint_url.rsplit(":", 1)

    def watch() -> None:
        while not stop.is_set():
            try:
                socket.create_connection((host.split("//")[1], int(port)), timeout=0.5).close()
            except OSError:
                time.sleep(down_seconds)
                server.restart()
                watch.restarts += 1  # type: ignore[attr-defined]
                # stay alive: the server dies with the thread that started it (PDEATHSIG)
                stop.wait()
                return
            time.sleep(0.2)

    watch.restarts = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=watch, daemon=True)
    thread.watch = watch  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_s3_killed_mid_round_retries_and_matches_an_undisturbed_run(
    seaweed_factory, airflow_home, dagbag, tmp_path, small_dataset, monkeypatch
):
    from airflow.sdk.listener import get_listener_manager

    server = seaweed_factory()
    dep = build_deployment(server.s3_config(max_attempts=1), tmp_path / "keys", small_dataset)
    expose_to_airflow(dep, tmp_path, monkeypatch)
    sent = upload_updates(dep, 4)

    manager = get_listener_manager()
    manager.add_listener(stop_s3_after("reduce", server))
    done = threading.Event()
    watcher = restart_when_down(server, 3.0, done)
    try:
        try:
            disturbed = run_dag(dagbag, T0)  # build_candidate fails, retried once S3 is back
        finally:
            manager.clear()
        assert watcher.watch.restarts == 1  # S3 really went away and came back
        assert disturbed.state == "success"
        tries = {ti.task_id: ti.try_number for ti in disturbed.get_task_instances()}
        assert tries["build_candidate"] >= 2, tries  # it really failed once
        report = report_of(dep, disturbed)
        assert report["decision"] == "published" and report["accepted"] == 4, report
        ledger = Ledger(dep.state)
        assert all(ledger.read(k).run_id == disturbed.run_id for k in sent)

        # the undisturbed computation of the same interval, from the same inputs
        again = run_dag(dagbag, T0)
        replay = report_of(dep, again)
        assert replay["decision"] == "replay_match", replay
        assert replay["replay"]["candidate_digest"] == report["candidate_digest"]
    finally:
        done.set()
        watcher.join(timeout=60)


def replay_in_process(
    deployment, run_id: str, original: RoundPlan
) -> tuple[AggregateResult, RoundReport]:
    """Every step of the pipeline for ``original``'s data interval, in this process and
    undisturbed (what ``fl-admin round`` runs, plus the interval a dated DAG run has)."""
    run = RoundRun(
        run_id=run_id,
        created_at_ms=original.created_at_ms,
        interval_key=original.interval_key,
        interval_end_ms=original.interval_end_ms,
    )
    plan = pipeline.plan(deployment, run)
    assert plan.replay_of is not None, plan.message
    for index in range(plan.shard_count):
        pipeline.process_shard(deployment, run, index)
    aggregate = pipeline.reduce(deployment, run)
    pipeline.build_candidate(deployment, run)
    pipeline.evaluate(deployment, run)
    assert pipeline.gate(deployment, run) is not Decision.PUBLISHED  # a replay never does
    return aggregate, pipeline.finalize(deployment, run)


@pytest.mark.airflow
@pytest.mark.slow
def test_worker_sigkilled_between_partial_sum_and_verdicts_is_retried_and_publishes(
    s3_config, small_dataset, tmp_path
):
    """A real ``fl_round`` on Airflow's LocalExecutor (scheduler, DAG processor, API server):
    the ``process_shard`` task process is killed with SIGKILL by the failpoint right after
    its partial sum is stored, before its verdicts; the scheduler retries it (a new
    process, past the failpoint) and the round publishes, every update counted once."""
    dep = build_deployment(s3_config, tmp_path / "keys", small_dataset)
    sent = upload_updates(dep, 4)
    after_uploads = datetime.now(UTC)  # a dated run takes what the store received by then
    settings = dep.settings
    names = ("inbox_bucket", "models_bucket", "state_bucket", "airgap_bucket", "keys_dir")
    toml = tmp_path / "fl-server.toml"
    toml.write_text(
        "\n".join(f'{n} = "{getattr(settings, n)}"' for n in names)
        + f'\nmin_clients = {settings.min_clients}\nschedule = "none"\n'
    )
    fired = tmp_path / "failpoints"
    fired.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "DADM_"))}
    env.update(
        FL_SERVER_CONFIG=str(toml),
        DADM_FAILPOINTS=failpoints.SHARD_AFTER_PARTIAL,
        DADM_FAILPOINTS_ONCE_DIR=str(fired),
        PYTHONPATH=str(ROOT),
    )
    airflow = Airflow(tmp_path / "airflow", env, dep.s3.airflow_connection(), heartbeat_s=1)
    try:
        airflow.start()
        airflow.start_scheduler(1)
        run = airflow.client.api(
            "POST",
            "/dags/fl_round/dagRuns",
            json={"logical_date": after_uploads.isoformat(), "conf": {}},
        )
        run_id = run["dag_run_id"]
        deadline = time.monotonic() + 600
        while run["state"] not in ("success", "failed") and time.monotonic() < deadline:
            time.sleep(2)
            run = airflow.client.api("GET", f"/dags/fl_round/dagRuns/{run_id}")
        tis = airflow.client.api("GET", f"/dags/fl_round/dagRuns/{run_id}/taskInstances")
    finally:
        airflow.stop()
    tries = {(t["task_id"], t["map_index"]): t["try_number"] for t in tis["task_instances"]}
    assert run["state"] == "success", (run, tries, airflow.home)
    # the failpoint fired in a real task process (its pid in the marker), and that
    # attempt failed: the shard succeeded on Airflow's retry, every other task at once
    assert (fired / failpoints.SHARD_AFTER_PARTIAL).read_text().isdigit()
    assert tries.pop(("process_shard", 0)) == 2, tries
    assert set(tries.values()) == {1}, tries

    report = json.loads(dep.state.get(RunKeys(run_id).report))
    assert report["decision"] == "published" and report["accepted"] == 4, report
    assert report["published_version"] == 2
    ledger = Ledger(dep.state)
    verdicts = list(ledger.verdicts())
    assert sorted(v.key for v in verdicts) == sorted(sent)  # each object exactly one verdict
    assert all(v.accepted and v.run_id == run_id for v in verdicts)
    assert list(dep.inbox.list("updates/")) == []

    # nothing counted twice: the same interval recomputed undisturbed from the archived
    # accepted bytes gives the same aggregate and the same candidate, byte for byte
    aggregate, replay = replay_in_process(dep, "undisturbed", load_plan(dep, run_id))
    assert replay.replay is not None and replay.replay.matches, replay
    assert aggregate.count == 4

    def digest(run: str) -> str:
        return hashlib.sha256(dep.state.get(RunKeys(run).aggregate)).hexdigest()

    assert digest("undisturbed") == digest(run_id) == aggregate.digest

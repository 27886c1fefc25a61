"""Faults against the real services: the S3 server dies mid-round, a shard is re-run
after dying between its partial sum and its verdicts. Nothing is lost or counted twice."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime

from fedlib.server import round_runner as rr
from fedlib.server.ledger import Ledger
from fedlib.server.state_keys import RunKeys
from tests.helpers import build_deployment, expose_to_airflow
from tests.test_fl_round_dag import report_of, run_dag
from tests.test_round_runner import upload_updates

T0 = datetime(2027, 6, 1, tzinfo=UTC)


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


def test_shard_rerun_after_dying_before_its_verdicts_counts_nothing_twice(deployment):
    sent = upload_updates(deployment, 3)
    plan = rr.plan_round(deployment, "r-kill")
    first = rr.process_shard(deployment, "r-kill", 0)
    partial = deployment.state.get(first.partial_key)
    # the worker died after the partial sum, before its verdicts: the file never landed
    deployment.state.delete(RunKeys("r-kill").shard_verdicts(0))
    retry = rr.process_shard(deployment, "r-kill", 0)  # what Airflow's retry runs
    assert deployment.state.get(retry.partial_key) == partial
    assert retry.accepted == first.accepted == 3
    for index in range(1, plan.shard_count):
        rr.process_shard(deployment, "r-kill", index)
    assert rr.reduce_round(deployment, "r-kill").count == 3
    rr.build_round_candidate(deployment, "r-kill")
    rr.evaluate_round(deployment, "r-kill")
    rr.finalize_round(deployment, "r-kill", decision="rejected")
    ledger = Ledger(deployment.state)
    assert sorted(v.key for v in ledger.verdicts()) == sorted(sent)
    assert list(deployment.inbox.list("updates/")) == []

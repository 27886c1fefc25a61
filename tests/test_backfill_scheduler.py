"""``airflow backfill create`` for real, with the README's commands (issue 18).

The stack: PostgreSQL as the metadata database, the API server, DAG processor and
scheduler (LocalExecutor) each in its own process, ``fl_round`` on a one-minute cron
schedule. While the DAG is paused, devices upload in three successive minutes; then the
README's commands run unchanged (only ``FROM``/``TO`` are this test's ticks): a backfill
over the three ticks and the unpause. Each backfill run must take exactly what the store
received in its interval, in interval order; a scheduled run that comes due while the
backfill is active takes nothing. Then the README's re-check (``--reprocess-behavior
completed``) must recompute each interval's candidate byte for byte and publish nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench.scaleout import Airflow
from fedlib.server.ledger import Ledger
from fedlib.server.round_runner import load_plan, plan_keys
from fedlib.server.state_keys import RunKeys
from scripts.postgres import start_postgres
from tests.helpers import write_server_toml
from tests.test_backfill import upload_at

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "fl_round"
TICK = timedelta(minutes=1)
DEVICES_PER_INTERVAL = ((0, 1), (2, 3), (4, 5))


def readme_backfill_commands() -> list[str]:
    """The README's ``airflow`` lines of the gap procedure, in the order printed."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Processing a gap one interval at a time.**") :]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.startswith("airflow ")]


def floor_tick(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def sleep_until(moment: datetime) -> None:
    while (left := (moment - datetime.now(UTC)).total_seconds()) > 0:
        time.sleep(min(left, 5))


def tick_of(received_ms: int) -> datetime:
    """The first tick at or after a receipt: the scheduled run that takes it."""
    moment = datetime.fromtimestamp(received_ms / 1000, UTC)
    floor = floor_tick(moment)
    return floor if floor == moment else floor + TICK


def all_runs(airflow: Airflow) -> list[dict[str, Any]]:
    return airflow.client.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 100})["dag_runs"]


def wait_for_backfill(airflow: Airflow, count: int, timeout: float) -> dict[str, Any]:
    """The ``count``-th backfill of the DAG, once Airflow marked it complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert airflow.scheduler is not None and airflow.scheduler.alive(), airflow.home
        found = airflow.client.api("GET", "/backfills", params={"dag_id": DAG_ID})["backfills"]
        if len(found) >= count and found[count - 1]["completed_at"]:
            return found[count - 1]
        time.sleep(2)
    raise AssertionError(f"backfill {count} did not complete; logs in {airflow.home}")


def wait_for_runs(airflow: Airflow, run_ids: set[str], timeout: float) -> None:
    """Until each of these DAG runs has ended (a run that started during the backfill
    may still be in its first task when the backfill completes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {r["dag_run_id"]: r["state"] for r in all_runs(airflow)}
        if all(states.get(run_id) in ("success", "failed") for run_id in run_ids):
            return
        time.sleep(2)
    raise AssertionError(f"runs {sorted(run_ids)} did not end; logs in {airflow.home}")


def plan_started(airflow: Airflow, run_id: str) -> datetime:
    """When the run's ``plan`` task started: the moment it decided to step aside or not."""
    ti = airflow.client.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/plan")
    started = ti["start_date"]
    assert started, ti
    return datetime.fromisoformat(started)


def run_commands(commands: list[str], env: dict[str, str], cwd: Path) -> None:
    """Each line as an operator's shell runs it (``airflow`` from the PATH: the venv's)."""
    bash = shutil.which("bash")
    assert bash is not None
    for command in commands:
        done = subprocess.run(
            [bash, "-c", command], env=env, cwd=cwd, capture_output=True, text=True
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)


@pytest.mark.airflow
@pytest.mark.slow
def test_readme_backfill_takes_each_interval_in_order_then_replays_byte_for_byte(
    deployment, tmp_path
):
    commands = readme_backfill_commands()
    create = [c for c in commands if c.startswith("airflow backfill create")]
    assert len(commands) == 3 and len(create) == 2, commands
    assert "--max-active-runs 1" in create[0] and "--reprocess-behavior" not in create[0]
    assert create[1].endswith("--reprocess-behavior completed"), create[1]
    first, recheck = commands[:2], commands[2:]
    assert first[1] == f"airflow dags unpause {DAG_ID}", first

    config = write_server_toml(deployment, tmp_path / "fl-server.toml", 'schedule = "* * * * *"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    env["FL_SERVER_CONFIG"] = str(config)
    ledger = Ledger(deployment.state)

    pg_base = Path(tempfile.mkdtemp(prefix="fl-backfill-pg-"))  # /tmp: reachable by nobody
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, pg_base, True)
        postgres = start_postgres(pg_base)
        stack.callback(postgres.stop, "immediate")
        airflow = Airflow(
            tmp_path / "airflow",
            env,
            deployment.s3.airflow_connection(),
            heartbeat_s=1,
            executor_env={
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url(
                    "airflow", "postgresql+psycopg2"
                ),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            },
        )
        stack.callback(airflow.stop)
        airflow.start(unpause=False)
        assert airflow.client.api("GET", f"/dags/{DAG_ID}")["is_paused"]
        airflow.start_scheduler(4)

        # devices upload in three successive minutes while the DAG is paused
        start = datetime.now(UTC)
        minute = floor_tick(start)
        if start - minute > timedelta(seconds=40):
            minute += TICK
        uploaded: list[str] = []
        for i, devices in enumerate(DEVICES_PER_INTERVAL):
            sleep_until(minute + i * TICK + timedelta(seconds=2))
            uploaded += [upload_at(deployment, d, datetime.now(UTC)) for d in devices]
        received = {i.key: i.last_modified_ms for i in deployment.inbox.list("updates/")}
        by_tick: dict[datetime, set[str]] = {}
        for key in uploaded:
            by_tick.setdefault(tick_of(received[key]), set()).add(key)
        ticks = sorted(by_tick)
        assert len(ticks) == 3 and all(len(v) == 2 for v in by_tick.values()), by_tick
        sleep_until(ticks[-1] + timedelta(seconds=3))
        assert all_runs(airflow) == []  # paused: the scheduler made no run

        cli_env = dict(airflow.env, FROM=ticks[0].isoformat(), TO=ticks[-1].isoformat())
        run_commands(first, cli_env, tmp_path)
        backfill = wait_for_backfill(airflow, 1, timeout=900)

        runs = all_runs(airflow)
        filled = sorted(
            (r for r in runs if r["run_type"] == "backfill"), key=lambda r: r["logical_date"]
        )
        assert [datetime.fromisoformat(r["logical_date"]) for r in filled] == ticks
        assert all(r["state"] == "success" for r in filled), filled
        # one at a time, in interval order
        for before, after in itertools.pairwise(filled):
            assert before["end_date"] <= after["start_date"], (before, after)
        reports = [
            json.loads(deployment.state.get(RunKeys(r["dag_run_id"]).report)) for r in filled
        ]
        for run, tick, report in zip(filled, ticks, reports, strict=True):
            planned = set(plan_keys(deployment, load_plan(deployment, run["dag_run_id"])))
            assert planned == by_tick[tick], (tick, planned, by_tick)
            assert {ledger.read(k).run_id for k in by_tick[tick]} == {run["dag_run_id"]}
            assert report["decision"] == "published", report
        versions = [r["published_version"] for r in reports]
        assert versions == [2, 3, 4], versions
        assert [r["base_version"] for r in reports] == [1, 2, 3]

        # a scheduled run whose plan ran while a backfill run was queued or running stepped
        # aside; one that started in the backfill's window took nothing either way (a plan
        # that ran after the last backfill run ended finds the inbox already taken)
        window = (backfill["created_at"], backfill["completed_at"])
        overlapping = [
            r
            for r in runs
            if r["run_type"] == "scheduled"
            and r["start_date"]
            and window[0] <= r["start_date"] <= window[1]
        ]
        assert overlapping, (window, runs)
        wait_for_runs(airflow, {r["dag_run_id"] for r in overlapping}, timeout=300)
        last_backfill_end = datetime.fromisoformat(filled[-1]["end_date"])
        # a run that came due well before the last backfill run ended planned while it was
        # queued or running (the margin is for the scheduler to start the run's plan task)
        due_inside = 0
        for run in overlapping:
            plan = load_plan(deployment, run["dag_run_id"])
            assert plan.updates == 0 and plan.waiting, plan
            due = datetime.fromisoformat(run["run_after"])
            if due <= last_backfill_end - timedelta(seconds=20):
                due_inside += 1
                assert "queued or running" in plan.message, (run, plan.message)
            elif plan_started(airflow, run["dag_run_id"]) < last_backfill_end:
                assert "queued or running" in plan.message, (run, plan.message)
        backfill_span = last_backfill_end - datetime.fromisoformat(window[0])
        if backfill_span > timedelta(seconds=80):  # a tick fell inside
            assert due_inside, (window, filled, overlapping)

        # the README's re-check: recomputed byte for byte, nothing published
        registry = deployment.registry()
        before_versions, active = registry.versions(), registry.active_version()
        run_commands(recheck, cli_env, tmp_path)
        wait_for_backfill(airflow, 2, timeout=900)
        again = {r["dag_run_id"]: r for r in all_runs(airflow) if r["run_type"] == "backfill"}
        for run, report in zip(filled, reports, strict=True):
            assert again[run["dag_run_id"]]["state"] == "success", again
            replay = json.loads(deployment.state.get(RunKeys(run["dag_run_id"]).report))
            assert replay["decision"] == "replay_match", replay
            assert replay["replay"]["candidate_digest"] == report["candidate_digest"]
            assert replay["published_version"] is None
        assert registry.versions() == before_versions and registry.active_version() == active
        for tick in ticks:
            run_ids = {ledger.read(k).run_id for k in by_tick[tick]}
            assert len(run_ids) == 1  # each update judged once, by its interval's run

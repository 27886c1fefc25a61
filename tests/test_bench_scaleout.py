"""bench.scaleout end to end at a tiny size: both runs happen and every update is accounted.

A subprocess (it starts SeaweedFS and Airflow components of its own and installs a
SIGTERM handler). No timing assertions: only that the JSON is complete and consistent,
that the executor really ran one and then two shards at once, and that each run's report
and ledger account for every queued update. Takes ~1 minute on 2 idle cores (~100 s
when other work shares them), hence ``slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPDATES, CLIENTS, SHARD_SIZE = 200, 200, 50  # one update per device: one vote a round


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scaleout_small(tmp_path: Path) -> None:
    state = tmp_path / "scaleout"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scaleout",
            "--updates",
            str(UPDATES),
            "--clients",
            str(CLIENTS),
            "--shard-size",
            str(SHARD_SIZE),
            "--dir",
            str(state),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object
    r = json.loads(lines[0])

    assert (r["updates"], r["clients"], r["shard_size"]) == (UPDATES, CLIENTS, SHARD_SIZE)
    assert r["shards"] == UPDATES // SHARD_SIZE
    for key in (
        "workers_1_shard_phase_s",
        "workers_2_shard_phase_s",
        "speedup",
        "updates_per_s_per_worker",
        "updates_per_s_per_worker_at_2",
        "workers_1_whole_run_s",
        "workers_2_whole_run_s",
        "whole_run_speedup",
        "model_params",
    ):
        assert r[key] > 0, key
    assert r["speedup"] == pytest.approx(
        r["workers_1_shard_phase_s"] / r["workers_2_shard_phase_s"], rel=1e-2
    )
    assert r["machine"]["nproc"] >= 1

    assert r["all_accounted"] is True
    assert [run["workers"] for run in r["runs"]] == [1, 2]
    assert r["runs"][0]["max_concurrent_tasks"] == 1
    assert r["runs"][0]["run_id"] != r["runs"][1]["run_id"]
    for run in r["runs"]:
        assert run["shards"] == r["shards"]
        assert 1 <= run["max_concurrent_tasks"] <= run["workers"]  # parallelism holds
        assert run["accepted"] == UPDATES and run["rejected"] == 0
        assert run["ledger_verdicts"] == UPDATES and run["inbox_left"] == 0
        assert run["all_accounted"] is True
        assert run["decision"] in {"published", "rejected"}
        assert 0 < run["shard_phase_s"] <= run["whole_run_s"]

    assert _processes_mentioning(str(state)) == []  # everything it started is stopped


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment names ``text`` (SeaweedFS: -dir=...,
    Airflow: AIRFLOW_HOME=...); processes we may not read are skipped."""
    needle = text.encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found

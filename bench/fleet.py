"""Fleets at internet scale by simulation: what a round costs the server, and what
central DP costs in AUC, at 1,000 to 100,000 devices.

    python -m bench.fleet --json [--devices 1000,10000,100000] [--participation 0.25]
        [--stragglers 0.1] [--rounds 2] [--shard-size 1000] [--schedule-minutes 15]
        [--dp-fleets 1000,3000,10000,30000,100000,300000,1000000] [--epsilons 8,3,1]
        [--dp-rounds 100] [--seeds 2] [--dataset bench/results/dataset.npz]
        [--skip-systems] [--skip-dp]

**Systems** (per fleet size N, its own SeaweedFS server with Prometheus metrics): N
enrolled devices; each round every device is online with probability
``participation`` (intermittent connectivity), and of those a ``stragglers`` fraction
delivers only after the round planned, so the next round takes it. Updates are valid
sealed, signed top-k updates of the deployment's model (:mod:`bench.crafted`: the real
sizes and crypto, no training). The server's round runs every step of
:data:`fedlib.server.pipeline.STEPS` in one child process (one worker, serial: the real
exact aggregation path); per round it reports wall time per step, the per-update part
(``process_shard`` + ``record_shard``, what workers divide) and the round-wide rest,
the child's peak RSS, and the S3 requests the server made, by type, counted by the S3
server itself (``SeaweedFS_s3_request_total``).

**Workers for a schedule**: at a measured per-worker rate (updates per second of the
per-update part), how many workers finish a round of U updates within the schedule
after the round-wide part: ``ceil(U / rate / (schedule - round_wide))``; once at this
run's in-process rate, once at the rate ``bench.scaleout --executor celery`` measured
through Airflow with one Celery worker (``--airflow-result``: per-task start-up
included), for the fleet's typical round and for every device online at once.

**DP** (per fleet size and epsilon, paired seeds): the autoencoder trained through
:func:`bench.quality.run_federated` (device training, clipping at C, sealing, exact
aggregation, the accountant-calibrated Gaussian noise of :mod:`fedlib.server.privacy`)
with ``dp_cohort`` set to a round's expected number of devices ``N * participation``:
the dataset's devices stand in for that round's mean update, and the noise on the mean
is ``z * C / (N * participation)``, what a round of that many devices gets. Reports
the AUC next to the same seeds without DP and the smallest simulated fleet within
0.02 AUC. The dataset's few devices make the no-DP mean noisier than a large round's
would be: the gap is the noise's own cost, not a claim on the large fleet's AUC.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.02  # the AUC a DP run may lose to the same run without DP
PER_UPDATE_STEPS = ("process_shard", "record_shard")
_REQUEST = re.compile(r"^SeaweedFS_s3_request_total\{([^}]*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers, comma separated")
    return values


def parse_float_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError("expected positive numbers, comma separated")
    return values


# ------------------------------------------------------------------------ S3 requests


def s3_requests(metrics_url: str, buckets: set[str], *, settle: bool = False) -> Counter[str]:
    """Requests the S3 server answered so far on ``buckets``, by type (GET, PUT, ...).

    ``settle``: read until two reads 0.25 s apart agree (at most 5 s). SeaweedFS counts a
    request after it has answered it, so a read right after the last answer can miss it."""
    import requests

    def read() -> Counter[str]:
        counts: Counter[str] = Counter()
        for line in requests.get(metrics_url, timeout=10).text.splitlines():
            match = _REQUEST.match(line)
            if match:
                labels = dict(_LABEL.findall(match.group(1)))
                if labels.get("bucket") in buckets:
                    counts[labels.get("type", "?")] += int(float(match.group(2)))
        return counts

    counts = read()
    deadline = time.monotonic() + 5.0
    while settle and time.monotonic() < deadline:
        time.sleep(0.25)
        again = read()
        if again == counts:
            break
        counts = again
    return counts


def _difference(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in sorted(after) if after[k] - before[k]}


# ------------------------------------------------------------------ the server's round


def server_round(config: Path, run_id: str, metrics_url: str) -> dict[str, Any]:
    """Every pipeline step in this process, timed, with the S3 requests of each."""
    from fedlib.server import pipeline
    from fedlib.server.deployment import Deployment
    from fedlib.server.records import RoundPlan
    from fedlib.server.settings import ServerSettings

    settings = ServerSettings.load(config)
    deployment = Deployment(settings, settings.s3())
    buckets = {settings.inbox_bucket, settings.state_bucket, settings.models_bucket}
    run = pipeline.RoundRun(run_id=run_id, created_at_ms=int(time.time() * 1000))
    seconds: Counter[str] = Counter()
    requests: dict[str, Counter[str]] = {}
    plan: RoundPlan | None = None
    decision = None
    began = time.perf_counter()
    for step in pipeline.STEPS:
        if step.needs_batch and (plan is None or plan.waiting):
            continue
        if step.needs_publish and decision is not pipeline.Decision.PUBLISHED:
            continue
        before = s3_requests(metrics_url, buckets)
        start = time.perf_counter()
        if step.mapped:
            for index in range(plan.shard_count if plan is not None else 0):
                step.run(deployment, run, index)
        else:
            result = step.run(deployment, run)
            if isinstance(result, RoundPlan):
                plan = result
            elif isinstance(result, pipeline.Decision):
                decision = result
        seconds[step.name] += time.perf_counter() - start
        requests[step.name] = Counter(_difference(s3_requests(metrics_url, buckets), before))
    wall = time.perf_counter() - began
    assert plan is not None
    total: Counter[str] = Counter()
    for counts in requests.values():
        total.update(counts)
    per_update = sum(seconds[s] for s in PER_UPDATE_STEPS)
    return {
        "updates": plan.updates,
        "clients": plan.client_count,
        "shards": plan.shard_count,
        "decision": decision.value if decision is not None else "waiting",
        "wall_s": round(wall, 2),
        "per_update_s": round(per_update, 2),
        "round_wide_s": round(wall - per_update, 2),
        "step_s": {k: round(v, 2) for k, v in seconds.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "s3_requests": dict(sorted(total.items())),
        "s3_requests_per_step": {k: dict(sorted(v.items())) for k, v in requests.items() if v},
    }


def _server_round_child(config: Path, run_id: str, metrics_url: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.fleet", "--server-round", str(config), run_id]
    cmd += ["--metrics-url", metrics_url]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"server round failed:\n{done.stdout}\n{done.stderr}")
    return dict(json.loads(done.stdout))


# ----------------------------------------------------------------------- one fleet


def simulate_fleet(
    devices: int,
    *,
    participation: float,
    stragglers: float,
    rounds: int,
    shard_size: int,
    seed: int,
    home: Path,
) -> dict[str, Any]:
    """``rounds`` rounds of a fleet of ``devices`` on a fresh SeaweedFS server."""
    from bench.crafted import enroll_fleet, upload_crafted
    from bench.scaleout import init_deployment
    from scripts.demo import free_port
    from scripts.seaweed import SeaweedServer

    metrics_port = free_port(9300)
    server = SeaweedServer(home / "seaweed", metrics_port=metrics_port).start(timeout=60)
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        deployment, env = init_deployment(home, server, shard_size, max(4 * devices, 1000))
        config = Path(env["FL_SERVER_CONFIG"])
        env = dict(env, PYTHONPATH=str(ROOT))
        began = time.perf_counter()
        clients = enroll_fleet(deployment, devices, "dev")
        enroll_s = time.perf_counter() - began
        rng = np.random.default_rng(seed)
        late: list[Any] = []
        out_rounds = []
        for r in range(rounds):
            online = [c for c in clients if rng.random() < participation]
            straggling = [c for c in online if rng.random() < stragglers]
            late_ids = {id(c) for c in straggling}
            on_time = [c for c in online if id(c) not in late_ids]
            arriving = on_time + late  # last round's stragglers arrive with this round's
            began = time.perf_counter()
            if arriving:
                upload_crafted(deployment, arriving, len(arriving), seed=seed * 1000 + r)
            upload_s = time.perf_counter() - began
            measured = _server_round_child(config, f"fleet-{devices}-r{r}", metrics_url, env)
            measured.update(
                online=len(online),
                stragglers_late=len(straggling),
                stragglers_taken=len(late),
                devices_upload_s=round(upload_s, 2),
            )
            out_rounds.append(measured)
            late = straggling
        return {"devices": devices, "enroll_s": round(enroll_s, 2), "rounds": out_rounds}
    finally:
        server.stop()


def workers_needed(updates: int, rate: float, round_wide_s: float, schedule_s: float) -> int:
    """Workers that finish ``updates`` at ``rate`` each within what the schedule leaves
    after the round-wide part (at least 1; the round-wide part alone must fit)."""
    left = schedule_s - round_wide_s
    if left <= 0:
        raise ValueError(f"the round-wide part ({round_wide_s:.0f} s) exceeds the schedule")
    return max(1, math.ceil(updates / rate / left))


def systems(args: argparse.Namespace) -> dict[str, Any]:
    fleets = []
    for devices in args.devices:
        with tempfile.TemporaryDirectory(prefix=f"fl-fleet-{devices}-") as home:
            fleets.append(
                simulate_fleet(
                    devices,
                    participation=args.participation,
                    stragglers=args.stragglers,
                    rounds=args.rounds,
                    shard_size=args.shard_size,
                    seed=args.seed,
                    home=Path(home),
                )
            )
        print(f"fleet {devices}: {json.dumps(fleets[-1]['rounds'][-1])}", file=sys.stderr)
    largest = max(fleets, key=lambda f: f["devices"])
    busiest = max(largest["rounds"], key=lambda r: r["updates"])
    schedule_s = args.schedule_minutes * 60
    typical = round(largest["devices"] * args.participation)
    rates = {"in_process": (busiest["updates"] / busiest["per_update_s"], busiest["round_wide_s"])}
    if args.airflow_result and Path(args.airflow_result).exists():
        # Celery, one worker: the shard and record_shard phases (per-task start-up
        # included) over the updates; its round-wide tasks, or ours if they grew larger
        run = json.loads(Path(args.airflow_result).read_text())["runs"][0]
        per_update_s = run["shard_phase_s"] + run["record_phase_s"]
        round_wide = max(run["serial_task_s"], busiest["round_wide_s"])
        rates["airflow_celery"] = (run["accepted"] / per_update_s, round_wide)
    plan: dict[str, Any] = {
        "devices": largest["devices"],
        "schedule_s": schedule_s,
        "typical_round_updates": typical,
    }
    # with every device online the round-wide part is not the typical round's: plan
    # lists every pending device, so scale it linearly (what 1k -> 10k -> 100k shows)
    grows = largest["devices"] / busiest["updates"]
    for name, (rate, round_wide) in rates.items():
        plan[name] = {
            "per_worker_updates_per_s": round(rate, 1),
            "round_wide_s": round(round_wide, 2),
            "round_wide_all_online_s": round(round_wide * grows, 2),
            "workers_typical_round": workers_needed(typical, rate, round_wide, schedule_s),
            "workers_all_online": workers_needed(
                largest["devices"], rate, round_wide * grows, schedule_s
            ),
        }
    return {"fleets": fleets, "schedule": plan}


# ------------------------------------------------------------------------------- DP


def dp_by_fleet(args: argparse.Namespace) -> dict[str, Any]:
    from bench.make_dataset import load_dataset
    from bench.quality import QualityConfig, pooled_schema, run_federated
    from fedlib.server.privacy import calibrate_noise

    data = load_dataset(args.dataset)
    ids = list(data.client_ids)
    schema = pooled_schema(data, ids)
    base = QualityConfig(rounds=args.dp_rounds)

    def aucs(cfg: QualityConfig) -> list[float]:
        out = []
        for seed in range(args.seeds):
            result = run_federated(data, ids, schema, cfg, seed)
            out.append(float(result["federated_auc"]))
        return out

    no_dp = aucs(base)
    table: dict[str, Any] = {}
    smallest: dict[str, int | None] = {}
    for eps in args.epsilons:
        z = calibrate_noise(eps, base.dp_delta, base.rounds)
        rows = []
        for fleet in sorted(args.dp_fleets):
            cohort = max(1, round(fleet * args.participation))
            with_dp = aucs(replace(base, dp_epsilon=eps, dp_cohort=cohort))
            gaps = [a - b for a, b in zip(with_dp, no_dp, strict=True)]
            rows.append(
                {
                    "fleet": fleet,
                    "devices_per_round": cohort,
                    "auc": statistics.fmean(with_dp),
                    "auc_per_seed": with_dp,
                    "auc_minus_no_dp": statistics.fmean(gaps),
                    "within_tolerance": statistics.fmean(gaps) >= -TOLERANCE,
                    "noise_std_on_mean": z * base.dp_clip / cohort,
                }
            )
            print(
                f"dp eps={eps:g} fleet={fleet}: {rows[-1]['auc_minus_no_dp']:+.4f}", file=sys.stderr
            )
        table[f"{eps:g}"] = {"noise_multiplier": z, "fleets": rows}
        smallest[f"{eps:g}"] = next((r["fleet"] for r in rows if r["within_tolerance"]), None)
    return {
        "dataset": args.dataset,
        "trained_devices": len(ids),
        "rounds": base.rounds,
        "delta": base.dp_delta,
        "clip_norm": base.dp_clip,
        "participation": args.participation,
        "tolerance": TOLERANCE,
        "no_dp_auc": statistics.fmean(no_dp),
        "no_dp_auc_per_seed": no_dp,
        "epsilons": table,
        "smallest_fleet_within_tolerance": smallest,
    }


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=parse_int_list, default=[1000, 10_000, 100_000])
    parser.add_argument("--participation", type=float, default=0.25)
    parser.add_argument("--stragglers", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--schedule-minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument(
        "--airflow-result",
        default="bench/results/scaleout-celery.json",
        help="bench.scaleout's Celery result: workers at its per-worker rate too",
    )
    parser.add_argument(
        "--dp-fleets",
        type=parse_int_list,
        default=[1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000],
    )
    parser.add_argument("--epsilons", type=parse_float_list, default=[8.0, 3.0, 1.0])
    parser.add_argument("--dp-rounds", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--dataset", default="bench/results/dataset.npz")
    parser.add_argument("--skip-systems", action="store_true")
    parser.add_argument("--skip-dp", action="store_true")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--server-round", nargs=2, metavar=("CONFIG", "RUN_ID"))
    parser.add_argument("--metrics-url")
    args = parser.parse_args(argv)
    if args.server_round:
        config, run_id = args.server_round
        print(json.dumps(server_round(Path(config), run_id, args.metrics_url)))
        return 0
    if not 0 < args.participation <= 1 or not 0 <= args.stragglers < 1:
        parser.error("--participation must be in (0, 1] and --stragglers in [0, 1)")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "config": {
            "participation": args.participation,
            "stragglers": args.stragglers,
            "rounds": args.rounds,
            "shard_size": args.shard_size,
            "schedule_minutes": args.schedule_minutes,
            "cpus": os.cpu_count(),
        }
    }
    if not args.skip_systems:
        result["systems"] = systems(args)
    if not args.skip_dp:
        result["dp"] = dp_by_fleet(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

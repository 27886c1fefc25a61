"""Server-side aggregation: our streaming fixed-point FedAvg against Flower's, same updates.

    python -m bench.aggregate --json [--updates 1000] [--params 100000] [--seed 0] [--topk F]

Why: issue 6 asks whether the exact streaming aggregator (:class:`StreamingAggregator`,
memory O(params)) keeps up with Flower's FedAvg (``flwr.server.strategy.aggregate``),
which holds every received update in memory (memory O(updates * params)).

Methodology (each contender runs in its own fresh interpreter, one after the other, so
their memory is measured apart and they never compete for the CPU; timings are wall
clock on a possibly shared machine, so compare figures of one run, not across runs):

* The updates: N dense float32 deltas of D params. Update ``i`` is drawn from
  ``default_rng([seed, i])``: ``0.01 * standard_normal(D)`` (L2 norm ~3, inside the
  default norm bound of 10) and a sample count in [10, 5000), its FedAvg weight. Both
  contenders get bit-identical updates and weights.
* Ours, as a server receives updates: one at a time. Each is generated, encoded as the
  dense32 wire blob a device would send (``fedlib.wire.compression.encode``), then decoded
  (``fedlib.wire.compression.decode``: the untrusted-blob parser, which builds the
  :class:`DecodedDelta`, dense, ``indices=None``, and its norm) and added with its
  sample count as weight; the blob is dropped before the next one. BLAS is held to one
  thread, as in a round's ``aggregate_objects``. Timed: decode + ``add`` for every
  update, and the final ``mean_delta``. Generation and encoding (the device's side)
  are not timed.
* Ours as deployed (``ours_topk_*``, an extra contender, not in ``speed_ratio``): the
  same updates sent the way our devices send them, top-k (``--topk``, default the
  deployment's 7.5%) with 16-bit values, decoded and added the same way. Lossy, so
  its mean is not compared; ``speed_ratio_topk`` sets it against Flower's dense path.
* Flower, as its FedAvg strategy holds results: a list of ``(ClientProxy, FitRes)``
  whose ``Parameters`` come from ``flwr.common.ndarrays_to_parameters`` (the npy bytes
  Flower transports), all N in memory before ``aggregate_fit`` runs. Timed:
  ``aggregate_inplace(results)`` (FedAvg's default, ``inplace=True``; it deserializes
  each update inside), and in a third process FedAvg's ``inplace=False`` path:
  ``parameters_to_ndarrays`` for every result, then ``aggregate``. Building the
  FitRes list (receiving) is not timed. The ClientProxy slot is ``None``: Flower's
  aggregation never reads it. A real Flower server also holds each gRPC message while
  it is parsed, so Flower's RSS here is a lower bound.
* ``speed_ratio`` is our updates/s over ``aggregate_inplace``'s (Flower's faster path);
  ``speed_ratio_vs_aggregate`` over ``aggregate``'s.
* Neither side's HPKE opening, signature checks or transport is included.
* Peak RSS: each process reads its own ``VmHWM`` (``/proc/self/status``; the
  parent's ``wait4`` ``ru_maxrss`` is not used because Linux carries the parent's
  high-water mark into a forked-and-exec'd child). ``*_baseline_rss_mb`` is the RSS
  after imports, before any update exists; ``memory_ratio_above_baseline`` compares
  what the aggregation itself costs, ``memory_ratio`` the whole processes.
* Correctness: ``max_abs_diff`` is the largest absolute difference between our mean
  delta and Flower's (``aggregate_inplace``); ``*_max_abs_err_vs_f64`` compare each with
  a float64 weighted mean computed here (Flower accumulates in float32).

Prints one JSON object (``--json``: on one line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.rss import current_rss_mb, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
DELTA_STD = 0.01
MIN_SAMPLES, MAX_SAMPLES = 10, 5000
GOALS = {"speed_ratio": 2.0, "memory_ratio": 4.0}
WORKERS = ("ours", "ours-topk", "flower-inplace", "flower-aggregate")


def make_update(seed: int, index: int, dim: int) -> tuple[np.ndarray, int]:
    """Update ``index`` as a device would send it: a float32 delta and its sample count."""
    rng = np.random.default_rng([seed, index])
    num_samples = int(rng.integers(MIN_SAMPLES, MAX_SAMPLES))
    delta = rng.standard_normal(dim, dtype=np.float32)
    delta *= np.float32(DELTA_STD)
    return delta, num_samples


# ----------------------------------------------------------------------------- workers


def worker_ours(
    updates: int, dim: int, seed: int, out: Path, topk: float | None = None
) -> dict[str, Any]:
    """Stream updates one at a time through decode + StreamingAggregator.add.

    ``topk``: send each update as our devices do (top-k, 16-bit) instead of dense32.
    """
    from fedlib.server.aggregation import (
        AggregationConfig,
        StreamingAggregator,
        single_threaded_blas,
        staleness_weight,
    )
    from fedlib.wire import compression

    config = AggregationConfig()
    if topk is None:
        cfg = compression.CompressionConfig(mode="dense32")
    else:
        cfg = compression.CompressionConfig(mode="topk16", topk_fraction=topk)
    baseline = current_rss_mb()
    agg = StreamingAggregator(dim, config)
    decode_s = add_s = 0.0
    cpu = 0.0
    with single_threaded_blas():  # as a round's aggregate_objects judges updates
        for i in range(updates):
            delta32, num_samples = make_update(seed, i, dim)
            blob = compression.encode(delta32, cfg)  # the device's side: not timed
            del delta32
            c0, t0 = time.process_time(), time.perf_counter()
            decoded = compression.decode(blob, expected_dim=dim)
            t1 = time.perf_counter()
            agg.add(decoded, staleness_weight(num_samples, 0, config))
            t2 = time.perf_counter()
            cpu += time.process_time() - c0
            decode_s += t1 - t0
            add_s += t2 - t1
            del blob, decoded
        c0, t0 = time.process_time(), time.perf_counter()
        mean = agg.mean_delta()
        mean_s = time.perf_counter() - t0
        cpu += time.process_time() - c0
    peak = peak_rss_mb()
    np.save(out, mean)
    return {
        "seconds": decode_s + add_s + mean_s,
        "cpu_seconds": cpu,
        "decode_seconds": decode_s,
        "add_seconds": add_s,
        "mean_seconds": mean_s,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
    }


def worker_flower(updates: int, dim: int, seed: int, out: Path, inplace: bool) -> dict[str, Any]:
    """Hold every FitRes, as FedAvg does, then run its aggregation (inplace or not)."""
    import flwr
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate, aggregate_inplace

    baseline = current_rss_mb()
    results = []
    for i in range(updates):  # what the server has received when aggregate_fit runs
        delta32, num_samples = make_update(seed, i, dim)
        fit_res = FitRes(
            status=Status(code=Code.OK, message="Success"),
            parameters=ndarrays_to_parameters([delta32]),
            num_examples=num_samples,
            metrics={},
        )
        results.append((None, fit_res))
        del delta32
    received_rss = current_rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    if inplace:
        mean = aggregate_inplace(results)  # type: ignore[arg-type]
    else:  # FedAvg.aggregate_fit with inplace=False
        weights_results = [
            (parameters_to_ndarrays(fit_res.parameters), fit_res.num_examples)
            for _, fit_res in results
        ]
        mean = aggregate(weights_results)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = peak_rss_mb()
    np.save(out, np.asarray(mean[0]))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "baseline_rss_mb": baseline,
        "received_rss_mb": received_rss,
        "peak_rss_mb": peak,
        "flwr_version": flwr.__version__,
    }


def run_worker(
    kind: str, updates: int, dim: int, seed: int, out: Path, topk: float
) -> dict[str, Any]:
    """One contender in a fresh interpreter; returns its JSON line."""
    cmd = [sys.executable, "-m", "bench.aggregate", "--worker", kind]
    cmd += ["--updates", str(updates), "--params", str(dim), "--seed", str(seed)]
    cmd += ["--topk", repr(topk), "--out", str(out)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def float64_reference(updates: int, dim: int, seed: int) -> np.ndarray:
    """The weighted mean in float64, streaming: the yardstick for both contenders."""
    total = np.zeros(dim)
    weight = 0
    for i in range(updates):
        delta32, num_samples = make_update(seed, i, dim)
        total += num_samples * delta32.astype(np.float64)
        weight += num_samples
    return total / weight


# ----------------------------------------------------------------------------- main


def run(updates: int, dim: int, seed: int, topk: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-aggregate-") as tmp:
        paths = {k: Path(tmp) / f"{k}.npy" for k in WORKERS}
        res = {k: run_worker(k, updates, dim, seed, p, topk) for k, p in paths.items()}
        means = {k: np.load(p) for k, p in paths.items()}
    ours, inplace, plain = res["ours"], res["flower-inplace"], res["flower-aggregate"]
    sparse = res["ours-topk"]
    reference = float64_reference(updates, dim, seed)

    def diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))

    ours_rate = updates / ours["seconds"]
    inplace_rate = updates / inplace["seconds"]
    ours_extra = ours["peak_rss_mb"] - ours["baseline_rss_mb"]
    flower_extra = inplace["peak_rss_mb"] - inplace["baseline_rss_mb"]
    result: dict[str, Any] = {
        "updates": updates,
        "params": dim,
        "seed": seed,
        "flwr_version": inplace["flwr_version"],
        "ours_updates_per_s": ours_rate,
        "ours_seconds": ours["seconds"],
        "ours_cpu_seconds": ours["cpu_seconds"],
        "ours_decode_seconds": ours["decode_seconds"],
        "ours_add_seconds": ours["add_seconds"],
        "ours_add_only_updates_per_s": updates / ours["add_seconds"],
        "ours_peak_rss_mb": ours["peak_rss_mb"],
        "ours_baseline_rss_mb": ours["baseline_rss_mb"],
        "ours_topk_fraction": topk,
        "ours_topk_updates_per_s": updates / sparse["seconds"],
        "ours_topk_peak_rss_mb": sparse["peak_rss_mb"],
        "flower_inplace_updates_per_s": inplace_rate,
        "flower_inplace_seconds": inplace["seconds"],
        "flower_inplace_cpu_seconds": inplace["cpu_seconds"],
        "flower_aggregate_updates_per_s": updates / plain["seconds"],
        "flower_aggregate_seconds": plain["seconds"],
        "flower_peak_rss_mb": inplace["peak_rss_mb"],
        "flower_baseline_rss_mb": inplace["baseline_rss_mb"],
        "flower_received_rss_mb": inplace["received_rss_mb"],
        "flower_aggregate_peak_rss_mb": plain["peak_rss_mb"],
        "speed_ratio": ours_rate / inplace_rate,
        "speed_ratio_topk": updates / sparse["seconds"] / inplace_rate,
        "speed_ratio_vs_aggregate": ours_rate / (updates / plain["seconds"]),
        "memory_ratio": inplace["peak_rss_mb"] / ours["peak_rss_mb"],
        "memory_ratio_above_baseline": flower_extra / max(ours_extra, 1e-3),
        "max_abs_diff": diff(means["ours"], means["flower-inplace"]),
        "max_abs_diff_aggregate": diff(means["ours"], means["flower-aggregate"]),
        "ours_max_abs_err_vs_f64": diff(means["ours"], reference),
        "flower_max_abs_err_vs_f64": diff(means["flower-inplace"], reference),
        "mean_abs_value": float(np.mean(np.abs(reference))),
        "goals": GOALS,
    }
    result["goals_met"] = {k: result[k] >= v for k, v in GOALS.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1000, help="N dense updates")
    parser.add_argument("--params", type=int, default=100_000, help="D float32 params each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the JSON object on one line")
    parser.add_argument(
        "--topk",
        type=float,
        default=None,
        help="top-k fraction of the extra ours-topk contender (default: the deployment's)",
    )
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.updates < 1 or args.params < 1:
        parser.error("--updates and --params must be >= 1")
    if args.worker:
        if args.worker in ("ours", "ours-topk"):
            topk = args.topk if args.worker == "ours-topk" else None
            out = worker_ours(args.updates, args.params, args.seed, args.out, topk)
        else:
            inplace = args.worker == "flower-inplace"
            out = worker_flower(args.updates, args.params, args.seed, args.out, inplace)
        print(json.dumps(out))
        return 0
    if args.topk is None:
        from fedlib.wire.protocol import TrainingConfig

        args.topk = TrainingConfig().topk_fraction
    if not 0 < args.topk <= 1:
        parser.error("--topk must be in (0, 1]")
    result = run(args.updates, args.params, args.seed, args.topk)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

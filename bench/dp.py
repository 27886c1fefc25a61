"""What central differential privacy costs in AUC, side by side in one run.

    python -m bench.dp --json [--dataset bench/results/dataset.npz] [--epsilons inf,8,3,1]
        [--seeds 3] [--rounds 100] [--delta 1e-5] [--clip 1.0] [--no-gate]

For each epsilon (``inf`` = DP off, the deployment default) and seed, trains the
synthetic fleet through the real protocol path (``bench.quality.run_federated``:
device training, clipping, top-k + 16-bit, HPKE sealing, signatures, server opening,
validation, exact aggregation and, with DP, the accountant-calibrated Gaussian noise
added once per round to the sum of deltas clipped at C) and scores the final model on
the holdout through ONNX. Two figures per epsilon:

* ``auc``: the model after ``rounds`` rounds when every candidate is taken (the raw
  cost of the noise);
* ``published_auc`` (unless ``--no-gate``): the model a deployment would actually
  serve, where the server's gate publishes a candidate only if its holdout AUC is at
  least the active model's minus ``auc_tolerance`` (``gate_refused_rounds`` says how
  many it kept out). The gate looks only at server-held holdout rows and DP outputs,
  so it costs no device privacy (post-processing).

Per epsilon also: the calibrated noise multiplier ``z`` (delta default 1e-5, far below
1/devices for any fleet under 100,000), the epsilon the accountant actually charged, the
noise std per coordinate on the mean delta (``z * C / n``) and the predicted ratio of
the noise's norm to the largest possible mean update, ``z * sqrt(d) / n``: DP training
moves the model only where this is well below 1. The same seeds are used for every
epsilon (paired), and ``auc_minus_no_dp`` is the per-seed difference to ``inf``.
Prints one JSON object (mean, std and per-seed values).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from bench.make_dataset import load_dataset
from bench.quality import QualityConfig, auc_of, pooled_schema, run_federated

DEFAULT_EPSILONS = (math.inf, 8.0, 3.0, 1.0)


def parse_epsilons(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError("epsilons must be positive numbers or inf")
    return values


def _stats(values: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": statistics.fmean(values), "per_seed": values}
    if len(values) > 1:
        out["std"] = statistics.stdev(values)
    return out


def run(
    dataset: str,
    epsilons: list[float],
    seeds: int,
    base: QualityConfig,
    *,
    gate: bool = True,
) -> dict[str, Any]:
    """Every epsilon on the same seeds; one dict per epsilon, keyed by its text."""
    data = load_dataset(dataset)
    ids = data.client_ids[: base.clients] if base.clients else list(data.client_ids)
    schema = pooled_schema(data, ids)
    no_training = auc_of(np.square(schema.apply(data.holdout_X)).mean(axis=1), data.holdout_y)
    results: dict[str, Any] = {}
    baseline: list[float] = []
    for eps in epsilons:
        cfg = replace(base, dp_epsilon=None if math.isinf(eps) else eps)
        aucs, published, refused, charged, noise = [], [], [], [], None
        for seed in range(seeds):
            out = run_federated(data, ids, schema, cfg, seed)
            out.pop("_final")
            aucs.append(out["federated_auc"])
            if "dp_noise_multiplier" in out:
                noise = out["dp_noise_multiplier"]
                charged.append(out["dp_epsilon_spent"])
            if gate:
                gated = run_federated(data, ids, schema, replace(cfg, gate=True), seed)
                gated.pop("_final")
                published.append(gated["federated_auc"])
                refused.append(gated["gate_refused_rounds"])
        if math.isinf(eps):
            baseline = aucs
        entry: dict[str, Any] = {"auc": _stats(aucs)}
        if baseline and not math.isinf(eps):
            entry["auc_minus_no_dp"] = _stats([a - b for a, b in zip(aucs, baseline, strict=True)])
        if gate:
            entry["published_auc"] = _stats(published)
            entry["gate_refused_rounds"] = _stats(refused)
        if noise is not None:
            dim = float(out["num_params"])
            entry.update(
                noise_multiplier=noise,
                epsilon_charged=max(charged),
                noise_std_on_mean=noise * base.dp_clip / len(ids),
                noise_to_update_norm=noise * math.sqrt(dim) / len(ids),
            )
        results["inf" if math.isinf(eps) else f"{eps:g}"] = entry
    return {
        "dataset": dataset,
        "clients": len(ids),
        "no_training_auc": no_training,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bench/results/dataset.npz")
    parser.add_argument("--epsilons", type=parse_epsilons, default=list(DEFAULT_EPSILONS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=QualityConfig.rounds)
    parser.add_argument("--delta", type=float, default=QualityConfig.dp_delta)
    parser.add_argument("--clip", type=float, default=QualityConfig.dp_clip)
    parser.add_argument("--adaptive", action="store_true", help="adaptive clipping")
    parser.add_argument("--clients", type=int, default=0, help="first N clients (0 = all)")
    parser.add_argument("--no-gate", action="store_true", help="skip the published-model runs")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    base = QualityConfig(
        rounds=args.rounds,
        clients=args.clients,
        dp_delta=args.delta,
        dp_clip=args.clip,
        dp_adaptive=args.adaptive,
    )
    started = time.perf_counter()
    result = run(args.dataset, args.epsilons, args.seeds, base, gate=not args.no_gate)
    result = {
        "config": {
            "rounds": args.rounds,
            "delta": args.delta,
            "clip_norm": args.clip,
            "adaptive_clipping": args.adaptive,
            "seeds": args.seeds,
            "accountant": "rdp",
            "gate": not args.no_gate,
        },
        **result,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

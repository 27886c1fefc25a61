"""Model poisoning: what 20% malicious clients do to FedAvg, and what the defenses keep.

    python -m bench.poisoning --dataset data.npz --json [--rounds 100] [--seeds 1]
        [--fraction 0.2] [--attacks scaled,sign_flip,random] [--trim 0.2]

Every federation runs the real protocol path of :mod:`bench.quality` (train, clip,
compress, seal, sign; open, verify, validate, aggregate, ONNX on the holdout). A
malicious client trains honestly, then sends its delta scaled up to the server's norm
bound (``scaled``), the same flipped (``sign_flip``), or Gaussian noise of that norm
(``random``): the strongest deltas the norm bound lets through, so the bound alone
stops nothing. Scenarios, side by side on the same seeds and the same malicious ids:

- ``clean``: the default deployment (FedAvgM, top-k 16-bit), nobody attacks;
- ``clean_<robust>``: the robust statistic (dense16 updates) with nobody attacking: its
  cost when there is no attack;
- ``<attack>_fedavg``: the default deployment under attack, every candidate published
  (the damage);
- ``<attack>_fedavg_gate``: the same with the server's holdout gate (what the real
  server does): how many rounds it refuses, and where the model ends;
- ``<attack>_<robust>``: the robust statistic under attack, with the gate.

Prints one JSON object: per scenario the final holdout AUC (mean over seeds), rounds the
gate refused, and ``auc_minus_clean``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

from bench.make_dataset import load_dataset
from bench.quality import ATTACKS, QualityConfig, pooled_schema, run_federated


def scenarios(
    attacks: list[str], robust: list[str], trim: float, bound: float | None
) -> dict[str, QualityConfig]:
    base = QualityConfig()
    defended = {
        method: replace(
            base,
            robust=method,
            trim_fraction=trim,
            compression="dense16" if method in ("trimmed_mean", "median") else "topk16",
            norm_bound=bound,
            gate=True,
        )
        for method in robust
    }
    out = {"clean": base, "honest_only": replace(base, attack="absent")}
    out.update({f"clean_{method}": cfg for method, cfg in defended.items()})
    for attack in attacks:
        hostile = replace(base, attack=attack)
        out[f"{attack}_fedavg"] = hostile
        out[f"{attack}_fedavg_gate"] = replace(hostile, gate=True)
        for method, cfg in defended.items():
            out[f"{attack}_{method}"] = replace(cfg, attack=attack)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rounds", type=int, default=QualityConfig.rounds)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=0, help="first N clients (0 = all)")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of malicious clients")
    parser.add_argument("--attacks", default="scaled,sign_flip,random")
    parser.add_argument("--robust", default="trimmed_mean,median")
    parser.add_argument("--trim", type=float, default=0.2)
    parser.add_argument(
        "--norm-bound", type=float, default=None, help="bound of the defended runs (default: 10)"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    if unknown := set(attacks) - set(ATTACKS[1:-1]):
        parser.error(f"unknown attacks: {sorted(unknown)}")
    robust = [m for m in args.robust.split(",") if m]
    data = load_dataset(args.dataset)
    ids = data.client_ids[: args.clients] if args.clients else list(data.client_ids)
    schema = pooled_schema(data, ids)
    started = time.perf_counter()
    per_seed: dict[str, list[dict[str, float]]] = {}
    for name, cfg in scenarios(attacks, robust, args.trim, args.norm_bound).items():
        cfg = replace(cfg, rounds=args.rounds, clients=args.clients)
        if cfg.attack != "none":
            cfg = replace(cfg, malicious_fraction=args.fraction)
        for seed in range(args.seeds):
            out = run_federated(data, ids, schema, cfg, seed)
            out.pop("_final")
            per_seed.setdefault(name, []).append(
                {
                    "auc": out["federated_auc"],
                    "ap": out["federated_ap"],
                    "gate_refused_rounds": out["gate_refused_rounds"],
                    "bytes_per_update": out["bytes_per_update"],
                }
            )
    clean = [s["auc"] for s in per_seed["clean"]]
    result: dict[str, object] = {
        "dataset": args.dataset,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "clients": len(ids),
        "malicious_fraction": args.fraction,
        "malicious_clients": round(args.fraction * len(ids)),
        "trim_fraction": args.trim,
        "scenarios": {},
    }
    for name, runs in per_seed.items():
        result["scenarios"][name] = {  # type: ignore[index]
            "auc": statistics.fmean(r["auc"] for r in runs),
            "ap": statistics.fmean(r["ap"] for r in runs),
            "auc_minus_clean": statistics.fmean(
                r["auc"] - c for r, c in zip(runs, clean, strict=True)
            ),
            "worst_auc_minus_clean": min(r["auc"] - c for r, c in zip(runs, clean, strict=True)),
            "gate_refused_rounds": statistics.fmean(r["gate_refused_rounds"] for r in runs),
            "bytes_per_update": statistics.fmean(r["bytes_per_update"] for r in runs),
            "per_seed_auc": [r["auc"] for r in runs],
        }
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation protocol's figures: in-sample next to out-of-sample, in one run.

    python -m bench.evalsplit --dataset data.npz --json [--seeds 5] [--rounds 100]

Trains the default federated model per seed exactly as ``bench.quality`` does (the
threshold and FLTrust reference from the holdout's calibration rows,
:func:`bench.quality.holdout_split`) and scores the final ONNX package on

- the calibration rows (in sample: the rows its threshold was fitted on),
- the evaluation rows (out of sample: what every published figure now is), and
- the whole holdout with the threshold refitted on all its benign rows (the protocol
  before the split: threshold fitted and FPR measured on the same rows),

so the in-sample FPR (at the 0.99 quantile: 0.0100 by construction) stands next to the
out-of-sample one. Also: the split's sizes, the AUC's 95% bootstrap interval on the
evaluation rows, and what the interval costs next to scoring those rows with ONNX
(a ratio of CPU times measured in the same run; no timed test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from bench.make_dataset import load_dataset
from bench.quality import QualityConfig, holdout_split, pooled_schema, run_federated
from fedlib.models.evaluation import (
    BOOTSTRAP_RESAMPLES,
    CALIBRATION_FRACTION,
    auc_interval,
    precision_warnings,
    score_metrics,
)
from fedlib.models.model import onnx_score
from fedlib.server.settings import ServerSettings


def rates(flags: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(FPR, TPR) of the flags."""
    return float(flags[y == 0].mean()), float(flags[y == 1].mean())


def one_seed(data, ids, schema, cfg: QualityConfig, seed: int) -> dict[str, float]:
    out = run_federated(data, ids, schema, cfg, seed)
    package = out.pop("_final")
    cal, ev = holdout_split(data)
    x, y = data.holdout_X, data.holdout_y
    scores, flags = onnx_score(package.onnx_bytes, x)
    quantile = ServerSettings().threshold_quantile
    # the protocol before the split: threshold on every benign row, FPR on the same rows
    whole_threshold = float(np.quantile(scores[y == 0], quantile))
    whole_fpr, whole_tpr = rates(scores > whole_threshold, y)
    cal_fpr, cal_tpr = rates(flags[cal], y[cal])
    metrics = score_metrics(scores[ev], flags[ev], y[ev])
    started = time.process_time()
    onnx_score(package.onnx_bytes, x[ev])
    onnx_cpu = time.process_time() - started
    started = time.process_time()
    low, high = auc_interval(scores[ev], y[ev])
    interval_cpu = time.process_time() - started
    return {
        "in_sample_whole_holdout_fpr": whole_fpr,
        "in_sample_whole_holdout_tpr": whole_tpr,
        "in_sample_calibration_fpr": cal_fpr,
        "in_sample_calibration_tpr": cal_tpr,
        "out_of_sample_fpr": metrics.fpr,
        "out_of_sample_tpr": metrics.tpr,
        "out_of_sample_auc": metrics.auc,
        "out_of_sample_ap": metrics.ap,
        "auc_low": low,
        "auc_high": high,
        "auc_half_width": (high - low) / 2,
        "interval_cpu_over_onnx_scoring": interval_cpu / max(onnx_cpu, 1e-9),
        "federated_fpr_reported_by_quality": out["federated_fpr"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rounds", type=int, default=QualityConfig.rounds)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    data = load_dataset(args.dataset)
    ids = list(data.client_ids)
    schema = pooled_schema(data, ids)
    cfg = QualityConfig(rounds=args.rounds)
    cal, ev = holdout_split(data)
    y = data.holdout_y
    started = time.perf_counter()
    per_seed = [one_seed(data, ids, schema, cfg, seed) for seed in range(args.seeds)]
    result: dict[str, object] = {
        "dataset": args.dataset,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "calibration_fraction": CALIBRATION_FRACTION,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "holdout_rows": int(y.size),
        "calibration_rows": int(cal.size),
        "calibration_anomalies": int(y[cal].sum()),
        "evaluation_rows": int(ev.size),
        "evaluation_anomalies": int(y[ev].sum()),
    }
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        result[key] = statistics.fmean(values)
        result[f"{key}_std"] = statistics.pstdev(values)
    interval = (float(result["auc_low"]), float(result["auc_high"]))  # type: ignore[arg-type]
    result["warnings"] = precision_warnings(int(y[ev].sum()), interval)
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

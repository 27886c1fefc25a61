"""bench.logquality and bench.make_logs on a tiny fleet: both paths see the same windows
and labels, and the result holds what the README reads from it."""

from __future__ import annotations

import json

import numpy as np

from bench import logquality
from bench.make_logs import EVENT_KINDS, START, device_logs, kind_counts


def test_kind_counts_count_every_line_once_in_its_window():
    logs = device_logs(3, windows=50, anomaly_rate=0.3, seed=1)
    counts = kind_counts(logs, windows=50)
    kinds = len(EVENT_KINDS)
    assert counts[:, :kinds].sum() == len(logs.lines)
    per_window = np.bincount([int((t - START) // 300) for t, _ in logs.lines], minlength=50)
    assert np.array_equal(counts[:, :kinds].sum(axis=1), per_window)
    assert np.array_equal(counts[:, kinds + 1], per_window / 300)  # line rate
    anomalous = {n for n, k in zip(logs.labels, logs.kinds, strict=True) if n}
    assert anomalous <= {1} and any(logs.kinds)


def test_a_tiny_run_reports_both_paths_side_by_side(capsys):
    argv = ["--devices", "3", "--windows", "150", "--seeds", "1", "--rounds", "2", "--json"]
    assert logquality.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    fleet = result["fleet"]
    assert fleet["templates"] > 5 and fleet["holdout_anomalous"] > 0
    assert 0 <= fleet["device_unknown_share"] < 0.2
    for path in ("logs", "counts"):
        assert 0.0 <= result[f"{path}_auc"] <= 1.0 and len(result[f"{path}_auc_per_seed"]) == 1
    gap = result["logs_auc"] - result["counts_auc"]
    assert abs(result["auc_logs_minus_counts"] - gap) < 1e-3
    assert result["goal_met"] == (result["auc_logs_minus_counts"] >= -0.01)

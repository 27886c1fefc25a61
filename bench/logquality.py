"""Raw logs on the device against the count path: the same fleet, the same training.

    python -m bench.logquality --json [--devices 12] [--windows 576] [--seeds 3]
        [--kind KIND] [--rounds N]

Why: issue 19 asks whether devices that read their own logs (parse, mask, match the
fleet's template vocabulary, count per window) learn as well as devices handed exact
per-window event counts, within 0.01 AUC, and how fast they parse.

One synthetic fleet (``bench.make_logs``): ``--devices`` hosts with their own mix and
rate of a dozen benign event kinds over ``--windows`` five-minute windows (2 % of
windows also hold an anomaly, as real training logs do), four holdout hosts (15 %
anomalous windows, five anomaly patterns, each host at other times so labels never
mix), and one more host whose log the operator mines the vocabulary from (Drain,
``fl-admin templates learn``'s code) and never trains on.

* ``logs``: every host's syslog file is read by the device's reader
  (:class:`client.logs.LogReader`) and its windows are counted with the vocabulary
  (:func:`client.logs.window_rows`); the holdout by ``fl-admin templates holdout``'s
  code from the holdout hosts' files and their labeled periods.
* ``counts``: the generator's own record of which event kind made each line, counted per
  window (:func:`bench.make_logs.kind_counts`): the features a parser that never errs
  would give, with the same window statistics. Same windows (those with a line) as the
  log path, same labels.

Both datasets then go through ``bench.quality``'s real protocol path (clients train and
seal updates, the server aggregates, the candidate is scored by onnxruntime on the
holdout's evaluation rows) with the same kind, rounds and seeds; ``auc_logs_minus_counts``
is the per-seed difference. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.make_dataset import load_dataset, save_dataset
from bench.make_logs import (
    EVENT_KINDS,
    START,
    anomalous_periods,
    device_logs,
    kind_counts,
    syslog_text,
)
from bench.quality import DEFAULTS, QualityConfig, run_seed
from client.logs import LogReader, LogSettings, LogSource, LogState, window_rows
from fedlib.models.logfeatures import TemplateMatcher, parse_syslog
from fedlib.ops.templates import count_holdout, learn
from fedlib.wire.vocabulary import WINDOW_STATS

GOAL_AUC_GAP = 0.01
WINDOW = 300
HOLDOUT_HOSTS = 4


def device_windows(path: Path, matcher: TemplateMatcher) -> tuple[np.ndarray, np.ndarray]:
    """(window starts, feature rows) of one host's file, read by the device's reader."""
    settings = LogSettings(window_seconds=WINDOW, retention_days=366)
    state = LogState(window_seconds=WINDOW)
    LogReader([LogSource(path=str(path))], settings, base=path.parent, state=state).read(now=0)
    windows = state.ordered_windows()
    starts = np.asarray([w.start for w in windows])
    return starts, window_rows(windows, matcher, WINDOW)


def build(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Write both datasets; what each path saw."""
    sample = device_logs(99_999, windows=args.windows, anomaly_rate=0.2, seed=args.seed)
    year = time.gmtime(START).tm_year
    messages = [parse_syslog(f"Nov  2 00:00:00 host {text}", year=year) for _, text in sample.lines]
    vocabulary = learn([m.message for m in messages if m is not None], version=1, min_count=2)
    matcher = TemplateMatcher(vocabulary)

    logs: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    ids = []
    for d in range(args.devices):
        host = device_logs(d, windows=args.windows, anomaly_rate=0.02, seed=args.seed)
        path = workdir / f"dev-{d:03d}" / "syslog"
        path.parent.mkdir(parents=True)
        path.write_text(syslog_text(host.lines))
        starts, rows = device_windows(path, matcher)
        index = ((starts - START) // WINDOW).astype(int)
        cid = f"dev-{d:03d}"
        ids.append(cid)
        logs[f"X_{cid}"] = rows
        counts[f"X_{cid}"] = kind_counts(host, windows=args.windows)[index]

    files, periods, count_rows, labels = [], [], [], []
    for h in range(HOLDOUT_HOSTS):
        start = START + (h + 1) * (args.windows + 288) * WINDOW  # hosts apart in time
        host = device_logs(
            50_000 + h, windows=args.windows, anomaly_rate=0.15, seed=args.seed, start=start
        )
        path = workdir / f"holdout-{h}" / "syslog"
        path.parent.mkdir(parents=True)
        path.write_text(syslog_text(host.lines))
        files.append(path)
        periods += anomalous_periods(host.labels, host.kinds, start=start)
        starts, _ = device_windows(path, matcher)
        index = ((starts - start) // WINDOW).astype(int)
        count_rows.append(kind_counts(host, windows=args.windows, start=start)[index])
        labels.append(host.labels[index])
    holdout = count_holdout(
        files,
        vocabulary,
        log_format="syslog",
        regex=None,
        window_seconds=WINDOW,
        anomalous=periods,
    )
    count_y = np.concatenate(labels)
    if not np.array_equal(holdout.labels, count_y):
        raise AssertionError("the two paths label the holdout windows differently")

    count_names = [f"kind_{k}" for k in EVENT_KINDS] + ["unknown", *WINDOW_STATS]
    paths = {
        "logs": (logs, holdout.features, vocabulary.feature_names()),
        "counts": (counts, np.concatenate(count_rows), count_names),
    }
    for name, (clients, holdout_x, names) in paths.items():
        save_dataset(
            {
                **clients,
                "client_ids": np.asarray(ids),
                "holdout_X": holdout_x,
                "holdout_y": count_y,
                "feature_names": np.asarray(names),
            },
            workdir / f"{name}.npz",
        )
    unknown = [
        float(rows[:, len(vocabulary.templates)].sum() / max(rows[:, :-3].sum(), 1))
        for rows in logs.values()
    ]
    return {
        "templates": len(vocabulary.templates),
        "event_kinds": len(EVENT_KINDS),
        "device_windows": int(sum(r.shape[0] for r in logs.values())),
        "holdout_windows": len(count_y),
        "holdout_anomalous": int(count_y.sum()),
        "device_unknown_share": round(statistics.fmean(unknown), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=12)
    parser.add_argument("--windows", type=int, default=576, help="five-minute windows per host")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=19, help="the fleet's generator seed")
    parser.add_argument("--kind", default=DEFAULTS.model_kind)
    parser.add_argument("--rounds", type=int, default=None, help="default: the kind's")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = QualityConfig(kind=args.kind)
    if args.rounds is not None:
        cfg = QualityConfig(kind=args.kind, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-logquality-") as tmp:
        workdir = Path(tmp)
        fleet = build(args, workdir)
        runs: dict[str, list[dict[str, float]]] = {"logs": [], "counts": []}
        for name in runs:
            data = load_dataset(workdir / f"{name}.npz")
            for seed in range(args.seeds):
                runs[name].append(run_seed(data, cfg, seed))
    result: dict[str, Any] = {"kind": args.kind, "seeds": args.seeds, "fleet": fleet}
    for name, per_seed in runs.items():
        for key in ("federated_auc", "centralized_auc", "isolation_forest_auc", "no_training_auc"):
            label = "auc" if key == "federated_auc" else key
            result[f"{name}_{label}"] = round(statistics.fmean(r[key] for r in per_seed), 4)
        result[f"{name}_auc_per_seed"] = [round(r["federated_auc"], 4) for r in per_seed]
    gaps = [
        a["federated_auc"] - b["federated_auc"]
        for a, b in zip(runs["logs"], runs["counts"], strict=True)
    ]
    result["auc_logs_minus_counts"] = round(statistics.fmean(gaps), 4)
    result["auc_logs_minus_counts_per_seed"] = [round(g, 4) for g in gaps]
    result["goal"] = f"logs within {GOAL_AUC_GAP} AUC of counts"
    result["goal_auc_gap"] = GOAL_AUC_GAP
    result["goal_met"] = result["auc_logs_minus_counts"] >= -GOAL_AUC_GAP
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

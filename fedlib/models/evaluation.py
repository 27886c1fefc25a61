"""Holdout evaluation of what ships: the ONNX graph, run by onnxruntime.

The labeled holdout is split once per row (:func:`split_holdout`) into a calibration
part (the threshold, the FLTrust reference, the gate's comparison) and an evaluation
part on which every published figure is computed, so no published figure is measured
on the rows that tuned it. The AUC carries a stratified percentile-bootstrap interval
(:func:`auc_interval`) so a reader sees how many anomalies stand behind it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True)
class Metrics:
    auc: float
    ap: float
    tpr: float
    fpr: float
    n: int
    n_anomalies: int
    #: Per anomaly class of the holdout: the share of its rows the model flags (empty
    #: when the holdout names no classes).
    class_detection: Mapping[str, float] = field(default_factory=dict)
    #: The AUC's 95% stratified percentile-bootstrap interval (None: not computed).
    auc_low: float | None = None
    auc_high: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics (what a package's metadata carries)."""
        return {
            f.name: float(getattr(self, f.name))
            for f in fields(self)
            if f.name != "class_detection" and getattr(self, f.name) is not None
        }


def score_metrics(
    scores: np.ndarray,
    flags: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray | None = None,
    *,
    interval: bool = False,
) -> Metrics:
    """ROC-AUC and average precision of the scores; TPR/FPR of the shipped flags; with
    ``classes`` (a name per row, "" for none), the flagged share of each class's rows;
    with ``interval``, the AUC's bootstrap interval (:func:`auc_interval`)."""
    # imported here: scikit-learn costs ~80 MB and 1 s, and every round task imports this
    # module (through the deployment) while only the scoring tasks score
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("a holdout needs both benign and anomalous rows")
    scores = _finite(scores)
    flags = np.asarray(flags, dtype=bool)
    low, high = auc_interval(scores, labels) if interval else (None, None)
    return Metrics(
        auc=float(roc_auc_score(labels, scores)),
        ap=float(average_precision_score(labels, scores)),
        tpr=float(flags[labels].mean()),
        fpr=float(flags[~labels].mean()),
        n=int(labels.size),
        n_anomalies=int(labels.sum()),
        class_detection=class_detection(flags, labels, classes),
        auc_low=low,
        auc_high=high,
    )


def _finite(scores: np.ndarray) -> np.ndarray:
    """Scores as float64 with NaN and +inf ranked most anomalous, -inf least."""
    big = np.finfo(np.float64).max
    return np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=big, posinf=big, neginf=-big)


#: Fewest anomalous rows a class needs to be judged by the gate: below, one row moves its
#: detection by more than 3%, which is noise, not a forgotten pattern.
MIN_CLASS_ROWS = 30


def class_detection(
    flags: np.ndarray, labels: np.ndarray, classes: np.ndarray | None
) -> dict[str, float]:
    """The share of each named class's anomalous rows that are flagged (classes with at
    least :data:`MIN_CLASS_ROWS` rows)."""
    if classes is None:
        return {}
    anomalous = np.asarray(labels).astype(bool)
    names = np.asarray(classes, dtype=str)
    out = {}
    for name in sorted({str(c) for c in np.unique(names[anomalous])} - {""}):
        rows = anomalous & (names == name)
        if rows.sum() >= MIN_CLASS_ROWS:
            out[name] = float(np.asarray(flags, dtype=bool)[rows].mean())
    return out


def evaluate_onnx(
    onnx_bytes: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray | None = None,
    *,
    interval: bool = False,
) -> Metrics:
    """Score the holdout with the exported graph itself, so what is measured is what ships."""
    from fedlib.models.model import onnx_score

    scores, flags = onnx_score(onnx_bytes, features)
    return score_metrics(scores, flags, labels, classes, interval=interval)


def gate(
    candidate: Metrics,
    active: Metrics,
    *,
    tolerance: float,
    floor: float,
    class_tolerance: float | None = None,
    class_reference: Mapping[str, float] | None = None,
) -> tuple[bool, str]:
    """Publish when the candidate is no worse than active (within tolerance), above a floor,
    and, when the holdout names anomaly classes, detects every class within
    ``class_tolerance`` of ``class_reference`` (default: the active model's detection;
    None tolerance: no per-class check).

    The server passes the best detection of recent versions as the reference
    (:func:`class_reference`): against the active model alone, a device that moves one
    class a little each round passes every round while the class is forgotten."""
    if candidate.auc < floor:
        return False, f"candidate AUC {candidate.auc:.4f} is below the floor {floor}"
    if candidate.auc < active.auc - tolerance:
        return False, (
            f"candidate AUC {candidate.auc:.4f} < active {active.auc:.4f} - tolerance {tolerance}"
        )
    if class_tolerance is not None:
        reference = active.class_detection if class_reference is None else class_reference
        for name, before in sorted(reference.items()):
            after = candidate.class_detection.get(name)
            if after is not None and after < before - class_tolerance:
                return False, (
                    f"candidate detects {after:.3f} of class {name!r}, recent best "
                    f"{before:.3f} - tolerance {class_tolerance}"
                )
    return True, f"candidate AUC {candidate.auc:.4f} vs active {active.auc:.4f}"


def class_reference(recent: list[Metrics]) -> dict[str, float]:
    """Per class, the best detection among ``recent`` models (scored on one holdout)."""
    best: dict[str, float] = {}
    for metrics in recent:
        for name, value in metrics.class_detection.items():
            best[name] = max(best.get(name, 0.0), value)
    return best


# -- the calibration / evaluation split --------------------------------------------------------

#: Default share of each label's rows that calibrate (threshold, FLTrust reference, gate).
CALIBRATION_FRACTION = 0.5


def row_positions(features: np.ndarray, key: bytes) -> np.ndarray:
    """Each row's position in [0, 1): HMAC-SHA256 under ``key`` of its float32
    little-endian bytes, first 8 bytes as an integer / 2**64.

    A function of the row alone, so a row keeps its position (and its part) in every
    holdout version that contains it, and identical rows always share a part (a
    duplicate cannot sit on both sides). Keyed, so whoever supplies rows cannot choose
    which part they land in."""
    if not key:
        raise ValueError("the split needs a non-empty key")
    rows = np.ascontiguousarray(np.asarray(features, dtype="<f4"))
    if rows.ndim != 2:
        raise ValueError("features must be (N, d)")
    out = np.empty(rows.shape[0], dtype=np.float64)
    for i, row in enumerate(rows):
        digest = hmac.new(key, row.tobytes(), hashlib.sha256).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def split_holdout(
    features: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray | None = None,
    *,
    key: bytes,
    fraction: float = CALIBRATION_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(calibration, evaluation)`` of a labeled holdout: the one split.

    Stratified by label (and by anomaly class when ``classes`` is given): within each
    stratum, the rows whose :func:`row_positions` is below ``fraction`` calibrate, the
    others evaluate. The same cut in every stratum gives each one ``fraction`` of its
    rows in expectation; a per-stratum quantile cut would give exact counts but would
    move old rows between parts when a new holdout version adds rows, which is what this
    split exists to prevent. Refuses (ValueError) a holdout where either part lacks
    benign or anomalous rows: nothing could be calibrated or published on it."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("the calibration fraction must be in (0, 1)")
    y = np.asarray(labels).astype(bool)
    x = np.asarray(features)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError("split_holdout needs features (N, d) and one label per row")
    strata = np.where(y, "1:", "0:").astype(object)
    if classes is not None:
        strata = strata + np.asarray(classes, dtype=str).astype(object)
    position = row_positions(x, key)
    calibrate = np.zeros(y.size, dtype=bool)
    for stratum in np.unique(strata):
        rows = strata == stratum
        calibrate[rows] = position[rows] < fraction
    cal, ev = np.flatnonzero(calibrate), np.flatnonzero(~calibrate)
    for name, idx in (("calibration", cal), ("evaluation", ev)):
        anomalies = int(y[idx].sum())
        if anomalies == 0 or anomalies == idx.size:
            raise ValueError(
                f"the {name} part has {idx.size - anomalies} benign and {anomalies} "
                f"anomalous rows: a holdout needs both in each part (calibration "
                f"fraction {fraction})"
            )
    return cal, ev


# -- the AUC's bootstrap interval ----------------------------------------------------------------

#: Resamples, seed and level of :func:`auc_interval` (fixed: a re-run gives the same bytes).
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0xA0C
BOOTSTRAP_LEVEL = 0.95
#: Resamples computed at once (bounds the working memory to ~chunk x rows x 8 bytes).
_BOOTSTRAP_CHUNK = 50


def auc_interval(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """The ROC-AUC's percentile-bootstrap interval, stratified (each resample draws the
    benign and the anomalous rows separately, with replacement, keeping both counts).

    Vectorised: a resample is a vector of multiplicities, and its AUC is the
    Mann-Whitney statistic from cumulative multiplicities of the sorted benign scores
    (ties count one half), so no resample re-sorts anything."""
    y = np.asarray(labels).astype(bool)
    s = _finite(scores)
    pos, neg = s[y], np.sort(s[~y])
    if pos.size == 0 or neg.size == 0:
        raise ValueError("an AUC interval needs both benign and anomalous rows")
    # for each anomalous row: the benign rows strictly below it and the ties
    below = np.searchsorted(neg, pos, side="left")
    upto = np.searchsorted(neg, pos, side="right")
    rng = np.random.default_rng(seed)
    aucs = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        b = min(_BOOTSTRAP_CHUNK, resamples - start)
        w_neg = _multiplicities(rng, b, neg.size)
        w_pos = _multiplicities(rng, b, pos.size)
        cum = np.concatenate([np.zeros((b, 1)), np.cumsum(w_neg, axis=1)], axis=1)
        credit = cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below])
        aucs[start : start + b] = (w_pos * credit).sum(axis=1) / (pos.size * neg.size)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(aucs, [tail, 1.0 - tail])
    return float(low), float(high)


def _multiplicities(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """``b`` resamples of ``n`` rows drawn with replacement, as counts per row."""
    draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


#: The warning rule of ``fl-admin holdout``: the evaluation part is too small for the
#: figures it publishes when it has fewer anomalies than this (below, one anomaly moves
#: the TPR by more than 3%, the rule :data:`MIN_CLASS_ROWS` applies to a class) ...
MIN_EVALUATION_ANOMALIES = 30
#: ... or when the AUC's 95% bootstrap interval on it is wider than +/- this: the gate
#: tolerance and the goals are stated to 0.01-0.02 AUC, so a wider interval cannot tell
#: apart the differences the figures are read for.
MAX_AUC_HALF_WIDTH = 0.02


def precision_warnings(n_anomalies: int, interval: tuple[float, float] | None) -> list[str]:
    """Why an evaluation part is too small for the precision it reports (empty: it is not)."""
    out = []
    if n_anomalies < MIN_EVALUATION_ANOMALIES:
        out.append(
            f"the evaluation part has {n_anomalies} anomalies (< {MIN_EVALUATION_ANOMALIES}): "
            "one anomaly moves the published TPR by more than 3%"
        )
    if interval is not None:
        half = (interval[1] - interval[0]) / 2.0
        if half > MAX_AUC_HALF_WIDTH:
            out.append(
                f"the active model's AUC interval on the evaluation part is "
                f"[{interval[0]:.3f}, {interval[1]:.3f}] (+/- {half:.3f} > "
                f"{MAX_AUC_HALF_WIDTH}): too wide for AUC differences of 0.01-0.02"
            )
    return out

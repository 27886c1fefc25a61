"""Holdout evaluation of what ships: the ONNX graph, run by onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


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

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics (what a package's metadata carries)."""
        return {
            f.name: float(getattr(self, f.name))
            for f in fields(self)
            if f.name != "class_detection"
        }


def score_metrics(
    scores: np.ndarray,
    flags: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray | None = None,
) -> Metrics:
    """ROC-AUC and average precision of the scores; TPR/FPR of the shipped flags; with
    ``classes`` (a name per row, "" for none), the flagged share of each class's rows."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("a holdout needs both benign and anomalous rows")
    big = np.finfo(np.float64).max
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=big, posinf=big, neginf=-big)
    flags = np.asarray(flags, dtype=bool)
    return Metrics(
        auc=float(roc_auc_score(labels, scores)),
        ap=float(average_precision_score(labels, scores)),
        tpr=float(flags[labels].mean()),
        fpr=float(flags[~labels].mean()),
        n=int(labels.size),
        n_anomalies=int(labels.sum()),
        class_detection=class_detection(flags, labels, classes),
    )


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
) -> Metrics:
    """Score the holdout with the exported graph itself, so what is measured is what ships."""
    from fedlib.models.model import onnx_score

    scores, flags = onnx_score(onnx_bytes, features)
    return score_metrics(scores, flags, labels, classes)


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

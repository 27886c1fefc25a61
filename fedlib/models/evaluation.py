"""Holdout evaluation of what ships: the ONNX graph, run by onnxruntime."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def score_metrics(scores: np.ndarray, flags: np.ndarray, labels: np.ndarray) -> Metrics:
    """ROC-AUC and average precision of the scores; TPR/FPR of the shipped flags."""
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
    )


def evaluate_onnx(onnx_bytes: bytes, features: np.ndarray, labels: np.ndarray) -> Metrics:
    """Score the holdout with the exported graph itself, so what is measured is what ships."""
    from fedlib.models.model import onnx_score

    scores, flags = onnx_score(onnx_bytes, features)
    return score_metrics(scores, flags, labels)


def gate(
    candidate: Metrics, active: Metrics, *, tolerance: float, floor: float
) -> tuple[bool, str]:
    """Publish when the candidate is no worse than active (within tolerance), above a floor."""
    if candidate.auc < floor:
        return False, f"candidate AUC {candidate.auc:.4f} is below the floor {floor}"
    if candidate.auc < active.auc - tolerance:
        return False, (
            f"candidate AUC {candidate.auc:.4f} < active {active.auc:.4f} - tolerance {tolerance}"
        )
    return True, f"candidate AUC {candidate.auc:.4f} vs active {active.auc:.4f}"

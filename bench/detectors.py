"""Centralized detectors a practitioner would try, each with its search space.

Every detector is fitted on the pooled device train rows (benign) after a scaling fitted
on those rows only, and scores rows higher = more anomalous. :func:`fit_detector` is the
one place a detector is built from its hyperparameters, so selection (on validation,
:mod:`bench.select`) and the final test evaluation (:mod:`bench.suite`) run the same code.

The centralized autoencoder is the model kind the federation trains
(:class:`fedlib.models.model.AutoencoderModel`), trained on the pooled rows and stopped
early: :func:`fit_autoencoder_early` scores the validation split every
``EVAL_EVERY`` epochs and keeps the epoch count with the best validation AUC.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from fedlib.models.model import FeatureSchema, create_model, load_model

Params = dict[str, Any]
Scorer = Callable[[np.ndarray], np.ndarray]

MAX_AE_EPOCHS = 200
EVAL_EVERY = 5

SPACES: dict[str, dict[str, list[Any]]] = {
    "isolation_forest": {
        "transform": ["log1p", "identity"],
        "n_estimators": [100, 200, 400],
        "max_samples": [64, 128, 256, 1.0],
        "max_features": [0.5, 0.75, 1.0],
    },
    "lof": {
        "transform": ["log1p", "identity"],
        "n_neighbors": [3, 5, 10, 20, 35, 50],
        "metric": ["euclidean", "manhattan", "cosine"],
    },
    "ocsvm": {
        "transform": ["log1p", "identity"],
        "nu": [0.01, 0.05, 0.1, 0.3, 0.5],
        "gamma_scale": [0.1, 0.3, 1.0, 3.0],  # x 1/d on standardized features
    },
    "pca": {
        "transform": ["log1p", "identity"],
        "variance": [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
        "whiten_residual": [False, True],
    },
    "centralized_ae": {
        "transform": ["log1p", "identity"],
        "hidden": [[96, 32], [64, 16], [128, 64], [32, 8], [64]],
        "learning_rate_init": [0.002, 0.005, 0.01, 0.02],
        "batch_size": [16, 32],
        "error_clip": [0.0, 1.0],
    },
}
"""Search spaces; the first value of each key is the library's default where it has one."""

DEFAULTS: dict[str, Params] = {
    "isolation_forest": {
        "transform": "log1p",
        "n_estimators": 100,
        "max_samples": 256,
        "max_features": 1.0,
    },
    "lof": {"transform": "log1p", "n_neighbors": 20, "metric": "euclidean"},
    "ocsvm": {"transform": "log1p", "nu": 0.5, "gamma_scale": 1.0},
    "pca": {"transform": "log1p", "variance": 0.9, "whiten_residual": False},
    "centralized_ae": {
        "transform": "log1p",
        "hidden": [96, 32],
        "learning_rate_init": 0.002,
        "batch_size": 32,
        "error_clip": 0.0,
    },
}
"""Trial 0 of every search: the library's (or the model kind's) default."""


def sample_space(detector: str, budget: int, seed: int) -> list[Params]:
    """``budget`` distinct configurations: the default first, then random draws."""
    space = SPACES[detector]
    keys = list(space)
    grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*space.values())]
    default = DEFAULTS[detector]
    rest = [g for g in grid if g != default]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(rest), size=min(budget - 1, len(rest)), replace=False)
    return [dict(default), *(rest[int(i)] for i in picks)]


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC; NaN/inf scores rank as most anomalous (a broken model is not rewarded)."""
    big = np.finfo(np.float64).max
    return float(roc_auc_score(y, np.nan_to_num(scores, nan=big, posinf=big, neginf=-big)))


def scaling(names: list[str], train: np.ndarray, transform: str) -> FeatureSchema:
    """Standardization (after ``transform``) fitted on the train rows only."""
    return FeatureSchema.from_data(names, train, transform)  # type: ignore[arg-type]


def fit_detector(
    detector: str, params: Mapping[str, Any], names: list[str], train: np.ndarray, seed: int
) -> Scorer:
    """Fit one centralized detector on benign train rows; return its scoring function.

    (The autoencoder has its own entry, :func:`fit_autoencoder_early`.)
    """
    schema = scaling(names, train, params["transform"])
    z = schema.apply(train)
    n, d = z.shape
    if detector == "isolation_forest":
        from sklearn.ensemble import IsolationForest

        ms = params["max_samples"]
        forest = IsolationForest(
            n_estimators=params["n_estimators"],
            max_samples=min(ms, n) if isinstance(ms, int) else ms,
            max_features=params["max_features"],
            random_state=seed,
        ).fit(z)
        return lambda x: -forest.score_samples(schema.apply(x))
    if detector == "lof":
        from sklearn.neighbors import LocalOutlierFactor

        lof = LocalOutlierFactor(
            n_neighbors=min(params["n_neighbors"], n - 1), metric=params["metric"], novelty=True
        ).fit(z)
        return lambda x: -lof.score_samples(schema.apply(x))
    if detector == "ocsvm":
        from sklearn.svm import OneClassSVM

        svm = OneClassSVM(nu=params["nu"], gamma=params["gamma_scale"] / d).fit(z)
        return lambda x: -svm.score_samples(schema.apply(x))
    if detector == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=params["variance"], svd_solver="full").fit(z)
        resid_var = np.maximum(
            np.square(z - pca.inverse_transform(pca.transform(z))).mean(axis=0), 1e-12
        )

        def pca_score(x: np.ndarray) -> np.ndarray:
            zx = schema.apply(x)
            err = np.square(zx - pca.inverse_transform(pca.transform(zx)))
            return (err / resid_var).sum(axis=1) if params["whiten_residual"] else err.sum(axis=1)

        return pca_score
    raise ValueError(f"unknown detector {detector!r}")


def fit_autoencoder_early(
    params: Mapping[str, Any],
    names: list[str],
    train: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    seed: int,
) -> tuple[Scorer, int, float]:
    """The federation's autoencoder trained centrally on pooled rows, early-stopped.

    Trains up to :data:`MAX_AE_EPOCHS`, scores the validation split every
    :data:`EVAL_EVERY` epochs and returns the model at the best one, so selection and
    the final test evaluation use the same model. Returns ``(scorer, epochs, val AUC)``.
    """
    schema = scaling(names, train, params["transform"])
    spec = {k: v for k, v in params.items() if k != "transform"}
    model = create_model("autoencoder", schema, spec=spec, seed=seed)
    best = (-1.0, 0, model.params())
    done = 0
    while done < MAX_AE_EPOCHS:
        model.fit_local(train, epochs=EVAL_EVERY, seed=seed + done)
        done += EVAL_EVERY
        score = auc(model.score(val_x), val_y)
        if score > best[0]:
            best = (score, done, model.params())
    kept = load_model("autoencoder", schema, model.spec, best[2], None)
    return kept.score, best[1], best[0]

"""Local training from a package's global weights: the part of the device step that the
server's FLTrust reference also runs (same code, same seed, same delta).
"""

from __future__ import annotations

import numpy as np

from fedlib.models.model import FeatureSchema, load_model
from fedlib.models.package import ModelPackage


def local_delta(package: ModelPackage, rows: np.ndarray, *, seed: int) -> tuple[np.ndarray, int]:
    """Train from the package's weights on local rows; return (delta, rows used)."""
    meta = package.metadata
    schema = FeatureSchema.from_dict(meta.feature_schema)
    model = load_model(meta.model_kind, schema, meta.model_spec, package.weights, meta.threshold)
    num_samples = model.fit_local(rows, epochs=meta.training.epochs, seed=seed)
    return model.params() - package.weights, int(num_samples)

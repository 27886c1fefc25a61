"""A model package's contents as data: metadata, the ONNX graph and the flat weights.

No signatures here: a :class:`ModelPackage` in memory has already been verified by
:mod:`fedlib.trust.package` (device, air-gap) or built by the server. Training
(:mod:`fedlib.models.training`) and the round start from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedlib.errors import VerificationError
from fedlib.wire.protocol import PackageMetadata


def weights_to_bytes(params: np.ndarray) -> bytes:
    return np.ascontiguousarray(params, dtype="<f8").tobytes()


def weights_from_bytes(data: bytes, num_params: int) -> np.ndarray:
    if len(data) != 8 * num_params:
        raise VerificationError(f"weights.bin has {len(data)} bytes, expected {8 * num_params}")
    weights = np.frombuffer(data, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(weights)):
        raise VerificationError("weights.bin holds non-finite values")
    return weights


@dataclass(frozen=True)
class ModelPackage:
    """A verified package: metadata, the ONNX graph and the flat parameters."""

    metadata: PackageMetadata
    onnx_bytes: bytes
    weights: np.ndarray

    @property
    def version(self) -> int:
        return self.metadata.version

    def files(self) -> dict[str, bytes]:
        return {
            "model.onnx": self.onnx_bytes,
            "weights.bin": weights_to_bytes(self.weights),
            "metadata.json": self.metadata.to_json(),
        }

    def digest(self) -> str:
        """SHA-256 over the package's files in a fixed order: its identity."""
        h = hashlib.sha256()
        for name, data in sorted(self.files().items()):
            h.update(name.encode() + b"\x00" + hashlib.sha256(data).digest())
        return h.hexdigest()


def same_features(a: PackageMetadata, b: PackageMetadata) -> bool:
    """Whether two versions read the same feature columns the same way (names, template
    vocabulary, transform, standardization): only then does an update trained on one
    apply to the other, or one's figures on a holdout compare with the other's."""
    return a.feature_schema == b.feature_schema

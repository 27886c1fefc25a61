"""The device-side step: train from a verified package on local rows, then seal the update.

Shared by the device agent and the benchmarks, so both run the same path: local
training from the global weights, delta, L2 clipping, compression with error
feedback, payload framing (counts and metrics only, never rows), HPKE + signature.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedlib.crypto import sealing
from fedlib.models.package import ModelPackage
from fedlib.models.training import local_delta
from fedlib.wire import compression, protocol


def device_rng() -> np.random.Generator:
    """A device's local-noise generator, from OS entropy (never reproducible)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(256))))


@dataclass(frozen=True)
class LocalUpdate:
    update_id: str
    envelope: bytes
    residual: np.ndarray
    num_samples: int
    delta_norm: float


def seal_delta(
    package: ModelPackage,
    delta: np.ndarray,
    num_samples: int,
    *,
    client_id: str,
    client_key: ed25519.Ed25519PrivateKey,
    server_public_key: sealing.EncryptionPublicKey,
    residual: np.ndarray | None,
    created_at_ms: int | None = None,
    clip: bool = True,
    noise_rng: np.random.Generator | None = None,
) -> LocalUpdate:
    """Add the error-feedback residual, clip, compress, frame, seal and sign one delta.

    ``clip=False`` exists for the poisoning benchmark (an attacker skips it); honest
    devices always clip to the package's ``clip_norm``. With the package's DP config
    (``training.dp``, :mod:`fedlib.server.privacy`): central mode with adaptive clipping adds
    the bit "norm <= clip_norm before clipping" to the payload metrics; local mode adds
    N(0, (z * clip_norm)**2) to every coordinate of the clipped delta before top-k (the
    sparsification is then post-processing) and reports neither the norm nor the row
    count (``num_samples`` 1: DP rounds weigh every update the same). ``noise_rng``
    (tests) replaces the OS-seeded generator of the local noise.
    """
    meta = package.metadata
    training = meta.training
    dp = training.dp
    if residual is not None and residual.shape == delta.shape:
        delta = delta + residual
    norm = float(np.linalg.norm(delta))
    limit = training.clip_norm * (1 - 1e-3)  # headroom for 16-bit rounding
    if clip and norm > limit:
        delta = delta * (limit / norm)
    metrics = {"delta_norm": round(norm, 6)}
    if dp is not None and dp.report_unclipped:
        metrics[protocol.UNCLIPPED_METRIC] = 1.0 if norm <= training.clip_norm else 0.0
    reported_samples = int(num_samples)
    if dp is not None and dp.mode == "local" and clip:
        rng = noise_rng or device_rng()
        delta = delta + rng.normal(0.0, dp.noise_multiplier * training.clip_norm, delta.shape)
        metrics, reported_samples = {}, 1
    cfg = compression.CompressionConfig(
        mode=training.compression, topk_fraction=training.topk_fraction
    )
    blob, new_residual = compression.compress_with_feedback(delta, None, cfg)
    payload = protocol.encode_payload(
        protocol.UpdateMeta.model_validate(
            {
                "schema": protocol.META_SCHEMA,
                "model_kind": meta.model_kind,
                "num_params": meta.num_params,
                "num_samples": reported_samples,
                "epochs": training.epochs,
                "compression": training.compression,
                "metrics": metrics,
            }
        ),
        blob,
    )
    header, envelope = sealing.seal_update(
        client_id=client_id,
        client_key=client_key,
        server_public_key=server_public_key,
        base_version=meta.version,
        payload=payload,
        created_at_ms=created_at_ms,
    )
    return LocalUpdate(header.update_id, envelope, new_residual, int(num_samples), norm)


def make_update(
    package: ModelPackage,
    rows: np.ndarray,
    *,
    client_id: str,
    client_key: ed25519.Ed25519PrivateKey,
    server_public_key: sealing.EncryptionPublicKey,
    residual: np.ndarray | None,
    seed: int,
    created_at_ms: int | None = None,
) -> LocalUpdate:
    """The honest device step: :func:`local_delta` then :func:`seal_delta`."""
    delta, num_samples = local_delta(package, rows, seed=seed)
    return seal_delta(
        package,
        delta,
        num_samples,
        client_id=client_id,
        client_key=client_key,
        server_public_key=server_public_key,
        residual=residual,
        created_at_ms=created_at_ms,
    )

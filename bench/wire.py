"""Bytes on the wire per update: our sealed envelope against dense float32 and Flower.

    python -m bench.wire --json [--params 100000] [--seed 0]

Why: devices sit on slow, metered links (issue 6), so what one update costs on the wire
is a product figure. Our side is the real device path: :func:`client.update.seal_delta`
(what ``make_update`` runs after local training: clip, compress with error feedback,
frame the payload, HPKE-seal to the server, Ed25519-sign) on one delta of ``--params``
float64 values, at top-k 1% and 10% (16-bit values), the deployment's own top-k, and
dense 16- and 32-bit. Each envelope is then opened and decoded as the server would
(``roundtrip_ok``), so no mode is counted that the server could not read.

Baselines for the same delta: ``dense_float32_bytes`` (4 bytes a param, no framing) and
Flower's serialized ndarray (``flwr.common.ndarray_to_bytes``: the npy bytes inside its
``Parameters``, ``flower_bytes``) and its legacy ``FitRes`` protobuf message
(``flower_fitres_proto_bytes``). Neither side counts transport framing (HTTP/2 + gRPC
for Flower, the S3 PUT request for us) nor TLS.

``SUITES`` lists the HPKE suites the envelope can be sealed with: the hybrid
post-quantum ML-KEM-768 + X25519 (the default) and classic X25519. Each is measured for
every mode (``suites`` in the output), and the top-level ``ours_*`` figures are those of
the first (the default). ``pq_cost`` puts them side by side: extra bytes per update and
the time to seal and to open one top-k 1% envelope (median of ``--repeats``
interleaved runs, so both suites see the same machine noise).

Prints one JSON object (``--json``: on one line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.update import seal_delta
from fedlib.crypto import sealing
from fedlib.models.package import ModelPackage
from fedlib.server.fleet import Fleet
from fedlib.wire import compression, protocol
from fedlib.wire.protocol import PackageMetadata, TrainingConfig

GOALS = {"ratio_topk1_vs_dense32": 0.03}  # at most


@dataclass(frozen=True)
class Suite:
    """One HPKE suite: how the server's key pair is made; sealing follows the key type."""

    name: str
    hpke: str
    generate_server_key: Callable[[], Any]


SUITES: list[Suite] = [
    Suite(
        "mlkem768-x25519",
        protocol.SUITE_MLKEM768_X25519,
        lambda: sealing.generate_encryption_key("mlkem768-x25519"),
    ),
    Suite("x25519", protocol.SUITE_X25519, lambda: sealing.generate_encryption_key("x25519")),
]

#: (output name, compression mode, top-k fraction); ``None``: the deployment's default.
MODES: list[tuple[str, str, float | None]] = [
    ("topk1", "topk16", 0.01),
    ("topk10", "topk16", 0.10),
    ("topk_default", "topk16", None),
    ("dense16", "dense16", 1.0),
    ("dense32", "dense32", 1.0),
]


def make_delta(dim: int, seed: int) -> np.ndarray:
    """A device's float64 delta; its values only matter for clipping, not for sizes."""
    rng = np.random.default_rng(seed)
    return 0.01 * rng.standard_normal(dim)


def package_for(dim: int, mode: str, topk: float) -> ModelPackage:
    """The parts of a package sealing reads: version, kind, size and training config."""
    metadata = PackageMetadata(
        version=1,
        model_kind="autoencoder",
        model_spec={},
        feature_schema={},
        threshold=None,
        num_params=dim,
        training=TrainingConfig(compression=mode, topk_fraction=topk),
        created_at_ms=0,
    )
    return ModelPackage(metadata=metadata, onnx_bytes=b"", weights=np.zeros(dim))


def measure_suite(suite: Suite, delta: np.ndarray, default_topk: float) -> dict[str, Any]:
    """Seal the delta in every mode to a fresh server key of this suite; open each back."""
    dim = int(delta.shape[0])
    server_key = suite.generate_server_key()
    ring = sealing.ServerKeyring()
    ring.add(server_key)
    client_key = sealing.generate_signing_key()
    fleet = Fleet()
    fleet.enroll("bench-device", sealing.public_pem(client_key))
    out: dict[str, Any] = {"hpke": suite.hpke}
    roundtrip_ok = True
    for name, mode, fraction in MODES:
        topk = default_topk if fraction is None else fraction
        update = seal_delta(
            package_for(dim, mode, topk),
            delta,
            num_samples=5000,
            client_id="bench-device",
            client_key=client_key,
            server_public_key=server_key.public_key(),
            residual=None,
        )
        opened = sealing.open_update(update.envelope, fleet, ring)
        meta, blob = protocol.decode_payload(opened.payload)
        decoded = compression.decode(blob, expected_dim=dim)
        roundtrip_ok &= meta.compression == mode and decoded.dim == dim
        out[f"{name}_bytes"] = len(update.envelope)
        out[f"{name}_delta_blob_bytes"] = len(blob)
        out[f"{name}_overhead_bytes"] = len(update.envelope) - len(blob)
        out[f"{name}_nnz"] = decoded.nnz
    out["roundtrip_ok"] = bool(roundtrip_ok)
    return out


def crypto_times(payload_bytes: int, repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds to seal (HPKE + Ed25519 sign) and to open (verify + HPKE) one
    envelope of ``payload_bytes``, per suite; runs interleaved, medians reported."""
    payload = bytes(payload_bytes)
    client_key = sealing.generate_signing_key()
    fleet = Fleet()
    fleet.enroll("bench-device", sealing.public_pem(client_key))
    keys = {s.name: s.generate_server_key() for s in SUITES}
    rings = {name: sealing.ServerKeyring({"k": key}) for name, key in keys.items()}
    seal_us: dict[str, list[float]] = {name: [] for name in keys}
    open_us: dict[str, list[float]] = {name: [] for name in keys}
    for _ in range(repeats):
        for name, key in keys.items():
            t0 = time.perf_counter()
            _, blob = sealing.seal_update(
                client_id="bench-device",
                client_key=client_key,
                server_public_key=key.public_key(),
                base_version=1,
                payload=payload,
            )
            t1 = time.perf_counter()
            sealing.open_update(blob, fleet, rings[name])
            t2 = time.perf_counter()
            seal_us[name].append((t1 - t0) * 1e6)
            open_us[name].append((t2 - t1) * 1e6)
    return {
        name: {
            "seal_us": statistics.median(seal_us[name]),
            "open_us": statistics.median(open_us[name]),
        }
        for name in keys
    }


def flower_sizes(delta: np.ndarray) -> dict[str, int]:
    """Flower's bytes for the same delta sent as float32 (its usual parameter dtype)."""
    from flwr.common import Code, FitRes, Status, ndarray_to_bytes, ndarrays_to_parameters
    from flwr.common.serde import fit_res_to_proto

    arr = delta.astype(np.float32)
    fit_res = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([arr]),
        num_examples=5000,
        metrics={},
    )
    return {
        "flower_bytes": len(ndarray_to_bytes(arr)),
        "flower_fitres_proto_bytes": len(fit_res_to_proto(fit_res).SerializeToString()),
    }


def run(dim: int, seed: int, repeats: int = 300) -> dict[str, Any]:
    delta = make_delta(dim, seed)
    default_topk = TrainingConfig().topk_fraction
    suites = {s.name: measure_suite(s, delta, default_topk) for s in SUITES}
    times = crypto_times(suites[SUITES[0].name]["topk1_delta_blob_bytes"], repeats)
    for name, figures in times.items():
        suites[name].update(figures)
    main_suite = suites[SUITES[0].name]
    dense32 = compression.dense_float32_bytes(dim)
    result: dict[str, Any] = {
        "params": dim,
        "seed": seed,
        "suite": SUITES[0].name,
        "dense_float32_bytes": dense32,
        **flower_sizes(delta),
        "ours_topk_default_fraction": default_topk,
    }
    for name, _, _ in MODES:
        result[f"ours_{name}_bytes"] = main_suite[f"{name}_bytes"]
    result["ours_overhead_bytes"] = main_suite["topk1_overhead_bytes"]
    for name, _, _ in MODES:
        ours = result[f"ours_{name}_bytes"]
        result[f"ratio_{name}_vs_dense32"] = ours / dense32
        result[f"ratio_{name}_vs_flower"] = ours / result["flower_bytes"]
    pq, classic = suites["mlkem768-x25519"], suites["x25519"]
    result["pq_cost"] = {
        "extra_bytes_per_update": pq["topk1_bytes"] - classic["topk1_bytes"],
        "topk1_bytes_ratio": pq["topk1_bytes"] / classic["topk1_bytes"],
        "seal_time_ratio": pq["seal_us"] / classic["seal_us"],
        "open_time_ratio": pq["open_us"] / classic["open_us"],
        "seal_us": {"mlkem768-x25519": pq["seal_us"], "x25519": classic["seal_us"]},
        "open_us": {"mlkem768-x25519": pq["open_us"], "x25519": classic["open_us"]},
        "repeats": repeats,
    }
    result["roundtrip_ok"] = all(s["roundtrip_ok"] for s in suites.values())
    result["suites"] = suites
    result["goals"] = {k: f"<= {v}" for k, v in GOALS.items()}
    result["goals_met"] = {k: result[k] <= v for k, v in GOALS.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000, help="D params in the delta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=300, help="seal/open timing runs")
    parser.add_argument("--json", action="store_true", help="print the JSON object on one line")
    args = parser.parse_args(argv)
    if args.params < 1:
        parser.error("--params must be >= 1")
    result = run(args.params, args.seed, args.repeats)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

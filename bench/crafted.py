"""Valid sealed updates made without training, for load tests and I/O benchmarks.

Each is a small random top-k delta, encoded with the devices' encoder, framed with a
real payload for the active package, sealed to the server's current key and signed
by an enrolled Ed25519 key: everything the server checks passes, nothing is trained.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fedlib.crypto import sealing
from fedlib.wire import compression, protocol


def enroll_fleet(deployment: Any, count: int, prefix: str) -> list[tuple[str, Any]]:
    """Enroll ``count`` clients ``<prefix>-NNNNN``; their ids and signing keys."""
    fleet = deployment.load_fleet()
    clients = []
    for i in range(count):
        key = sealing.generate_signing_key()
        client_id = f"{prefix}-{i:05d}"
        fleet.enroll(client_id, sealing.public_pem(key))
        clients.append((client_id, key))
    deployment.save_fleet(fleet)
    return clients


def upload_crafted(
    deployment: Any,
    clients: list[tuple[str, Any]],
    count: int,
    *,
    seed: int,
    topk: float | None = None,
    delta_std: float = 1e-3,
    num_samples: int = 200,
    threads: int = 16,
) -> list[tuple[str, int]]:
    """Seal and PUT ``count`` valid updates round-robin over ``clients`` (update ``i``
    drawn from ``default_rng([seed, i])``); their inbox keys and sizes, in order."""
    meta_doc = deployment.registry().read_active().metadata
    dim = meta_doc.num_params
    topk = deployment.settings.topk_fraction if topk is None else topk
    server_public = deployment.current_server_public_key()
    config = compression.CompressionConfig("topk16", topk)
    meta = protocol.UpdateMeta.model_validate(
        {
            "schema": protocol.META_SCHEMA,
            "model_kind": meta_doc.model_kind,
            "num_params": dim,
            "num_samples": num_samples,
            "epochs": 1,
            "compression": "topk16",
        }
    )
    k = max(1, int(dim * topk))
    inbox = deployment.inbox

    def one(i: int) -> tuple[str, int]:
        rng = np.random.default_rng([seed, i])
        delta = np.zeros(dim)
        delta[rng.choice(dim, size=k, replace=False)] = rng.normal(0.0, delta_std, size=k)
        client_id, key = clients[i % len(clients)]
        header, envelope = sealing.seal_update(
            client_id=client_id,
            client_key=key,
            server_public_key=server_public,
            base_version=meta_doc.version,
            payload=protocol.encode_payload(meta, compression.encode(delta, config)),
        )
        object_key = protocol.inbox_key(client_id, header.update_id)
        inbox.put(object_key, envelope, if_absent=True)
        return object_key, len(envelope)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))

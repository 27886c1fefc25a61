"""Air-gap export from the server's side: the active (or a chosen) version, re-signed as
a bundle for offline sites and written to the air-gap bucket.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fedlib.trust.airgap_export import export_bundle
from fedlib.trust.channel_repository import ChannelRepository

if TYPE_CHECKING:
    from fedlib.server.deployment import Deployment


def export_to_airgap_bucket(
    deployment: Deployment, *, version: int | None, expires_in_days: int
) -> dict[str, Any]:
    """Export a bundle into the deployment's air-gap bucket and record it (write-once)."""
    repository = ChannelRepository(deployment.models, deployment.channel_keys())
    package_keys = deployment.trusted_package_keys()
    bundle, info = export_bundle(
        deployment.models,
        version=version,
        expires_in_days=expires_in_days,
        repository=repository,
        trusted_root=repository.root_bytes(1),
        package_keys=package_keys,
    )
    store = deployment.store(deployment.settings.airgap_bucket)
    key = f"bundles/{info.filename}"
    store.put(key, bundle, if_absent=True)
    record = {
        "key": key,
        "version": info.version,
        "active": info.active,
        "sha256": info.sha256,
        "size": info.size,
        "created": info.created.isoformat(),
        "expires": info.expires.isoformat(),
        "root_version": info.root_version,
    }
    store.put(f"{key}.json", json.dumps(record, indent=2).encode(), if_absent=True)
    return record

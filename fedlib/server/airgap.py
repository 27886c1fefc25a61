"""Air-gap export from the server's side: the active (or a chosen) version, re-signed as
a bundle for offline sites and written to the air-gap bucket; and the operator's way back
to those bundles (list them, fetch one to carry across).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlib.errors import VerificationError
from fedlib.storage.store import NoSuchKey, ObjectStore
from fedlib.trust.airgap import DEFAULT_MAX_BUNDLE_BYTES
from fedlib.trust.airgap_export import export_bundle
from fedlib.trust.channel_repository import ChannelRepository

if TYPE_CHECKING:
    from fedlib.server.deployment import Deployment

BUNDLES_PREFIX = "bundles/"
RECORD_SUFFIX = ".json"  # the export's record beside each bundle: version, sha256, expiry
MAX_RECORD_BYTES = 1 << 20
_VERSION_IN_NAME = re.compile(r"^fl-bundle-v(\d+)-")


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
    key = f"{BUNDLES_PREFIX}{info.filename}"
    store.put(key, bundle, if_absent=True)
    record = {
        "key": key,
        "url": bundle_url(deployment, key),
        "version": info.version,
        "active": info.active,
        "sha256": info.sha256,
        "size": info.size,
        "created": info.created.isoformat(),
        "expires": info.expires.isoformat(),
        "root_version": info.root_version,
    }
    store.put(f"{key}{RECORD_SUFFIX}", json.dumps(record, indent=2).encode(), if_absent=True)
    return record


def bundle_url(deployment: Deployment, key: str) -> str:
    """``s3://BUCKET/KEY``: where a bundle is, for logs and operators (a key alone does
    not say which bucket)."""
    return f"s3://{deployment.settings.airgap_bucket}/{key}"


@dataclass(frozen=True)
class BundleEntry:
    """One bundle in the air-gap bucket; version, digest and expiry come from the record
    the export wrote beside it (the version, failing that, from the file name)."""

    key: str
    url: str
    size: int
    modified_ms: int
    version: int | None
    sha256: str | None = None
    expires: str | None = None
    problem: str | None = None  # the record is missing or unreadable


def _read_record(store: ObjectStore, key: str) -> dict[str, Any]:
    """The export's record of bundle ``key`` (NoSuchKey when there is none; ValueError
    when it is not a JSON object)."""
    doc = json.loads(store.get(key + RECORD_SUFFIX, max_bytes=MAX_RECORD_BYTES))
    if not isinstance(doc, dict):
        raise ValueError(f"{key}{RECORD_SUFFIX} is not a JSON object")
    return doc


def list_bundles(deployment: Deployment) -> list[BundleEntry]:
    """Every bundle under ``bundles/``, newest first (one listing, one small read each)."""
    store = deployment.store(deployment.settings.airgap_bucket)
    infos = list(store.list(BUNDLES_PREFIX))
    keys = {info.key for info in infos}
    entries = []
    for info in infos:
        if info.key.endswith(RECORD_SUFFIX):
            continue
        record: dict[str, Any] = {}
        problem = None
        if info.key + RECORD_SUFFIX in keys:
            try:
                record = _read_record(store, info.key)
            except NoSuchKey:
                problem = "no export record"
            except ValueError as exc:  # shown on the bundle's line, not hidden
                problem = f"unreadable export record: {exc}"
        else:
            problem = "no export record"
        version = record.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            match = _VERSION_IN_NAME.match(info.key[len(BUNDLES_PREFIX) :])
            version = int(match.group(1)) if match else None
        entries.append(
            BundleEntry(
                key=info.key,
                url=bundle_url(deployment, info.key),
                size=info.size,
                modified_ms=info.last_modified_ms,
                version=version,
                sha256=record.get("sha256") if isinstance(record.get("sha256"), str) else None,
                expires=record.get("expires") if isinstance(record.get("expires"), str) else None,
                problem=problem,
            )
        )
    entries.sort(key=lambda e: (e.modified_ms, e.key), reverse=True)
    return entries


def bundle_key(deployment: Deployment, ref: str) -> str:
    """The object key of a bundle named as the operator sees it: ``bundles/NAME``,
    ``NAME`` or ``s3://BUCKET/bundles/NAME`` (the export DAG's log line)."""
    key = ref
    if ref.startswith("s3://"):
        bucket, _, key = ref[len("s3://") :].partition("/")
        if bucket != deployment.settings.airgap_bucket:
            raise ValueError(
                f"{ref} is not in the air-gap bucket {deployment.settings.airgap_bucket}"
            )
    if not key.startswith(BUNDLES_PREFIX):
        key = BUNDLES_PREFIX + key
    if key.endswith(RECORD_SUFFIX):
        raise ValueError(f"{key} is a bundle's export record; name the bundle itself")
    return key


def fetch_bundle(deployment: Deployment, ref: str) -> tuple[BundleEntry, bytes]:
    """A bundle's bytes, checked against its export record (size and SHA-256) when there
    is one: what gets carried across is what the export wrote, or nothing."""
    key = bundle_key(deployment, ref)
    store = deployment.store(deployment.settings.airgap_bucket)
    try:
        data = store.get(key, max_bytes=DEFAULT_MAX_BUNDLE_BYTES)
    except NoSuchKey:
        raise NoSuchKey(key, f"no bundle in {bundle_url(deployment, BUNDLES_PREFIX)}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        record: dict[str, Any] | None = _read_record(store, key)
    except NoSuchKey:
        record = None
    if record is not None and (
        record.get("sha256") != digest or record.get("size") not in (None, len(data))
    ):
        raise VerificationError(
            f"{bundle_url(deployment, key)} does not match its export record "
            f"(sha256 {digest}, {len(data)} bytes; recorded {record.get('sha256')}, "
            f"{record.get('size')} bytes)"
        )
    match = _VERSION_IN_NAME.match(key[len(BUNDLES_PREFIX) :])
    version = (record or {}).get("version", int(match.group(1)) if match else None)
    entry = BundleEntry(
        key=key,
        url=bundle_url(deployment, key),
        size=len(data),
        modified_ms=0,
        version=version if isinstance(version, int) else None,
        sha256=digest,
        expires=(record or {}).get("expires"),
        problem=None if record is not None else "no export record: digest not checked",
    )
    return entry, data

"""Building an air-gap bundle: a TUF repository snapshot with its own short-lived
timestamp, the package files and their signatures, packed as a deterministic tar.

The far side verifies it with :mod:`fedlib.trust.airgap` only; this module is the
server's half and is never imported by a device.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import UpdaterConfig

from fedlib.crypto import signing
from fedlib.crypto.pq_signing import PackageKey
from fedlib.storage.store import ObjectStore
from fedlib.trust.airgap import (
    BUNDLE_FORMAT,
    BUNDLE_LAYOUT,
    DEFAULT_MAX_BUNDLE_BYTES,
    FILE_MODE,
    MANIFEST,
    MARKER_FIELD,
    README,
    ROLES,
    BundleInfo,
    BundleVerificationError,
    canonical,
    entry,
    iso,
    utc,
    verify,
)
from fedlib.trust.channel_client import ChannelClient
from fedlib.trust.channel_layout import (
    ACTIVE_TARGET,
    ChannelError,
    ChannelLayout,
    ChannelVerificationError,
    manifest_path,
    target_path,
)
from fedlib.trust.channel_repository import ChannelRepository


def export_bundle(
    channel_store: ObjectStore,
    *,
    version: int | None,
    expires_in_days: int,
    repository: ChannelRepository | None = None,
    layout: ChannelLayout | None = None,
    now: datetime | None = None,
    trusted_root: bytes | None = None,
    package_keys: Mapping[str, PackageKey] | None = None,
    compress: bool = False,
) -> tuple[bytes, BundleInfo]:
    """Export ``version`` (``None``: the active one) of the channel as one bundle.

    The exporter reads the channel through the same verifying TUF client as a device
    (pinned to ``trusted_root``, else ``1.root.json`` of the bucket), so it never packs
    bytes someone slipped into the bucket. ``repository`` supplies the online keys that
    re-sign snapshot/timestamp for ``expires_in_days``; ``now`` fixes the creation time
    (same inputs and ``now`` give the same bytes with Ed25519 online keys; ECDSA
    signatures are randomised). The result is verified like a device would before it
    is returned (including the OpenSSF signature when ``package_keys`` are given), so an
    export never yields a bundle devices pinned to the same keys refuse.
    """
    if not isinstance(expires_in_days, int) or isinstance(expires_in_days, bool):
        raise ValueError(f"expires_in_days must be an int, got {expires_in_days!r}")
    if expires_in_days < 1:
        raise ValueError("expires_in_days must be at least 1")
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version < 1
    ):
        raise ValueError(f"version must be a positive int or None, got {version!r}")
    if layout is None:
        layout = repository.layout if repository is not None else ChannelLayout()
    created = utc(now if now is not None else datetime.now(UTC)).replace(microsecond=0)
    expires = created + timedelta(days=expires_in_days)
    if expires <= datetime.now(UTC):
        raise ChannelError(f"a bundle created {iso(created)} would already have expired")

    pinned = trusted_root
    if pinned is None:
        pinned = channel_store.get(
            layout.metadata_key("1.root.json"), max_bytes=UpdaterConfig().root_max_length
        )
    with tempfile.TemporaryDirectory(prefix="fl-airgap-export-") as tmp:
        client = ChannelClient(
            channel_store, Path(tmp, "metadata"), Path(tmp, "targets"), pinned, layout=layout
        )
        try:
            client.refresh()
            active_version = client.active_version()
            if version is None:
                version = active_version
            if version is None:
                raise ChannelError("the channel has no active version: nothing to export")
            package = client.package_info(version)
            files = client.download(version)
            payload = {target_path(version, name): data for name, data in files.items()}
            payload[manifest_path(version)] = client.fetch_target(manifest_path(version))
            if active_version == version:
                payload[ACTIVE_TARGET] = client.fetch_target(ACTIVE_TARGET)
        except ChannelVerificationError as exc:
            raise ChannelError(f"export: the channel does not verify: {exc}") from exc
        # ngclient keeps exactly the bytes it verified; those are what we ship.
        verified = {role: Path(tmp, "metadata", f"{role}.json").read_bytes() for role in ROLES}
    if signing.SIGNATURE_FILE not in files:
        raise ChannelError(
            f"version {version} has no {signing.SIGNATURE_FILE}: devices would refuse it"
        )
    active = active_version == version

    root_md = Metadata[Root].from_bytes(verified["root"])
    root = root_md.signed
    roots = _root_chain(channel_store, layout, root.version, verified["root"], pinned)
    if root.expires < expires:
        raise ChannelError(
            f"root v{root.version} expires {iso(root.expires)}, before the bundle would "
            f"({iso(expires)}): re-sign root with the offline keys or export fewer days"
        )
    marker = {
        "version": version,
        "active": active,
        "created": iso(created),
        "expires": iso(expires),
    }
    if repository is not None:
        targets_b, snapshot_b, timestamp_b, resigned = _resign(
            root, verified, repository, expires, marker
        )
    else:
        targets_b, snapshot_b, timestamp_b = (
            verified["targets"],
            verified["snapshot"],
            verified["timestamp"],
        )
        resigned = ()
        for role in ("timestamp", "snapshot", "targets"):
            role_expires = Metadata.from_bytes(verified[role]).signed.expires
            if role_expires < expires:
                raise ChannelError(
                    f"the channel's {role} metadata expires {iso(role_expires)}, before the "
                    f"bundle would ({iso(expires)}): pass the ChannelRepository so its "
                    f"online keys re-sign it for {expires_in_days} days"
                )
    targets_md = Metadata[Targets].from_bytes(targets_b)
    snapshot_md = Metadata[Snapshot].from_bytes(snapshot_b)

    members: list[tuple[str, bytes]] = [
        (f"metadata/{n}.root.json", data) for n, data in enumerate(roots, start=1)
    ]
    members += [
        (f"metadata/{targets_md.signed.version}.targets.json", targets_b),
        (f"metadata/{snapshot_md.signed.version}.snapshot.json", snapshot_b),
        ("metadata/timestamp.json", timestamp_b),
    ]
    members += sorted(
        (BUNDLE_LAYOUT.target_key(targets_md.signed.targets[path]), data)
        for path, data in payload.items()
    )
    readme = _readme(version, active, created, expires, root.version)
    manifest = canonical(
        {
            "format": BUNDLE_FORMAT,
            "version": version,
            "active": active,
            "created": iso(created),
            "expires": iso(expires),
            "root_version": root.version,
            "package": package,
            "files": {name: entry(data) for name, data in [(README, readme), *members]},
        }
    )
    members = [(README, readme), (MANIFEST, manifest), *members]
    tar = _tar(members, int(created.timestamp()))
    bundle = gzip.compress(tar, compresslevel=9, mtime=0) if compress else tar

    if len(tar) > DEFAULT_MAX_BUNDLE_BYTES:
        raise ChannelError(
            f"bundle is {len(tar)} bytes; devices refuse more than {DEFAULT_MAX_BUNDLE_BYTES}"
        )
    with tempfile.TemporaryDirectory(prefix="fl-airgap-selfcheck-") as tmp:
        try:
            verify(
                bundle,
                trusted_root=pinned,
                trusted_package_keys=package_keys,
                installed_version=None,
                workdir=Path(tmp),
                max_bundle_bytes=DEFAULT_MAX_BUNDLE_BYTES,
                now=None,
            )
        except BundleVerificationError as exc:
            raise ChannelError(f"export self-check failed: {exc}") from exc
    info = BundleInfo(
        version=version,
        active=active,
        created=created,
        expires=expires,
        root_version=root.version,
        members=tuple(name for name, _ in members),
        sha256=hashlib.sha256(bundle).hexdigest(),
        size=len(bundle),
        resigned=resigned,
        compressed=compress,
    )
    return bundle, info


def _root_chain(
    store: ObjectStore, layout: ChannelLayout, newest: int, newest_bytes: bytes, pinned: bytes
) -> list[bytes]:
    """``1.root.json .. N.root.json``, each step checked as a device's root walk does."""
    limit = UpdaterConfig().root_max_length
    chain: list[bytes] = []
    previous: Root | None = None
    for number in range(1, newest + 1):
        data = store.get(layout.metadata_key(f"{number}.root.json"), max_bytes=limit)
        md = Metadata[Root].from_bytes(data)
        if md.signed.version != number:
            raise ChannelError(f"{number}.root.json holds root version {md.signed.version}")
        if not md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures):
            raise ChannelError(f"{number}.root.json does not verify against its predecessor")
        chain.append(data)
        previous = md.signed
    if chain[-1] != newest_bytes:
        raise ChannelError(f"{newest}.root.json changed while exporting")
    pinned_version = Metadata[Root].from_bytes(pinned).signed.version
    if pinned_version <= newest and chain[pinned_version - 1] != pinned:
        raise ChannelError(f"the bucket's {pinned_version}.root.json is not the pinned root")
    return chain


def _resign(
    root: Root,
    verified: Mapping[str, bytes],
    repository: ChannelRepository,
    expires: datetime,
    marker: Mapping[str, Any],
) -> tuple[bytes, bytes, bytes, tuple[str, ...]]:
    """Bundle-scoped snapshot/timestamp (and targets if needed) valid until ``expires``."""
    keys = repository.keys
    targets_md = Metadata[Targets].from_bytes(verified["targets"])
    snapshot_md = Metadata[Snapshot].from_bytes(verified["snapshot"])
    timestamp_md = Metadata[Timestamp].from_bytes(verified["timestamp"])
    targets_b, resigned = verified["targets"], []
    if targets_md.signed.expires < expires:
        targets_md.signed.expires = expires
        targets_b = _sign(root, targets_md, "targets", keys.targets)
        snapshot_md.signed.meta["targets.json"] = MetaFile.from_data(
            targets_md.signed.version, targets_b, ["sha256"]
        )
        resigned.append("targets")
    snapshot_md.signed.expires = expires
    snapshot_b = _sign(root, snapshot_md, "snapshot", keys.snapshot)
    resigned.append("snapshot")
    timestamp_md.signed.snapshot_meta = MetaFile.from_data(
        snapshot_md.signed.version, snapshot_b, ["sha256"]
    )
    timestamp_md.signed.expires = expires
    timestamp_md.signed.unrecognized_fields[MARKER_FIELD] = dict(marker)
    timestamp_b = _sign(root, timestamp_md, "timestamp", keys.timestamp)
    resigned.append("timestamp")
    return targets_b, snapshot_b, timestamp_b, tuple(resigned)


def _sign(root: Root, md: Metadata[Any], role: str, signer: CryptoSigner) -> bytes:
    """Re-sign with the one online key; refuse if root would not accept it alone."""
    md.sign(signer)  # replaces the live signatures: they no longer cover the new expiry
    if not root.get_verification_result(role, md.signed_bytes, md.signatures):
        raise ChannelError(
            f"the {role} key {signer.public_key.keyid[:16]} does not meet root "
            f"v{root.version}'s {role} threshold on its own: cannot re-sign for a bundle"
        )
    return md.to_bytes()


def _tar(members: list[tuple[str, bytes]], mtime: int) -> bytes:
    """A POSIX tar whose bytes depend only on names, contents and ``mtime``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = FILE_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _readme(version: int, active: bool, created: datetime, expires: datetime, root: int) -> bytes:
    return f"""DADM federated learning -- air-gap model bundle
================================================

Model version:  {version}{" (the active version when exported)" if active else ""}
Created:        {iso(created)}
Expires:        {iso(expires)}
Channel root:   version {root}

This tar file carries one model version of the signed model channel: TUF metadata
(metadata/), the package files (targets/: model.onnx, weights.bin, metadata.json and
the OpenSSF model signature signature.bin) and manifest.json, an index of SHA-256
digests. Verifying it needs no network.

On the device (client.json is its own configuration, written when it was enrolled):

    fl-client verify-bundle BUNDLE --config client.json
        checks everything, installs nothing
    fl-client install-bundle BUNDLE --config client.json
        verifies again, then installs atomically

The device trusts only what it already pins in client.json: the channel root and the
package-signing key(s). It refuses the bundle if any byte was
changed or is missing, a file was added, the metadata is not signed by keys of its
pinned root, the bundle has expired, the version is not newer than the installed one,
or signature.bin was not made by a pinned package key.

Do not unpack and copy the files by hand: that skips every check above. If the bundle
is refused, ask the operator for a fresh export; the device keeps its current model.
""".encode()

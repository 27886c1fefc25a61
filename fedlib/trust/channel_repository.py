"""The server's side of the TUF channel: the signing keys and the repository that
publishes targets, bumps versions and re-signs expiring metadata.

Devices never import this module; they verify with
:mod:`fedlib.trust.channel_client`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from fedlib.errors import ObjectExists, VerificationError
from fedlib.files import atomic_write
from fedlib.storage.store import NoSuchKey, ObjectStore
from fedlib.trust.channel_layout import (
    ACTIVE_TARGET,
    DEFAULT_ROOT_KEYS,
    DEFAULT_ROOT_THRESHOLD,
    HASH_ALGORITHM,
    KEY_SCHEMES,
    NAME_RE,
    ONLINE_ROLES,
    RESERVED_CUSTOM,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    VERSIONED_RE,
    ChannelError,
    ChannelLayout,
    Expiry,
    S,
    canonical_json,
    custom_version,
    logger,
    manifest_path,
    sha256,
    target_path,
    utcnow,
)


def generate_signer(scheme: str = "ed25519") -> CryptoSigner:
    """A fresh signing key: ``ed25519`` (default) or ``ecdsa`` (P-256)."""
    if scheme == "ed25519":
        return CryptoSigner.generate_ed25519()
    if scheme in ("ecdsa", "ecdsa-sha2-nistp256"):
        return CryptoSigner.generate_ecdsa()
    raise ValueError(f"unsupported key scheme {scheme!r}; use one of {KEY_SCHEMES}")


def _signer_from_pem(pem: bytes, where: str) -> CryptoSigner:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ChannelError(f"{where}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey | EllipticCurvePrivateKey):
        raise ChannelError(f"{where}: only Ed25519 and ECDSA keys are supported")
    return CryptoSigner(key)


def _keyid(signer: CryptoSigner) -> str:
    return signer.public_key.keyid


@dataclass
class ChannelKeys:
    """The channel's private keys, as PEM files (0600) in ``keys_dir``.

    ``root`` keys belong offline (an operator's USB stick, an HSM): a server can run
    with ``root=[]`` and still publish, because publishing only needs the online
    ``targets``/``snapshot``/``timestamp`` keys. Tests and the demo keep all in one dir.

    Files: ``root-<keyid16>.pem`` per root key, ``targets.pem``, ``snapshot.pem``,
    ``timestamp.pem``; replaced keys move to ``retired/`` rather than vanish.
    """

    root: list[CryptoSigner]
    targets: CryptoSigner
    snapshot: CryptoSigner
    timestamp: CryptoSigner
    keys_dir: Path | None = None

    @classmethod
    def generate(
        cls,
        keys_dir: str | os.PathLike[str] | None = None,
        *,
        scheme: str = "ed25519",
        root_keys: int = DEFAULT_ROOT_KEYS,
    ) -> ChannelKeys:
        """New keys for every role; written to ``keys_dir`` when given."""
        if root_keys < 1:
            raise ValueError("need at least one root key")
        keys = cls(
            root=[generate_signer(scheme) for _ in range(root_keys)],
            targets=generate_signer(scheme),
            snapshot=generate_signer(scheme),
            timestamp=generate_signer(scheme),
            keys_dir=Path(keys_dir) if keys_dir is not None else None,
        )
        if keys.keys_dir is not None:
            keys.save()
        return keys

    @classmethod
    def load(cls, keys_dir: str | os.PathLike[str]) -> ChannelKeys:
        """Load the keys in ``keys_dir``; root keys may be absent (kept offline)."""
        directory = Path(keys_dir)
        online: dict[str, CryptoSigner] = {}
        for role in ONLINE_ROLES:
            online[role] = _signer_from_pem(_read_private(directory / f"{role}.pem"), role)
        root = [
            _signer_from_pem(_read_private(path), path.name)
            for path in sorted(directory.glob("root-*.pem"))
        ]
        return cls(root=root, keys_dir=directory, **online)

    @classmethod
    def load_or_generate(
        cls, keys_dir: str | os.PathLike[str], *, scheme: str = "ed25519"
    ) -> ChannelKeys:
        """Load the keys in ``keys_dir``, generating them on first use."""
        if (Path(keys_dir) / f"{TIMESTAMP}.pem").exists():
            return cls.load(keys_dir)
        return cls.generate(keys_dir, scheme=scheme)

    def online(self, role: str) -> CryptoSigner:
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role!r} is not an online role")
        return cast(CryptoSigner, getattr(self, role))

    def save(self) -> None:
        """Write every key as a 0600 PEM file (the directory is made 0700)."""
        directory = self._dir()
        for role in ONLINE_ROLES:
            _write_private(directory / f"{role}.pem", self.online(role))
        for signer in self.root:
            _write_private(directory / f"root-{_keyid(signer)[:16]}.pem", signer)

    def stage_online(self, role: str, signer: CryptoSigner) -> None:
        """Write ``role``'s next key as ``<role>.next.pem`` before any root names it.

        Why: if the process dies after the new root is written but before the key is
        promoted, the key the root trusts is still on disk (see :meth:`staged`).
        """
        self.online(role)  # validates the role name
        if self.keys_dir is not None:
            _write_private(self._dir() / f"{role}.next.pem", signer)

    def staged(self, role: str) -> CryptoSigner | None:
        """The staged next key of ``role``, if a rotation left one behind."""
        if self.keys_dir is None:
            return None
        path = self.keys_dir / f"{role}.next.pem"
        return _signer_from_pem(_read_private(path), path.name) if path.exists() else None

    def replace_online(self, role: str, signer: CryptoSigner) -> CryptoSigner:
        """Swap ``role``'s key (old file kept in ``retired/``); return the old signer."""
        old = self.online(role)
        setattr(self, role, signer)
        if self.keys_dir is not None:
            directory = self._dir()
            _retire(directory, directory / f"{role}.pem", f"{role}-{_keyid(old)[:16]}.pem")
            _write_private(directory / f"{role}.pem", signer)
            (directory / f"{role}.next.pem").unlink(missing_ok=True)
        return old

    def replace_root(self, signers: Sequence[CryptoSigner]) -> None:
        """Swap the root keys (old files kept in ``retired/``)."""
        if self.keys_dir is not None:
            directory = self._dir()
            for path in sorted(directory.glob("root-*.pem")):
                _retire(directory, path, path.name)
            for signer in signers:
                _write_private(directory / f"root-{_keyid(signer)[:16]}.pem", signer)
        self.root = list(signers)

    def _dir(self) -> Path:
        if self.keys_dir is None:
            raise ChannelError("these keys have no keys_dir to save to")
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.keys_dir, 0o700)
        return self.keys_dir


def _read_private(path: Path) -> bytes:
    """Read a private key, refusing one others can read (as ssh does)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ChannelError(f"channel key {path} not found") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ChannelError(f"channel key {path} is accessible by others; chmod 600 it")
    return path.read_bytes()


def _write_private(path: Path, signer: CryptoSigner) -> None:
    atomic_write(path, signer.private_bytes, mode=0o600)


def _retire(directory: Path, path: Path, name: str) -> None:
    if path.exists():
        retired = directory / "retired"
        retired.mkdir(exist_ok=True, mode=0o700)
        os.replace(path, retired / name)


@dataclass(frozen=True)
class ChannelStatus:
    """What the repository currently serves: versions per role, expiries, active model."""

    root_version: int
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    active_version: int | None
    versions: tuple[int, ...]
    expires: Mapping[str, datetime]


@dataclass
class _State:
    """The signed metadata currently in the bucket, plus which versions exist there."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]
    present: dict[str, set[int]] = field(default_factory=dict)
    # Set when timestamp.json was missing, invalid or behind the newest snapshot.
    timestamp_floor: int = 0
    # Roles whose in-memory metadata is a placeholder (version 1 means "none yet").
    fresh: set[str] = field(default_factory=set)

    def next_version(self, role: str, current: int) -> int:
        """One above everything this role ever had in the bucket: versions only go up."""
        base = 0 if role in self.fresh else current
        self.fresh.discard(role)
        return max(base, max(self.present.get(role, ()), default=0)) + 1


class ChannelRepository:
    """The server side: writes threshold-signed TUF metadata and targets into a store.

    Stateless between calls: every operation re-reads (and verifies) the metadata in the
    bucket, so any Airflow worker can publish. Writes go targets -> targets metadata ->
    snapshot -> timestamp, so a device never sees a timestamp naming missing files;
    versioned metadata is written with ``if_absent``, so two concurrent publishers fail
    loudly instead of overwriting each other's versions.
    """

    def __init__(
        self,
        store: ObjectStore,
        keys: ChannelKeys | None,
        *,
        layout: ChannelLayout | None = None,
        expiry: Expiry | None = None,
        root_threshold: int = DEFAULT_ROOT_THRESHOLD,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self._keys = keys  # None: read-only (status, root bytes), no private key loaded
        self.layout = layout or ChannelLayout()
        self.expiry = expiry or Expiry()
        self.root_threshold = root_threshold
        self.clock = clock

    @property
    def keys(self) -> ChannelKeys:
        if self._keys is None:
            raise ChannelError("this channel repository is read-only (no keys loaded)")
        return self._keys

    # ------------------------------------------------------------------ public

    def init(self) -> bool:
        """Create root v1 and empty targets/snapshot/timestamp; False if already there."""
        present = self._present()
        if present[ROOT]:
            root = self._latest_root(present)
            self._check_online_keys(root.signed)
            if self.store.exists(self.layout.metadata_key("timestamp.json")):
                return False
            logger.warning("channel has a root but no timestamp.json: completing init()")
        else:
            signers = self._root_signers()
            if not 1 <= self.root_threshold <= len(signers):
                raise ChannelError(
                    f"root threshold {self.root_threshold} needs at least that many root keys "
                    f"(have {len(signers)})"
                )
            root = Metadata(Root(version=1, expires=self._expires(ROOT), consistent_snapshot=True))
            for signer in signers:
                root.signed.add_key(signer.public_key, ROOT)
            root.signed.roles[ROOT].threshold = self.root_threshold
            for role in ONLINE_ROLES:
                root.signed.add_key(self.keys.online(role).public_key, role)
            for signer in signers:
                root.sign(signer, append=True)
            self._put_metadata("1.root.json", root.to_bytes(), if_absent=True)
        state = _State(
            root=root,
            targets=Metadata(Targets(expires=self._expires(TARGETS))),
            snapshot=Metadata(Snapshot(expires=self._expires(SNAPSHOT))),
            timestamp=Metadata(Timestamp(expires=self._expires(TIMESTAMP))),
            present=present,
            fresh={TARGETS, SNAPSHOT, TIMESTAMP},
        )
        self._commit(state, targets=True)
        return True

    def publish(
        self, version: int, files: Mapping[str, bytes], custom: Mapping[str, Any] | None = None
    ) -> bool:
        """Publish ``files`` as ``version`` and make it active; False if already identical.

        Versions only go up: a version at or below the active one is refused unless it
        is an identical re-publish (then nothing is written). A rollback is a *new*
        version whose ``custom`` says ``rollback_of``.
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"version must be a positive int, got {version!r}")
        if not files:
            raise ValueError("a package needs at least one file")
        extra = json.loads(json.dumps(dict(custom or {})))  # JSON-normalised, or TypeError
        if "files" in extra or extra.get("version", version) != version:
            raise ValueError(f"custom must not set {sorted(RESERVED_CUSTOM)} (got {extra})")
        extra["version"] = version
        entries: dict[str, tuple[TargetFile, bytes]] = {}
        for name, data in files.items():
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ValueError(f"file name {name!r} must match {NAME_RE.pattern}")
            info = TargetFile.from_data(target_path(version, name), data, [HASH_ALGORITHM])
            info.unrecognized_fields["custom"] = dict(extra)
            entries[info.path] = (info, bytes(data))
        manifest = canonical_json(
            {
                "version": version,
                "files": {
                    name: {"length": len(data), HASH_ALGORITHM: sha256(data)}
                    for name, data in sorted(files.items())
                },
                "custom": extra,
            }
        )
        minfo = TargetFile.from_data(manifest_path(version), manifest, [HASH_ALGORITHM])
        minfo.unrecognized_fields["custom"] = {**extra, "files": sorted(files)}
        entries[minfo.path] = (minfo, manifest)

        state = self._load()
        targets = state.targets.signed.targets
        existing = {
            path: info
            for path, info in targets.items()
            if path == minfo.path or path.startswith(f"v{version:08d}/")
        }
        if existing:
            if existing == {path: info for path, (info, _) in entries.items()}:
                logger.info("channel: version %d already published identically", version)
                return False
            raise ChannelError(f"version {version} is already published with other content")
        active = _active_from(state.targets.signed)
        if active is not None and version <= active:
            raise ChannelError(
                f"versions only go up: {version} <= active {active} "
                "(a rollback is a new version with rollback_of)"
            )
        marker = canonical_json({"version": version})
        ainfo = TargetFile.from_data(ACTIVE_TARGET, marker, [HASH_ALGORITHM])
        ainfo.unrecognized_fields["custom"] = {"version": version}
        entries[ACTIVE_TARGET] = (ainfo, marker)

        for info, data in entries.values():
            # Content-addressed keys: an overwrite writes the same bytes (and repairs junk).
            self.store.put(self.layout.target_key(info), data)
        for path, (info, _) in entries.items():
            targets[path] = info
        self._commit(state, targets=True)
        logger.info("channel: published version %d (%d files)", version, len(files))
        return True

    def put_target(self, path: str, data: bytes) -> bool:
        """Publish one target outside the version scheme (e.g. ``device-config.json``),
        replacing an earlier one under the same path; False if it is already identical.

        Devices read it with :meth:`ChannelClient.fetch_target`: signed by the targets
        key, listed in snapshot and timestamp, so it cannot be replayed or mixed in."""
        if path == ACTIVE_TARGET or re.match(r"v\d{8}[./]", path) or not NAME_RE.match(path):
            raise ValueError(f"{path!r} is not a free target path")
        info = TargetFile.from_data(path, data, [HASH_ALGORITHM])
        state = self._load()
        targets = state.targets.signed.targets
        if targets.get(path) == info:
            return False
        self.store.put(self.layout.target_key(info), bytes(data))
        targets[path] = info
        self._commit(state, targets=True)
        logger.info("channel: published %s (%d bytes)", path, len(data))
        return True

    def read_target(self, path: str) -> bytes | None:
        """A target's bytes as the verified targets metadata lists them (None: unlisted)."""
        info = self._load().targets.signed.targets.get(path)
        if info is None:
            return None
        data = self.store.get(self.layout.target_key(info), max_bytes=info.length)
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as exc:
            raise VerificationError(f"target {path} does not match its metadata") from exc
        return data

    def refresh_timestamp(self, *, force: bool = False, margin: float = 0.5) -> list[str]:
        """Re-sign online roles that have less than ``margin`` of their lifetime left.

        Meant for a periodic task (hourly is plenty with a 1-day timestamp): a channel
        nobody re-signs expires, and devices then refuse it as frozen. ``force`` always
        re-signs the timestamp. Returns the roles re-signed.
        """
        state = self._load()
        now = self.clock()

        def due(role: str, md: Metadata[Any]) -> bool:
            left = md.signed.expires - now
            return left < self.expiry.of(role) * margin

        bump_targets = due(TARGETS, state.targets)
        bump_snapshot = bump_targets or due(SNAPSHOT, state.snapshot)
        bump_timestamp = force or bump_snapshot or due(TIMESTAMP, state.timestamp)
        if not bump_timestamp:
            return []
        self._commit(state, targets=bump_targets, snapshot=bump_snapshot)
        resigned = [TARGETS] * bump_targets + [SNAPSHOT] * bump_snapshot + [TIMESTAMP]
        if state.root.signed.expires - now < self.expiry.root * 0.25:
            logger.warning(
                "channel: root v%d expires %s; re-sign it with the offline root keys",
                state.root.signed.version,
                state.root.signed.expires.isoformat(),
            )
        return resigned

    def rotate_root(
        self, new_root_keys: Sequence[CryptoSigner] | None = None, threshold: int | None = None
    ) -> int:
        """Write ``N+1.root.json`` signed by the old root threshold *and* the new one.

        ``new_root_keys=None`` re-signs the same keys with a fresh expiry. Devices walk
        ``N.root.json -> N+1.root.json``, checking both thresholds at each step.
        Returns the new root version.
        """
        state = self._load()
        old_signers = self._root_signers()
        new_signers = list(new_root_keys) if new_root_keys is not None else old_signers
        threshold = threshold or (self.root_threshold if new_root_keys is not None else None)
        root = copy.deepcopy(state.root.signed)
        if new_root_keys is not None:
            for keyid in list(root.roles[ROOT].keyids):
                root.revoke_key(keyid, ROOT)
            for signer in new_signers:
                root.add_key(signer.public_key, ROOT)
        if threshold is not None:
            root.roles[ROOT].threshold = threshold
        if not 1 <= root.roles[ROOT].threshold <= len(root.roles[ROOT].keyids):
            raise ChannelError(f"root threshold {root.roles[ROOT].threshold} is not reachable")
        self._write_root(state, root, old_signers, new_signers)
        if new_root_keys is not None:
            self.keys.replace_root(new_signers)
        return root.version

    def rotate_online_key(self, role: str, signer: CryptoSigner | None = None) -> CryptoSigner:
        """Replace ``role``'s online key (root keys needed); return the new signer.

        Order without a window: the role's metadata (and the roles above it) is first
        re-signed by the old *and* the new key, valid under the current root; then root
        N+1 names only the new key; then the key file is swapped. The new key is staged
        on disk before any root trusts it, so a crash cannot lose it.
        """
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role!r} is not an online role")
        state = self._load()
        root_signers = self._root_signers()
        old = self.keys.online(role)
        new = signer or generate_signer(
            "ed25519" if old.public_key.keytype == "ed25519" else "ecdsa"
        )
        root = copy.deepcopy(state.root.signed)
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(new.public_key, role)
        self.keys.stage_online(role, new)
        self._commit(
            state,
            targets=role == TARGETS,
            snapshot=role in (TARGETS, SNAPSHOT),
            cosign={role: new},
        )
        self._write_root(state, root, root_signers, root_signers)
        self.keys.replace_online(role, new)
        logger.info("channel: rotated the %s key to %s", role, _keyid(new)[:16])
        return new

    def root_bytes(self, version: int | None = None) -> bytes:
        """The bytes of ``N.root.json`` (latest by default): what devices pin."""
        if version is None:
            version = max(self._present()[ROOT], default=0)
            if not version:
                raise ChannelError("channel not initialised: call init() first")
        return self.store.get(self.layout.metadata_key(f"{version}.root.json"))

    def targets(self) -> Targets:
        """The verified targets metadata (root chain, snapshot, hashes checked): the one
        list of what was published. Nothing else in the bucket is a package."""
        return self._load().targets.signed

    def status(self) -> ChannelStatus:
        """The verified state of the channel, for the operator's page and the logs."""
        state = self._load()
        tgt = state.targets.signed
        versions = published_versions(tgt)
        return ChannelStatus(
            root_version=state.root.signed.version,
            targets_version=tgt.version,
            snapshot_version=state.snapshot.signed.version,
            timestamp_version=state.timestamp.signed.version,
            active_version=_active_from(tgt),
            versions=tuple(versions),
            expires={
                ROOT: state.root.signed.expires,
                TARGETS: tgt.expires,
                SNAPSHOT: state.snapshot.signed.expires,
                TIMESTAMP: state.timestamp.signed.expires,
            },
        )

    # ------------------------------------------------------------------ internals

    def _expires(self, role: str) -> datetime:
        return self.clock() + self.expiry.of(role)

    def _root_signers(self) -> list[CryptoSigner]:
        if not self.keys.root:
            raise ChannelError("root keys are offline: load them into ChannelKeys.root first")
        return list(self.keys.root)

    def _present(self) -> dict[str, set[int]]:
        """Versions of root/targets/snapshot metadata that exist in the bucket."""
        present: dict[str, set[int]] = {ROOT: set(), TARGETS: set(), SNAPSHOT: set()}
        prefix = self.layout.metadata_prefix
        for obj in self.store.list(prefix):
            match = VERSIONED_RE.match(obj.key[len(prefix) :])
            if match:
                present[match.group(2)].add(int(match.group(1)))
        return present

    def _get_metadata(self, filename: str) -> tuple[bytes, Metadata[Any]]:
        data = self.store.get(self.layout.metadata_key(filename))
        try:
            return data, Metadata.from_bytes(data)
        except tuf_exc.RepositoryError as exc:
            raise VerificationError(f"channel metadata {filename} is malformed: {exc}") from exc

    def _root(self, version: int) -> Metadata[Root]:
        _, md = self._get_metadata(f"{version}.root.json")
        if not isinstance(md.signed, Root) or md.signed.version != version:
            raise VerificationError(f"{version}.root.json is not root version {version}")
        return cast(Metadata[Root], md)

    def _latest_root(self, present: dict[str, set[int]]) -> Metadata[Root]:
        """The newest root reached by walking the chain from ``1.root.json``, as
        python-tuf's client does: N+1 must carry the threshold of N's root keys *and*
        its own. Why: bucket write access can drop a self-signed ``99.root.json``
        naming other keys; the walk stops at the first root the chain does not sign
        (logged), so such a file is ignored rather than trusted."""
        if 1 not in present[ROOT]:
            raise ChannelError("channel not initialised: call init() first")
        trusted = self._root(1)
        try:
            trusted.signed.verify_delegate(ROOT, trusted.signed_bytes, trusted.signatures)
        except tuf_exc.UnsignedMetadataError as exc:
            raise VerificationError("1.root.json is not signed by its root keys") from exc
        version = 1
        while version + 1 in present[ROOT]:
            try:
                nxt = self._root(version + 1)
            except VerificationError as exc:
                logger.warning("channel: root chain stops at v%d: %s", version, exc)
                break
            result = nxt.signed.get_root_verification_result(
                trusted.signed, nxt.signed_bytes, nxt.signatures
            )
            if not result:  # needs both: the previous root's threshold and its own
                logger.warning(
                    "channel: %d.root.json is not signed by root v%d and itself: ignored",
                    version + 1,
                    version,
                )
                break
            trusted, version = nxt, version + 1
        return trusted

    def _verified(
        self, state_root: Metadata[Root], role: str, filename: str, kind: type[S]
    ) -> tuple[bytes, Metadata[S]]:
        """Load ``filename`` and check ``role``'s threshold under the newest root.

        The server re-signs what it loads, so it must never build on bytes someone else
        wrote into the bucket: bucket write access is not signing power.
        """
        data, md = self._get_metadata(filename)
        if not isinstance(md.signed, kind):
            raise VerificationError(f"{filename} holds {md.signed.type}, expected {role}")
        root = state_root.signed
        if root.get_verification_result(role, md.signed_bytes, md.signatures):
            return data, cast(Metadata[S], md)
        raise VerificationError(
            f"channel metadata {filename} in the bucket is not signed by the {role} key "
            f"of root v{root.version}: refusing to build on it"
        )

    def _load(self) -> _State:
        """Read and verify the current channel state from the bucket."""
        present = self._present()
        root = self._latest_root(present)
        self._check_online_keys(root.signed)
        floor = 0
        try:
            _, ts = self._verified(root, TIMESTAMP, "timestamp.json", Timestamp)
        except (NoSuchKey, VerificationError) as exc:
            logger.warning("channel: timestamp.json unusable (%s); re-issuing it", exc)
            ts = Metadata(Timestamp(expires=self._expires(TIMESTAMP)))
            floor = int(self.clock().timestamp())
        # The newest snapshot we can verify wins: a stale timestamp.json (torn write or
        # a replay into the bucket) must not make us fork from an old state.
        snapshot: Metadata[Snapshot] | None = None
        for version in sorted(present[SNAPSHOT], reverse=True):
            try:
                _, snapshot = self._verified(root, SNAPSHOT, f"{version}.snapshot.json", Snapshot)
                break
            except VerificationError as exc:
                logger.warning("channel: skipping %d.snapshot.json: %s", version, exc)
        if snapshot is None:
            raise ChannelError("channel has no valid snapshot metadata: call init()")
        if snapshot.signed.version > ts.signed.snapshot_meta.version and not floor:
            logger.warning(
                "channel: timestamp.json names snapshot v%d but v%d exists; re-issuing",
                ts.signed.snapshot_meta.version,
                snapshot.signed.version,
            )
            floor = int(self.clock().timestamp())
        tmeta = snapshot.signed.meta.get(f"{TARGETS}.json")
        if tmeta is None:
            raise VerificationError("snapshot metadata does not list targets.json")
        tdata, targets = self._verified(root, TARGETS, f"{tmeta.version}.targets.json", Targets)
        try:
            tmeta.verify_length_and_hashes(tdata)
        except tuf_exc.LengthOrHashMismatchError as exc:
            raise VerificationError(
                f"{tmeta.version}.targets.json does not match snapshot"
            ) from exc
        return _State(root, targets, snapshot, ts, present, floor, {TIMESTAMP} if floor else set())

    def _check_online_keys(self, root: Root) -> None:
        if self._keys is None:  # read-only: nothing will be signed with these keys
            return
        for role in ONLINE_ROLES:
            keyid = _keyid(self.keys.online(role))
            if keyid in root.roles[role].keyids:
                continue
            staged = self.keys.staged(role)
            if staged is not None and _keyid(staged) in root.roles[role].keyids:
                logger.warning("channel: finishing an interrupted %s key rotation", role)
                self.keys.replace_online(role, staged)
            else:
                raise ChannelError(
                    f"the {role} key {keyid[:16]} is not trusted by root v{root.version}: "
                    "wrong keys directory, or finish the rotation with rotate_online_key()"
                )

    def _put_metadata(self, filename: str, data: bytes, *, if_absent: bool = False) -> None:
        self.store.put(self.layout.metadata_key(filename), data, if_absent=if_absent)

    def _write_root(
        self,
        state: _State,
        root: Root,
        old_signers: Sequence[CryptoSigner],
        new_signers: Sequence[CryptoSigner],
    ) -> None:
        """Sign ``root`` as N+1 with old and new root keys; refuse it unless both verify."""
        old = state.root.signed
        root.version = old.version + 1  # the chain: N+1 follows the newest verified root
        root.expires = self._expires(ROOT)
        md = Metadata(root)
        seen: set[str] = set()
        for signer in [*old_signers, *new_signers]:
            keyid = _keyid(signer)
            if keyid not in seen and (
                keyid in old.roles[ROOT].keyids or keyid in root.roles[ROOT].keyids
            ):
                md.sign(signer, append=True)
                seen.add(keyid)
        result = root.get_root_verification_result(old, md.signed_bytes, md.signatures)
        if not result:
            raise ChannelError(
                f"root v{root.version} would not verify: it needs {old.roles[ROOT].threshold} "
                f"signatures from root v{old.version}'s keys and "
                f"{root.roles[ROOT].threshold} from its own"
            )
        name = f"{root.version}.root.json"
        try:
            self._put_metadata(name, md.to_bytes(), if_absent=True)
        except ObjectExists:
            # The chain walk ignored what is there (bucket junk, a forged root), unless
            # another rotation has written a verified one since we loaded: then refuse.
            if self._latest_root(self._present()).signed.version >= root.version:
                raise ChannelError(f"another rotation wrote root v{root.version} first") from None
            logger.warning("channel: %s held a root the chain does not sign; replaced", name)
            self._put_metadata(name, md.to_bytes())
        state.present[ROOT].add(root.version)
        logger.info("channel: wrote root v%d", root.version)

    def _commit(
        self,
        state: _State,
        *,
        targets: bool = False,
        snapshot: bool = False,
        cosign: Mapping[str, CryptoSigner] | None = None,
    ) -> None:
        """Re-sign targets (optionally), snapshot (if needed) and timestamp; write in order.

        ``cosign`` adds a second signature per role (a key about to replace the current one).
        """
        cosign = cosign or {}

        def sign(md: Metadata[Any], role: str) -> bytes:
            md.sign(self.keys.online(role))
            if role in cosign:
                md.sign(cosign[role], append=True)
            return md.to_bytes()

        if targets:
            tgt = state.targets.signed
            tgt.version = state.next_version(TARGETS, tgt.version)
            tgt.expires = self._expires(TARGETS)
            data = sign(state.targets, TARGETS)
            self._put_metadata(f"{tgt.version}.targets.json", data, if_absent=True)
            state.snapshot.signed.meta[f"{TARGETS}.json"] = MetaFile.from_data(
                tgt.version, data, [HASH_ALGORITHM]
            )
            snapshot = True
        if snapshot:
            snap = state.snapshot.signed
            snap.version = state.next_version(SNAPSHOT, snap.version)
            snap.expires = self._expires(SNAPSHOT)
            data = sign(state.snapshot, SNAPSHOT)
            self._put_metadata(f"{snap.version}.snapshot.json", data, if_absent=True)
            state.timestamp.signed.snapshot_meta = MetaFile.from_data(
                snap.version, data, [HASH_ALGORITHM]
            )
        elif state.timestamp.signed.snapshot_meta.version != state.snapshot.signed.version:
            data = self.store.get(
                self.layout.metadata_key(f"{state.snapshot.signed.version}.snapshot.json")
            )
            state.timestamp.signed.snapshot_meta = MetaFile.from_data(
                state.snapshot.signed.version, data, [HASH_ALGORITHM]
            )
        ts = state.timestamp.signed
        ts.version = max(state.next_version(TIMESTAMP, ts.version), state.timestamp_floor)
        ts.expires = self._expires(TIMESTAMP)
        self._put_metadata("timestamp.json", sign(state.timestamp, TIMESTAMP))
        state.timestamp_floor = 0


def published_versions(targets: Targets) -> tuple[int, ...]:
    """Versions whose manifest the signed targets list, oldest first."""
    return tuple(
        sorted(int(path[1:9]) for path in targets.targets if re.fullmatch(r"v\d{8}\.json", path))
    )


def _active_from(targets: Targets) -> int | None:
    info = targets.targets.get(ACTIVE_TARGET)
    return custom_version(info) if info is not None else None

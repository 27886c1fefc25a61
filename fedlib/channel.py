"""The model channel devices trust: TUF roles over our object store.

Why TUF and not a signed pointer: a signature alone does not stop an attacker (or a
stale mirror) from serving yesterday's correctly signed files, freezing a device on an
old model, mixing files of two versions or feeding it endless data. TUF's four roles
answer exactly those: versions that only go up (rollback), expiry on every role
(freeze), a snapshot of all metadata versions (mix-and-match), lengths and hashes for
every file (endless data, tampering), and a root of threshold-signed offline keys that
can rotate every other key, itself included.

The repository side uses python-tuf's Metadata API; the device side is
:class:`tuf.ngclient.Updater` with :class:`StoreFetcher`, which reads from an
:class:`~fedlib.store.ObjectStore` (S3 in the fleet, a directory on air-gapped sites).

Layout in the models bucket (consistent snapshots, prefixes configurable)::

    tuf/metadata/1.root.json             root v1 (2-of-3 offline root keys by default)
    tuf/metadata/2.root.json             after a rotation: signed by old *and* new root
    tuf/metadata/7.targets.json          targets v7 (online key)
    tuf/metadata/7.snapshot.json         snapshot v7 (online key)
    tuf/metadata/timestamp.json          the only mutable object (online key)
    tuf/targets/v00000002/<sha256>.model.onnx   package files, hash-prefixed
    tuf/targets/<sha256>.v00000002.json  the version's manifest (names, lengths, custom)
    tuf/targets/<sha256>.active.json     the active marker: {"version": 2}

Target paths (what targets metadata lists): ``v{version:08d}/<name>`` for each file,
``v{version:08d}.json`` for the version's manifest and ``active.json`` for the active
version. The file list and the package's custom info (``version``, ``rollback_of``...)
are in the signed ``custom`` field of the targets, so a device learns them through TUF
without trusting any unsigned byte.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from fedlib.errors import FedError, StoreError, VerificationError
from fedlib.store import LocalStore, NoSuchKey, ObjectStore, ObjectTooLarge, atomic_write
from fedlib.store import validate_key as _validate_key

__all__ = [
    "ACTIVE_TARGET",
    "ONLINE_ROLES",
    "ChannelClient",
    "ChannelError",
    "ChannelKeys",
    "ChannelLayout",
    "ChannelRepository",
    "ChannelStatus",
    "ChannelVerificationError",
    "Expiry",
    "StoreFetcher",
    "generate_signer",
    "manifest_path",
    "target_path",
]

logger = logging.getLogger(__name__)

ROOT, TARGETS, SNAPSHOT, TIMESTAMP = "root", "targets", "snapshot", "timestamp"
ONLINE_ROLES: Final = (TARGETS, SNAPSHOT, TIMESTAMP)
ACTIVE_TARGET: Final = "active.json"
HASH_ALGORITHM: Final = "sha256"
DEFAULT_ROOT_KEYS: Final = 3
DEFAULT_ROOT_THRESHOLD: Final = 2
# A name is one path segment that is the same key on S3 and on disk.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSIONED_RE = re.compile(r"^([1-9][0-9]{0,18})\.(root|targets|snapshot)\.json$")
_RESERVED_CUSTOM = frozenset({"version", "files"})
_KEY_SCHEMES: Final = ("ed25519", "ecdsa")

S = TypeVar("S", bound=Signed)


AIRGAP_TIMESTAMP_FIELD = "x-fedlib-airgap"  # set by fedlib.airgap on bundle timestamps


class ChannelError(FedError):
    """The repository refused an operation (e.g. a version that does not go up)."""


class ChannelVerificationError(VerificationError):
    """The device refused channel data; ``reason`` is a short machine-readable code.

    Reasons: ``rollback``, ``expired``, ``unsigned``, ``mismatch``, ``malformed``,
    ``unlisted``, ``refused``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Expiry:
    """How long each role's signature stays valid; short online roles bound a freeze."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        return cast(timedelta, getattr(self, role))


@dataclass(frozen=True)
class ChannelLayout:
    """Where metadata and targets live in the bucket; repository and devices must agree."""

    metadata_prefix: str = "tuf/metadata/"
    targets_prefix: str = "tuf/targets/"

    def __post_init__(self) -> None:
        for prefix in (self.metadata_prefix, self.targets_prefix):
            if not prefix.endswith("/"):
                raise ValueError(f"channel prefix {prefix!r} must end with '/'")
            _validate_key(prefix.rstrip("/"))
        if self.metadata_prefix.startswith(self.targets_prefix) or self.targets_prefix.startswith(
            self.metadata_prefix
        ):
            raise ValueError("metadata and targets prefixes must not contain each other")

    def metadata_key(self, filename: str) -> str:
        return self.metadata_prefix + filename

    def target_key(self, info: TargetFile) -> str:
        """The hash-prefixed object key ngclient asks for under consistent snapshots."""
        return self.targets_prefix + info.get_prefixed_paths()[0]


def target_path(version: int, name: str) -> str:
    """The TUF target path of one package file."""
    return f"v{version:08d}/{name}"


def manifest_path(version: int) -> str:
    """The TUF target path of a version's manifest."""
    return f"v{version:08d}.json"


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- keys


def generate_signer(scheme: str = "ed25519") -> CryptoSigner:
    """A fresh signing key: ``ed25519`` (default) or ``ecdsa`` (P-256)."""
    if scheme == "ed25519":
        return CryptoSigner.generate_ed25519()
    if scheme in ("ecdsa", "ecdsa-sha2-nistp256"):
        return CryptoSigner.generate_ecdsa()
    raise ValueError(f"unsupported key scheme {scheme!r}; use one of {_KEY_SCHEMES}")


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


# --------------------------------------------------------------------------- repository


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
        clock: Callable[[], datetime] = _utcnow,
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
            raise ValueError(f"custom must not set {sorted(_RESERVED_CUSTOM)} (got {extra})")
        extra["version"] = version
        entries: dict[str, tuple[TargetFile, bytes]] = {}
        for name, data in files.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ValueError(f"file name {name!r} must match {_NAME_RE.pattern}")
            info = TargetFile.from_data(target_path(version, name), data, [HASH_ALGORITHM])
            info.unrecognized_fields["custom"] = dict(extra)
            entries[info.path] = (info, bytes(data))
        manifest = _canonical_json(
            {
                "version": version,
                "files": {
                    name: {"length": len(data), HASH_ALGORITHM: _sha256(data)}
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
        marker = _canonical_json({"version": version})
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
        if path == ACTIVE_TARGET or re.match(r"v\d{8}[./]", path) or not _NAME_RE.match(path):
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

    def status(self) -> ChannelStatus:
        """The verified state of the channel, for the operator's page and the logs."""
        state = self._load()
        tgt = state.targets.signed
        versions = sorted(
            int(path[1:9]) for path in tgt.targets if re.fullmatch(r"v\d{8}\.json", path)
        )
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
            match = _VERSIONED_RE.match(obj.key[len(prefix) :])
            if match:
                present[match.group(2)].add(int(match.group(1)))
        return present

    def _get_metadata(self, filename: str) -> tuple[bytes, Metadata[Any]]:
        data = self.store.get(self.layout.metadata_key(filename))
        try:
            return data, Metadata.from_bytes(data)
        except tuf_exc.RepositoryError as exc:
            raise VerificationError(f"channel metadata {filename} is malformed: {exc}") from exc

    def _latest_root(self, present: dict[str, set[int]]) -> Metadata[Root]:
        if not present[ROOT]:
            raise ChannelError("channel not initialised: call init() first")
        version = max(present[ROOT])
        _, md = self._get_metadata(f"{version}.root.json")
        root = md.signed
        if not isinstance(root, Root) or root.version != version:
            raise VerificationError(f"{version}.root.json is not root version {version}")
        try:
            root.verify_delegate(ROOT, md.signed_bytes, md.signatures)
        except tuf_exc.UnsignedMetadataError as exc:
            raise VerificationError(f"{version}.root.json is not signed by its root keys") from exc
        return cast(Metadata[Root], md)

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
        root.version = max(old.version, max(state.present[ROOT], default=0)) + 1
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
        self._put_metadata(f"{root.version}.root.json", md.to_bytes(), if_absent=True)
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


def _active_from(targets: Targets) -> int | None:
    info = targets.targets.get(ACTIVE_TARGET)
    return _custom_version(info) if info is not None else None


def _custom_version(info: TargetFile) -> int:
    custom = info.custom
    version = custom.get("version") if isinstance(custom, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ChannelVerificationError(
            "malformed", f"target {info.path!r} carries no valid version in its custom field"
        )
    return version


# --------------------------------------------------------------------------- device side


STORE_URL_PREFIX: Final = "store:///"


class _BadChannelKey(tuf_exc.DownloadError):
    """A URL that maps to no valid channel object: a refusal, not an outage."""


class StoreFetcher(FetcherInterface):
    """ngclient's transport over an :class:`ObjectStore`, reading at most what TUF allows.

    ngclient asks for ``store:///<key>`` with the length it is prepared to accept
    (from signed metadata, or its fixed caps for timestamp/root). The store refuses a
    longer object from its size before reading the body, so endless data is cut off
    at the first response, not after buffering it.
    """

    def __init__(
        self,
        store: ObjectStore,
        allowed_prefixes: Sequence[str],
        *,
        max_object_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.max_object_bytes = max_object_bytes

    def key_for(self, url: str) -> str:
        """Map ngclient's URL to an object key inside the channel's prefixes only."""
        if not url.startswith(STORE_URL_PREFIX):
            raise tuf_exc.DownloadError(f"not a channel URL: {url!r}")
        key = url[len(STORE_URL_PREFIX) :]
        try:
            _validate_key(key)
        except ValueError as exc:
            raise _BadChannelKey(f"bad channel key in {url!r}: {exc}") from exc
        if not key.startswith(self.allowed_prefixes):
            raise _BadChannelKey(f"{key!r} is outside the channel prefixes")
        return key

    def _get(self, url: str, max_length: int) -> bytes:
        key = self.key_for(url)
        try:
            return self.store.get(key, max_bytes=max_length)
        except ObjectTooLarge as exc:
            raise tuf_exc.DownloadLengthMismatchError(
                f"{key}: {exc.size} bytes exceed the {max_length} allowed"
            ) from exc
        except NoSuchKey as exc:
            # ngclient ends the root walk on 404: the newest root was reached.
            raise tuf_exc.DownloadHTTPError(f"{key} not found", 404) from exc
        except StoreError as exc:
            raise tuf_exc.DownloadError(f"{key}: {exc}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        """The interface's unbounded path; still capped, at ``max_object_bytes``."""
        yield self._get(url, self.max_object_bytes)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Overridden so the cap reaches the store (the base class only sees chunks)."""
        data = self._get(url, max_length)
        with tempfile.TemporaryFile() as fh:
            fh.write(data)
            fh.seek(0)
            yield fh


@contextlib.contextmanager
def _refusals(action: str) -> Iterator[None]:
    """Turn ngclient's exceptions into fedlib's: VerificationError vs StoreError."""
    try:
        yield
    except tuf_exc.DownloadLengthMismatchError as exc:
        raise ChannelVerificationError(
            "mismatch",
            f"{action}: length or hash mismatch: the object is longer than its signed "
            f"length (endless data refused): {exc}",
        ) from exc
    except tuf_exc.DownloadHTTPError as exc:
        cause = exc.__cause__
        if isinstance(cause, NoSuchKey):
            raise NoSuchKey(cause.key, f"{action}: missing from the channel") from exc
        raise StoreError(f"{action}: {exc}") from exc
    except _BadChannelKey as exc:  # signed metadata naming an impossible object: refuse it
        raise ChannelVerificationError("malformed", f"{action}: {exc}") from exc
    except tuf_exc.DownloadError as exc:
        raise StoreError(f"{action}: channel store unreachable: {exc.__cause__ or exc}") from exc
    except tuf_exc.BadVersionNumberError as exc:
        raise ChannelVerificationError(
            "rollback", f"{action}: replayed older version refused (rollback): {exc}"
        ) from exc
    except tuf_exc.ExpiredMetadataError as exc:
        raise ChannelVerificationError(
            "expired", f"{action}: metadata expired (frozen or stale channel): {exc}"
        ) from exc
    except tuf_exc.UnsignedMetadataError as exc:
        raise ChannelVerificationError(
            "unsigned", f"{action}: unsigned by a trusted key: {exc}"
        ) from exc
    except tuf_exc.LengthOrHashMismatchError as exc:
        raise ChannelVerificationError(
            "mismatch", f"{action}: length or hash mismatch: {exc}"
        ) from exc
    except tuf_exc.RepositoryError as exc:
        raise ChannelVerificationError(
            "refused", f"{action}: channel metadata refused: {exc}"
        ) from exc


class ChannelClient:
    """The device side: ngclient's verified workflow over our store, a pinned root.

    ``trusted_root`` is the root.json shipped in the device config: the only thing the
    device trusts up front. ``metadata_dir`` keeps the last verified metadata, which is
    what makes a later replay of older metadata detectable; ``targets_dir`` caches
    verified files so unchanged ones are not downloaded twice.
    """

    def __init__(
        self,
        store_or_dir: ObjectStore | str | os.PathLike[str],
        metadata_dir: str | os.PathLike[str],
        targets_dir: str | os.PathLike[str],
        trusted_root: bytes,
        *,
        layout: ChannelLayout | None = None,
        config: UpdaterConfig | None = None,
        allow_airgap_timestamp: bool = False,
    ) -> None:
        self.allow_airgap_timestamp = allow_airgap_timestamp
        if isinstance(store_or_dir, str | os.PathLike):
            self.store: ObjectStore = LocalStore(store_or_dir, create=False)
        else:
            self.store = store_or_dir
        self.layout = layout or ChannelLayout()
        self.metadata_dir = Path(metadata_dir)
        self.targets_dir = Path(targets_dir)
        self.trusted_root = bytes(trusted_root)
        self.config = config or UpdaterConfig()
        self.fetcher = StoreFetcher(
            self.store, (self.layout.metadata_prefix, self.layout.targets_prefix)
        )
        self._updater: Updater | None = None

    def _new_updater(self) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        with _refusals("load pinned root"):
            return Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=STORE_URL_PREFIX + self.layout.metadata_prefix,
                target_dir=str(self.targets_dir),
                target_base_url=STORE_URL_PREFIX + self.layout.targets_prefix,
                fetcher=self.fetcher,
                config=self.config,
                bootstrap=self.trusted_root,
            )

    def refresh(self) -> None:
        """Fetch and verify root (walking rotations), timestamp, snapshot and targets.

        On refusal the previously verified metadata stays in ``metadata_dir``, so the
        device keeps trusting what it had (and keeps running its current model).
        """
        self._updater = None
        updater = self._new_updater()
        with _refusals("refresh channel"):
            updater.refresh()
        if not self.allow_airgap_timestamp:
            # a bundle's long-lived timestamp copied into a live bucket must not hold
            # online devices on an old state for weeks
            timestamp = Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))
            if AIRGAP_TIMESTAMP_FIELD in timestamp.signed.unrecognized_fields:
                raise ChannelVerificationError(
                    "refused", "the live channel serves an air-gap bundle's timestamp"
                )
        self._updater = updater

    def _refreshed(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def _info(self, path: str) -> TargetFile | None:
        with _refusals(f"look up {path}"):
            return self._refreshed().get_targetinfo(path)

    @property
    def root_version(self) -> int:
        """The version of the newest root this device has verified."""
        md = Metadata[Root].from_file(str(self.metadata_dir / "root.json"))
        return md.signed.version

    def active_version(self) -> int | None:
        """The active model version according to verified targets metadata (None: none)."""
        info = self._info(ACTIVE_TARGET)
        return None if info is None else _custom_version(info)

    def package_info(self, version: int) -> dict[str, Any]:
        """The signed custom info of ``version`` (``version``, ``files``, ``rollback_of``...)."""
        info = self._info(manifest_path(version))
        if info is None:
            raise ChannelVerificationError(
                "unlisted", f"version {version} is not in the signed channel"
            )
        if _custom_version(info) != version or not _valid_names(info.custom.get("files")):
            raise ChannelVerificationError(
                "malformed", f"manifest of version {version} has an invalid custom field"
            )
        return dict(info.custom)

    def download(self, version: int) -> dict[str, bytes]:
        """Exactly the files of ``version``, each checked against signed length and hash."""
        names = self.package_info(version)["files"]
        return {name: self.fetch_target(target_path(version, name)) for name in names}

    def download_active(self) -> tuple[int, dict[str, bytes]]:
        """The active version and its files."""
        version = self.active_version()
        if version is None:
            raise ChannelVerificationError("unlisted", "the channel has no active version yet")
        return version, self.download(version)

    def optional_target(self, path: str) -> bytes | None:
        """A target that may not be published (yet): None when signed metadata omits it."""
        return None if self._info(path) is None else self.fetch_target(path)

    def fetch_target(self, path: str) -> bytes:
        """One target by its TUF path; anything not listed in signed metadata is refused."""
        info = self._info(path)
        if info is None:
            raise ChannelVerificationError(
                "unlisted", f"{path!r} is not listed in the signed targets metadata"
            )
        updater = self._refreshed()
        with _refusals(f"download {path}"):
            local = updater.find_cached_target(info) or updater.download_target(info)
            data = Path(local).read_bytes()
            info.verify_length_and_hashes(data)  # the cache is ours, but disks rot
        return data


def _valid_names(names: Any) -> bool:
    return (
        isinstance(names, list)
        and bool(names)
        and all(isinstance(n, str) and _NAME_RE.match(n) for n in names)
    )

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
:class:`~fedlib.storage.store.ObjectStore` (S3 in the fleet, a directory on air-gapped sites).

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

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar, cast

from tuf.api.metadata import Root, Snapshot, TargetFile, Targets, Timestamp

from fedlib.errors import FedError, VerificationError
from fedlib.storage.store import validate_key as _validate_key

logger = logging.getLogger(__name__)

ROOT, TARGETS, SNAPSHOT, TIMESTAMP = "root", "targets", "snapshot", "timestamp"
ONLINE_ROLES: Final = (TARGETS, SNAPSHOT, TIMESTAMP)
ACTIVE_TARGET: Final = "active.json"
HASH_ALGORITHM: Final = "sha256"
DEFAULT_ROOT_KEYS: Final = 3
DEFAULT_ROOT_THRESHOLD: Final = 2
# A name is one path segment that is the same key on S3 and on disk.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSIONED_RE = re.compile(r"^([1-9][0-9]{0,18})\.(root|targets|snapshot)\.json$")
RESERVED_CUSTOM = frozenset({"version", "files"})
KEY_SCHEMES: Final = ("ed25519", "ecdsa")

#: A role's signed part, constrained as python-tuf's ``Metadata[T]`` is.
S = TypeVar("S", Root, Timestamp, Snapshot, Targets)


AIRGAP_TIMESTAMP_FIELD = "x-fedlib-airgap"  # set by fedlib.trust.airgap on bundle timestamps


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


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- keys


# --------------------------------------------------------------------------- repository


# --------------------------------------------------------------------------- device side
def custom_version(info: TargetFile) -> int:
    custom = info.custom
    version = custom.get("version") if isinstance(custom, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ChannelVerificationError(
            "malformed", f"target {info.path!r} carries no valid version in its custom field"
        )
    return version

"""Air-gap bundles: one file that carries a signed model version to a site with no network.

An operator exports a bundle for one version of the TUF model channel
(:mod:`fedlib.trust.channel_layout`); someone carries it by hand; on the site a device verifies it
offline, with nothing but what it already pins (the channel's root and the
package-signing key), and only then installs it. The device never trusts the bundle
as such: the tar file and its ``manifest.json`` are packaging; trust comes from the
same TUF client the fleet uses online
(:class:`~fedlib.trust.channel_client.ChannelClient`, here over a
:class:`~fedlib.storage.store.LocalStore` of the unpacked bundle) plus the OpenSSF
model signature of the package (:mod:`fedlib.crypto.signing`).

Layout (an uncompressed or gzip'd POSIX tar, members in this order, every member a
regular file, fixed mtime/uid/gid/mode, so the same inputs give the same bytes)::

    README.txt                          what this is and how to verify/install it
    manifest.json                       index: SHA-256 and length of every other member,
                                        version, active, created, expires, root_version
    metadata/1.root.json ... N.root.json  every root, so a device pinned to any older
                                        root can walk the rotation chain to N
    metadata/<t>.targets.json           the channel's targets metadata
    metadata/<s>.snapshot.json          snapshot (re-signed for the bundle, see below)
    metadata/timestamp.json             timestamp (re-signed for the bundle, see below)
    targets/v0000000V/<sha256>.<name>   the version's package files (model.onnx,
                                        weights.bin, metadata.json, signature.bin)
    targets/<sha256>.v0000000V.json     the version's manifest target
    targets/<sha256>.active.json        the active marker, if the version is active

Paths below ``metadata/`` and ``targets/`` are exactly the channel's consistent-snapshot
object keys (:data:`BUNDLE_LAYOUT`), so the unpacked bundle *is* a tiny TUF repository.

Freshness. Online, the timestamp expires after a day and the snapshot after a week:
far too short to carry by hand. The exporter therefore re-signs, for the bundle only,
the snapshot and timestamp (and targets, if it would expire first) with the channel's
*online* keys and an expiry of ``created + expires_in_days``; the timestamp also carries
a signed ``x-fedlib-airgap`` field naming the bundle's version, created and expires
times, which the verifier compares with ``manifest.json``. Nothing of this is written
back to the channel. On the device, ngclient runs unmodified: the pinned root, the root
walk, signature thresholds, version checks, lengths and hashes of every file and the
expiry of every role all hold as online; the verifier adds an explicit check of every
expiry against its own ``now`` (which can only make the check stricter).

Trade-off: a bundle's timestamp lives ``expires_in_days`` rather than one day, so
whoever holds a bundle can freeze a device on that (validly signed) state for that long
-- inherent to carrying state by hand, and bounded by the requested days and by root's
expiry (root stays offline and is never re-signed here). The re-signed metadata keeps
the live version numbers, so it is a bundle-scoped fork of the live timestamp: online
devices that have seen that version keep theirs, and the signed ``x-fedlib-airgap``
field makes such a timestamp recognisable should one end up in a live bucket.
Without the online keys (``repository=None``) the bundle carries the live metadata
verbatim, and the export is refused if that expires before the requested days.
Replay of an *older* bundle is stopped by the device's installed version
(``installed_version``), not by TUF state, because each verification starts from the
pinned root alone.

Bounded memory. A device may be small and the bundle hostile, so the verifier never
holds the bundle: it streams it (gzip inflated chunk by chunk, each member copied to a
file under the work directory while hashed), enforces the size limits from headers and
as bytes arrive, and runs the TUF and signature checks over those files. Measured in
``tests/test_airgap.py``: a gzip bomb costs the device well under 64 MB of RSS.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

from tuf.api.metadata import Metadata, Root, Targets

from fedlib.crypto.pq_signing import PackageKey
from fedlib.errors import StoreError, VerificationError
from fedlib.storage.store import LocalStore, NoSuchKey
from fedlib.trust.channel_client import ChannelClient
from fedlib.trust.channel_layout import (
    ACTIVE_TARGET,
    AIRGAP_TIMESTAMP_FIELD,
    ChannelLayout,
    ChannelVerificationError,
    manifest_path,
    target_path,
)
from fedlib.wire.protocol import strict_json

BUNDLE_FORMAT: Final = "fedlib-airgap-bundle/1"
BUNDLE_LAYOUT: Final = ChannelLayout(metadata_prefix="metadata/", targets_prefix="targets/")
MANIFEST: Final = "manifest.json"
README: Final = "README.txt"
MARKER_FIELD: Final = AIRGAP_TIMESTAMP_FIELD
DEFAULT_MAX_BUNDLE_BYTES: Final = 512 * 1024 * 1024
MAX_MEMBERS: Final = 1024
MAX_MANIFEST_BYTES: Final = 1024 * 1024
MAX_MANIFEST_DEPTH: Final = 8
TAR_RECORD: Final = tarfile.RECORDSIZE  # 10240: what tar(1) and Python pad archives to
_END_OF_ARCHIVE: Final = 2 * tarfile.BLOCKSIZE
# Most zero bytes a tar writer leaves after the last member: the end marker, then
# padding to a whole record. More is refused as it arrives (a bomb of zeros).
MAX_TAIL_BYTES: Final = _END_OF_ARCHIVE + TAR_RECORD
CHUNK_BYTES: Final = 64 * 1024  # members are copied to disk this much at a time
# The largest single read tarfile may make: a PAX or GNU long-name header is read whole.
MAX_READ_BYTES: Final = 1024 * 1024
_REPLAY_BYTES: Final = 2 * tarfile.BLOCKSIZE
FILE_MODE: Final = 0o644
ROLES: Final = ("root", "timestamp", "snapshot", "targets")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_ROOT_NAME = re.compile(r"metadata/([1-9][0-9]{0,18})\.root\.json")
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_MANIFEST_FIELDS: Final = frozenset(
    {"format", "version", "active", "created", "expires", "root_version", "package", "files"}
)

# Reasons a device refuses a bundle (``BundleVerificationError.reason``).
REASONS: Final = frozenset(
    {
        "too_large",  # over max_bundle_bytes, or more members than MAX_MEMBERS
        "truncated",  # cut short: not whole tar records, no end marker, gzip cut off
        "malformed",  # not our tar/manifest format
        "unsafe",  # absolute path, '..', link, device, directory, duplicate name
        "tampered",  # a byte differs from manifest.json or from signed metadata
        "incomplete",  # a file the signed metadata needs is missing, or an extra one
        "unsigned",  # metadata not signed by the pinned root's keys (other channel?)
        "expired",
        "rollback",  # TUF: a role's version went down along the root chain
        "unlisted",  # the version is not in the signed targets
        "refused",  # any other TUF refusal
        "older",  # not newer than the installed version
        "signature",  # OpenSSF package signature not made by a pinned key
    }
)


class BundleVerificationError(VerificationError):
    """A device refused an air-gap bundle; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bundle refusal reason {reason!r}")
        super().__init__(f"air-gap bundle refused ({reason}): {message}")
        self.reason = reason


@dataclass(frozen=True)
class BundleInfo:
    """What an export produced, for the operator's page and the export DAG's log."""

    version: int
    active: bool
    created: datetime
    expires: datetime
    root_version: int
    members: tuple[str, ...]
    sha256: str
    size: int
    resigned: tuple[str, ...]
    compressed: bool

    @property
    def filename(self) -> str:
        """A suggested file name: version and creation time, ``.tar`` or ``.tar.gz``."""
        suffix = ".tar.gz" if self.compressed else ".tar"
        return f"fl-bundle-v{self.version:08d}-{self.created:%Y%m%dT%H%M%SZ}{suffix}"


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check; ``files`` are the package files to install.

    ``root``/``root_version`` are the newest channel root the bundle proved through the
    device's pinned one: a device may re-pin to it. ``package`` is the version's signed
    custom info (``version``, ``files``, ``rollback_of``...); ``digests`` the SHA-256 per
    file that the OpenSSF signature covers.
    """

    version: int
    files: dict[str, bytes]
    active: bool
    created: datetime
    expires: datetime
    root_version: int
    root: bytes
    package: dict[str, Any]
    digests: dict[str, str] = field(default_factory=dict)
    bundle_sha256: str = ""


# --------------------------------------------------------------------------- export


# --------------------------------------------------------------------------- verify


def verify_bundle(
    bundle: bytes | Path,
    *,
    trusted_root: bytes,
    trusted_package_keys: Mapping[str, PackageKey],
    installed_version: int | None,
    workdir: Path,
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    now: datetime | None = None,
) -> VerifiedBundle:
    """Verify a bundle offline; return its files only if every check passes.

    Checks, in order: size caps; a safe tar (regular files with canonical relative names
    only, no duplicates, at most :data:`MAX_MEMBERS`, complete); every member against
    ``manifest.json``; then, unpacked in a fresh directory under ``workdir`` (removed
    afterwards), the TUF client from the pinned ``trusted_root`` alone (root walk,
    signatures, versions, expiry); the manifest's claims against signed metadata; the
    members are exactly what the signed metadata names; every expiry against ``now``
    (default and floor: the system clock, so ``now`` can only tighten); the version is
    newer than ``installed_version``; the files' signed lengths and hashes; the OpenSSF
    signature with ``trusted_package_keys``. Raises :class:`BundleVerificationError`
    saying why otherwise. Installs nothing.

    Memory stays bounded whatever the bundle holds or claims (a gzip bomb, a huge
    declared size): the bundle is read once, inflated and copied member by member to
    ``workdir`` in small chunks while hashed, and every limit holds as bytes arrive
    (:func:`_spool_bundle`). So ``workdir`` needs up to ``max_bundle_bytes`` free.
    """
    if not trusted_package_keys:
        raise BundleVerificationError("signature", "no trusted package-signing keys are pinned")
    return verify(
        bundle,
        trusted_root=trusted_root,
        trusted_package_keys=trusted_package_keys,
        installed_version=installed_version,
        workdir=Path(workdir),
        max_bundle_bytes=max_bundle_bytes,
        now=now,
    )


@dataclass(frozen=True)
class _Manifest:
    version: int
    active: bool
    created: datetime
    expires: datetime
    root_version: int
    package: dict[str, Any]


def verify(
    bundle: bytes | Path,
    *,
    trusted_root: bytes,
    trusted_package_keys: Mapping[str, PackageKey] | None,
    installed_version: int | None,
    workdir: Path,
    max_bundle_bytes: int,
    now: datetime | None,
) -> VerifiedBundle:
    """The checks of :func:`verify_bundle`; ``trusted_package_keys=None`` skips OpenSSF."""
    if installed_version is not None and (
        not isinstance(installed_version, int) or isinstance(installed_version, bool)
    ):
        raise ValueError(f"installed_version must be an int or None, got {installed_version!r}")
    clock = datetime.now(UTC)
    check_time = max(clock, utc(now)) if now is not None else clock
    workdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="fl-bundle-", dir=workdir))
    try:
        spool = staging / "members"
        spool.mkdir()
        with _open_input(bundle, max_bundle_bytes) as raw:
            members = _spool_bundle(raw, max_bundle_bytes, spool)
            bundle_sha256 = raw.hexdigest()
        manifest = _check_manifest(members)
        repo_dir = staging / "channel"
        _unpack(repo_dir, members)
        client = ChannelClient(
            LocalStore(repo_dir, create=False),
            staging / "tuf" / "metadata",
            staging / "tuf" / "targets",
            trusted_root,
            layout=BUNDLE_LAYOUT,
            allow_airgap_timestamp=True,
        )
        with _refusals():
            client.refresh()
            package = client.package_info(manifest.version)
        version = manifest.version
        signed = {
            role: Metadata.from_file(str(staging / "tuf" / "metadata" / f"{role}.json"))
            for role in ROLES
        }
        with _refusals():
            active = client.active_version() == version
        pinned_version = Metadata[Root].from_bytes(trusted_root).signed.version
        _check_claims(manifest, signed, package, active, pinned_version)
        _check_members(members, signed, manifest.root_version, version, active)
        expires = min([manifest.expires, *(md.signed.expires for md in signed.values())])
        for role, md in signed.items():
            if md.signed.is_expired(check_time):
                raise BundleVerificationError(
                    "expired",
                    f"{role} metadata expired {iso(md.signed.expires)} (now "
                    f"{iso(check_time)}): ask the operator for a fresh export",
                )
        if manifest.expires <= check_time:
            raise BundleVerificationError(
                "expired",
                f"the bundle expired {iso(manifest.expires)} (now {iso(check_time)}): "
                "ask the operator for a fresh export",
            )
        if installed_version is not None and version <= installed_version:
            relation = "the same as" if version == installed_version else "older than"
            raise BundleVerificationError(
                "older",
                f"the bundle holds version {version}, {relation} the installed version "
                f"{installed_version}: versions only go up (a rollback is a new version)",
            )
        with _refusals():
            files = client.download(version)
            client.fetch_target(manifest_path(version))
            if active:
                client.fetch_target(ACTIVE_TARGET)
        digests: dict[str, str] = {}
        if trusted_package_keys is not None:
            digests = _check_package_signature(version, files, trusted_package_keys)
        root_bytes = (staging / "tuf" / "metadata" / "root.json").read_bytes()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return VerifiedBundle(
        version=version,
        files=files,
        active=active,
        created=manifest.created,
        expires=expires,
        root_version=signed["root"].signed.version,
        root=root_bytes,
        package=package,
        digests=digests,
        bundle_sha256=bundle_sha256,
    )


def _member_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be extracted, or None when it is a plain file."""
    name = info.name
    if not isinstance(name, str) or not name:
        return "a member has an empty name"
    if "\x00" in name or "\\" in name:
        return f"member {name[:80]!r} holds NUL or a backslash"
    if name.startswith("/"):
        return f"member {name[:80]!r} is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return f"member {name[:80]!r} has an empty, '.' or '..' path segment (path traversal)"
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.issparse():
        kind = (
            "a symlink"
            if info.issym()
            else "a hard link"
            if info.islnk()
            else "a device"
            if info.isdev()
            else "a directory"
            if info.isdir()
            else f"of tar type {info.type!r}"
        )
        return f"member {name[:80]!r} is {kind}: only regular files are allowed"
    return None


class _RawReader:
    """The bundle's bytes as they are read: counted, hashed, refused past ``cap``.

    Nothing is kept: the caller sees each chunk once, so memory does not grow with the
    bundle, and the SHA-256 of the whole file is ready when the last byte was read.
    """

    def __init__(self, fh: BinaryIO, cap: int, name: str) -> None:
        self._fh, self._cap, self._name = fh, cap, name
        self._hash = hashlib.sha256()
        self.count = 0
        self._head = b""
        self._head = self.read(2)  # peeked to tell gzip from tar, handed out again
        self.gzipped = self._head == b"\x1f\x8b"

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise ValueError("unbounded read of an air-gap bundle")
        head, self._head = self._head[:size], self._head[size:]
        if len(head) == size:
            return head
        try:
            data = self._fh.read(size - len(head))
        except OSError as exc:
            raise BundleVerificationError("malformed", f"cannot read {self._name}: {exc}") from None
        self.count += len(data)
        if self.count > self._cap:
            raise BundleVerificationError(
                "too_large", f"{self._name} is over {self._cap} bytes (it grew while read?)"
            )
        self._hash.update(data)
        return head + data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Never used: gzip only seeks to rewind, and the bundle is read once."""
        raise io.UnsupportedOperation("the bundle is read once, front to back")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@contextlib.contextmanager
def _open_input(bundle: bytes | Path, cap: int) -> Iterator[_RawReader]:
    """The bundle as a :class:`_RawReader`, refusing one over ``cap`` before reading it."""
    if isinstance(bundle, bytes | bytearray | memoryview):
        if len(bundle) > cap:
            raise BundleVerificationError("too_large", f"{len(bundle)} bytes, limit {cap}")
        yield _RawReader(io.BytesIO(bundle), cap, "the bundle")
        return
    try:
        fh = open(bundle, "rb")  # noqa: SIM115 - closed below, after the size check
    except OSError as exc:
        raise BundleVerificationError("malformed", f"cannot read {bundle}: {exc}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size > cap:
            raise BundleVerificationError("too_large", f"{bundle}: {size} bytes, limit {cap}")
        yield _RawReader(fh, cap, str(bundle))


class _TarStream:
    """The (decompressed) tar as ``tarfile`` reads it, one bounded read at a time.

    Forward-only, like a pipe: the bytes are never held, only counted, so inflation is
    refused at ``cap`` as the bytes arrive, and no single read (a PAX or GNU long-name
    header asks for its whole declared size at once) may exceed :data:`MAX_READ_BYTES`.
    ``seek`` may go back over the last :data:`_REPLAY_BYTES` only: enough to look again
    at the block where the archive ended.
    """

    def __init__(self, source: _RawReader | gzip.GzipFile, cap: int, compressed: bool) -> None:
        self._source, self._cap, self._compressed = source, cap, compressed
        self.pos = 0
        self._replay = b""  # bytes handed out again after a seek back
        self._recent = b""  # the last bytes handed out, for that seek back

    def read(self, size: int = -1) -> bytes:
        if not 0 <= size <= MAX_READ_BYTES:
            raise BundleVerificationError(
                "too_large",
                f"a tar header near byte {self.pos} claims {size} bytes "
                f"(limit {MAX_READ_BYTES}): a header bomb",
            )
        parts = [self._replay[:size]]
        self._replay = self._replay[size:]
        want = size - len(parts[0])
        while want > 0:
            chunk = self._source.read(min(want, CHUNK_BYTES))
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
            if self.pos + size - want > self._cap:
                what = "decompresses to" if self._compressed else "holds"
                raise BundleVerificationError("too_large", f"{what} more than {self._cap} bytes")
        data = b"".join(parts)
        self.pos += len(data)
        self._recent = (self._recent + data)[-_REPLAY_BYTES:]
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise io.UnsupportedOperation("the bundle stream seeks to absolute offsets only")
        back = self.pos - offset
        if back > len(self._recent):
            raise io.UnsupportedOperation(f"cannot seek back {back} bytes in the bundle stream")
        if back > 0:
            self._replay = self._recent[len(self._recent) - back :] + self._replay
            self._recent = self._recent[: len(self._recent) - back]
            self.pos = offset
        while self.pos < offset and self.read(min(CHUNK_BYTES, offset - self.pos)):
            pass
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes) -> int:
        raise io.UnsupportedOperation("the bundle stream is read-only")

    def close(self) -> None:
        """Nothing to release: the caller owns the source."""


@dataclass(frozen=True)
class _Member:
    """One member, copied to ``path`` on disk; its length and SHA-256 as it was copied."""

    path: Path
    length: int
    sha256: str

    def entry(self) -> dict[str, Any]:
        return {"length": self.length, "sha256": self.sha256}


def _spool_bundle(raw: _RawReader, cap: int, spool: Path) -> dict[str, _Member]:
    """Every member copied to a file in ``spool``, by name, refusing anything unsafe.

    Memory stays bounded whatever the bundle claims: gzip inflates chunk by chunk, each
    member is copied in :data:`CHUNK_BYTES` pieces while hashed, and every size limit
    (``cap`` in total and per member, :data:`MAX_MANIFEST_BYTES`, :data:`MAX_MEMBERS`,
    :data:`MAX_READ_BYTES` per header) holds from the header or as bytes arrive, never
    after inflating. A failing disk write is the device's problem, not the bundle's:
    it surfaces as the ``OSError`` it is.
    """
    gz = gzip.GzipFile(fileobj=raw, mode="rb") if raw.gzipped else None
    stream = _TarStream(gz or raw, cap, compressed=gz is not None)
    members: dict[str, _Member] = {}
    total = 0
    try:
        tar = tarfile.TarFile(fileobj=stream, mode="r")
        while (info := tar.next()) is not None:
            if len(members) >= MAX_MEMBERS:
                raise BundleVerificationError("too_large", f"more than {MAX_MEMBERS} members")
            problem = _member_problem(info)
            if problem:
                raise BundleVerificationError("unsafe", problem)
            if info.name in members:
                raise BundleVerificationError("unsafe", f"member {info.name!r} appears twice")
            if not 0 <= info.size <= cap - total:
                raise BundleVerificationError(
                    "too_large", f"member {info.name!r} would pass the {cap}-byte limit"
                )
            if info.name == MANIFEST and info.size > MAX_MANIFEST_BYTES:
                raise BundleVerificationError(
                    "too_large", f"{MANIFEST} is over {MAX_MANIFEST_BYTES} bytes"
                )
            fh = tar.extractfile(info)
            if fh is None:  # not reached: only regular files pass _member_problem
                raise BundleVerificationError("unsafe", f"member {info.name!r} has no content")
            members[info.name] = _copy_member(fh, spool / f"{len(members):05d}", info)
            total += info.size
        end = tar.offset
        _check_tail(stream, end)
        if raw.read(1):  # not reached today: gzip reads to the end of its input
            raise BundleVerificationError("malformed", "data after the end of the bundle")
    except BundleVerificationError:
        raise
    except EOFError as exc:  # gzip ran out before its end marker
        raise BundleVerificationError("truncated", f"the gzip stream is cut off: {exc}") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise BundleVerificationError("malformed", f"corrupt gzip stream: {exc}") from None
    except tarfile.ReadError as exc:
        reason = "truncated" if "end of data" in str(exc) else "malformed"
        raise BundleVerificationError(reason, f"not a complete tar file: {exc}") from None
    except (tarfile.TarError, ValueError, io.UnsupportedOperation) as exc:
        raise BundleVerificationError("malformed", f"not a valid tar file: {exc}") from None
    if not members:
        raise BundleVerificationError("malformed", "the tar file is empty")
    return members


def _copy_member(fh: IO[bytes], path: Path, info: tarfile.TarInfo) -> _Member:
    """Copy one member's declared ``info.size`` bytes to a new file, hashing as it goes."""
    digest = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o600), "wb") as out:
        left = info.size
        while left:
            chunk = fh.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise BundleVerificationError("truncated", f"member {info.name!r} is cut off")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return _Member(path=path, length=info.size, sha256=digest.hexdigest())


def _check_tail(stream: _TarStream, end: int) -> None:
    """After the last member: only the zero end marker and record padding, then EOF."""
    stream.seek(end)  # back over the block tarfile found to be no header
    tail = 0
    while chunk := stream.read(CHUNK_BYTES):
        if chunk.count(0) != len(chunk):
            raise BundleVerificationError(
                "malformed", f"unreadable data at byte {end} (a corrupted tar header?)"
            )
        tail += len(chunk)
        if tail > MAX_TAIL_BYTES:
            where = f"after the last member (byte {end})" if end else "and no member"
            raise BundleVerificationError(
                "malformed",
                f"more than {MAX_TAIL_BYTES} zero bytes {where}: not a tar writer's "
                "padding (a bomb of zeros?)",
            )
    size = end + tail
    if size < TAR_RECORD or size % TAR_RECORD:
        raise BundleVerificationError(
            "truncated", f"{size} bytes is not a whole number of {TAR_RECORD}-byte tar records"
        )
    if tail < _END_OF_ARCHIVE:
        raise BundleVerificationError("truncated", "the tar end-of-archive marker is missing")


def _check_manifest(members: Mapping[str, _Member]) -> _Manifest:
    """Parse ``manifest.json`` strictly and check every other member against it."""
    spooled = members.get(MANIFEST)
    if spooled is None:
        raise BundleVerificationError("incomplete", f"the bundle has no {MANIFEST}")
    data = spooled.path.read_bytes()  # at most MAX_MANIFEST_BYTES, checked from its header
    doc = _strict_json(data)
    if not isinstance(doc, dict) or set(doc) != _MANIFEST_FIELDS:
        raise BundleVerificationError(
            "malformed", f"{MANIFEST} must hold exactly the fields {sorted(_MANIFEST_FIELDS)}"
        )
    if doc["format"] != BUNDLE_FORMAT:
        raise BundleVerificationError(
            "malformed", f"unsupported bundle format {doc['format']!r}; expected {BUNDLE_FORMAT}"
        )
    if canonical(doc) != data:
        raise BundleVerificationError("tampered", f"{MANIFEST} is not in canonical form")
    listed = doc["files"]
    if not isinstance(listed, dict):
        raise BundleVerificationError("malformed", f"{MANIFEST}: 'files' must be an object")
    present = set(members) - {MANIFEST}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise BundleVerificationError(
            "incomplete", f"member(s) listed in {MANIFEST} are missing: {missing[:5]}"
        )
    if extra:
        raise BundleVerificationError(
            "incomplete", f"member(s) not listed in {MANIFEST}: {extra[:5]}"
        )
    for name in sorted(present):
        if listed[name] != members[name].entry():
            raise BundleVerificationError(
                "tampered",
                f"{name} does not match its SHA-256/length in {MANIFEST} "
                "(changed or corrupted in transit)",
            )
    version, root_version = doc["version"], doc["root_version"]
    for what, value in (("version", version), ("root_version", root_version)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BundleVerificationError("malformed", f"{MANIFEST}: bad {what} {value!r}")
    if not isinstance(doc["active"], bool) or not isinstance(doc["package"], dict):
        raise BundleVerificationError("malformed", f"{MANIFEST}: bad 'active' or 'package'")
    return _Manifest(
        version=version,
        active=doc["active"],
        created=_parse_time(doc["created"], "created"),
        expires=_parse_time(doc["expires"], "expires"),
        root_version=root_version,
        package=doc["package"],
    )


def _unpack(root: Path, members: Mapping[str, _Member]) -> None:
    """Move the spooled channel members into the fresh directory ``root``; nothing else."""
    root.mkdir()
    base = root.resolve()
    for name, member in members.items():
        if name in (README, MANIFEST):
            continue
        parts = name.split("/")
        shape_ok = (parts[0] == "metadata" and len(parts) == 2) or (
            parts[0] == "targets" and len(parts) in (2, 3)
        )
        if not shape_ok or not all(_SEGMENT.fullmatch(p) for p in parts):
            raise BundleVerificationError(
                "malformed", f"member {name[:80]!r} is not a bundle path (metadata/ or targets/)"
            )
        path = root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.resolve().is_relative_to(base):
            raise BundleVerificationError("unsafe", f"member {name!r} escapes the work dir")
        if path.exists() or path.is_symlink():
            raise BundleVerificationError("unsafe", f"member {name!r} is unpacked twice")
        os.rename(member.path, path)  # same file system, no copy


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The TUF client's refusals, as bundle refusals with the same reason."""
    try:
        yield
    except ChannelVerificationError as exc:
        reason = {"mismatch": "tampered", "malformed": "malformed"}.get(exc.reason, exc.reason)
        if reason not in REASONS:
            reason = "refused"
        detail = str(exc)
        if reason == "unsigned":
            detail += " (the bundle's metadata is not signed by keys of the pinned root: "
            detail += "exported from another channel, or forged)"
        raise BundleVerificationError(reason, detail) from exc
    except NoSuchKey as exc:
        raise BundleVerificationError(
            "incomplete", f"a file the signed metadata needs is not in the bundle: {exc}"
        ) from exc
    except StoreError as exc:
        raise BundleVerificationError(
            "malformed", f"cannot read the unpacked bundle: {exc}"
        ) from exc


def _check_claims(
    manifest: _Manifest,
    signed: Mapping[str, Metadata[Any]],
    package: dict[str, Any],
    active: bool,
    pinned_version: int,
) -> None:
    """``manifest.json`` is unsigned: each claim must equal what signed metadata says."""
    # The device walks from its pinned root to the bundle's newest; a device that
    # already pins a newer root than the bundle carries simply stays there.
    if max(manifest.root_version, pinned_version) != signed["root"].signed.version:
        raise BundleVerificationError(
            "tampered",
            f"{MANIFEST} says root v{manifest.root_version}, the verified root is "
            f"v{signed['root'].signed.version}",
        )
    if manifest.active != active:
        raise BundleVerificationError("tampered", f"{MANIFEST}'s 'active' disagrees with targets")
    if manifest.package != package:
        raise BundleVerificationError("tampered", f"{MANIFEST}'s 'package' disagrees with targets")
    marker = signed["timestamp"].signed.unrecognized_fields.get(MARKER_FIELD)
    if marker is None:  # verbatim export: created is informational, expires only tightens
        return
    claimed = {
        "version": manifest.version,
        "active": manifest.active,
        "created": iso(manifest.created),
        "expires": iso(manifest.expires),
    }
    if marker != claimed:
        raise BundleVerificationError(
            "tampered", f"{MANIFEST} disagrees with the signed bundle marker {marker}"
        )


def _check_members(
    members: Collection[str],
    signed: Mapping[str, Metadata[Any]],
    root_version: int,
    version: int,
    active: bool,
) -> None:
    """The bundle must hold exactly what the signed metadata of ``version`` names."""
    snapshot = signed["snapshot"].signed
    expected = {f"metadata/{n}.root.json" for n in range(1, root_version + 1)}
    expected |= {
        "metadata/timestamp.json",
        f"metadata/{snapshot.version}.snapshot.json",
        f"metadata/{snapshot.meta['targets.json'].version}.targets.json",
    }
    targets = signed["targets"].signed
    paths = [manifest_path(version)] + [target_path(version, n) for n in _names(targets, version)]
    if active:
        paths.append(ACTIVE_TARGET)
    for path in paths:
        info = targets.targets.get(path)
        if info is None:
            raise BundleVerificationError("unlisted", f"{path!r} is not in the signed targets")
        expected.add(BUNDLE_LAYOUT.target_key(info))
    present = set(members) - {README, MANIFEST}
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise BundleVerificationError("incomplete", f"the bundle lacks {missing[:5]}")
    if extra:
        raise BundleVerificationError(
            "incomplete", f"member(s) not named by the signed metadata: {extra[:5]}"
        )


def _names(targets: Targets, version: int) -> list[str]:
    info = targets.targets.get(manifest_path(version))
    names = info.custom.get("files") if info is not None else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _check_package_signature(
    version: int, files: Mapping[str, bytes], keys: Mapping[str, PackageKey]
) -> dict[str, str]:
    """The package's signatures (OpenSSF, plus ML-DSA-65 when ``keys`` hold one) over
    exactly its content files; returns their SHA-256 digests."""
    from fedlib.trust.package import verify_signatures

    try:
        content = verify_signatures(files, keys)
    except VerificationError as exc:
        raise BundleVerificationError(
            "signature",
            f"the signature of version {version} does not verify with the pinned "
            f"package key(s): {exc}",
        ) from exc
    return {name: hashlib.sha256(data).hexdigest() for name, data in content.items()}


# --------------------------------------------------------------------------- helpers


def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("use timezone-aware datetimes (UTC)")
    return moment.astimezone(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _parse_time(value: Any, what: str) -> datetime:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise BundleVerificationError("malformed", f"{MANIFEST}: bad {what} {value!r}") from None


def canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def entry(data: bytes) -> dict[str, Any]:
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _strict_json(data: bytes) -> Any:
    try:
        return strict_json(data, max_bytes=len(data), max_depth=MAX_MANIFEST_DEPTH, what=MANIFEST)
    except ValueError as exc:
        raise BundleVerificationError("malformed", str(exc)) from None

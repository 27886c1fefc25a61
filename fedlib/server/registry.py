"""The model registry: signed, write-once packages, served to devices through a TUF channel.

A package is ``model.onnx`` (what devices run: score and flag in-graph), ``weights.bin``
(flat float64 parameters, for local training), ``metadata.json`` (PackageMetadata) and
``signature.bin``: an OpenSSF model-signing bundle (DSSE over an in-toto statement with
every file's SHA-256, ECDSA P-256), so ``model_signing verify key`` checks a package
offline; optionally ``signature.mldsa65.json``, a post-quantum signature over the same
files (:mod:`fedlib.crypto.pq_signing`), required by devices that trust an ML-DSA key.
Publishing writes the files once under ``packages/v00000002/`` (the server's archive)
and publishes them as TUF targets (:mod:`fedlib.trust.channel_repository`): the
channel's signed metadata names the active version, defeats replays of old versions,
freezes and mixed files, and is what devices follow. Versions only go up.

The channel's verified targets metadata is also the server's only list of versions: a
version exists when the signed targets name its manifest, and a read checks every file
against the signed length and SHA-256 before the package signature. Anything else in the
bucket (junk under ``packages/``, a signed package copied under another number) is
ignored by reads and reported by :meth:`ModelRegistry.integrity`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile, Targets

from fedlib.crypto import pq_signing
from fedlib.errors import ObjectExists, VerificationError
from fedlib.models.package import ModelPackage
from fedlib.server.records import IntegrityWarning, ModelsIntegrity
from fedlib.storage.store import NoSuchKey, ObjectStore, ObjectTooLarge
from fedlib.trust.channel_layout import VERSIONED_RE, manifest_path, target_path
from fedlib.trust.channel_repository import ChannelKeys, ChannelRepository
from fedlib.trust.package import (
    PACKAGE_FILES,
    PQ_SIGNATURE_FILE,
    SIGNATURE_FILE,
    package_prefix,
    sign_package,
    verify_package_files,
)
from fedlib.wire.protocol import PackageMetadata

logger = logging.getLogger(__name__)

_ARCHIVE_RE = re.compile(r"^packages/v([0-9]{8})/([^/]+)$")
_HASHED_RE = re.compile(r"^([0-9a-f]{64})\.([^/]+)$")


def _integrity_problem(
    key: str,
    size: int,
    listed: Mapping[str, TargetFile],
    root_version: int,
    channel: ChannelRepository,
) -> str | None:
    """Why ``key`` is not vouched for by the verified channel (None: it is)."""
    layout = channel.layout
    if key.startswith("packages/"):
        match = _ARCHIVE_RE.match(key)
        info = listed.get(target_path(int(match.group(1)), match.group(2))) if match else None
        if info is None:
            return "no signed version names this file (junk or a renumbered copy): ignored"
        if size != info.length:
            return f"{size} bytes, the signed target has {info.length}: tampered copy, ignored"
        return None
    if key.startswith(layout.metadata_prefix):
        name = key[len(layout.metadata_prefix) :]
        versioned = VERSIONED_RE.match(name)
        if name == "timestamp.json" or (versioned and versioned.group(2) != "root"):
            return None  # verified (or skipped, logged) when the channel loads
        if versioned and int(versioned.group(1)) <= root_version:
            return None
        if versioned:
            return f"root v{versioned.group(1)} is not signed by the root chain: ignored"
        return "not channel metadata: ignored"
    if key.startswith(layout.targets_prefix):
        folder, _, leaf = key[len(layout.targets_prefix) :].rpartition("/")
        hashed = _HASHED_RE.match(leaf)
        info = None
        if hashed:
            info = listed.get(f"{folder}/{hashed.group(2)}" if folder else hashed.group(2))
        if hashed is None or info is None:
            return "no signed target has this path: ignored"
        changed = info.hashes.get("sha256") != hashed.group(1) or size != info.length
        if changed and re.match(r"^v[0-9]{8}[./]", info.path):  # a version never changes
            return "not the signed content of this version's file: ignored"
        return None  # an earlier active marker or device config: channel history
    return "outside packages/ and the channel: ignored"


class ModelRegistry:
    """Server-side view of the models bucket: publish (with keys) and verified reads."""

    def __init__(
        self,
        store: ObjectStore,
        trusted: Mapping[str, pq_signing.PackageKey],
        channel_keys: ChannelKeys | None,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        pq_signing_key: mldsa.MLDSA65PrivateKey | None = None,
    ) -> None:
        self.store = store
        self.trusted = dict(trusted)
        self.signing_key = signing_key
        self.pq_signing_key = pq_signing_key
        self.channel = ChannelRepository(store, channel_keys)

    def publish(self, package: ModelPackage) -> bool:
        """Write a version once and make it active; False when it was already published.

        A different package under an existing version number is refused, and so is a
        version at or below the active one (the channel's versions only go up).
        """
        if self.signing_key is None:
            raise VerificationError("this registry has no package-signing key")
        prefix = package_prefix(package.version)
        files = {**package.files(), SIGNATURE_FILE: sign_package(package, self.signing_key)}
        if self.pq_signing_key is not None:
            files[PQ_SIGNATURE_FILE] = pq_signing.sign_files(package.files(), self.pq_signing_key)
        try:
            existing = self.read_version(package.version)
        except NoSuchKey:  # the channel does not name this version: not published
            existing = None
        if existing is not None and existing.digest() != package.digest():
            raise ObjectExists(f"version {package.version} exists with different content")
        if existing is None:
            # signatures last: a folder without its signature is never read as a package
            for name in (*PACKAGE_FILES, *sorted(set(files) - set(PACKAGE_FILES))):
                try:
                    self.store.put(prefix + name, files[name], if_absent=True)
                except ObjectExists:
                    if self.store.get(prefix + name) != files[name]:
                        # No signed metadata names this version, so whatever sits in
                        # its archive folder is junk (or a renumbered copy): replace it.
                        logger.warning(
                            "registry: %s held bytes no channel metadata names; replaced",
                            prefix + name,
                        )
                        self.store.put(prefix + name, files[name])
        custom = {
            "rollback_of": package.metadata.rollback_of,
            "parent_version": package.metadata.parent_version,
        }
        published = self.channel.publish(package.version, files, custom)
        return existing is None or published

    def active_version(self) -> int | None:
        """The version the signed channel points devices at."""
        return self.channel.status().active_version

    def versions(self) -> list[int]:
        """Published versions, oldest first, as the verified channel metadata lists them
        (never a bucket listing: bucket write access is not publishing power)."""
        return list(self.channel.status().versions)

    def next_version(self) -> int:
        """The number the next publish takes: one above every version the channel names."""
        status = self.channel.status()
        return max((*status.versions, status.active_version or 0), default=0) + 1

    def read_files(self, version: int, targets: Targets | None = None) -> dict[str, bytes]:
        """A version's files, each matching the length and SHA-256 the signed targets give.

        Each file is read from the channel's content-addressed copy, else from the
        ``packages/`` archive: either copy that matches the signed hash is authentic, so
        one tampered copy is logged and read around. NoSuchKey: the channel does not
        name ``version``."""
        listed = (targets or self.channel.targets()).targets
        manifest = listed.get(manifest_path(version))
        if manifest is None:
            raise NoSuchKey(package_prefix(version), f"the channel names no version {version}")
        custom = manifest.custom if isinstance(manifest.custom, dict) else {}
        names = custom.get("files")
        if not isinstance(names, list) or not names:
            raise VerificationError(f"the manifest of version {version} lists no files")
        out: dict[str, bytes] = {}
        for name in names:
            info = listed.get(target_path(version, str(name)))
            if info is None:
                raise VerificationError(f"version {version}: {name} is not a signed target")
            out[str(name)] = self._read_target(info, package_prefix(version) + str(name))
        return out

    def _read_target(self, info: TargetFile, archive_key: str) -> bytes:
        problems = []
        for key in (self.channel.layout.target_key(info), archive_key):
            try:
                data = self.store.get(key, max_bytes=info.length)
                info.verify_length_and_hashes(data)
                return data
            except NoSuchKey:
                problems.append(f"{key} missing")
            except (tuf_exc.LengthOrHashMismatchError, ObjectTooLarge) as exc:
                problems.append(f"{key}: {exc}")
                logger.warning("registry: %s does not match its signed target: %s", key, exc)
        raise VerificationError(
            f"no copy of {info.path} matches its signed hash: {'; '.join(problems)}"
        )

    def read_metadata(self, version: int, targets: Targets | None = None) -> PackageMetadata:
        """A published version's ``metadata.json`` alone (one GET), checked against the
        length and SHA-256 the signed targets give before it is parsed."""
        listed = (targets or self.channel.targets()).targets
        info = listed.get(target_path(version, "metadata.json"))
        if info is None:
            raise NoSuchKey(package_prefix(version), f"the channel names no version {version}")
        data = self._read_target(info, package_prefix(version) + "metadata.json")
        try:
            metadata = PackageMetadata.from_json(data)
        except ValueError as exc:
            raise VerificationError(f"version {version}: {exc}") from None
        if metadata.version != version:
            raise VerificationError(f"metadata says version {metadata.version}, expected {version}")
        return metadata

    def read_version(self, version: int, targets: Targets | None = None) -> ModelPackage:
        """A published version: signed target hashes first, then the package signature."""
        return verify_package_files(
            self.read_files(version, targets), self.trusted, expected_version=version
        )

    def integrity(self, *, limit: int = 20, scan: int = 10_000) -> ModelsIntegrity:
        """Objects in the models bucket that no verified metadata names (first ``limit``
        of them, within the first ``scan`` objects listed): the operator's warning.

        Reads already ignore such objects; this says they are there. Rules: a
        ``packages/vN/name`` object must be a signed target of version N with its
        length; a ``tuf/targets/`` object must be a listed target path (a version's
        file under its signed hash); ``tuf/metadata/`` holds only role metadata, and a
        root above the verified chain is reported; nothing else belongs in the bucket.
        """
        status = self.channel.status()
        listed = self.channel.targets().targets
        found: list[IntegrityWarning] = []
        total = scanned = 0
        truncated = False
        for obj in self.store.list(""):
            if scanned >= scan:
                truncated = True
                break
            scanned += 1
            reason = _integrity_problem(
                obj.key, obj.size, listed, status.root_version, self.channel
            )
            if reason is None:
                continue
            total += 1
            if len(found) < limit:
                found.append(IntegrityWarning(key=obj.key[:1024], reason=reason))
        for warning in found:
            logger.warning("models bucket integrity: %s: %s", warning.key, warning.reason)
        if total > len(found):
            logger.warning("models bucket integrity: %d more not shown", total - len(found))
        return ModelsIntegrity(scanned=scanned, truncated=truncated, warnings=found, total=total)

    def read_active(self, *, min_version: int = 0) -> ModelPackage:
        """The active package, verified; refuses one older than ``min_version``."""
        version = self.active_version()
        if version is None:
            raise NoSuchKey("tuf/metadata/timestamp.json", "no model has been published")
        if version < min_version:
            raise VerificationError(
                f"active version {version} is older than installed {min_version}: refused"
            )
        return self.read_version(version)

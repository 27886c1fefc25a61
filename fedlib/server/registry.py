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
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec, mldsa

from fedlib.crypto import pq_signing, signing
from fedlib.errors import ObjectExists, VerificationError
from fedlib.models.package import ModelPackage
from fedlib.storage.store import NoSuchKey, ObjectStore
from fedlib.trust.channel_repository import ChannelKeys, ChannelRepository
from fedlib.trust.package import (
    MAX_FILE_BYTES,
    PACKAGE_FILES,
    PQ_SIGNATURE_FILE,
    SIGNATURE_FILE,
    package_prefix,
    sign_package,
    verify_package_files,
)


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
        except NoSuchKey:
            existing = None
        if existing is not None and existing.digest() != package.digest():
            raise ObjectExists(f"version {package.version} exists with different content")
        if existing is None:
            # signatures last: a folder without its signature is never read as a package
            for name in (*PACKAGE_FILES, *sorted(set(files) - set(PACKAGE_FILES))):
                try:
                    self.store.put(prefix + name, files[name], if_absent=True)
                except ObjectExists:  # a crashed earlier publish of the same version
                    if self.store.get(prefix + name) != files[name]:
                        raise
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
        found = set()
        for info in self.store.list("packages/"):
            part = info.key.split("/")[1]
            if part.startswith("v") and part[1:].isdigit():
                found.add(int(part[1:]))
        return sorted(found)

    def read_files(self, version: int) -> dict[str, bytes]:
        prefix = package_prefix(version)
        signature = self.store.get(prefix + SIGNATURE_FILE, max_bytes=signing.MAX_BUNDLE_BYTES)
        files = {
            name: self.store.get(prefix + name, max_bytes=MAX_FILE_BYTES) for name in PACKAGE_FILES
        }
        out = {**files, SIGNATURE_FILE: signature}
        with contextlib.suppress(NoSuchKey):  # versions without the hybrid signature
            out[PQ_SIGNATURE_FILE] = self.store.get(
                prefix + PQ_SIGNATURE_FILE, max_bytes=pq_signing.MAX_BYTES
            )
        return out

    def read_version(self, version: int) -> ModelPackage:
        return verify_package_files(
            self.read_files(version), self.trusted, expected_version=version
        )

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

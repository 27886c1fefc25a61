"""The model registry: signed, write-once packages, served to devices through a TUF channel.

A package is ``model.onnx`` (what devices run: score and flag in-graph), ``weights.bin``
(flat float64 parameters, for local training), ``metadata.json`` (PackageMetadata) and
``signature.bin``: an OpenSSF model-signing bundle (DSSE over an in-toto statement with
every file's SHA-256, ECDSA P-256), so ``model_signing verify key`` checks a package
offline; optionally ``signature.mldsa65.json``, a post-quantum signature over the same
files (:mod:`fedlib.pq_signing`), required by devices that trust an ML-DSA key.
Publishing writes the files once under ``packages/v00000002/`` (the server's archive)
and publishes them as TUF targets (:mod:`fedlib.channel`): the channel's signed metadata
names the active version, defeats replays of old versions, freezes and mixed
files, and is what devices follow. Versions only go up.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec, mldsa

from fedlib import pq_signing, signing
from fedlib.channel import ChannelKeys, ChannelRepository
from fedlib.errors import FedError, ObjectExists, VerificationError
from fedlib.protocol import PackageMetadata
from fedlib.store import NoSuchKey, ObjectStore

PACKAGE_FILES = ("model.onnx", "weights.bin", "metadata.json")
SIGNATURE_FILE = signing.SIGNATURE_FILE
PQ_SIGNATURE_FILE = pq_signing.PQ_SIGNATURE_FILE
MAX_FILE_BYTES = 256 * 1024 * 1024


def package_prefix(version: int) -> str:
    return f"packages/v{version:08d}/"


def weights_to_bytes(params: np.ndarray) -> bytes:
    return np.ascontiguousarray(params, dtype="<f8").tobytes()


def weights_from_bytes(data: bytes, num_params: int) -> np.ndarray:
    if len(data) != 8 * num_params:
        raise VerificationError(f"weights.bin has {len(data)} bytes, expected {8 * num_params}")
    weights = np.frombuffer(data, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(weights)):
        raise VerificationError("weights.bin holds non-finite values")
    return weights


@dataclass(frozen=True)
class ModelPackage:
    """A verified package: metadata, the ONNX graph and the flat parameters."""

    metadata: PackageMetadata
    onnx_bytes: bytes
    weights: np.ndarray

    @property
    def version(self) -> int:
        return self.metadata.version

    def files(self) -> dict[str, bytes]:
        return {
            "model.onnx": self.onnx_bytes,
            "weights.bin": weights_to_bytes(self.weights),
            "metadata.json": self.metadata.to_json(),
        }

    def digest(self) -> str:
        """SHA-256 over the package's files in a fixed order: its identity."""
        h = hashlib.sha256()
        for name, data in sorted(self.files().items()):
            h.update(name.encode() + b"\x00" + hashlib.sha256(data).digest())
        return h.hexdigest()


def sign_package(package: ModelPackage, key: ec.EllipticCurvePrivateKey) -> bytes:
    """``signature.bin``: an OpenSSF model-signing bundle over every package file."""
    return signing.sign_files(package.files(), key, model_name=f"v{package.version:08d}")


def verify_signatures(
    files: Mapping[str, bytes], trusted: Mapping[str, pq_signing.PackageKey]
) -> dict[str, bytes]:
    """Check a package's signatures over exactly its content files; return those files.

    ``trusted`` holds OpenSSF (ECDSA) keys and, on devices configured for it, ML-DSA-65
    keys: with any ML-DSA key the post-quantum signature is required as well."""
    signature = files.get(SIGNATURE_FILE)
    if signature is None:
        raise VerificationError("signature.bin is missing")
    content = {
        name: data
        for name, data in files.items()
        if name not in (SIGNATURE_FILE, PQ_SIGNATURE_FILE)
    }
    if set(content) != set(PACKAGE_FILES):
        raise VerificationError(f"package holds {sorted(content)}, expected {PACKAGE_FILES}")
    classic, post_quantum = pq_signing.split(trusted)
    signing.verify_files(signature, content, classic)
    if post_quantum:
        pq_signature = files.get(PQ_SIGNATURE_FILE)
        if pq_signature is None:
            raise VerificationError(f"{PQ_SIGNATURE_FILE} is missing and this device requires it")
        pq_signing.verify_files(pq_signature, content, post_quantum)
    return content


def verify_package_files(
    files: Mapping[str, bytes],
    trusted: Mapping[str, pq_signing.PackageKey],
    *,
    expected_version: int | None = None,
) -> ModelPackage:
    """Verify a package held in memory (bucket, channel, directory or air-gap bundle).

    The signatures are checked over exactly the package files before any is parsed.
    """
    content = verify_signatures(files, trusted)
    try:
        metadata = PackageMetadata.from_json(content["metadata.json"])
    except (ValueError, FedError) as exc:
        raise VerificationError(str(exc)) from None
    if expected_version is not None and metadata.version != expected_version:
        raise VerificationError(
            f"metadata says version {metadata.version}, expected {expected_version}"
        )
    weights = weights_from_bytes(content["weights.bin"], metadata.num_params)
    return ModelPackage(metadata=metadata, onnx_bytes=content["model.onnx"], weights=weights)


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

"""The model registry: signed, write-once packages per version and a signed active pointer.

Layout in the models bucket::

    packages/v00000002/model.onnx       what devices run (score + flag in-graph)
    packages/v00000002/weights.bin      flat float64 parameters, for local training
    packages/v00000002/metadata.json    PackageMetadata (kind, schema, threshold, training)
    packages/v00000002/signature.bin    signed manifest: version + SHA-256 and size per file
    channel/active.json                 signed pointer to the active version

Every file of a version is written once. Readers verify the pointer and the manifest
with the pinned package-signing key before they download or parse anything else, and
refuse a version older than the one they already have. (The channel is hardened into
TUF roles by a later issue; this module is the seam.)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedlib import crypto, protocol
from fedlib.errors import FedError, ObjectExists, VerificationError
from fedlib.protocol import PackageMetadata
from fedlib.store import NoSuchKey, ObjectStore

PACKAGE_DOMAIN = b"dadm-fl/package-manifest/v1"
POINTER_DOMAIN = b"dadm-fl/active-pointer/v1"
PACKAGE_FILES = ("model.onnx", "weights.bin", "metadata.json")
POINTER_KEY = "channel/active.json"
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024


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


def make_manifest(version: int, files: Mapping[str, bytes]) -> bytes:
    return protocol.canonical_json(
        {
            "version": version,
            "files": {
                name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                for name, data in sorted(files.items())
            },
        }
    )


def sign_package(package: ModelPackage, key: ed25519.Ed25519PrivateKey) -> bytes:
    """``signature.bin``: a signed manifest naming every file's digest and size."""
    return crypto.sign_artefact(
        PACKAGE_DOMAIN, make_manifest(package.version, package.files()), key
    )


def verify_manifest(
    signature: bytes, trusted: Mapping[str, ed25519.Ed25519PublicKey]
) -> tuple[int, dict[str, dict[str, object]]]:
    """Check the manifest's signature, then parse it; returns (version, files)."""
    body = crypto.verify_artefact(PACKAGE_DOMAIN, signature, trusted)
    try:
        manifest = protocol.parse_json_limited(body, MAX_SIGNATURE_BYTES, "manifest")
    except FedError as exc:
        raise VerificationError(str(exc)) from None
    if not isinstance(manifest, dict) or set(manifest) != {"version", "files"}:
        raise VerificationError("manifest must hold exactly 'version' and 'files'")
    version, files = manifest["version"], manifest["files"]
    if not isinstance(version, int) or version < 1 or not isinstance(files, dict):
        raise VerificationError("manifest has a bad version or file list")
    if set(files) != set(PACKAGE_FILES):
        raise VerificationError(f"manifest lists {sorted(files)}, expected {sorted(PACKAGE_FILES)}")
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
            or not 0 <= entry["size"] <= MAX_FILE_BYTES
        ):
            raise VerificationError(f"manifest entry for {name} is malformed")
    return version, files


def verify_package_files(
    signature: bytes,
    files: Mapping[str, bytes],
    trusted: Mapping[str, ed25519.Ed25519PublicKey],
    *,
    expected_version: int | None = None,
) -> ModelPackage:
    """Verify a package held in memory (from a bucket, a directory or a bundle)."""
    version, listed = verify_manifest(signature, trusted)
    if expected_version is not None and version != expected_version:
        raise VerificationError(f"manifest is for version {version}, expected {expected_version}")
    for name, entry in listed.items():
        data = files.get(name)
        if data is None:
            raise VerificationError(f"{name} is missing")
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise VerificationError(f"{name} does not match the signed manifest")
    try:
        metadata = PackageMetadata.from_json(files["metadata.json"])
    except (ValueError, FedError) as exc:
        raise VerificationError(str(exc)) from None
    if metadata.version != version:
        raise VerificationError(f"metadata says version {metadata.version}, manifest {version}")
    weights = weights_from_bytes(files["weights.bin"], metadata.num_params)
    return ModelPackage(metadata=metadata, onnx_bytes=files["model.onnx"], weights=weights)


class ModelRegistry:
    """Publishing (server side, holds the signing key) and verified reading (anyone)."""

    def __init__(
        self,
        store: ObjectStore,
        trusted: Mapping[str, ed25519.Ed25519PublicKey],
        signing_key: ed25519.Ed25519PrivateKey | None = None,
    ) -> None:
        self.store = store
        self.trusted = dict(trusted)
        self.signing_key = signing_key

    @classmethod
    def for_key(cls, store: ObjectStore, key: ed25519.Ed25519PrivateKey) -> ModelRegistry:
        public = key.public_key()
        return cls(store, {crypto.key_id(public): public}, key)

    # -- publishing -------------------------------------------------------------------

    def publish(self, package: ModelPackage, *, activate: bool = True) -> bool:
        """Write a version once; returns False when the identical version already exists.

        A different package under an existing version number is refused.
        """
        if self.signing_key is None:
            raise VerificationError("this registry has no signing key")
        prefix = package_prefix(package.version)
        files = dict(package.files())
        files["signature.bin"] = sign_package(package, self.signing_key)
        created = True
        try:
            existing = self.read_version(package.version)
        except NoSuchKey:
            existing = None
        if existing is not None:
            if existing.digest() != package.digest():
                raise ObjectExists(f"version {package.version} exists with different content")
            created = False
        else:
            # signature last: a version without its signature is invisible to readers
            for name in (*PACKAGE_FILES, "signature.bin"):
                try:
                    self.store.put(prefix + name, files[name], if_absent=True)
                except ObjectExists:  # a crashed earlier publish of the same version
                    if self.store.get(prefix + name) != files[name]:
                        raise
        if activate:
            self.set_active(package.version)
        return created

    def set_active(self, version: int) -> None:
        """Point devices at ``version``. The pointer never moves backwards."""
        if self.signing_key is None:
            raise VerificationError("this registry has no signing key")
        current = self.active_version()
        if current is not None and version < current:
            raise ValueError(f"active is {current}; versions only go up (asked {version})")
        self.read_version(version)  # must exist and verify
        body = protocol.canonical_json(
            {"version": version, "published_at_ms": int(time.time() * 1000)}
        )
        self.store.put(POINTER_KEY, crypto.sign_artefact(POINTER_DOMAIN, body, self.signing_key))

    # -- reading ----------------------------------------------------------------------

    def active_version(self) -> int | None:
        try:
            blob = self.store.get(POINTER_KEY, max_bytes=4096)
        except NoSuchKey:
            return None
        body = crypto.verify_artefact(POINTER_DOMAIN, blob, self.trusted)
        try:
            pointer = protocol.parse_json_limited(body, 4096, "active pointer")
        except FedError as exc:
            raise VerificationError(str(exc)) from None
        version = pointer.get("version") if isinstance(pointer, dict) else None
        if not isinstance(version, int) or version < 1:
            raise VerificationError("active pointer has no valid version")
        return version

    def versions(self) -> list[int]:
        found = set()
        for info in self.store.list("packages/"):
            part = info.key.split("/")[1]
            if part.startswith("v") and part[1:].isdigit():
                found.add(int(part[1:]))
        return sorted(found)

    def read_version(self, version: int) -> ModelPackage:
        prefix = package_prefix(version)
        signature = self.store.get(prefix + "signature.bin", max_bytes=MAX_SIGNATURE_BYTES)
        _, listed = verify_manifest(signature, self.trusted)
        files = {
            name: self.store.get(prefix + name, max_bytes=int(entry["size"]))  # type: ignore[arg-type]
            for name, entry in listed.items()
        }
        return verify_package_files(signature, files, self.trusted, expected_version=version)

    def read_active(self, *, min_version: int = 0) -> ModelPackage:
        """The active package, verified; refuses one older than ``min_version``."""
        version = self.active_version()
        if version is None:
            raise NoSuchKey("no active model has been published")
        if version < min_version:
            raise VerificationError(
                f"active version {version} is older than installed {min_version}: refused"
            )
        return self.read_version(version)

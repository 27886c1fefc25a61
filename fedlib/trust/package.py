"""Package signatures: sign on the server, verify on the device and in the air gap.

OpenSSF model-signing (ECDSA P-256) over every file's digest, optionally hybrid with
ML-DSA-65; a package is parsed only after its signatures verify.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec

from fedlib.crypto import pq_signing, signing
from fedlib.errors import FedError, VerificationError
from fedlib.models.package import ModelPackage, weights_from_bytes
from fedlib.wire.protocol import PackageMetadata

PACKAGE_FILES = ("model.onnx", "weights.bin", "metadata.json")


SIGNATURE_FILE = signing.SIGNATURE_FILE


PQ_SIGNATURE_FILE = pq_signing.PQ_SIGNATURE_FILE


MAX_FILE_BYTES = 256 * 1024 * 1024


def package_prefix(version: int) -> str:
    return f"packages/v{version:08d}/"


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

"""Hybrid package signatures: an ML-DSA-65 signature next to the OpenSSF one.

Why: a model a device installs today may be verified again years from now (air-gapped
sites, audits). ``signature.bin`` (OpenSSF model-signing, ECDSA P-256) is what the
ecosystem's tools verify; ``signature.mldsa65.json`` adds a post-quantum signature
(FIPS 204 ML-DSA-65) over the same file digests. A device configured with an ML-DSA key
requires *both* to verify, so a package stays authentic while either ECDSA or ML-DSA
holds. Devices without one ignore the extra file. ``model_signing verify`` sees it as an
extra file: pass ``--ignore_paths signature.mldsa65.json`` (README).

The file is canonical JSON: ``{"schema", "key_id", "files": {name: sha256}, "signature"}``
where the signature (base64) is over a domain tag plus the canonical JSON of the other
fields. The signature is checked before any digest in it is believed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa

from fedlib.crypto import signing
from fedlib.errors import VerificationError
from fedlib.wire import protocol

PQ_SIGNATURE_FILE: Final = "signature.mldsa65.json"
SCHEMA: Final = "dadm.package-signature.mldsa65.v1"
DOMAIN: Final = b"dadm-fl/package-signature/mldsa65/v1\x00"
MAX_BYTES: Final = 64 * 1024

PackageKey = ec.EllipticCurvePublicKey | mldsa.MLDSA65PublicKey
"""A key devices trust for packages: OpenSSF (ECDSA) or post-quantum (ML-DSA-65)."""


def generate_key() -> mldsa.MLDSA65PrivateKey:
    return mldsa.MLDSA65PrivateKey.generate()


def key_id(key: mldsa.MLDSA65PublicKey | mldsa.MLDSA65PrivateKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, 128 bits in hex (as signing.key_id)."""
    public = key.public_key() if isinstance(key, mldsa.MLDSA65PrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:32]


def any_key_id(key: PackageKey) -> str:
    return key_id(key) if isinstance(key, mldsa.MLDSA65PublicKey) else signing.key_id(key)


def public_pem(key: PackageKey | mldsa.MLDSA65PrivateKey) -> bytes:
    if isinstance(key, mldsa.MLDSA65PrivateKey):
        key = key.public_key()
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return signing.public_key_pem(key)


def load_public_key(pem: bytes) -> PackageKey:
    """A pinned package key: ECDSA (OpenSSF) or ML-DSA-65; anything else is refused."""
    key = serialization.load_pem_public_key(pem)
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return key
    return signing.load_public_key(pem)


def split(
    trusted: Mapping[str, Any],
) -> tuple[dict[str, ec.EllipticCurvePublicKey], dict[str, mldsa.MLDSA65PublicKey]]:
    """(OpenSSF keys, ML-DSA keys) of a trusted-key mapping."""
    classic = {k: v for k, v in trusted.items() if isinstance(v, ec.EllipticCurvePublicKey)}
    pq = {k: v for k, v in trusted.items() if isinstance(v, mldsa.MLDSA65PublicKey)}
    return classic, pq


def _digests(files: Mapping[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def sign_files(files: Mapping[str, bytes], key: mldsa.MLDSA65PrivateKey) -> bytes:
    """The ``signature.mldsa65.json`` of the package files (without any signature file)."""
    body = {"schema": SCHEMA, "key_id": key_id(key), "files": _digests(files)}
    signature = key.sign(DOMAIN + protocol.canonical_json(body))
    return protocol.canonical_json({**body, "signature": base64.b64encode(signature).decode()})


def verify_files(
    data: bytes, files: Mapping[str, bytes], trusted: Mapping[str, mldsa.MLDSA65PublicKey]
) -> None:
    """Raise :class:`VerificationError` unless ``data`` is a valid ML-DSA-65 signature by
    a trusted key over exactly ``files``."""
    try:
        doc = protocol.strict_json(data, max_bytes=MAX_BYTES, what=PQ_SIGNATURE_FILE)
    except ValueError as exc:
        raise VerificationError(f"{PQ_SIGNATURE_FILE} is malformed: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"schema", "key_id", "files", "signature"}:
        raise VerificationError(f"{PQ_SIGNATURE_FILE} has unexpected fields")
    if doc["schema"] != SCHEMA:
        raise VerificationError(f"{PQ_SIGNATURE_FILE} has schema {doc['schema']!r}")
    key = trusted.get(doc["key_id"]) if isinstance(doc["key_id"], str) else None
    if key is None:
        raise VerificationError(f"{PQ_SIGNATURE_FILE} is signed by an untrusted ML-DSA key")
    try:
        signature = base64.b64decode(str(doc["signature"]), validate=True)
        body = {k: doc[k] for k in ("schema", "key_id", "files")}
        key.verify(signature, DOMAIN + protocol.canonical_json(body))
    except (binascii.Error, InvalidSignature, ValueError, TypeError):
        raise VerificationError(f"{PQ_SIGNATURE_FILE} does not verify") from None
    if doc["files"] != _digests(files):
        raise VerificationError(f"{PQ_SIGNATURE_FILE} covers other files or other bytes")

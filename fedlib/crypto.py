"""Keys, key ids, and sealing/opening of update envelopes.

Sealing = HPKE (RFC 9180: DHKEM-X25519, HKDF-SHA256, AES-256-GCM) of the payload to
the server's public key, with ``info`` binding the protocol version *and* the digest
of the signed header, then an Ed25519 signature by the client over framing + header +
ciphertext. Opening refuses in a fixed order, each with a reason code: framing, the
signer's key (unknown / revoked), the signature, then the header, the server key,
and only then decryption and payload parsing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from fedlib import protocol
from fedlib.errors import RejectedUpdate

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

PrivateKey = ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey
PublicKey = ed25519.Ed25519PublicKey | x25519.X25519PublicKey


def raw_public_bytes(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: PublicKey | PrivateKey) -> str:
    """A key's fingerprint: SHA-256 over its algorithm name and raw public bytes, 128 bits."""
    public = key.public_key() if hasattr(key, "public_key") else key
    alg = b"ed25519" if isinstance(public, ed25519.Ed25519PublicKey) else b"x25519"
    return hashlib.sha256(alg + b"\x00" + raw_public_bytes(public)).digest()[:16].hex()


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def generate_encryption_key() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


def private_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_pem(key: PublicKey | PrivateKey) -> bytes:
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_pem(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=passphrase)
    if not isinstance(key, ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def load_public_pem(data: bytes) -> PublicKey:
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, ed25519.Ed25519PublicKey | x25519.X25519PublicKey):
        raise ValueError(f"unsupported public key type {type(key).__name__}")
    return key


def load_signing_key(path: Path, passphrase: bytes | None = None) -> ed25519.Ed25519PrivateKey:
    key = load_private_pem(Path(path).read_bytes(), passphrase)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def load_verify_key(data: bytes) -> ed25519.Ed25519PublicKey:
    key = load_public_pem(data)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("expected an Ed25519 public key")
    return key


def load_encryption_public_key(data: bytes) -> x25519.X25519PublicKey:
    key = load_public_pem(data)
    if not isinstance(key, x25519.X25519PublicKey):
        raise ValueError("expected an X25519 public key")
    return key


def write_private_key(path: Path, key: PrivateKey, passphrase: bytes | None = None) -> None:
    """Write a private key readable by its owner only, atomically."""
    from fedlib.store import atomic_write

    atomic_write(path, private_pem(key, passphrase), mode=0o600)


class ClientLookup(Protocol):
    """What opening needs of the fleet: the client record for a signing key id."""

    def lookup(self, key_id: str) -> ClientKey | None: ...


@dataclass(frozen=True)
class ClientKey:
    client_id: str
    key_id: str
    public_key: ed25519.Ed25519PublicKey
    revoked: bool = False


class ServerKeyring:
    """The server's HPKE private keys by key id; several may be active during rotation."""

    def __init__(self, keys: Mapping[str, x25519.X25519PrivateKey] | None = None) -> None:
        self._keys: dict[str, x25519.X25519PrivateKey] = {}
        for key in (keys or {}).values():
            self.add(key)

    def add(self, key: x25519.X25519PrivateKey) -> str:
        kid = key_id(key)
        self._keys[kid] = key
        return kid

    def get(self, kid: str) -> x25519.X25519PrivateKey | None:
        return self._keys.get(kid)

    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # never show key material
        return f"ServerKeyring(key_ids={self.key_ids()})"

    @classmethod
    def from_directory(cls, directory: Path, passphrase: bytes | None = None) -> ServerKeyring:
        """Load every ``*.pem`` X25519 private key in a secrets directory."""
        ring = cls()
        for path in sorted(Path(directory).glob("*.pem")):
            key = load_private_pem(path.read_bytes(), passphrase)
            if isinstance(key, x25519.X25519PrivateKey):
                ring.add(key)
        if not ring:
            raise FileNotFoundError(f"no X25519 server keys in {directory}")
        return ring


def _hpke_info(header_bytes: bytes) -> bytes:
    return protocol.HPKE_INFO_DOMAIN + hashlib.sha256(header_bytes).digest()


def seal_update(
    *,
    client_id: str,
    client_key: ed25519.Ed25519PrivateKey,
    server_public_key: x25519.X25519PublicKey,
    base_version: int,
    payload: bytes,
    update_id: str | None = None,
    created_at_ms: int | None = None,
) -> tuple[protocol.UpdateHeader, bytes]:
    """Encrypt a payload to the server and sign the result; returns (header, envelope)."""
    uid = update_id or protocol.new_update_id(created_at_ms)
    header = protocol.UpdateHeader.model_validate(
        {
            "schema": protocol.UPDATE_SCHEMA,
            "client_id": client_id,
            "client_key_id": key_id(client_key),
            "server_key_id": key_id(server_public_key),
            "suite": protocol.SUITE_X25519,
            "update_id": uid,
            "base_version": base_version,
            "created_at_ms": created_at_ms if created_at_ms is not None else _uuid7_ms(uid),
            "payload_size": len(payload),
        }
    )
    header_bytes = protocol.encode_header(header)
    ciphertext = _SUITE.encrypt(payload, server_public_key, info=_hpke_info(header_bytes))
    body = protocol.frame_envelope_body(header.client_key_id, header_bytes, ciphertext)
    signature = client_key.sign(protocol.SIGNATURE_DOMAIN + body)
    return header, body + signature


def _uuid7_ms(update_id: str) -> int:
    return int(update_id.replace("-", "")[:12], 16)


@dataclass(frozen=True)
class OpenedUpdate:
    header: protocol.UpdateHeader
    payload: bytes
    client: ClientKey


def verify_envelope(
    blob: bytes, clients: ClientLookup, *, max_bytes: int = protocol.MAX_ENVELOPE_BYTES
) -> tuple[protocol.EnvelopeParts, protocol.UpdateHeader, ClientKey]:
    """Framing, signer and signature, then the header: everything short of decrypting."""
    parts = protocol.split_envelope(blob, max_bytes=max_bytes)
    client = clients.lookup(parts.key_id)
    if client is None:
        raise RejectedUpdate("unknown_client", f"no enrolled client has key {parts.key_id}")
    if client.revoked:
        raise RejectedUpdate(
            "revoked_client", f"key {parts.key_id} of {client.client_id} is revoked"
        )
    try:
        client.public_key.verify(parts.signature, protocol.SIGNATURE_DOMAIN + parts.signed_bytes)
    except InvalidSignature:
        raise RejectedUpdate(
            "bad_signature", f"signature does not verify with {client.client_id}'s key"
        ) from None
    header = protocol.parse_header(parts.header_bytes)
    if header.client_id != client.client_id or header.client_key_id != client.key_id:
        raise RejectedUpdate(
            "bad_signature",
            f"header names {header.client_id}/{header.client_key_id} "
            f"but is signed by {client.client_id}/{client.key_id}",
        )
    return parts, header, client


def open_update(
    blob: bytes,
    clients: ClientLookup,
    server_keys: ServerKeyring,
    *,
    max_bytes: int = protocol.MAX_ENVELOPE_BYTES,
) -> OpenedUpdate:
    """Verify, then decrypt. Raises :class:`RejectedUpdate` with a reason code."""
    parts, header, client = verify_envelope(blob, clients, max_bytes=max_bytes)
    private = server_keys.get(header.server_key_id)
    if private is None:
        raise RejectedUpdate(
            "unknown_server_key", f"sealed to server key {header.server_key_id}, not held here"
        )
    if len(parts.ciphertext) != header.payload_size + protocol.HPKE_X25519_OVERHEAD:
        raise RejectedUpdate(
            "malformed",
            f"ciphertext is {len(parts.ciphertext)} bytes for a declared payload of "
            f"{header.payload_size}",
        )
    try:
        payload = _SUITE.decrypt(parts.ciphertext, private, info=_hpke_info(parts.header_bytes))
    except (InvalidTag, ValueError) as exc:
        raise RejectedUpdate("decrypt_failed", f"HPKE open failed: {type(exc).__name__}") from None
    return OpenedUpdate(header=header, payload=payload, client=client)

"""Keys, key ids, and sealing/opening of update envelopes.

Sealing = HPKE (RFC 9180, HKDF-SHA256, AES-256-GCM) of the payload to the server's
public key, with ``info`` binding the protocol version *and* the digest of the signed
header, then an Ed25519 signature by the client over framing + header + ciphertext.
Two KEMs, named by the suite in the signed header: the hybrid post-quantum
ML-KEM-768 + X25519 (the default for new deployments: updates recorded today stay
confidential if either primitive survives) and classic DHKEM-X25519 (older devices,
during a migration). Opening refuses in a fixed order, each with a reason code:
framing, the signer's key (unknown / revoked), the signature, then the header, the
suite, the server key, and only then decryption and payload parsing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from fedlib.errors import RejectedUpdate
from fedlib.wire import protocol

SUITES: Final[dict[str, str]] = {
    "mlkem768-x25519": protocol.SUITE_MLKEM768_X25519,
    "x25519": protocol.SUITE_X25519,
}
"""Configuration names of the HPKE suites -> the suite string in the signed header."""
DEFAULT_SUITE: Final = "mlkem768-x25519"
POST_QUANTUM_SUITES: Final = frozenset({protocol.SUITE_MLKEM768_X25519})

_HPKE = {
    protocol.SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    protocol.SUITE_MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}


@dataclass(frozen=True, eq=False)
class HybridPublicKey:
    """An ML-KEM-768 + X25519 HPKE public key, kept as its two halves so it can be
    written as two standard SubjectPublicKeyInfo PEM blocks."""

    mlkem: mlkem.MLKEM768PublicKey
    x25519: x25519.X25519PublicKey

    def raw(self) -> bytes:
        return self.mlkem.public_bytes_raw() + raw_public_bytes(self.x25519)

    def hpke_key(self) -> hpke.MLKEM768X25519PublicKey:
        return hpke.MLKEM768X25519PublicKey(self.mlkem, self.x25519)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HybridPublicKey) and self.raw() == other.raw()

    def __hash__(self) -> int:
        return hash(self.raw())


@dataclass(frozen=True, eq=False)
class HybridPrivateKey:
    """An ML-KEM-768 + X25519 HPKE private key (two PKCS#8 PEM blocks on disk)."""

    mlkem: mlkem.MLKEM768PrivateKey
    x25519: x25519.X25519PrivateKey
    _hpke: list[hpke.MLKEM768X25519PrivateKey] = field(default_factory=list, repr=False)

    @classmethod
    def generate(cls) -> HybridPrivateKey:
        return cls(mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate())

    def public_key(self) -> HybridPublicKey:
        return HybridPublicKey(self.mlkem.public_key(), self.x25519.public_key())

    def hpke_key(self) -> hpke.MLKEM768X25519PrivateKey:
        if not self._hpke:  # built once: decrypting many updates reuses it
            self._hpke.append(hpke.MLKEM768X25519PrivateKey(self.mlkem, self.x25519))
        return self._hpke[0]

    def __repr__(self) -> str:  # never show key material
        return f"HybridPrivateKey(key_id={key_id(self)})"


EncryptionPrivateKey = x25519.X25519PrivateKey | HybridPrivateKey
EncryptionPublicKey = x25519.X25519PublicKey | HybridPublicKey
PrivateKey = ed25519.Ed25519PrivateKey | EncryptionPrivateKey
PublicKey = ed25519.Ed25519PublicKey | EncryptionPublicKey


def raw_public_bytes(key: ed25519.Ed25519PublicKey | x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _public(key: PublicKey | PrivateKey) -> PublicKey:
    return key.public_key() if hasattr(key, "public_key") else key


def key_id(key: PublicKey | PrivateKey) -> str:
    """A key's fingerprint: SHA-256 over its algorithm name and raw public bytes, 128 bits."""
    public = _public(key)
    if isinstance(public, HybridPublicKey):
        alg, raw = b"mlkem768-x25519", public.raw()
    else:
        alg = b"ed25519" if isinstance(public, ed25519.Ed25519PublicKey) else b"x25519"
        raw = raw_public_bytes(public)
    return hashlib.sha256(alg + b"\x00" + raw).digest()[:16].hex()


def suite_of(key: EncryptionPublicKey | EncryptionPrivateKey) -> str:
    """The header suite string a server key seals/opens with."""
    if isinstance(key, HybridPrivateKey):  # without deriving the public key: hot path
        return protocol.SUITE_MLKEM768_X25519
    if isinstance(key, x25519.X25519PrivateKey):
        return protocol.SUITE_X25519
    public = key
    if isinstance(public, HybridPublicKey):
        return protocol.SUITE_MLKEM768_X25519
    if isinstance(public, x25519.X25519PublicKey):
        return protocol.SUITE_X25519
    raise TypeError(f"{type(public).__name__} is not an HPKE key")


def suite_name(suite: str) -> str:
    """The configuration name of a header suite string (``x25519``, ``mlkem768-x25519``)."""
    for name, value in SUITES.items():
        if value == suite:
            return name
    raise ValueError(f"unknown HPKE suite {suite!r}")


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def generate_encryption_key(suite: str = DEFAULT_SUITE) -> EncryptionPrivateKey:
    """A server HPKE key for ``suite`` (a name of :data:`SUITES`)."""
    if suite == "mlkem768-x25519":
        return HybridPrivateKey.generate()
    if suite == "x25519":
        return x25519.X25519PrivateKey.generate()
    raise ValueError(f"unknown HPKE suite {suite!r}; one of {sorted(SUITES)}")


def private_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; a hybrid key is two blocks, ML-KEM-768 (seed form) then X25519."""
    if isinstance(key, HybridPrivateKey):
        return private_pem(key.mlkem, passphrase) + private_pem(key.x25519, passphrase)  # type: ignore[arg-type]
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_pem(key: PublicKey | PrivateKey) -> bytes:
    """SubjectPublicKeyInfo PEM; a hybrid key is two blocks, ML-KEM-768 then X25519."""
    public = _public(key)
    if isinstance(public, HybridPublicKey):
        return public_pem(public.mlkem) + public_pem(public.x25519)  # type: ignore[arg-type]
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\s*", re.DOTALL)


def _pem_blocks(data: bytes) -> list[bytes]:
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data)]
    if not 1 <= len(blocks) <= 2:
        raise ValueError(f"expected one or two PEM blocks, found {len(blocks)}")
    return blocks


def _key_of_blocks(
    keys: Sequence[object], single: tuple[type, ...], halves: tuple[type, type], hybrid: type
) -> object:
    """One key of a ``single`` type, or a ``hybrid`` key from its two blocks (``halves``:
    the ML-KEM-768 then the X25519 type)."""
    if len(keys) == 2:
        if isinstance(keys[0], halves[0]) and isinstance(keys[1], halves[1]):
            return hybrid(*keys)
        raise ValueError("two PEM blocks must be an ML-KEM-768 then an X25519 key")
    if not isinstance(keys[0], single):
        raise ValueError(f"unsupported key type {type(keys[0]).__name__}")
    return keys[0]


def load_private_pem(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    keys = [serialization.load_pem_private_key(b, password=passphrase) for b in _pem_blocks(data)]
    return _key_of_blocks(  # type: ignore[return-value]
        keys,
        (ed25519.Ed25519PrivateKey, x25519.X25519PrivateKey),
        (mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey),
        HybridPrivateKey,
    )


def load_public_pem(data: bytes) -> PublicKey:
    keys = [serialization.load_pem_public_key(b) for b in _pem_blocks(data)]
    return _key_of_blocks(  # type: ignore[return-value]
        keys,
        (ed25519.Ed25519PublicKey, x25519.X25519PublicKey),
        (mlkem.MLKEM768PublicKey, x25519.X25519PublicKey),
        HybridPublicKey,
    )


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


def load_encryption_public_key(data: bytes) -> EncryptionPublicKey:
    key = load_public_pem(data)
    if not isinstance(key, x25519.X25519PublicKey | HybridPublicKey):
        raise ValueError("expected an HPKE public key (ML-KEM-768 + X25519, or X25519)")
    return key


def write_private_key(path: Path, key: PrivateKey, passphrase: bytes | None = None) -> None:
    """Write a private key readable by its owner only, atomically."""
    from fedlib.files import atomic_write

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
    """The server's HPKE private keys by key id; several may be active during rotation
    (and of both suites during a migration to the hybrid one)."""

    def __init__(self, keys: Mapping[str, EncryptionPrivateKey] | None = None) -> None:
        self._keys: dict[str, EncryptionPrivateKey] = {}
        for key in (keys or {}).values():
            self.add(key)

    def add(self, key: EncryptionPrivateKey) -> str:
        kid = key_id(key)
        self._keys[kid] = key
        return kid

    def get(self, kid: str) -> EncryptionPrivateKey | None:
        return self._keys.get(kid)

    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # never show key material
        return f"ServerKeyring(key_ids={self.key_ids()})"

    @classmethod
    def from_directory(cls, directory: Path, passphrase: bytes | None = None) -> ServerKeyring:
        """Load every ``*.pem`` HPKE private key (hybrid or X25519) in a secrets directory."""
        ring = cls()
        for path in sorted(Path(directory).glob("*.pem")):
            key = load_private_pem(path.read_bytes(), passphrase)
            if isinstance(key, x25519.X25519PrivateKey | HybridPrivateKey):
                ring.add(key)
        if not ring:
            raise FileNotFoundError(f"no HPKE server keys in {directory}")
        return ring


def _hpke_info(header_bytes: bytes) -> bytes:
    return protocol.HPKE_INFO_DOMAIN + hashlib.sha256(header_bytes).digest()


def seal_update(
    *,
    client_id: str,
    client_key: ed25519.Ed25519PrivateKey,
    server_public_key: EncryptionPublicKey,
    base_version: int,
    payload: bytes,
    update_id: str | None = None,
    created_at_ms: int | None = None,
) -> tuple[protocol.UpdateHeader, bytes]:
    """Encrypt a payload to the server and sign the result; returns (header, envelope).
    The suite follows the server key: hybrid key, hybrid suite."""
    suite = suite_of(server_public_key)
    uid = update_id or protocol.new_update_id(created_at_ms)
    header = protocol.UpdateHeader.model_validate(
        {
            "schema": protocol.UPDATE_SCHEMA,
            "client_id": client_id,
            "client_key_id": key_id(client_key),
            "server_key_id": key_id(server_public_key),
            "suite": suite,
            "update_id": uid,
            "base_version": base_version,
            "created_at_ms": created_at_ms if created_at_ms is not None else _uuid7_ms(uid),
            "payload_size": len(payload),
        }
    )
    header_bytes = protocol.encode_header(header)
    recipient = (
        server_public_key.hpke_key()
        if isinstance(server_public_key, HybridPublicKey)
        else server_public_key
    )
    ciphertext = _HPKE[suite].encrypt(payload, recipient, info=_hpke_info(header_bytes))
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
    accepted_suites: Collection[str] | None = None,
) -> OpenedUpdate:
    """Verify, then decrypt. Raises :class:`RejectedUpdate` with a reason code.

    ``accepted_suites`` (header suite strings; None = every known suite) is how a
    deployment that finished its migration refuses classic-only sealing."""
    parts, header, client = verify_envelope(blob, clients, max_bytes=max_bytes)
    if accepted_suites is not None and header.suite not in accepted_suites:
        raise RejectedUpdate(
            "suite_not_accepted",
            f"sealed with {suite_name(header.suite)}; this server accepts "
            f"{', '.join(sorted(suite_name(s) for s in accepted_suites))}",
        )
    private = server_keys.get(header.server_key_id)
    if private is None:
        raise RejectedUpdate(
            "unknown_server_key", f"sealed to server key {header.server_key_id}, not held here"
        )
    if suite_of(private) != header.suite:
        raise RejectedUpdate(
            "suite_not_accepted",
            f"header names {suite_name(header.suite)} but server key {header.server_key_id} "
            f"is a {suite_name(suite_of(private))} key",
        )
    if len(parts.ciphertext) != header.payload_size + protocol.HPKE_OVERHEAD[header.suite]:
        raise RejectedUpdate(
            "malformed",
            f"ciphertext is {len(parts.ciphertext)} bytes for a declared payload of "
            f"{header.payload_size}",
        )
    try:
        recipient = private.hpke_key() if isinstance(private, HybridPrivateKey) else private
        payload = _HPKE[header.suite].decrypt(
            parts.ciphertext, recipient, info=_hpke_info(parts.header_bytes)
        )
    except (InvalidTag, ValueError) as exc:
        raise RejectedUpdate("decrypt_failed", f"HPKE open failed: {type(exc).__name__}") from None
    return OpenedUpdate(header=header, payload=payload, client=client)

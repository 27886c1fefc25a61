"""The signed device config (``device-config.json``, a TUF target): the server key
devices seal to and the package keys they trust, with the downgrade rule a device
applies before it accepts a new one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric import mldsa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedlib.crypto import pq_signing, sealing
from fedlib.errors import VerificationError
from fedlib.wire import protocol
from fedlib.wire.protocol import KeyId

DEVICE_CONFIG_TARGET = "device-config.json"


DEVICE_CONFIG_SCHEMA = "dadm.device-config.v1"


MAX_DEVICE_CONFIG_BYTES = 64 * 1024


_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerKeyEntry(BaseModel):
    model_config = _STRICT

    key_id: KeyId
    suite: Literal["mlkem768-x25519", "x25519"]
    public_key_pem: Annotated[str, Field(max_length=8192)]


class DeviceConfig(BaseModel):
    """What every device is told through the channel: whom to seal to, whom to trust."""

    model_config = _STRICT

    schema_: Literal["dadm.device-config.v1"] = Field(alias="schema")
    serial: Annotated[int, Field(ge=1, le=2**53)]
    server_key: ServerKeyEntry
    package_signing_keys_pem: Annotated[
        list[Annotated[str, Field(max_length=4096)]], Field(min_length=1, max_length=8)
    ]

    def to_bytes(self) -> bytes:
        return protocol.canonical_json(self.model_dump(by_alias=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceConfig:
        """Parse a device config (after TUF verified its bytes); VerificationError if bad."""
        try:
            raw = protocol.strict_json(
                data, max_bytes=MAX_DEVICE_CONFIG_BYTES, what="device config"
            )
            doc = cls.model_validate(raw)
            doc.server_public_key()
            doc.package_keys()
        except (ValueError, ValidationError) as exc:
            raise VerificationError(f"device config is malformed: {exc}") from None
        return doc

    def server_public_key(self) -> sealing.EncryptionPublicKey:
        """The server key, checked against its declared id and suite."""
        key = sealing.load_encryption_public_key(self.server_key.public_key_pem.encode())
        if sealing.key_id(key) != self.server_key.key_id:
            raise ValueError("server key does not match its key id")
        if sealing.suite_name(sealing.suite_of(key)) != self.server_key.suite:
            raise ValueError("server key does not match its suite")
        return key

    def package_keys(self) -> list[pq_signing.PackageKey]:
        return [pq_signing.load_public_key(pem.encode()) for pem in self.package_signing_keys_pem]

    @property
    def post_quantum(self) -> bool:
        return sealing.SUITES[self.server_key.suite] in sealing.POST_QUANTUM_SUITES

    @property
    def post_quantum_packages(self) -> bool:
        """Whether devices must also check an ML-DSA-65 package signature."""
        return any(isinstance(k, mldsa.MLDSA65PublicKey) for k in self.package_keys())


def refuses_downgrade(
    current_suite: str,
    new: DeviceConfig,
    *,
    require_pq: bool,
    pq_packages: bool = False,
) -> str | None:
    """Why ``new`` must be refused: it would move a device off the post-quantum sealing
    it uses (or must use), or drop the ML-DSA package key it checks. None: acceptable."""
    was_pq = sealing.SUITES.get(current_suite, current_suite) in sealing.POST_QUANTUM_SUITES
    if (was_pq or require_pq) and not new.post_quantum:
        return f"it would move this device from post-quantum sealing to {new.server_key.suite}"
    if pq_packages and not new.post_quantum_packages:
        return "it would drop the ML-DSA-65 package key this device checks"
    return None

"""Versioned wire formats: the update envelope, its signed header, the payload inside it.

Everything that crosses a trust boundary is framed here and parsed strictly: fixed
binary framing with declared lengths checked against hard limits, then canonical
JSON validated by pydantic models that forbid unknown fields. Never pickle.

Update envelope (what a device uploads), all integers big-endian::

    magic   b"DFLU"           4 bytes
    version u8 = 1            framing version; anything else is ``unsupported_version``
    key_id  16 bytes          the signing client's key id (raw)
    hlen    u32               header length, <= MAX_HEADER_BYTES
    header  hlen bytes        canonical JSON of :class:`UpdateHeader`
    ct      ...               HPKE ciphertext of the payload
    sig     64 bytes          Ed25519 over SIGNATURE_DOMAIN + everything before it

The signer's key id sits in the binary framing so the server can find the key and
verify the signature *before* it parses any JSON.

Payload (the plaintext, only ever seen by the server)::

    magic b"DFLP" | u32 meta length | canonical JSON of :class:`UpdateMeta` | compressed delta
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedlib.errors import RejectedUpdate

PROTOCOL_VERSION: Final = 1
UPDATE_SCHEMA: Final = "dadm.update.v1"
META_SCHEMA: Final = "dadm.update-meta.v1"

UPDATE_MAGIC: Final = b"DFLU"
PAYLOAD_MAGIC: Final = b"DFLP"
SIGNATURE_DOMAIN: Final = b"dadm-fl/update-signature/v1\x00"
HPKE_INFO_DOMAIN: Final = b"dadm-fl/update-hpke/v1\x00"
SUITE_X25519: Final = "DHKEM-X25519-HKDF-SHA256/HKDF-SHA256/AES-256-GCM"
SUITE_MLKEM768_X25519: Final = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
"""Hybrid post-quantum KEM (ML-KEM-768 + X25519, the X-Wing-style combiner of
draft-ietf-hpke-pq): secure while either ML-KEM-768 or X25519 holds."""

KEY_ID_BYTES: Final = 16
SIGNATURE_BYTES: Final = 64
MAX_HEADER_BYTES: Final = 4096
MAX_META_BYTES: Final = 8192
MAX_ENVELOPE_BYTES: Final = 64 * 1024 * 1024
UNCLIPPED_METRIC: Final = "dp_unclipped"
"""Payload metric a device sets to 1.0 (norm <= C before clipping) or 0.0 (central DP)."""
HPKE_X25519_OVERHEAD: Final = 32 + 16  # encapsulated key + GCM tag
HPKE_MLKEM768_X25519_OVERHEAD: Final = 1120 + 16  # ML-KEM ciphertext + X25519 share + tag
HPKE_OVERHEAD: Final = {
    SUITE_X25519: HPKE_X25519_OVERHEAD,
    SUITE_MLKEM768_X25519: HPKE_MLKEM768_X25519_OVERHEAD,
}
"""Ciphertext bytes beyond the payload, per suite (what opening checks before decrypting)."""

_PREFIX = struct.Struct(">4sB16sI")

ClientId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
UpdateId = Annotated[
    str, Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
]
# fullmatch, not ``^...$``: ``$`` also matches before a trailing newline.
_CLIENT_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_UPDATE_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
#: ``updates/<client id>/<update id>`` in one match (the plan checks every pending key)
_INBOX_KEY_RE = re.compile(f"updates/({_CLIENT_ID_RE.pattern})/({_UPDATE_ID_RE.pattern})")

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class UpdateHeader(BaseModel):
    """What the server may read before decrypting: who sent it, to whom, against what."""

    model_config = _STRICT

    schema_: Literal["dadm.update.v1"] = Field(alias="schema")
    client_id: ClientId
    client_key_id: KeyId
    server_key_id: KeyId
    suite: Literal[
        "DHKEM-X25519-HKDF-SHA256/HKDF-SHA256/AES-256-GCM",
        "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM",
    ]
    update_id: UpdateId
    base_version: Annotated[int, Field(ge=1, le=2**53)]
    created_at_ms: Annotated[int, Field(ge=0, le=2**53)]
    payload_size: Annotated[int, Field(ge=0, le=MAX_ENVELOPE_BYTES)]


class UpdateMeta(BaseModel):
    """Small metadata inside the encrypted payload: counts, kind, metrics. Never rows."""

    model_config = _STRICT

    schema_: Literal["dadm.update-meta.v1"] = Field(alias="schema")
    model_kind: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]
    num_params: Annotated[int, Field(ge=1, le=50_000_000)]
    num_samples: Annotated[int, Field(ge=1, le=2**40)]
    epochs: Annotated[int, Field(ge=0, le=10_000)]
    compression: Literal["topk16", "dense16", "dense32", "dense64"]
    metrics: Annotated[
        dict[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")], float], Field(max_length=16)
    ] = Field(default_factory=dict)


def canonical_json(obj: Any) -> bytes:
    """One byte string per value: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)  # skips strings


def strict_json(data: bytes, *, max_bytes: int, max_depth: int = 8, what: str = "JSON") -> Any:
    """Parse JSON from outside: size and nesting limits, no duplicate keys, no NaN.

    The one strict parser of the project; raises ValueError, which each trust boundary
    turns into its own refusal (RejectedUpdate, VerificationError, ...).
    """
    if len(data) > max_bytes:
        raise ValueError(f"{what} is {len(data)} bytes, limit {max_bytes}")
    if data.count(b"[") + data.count(b"{") > max_depth:
        depth = 0
        for match in _JSON_TOKENS.finditer(data):
            token = match.group()
            if token in (b"[", b"{"):
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"{what} nests deeper than {max_depth} levels")
            elif token in (b"]", b"}"):
                depth -= 1
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_refuse_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf: as bad as a NaN literal
        raise ValueError(f"number {text[:20]!r} is out of range")
    return value


def parse_json_limited(data: bytes, limit: int, what: str) -> Any:
    """:func:`strict_json` for update envelopes: refusals carry reason codes."""
    if len(data) > limit:
        raise RejectedUpdate("oversized", f"{what} is {len(data)} bytes, limit {limit}")
    try:
        return strict_json(data, max_bytes=limit, what=what)
    except ValueError as exc:
        raise RejectedUpdate("malformed", str(exc)) from None


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:40]!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def new_update_id(now_ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): unique, and lexicographically ordered by creation time."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def inbox_key(client_id: str, update_id: str) -> str:
    """The idempotent object key of an update: one key per update, forever."""
    if not _CLIENT_ID_RE.fullmatch(client_id):
        raise ValueError(f"bad client id {client_id!r}")
    return f"updates/{client_id}/{update_id}"


def is_client_id(value: str) -> bool:
    return _CLIENT_ID_RE.fullmatch(value) is not None


def parse_inbox_key(key: str) -> tuple[str, str]:
    """Split an inbox key into (client_id, update_id); refuse anything else.

    Strict: exactly ``updates/<client id>/<update id>``, the id a canonical (lowercase)
    UUIDv7, so a name that parses is short and safe inside any state key."""
    match = _INBOX_KEY_RE.fullmatch(key)
    if match is None:
        shown = key[:80] + ("..." if len(key) > 80 else "")
        raise RejectedUpdate(
            "malformed_name",
            f"object key {shown!r} ({len(key)} chars) is not updates/<client>/<UUIDv7>",
        )
    return match[1], match[2]


@dataclass(frozen=True)
class EnvelopeParts:
    """The framing of an envelope split apart; nothing in it is trusted yet."""

    key_id: str
    header_bytes: bytes
    ciphertext: bytes
    signed_bytes: bytes
    signature: bytes


def split_envelope(blob: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> EnvelopeParts:
    """Check the binary framing only (sizes, magic, version); parse no JSON."""
    if len(blob) > max_bytes:
        raise RejectedUpdate("oversized", f"envelope is {len(blob)} bytes, limit {max_bytes}")
    if len(blob) < _PREFIX.size + SIGNATURE_BYTES:
        raise RejectedUpdate("malformed", f"envelope of {len(blob)} bytes is too short")
    magic, version, key_id, header_len = _PREFIX.unpack_from(blob)
    if magic != UPDATE_MAGIC:
        raise RejectedUpdate("malformed", "not an update envelope (bad magic)")
    if version != PROTOCOL_VERSION:
        raise RejectedUpdate("unsupported_version", f"envelope framing version {version}")
    if header_len > MAX_HEADER_BYTES:
        raise RejectedUpdate("oversized", f"header declares {header_len} bytes")
    body_end = len(blob) - SIGNATURE_BYTES
    header_end = _PREFIX.size + header_len
    if header_end > body_end:
        raise RejectedUpdate("malformed", "header runs past the end of the envelope")
    return EnvelopeParts(
        key_id=key_id.hex(),
        header_bytes=blob[_PREFIX.size : header_end],
        ciphertext=blob[header_end:body_end],
        signed_bytes=blob[:body_end],
        signature=blob[body_end:],
    )


def frame_envelope_body(key_id: str, header_bytes: bytes, ciphertext: bytes) -> bytes:
    """Everything the client signs: the framing, header and ciphertext."""
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError("header too large")
    return (
        _PREFIX.pack(UPDATE_MAGIC, PROTOCOL_VERSION, bytes.fromhex(key_id), len(header_bytes))
        + header_bytes
        + ciphertext
    )


def parse_header(header_bytes: bytes) -> UpdateHeader:
    """Strictly parse a header whose signature was already verified."""
    raw = parse_json_limited(header_bytes, MAX_HEADER_BYTES, "header")
    if isinstance(raw, dict) and raw.get("schema") != UPDATE_SCHEMA and "schema" in raw:
        raise RejectedUpdate("unsupported_version", f"header schema {raw.get('schema')!r}")
    try:
        return UpdateHeader.model_validate(raw)
    except ValidationError as exc:
        raise RejectedUpdate("malformed", f"header: {_first_error(exc)}") from None


def encode_header(header: UpdateHeader) -> bytes:
    return canonical_json(header.model_dump(by_alias=True))


def encode_payload(meta: UpdateMeta, delta_blob: bytes) -> bytes:
    meta_bytes = canonical_json(meta.model_dump(by_alias=True))
    return PAYLOAD_MAGIC + struct.pack(">I", len(meta_bytes)) + meta_bytes + delta_blob


def decode_payload(payload: bytes) -> tuple[UpdateMeta, bytes]:
    """Split a decrypted payload into its metadata and the compressed delta bytes."""
    if len(payload) < 8 or payload[:4] != PAYLOAD_MAGIC:
        raise RejectedUpdate("malformed", "payload has no DFLP magic")
    (meta_len,) = struct.unpack_from(">I", payload, 4)
    if meta_len > MAX_META_BYTES:
        raise RejectedUpdate("oversized", f"payload metadata declares {meta_len} bytes")
    if 8 + meta_len > len(payload):
        raise RejectedUpdate("malformed", "payload metadata runs past the end")
    raw = parse_json_limited(payload[8 : 8 + meta_len], MAX_META_BYTES, "payload metadata")
    if isinstance(raw, dict) and "schema" in raw and raw["schema"] != META_SCHEMA:
        raise RejectedUpdate("unsupported_version", f"payload schema {raw['schema']!r}")
    try:
        meta = UpdateMeta.model_validate(raw)
    except ValidationError as exc:
        raise RejectedUpdate("malformed", f"payload metadata: {_first_error(exc)}") from None
    return meta, payload[8 + meta_len :]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}"


PACKAGE_SCHEMA: Final = "dadm.package.v1"
MAX_METADATA_BYTES: Final = 1024 * 1024


class DpTraining(BaseModel):
    """What a device does for differential privacy (see :mod:`fedlib.server.privacy`): clip at
    the package's ``clip_norm``, report whether it had to (central mode, adaptive
    clipping), or add its own Gaussian noise before sealing (local mode)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["central", "local"]
    #: Local mode: the device adds N(0, (noise_multiplier * clip_norm)**2) per coordinate.
    noise_multiplier: Annotated[float, Field(ge=0, le=1e6)] = 0.0
    #: Central mode with adaptive clipping: report whether the norm was <= clip_norm.
    report_unclipped: bool = False
    #: Local mode: DP updates a device may send in all (its own budget); None = no cap.
    max_updates: Annotated[int, Field(ge=0)] | None = None


class TrainingConfig(BaseModel):
    """The client/round configuration: how devices train for this model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    compression: Literal["topk16", "dense16", "dense32", "dense64"] = "topk16"
    topk_fraction: Annotated[float, Field(gt=0, le=1)] = 0.075
    clip_norm: Annotated[float, Field(gt=0)] = 10.0
    max_rows: Annotated[int, Field(ge=1, le=10_000_000)] = 50_000
    min_rows: Annotated[int, Field(ge=1)] = 10
    #: Differential privacy on the device; None (absent from the JSON) = off.
    dp: DpTraining | None = None


class PrivacySpent(BaseModel):
    """``metadata.json``'s record of the privacy this version's lineage has spent: the
    cumulative (epsilon, delta) over every DP round the server computed so far."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["central", "local"]
    epsilon: Annotated[float, Field(ge=0)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    rounds: Annotated[int, Field(ge=0)]
    accountant: Literal["rdp", "pld"]
    noise_multiplier: Annotated[float, Field(ge=0)]
    clip_norm: Annotated[float, Field(gt=0)]
    budget_epsilon: Annotated[float, Field(gt=0)] | None = None


class PackageMetadata(BaseModel):
    """``metadata.json`` of a model package: what the model is and how to train it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["dadm.package.v1"] = Field(default=PACKAGE_SCHEMA, alias="schema")
    version: Annotated[int, Field(ge=1)]
    model_kind: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]
    model_spec: dict[str, Any]
    feature_schema: dict[str, Any]
    threshold: float | None
    num_params: Annotated[int, Field(ge=1, le=50_000_000)]
    training: TrainingConfig
    metrics: dict[str, float] = Field(default_factory=dict)
    parent_version: int | None = None
    rollback_of: int | None = None
    rollback_reason: str | None = None
    round_id: str | None = None
    candidate_digest: str | None = None
    created_at_ms: int
    #: Differential privacy spent so far (:mod:`fedlib.server.privacy`); None (absent) = DP off.
    privacy: PrivacySpent | None = None

    def to_json(self) -> bytes:
        doc = self.model_dump(by_alias=True, mode="json")
        # DP fields are left out when off: packages without DP keep their exact bytes
        # (and digests), and devices that predate them can still read those packages.
        if doc.get("privacy") is None:
            doc.pop("privacy", None)
        if doc["training"].get("dp") is None:
            doc["training"].pop("dp", None)
        return canonical_json(doc)

    @classmethod
    def from_json(cls, data: bytes) -> PackageMetadata:
        raw = strict_json(data, max_bytes=MAX_METADATA_BYTES, what="metadata.json")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"metadata.json: {_first_error(exc)}") from None

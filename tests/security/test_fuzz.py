"""Fuzzing every parser on a trust boundary: only the documented refusal may escape.

Each target gets real, valid artefacts built once per module (an update envelope sealed
to the server, update payloads in every compression mode, a signed model package, a
small TUF channel in a directory, an air-gap bundle exported from it), a positive
control showing the unmutated artefact is accepted, and a Hypothesis fuzzer that feeds
it mutants: random bytes, truncation at any offset, byte and bit flips, cuts, inserts,
splices (from the input itself or a sibling artefact), "interesting" integers written
over length fields, JSON dictionary tokens, and structure-aware edits of the JSON
documents inside. Where a signature or hash would stop a mutant at the first check,
some mutants are re-signed / re-hashed with the real keys (a malicious enrolled client,
a compromised online key, a hand-edited bundle with a fixed-up manifest), so the
parsers *behind* the signature check get fuzzed too.

The only property checked on a refusal is its type (and reason code where there is
one); anything accepted must still be exactly what was signed. Runs are derandomized
and database-less, so CI sees the same examples every time; ``FEDLIB_FUZZ_SCALE``
multiplies every example count for a longer local or nightly run.
"""

from __future__ import annotations

import base64
import copy
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile

from fedlib.crypto import sealing, signing
from fedlib.errors import REASONS, RejectedUpdate, VerificationError
from fedlib.models.package import ModelPackage
from fedlib.server.fleet import Fleet
from fedlib.storage.store import LocalStore, NoSuchKey
from fedlib.trust.airgap import BundleVerificationError, verify_bundle
from fedlib.trust.airgap_export import export_bundle
from fedlib.trust.channel_client import ChannelClient
from fedlib.trust.channel_repository import ChannelKeys, ChannelRepository
from fedlib.trust.package import sign_package, verify_package_files
from fedlib.wire import compression, protocol
from fedlib.wire.protocol import PackageMetadata, TrainingConfig, UpdateMeta

SCALE = float(os.environ.get("FEDLIB_FUZZ_SCALE", "1"))
EXAMPLES = max(1, int(10_000 * SCALE))
# 10,000 examples per target: the whole suite (make test) runs them, make test-fast does not.
pytestmark = pytest.mark.slow
CHANNEL_EXAMPLES = max(1, int(10_000 * SCALE))


def fuzz(examples: int) -> settings:
    """Reproducible settings: fixed seed per test, no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ============================================================================ mutators

# Values that break length checks: zero, one, sign bits, type maxima, and the bit
# patterns of float32/float16 specials (inf, NaN, max, 1.0, smallest subnormal).
INTERESTING = (
    *(0, 1, 2, 7, 8, 16, 0x3F, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0xFFF, 0x1000),
    *(0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF),
    *(2**53, 2**63 - 1, 2**63, 2**64 - 1),
    *(0x3F800000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0x00000001),
    *(0x3C00, 0x7C00, 0xFC00, 0x7E00, 0x7BFF),
)

# A dictionary of tokens (as AFL uses): JSON literals that are legal but extreme,
# almost legal, or malformed in interesting ways.
JSON_TOKENS = (
    *(b"1e999", b"-1e999", b"1E400", b"2.5e-400", b"-0", b"0", b"-1", b"1.5", b"1e2"),
    *(b"9007199254740993", b"18446744073709551616", b"1" * 4400),
    *(b"NaN", b"Infinity", b"-Infinity", b"null", b"true", b"false", b"tru"),
    *(b'""', b'"\\ud800"', b'"\\u0000"', b'"\\"', b'"../x"', b'"\xff"', b"\xc3", b"\xef\xbb\xbf"),
    *(b"[]", b"{}", b"[" * 64, b"{" * 12, b'{"a":' * 12, b'"a":1,', b',"a":1', b",", b":"),
    *(b'"schema":"x",', b'"version":0,', b'"version":1,', b"]", b"}", b" ", b"\t", b"\x00"),
)

# JSON-level edits can write these placeholders; ``dumps`` turns them into raw number
# literals that json.dumps itself can never produce (overflowing floats, huge ints).
RAW_LITERALS = {
    "\x00raw:inf": "1e999",
    "\x00raw:-inf": "-1e999",
    "\x00raw:underflow": "2.5e-400",
    "\x00raw:negzero": "-0",
    "\x00raw:bigint": "1" * 30,
}


class Blob(bytes):
    """Bytes with a short repr (and a note on how they were made), so a failing
    example's report stays readable instead of dumping tens of kilobytes."""

    note: str

    def __new__(cls, data: bytes, note: str = "") -> Blob:
        blob = super().__new__(cls, data)
        blob.note = note
        return blob

    def __repr__(self) -> str:
        digest = hashlib.sha256(self).hexdigest()[:16]
        head = f"Blob({len(self)} bytes, sha256 {digest}…, starts {bytes(self[:48])!r}"
        return head + (f", {self.note})" if self.note else ")")


class Opaque:
    """A fixture object Hypothesis prints by name only (not its kilobytes of fields)."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"<{type(self).__name__}>")


ByteOrder = Literal["big", "little"]


@dataclass(frozen=True)
class Field:
    """A fixed-width integer in a binary format, e.g. a declared length."""

    offset: int
    width: int
    order: ByteOrder = "big"


def _int_value(draw: st.DrawFn, width: int, current: int, length: int) -> int:
    value = draw(
        st.sampled_from(INTERESTING)
        | st.integers(-16, 16).map(lambda d: current + d)
        | st.integers(-16, 16).map(lambda d: length + d)
        | st.integers(0, 2 ** (8 * width) - 1)
    )
    return value % 2 ** (8 * width)


@st.composite
def mutated(
    draw: st.DrawFn,
    base: bytes,
    *,
    fields: Sequence[Field] = (),
    tokens: Sequence[bytes] = (),
    donors: Sequence[bytes] = (),
    max_ops: int = 4,
) -> bytes:
    """``base`` after 1..max_ops byte-level mutations."""
    data = bytearray(base)
    ops = ["flip", "bit", "truncate", "cut", "insert", "splice", "int"]
    ops += ["field"] * 3 if fields else []
    ops += ["token"] * 2 if tokens else []
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(ops))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "bit" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            source = draw(st.sampled_from([bytes(data), *donors]))
            start = draw(st.integers(0, len(source)))
            chunk = source[start : start + draw(st.integers(1, 128))]
            if draw(st.booleans()):
                data[at:at] = chunk
            else:
                data[at : at + len(chunk)] = chunk
        elif op == "int":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            order: ByteOrder = draw(st.sampled_from(["big", "little"]))
            current = int.from_bytes(data[at : at + width], order)
            data[at : at + width] = _int_value(draw, width, current, len(data)).to_bytes(
                width, order
            )
        elif op == "field":
            f = draw(st.sampled_from(fields))
            if f.offset + f.width <= len(data):
                end = f.offset + f.width
                current = int.from_bytes(data[f.offset : end], f.order)
                value = _int_value(draw, f.width, current, len(data))
                data[f.offset : end] = value.to_bytes(f.width, f.order)
        elif op == "token":
            token = draw(st.sampled_from(tokens))
            if draw(st.booleans()):
                data[at:at] = token
            else:
                data[at : at + len(token)] = token
    return bytes(data)


@functools.cache
def mutants(
    base: bytes,
    *,
    fields: tuple[Field, ...] = (),
    tokens: tuple[bytes, ...] = (),
    max_ops: int = 4,
) -> st.SearchStrategy[bytes]:
    """:func:`mutated`, built once per input (building strategies is not free)."""
    return mutated(base, fields=fields, tokens=tokens, max_ops=max_ops)


def _leaves(doc: Any) -> list[Any]:
    if isinstance(doc, dict):
        return [*doc.keys(), *(leaf for v in doc.values() for leaf in _leaves(v))]
    if isinstance(doc, list):
        return [leaf for v in doc for leaf in _leaves(v)]
    return [doc]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, (*prefix, index))
    return found


def json_values(harvest: Sequence[Any] = ()) -> st.SearchStrategy[Any]:
    """Replacement values: extreme literals, values seen in the document, any JSON."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.sampled_from([0, 1, -1, 2, 2**31, 2**32, 2**53 + 1, 2**63, 2**64])
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=24)
        | st.sampled_from(["", "../x", "/abs", "a/../b", "x" * 300])
    )
    generic = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=6,
    )
    raw = st.sampled_from(list(RAW_LITERALS))
    return raw | st.sampled_from(list(harvest)) | generic if harvest else raw | generic


def json_mutation(doc: Any) -> st.SearchStrategy[Any]:
    """``doc`` with 1..3 structural edits: delete, replace, add a key, or wrap a value.

    Replacement values mix generic JSON with strings and numbers harvested from ``doc``
    itself (valid enum values, key ids, versions), so edits stay near the format.
    """
    harvest = [leaf for leaf in _leaves(doc) if isinstance(leaf, str | int | float | bool)]
    harvest = sorted(set(harvest), key=repr)[:200]
    keys = [k for k in harvest if isinstance(k, str)] or [""]
    values = json_values(harvest)
    new_keys = st.text(max_size=12) | st.sampled_from(keys)
    ops = st.sampled_from(["delete", "replace", "replace", "add", "wrap"])

    @st.composite
    def edit(draw: st.DrawFn) -> Any:
        out = copy.deepcopy(doc)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(_paths(out)))
            if not path:
                if draw(st.integers(0, 9)) == 0:
                    out = draw(values)
                continue
            parent: Any = out
            for step in path[:-1]:
                parent = parent[step]
            op = draw(ops)
            if op == "delete":
                del parent[path[-1]]
            elif op == "replace":
                parent[path[-1]] = draw(values)
            elif op == "wrap":
                old = parent[path[-1]]
                parent[path[-1]] = [old] if draw(st.booleans()) else {"x": old}
            elif isinstance(parent, dict):
                parent[draw(new_keys)] = draw(values)
            else:
                parent.insert(draw(st.integers(0, len(parent))), draw(values))
        return out

    return edit()


def dumps(doc: Any, *, canonical: bool = True) -> bytes:
    """JSON text of ``doc``, with :data:`RAW_LITERALS` placeholders made raw numbers."""
    text = json.dumps(
        doc,
        sort_keys=canonical,
        separators=(",", ":") if canonical else (", ", ": "),
        ensure_ascii=False,
    )
    for marker, literal in RAW_LITERALS.items():
        text = text.replace(json.dumps(marker, ensure_ascii=False), literal)
    return text.encode("utf-8", "surrogatepass")  # lone surrogates: invalid UTF-8 on purpose


@functools.cache
def json_mutants(text: bytes) -> st.SearchStrategy[Any]:
    """:func:`json_mutation` of the JSON document ``text``, built once per document."""
    return json_mutation(json.loads(text))


def json_documents(doc: Any) -> st.SearchStrategy[bytes]:
    """Mutants of ``doc`` as JSON text, canonical or spaced."""
    return st.tuples(json_mutation(doc), st.booleans()).map(lambda t: dumps(t[0], canonical=t[1]))


# ============================================================================ 1. envelopes

CLIENT_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
REVOKED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
UNKNOWN_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
SERVER_KEY = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
FLEET = Fleet()
FLEET.enroll("client-1", sealing.public_pem(CLIENT_KEY), now_ms=0)
FLEET.enroll("client-2", sealing.public_pem(REVOKED_KEY), now_ms=0)
FLEET.revoke("client-2", now_ms=1)
RING = sealing.ServerKeyring()
RING.add(SERVER_KEY)


@dataclass(frozen=True)
class PayloadCase:
    name: str
    dim: int
    payload: bytes
    meta_len: int


def _payload_case(name: str, x: np.ndarray, mode: str, fraction: float = 0.1) -> PayloadCase:
    blob = compression.encode(x, compression.CompressionConfig(mode, fraction))  # type: ignore[arg-type]
    meta = UpdateMeta.model_validate(
        {
            "schema": protocol.META_SCHEMA,
            "model_kind": "autoencoder",
            "num_params": int(x.shape[0]),
            "num_samples": 1200,
            "epochs": 2,
            "compression": mode,
            "metrics": {"loss": 0.25, "auc": 0.9},
        }
    )
    payload = protocol.encode_payload(meta, blob)
    return PayloadCase(name, int(x.shape[0]), payload, struct.unpack_from(">I", payload, 4)[0])


def _payload_cases() -> list[PayloadCase]:
    rng = np.random.default_rng(7)
    small = rng.normal(size=300)
    gap = np.zeros(70_000)
    gap[np.arange(70) * 1000] = rng.normal(size=70) + 10.0  # dim > 2**16, small gaps
    far = np.zeros(70_000)
    far[np.r_[0:35, 69_965:70_000]] = rng.normal(size=70) + 10.0  # one gap >= 2**16
    cases = [
        _payload_case("topk16-abs16", small, "topk16"),
        _payload_case("topk16-gap16", gap, "topk16", 0.001),
        _payload_case("topk16-abs32", far, "topk16", 0.001),
        *(_payload_case(mode, small[:64], mode) for mode in ("dense16", "dense32", "dense64")),
    ]
    idx_codes = [c.payload[8 + c.meta_len + 5] for c in cases[:3]]
    assert idx_codes == [2, 1, 3], idx_codes  # every index encoding is covered
    return cases


PAYLOADS = _payload_cases()
PAYLOAD = PAYLOADS[0].payload
HEADER, ENVELOPE = sealing.seal_update(
    client_id="client-1",
    client_key=CLIENT_KEY,
    server_public_key=SERVER_KEY.public_key(),
    base_version=3,
    payload=PAYLOAD,
)
_, REVOKED_ENVELOPE = sealing.seal_update(
    client_id="client-2",
    client_key=REVOKED_KEY,
    server_public_key=SERVER_KEY.public_key(),
    base_version=3,
    payload=PAYLOADS[3].payload,
)
PARTS = protocol.split_envelope(ENVELOPE)
HEADER_DOC = json.loads(PARTS.header_bytes)
PREFIX_LEN = 4 + 1 + 16 + 4
# magic, framing version, the u32 header length, and two words of the signer's key id
ENVELOPE_FIELDS = (Field(0, 4), Field(4, 1), Field(21, 4), Field(5, 4), Field(17, 4))
HEADER_MUTANTS = json_documents(HEADER_DOC)
RAW_ENVELOPES = mutated(ENVELOPE, fields=ENVELOPE_FIELDS, donors=[REVOKED_ENVELOPE], max_ops=3)
BODY_MUTANTS = mutated(
    PARTS.signed_bytes, fields=ENVELOPE_FIELDS, tokens=JSON_TOKENS, donors=[REVOKED_ENVELOPE]
)


def _frame(header_bytes: bytes, ciphertext: bytes, key_id: str = PARTS.key_id) -> bytes:
    """Framing without the sender-side size check (an attacker's encoder)."""
    return (
        struct.pack(">4sB16sI", protocol.UPDATE_MAGIC, 1, bytes.fromhex(key_id), len(header_bytes))
        + header_bytes
        + ciphertext
    )


def _sign(body: bytes, key: ed25519.Ed25519PrivateKey = CLIENT_KEY) -> bytes:
    return body + key.sign(protocol.SIGNATURE_DOMAIN + body)


@st.composite
def envelope_inputs(draw: st.DrawFn) -> bytes:
    mode = draw(st.sampled_from(["raw", "raw", "resigned", "resigned", "header", "random"]))
    if mode == "raw":  # an attacker without the client's key
        return draw(RAW_ENVELOPES)
    if mode == "resigned":  # a malicious enrolled client signs whatever framing it likes
        body = draw(BODY_MUTANTS)
        key = draw(st.sampled_from([CLIENT_KEY, CLIENT_KEY, REVOKED_KEY, UNKNOWN_KEY]))
        return _sign(body, key)
    if mode == "header":  # ... or whatever header, with the real ciphertext
        header = draw(HEADER_MUTANTS)
        ciphertext = draw(st.sampled_from([PARTS.ciphertext, PARTS.ciphertext[:-1], b""]))
        return _sign(_frame(header, ciphertext))
    prefix = draw(st.sampled_from([b"", ENVELOPE[:PREFIX_LEN], ENVELOPE[:21]]))
    return prefix + draw(st.binary(max_size=300))


def test_envelope_positive_control() -> None:
    opened = sealing.open_update(ENVELOPE, FLEET, RING)
    assert opened.header == HEADER and opened.payload == PAYLOAD
    assert _sign(PARTS.signed_bytes) == ENVELOPE  # Ed25519 is deterministic: the re-signer works
    assert sealing.open_update(_sign(_frame(PARTS.header_bytes, PARTS.ciphertext)), FLEET, RING)
    with pytest.raises(RejectedUpdate) as err:
        sealing.open_update(REVOKED_ENVELOPE, FLEET, RING)
    assert err.value.reason == "revoked_client"


@fuzz(EXAMPLES)
@given(blob=envelope_inputs())
def test_fuzz_open_update(blob: bytes) -> None:
    try:
        opened = sealing.open_update(blob, FLEET, RING)
    except RejectedUpdate as exc:
        assert exc.reason in REASONS
        event(exc.reason)
        return
    # HPKE binds the header's digest and the signature covers the rest: anything that
    # opens carries exactly the sealed header and payload.
    assert opened.header == HEADER
    assert opened.payload == PAYLOAD


# ============================================================================ 2. payloads


def _payload_fields(case: PayloadCase) -> tuple[Field, ...]:
    at = 8 + case.meta_len  # the compressed delta's header, little-endian
    return (
        Field(4, 4),
        Field(at + 4, 1, "little"),
        Field(at + 5, 1, "little"),
        Field(at + 6, 2, "little"),
        Field(at + 8, 4, "little"),
        Field(at + 12, 4, "little"),
        Field(at + 16, 4, "little"),
        Field(at + 20, 2, "little"),
        Field(len(case.payload) - 2, 2, "little"),
    )


def _payload_meta(case: PayloadCase) -> Any:
    return json.loads(case.payload[8 : 8 + case.meta_len])


def _payload_mutants(case: PayloadCase) -> st.SearchStrategy[tuple[PayloadCase, bytes]]:
    head, delta = case.payload[: 8 + case.meta_len], case.payload[8 + case.meta_len :]
    donors = [p.payload for p in PAYLOADS if p is not case][:2]
    delta_fields = tuple(
        Field(f.offset - len(head), f.width, f.order)
        for f in _payload_fields(case)[1:]
        if f.offset >= len(head)
    )
    raw = mutated(case.payload, fields=_payload_fields(case), tokens=JSON_TOKENS, donors=donors)
    # metadata intact, so the delta decoder sees every mutant
    deltas = mutated(delta, fields=delta_fields).map(lambda d: head + d)
    metas = json_documents(_payload_meta(case)).map(
        lambda m: protocol.PAYLOAD_MAGIC + struct.pack(">I", len(m)) + m + delta
    )
    random = st.tuples(
        st.sampled_from([b"", protocol.PAYLOAD_MAGIC, head]), st.binary(max_size=300)
    ).map(b"".join)
    return st.tuples(st.just(case), raw | deltas | deltas | metas | random)


PAYLOAD_INPUTS = st.one_of([_payload_mutants(case) for case in PAYLOADS])


def _open_payload(payload: bytes, dim: int) -> tuple[UpdateMeta, compression.DecodedDelta]:
    meta, delta = protocol.decode_payload(payload)
    return meta, compression.decode(delta, expected_dim=dim)


@pytest.mark.parametrize("case", PAYLOADS, ids=lambda c: c.name)
def test_payload_positive_control(case: PayloadCase) -> None:
    meta, decoded = _open_payload(case.payload, case.dim)
    assert meta.num_params == case.dim and decoded.dim == case.dim
    assert decoded.nnz == (case.dim if decoded.indices is None else {300: 30, 70_000: 70}[case.dim])


@fuzz(EXAMPLES)
@given(inputs=PAYLOAD_INPUTS)
def test_fuzz_decode_payload(inputs: tuple[PayloadCase, bytes]) -> None:
    case, blob = inputs
    try:
        meta, decoded = _open_payload(blob, case.dim)
    except RejectedUpdate as exc:
        assert exc.reason in REASONS
        event(exc.reason)
        return
    event("accepted")
    assert isinstance(meta, UpdateMeta)
    assert decoded.dim == case.dim
    assert np.isfinite(decoded.values).all()
    if decoded.indices is not None:
        assert decoded.indices.shape == decoded.values.shape and decoded.nnz >= 1
        assert (np.diff(decoded.indices) > 0).all()
        assert decoded.indices[0] >= 0 and decoded.indices[-1] < case.dim
    else:
        assert decoded.values.shape == (case.dim,)


# ============================================================================ 3. packages

PKG_KEY = ec.derive_private_key(0x5EED_F00D, ec.SECP256R1())
TRUSTED = {signing.key_id(PKG_KEY): PKG_KEY.public_key()}
PACKAGE = ModelPackage(
    metadata=PackageMetadata(
        version=3,
        model_kind="autoencoder",
        model_spec={"kind": "autoencoder", "layers": [4, 2, 4], "activation": "tanh"},
        feature_schema={"names": ["a", "b", "c", "d"], "transform": "log1p", "scale": [1.0] * 4},
        threshold=0.5,
        num_params=16,
        training=TrainingConfig(),
        metrics={"auc": 0.93, "ap": 0.7},
        parent_version=2,
        round_id="round-0003",
        candidate_digest="ab" * 32,
        created_at_ms=1_700_000_000_000,
    ),
    onnx_bytes=b"\x08\x07onnx-graph" * 20,
    weights=np.linspace(-1.0, 1.0, 16),
)
METADATA_JSON = PACKAGE.metadata.to_json()
METADATA_DOC = json.loads(METADATA_JSON)
CONTENT = PACKAGE.files()
SIGNATURE = sign_package(PACKAGE, PKG_KEY)
FILES = {**CONTENT, signing.SIGNATURE_FILE: SIGNATURE}
METADATA_MUTANTS = json_documents(METADATA_DOC)


@st.composite
def metadata_inputs(draw: st.DrawFn) -> bytes:
    mode = draw(st.sampled_from(["raw", "json", "json", "random"]))
    if mode == "raw":
        return draw(mutants(METADATA_JSON, tokens=JSON_TOKENS))
    if mode == "json":
        return draw(METADATA_MUTANTS)
    return draw(st.binary(max_size=200))


def test_package_metadata_positive_control() -> None:
    assert PackageMetadata.from_json(METADATA_JSON) == PACKAGE.metadata
    assert PackageMetadata.from_json(dumps(METADATA_DOC, canonical=False)) == PACKAGE.metadata


@fuzz(EXAMPLES)
@given(raw=metadata_inputs())
def test_fuzz_package_metadata_from_json(raw: bytes) -> None:
    try:
        meta = PackageMetadata.from_json(raw)
    except ValueError:
        return
    assert isinstance(meta, PackageMetadata)


def _statement(signature: bytes) -> Any:
    return json.loads(base64.b64decode(json.loads(signature)["dsseEnvelope"]["payload"]))


def _resign_statement(statement: bytes) -> bytes:
    """A DSSE bundle over ``statement`` exactly as signing.sign_files frames one."""
    payload_type = signing.PAYLOAD_TYPE.encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type, len(statement), statement)
    sig = PKG_KEY.sign(pae, ec.ECDSA(hashes.SHA256()))
    bundle = json.loads(SIGNATURE)
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(statement).decode()
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(sig).decode()
    return json.dumps(bundle).encode()


def _sign_content(content: dict[str, bytes]) -> bytes | None:
    try:
        return signing.sign_files(content, PKG_KEY, model_name="v00000003")
    except ValueError:  # the signer refuses names it cannot sign: keep the old signature
        return None


FILE_NAMES = (*CONTENT, "extra.bin", ".git", "a/../b", "", "signature.bin/x", "metadata.json ")
SIGNATURE_MUTANTS = mutated(SIGNATURE, tokens=JSON_TOKENS) | st.binary(max_size=300)
BUNDLE_MUTANTS = json_documents(json.loads(SIGNATURE))
STATEMENT_MUTANTS = mutated(dumps(_statement(SIGNATURE)), tokens=JSON_TOKENS) | json_documents(
    _statement(SIGNATURE)
)
CONTENT_MUTANTS = {
    "metadata.json": mutated(CONTENT["metadata.json"], tokens=JSON_TOKENS) | METADATA_MUTANTS,
    "model.onnx": mutated(CONTENT["model.onnx"]),
    "weights.bin": mutated(
        CONTENT["weights.bin"],
        fields=tuple(Field(at, 8, "little") for at in range(0, len(CONTENT["weights.bin"]), 8)),
    ),
}


@st.composite
def package_inputs(draw: st.DrawFn) -> dict[str, bytes]:
    mode = draw(
        st.sampled_from(["signature", "bundle", "statement", "file", "resigned", "resigned", "set"])
    )
    files = dict(FILES)
    if mode == "signature":  # bytes of signature.bin
        files[signing.SIGNATURE_FILE] = draw(SIGNATURE_MUTANTS)
    elif mode == "bundle":  # the bundle's JSON structure
        files[signing.SIGNATURE_FILE] = draw(BUNDLE_MUTANTS)
    elif mode == "statement":  # a statement validly signed by the pinned key
        files[signing.SIGNATURE_FILE] = _resign_statement(draw(STATEMENT_MUTANTS))
    elif mode in ("file", "resigned"):  # a file changed, then (maybe) signed again
        name = draw(st.sampled_from(sorted(CONTENT)))
        files[name] = draw(CONTENT_MUTANTS[name])
        if mode == "resigned":
            content = {n: d for n, d in files.items() if n != signing.SIGNATURE_FILE}
            files[signing.SIGNATURE_FILE] = _sign_content(content) or SIGNATURE
    else:  # the set of files: drop, add or rename one, re-signed or not
        name = draw(st.sampled_from(sorted(files)))
        op = draw(st.sampled_from(["drop", "add", "rename"]))
        data = files.pop(name) if op != "add" else draw(st.binary(max_size=16))
        if op != "drop":
            files[draw(st.sampled_from(FILE_NAMES))] = data
        if draw(st.booleans()):
            content = {n: d for n, d in files.items() if n != signing.SIGNATURE_FILE}
            signature = _sign_content(content)
            if signature is not None:
                files[signing.SIGNATURE_FILE] = signature
    return files


def test_package_files_positive_control() -> None:
    package = verify_package_files(FILES, TRUSTED, expected_version=3)
    assert package.digest() == PACKAGE.digest()
    content = {n: d for n, d in FILES.items() if n != signing.SIGNATURE_FILE}
    assert verify_package_files({**content, "signature.bin": _sign_content(content)}, TRUSTED)
    statement = json.dumps(_statement(SIGNATURE)).encode()
    resigned = {**FILES, signing.SIGNATURE_FILE: _resign_statement(statement)}
    assert verify_package_files(resigned, TRUSTED).digest() == PACKAGE.digest()


@fuzz(EXAMPLES)
@given(files=package_inputs())
def test_fuzz_verify_package_files(files: dict[str, bytes]) -> None:
    try:
        package = verify_package_files(files, TRUSTED)
    except VerificationError:
        return
    # Accepted: the files are exactly those a pinned-key signature covers, parsed as such.
    content = {n: d for n, d in files.items() if n != signing.SIGNATURE_FILE}
    signing.verify_files(files[signing.SIGNATURE_FILE], content, TRUSTED)
    assert package.metadata == PackageMetadata.from_json(content["metadata.json"])
    assert package.onnx_bytes == content["model.onnx"]
    assert package.weights.astype("<f8").tobytes() == content["weights.bin"]


# ============================================================================ 4. channel

CHANNEL_FILES = {
    "model.onnx": b"onnx-graph-v1" * 40,
    "weights.bin": b"\x01\x02" * 256,
    "metadata.json": b'{"version":1}',
}
MD = "tuf/metadata/"


def _fixed_channel_keys() -> ChannelKeys:
    """Channel keys from fixed seeds (Ed25519 signs deterministically): stabler examples."""

    def signer(seed: int) -> CryptoSigner:
        return CryptoSigner(ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))

    return ChannelKeys(
        root=[signer(1), signer(2), signer(3)],
        targets=signer(4),
        snapshot=signer(5),
        timestamp=signer(6),
    )


def _channel_package() -> dict[str, bytes]:
    return {**CHANNEL_FILES, "signature.bin": signing.sign_files(CHANNEL_FILES, PKG_KEY)}


@dataclass(repr=False)
class Channel(Opaque):
    """A published TUF channel in a directory, and a device that reads it."""

    store_dir: Path
    work_dir: Path
    keys: ChannelKeys
    trusted_root: bytes
    originals: dict[str, bytes]  # every object in the store, by key
    files: dict[str, bytes]  # the published package files
    timestamp: str
    snapshot: str
    targets: str

    def meta(self, key: str, replaced: dict[str, bytes | None]) -> bytes:
        data = replaced.get(key, self.originals[key])
        assert data is not None
        return data

    def rehash(self, replaced: dict[str, bytes | None]) -> None:
        """Re-sign the parents of a changed snapshot/targets so the change gets parsed."""
        if self.targets in replaced:
            snapshot = Metadata.from_bytes(self.originals[self.snapshot])
            old = snapshot.signed.meta["targets.json"]
            snapshot.signed.meta["targets.json"] = MetaFile.from_data(
                old.version, self.meta(self.targets, replaced), ["sha256"]
            )
            snapshot.sign(self.keys.snapshot)
            replaced[self.snapshot] = Blob(snapshot.to_bytes())
        if self.snapshot in replaced:
            timestamp = Metadata.from_bytes(self.originals[self.timestamp])
            old = timestamp.signed.snapshot_meta
            timestamp.signed.snapshot_meta = MetaFile.from_data(
                old.version, self.meta(self.snapshot, replaced), ["sha256"]
            )
            timestamp.sign(self.keys.timestamp)
            replaced[self.timestamp] = Blob(timestamp.to_bytes())

    def role_signer(self, key: str) -> Any:
        return {
            self.timestamp: self.keys.timestamp,
            self.snapshot: self.keys.snapshot,
            self.targets: self.keys.targets,
        }[key]

    def run(self, replaced: dict[str, bytes | None]) -> dict[str, bytes]:
        """Refresh and download version 1 with a fresh device state over the changed store."""
        for key, data in replaced.items():
            path = self.store_dir.joinpath(*key.split("/"))
            if data is None:
                path.unlink()
            else:
                path.write_bytes(data)
        device = Path(tempfile.mkdtemp(dir=self.work_dir))
        try:
            client = ChannelClient(
                self.store_dir, device / "metadata", device / "targets", self.trusted_root
            )
            client.refresh()
            return client.download(1)
        finally:
            shutil.rmtree(device)
            for key in replaced:
                self.store_dir.joinpath(*key.split("/")).write_bytes(self.originals[key])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Scratch space on tmpfs when there is one.

    Every channel/bundle example writes a dozen small files (the device's metadata and
    targets, the unpacked bundle). On a disk-backed /tmp each write can cost ~2 ms,
    which would dominate the run; in memory the same example costs a few ms in total.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="fedlib-fuzz-") as tmp:
            yield Path(tmp)
    else:
        yield tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def channel(scratch: Path) -> Channel:
    base = scratch / "channel"
    store = LocalStore(base / "store")
    keys = _fixed_channel_keys()
    repo = ChannelRepository(store, keys)
    repo.init()
    files = _channel_package()
    repo.publish(1, files)
    status = repo.status()
    originals = {info.key: store.get(info.key) for info in store.list("")}
    (base / "work").mkdir()
    return Channel(
        store_dir=base / "store",
        work_dir=base / "work",
        keys=keys,
        trusted_root=repo.root_bytes(1),
        originals=originals,
        files=files,
        timestamp=MD + "timestamp.json",
        snapshot=f"{MD}{status.snapshot_version}.snapshot.json",
        targets=f"{MD}{status.targets_version}.targets.json",
    )


def _resign_role(channel: Channel, key: str, signed: Any) -> bytes:
    """``signed`` signed by the role's real online key, as ngclient would check it.

    ngclient verifies signatures over its own canonical re-serialisation, so a mutant
    is signed only if python-tuf can parse and re-serialise it; otherwise it is written
    unsigned (and still reaches the device's parser).
    """
    doc = {"signatures": json.loads(channel.originals[key])["signatures"], "signed": signed}
    try:
        md = Metadata.from_dict(copy.deepcopy(doc))
        md.sign(channel.role_signer(key))
        return md.to_bytes()
    except Exception:  # the attacker's tooling failed, not the system under test
        return dumps(doc, canonical=False)


@st.composite
def channel_inputs(draw: st.DrawFn, channel: Channel) -> tuple[str, dict[str, bytes | None]]:
    roles = [channel.timestamp, channel.snapshot, channel.targets]
    mode = draw(st.sampled_from(["raw", "raw", "signed", "signed", "signed", "file", "random"]))
    replaced: dict[str, bytes | None] = {}
    if mode == "raw":  # bytes of one role's metadata, parents re-hashed or not
        key = draw(st.sampled_from(roles))
        replaced[key] = Blob(draw(mutants(channel.originals[key], tokens=JSON_TOKENS, max_ops=3)))
        if draw(st.integers(0, 3)):
            channel.rehash(replaced)
    elif mode == "signed":  # one role's signed content, validly re-signed and re-hashed
        key = draw(st.sampled_from(roles))
        signed_text = json.dumps(json.loads(channel.originals[key])["signed"]).encode()
        signed = draw(json_mutants(signed_text))
        replaced[key] = Blob(_resign_role(channel, key, signed))
        channel.rehash(replaced)
    elif mode == "file":  # a target file changed, or any object missing
        key = draw(st.sampled_from(sorted(channel.originals)))
        mutant = draw(st.none() | mutants(channel.originals[key], max_ops=2))
        replaced[key] = None if mutant is None else Blob(mutant)
    else:
        replaced[channel.timestamp] = Blob(draw(st.binary(max_size=300)))
    return mode, replaced


def test_channel_positive_control(channel: Channel) -> None:
    assert channel.run({}) == channel.files
    replaced: dict[str, bytes | None] = {
        channel.targets: _resign_role(
            channel, channel.targets, json.loads(channel.originals[channel.targets])["signed"]
        )
    }
    channel.rehash(replaced)
    assert channel.run(replaced) == channel.files  # the re-signing harness itself is sound
    assert channel.run({}) == channel.files  # and the store was restored


@fuzz(CHANNEL_EXAMPLES)
@given(data=st.data())
def test_fuzz_channel_metadata(channel: Channel, data: st.DataObject) -> None:
    mode, replaced = data.draw(channel_inputs(channel))
    try:
        files = channel.run(replaced)
    except (VerificationError, NoSuchKey) as exc:
        event(f"{mode}: {type(exc).__name__} {getattr(exc, 'reason', '')}")
        return
    event(f"{mode}: accepted")
    # Accepted: every file is a published one (lengths and hashes come from signed metadata).
    assert files and all(channel.files[name] == body for name, body in files.items())


# ============================================================================ 5. air-gap bundles


@dataclass(repr=False)
class Bundle(Opaque):
    bundle: bytes
    members: list[tuple[str, bytes]]
    header_offsets: list[int]
    trusted_root: bytes
    package_keys: dict[str, ec.EllipticCurvePublicKey]
    files: dict[str, bytes]
    work_dir: Path

    def verify(self, data: bytes) -> Any:
        return verify_bundle(
            data,
            trusted_root=self.trusted_root,
            trusted_package_keys=self.package_keys,
            installed_version=None,
            workdir=self.work_dir,
        )


def _tar(members: Sequence[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fix_manifest(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """What a hand-editor does after changing a member: recompute manifest.json."""
    try:
        doc = json.loads(dict(members)["manifest.json"])
        doc["files"] = {
            name: {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in members
            if name != "manifest.json"
        }
    except (KeyError, ValueError, TypeError):
        return members
    manifest = dumps(doc)
    return [(n, manifest if n == "manifest.json" else d) for n, d in members]


@pytest.fixture(scope="module")
def bundle(scratch: Path) -> Bundle:
    base = scratch / "bundle"
    store = LocalStore(base / "store")
    repo = ChannelRepository(store, _fixed_channel_keys())
    repo.init()
    files = _channel_package()
    repo.publish(1, files)
    data, _ = export_bundle(
        store, version=1, expires_in_days=30, repository=repo, package_keys=TRUSTED
    )
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        infos = tar.getmembers()
        members = [(i.name, tar.extractfile(i).read()) for i in infos]  # type: ignore[union-attr]
    return Bundle(
        bundle=data,
        members=members,
        header_offsets=[i.offset for i in infos],
        trusted_root=repo.root_bytes(1),
        package_keys=TRUSTED,
        files=files,
        work_dir=base / "work",
    )


# (offset in a 512-byte ustar header, width): name, mode, uid, size, mtime, checksum,
# type flag, link name, magic/version, prefix
TAR_FIELDS = ((0, 100), (100, 8), (108, 8), (124, 12), (136, 12), (148, 8), (156, 1))
TAR_FIELDS += ((157, 100), (257, 8), (345, 155))
MEMBER_NAMES = (
    "../x",
    "/abs",
    "metadata/../../x",
    "metadata/.",
    "targets/a/b/c",
    "metadata/timestamp.json",
    "manifest.json",
    "README.txt",
    "a\\b",
    "x" * 120,
    "metadata/2.root.json",
)


@st.composite
def tar_header_edit(draw: st.DrawFn, bundle: Bundle) -> bytes:
    """One header field rewritten with a plausible value; checksum fixed (mostly)."""
    data = bytearray(bundle.bundle)
    block = draw(st.sampled_from(bundle.header_offsets))
    offset, width = draw(st.sampled_from(TAR_FIELDS))
    if offset in (100, 108, 124, 136):  # octal numbers, or base-256 for huge ones
        number = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**33))
        if draw(st.booleans()) and number < 8 ** (width - 1):
            value = f"{number:0{width - 1}o}".encode() + b"\0"
        else:
            value = b"\x80" + (number % 2 ** (8 * (width - 1))).to_bytes(width - 1, "big")
    elif offset == 156:
        value = draw(st.sampled_from(list(b"0123456789LKxgSDAV\0 "))).to_bytes(1, "big")
    else:
        value = draw(
            st.sampled_from([n.encode() for n in MEMBER_NAMES]) | st.binary(max_size=width)
        )
    value = value[:width].ljust(width, b"\0")
    data[block + offset : block + offset + width] = value
    if draw(st.integers(0, 4)):
        header = data[block : block + 512]
        header[148:156] = b" " * 8
        data[block + 148 : block + 156] = f"{sum(header):06o}".encode() + b"\0 "
    return bytes(data)


@st.composite
def bundle_inputs(draw: st.DrawFn, bundle: Bundle) -> tuple[str, Blob]:
    mode = draw(
        st.sampled_from(
            ["raw", "raw", "header", "header", "members", "members", "manifest", "gzip", "random"]
        )
    )
    if mode == "raw":  # bytes of the tar; size fields are length fields
        fields = tuple(Field(at + 124, 12) for at in bundle.header_offsets)
        return mode, Blob(draw(mutants(bundle.bundle, fields=fields, tokens=JSON_TOKENS)))
    if mode == "header":
        return mode, Blob(draw(tar_header_edit(bundle)))
    if mode == "random":
        raw = draw(st.binary(max_size=600))
        return mode, Blob(raw.ljust(draw(st.sampled_from([len(raw), tarfile.RECORDSIZE])), b"\0"))
    members = list(bundle.members)
    if mode == "manifest":  # manifest.json's structure, other members' entries fixed or not
        manifest = dumps(draw(json_mutants(dict(members)["manifest.json"])))
        members = [(n, manifest if n == "manifest.json" else d) for n, d in members]
        fixed = draw(st.booleans())
        members = _fix_manifest(members) if fixed else members
        note = f"manifest {dict(members)['manifest.json'][:600]!r}, fixed={fixed}"
    else:  # one member changed, dropped, duplicated, renamed, added or swapped
        index = draw(st.integers(0, len(members) - 1))
        name, data = members[index]
        op = draw(st.sampled_from(["content", "content", "drop", "dup", "rename", "add", "swap"]))
        if op == "content":
            members[index] = (name, draw(mutants(data, tokens=JSON_TOKENS, max_ops=2)))
        elif op == "drop":
            del members[index]
        elif op == "dup":
            members.insert(draw(st.integers(0, len(members))), (name, data))
        elif op == "rename":
            members[index] = (draw(st.sampled_from(MEMBER_NAMES)), data)
        elif op == "add":
            members.append((draw(st.sampled_from(MEMBER_NAMES)), draw(st.binary(max_size=64))))
        else:
            other = draw(st.integers(0, len(members) - 1))
            members[index], members[other] = (name, members[other][1]), (members[other][0], data)
        fixed = draw(st.integers(0, 3)) > 0
        members = _fix_manifest(members) if fixed else members
        note = f"{op} {name!r}, manifest fixed={fixed}"
    try:
        packed = _tar(members)
    except (ValueError, UnicodeError):  # names tarfile itself cannot write
        packed = bundle.bundle
    if mode == "gzip":
        packed = gzip.compress(packed, mtime=0)
        if draw(st.booleans()):
            packed = draw(mutated(packed, max_ops=2))  # a fresh input each time
            note += ", gzip stream mutated"
    return mode, Blob(packed, note)


def test_bundle_positive_control(bundle: Bundle) -> None:
    verified = bundle.verify(bundle.bundle)
    assert verified.version == 1 and verified.files == bundle.files
    repacked = _tar(_fix_manifest(bundle.members))
    assert bundle.verify(repacked).files == bundle.files  # the re-packer is sound
    assert bundle.verify(gzip.compress(repacked)).files == bundle.files
    assert not list(bundle.work_dir.iterdir())  # nothing left behind


@fuzz(EXAMPLES)
@given(data=st.data())
def test_fuzz_verify_bundle(bundle: Bundle, data: st.DataObject) -> None:
    mode, raw = data.draw(bundle_inputs(bundle))
    try:
        verified = bundle.verify(raw)
    except BundleVerificationError as exc:
        event(f"{mode}: {exc.reason}")
        verified = None
    assert not any(bundle.work_dir.iterdir()), "verify_bundle left files in its workdir"
    if verified is not None:
        event(f"{mode}: accepted")
        assert verified.version == 1 and verified.files == bundle.files

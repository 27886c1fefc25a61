"""Adversarial update battery: malformed and malicious uploads in one real round.

Every bad object starts from a REAL client envelope (``client.update.make_update``
with the deployment's package and an enrolled client's key) and is then mutated
byte-wise, or forged: decrypted with the server keyring, changed, and re-sealed with
valid keys (HPKE bound to the new header, Ed25519 over the new framing), so that each
kind reaches the check it aims at. All of them go into the inbox next to real updates
from honest clients; ONE ``run_round`` must decide (publish or reject the candidate),
raise nothing, aggregate the honest updates, write a ledger verdict with the exact
reason code for every bad object, keep its original bytes in the quarantine and empty
the inbox. A second round then checks replays against the ledger of the first.

The deployment publishes copies of version 1 up to version 10 first, so that staleness
can be exercised with the default ``max_staleness`` of 8: updates are made against v10.

Round 1 kinds, each with the reason code it must be quarantined with (the wire format
is in fedlib/protocol.py; offsets: magic 0-4, version 4, key id 5-21, header length
21-25, header, ciphertext, 64-byte signature):

Framing, truncated at every boundary and mid-field:

- ``empty_object`` -> ``malformed``: a zero-byte object.
- ``truncated_mid_magic`` -> ``malformed``: the first 2 bytes.
- ``truncated_after_magic`` -> ``malformed``: the magic only.
- ``truncated_after_version`` -> ``malformed``: magic + version byte.
- ``truncated_mid_key_id`` -> ``malformed``: cut inside the key id.
- ``truncated_after_key_id`` -> ``malformed``: cut before the header length.
- ``truncated_after_header_length`` -> ``malformed``: the 25-byte prefix only.
- ``truncated_mid_header`` -> ``malformed``: the header runs past the end.
- ``truncated_after_header`` -> ``malformed``: no room left for a signature.
- ``truncated_mid_ciphertext`` -> ``bad_signature``: the framing still adds up, so the
  last 64 bytes are taken as the signature, which is verified before anything else.
- ``truncated_signature_dropped`` -> ``bad_signature``: the same, at the boundary.
- ``truncated_mid_signature`` -> ``bad_signature``: 32 signature bytes missing.
- ``trailing_bytes`` -> ``bad_signature``: 16 bytes appended.

Framing, bit flips and forged declared sizes:

- ``flipped_magic`` -> ``malformed``.
- ``framing_version_2`` -> ``unsupported_version``: version byte 2.
- ``flipped_key_id`` -> ``unknown_client``: the signer's key id names nobody.
- ``header_length_over_limit`` -> ``oversized``: declares 4097 header bytes.
- ``header_length_u32_max`` -> ``oversized``: declares 2**32-1 header bytes.
- ``header_length_off_by_one`` -> ``bad_signature``: fits the envelope, not the signature.
- ``flipped_header_bit`` -> ``bad_signature``.
- ``flipped_ciphertext_bit`` -> ``bad_signature``.
- ``flipped_signature_bit`` -> ``bad_signature``.
- ``headers_swapped`` -> ``bad_signature``: another valid envelope's header spliced in.
- ``random_bytes`` -> ``malformed``: 3000 random bytes.
- ``random_after_valid_prefix`` -> ``bad_signature``: real 25-byte prefix, random rest.
- ``object_over_envelope_limit`` -> ``oversized``: a real envelope padded past 64 MiB;
  refused from the GET's Content-Length before it is read.

Identity and object keys:

- ``unknown_client`` -> ``unknown_client``: signed by a key that was never enrolled.
- ``revoked_client`` -> ``revoked_client``: made, then the client is revoked in the fleet.
- ``impersonation`` -> ``bad_signature``: header names another client; signed by mine.
- ``ciphertext_resigned_by_other_client`` -> ``decrypt_failed``: a second client takes
  the ciphertext, rewrites the header to itself and signs: the signature holds, but the
  HPKE ``info`` binds the original header.
- ``other_clients_inbox_key`` -> ``bad_signature``: a valid envelope under another
  client's prefix (rounds.open_and_validate: key and signed header must agree).
- ``update_id_in_key_differs`` -> ``bad_signature``: same, with another update id.
- ``key_with_extra_segment`` -> ``malformed_name``: ``updates/<client>/<id>/extra``.
- ``key_without_update_id`` -> ``malformed_name``: ``updates/<name>``.
- ``key_with_bad_client_name`` -> ``malformed_name``: ``updates/Client_04/<id>``.

Server keys and HPKE:

- ``sealed_to_server_key_not_held`` -> ``unknown_server_key``: a real client sealing to
  a server key this server does not hold.
- ``unknown_server_key_id`` -> ``unknown_server_key``: header names a random key id.
- ``header_suite_not_the_keys`` -> ``suite_not_accepted``: header names classic X25519
  for the server's hybrid (ML-KEM-768 + X25519) key: no cross-suite decryption attempt.
- ``hpke_for_other_server`` -> ``decrypt_failed``: header names our key, ciphertext made
  for another server.
- ``ciphertext_size_mismatch`` -> ``malformed``: payload_size declared one byte larger.
- ``payload_size_over_limit`` -> ``malformed``: payload_size = 64 MiB + 1 (a schema
  bound of the header model, so a validation error: ``malformed``, not ``oversized``).

Signed header JSON:

- ``header_schema_v2`` -> ``unsupported_version``: ``dadm.update.v2``.
- ``header_unknown_field`` -> ``malformed``: extra field (feature rows) in the header.
- ``header_nesting_bomb`` -> ``malformed``: 1500 nested arrays (under the size limit).
- ``header_duplicate_keys`` -> ``malformed``: ``base_version`` twice.
- ``header_nan`` -> ``malformed``: ``base_version`` is ``NaN``.
- ``base_version_zero`` -> ``malformed``: outside the schema's range.

Payload (decrypted) and its metadata:

- ``zero_byte_payload`` -> ``malformed``: empty plaintext, validly sealed and signed.
- ``payload_bad_magic`` -> ``malformed``.
- ``payload_meta_length_over_limit`` -> ``oversized``: declares 2**31 metadata bytes.
- ``payload_meta_runs_past_end`` -> ``malformed``.
- ``meta_schema_v2`` -> ``unsupported_version``: ``dadm.update-meta.v2``.
- ``meta_unknown_field`` -> ``malformed``: feature rows smuggled into the metadata.
- ``meta_nesting_bomb`` -> ``malformed``: 3000 nested arrays (under the size limit).
- ``meta_duplicate_keys`` -> ``malformed``: ``num_samples`` twice.
- ``meta_wrong_model_kind`` -> ``shape_mismatch``.
- ``meta_wrong_num_params`` -> ``shape_mismatch``.

Compressed delta (blobs crafted per fedlib/compression.py):

- ``blob_dim_mismatch`` -> ``shape_mismatch``: dim = num_params - 1.
- ``blob_declares_huge_dim`` -> ``shape_mismatch``: dim = 2**32-1 (dim is compared with
  the model before the size limit, see compression.decode).
- ``blob_declares_huge_k`` -> ``malformed``: k = 2**32-1 in a small blob.
- ``topk_k_zero`` -> ``malformed``.
- ``topk_k_larger_than_model`` -> ``malformed``: k = dim + 1, length consistent.
- ``topk_index_out_of_range`` -> ``malformed``: last index = dim.
- ``topk_duplicate_indices`` -> ``malformed``.
- ``topk_gap16_zero_gap`` -> ``malformed``: gap-encoded indices with a zero gap.
- ``blob_truncated`` -> ``malformed``: one byte short.
- ``blob_unknown_mode`` -> ``malformed``: mode code 9.
- ``blob_reserved_nonzero`` -> ``malformed``.

Values:

- ``nan_flood`` -> ``non_finite``: every top-k value fp16 NaN.
- ``inf_flood`` -> ``non_finite``: every top-k value fp16 +/-inf.
- ``nan_hidden_in_dense32`` -> ``non_finite``: one NaN among 8360 finite values.
- ``scale_nan`` -> ``non_finite``: the fp16 scale is NaN.
- ``boosted_real_delta`` -> ``norm_exceeded``: a real top-k delta with its scale x1e6.
- ``huge_norm_dense32`` -> ``norm_exceeded``: 1e3 in every coordinate.
- ``norm_just_over_bound`` -> ``norm_exceeded``: L2 norm 10.00001 against a bound of 10.
- ``subnormal_flood_amplified`` -> ``norm_exceeded``: fp16 subnormals x scale 3e38.

Base versions:

- ``base_version_from_future`` -> ``unknown_base_version``: active + 1.
- ``base_version_never_published`` -> ``unknown_base_version``: 2**53.
- ``base_version_too_stale`` -> ``too_stale``: a real update against v1, 9 versions old.

Accepted on purpose (counted with the honest updates, not quarantined):

- ``subnormal_flood_dense64`` -> ``accepted``: every value the smallest float64
  subnormal. Finite, norm ~1e-321 < bound: nothing in the protocol refuses it, and it
  rounds to zero on the aggregation grid. Listed so a future policy change is visible.

Round 2 kinds, against the ledger of round 1:

- ``replay_of_aggregated`` -> ``replay``: an accepted envelope uploaded again.
- ``replay_after_quarantine`` -> ``replay``: a quarantined envelope uploaded again.
- ``other_bytes_under_aggregated_key`` -> ``duplicate_update_id``.
- ``other_bytes_under_quarantined_key`` -> ``duplicate_update_id``.
- ``aggregated_envelope_under_new_key`` -> ``bad_signature``: a fresh update id in the
  key, the old signed header inside.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import struct
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519

from client.update import make_update
from fedlib.crypto import sealing
from fedlib.errors import REASONS
from fedlib.models.package import ModelPackage
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import run_round
from fedlib.server.round_runner import load_verdicts
from fedlib.wire import protocol
from tests.test_round_runner import enroll


@pytest.fixture
def deployment(s3_config: Any, tmp_path: Any, small_dataset: Any) -> Any:
    """The battery's crafted objects are the iterative kind's: top-k deltas of the
    autoencoder against its norm bound (the default kind sends whole statistics)."""
    from tests.helpers import build_deployment

    return build_deployment(
        s3_config, tmp_path / "server-keys", small_dataset, model_kind="autoencoder"
    )


# -- the wire formats, written out here from their documentation ------------------------

PREFIX = struct.Struct(">4sB16sI")  # magic, framing version, signer key id, header length
HEADER_AT = PREFIX.size  # 25
SIG = protocol.SIGNATURE_BYTES


def hpke_seal(payload: bytes, public: Any, info: bytes) -> bytes:
    """HPKE straight from ``cryptography`` (not fedlib's sealing), for the key's KEM."""
    if isinstance(public, sealing.HybridPublicKey):
        kem, public = hpke.KEM.MLKEM768_X25519, public.hpke_key()
    else:
        kem = hpke.KEM.X25519
    suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    return suite.encrypt(payload, public, info=info)


FLC = struct.Struct("<4sBBHIIf")  # magic, mode, index encoding, reserved, dim, k, scale
TOPK16, DENSE32, DENSE64 = 1, 3, 4
IDX_NONE, IDX_GAP16, IDX_ABS16 = 0, 1, 2
F16_NAN, F16_INF, F16_NEG_INF, F16_MIN_SUBNORMAL = 0x7E00, 0x7C00, 0xFC00, 0x0001

HONEST = ("client-01", "client-02", "client-03")
ATTACKER = "client-04"
ACCOMPLICE = "client-05"
STALE_OK_CLIENT = "client-00"
REVOKED = "client-06"
TOP_VERSION = 10  # copies of v1 are published up to this version
STALE_OK_BASE = 5  # staleness 5 <= max_staleness 8: accepted, down-weighted

RUN_1, RUN_2 = "battery-1", "battery-2"


# -- a client-side toolkit over one deployment ------------------------------------------


@dataclass(frozen=True)
class Real:
    """A real update as ``make_update`` produced it (not uploaded yet)."""

    client_id: str
    update_id: str
    envelope: bytes

    @property
    def key(self) -> str:
        return protocol.inbox_key(self.client_id, self.update_id)


@dataclass(frozen=True)
class Opened:
    """A real envelope opened with the server's keys: what a forger starts from."""

    header: dict[str, Any]
    meta: dict[str, Any]
    payload: bytes
    blob: bytes  # the compressed delta

    @property
    def k(self) -> int:
        return FLC.unpack_from(self.blob)[5]

    @property
    def indices(self) -> np.ndarray:  # topk16 with absolute uint16 indices (dim <= 65536)
        return np.frombuffer(self.blob, "<u2", count=self.k, offset=FLC.size).copy()

    @property
    def scale(self) -> float:
        return FLC.unpack_from(self.blob)[6]


class World:
    def __init__(self, deployment: Any) -> None:
        self.deployment = deployment
        self.registry = deployment.registry()
        self.package: ModelPackage = self.registry.read_active()
        self.dim = self.package.metadata.num_params
        self.server_public = deployment.current_server_public_key()
        self.keys: dict[str, ed25519.Ed25519PrivateKey] = {}
        self.seeds = itertools.count(1000)
        self.rng = random.Random(20260101)

    def key(self, client_id: str) -> ed25519.Ed25519PrivateKey:
        if client_id not in self.keys:
            self.keys[client_id] = enroll(self.deployment, client_id)
        return self.keys[client_id]

    @cached_property
    def foreign_server(self) -> sealing.EncryptionPrivateKey:
        return sealing.generate_encryption_key()

    def real(
        self,
        client_id: str = ATTACKER,
        *,
        package: ModelPackage | None = None,
        signing_key: ed25519.Ed25519PrivateKey | None = None,
        server_public: sealing.EncryptionPublicKey | None = None,
    ) -> Real:
        data = self.deployment.dataset
        rows = data.clients.get(client_id, data.clients[ATTACKER])
        update = make_update(
            package or self.package,
            rows,
            client_id=client_id,
            client_key=signing_key or self.key(client_id),
            server_public_key=server_public or self.server_public,
            residual=None,
            seed=next(self.seeds),
        )
        return Real(client_id, update.update_id, update.envelope)

    def open(self, real: Real) -> Opened:
        opened = sealing.open_update(
            real.envelope, self.deployment.load_fleet(), self.deployment.server_keyring()
        )
        meta, blob = protocol.decode_payload(opened.payload)
        return Opened(
            header=opened.header.model_dump(by_alias=True),
            meta=meta.model_dump(by_alias=True),
            payload=opened.payload,
            blob=blob,
        )

    def sign(
        self, signer: str, header_bytes: bytes, ciphertext: bytes, *, version: int = 1
    ) -> bytes:
        key = self.key(signer)
        kid = bytes.fromhex(sealing.key_id(key))
        body = (
            PREFIX.pack(protocol.UPDATE_MAGIC, version, kid, len(header_bytes))
            + header_bytes
            + ciphertext
        )
        return body + key.sign(protocol.SIGNATURE_DOMAIN + body)

    def seal(
        self,
        real: Real,
        *,
        header: dict[str, Any] | None = None,
        header_bytes: bytes | None = None,
        meta: dict[str, Any] | None = None,
        meta_bytes: bytes | None = None,
        blob: bytes | None = None,
        payload: bytes | None = None,
        signer: str | None = None,
        server_public: sealing.EncryptionPublicKey | None = None,
    ) -> bytes:
        """Re-seal a real update with changes, validly encrypted and signed."""
        o = self.open(real)
        if payload is None:
            if meta is None and meta_bytes is None and blob is None:
                payload = o.payload
            else:
                meta_bytes = meta_bytes or protocol.canonical_json({**o.meta, **(meta or {})})
                payload = make_payload(meta_bytes, o.blob if blob is None else blob)
        hdr = {**o.header, "payload_size": len(payload), **(header or {})}
        hb = protocol.canonical_json(hdr) if header_bytes is None else header_bytes
        info = protocol.HPKE_INFO_DOMAIN + hashlib.sha256(hb).digest()
        ct = hpke_seal(payload, server_public or self.server_public, info)
        return self.sign(signer or real.client_id, hb, ct)


def make_payload(meta_bytes: bytes, blob: bytes, *, meta_len: int | None = None) -> bytes:
    declared = len(meta_bytes) if meta_len is None else meta_len
    return protocol.PAYLOAD_MAGIC + struct.pack(">I", declared) + meta_bytes + blob


def flc(
    *,
    mode: int,
    dim: int,
    k: int,
    body: bytes,
    idx: int = IDX_NONE,
    scale: float = 1.0,
    reserved: int = 0,
    magic: bytes = b"FLC1",
) -> bytes:
    return FLC.pack(magic, mode, idx, reserved, dim, k, scale) + body


def topk(indices: np.ndarray, values: np.ndarray, *, dim: int, scale: float = 1.0) -> bytes:
    """A topk16 blob with absolute uint16 indices; ``values`` are raw fp16 bit patterns."""
    body = np.asarray(indices, "<u2").tobytes() + np.asarray(values, "<u2").tobytes()
    return flc(mode=TOPK16, idx=IDX_ABS16, dim=dim, k=len(indices), scale=scale, body=body)


def hlen(envelope: bytes) -> int:
    return struct.unpack_from(">I", envelope, 21)[0]


def ct_start(envelope: bytes) -> int:
    return HEADER_AT + hlen(envelope)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def with_header_length(envelope: bytes, n: int) -> bytes:
    return envelope[:21] + struct.pack(">I", n) + envelope[HEADER_AT:]


def header_bytes_of(envelope: bytes) -> bytes:
    return envelope[HEADER_AT : ct_start(envelope)]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# -- builders: World -> (inbox key, object bytes) ----------------------------------------

Builder = Callable[[World], tuple[str, bytes]]


@dataclass(frozen=True)
class Kind:
    name: str
    build: Builder
    reason: str


def mutated(change: Callable[[bytes], bytes]) -> Builder:
    def build(w: World) -> tuple[str, bytes]:
        real = w.real()
        return real.key, change(real.envelope)

    return build


def resealed(**changes: Callable[[World, Opened], Any]) -> Builder:
    """Re-seal a real update with each keyword of :meth:`World.seal` computed lazily."""

    def build(w: World) -> tuple[str, bytes]:
        real = w.real()
        o = w.open(real)
        return real.key, w.seal(real, **{name: fn(w, o) for name, fn in changes.items()})

    return build


def with_blob(make: Callable[[World, Opened], bytes], **meta: Any) -> Builder:
    return resealed(blob=make, meta=lambda w, o: meta or None)  # meta=None keeps the real metadata


def headers_swapped(w: World) -> tuple[str, bytes]:
    a, b = w.real(), w.real(ACCOMPLICE)
    hb = header_bytes_of(b.envelope)
    env = a.envelope[:21] + struct.pack(">I", len(hb)) + hb + a.envelope[ct_start(a.envelope) :]
    return a.key, env


def random_bytes(w: World) -> tuple[str, bytes]:
    real = w.real()
    data = w.rng.randbytes(3000)
    assert data[:4] != protocol.UPDATE_MAGIC
    return real.key, data


def random_after_valid_prefix(w: World) -> tuple[str, bytes]:
    real = w.real()
    return real.key, real.envelope[:HEADER_AT] + w.rng.randbytes(len(real.envelope) - HEADER_AT)


def object_over_envelope_limit(w: World) -> tuple[str, bytes]:
    real = w.real()
    pad = protocol.MAX_ENVELOPE_BYTES + 1 - len(real.envelope)
    return real.key, real.envelope + bytes(pad)


def unknown_client(w: World) -> tuple[str, bytes]:
    real = w.real("client-99", signing_key=sealing.generate_signing_key())
    return real.key, real.envelope


def revoked_client(w: World) -> tuple[str, bytes]:
    real = w.real(REVOKED)
    fleet = w.deployment.load_fleet()
    fleet.revoke(REVOKED)
    w.deployment.save_fleet(fleet)
    return real.key, real.envelope


def impersonation(w: World) -> tuple[str, bytes]:
    """The attacker signs a header that names the accomplice (key id and client id)."""
    real = w.real()
    other = sealing.key_id(w.key(ACCOMPLICE))
    env = w.seal(real, header={"client_id": ACCOMPLICE, "client_key_id": other})
    return protocol.inbox_key(ACCOMPLICE, real.update_id), env


def ciphertext_resigned_by_other_client(w: World) -> tuple[str, bytes]:
    real = w.real()
    header = json.loads(header_bytes_of(real.envelope))
    header.update(client_id=ACCOMPLICE, client_key_id=sealing.key_id(w.key(ACCOMPLICE)))
    ciphertext = real.envelope[ct_start(real.envelope) : -SIG]
    env = w.sign(ACCOMPLICE, protocol.canonical_json(header), ciphertext)
    return protocol.inbox_key(ACCOMPLICE, real.update_id), env


def other_clients_inbox_key(w: World) -> tuple[str, bytes]:
    real = w.real()
    return protocol.inbox_key(ACCOMPLICE, real.update_id), real.envelope


def update_id_in_key_differs(w: World) -> tuple[str, bytes]:
    real = w.real()
    return protocol.inbox_key(ATTACKER, protocol.new_update_id()), real.envelope


def key_with_extra_segment(w: World) -> tuple[str, bytes]:
    real = w.real()
    return f"{real.key}/extra", real.envelope


def key_without_update_id(w: World) -> tuple[str, bytes]:
    real = w.real()
    return f"updates/{ATTACKER}-{real.update_id}", real.envelope


def key_with_bad_client_name(w: World) -> tuple[str, bytes]:
    real = w.real()
    return f"updates/Client_04/{real.update_id}", real.envelope


def sealed_to_server_key_not_held(w: World) -> tuple[str, bytes]:
    real = w.real(server_public=w.foreign_server.public_key())
    return real.key, real.envelope


def header_nesting_bomb(w: World, o: Opened) -> bytes:
    data = protocol.canonical_json(o.header)[:-1] + b',"x":' + nested(1500) + b"}"
    assert len(data) <= protocol.MAX_HEADER_BYTES  # the depth check, not the size check
    return data


def meta_nesting_bomb(w: World, o: Opened) -> bytes:
    data = protocol.canonical_json(o.meta)[:-1] + b',"x":' + nested(3000) + b"}"
    assert len(data) <= protocol.MAX_META_BYTES
    return data


def header_nan(w: World, o: Opened) -> bytes:
    data = protocol.canonical_json(o.header)
    field = b'"base_version":%d' % o.header["base_version"]
    assert field in data
    return data.replace(field, b'"base_version":NaN')


def meta_dup_keys(w: World, o: Opened) -> bytes:
    return b'{"num_samples":1,' + protocol.canonical_json(o.meta)[1:]


def header_dup_keys(w: World, o: Opened) -> bytes:
    return b'{"base_version":1,' + protocol.canonical_json(o.header)[1:]


def dense32(values: np.ndarray, dim: int) -> bytes:
    return flc(mode=DENSE32, dim=dim, k=dim, body=np.asarray(values, "<f4").tobytes())


def dense64(values: np.ndarray, dim: int) -> bytes:
    return flc(mode=DENSE64, dim=dim, k=dim, body=np.asarray(values, "<f8").tobytes())


def repack(blob: bytes, **fields: Any) -> bytes:
    """The real blob with some header fields replaced (body unchanged)."""
    names = ("magic", "mode", "idx", "reserved", "dim", "k", "scale")
    values = dict(zip(names, FLC.unpack_from(blob), strict=True))
    values.update(fields)
    return FLC.pack(*(values[n] for n in names)) + blob[FLC.size :]


def base_version_too_stale(w: World) -> tuple[str, bytes]:
    real = w.real(package=w.registry.read_version(1))
    return real.key, real.envelope


def k_larger_than_model(w: World, o: Opened) -> bytes:
    k = w.dim + 1
    return topk(np.arange(k), np.zeros(k), dim=w.dim)


def index_out_of_range(w: World, o: Opened) -> bytes:
    idx = o.indices
    idx[-1] = w.dim
    return topk(idx, np.full(o.k, 0x3C00), dim=w.dim, scale=o.scale)


def duplicate_indices(w: World, o: Opened) -> bytes:
    idx = o.indices
    idx[1] = idx[0]
    return topk(idx, np.full(o.k, 0x3C00), dim=w.dim, scale=o.scale)


def gap16_zero_gap(w: World, o: Opened) -> bytes:
    gaps = np.diff(o.indices.astype(np.int64), prepend=0)
    gaps[3] = 0
    body = gaps.astype("<u2").tobytes() + np.full(o.k, 0x3C00, "<u2").tobytes()
    return flc(mode=TOPK16, idx=IDX_GAP16, dim=w.dim, k=o.k, scale=o.scale, body=body)


def f16_flood(pattern: int | tuple[int, ...], *, scale: float | None = None) -> Callable:
    def make(w: World, o: Opened) -> bytes:
        values = np.resize(np.asarray(pattern, dtype=np.uint16), o.k)
        return topk(o.indices, values, dim=w.dim, scale=o.scale if scale is None else scale)

    return make


def nan_hidden_in_dense32(w: World, o: Opened) -> bytes:
    values = np.full(w.dim, 1e-4, dtype=np.float32)
    values[w.dim // 2] = np.nan
    return dense32(values, w.dim)


def norm_just_over_bound(w: World, o: Opened) -> bytes:
    values = np.zeros(w.dim)
    values[7] = 10.0001  # the bound: ServerSettings.norm_bound = 10.0 for this kind
    return dense64(values, w.dim)


def subnormal_flood_dense64(w: World) -> tuple[str, bytes]:
    real = w.real()
    values = np.full(w.dim, np.nextafter(0.0, 1.0))  # 5e-324, the smallest subnormal
    blob = dense64(values, w.dim)
    return real.key, w.seal(real, blob=blob, meta={"compression": "dense64"})


BATTERY: list[Kind] = [
    # framing: truncations at every boundary and mid-field
    Kind("empty_object", mutated(lambda e: b""), "malformed"),
    Kind("truncated_mid_magic", mutated(lambda e: e[:2]), "malformed"),
    Kind("truncated_after_magic", mutated(lambda e: e[:4]), "malformed"),
    Kind("truncated_after_version", mutated(lambda e: e[:5]), "malformed"),
    Kind("truncated_mid_key_id", mutated(lambda e: e[:13]), "malformed"),
    Kind("truncated_after_key_id", mutated(lambda e: e[:21]), "malformed"),
    Kind("truncated_after_header_length", mutated(lambda e: e[:HEADER_AT]), "malformed"),
    Kind("truncated_mid_header", mutated(lambda e: e[: HEADER_AT + hlen(e) // 2]), "malformed"),
    Kind("truncated_after_header", mutated(lambda e: e[: ct_start(e)]), "malformed"),
    # With the ciphertext (half) present the framing adds up; the signature check,
    # which comes before any parsing, is what refuses it.
    Kind(
        "truncated_mid_ciphertext",
        mutated(lambda e: e[: ct_start(e) + (len(e) - SIG - ct_start(e)) // 2]),
        "bad_signature",
    ),
    Kind("truncated_signature_dropped", mutated(lambda e: e[:-SIG]), "bad_signature"),
    Kind("truncated_mid_signature", mutated(lambda e: e[: -SIG // 2]), "bad_signature"),
    Kind("trailing_bytes", mutated(lambda e: e + bytes(16)), "bad_signature"),
    # framing: bit flips and forged declared sizes
    Kind("flipped_magic", mutated(lambda e: flip(e, 1)), "malformed"),
    Kind("framing_version_2", mutated(lambda e: e[:4] + b"\x02" + e[5:]), "unsupported_version"),
    Kind("flipped_key_id", mutated(lambda e: flip(e, 9, 0x80)), "unknown_client"),
    Kind(
        "header_length_over_limit",
        mutated(lambda e: with_header_length(e, protocol.MAX_HEADER_BYTES + 1)),
        "oversized",
    ),
    Kind(
        "header_length_u32_max",
        mutated(lambda e: with_header_length(e, 2**32 - 1)),
        "oversized",
    ),
    Kind(
        "header_length_off_by_one",
        mutated(lambda e: with_header_length(e, hlen(e) + 1)),
        "bad_signature",
    ),
    Kind("flipped_header_bit", mutated(lambda e: flip(e, HEADER_AT + 40, 0x04)), "bad_signature"),
    Kind("flipped_ciphertext_bit", mutated(lambda e: flip(e, ct_start(e) + 100)), "bad_signature"),
    Kind("flipped_signature_bit", mutated(lambda e: flip(e, len(e) - 7, 0x10)), "bad_signature"),
    Kind("headers_swapped", headers_swapped, "bad_signature"),
    Kind("random_bytes", random_bytes, "malformed"),
    Kind("random_after_valid_prefix", random_after_valid_prefix, "bad_signature"),
    Kind("object_over_envelope_limit", object_over_envelope_limit, "oversized"),
    # identity and object keys
    Kind("unknown_client", unknown_client, "unknown_client"),
    Kind("revoked_client", revoked_client, "revoked_client"),
    # sealing.verify_envelope: a header naming someone other than the signer is a
    # signature failure (the signature does not vouch for that client).
    Kind("impersonation", impersonation, "bad_signature"),
    Kind(
        "ciphertext_resigned_by_other_client", ciphertext_resigned_by_other_client, "decrypt_failed"
    ),
    # rounds.open_and_validate documents a key/header mismatch as bad_signature: the
    # object key is not covered by what the client signed.
    Kind("other_clients_inbox_key", other_clients_inbox_key, "bad_signature"),
    Kind("update_id_in_key_differs", update_id_in_key_differs, "bad_signature"),
    Kind("key_with_extra_segment", key_with_extra_segment, "malformed_name"),
    Kind("key_without_update_id", key_without_update_id, "malformed_name"),
    Kind("key_with_bad_client_name", key_with_bad_client_name, "malformed_name"),
    # server keys and HPKE
    Kind("sealed_to_server_key_not_held", sealed_to_server_key_not_held, "unknown_server_key"),
    Kind(
        "unknown_server_key_id",
        resealed(header=lambda w, o: {"server_key_id": "0123456789abcdef" * 2}),
        "unknown_server_key",
    ),
    Kind(
        "header_suite_not_the_keys",
        resealed(header=lambda w, o: {"suite": protocol.SUITE_X25519}),
        "suite_not_accepted",
    ),
    Kind(
        "hpke_for_other_server",
        resealed(server_public=lambda w, o: w.foreign_server.public_key()),
        "decrypt_failed",
    ),
    Kind(
        "ciphertext_size_mismatch",
        resealed(header=lambda w, o: {"payload_size": len(o.payload) + 1}),
        "malformed",
    ),
    # UpdateHeader bounds payload_size by a pydantic constraint, so this is a schema
    # violation (malformed), unlike the framing's header length (oversized). Reported.
    Kind(
        "payload_size_over_limit",
        resealed(header=lambda w, o: {"payload_size": protocol.MAX_ENVELOPE_BYTES + 1}),
        "malformed",
    ),
    # signed header JSON
    Kind(
        "header_schema_v2",
        resealed(header=lambda w, o: {"schema": "dadm.update.v2"}),
        "unsupported_version",
    ),
    Kind(
        "header_unknown_field",
        resealed(header=lambda w, o: {"rows": [[0.25, 0.5], [0.75, 1.0]]}),
        "malformed",
    ),
    Kind("header_nesting_bomb", resealed(header_bytes=header_nesting_bomb), "malformed"),
    Kind("header_duplicate_keys", resealed(header_bytes=header_dup_keys), "malformed"),
    Kind("header_nan", resealed(header_bytes=header_nan), "malformed"),
    Kind("base_version_zero", resealed(header=lambda w, o: {"base_version": 0}), "malformed"),
    # payload and its metadata
    Kind("zero_byte_payload", resealed(payload=lambda w, o: b""), "malformed"),
    Kind("payload_bad_magic", resealed(payload=lambda w, o: b"XFLP" + o.payload[4:]), "malformed"),
    Kind(
        "payload_meta_length_over_limit",
        resealed(payload=lambda w, o: o.payload[:4] + struct.pack(">I", 2**31) + o.payload[8:]),
        "oversized",
    ),
    Kind(
        "payload_meta_runs_past_end",
        resealed(
            payload=lambda w, o: (
                o.payload[:4] + struct.pack(">I", len(o.payload) - 7) + o.payload[8:]
            )
        ),
        "malformed",
    ),
    Kind(
        "meta_schema_v2",
        resealed(meta=lambda w, o: {"schema": "dadm.update-meta.v2"}),
        "unsupported_version",
    ),
    Kind(
        "meta_unknown_field",
        resealed(meta=lambda w, o: {"feature_rows": [[0.25, 0.5], [0.75, 1.0]]}),
        "malformed",
    ),
    Kind("meta_nesting_bomb", resealed(meta_bytes=meta_nesting_bomb), "malformed"),
    Kind("meta_duplicate_keys", resealed(meta_bytes=meta_dup_keys), "malformed"),
    Kind(
        "meta_wrong_model_kind",
        resealed(meta=lambda w, o: {"model_kind": "gaussian"}),
        "shape_mismatch",
    ),
    Kind(
        "meta_wrong_num_params",
        resealed(meta=lambda w, o: {"num_params": w.dim + 1}),
        "shape_mismatch",
    ),
    # compressed delta
    Kind(
        "blob_dim_mismatch", with_blob(lambda w, o: repack(o.blob, dim=w.dim - 1)), "shape_mismatch"
    ),
    # compression.decode compares dim with the model before its size limit
    Kind(
        "blob_declares_huge_dim",
        with_blob(lambda w, o: repack(o.blob, dim=2**32 - 1)),
        "shape_mismatch",
    ),
    Kind("blob_declares_huge_k", with_blob(lambda w, o: repack(o.blob, k=2**32 - 1)), "malformed"),
    Kind(
        "topk_k_zero",
        with_blob(lambda w, o: topk(np.arange(0), np.arange(0), dim=w.dim)),
        "malformed",
    ),
    Kind("topk_k_larger_than_model", with_blob(k_larger_than_model), "malformed"),
    Kind("topk_index_out_of_range", with_blob(index_out_of_range), "malformed"),
    Kind("topk_duplicate_indices", with_blob(duplicate_indices), "malformed"),
    Kind("topk_gap16_zero_gap", with_blob(gap16_zero_gap), "malformed"),
    Kind("blob_truncated", with_blob(lambda w, o: o.blob[:-1]), "malformed"),
    Kind("blob_unknown_mode", with_blob(lambda w, o: repack(o.blob, mode=9)), "malformed"),
    Kind("blob_reserved_nonzero", with_blob(lambda w, o: repack(o.blob, reserved=1)), "malformed"),
    # values
    Kind("nan_flood", with_blob(f16_flood(F16_NAN)), "non_finite"),
    Kind("inf_flood", with_blob(f16_flood((F16_INF, F16_NEG_INF))), "non_finite"),
    Kind(
        "nan_hidden_in_dense32",
        with_blob(nan_hidden_in_dense32, compression="dense32"),
        "non_finite",
    ),
    Kind("scale_nan", with_blob(lambda w, o: repack(o.blob, scale=float("nan"))), "non_finite"),
    Kind(
        "boosted_real_delta",
        with_blob(lambda w, o: repack(o.blob, scale=o.scale * 1e6)),
        "norm_exceeded",
    ),
    Kind(
        "huge_norm_dense32",
        with_blob(lambda w, o: dense32(np.full(w.dim, 1e3), w.dim), compression="dense32"),
        "norm_exceeded",
    ),
    Kind(
        "norm_just_over_bound",
        with_blob(norm_just_over_bound, compression="dense64"),
        "norm_exceeded",
    ),
    Kind(
        "subnormal_flood_amplified",
        with_blob(f16_flood(F16_MIN_SUBNORMAL, scale=3.0e38)),
        "norm_exceeded",
    ),
    # base versions (the active version is TOP_VERSION)
    Kind(
        "base_version_from_future",
        resealed(header=lambda w, o: {"base_version": TOP_VERSION + 1}),
        "unknown_base_version",
    ),
    Kind(
        "base_version_never_published",
        resealed(header=lambda w, o: {"base_version": 2**53}),
        "unknown_base_version",
    ),
    Kind("base_version_too_stale", base_version_too_stale, "too_stale"),
]

#: Accepted on purpose: see the module docstring.
INERT: list[Kind] = [Kind("subnormal_flood_dense64", subnormal_flood_dense64, "accepted")]


# Round 2: (name, builder over round 1's objects, reason)
Round1 = dict[str, tuple[str, bytes]]  # kind or "honest:<client>" -> (key, bytes)
Builder2 = Callable[[World, Round1], tuple[str, bytes]]


REPLAYS: list[tuple[str, Builder2, str]] = [
    ("replay_of_aggregated", lambda w, r1: r1["honest:client-01"], "replay"),
    ("replay_after_quarantine", lambda w, r1: r1["flipped_signature_bit"], "replay"),
    (
        "other_bytes_under_aggregated_key",
        lambda w, r1: (r1["honest:client-02"][0], w.real("client-02").envelope),
        "duplicate_update_id",
    ),
    (
        "other_bytes_under_quarantined_key",
        lambda w, r1: (r1["nan_flood"][0], w.real(ATTACKER).envelope),
        "duplicate_update_id",
    ),
    (
        "aggregated_envelope_under_new_key",
        lambda w, r1: (
            protocol.inbox_key("client-03", protocol.new_update_id()),
            r1["honest:client-03"][1],
        ),
        "bad_signature",
    ),
]


# -- checks --------------------------------------------------------------------------------

_CLIENT = r"[a-z0-9][a-z0-9._-]{0,62}"
_UUID7 = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
_INBOX_KEY = re.compile(rf"updates/({_CLIENT})/({_UUID7})")
_OWNED = re.compile(rf"updates/({_CLIENT})/.*", re.DOTALL)


def quarantine_base(key: str, sha256: str) -> str:
    """Where fedlib/ledger.py keeps a rejected object: by client/update id, else by the
    digest of its name (under its device's prefix when it has one); an object refused
    unread (oversized) is filed under "unread"."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    if m := _INBOX_KEY.fullmatch(key):
        name = f"{m[1]}/{m[2]}"
    elif m := _OWNED.fullmatch(key):
        name = f"{m[1]}/_name/{digest}"
    else:
        name = f"_other/{digest}"
    return f"quarantine/{name}/{(sha256 or 'unread')[:16]}"


def publish_copies(deployment: Any, top: int) -> None:
    """Versions 2..top carrying version 1's model, so staleness can be exercised."""
    registry = deployment.registry(signing=True)
    first = registry.read_version(1)
    for version in range(2, top + 1):
        meta = first.metadata.model_copy(update={"version": version, "parent_version": version - 1})
        registry.publish(
            ModelPackage(metadata=meta, onnx_bytes=first.onnx_bytes, weights=first.weights)
        )


def assert_quarantined(deployment: Any, key: str, blob: bytes, reason: str, *, name: str) -> None:
    verdict = Ledger(deployment.state).read(key)
    assert verdict is not None, f"{name}: no ledger verdict for {key}"
    assert verdict.accepted is False, (name, verdict)
    assert verdict.reason == reason, (name, verdict)
    assert verdict.run_id == RUN_1, (name, verdict)
    digest = hashlib.sha256(blob).hexdigest()
    if name != "object_over_envelope_limit":
        assert verdict.sha256 == digest and verdict.size == len(blob), (name, verdict)
    else:  # refused without reading it: its true size, no digest, a stub in quarantine
        assert verdict.sha256 == "" and verdict.size == len(blob), (name, verdict)
    base = quarantine_base(key, str(verdict.sha256))
    if name == "object_over_envelope_limit":  # the first bytes, digest and size, not a copy
        stub = json.loads(deployment.state.get(base + ".stub.json"))
        assert stub["sha256"] == digest and stub["size"] == len(blob), (name, stub)
        assert blob.startswith(bytes.fromhex(stub["prefix_hex"])), name
        assert not deployment.state.exists(base + ".bin"), name
    else:
        assert deployment.state.get(base + ".bin") == blob, name
    doc = json.loads(deployment.state.get(base + ".reason.json"))
    assert doc["reason"] == reason and doc["key"] == key, (name, doc)


def test_battery_table_is_complete():
    names = [k.name for k in BATTERY + INERT] + [name for name, _, _ in REPLAYS]
    assert len(names) == len(set(names)), "kind names must be unique"
    assert len(BATTERY) >= 30
    reasons = {k.reason for k in BATTERY} | {reason for _, _, reason in REPLAYS}
    assert reasons <= REASONS
    # "distrusted" needs the FLTrust defense on: tests/security/test_poisoning.py;
    # "unrecordable" a store that refuses verdicts: tests/test_inbox_names.py;
    # "feature_mismatch" a published template vocabulary change: tests/test_logs_e2e.py
    missing = REASONS - reasons - {"distrusted", "unrecordable", "feature_mismatch"}
    assert not missing, f"reasons never exercised: {sorted(missing)}"
    # the module docstring is the human table (it feeds RELIABILITY.md): keep them equal
    documented = dict(re.findall(r"``(\w+)`` -> ``(\w+)``", sys.modules[__name__].__doc__ or ""))
    expected = {k.name: k.reason for k in BATTERY + INERT}
    expected.update({name: reason for name, _, reason in REPLAYS})
    assert documented == expected


def test_adversarial_battery_in_one_round(deployment):
    # Every kind in ONE round: the attacker's ~80 objects exceed the per-device cap,
    # which would spread them over rounds (tests/test_hostile_device.py covers the cap).
    deployment.settings = deployment.settings.model_copy(update={"max_objects_per_device": 1000})
    publish_copies(deployment, TOP_VERSION)
    w = World(deployment)
    assert w.package.version == TOP_VERSION and w.dim <= 65536  # topk16 uses uint16 indices

    honest: dict[str, tuple[str, bytes]] = {}
    for cid in HONEST:
        real = w.real(cid)
        honest[f"honest:{cid}"] = (real.key, real.envelope)
    # its own device: a round counts one update per device (a second one is superseded)
    stale = w.real(STALE_OK_CLIENT, package=w.registry.read_version(STALE_OK_BASE))
    honest["honest:stale-ok"] = (stale.key, stale.envelope)

    built: dict[str, tuple[str, bytes]] = {}
    for kind in BATTERY + INERT:
        built[kind.name] = kind.build(w)
    keys = [key for key, _ in [*honest.values(), *built.values()]]
    assert len(keys) == len(set(keys)), "every object needs its own inbox key"
    for key, blob in [*honest.values(), *built.values()]:
        deployment.inbox.put(key, blob)

    report = run_round(deployment, RUN_1)

    assert report.decision == "published", report.summary()
    accepted_names = [*honest, *(k.name for k in INERT)]
    assert report.accepted == len(accepted_names), report.summary()
    assert report.rejected == dict(sorted(Counter(k.reason for k in BATTERY).items()))
    ledger = Ledger(deployment.state)
    for kind in BATTERY:
        key, blob = built[kind.name]
        assert_quarantined(deployment, key, blob, kind.reason, name=kind.name)
    for name in accepted_names:
        key, _ = built[name] if name in built else honest[name]
        verdict = ledger.read(key)
        assert verdict is not None and verdict.accepted is True, (name, verdict)
    inert = ledger.read(built["subnormal_flood_dense64"][0])
    assert inert is not None and inert.norm is not None and 0 < inert.norm < 1e-300
    stale_verdict = ledger.read(stale.key)
    assert stale_verdict is not None and stale_verdict.base_version == STALE_OK_BASE
    assert list(deployment.inbox.list("")) == []

    # -- round 2: replays against the ledger, next to fresh honest updates ------------------
    w2 = World(deployment)  # the package may have moved on
    w2.keys = w.keys
    fresh = [w2.real(cid) for cid in HONEST[1:]]
    round1 = {**built, **honest}
    replays = {name: (build(w2, round1), reason) for name, build, reason in REPLAYS}
    for real in fresh:
        deployment.inbox.put(real.key, real.envelope)
    for (key, blob), _ in replays.values():
        deployment.inbox.put(key, blob)

    second = run_round(deployment, RUN_2)

    assert second.decision == "published", second.summary()
    assert second.accepted == len(fresh), second.summary()
    assert second.rejected == dict(sorted(Counter(r for _, r in replays.values()).items()))
    verdicts = {v.key: v for v in load_verdicts(deployment, RUN_2)}
    for name, ((key, blob), reason) in replays.items():
        v = verdicts[key]
        assert not v.accepted and v.reason == reason, (name, v)
        assert v.sha256 == hashlib.sha256(blob).hexdigest(), name
        assert deployment.state.get(quarantine_base(key, v.sha256) + ".bin") == blob, name
    for real in fresh:
        real_verdict = ledger.read(real.key)
        assert real_verdict is not None and real_verdict.accepted is True
    # the first verdict stands: replays never turn into a second count or a new reason
    first = {name: ledger.read(round1[name][0]) for name in round1}
    assert all(entry is not None for entry in first.values())
    assert first["honest:client-01"].accepted is True  # type: ignore[union-attr]
    assert first["honest:client-02"].accepted is True  # type: ignore[union-attr]
    assert first["nan_flood"].reason == "non_finite"  # type: ignore[union-attr]
    assert first["flipped_signature_bit"].reason == "bad_signature"  # type: ignore[union-attr]
    assert list(deployment.inbox.list("")) == []

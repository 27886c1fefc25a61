"""Sealing and opening update envelopes: round trips and every refusal, with real sealing."""

from __future__ import annotations

import struct

import pytest

from fedlib.crypto import sealing
from fedlib.errors import RejectedUpdate
from fedlib.server.fleet import Fleet
from fedlib.wire import protocol

PAYLOAD = b"payload bytes " * 50


@pytest.fixture(params=sorted(sealing.SUITES))
def world(request):
    client_key = sealing.generate_signing_key()
    other_key = sealing.generate_signing_key()
    server_key = sealing.generate_encryption_key(request.param)
    fleet = Fleet()
    fleet.enroll("client-1", sealing.public_pem(client_key))
    fleet.enroll("client-2", sealing.public_pem(other_key))
    ring = sealing.ServerKeyring()
    ring.add(server_key)
    return {
        "client_key": client_key,
        "other_key": other_key,
        "server_key": server_key,
        "fleet": fleet,
        "ring": ring,
    }


def seal(world, *, client_id="client-1", key=None, server_public=None, payload=PAYLOAD):
    return sealing.seal_update(
        client_id=client_id,
        client_key=key or world["client_key"],
        server_public_key=server_public or world["server_key"].public_key(),
        base_version=3,
        payload=payload,
    )


def reason_of(blob: bytes, world) -> str:
    with pytest.raises(RejectedUpdate) as err:
        sealing.open_update(blob, world["fleet"], world["ring"])
    return err.value.reason


def test_round_trip(world):
    header, blob = seal(world)
    opened = sealing.open_update(blob, world["fleet"], world["ring"])
    assert opened.payload == PAYLOAD
    assert opened.header == header
    assert opened.client.client_id == "client-1"
    assert header.client_key_id == sealing.key_id(world["client_key"])
    assert header.server_key_id == sealing.key_id(world["server_key"])
    assert header.payload_size == len(PAYLOAD)
    assert header.suite == sealing.suite_of(world["server_key"])
    hpke = protocol.HPKE_OVERHEAD[header.suite]
    assert len(blob) - len(PAYLOAD) - hpke < 700  # framing + header + signature


def test_hybrid_suite_is_the_default_and_costs_1136_bytes():
    key = sealing.generate_encryption_key()
    assert isinstance(key, sealing.HybridPrivateKey)
    assert sealing.suite_of(key) == protocol.SUITE_MLKEM768_X25519
    client = sealing.generate_signing_key()
    sizes = {}
    for name in ("x25519", "mlkem768-x25519"):
        server = sealing.generate_encryption_key(name)
        _, blob = sealing.seal_update(
            client_id="c",
            client_key=client,
            server_public_key=server.public_key(),
            base_version=1,
            payload=PAYLOAD,
        )
        parts = protocol.split_envelope(blob)
        sizes[name] = len(parts.ciphertext) - len(PAYLOAD)
    assert sizes == {"x25519": 48, "mlkem768-x25519": 1136}


def test_suite_outside_the_accepted_set_is_refused(world):
    header, blob = seal(world)
    others = frozenset(sealing.SUITES.values()) - {header.suite}
    with pytest.raises(RejectedUpdate) as err:
        sealing.open_update(blob, world["fleet"], world["ring"], accepted_suites=others)
    assert err.value.reason == "suite_not_accepted"
    opened = sealing.open_update(
        blob, world["fleet"], world["ring"], accepted_suites={header.suite}
    )
    assert opened.payload == PAYLOAD


def test_header_suite_that_does_not_match_the_key_is_refused(world):
    """A client that signs a header naming the other suite for this key id is refused
    before decryption (no cross-suite confusion)."""
    header, blob = seal(world)
    other = next(s for s in sealing.SUITES.values() if s != header.suite)
    forged = protocol.UpdateHeader.model_validate(
        {**header.model_dump(by_alias=True), "suite": other}
    )
    parts = protocol.split_envelope(blob)
    header_bytes = protocol.encode_header(forged)
    body = protocol.frame_envelope_body(header.client_key_id, header_bytes, parts.ciphertext)
    blob2 = body + world["client_key"].sign(protocol.SIGNATURE_DOMAIN + body)
    assert reason_of(blob2, world) == "suite_not_accepted"


def test_ciphertext_hides_payload(world):
    _, blob = seal(world, payload=b"SECRET-FEATURE-ROW" * 10)
    assert b"SECRET-FEATURE-ROW" not in blob


def test_update_ids_are_unique_and_time_ordered():
    ids = [protocol.new_update_id(now_ms=1_700_000_000_000 + i) for i in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)


@pytest.mark.parametrize("region", ["framing", "header", "ciphertext", "signature"])
def test_any_flipped_bit_is_refused(world, region):
    _header, blob = seal(world)
    header_len = struct.unpack_from(">I", blob, 21)[0]
    offsets = {
        "framing": 2,
        "header": 25 + header_len // 2,
        "ciphertext": 25 + header_len + 10,
        "signature": len(blob) - 5,
    }
    for bit in (0, 3, 7):
        bad = bytearray(blob)
        bad[offsets[region]] ^= 1 << bit
        assert reason_of(bytes(bad), world) in {"malformed", "bad_signature", "unknown_client"}


def test_key_id_in_framing_flipped_is_unknown_client(world):
    _, blob = seal(world)
    bad = bytearray(blob)
    bad[6] ^= 0x01
    assert reason_of(bytes(bad), world) == "unknown_client"


def test_unknown_client(world):
    stranger = sealing.generate_signing_key()
    _, blob = seal(world, key=stranger)
    assert reason_of(blob, world) == "unknown_client"


def test_revoked_client(world):
    _, blob = seal(world)
    world["fleet"].revoke("client-1")
    assert reason_of(blob, world) == "revoked_client"


def test_envelope_resigned_by_another_client_is_refused(world):
    """Client 2 takes client 1's ciphertext, rewrites the header to its own name, re-signs."""
    _, blob = seal(world)
    parts = protocol.split_envelope(blob)
    header = protocol.parse_header(parts.header_bytes)
    forged_header = header.model_copy(
        update={"client_id": "client-2", "client_key_id": sealing.key_id(world["other_key"])}
    )
    header_bytes = protocol.encode_header(forged_header)
    body = protocol.frame_envelope_body(forged_header.client_key_id, header_bytes, parts.ciphertext)
    forged = body + world["other_key"].sign(protocol.SIGNATURE_DOMAIN + body)
    # the signature is valid, but the HPKE info binds the original header
    assert reason_of(forged, world) == "decrypt_failed"


def test_header_naming_another_client_is_refused(world):
    """A valid signature by client 2 over a header that claims to be client 1."""
    _, blob = seal(world)
    parts = protocol.split_envelope(blob)
    body = protocol.frame_envelope_body(
        sealing.key_id(world["other_key"]), parts.header_bytes, parts.ciphertext
    )
    forged = body + world["other_key"].sign(protocol.SIGNATURE_DOMAIN + body)
    assert reason_of(forged, world) == "bad_signature"


def test_signature_without_domain_tag_is_refused(world):
    _, blob = seal(world)
    body = blob[: -protocol.SIGNATURE_BYTES]
    forged = body + world["client_key"].sign(body)
    assert reason_of(forged, world) == "bad_signature"


def test_wrong_server_key_id(world):
    other_server = sealing.generate_encryption_key()
    _, blob = seal(world, server_public=other_server.public_key())
    assert reason_of(blob, world) == "unknown_server_key"


def test_server_key_rotation_accepts_both(world):
    new_key = sealing.generate_encryption_key()
    world["ring"].add(new_key)
    _, old_blob = seal(world)
    _, new_blob = seal(world, server_public=new_key.public_key())
    for blob in (old_blob, new_blob):
        assert sealing.open_update(blob, world["fleet"], world["ring"]).payload == PAYLOAD


def test_unsupported_framing_version(world):
    _, blob = seal(world)
    bad = bytearray(blob)
    bad[4] = 2
    assert reason_of(bytes(bad), world) == "unsupported_version"


def test_truncated_and_empty(world):
    _, blob = seal(world)
    assert reason_of(b"", world) == "malformed"
    assert reason_of(blob[:30], world) == "malformed"
    assert reason_of(blob[:-1], world) in {"bad_signature", "malformed"}


def test_oversized_envelope(world):
    _, blob = seal(world)
    with pytest.raises(RejectedUpdate) as err:
        sealing.open_update(blob, world["fleet"], world["ring"], max_bytes=len(blob) - 1)
    assert err.value.reason == "oversized"


def test_declared_payload_size_mismatch_is_refused_before_decrypting(world):
    """A signed header whose payload_size lies: refused as malformed, no decrypt attempt."""
    header, blob = seal(world)
    parts = protocol.split_envelope(blob)
    lying = header.model_copy(update={"payload_size": header.payload_size + 1})
    header_bytes = protocol.encode_header(lying)
    body = protocol.frame_envelope_body(lying.client_key_id, header_bytes, parts.ciphertext)
    forged = body + world["client_key"].sign(protocol.SIGNATURE_DOMAIN + body)
    assert reason_of(forged, world) == "malformed"


def test_header_with_unknown_field_or_schema(world):
    header, blob = seal(world)
    parts = protocol.split_envelope(blob)
    for mutate, expected in (
        (lambda d: d | {"extra": 1}, "malformed"),
        (lambda d: d | {"schema": "dadm.update.v9"}, "unsupported_version"),
        (lambda d: {k: v for k, v in d.items() if k != "base_version"}, "malformed"),
    ):
        raw = mutate(header.model_dump(by_alias=True))
        header_bytes = protocol.canonical_json(raw)
        body = protocol.frame_envelope_body(header.client_key_id, header_bytes, parts.ciphertext)
        forged = body + world["client_key"].sign(protocol.SIGNATURE_DOMAIN + body)
        assert reason_of(forged, world) == expected


def test_json_nesting_bomb_in_header_is_refused(world):
    header, _blob = seal(world)
    bomb = b"[" * 2000 + b"]" * 2000
    body = protocol.frame_envelope_body(header.client_key_id, bomb, b"")
    forged = body + world["client_key"].sign(protocol.SIGNATURE_DOMAIN + body)
    assert reason_of(forged, world) == "malformed"


def test_key_ids_differ_by_algorithm_and_key():
    a, b = sealing.generate_signing_key(), sealing.generate_signing_key()
    assert sealing.key_id(a) == sealing.key_id(a.public_key())
    assert sealing.key_id(a) != sealing.key_id(b)
    assert len(sealing.key_id(a)) == 32


def test_pem_round_trip_with_passphrase(tmp_path):
    key = sealing.generate_signing_key()
    path = tmp_path / "k.pem"
    sealing.write_private_key(path, key, passphrase=b"pw")
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = sealing.load_signing_key(path, passphrase=b"pw")
    assert sealing.key_id(loaded) == sealing.key_id(key)
    with pytest.raises((TypeError, ValueError)):
        sealing.load_signing_key(path)


def test_hybrid_key_pem_round_trip(tmp_path):
    key = sealing.generate_encryption_key("mlkem768-x25519")
    path = tmp_path / "hybrid.pem"
    sealing.write_private_key(path, key, passphrase=b"pw")
    loaded = sealing.load_private_pem(path.read_bytes(), b"pw")
    assert isinstance(loaded, sealing.HybridPrivateKey)
    assert sealing.key_id(loaded) == sealing.key_id(key)
    public = sealing.load_encryption_public_key(sealing.public_pem(key))
    assert public == key.public_key()
    assert sealing.key_id(public) != sealing.key_id(key.x25519)  # not the classic half's id
    with pytest.raises(ValueError, match="two PEM blocks"):  # halves in the wrong order
        sealing.load_public_pem(sealing.public_pem(key.x25519) + sealing.public_pem(key.mlkem))
    with pytest.raises(ValueError, match="PEM blocks"):
        sealing.load_public_pem(sealing.public_pem(key) * 2)


def test_server_keyring_from_directory(tmp_path):
    keys = [sealing.generate_encryption_key(s) for s in ("x25519", "mlkem768-x25519")]
    for i, k in enumerate(keys):
        sealing.write_private_key(tmp_path / f"s{i}.pem", k)
    ring = sealing.ServerKeyring.from_directory(tmp_path)
    assert ring.key_ids() == sorted(sealing.key_id(k) for k in keys)
    assert "PRIVATE" not in repr(ring)

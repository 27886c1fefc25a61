"""OpenSSF model-signing packages: our signer/verifier against model-signing 1.1.1, both ways.

Interop runs offline through the ``model_signing`` API and its CLI; refusals (tampered,
missing, unlisted files, untrusted keys, garbage bundles) must surface as
:class:`VerificationError` and nothing else.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import model_signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlib.crypto import signing
from fedlib.errors import VerificationError

CLI = Path(sys.executable).parent / "model_signing"

FILES: dict[str, bytes] = {
    "model.onnx": b"\x08\x09\x12\x07skl2onnx" + bytes(range(256)) * 8,
    "weights.bin": bytes(8 * 97),
    "metadata.json": b'{"kind":"autoencoder","version":3}',
}
DIGESTS = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
KEY = signing.generate_signing_key()
TRUSTED = {signing.key_id(KEY): KEY.public_key()}
BUNDLE = signing.sign_files(FILES, KEY)


# ----------------------------------------------------------------------------- helpers


def write_package(root: Path, files: Mapping[str, bytes] = FILES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_keys(tmp: Path, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    priv, pub = tmp / "priv.pem", tmp / "pub.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(signing.public_key_pem(key))
    return priv, pub


def ms_verify(pkg: Path, pub: Path) -> None:
    """model_signing's own API verification, the signature sitting inside the package."""
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(
        pkg, pkg / signing.SIGNATURE_FILE
    )


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def statement_of(bundle: bytes) -> dict[str, Any]:
    return json.loads(base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"]))


def resign(statement: Any, key: ec.EllipticCurvePrivateKey = KEY) -> bytes:
    return signing._make_bundle(json.dumps(statement).encode(), key)


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    root = write_package(tmp_path / "pkg")
    signing.sign_directory(root, KEY)
    return root


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    return write_keys(tmp_path, KEY)[1]


# ----------------------------------------------------------------------------- format


def test_bundle_matches_the_model_signing_format():
    bundle = json.loads(BUNDLE)
    assert list(bundle) == ["mediaType", "verificationMaterial", "dsseEnvelope"]
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert bundle["verificationMaterial"] == {
        "publicKey": {"hint": hashlib.sha256(pem).hexdigest()},
        "tlogEntries": [],
    }
    envelope = bundle["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert len(envelope["signatures"]) == 1 and envelope["signatures"][0]["keyid"] == ""
    statement = statement_of(BUNDLE)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    resources = statement["predicate"]["resources"]
    assert [r["name"] for r in resources] == ["metadata.json", "model.onnx", "weights.bin"]
    assert all(r["algorithm"] == "sha256" and r["digest"] == DIGESTS[r["name"]] for r in resources)
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    assert statement["subject"] == [{"name": "model", "digest": {"sha256": root}}]
    assert statement["predicate"]["serialization"] == {
        "method": "files",
        "hash_type": "sha256",
        "allow_symlinks": False,
        "ignore_paths": ["signature.bin", ".git", ".gitattributes", ".github", ".gitignore"],
    }


def test_key_id_is_a_der_fingerprint_and_signing_is_deterministic():
    der = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert signing.key_id(KEY) == hashlib.sha256(der).hexdigest()[:32]
    assert signing.key_id(KEY) == signing.key_id(KEY.public_key())
    assert signing.sign_files(FILES, KEY) == BUNDLE  # RFC 6979: reruns are byte-identical
    assert signing.load_public_key(signing.public_key_pem(KEY)) == KEY.public_key()


def test_nested_names_sort_like_model_signing(tmp_path: Path, pub: Path):
    files = {"a.b": b"1", "a/b": b"2", "a/c/d": b"3", "B": b"4"}
    root = write_package(tmp_path / "nested", files)
    bundle = signing.sign_directory(root, KEY)
    names = [r["name"] for r in statement_of(bundle)["predicate"]["resources"]]
    assert names == ["B", "a/b", "a/c/d", "a.b"]  # path components, not plain strings
    ms_verify(root, pub)
    assert signing.verify_files(bundle, files, TRUSTED) == {
        n: hashlib.sha256(d).hexdigest() for n, d in files.items()
    }


# ----------------------------------------------------------------------------- interop


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_our_signature_verifies_with_model_signing_api(tmp_path: Path, curve: str):
    key = signing.generate_signing_key(curve)
    root = write_package(tmp_path / "pkg")
    signing.sign_directory(root, key)
    ms_verify(root, write_keys(tmp_path, key)[1])


def test_our_signature_verifies_with_model_signing_cli(pkg: Path, pub: Path):
    result = cli("verify", "key", pkg, "--public_key", pub, "--signature", pkg / "signature.bin")
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_model_signing_api_signature_verifies_with_ours(tmp_path: Path, curve: str):
    key = signing.generate_signing_key(curve)
    priv, _ = write_keys(tmp_path, key)
    root = write_package(tmp_path / "pkg")
    # the API does not ignore the signature file by itself: sign before it exists
    model_signing.signing.Config().use_elliptic_key_signer(private_key=priv).sign(
        root, root / "signature.bin"
    )
    trusted = {signing.key_id(key): key.public_key()}
    assert signing.verify_directory(root, trusted) == DIGESTS
    signature = (root / "signature.bin").read_bytes()
    assert signing.verify_files(signature, FILES, trusted) == DIGESTS


def test_model_signing_cli_signature_verifies_with_ours(tmp_path: Path):
    key = signing.generate_signing_key()
    priv, _ = write_keys(tmp_path, key)
    root = write_package(tmp_path / "pkg")
    result = cli("sign", "key", root, "--private_key", priv, "--signature", root / "signature.bin")
    assert result.returncode == 0, result.stderr
    assert signing.verify_directory(root, {signing.key_id(key): key.public_key()}) == DIGESTS


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_tampered_file_fails_in_both_verifiers(pkg: Path, pub: Path, name: str):
    (pkg / name).write_bytes(FILES[name] + b" ")
    with pytest.raises(VerificationError, match=f"{name} does not match"):
        signing.verify_directory(pkg, TRUSTED)
    with pytest.raises(VerificationError, match=f"{name} does not match"):
        signing.verify_files(BUNDLE, {**FILES, name: FILES[name][:-1]}, TRUSTED)
    with pytest.raises(ValueError, match=f"Hash mismatch for '{name}'"):
        ms_verify(pkg, pub)


def test_an_unlisted_file_fails_ours_and_model_signing_only_by_default(pkg: Path, pub: Path):
    (pkg / "evil.py").write_bytes(b"import os")
    with pytest.raises(VerificationError, match=r"unlisted file.*evil\.py"):
        signing.verify_directory(pkg, TRUSTED)
    with pytest.raises(VerificationError, match="unlisted"):
        signing.verify_files(BUNDLE, {**FILES, "evil.py": b"import os"}, TRUSTED)
    with pytest.raises(ValueError, match="Extra files found"):
        ms_verify(pkg, pub)
    # ...but model_signing lets it through when asked to ignore unsigned files
    model_signing.verifying.Config().use_elliptic_key_verifier(
        public_key=pub
    ).set_ignore_unsigned_files(True).verify(pkg, pkg / "signature.bin")


def test_git_files_are_ignored_by_model_signing_but_refused_by_ours(pkg: Path, pub: Path):
    (pkg / ".gitignore").write_bytes(b"*")
    (pkg / ".git").mkdir()
    (pkg / ".git" / "config").write_bytes(b"[core]")
    ms_verify(pkg, pub)  # model_signing always skips git paths, listed or not
    with pytest.raises(VerificationError, match="unlisted"):
        signing.verify_directory(pkg, TRUSTED)


def test_a_missing_file_fails_in_both_verifiers(pkg: Path, pub: Path):
    (pkg / "weights.bin").unlink()
    with pytest.raises(VerificationError, match=r"missing.*weights\.bin"):
        signing.verify_directory(pkg, TRUSTED)
    with pytest.raises(VerificationError, match="missing"):
        signing.verify_files(BUNDLE, {"model.onnx": FILES["model.onnx"]}, TRUSTED)
    with pytest.raises(ValueError, match="Missing files"):
        ms_verify(pkg, pub)


def test_an_untrusted_key_fails(tmp_path: Path, pkg: Path):
    other = signing.generate_signing_key()
    trusted_other = {signing.key_id(other): other.public_key()}
    with pytest.raises(VerificationError, match="unknown key"):
        signing.verify_directory(pkg, trusted_other)
    # without the (unsigned) hint every trusted key is tried, and none verifies
    bundle = json.loads(BUNDLE)
    del bundle["verificationMaterial"]["publicKey"]
    bare = json.dumps(bundle).encode()
    with pytest.raises(VerificationError, match="bad signature"):
        signing.verify_files(bare, FILES, trusted_other)
    assert signing.verify_files(bare, FILES, {**trusted_other, **TRUSTED}) == DIGESTS
    # a forged hint pointing at the trusted key does not help the untrusted signer
    forged = json.loads(signing.sign_files(FILES, other))
    forged["verificationMaterial"]["publicKey"]["hint"] = signing.key_hint(KEY)
    with pytest.raises(VerificationError, match="bad signature"):
        signing.verify_files(json.dumps(forged).encode(), FILES, TRUSTED)
    with pytest.raises(VerificationError, match="no trusted"):
        signing.verify_files(BUNDLE, FILES, {})
    _, other_pub = write_keys(tmp_path, other)
    with pytest.raises(ValueError, match="Key mismatch"):
        ms_verify(pkg, other_pub)


def test_the_hint_picks_among_several_trusted_keys():
    keys = [signing.generate_signing_key(c) for c in ("P-256", "P-384", "P-256")]
    trusted = {signing.key_id(k): k.public_key() for k in keys}
    for key in keys:
        assert signing.verify_files(signing.sign_files(FILES, key), FILES, trusted) == DIGESTS


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (b"", "not valid JSON"),
        (BUNDLE[: len(BUNDLE) // 2], "not valid JSON"),
        (b"\xff\xfe" + BUNDLE, "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"[" * 100 + b"]" * 100, "nests deeper"),
        (b'{"a":NaN}', "not valid JSON"),
        (b" " * (signing.MAX_BUNDLE_BYTES + 1), "limit"),
        (BUNDLE.replace(b"v0.3", b"v0.2"), "media type"),
        (BUNDLE.replace(b'"tlogEntries":[]', b'"tlogEntries":[{}]'), "transparency-log"),
        (BUNDLE.replace(b'"keyid":""', b'"keyid":"","keyid":"x"'), "duplicate key"),
        (BUNDLE.replace(b"in-toto+json", b"in-toto+jsonx"), "payload type"),
        (BUNDLE.replace(b'"payload":"', b'"payload":"!'), "base64"),
        (BUNDLE.replace(b'"mediaType"', b'"extra":1,"mediaType"'), "unknown fields"),
        (BUNDLE.replace(b'"hint":"', b'"hint":"X'), "hint"),
    ],
)
def test_garbage_bundles_fail_cleanly(signature: bytes, reason: str):
    with pytest.raises(VerificationError, match=reason):
        signing.verify_files(signature, FILES, TRUSTED)


def test_the_signature_is_checked_before_the_statement_is_parsed():
    stranger = signing.generate_signing_key()
    with pytest.raises(VerificationError, match="unknown key"):
        signing.verify_files(signing._make_bundle(b"{not json", stranger), FILES, TRUSTED)
    with pytest.raises(VerificationError, match="statement is not valid JSON"):
        signing.verify_files(signing._make_bundle(b"{not json", KEY), FILES, TRUSTED)


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return mutate


_RES = ("predicate", "resources")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_set(("_type",), "https://in-toto.io/Statement/v0.1"), "statement type"),
        (_set(("predicateType",), "https://model_signing/Digests/v0.1"), "predicate type"),
        (lambda s: s["subject"].append(s["subject"][0]), "exactly one subject"),
        (_set(("subject", 0, "digest", "sha256"), "0" * 64), "inconsistent"),
        (_set((*_RES, 0, "digest"), DIGESTS["model.onnx"]), "inconsistent"),
        (_set(("predicate", "serialization", "method"), "shards"), "per-file SHA-256"),
        (_set(("predicate", "serialization", "hash_type"), "blake2b"), "per-file SHA-256"),
        (_set((*_RES, 0, "name"), "../metadata.json"), "canonical relative path"),
        (_set((*_RES, 0, "name"), "/etc/passwd"), "canonical relative path"),
        (_set((*_RES, 0, "name"), "model.onnx"), "twice"),
        (_set((*_RES, 0, "algorithm"), "sha512"), "not a SHA-256 resource"),
        (_set((*_RES, 0, "digest"), "AB" * 32), "not SHA-256 hex"),
        (_set(_RES, []), "no files"),
        (lambda s: s["predicate"]["resources"].pop(), "missing|inconsistent"),
    ],
)
def test_signed_statements_off_format_are_refused(
    mutate: Callable[[dict[str, Any]], None], reason: str
):
    statement = statement_of(BUNDLE)
    mutate(statement)
    with pytest.raises(VerificationError, match=reason):
        signing.verify_files(resign(statement), FILES, TRUSTED)


def test_unknown_predicate_fields_are_ignored_as_v1_requires():
    statement = statement_of(BUNDLE)
    statement["predicate"]["model_card"] = {"owner": "ops"}
    assert signing.verify_files(resign(statement), FILES, TRUSTED) == DIGESTS


def test_signing_refuses_reserved_bad_or_no_names(tmp_path: Path):
    for name in ("signature.bin", ".git/config", ".gitignore", "a/../b", "/abs", "", "a\\b"):
        with pytest.raises(ValueError):
            signing.sign_files({**FILES, name: b"x"}, KEY)
    with pytest.raises(ValueError):
        signing.sign_files({}, KEY)
    with pytest.raises(ValueError):
        signing.generate_signing_key("secp256k1")


def test_symlinks_in_a_package_folder_are_refused(pkg: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.write_bytes(FILES["weights.bin"])
    (pkg / "weights.bin").unlink()
    os.symlink(outside, pkg / "weights.bin")
    with pytest.raises(VerificationError, match="symlink"):
        signing.verify_directory(pkg, TRUSTED)
    with pytest.raises(ValueError, match="symlink"):
        signing.sign_directory(pkg, KEY)


def test_a_folder_without_signature_fails_cleanly(tmp_path: Path):
    root = write_package(tmp_path / "unsigned")
    with pytest.raises(VerificationError, match="cannot open"):
        signing.verify_directory(root, TRUSTED)
    shutil.rmtree(root)
    with pytest.raises(VerificationError, match="cannot open"):
        signing.verify_directory(root, TRUSTED)


def test_a_fifo_signature_is_refused_without_blocking(pkg: Path):
    (pkg / "signature.bin").unlink()
    os.mkfifo(pkg / "signature.bin")
    with pytest.raises(VerificationError, match="special file"):
        signing.verify_directory(pkg, TRUSTED)


# ----------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "sha256", "files", signing.key_hint(KEY), *DIGESTS, *DIGESTS.values()]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def json_mutation(draw: st.DrawFn, doc: Any) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return doc


@st.composite
def byte_mutation(draw: st.DrawFn) -> bytes:
    data = bytearray(BUNDLE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_verification_errors(signature: bytes) -> None:
    try:
        result = signing.verify_files(signature, FILES, TRUSTED)
    except VerificationError:
        return
    assert result == DIGESTS  # anything accepted must still vouch for exactly these files


@FUZZ
@given(st.binary(max_size=2048) | byte_mutation())
def test_fuzz_raw_bytes_give_only_verification_errors(signature: bytes):
    _only_verification_errors(signature)


@FUZZ
@given(json_mutation(json.loads(BUNDLE)))
def test_fuzz_bundle_structure_gives_only_verification_errors(bundle: Any):
    _only_verification_errors(json.dumps(bundle).encode())


@FUZZ
@given(json_mutation(statement_of(BUNDLE)))
def test_fuzz_validly_signed_statements_give_only_verification_errors(statement: Any):
    _only_verification_errors(resign(statement))

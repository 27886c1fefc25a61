"""Model-package signatures in the OpenSSF model-signing format, offline, ECDSA keys.

``signature.bin`` is a sigstore bundle (v0.3, JSON) exactly as ``model_signing sign key``
(PyPI ``model-signing`` 1.1.1) writes it, so OpenSSF's own verifier accepts our packages
and we accept theirs::

    {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
     "verificationMaterial": {"publicKey": {"hint": <hex SHA-256 of the PEM public key>},
                              "tlogEntries": []},
     "dsseEnvelope": {"payload": <base64 statement>,
                      "payloadType": "application/vnd.in-toto+json",
                      "signatures": [{"sig": <base64 DER ECDSA over PAE>, "keyid": ""}]}}

The statement is in-toto v1 with predicate ``https://model_signing/signature/v1.0``: one
subject (the package name, and SHA-256 over the concatenated raw file digests in listed
order), and a predicate holding ``resources`` (name, ``sha256``, hex digest per file,
sorted by path) and ``serialization`` (method ``files``, ``sha256``, no symlinks, and
``ignore_paths`` naming the signature file and git files, so the bundle verifies while
it sits inside the package folder). The signature is ECDSA (P-256/SHA-256,
P-384/SHA-384, P-521/SHA-512) over DSSE's PAE of the payload; no transparency log, no
certificate, no network.

Verification checks the DSSE signature with a pinned key before it decodes the statement,
then demands that the statement lists exactly the files at hand with matching digests.
It is stricter than ``model_signing``, which ignores git files and can be told to ignore
unsigned files. Replay of an old, validly signed package is not stopped here: that is the
channel's job (versions and expiry).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlib.errors import VerificationError
from fedlib.wire import protocol
from fedlib.wire.protocol import strict_json

SIGNATURE_FILE: Final = "signature.bin"
BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://model_signing/signature/v1.0"
# What ``model_signing sign key DIR --signature DIR/signature.bin`` records: the signature
# itself plus the git paths it always skips. Names starting with these cannot be signed.
IGNORE_PATHS: Final = (SIGNATURE_FILE, ".git", ".gitattributes", ".github", ".gitignore")

MAX_BUNDLE_BYTES: Final = 1024 * 1024
MAX_FILES: Final = 4096
MAX_NAME_CHARS: Final = 1024
MAX_JSON_DEPTH: Final = 8

CURVES: Final[Mapping[str, type[ec.EllipticCurve]]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_HASH_FOR_CURVE: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


# ------------------------------------------------------------------------------- keys


def generate_signing_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    """A fresh package-signing key on a curve model-signing supports."""
    if curve not in CURVES:
        raise ValueError(f"unsupported curve {curve!r}; use one of {sorted(CURVES)}")
    return ec.generate_private_key(CURVES[curve]())


def _public(
    key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey,
) -> ec.EllipticCurvePublicKey:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise TypeError(f"expected an elliptic-curve key, got {type(key).__name__}")
    if public.curve.name not in _HASH_FOR_CURVE:
        raise ValueError(f"unsupported curve {public.curve.name}")
    return public


def public_key_pem(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    """The PEM SubjectPublicKeyInfo that ``model_signing verify key --public_key`` reads."""
    return _public(key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """Load a pinned verification key, refusing anything but a supported EC curve."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"expected an elliptic-curve public key, got {type(key).__name__}")
    return _public(key)


def key_id(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """Fingerprint for pinning: SHA-256 of the DER SubjectPublicKeyInfo, 128 bits in hex."""
    der = _public(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:32]


def key_hint(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """model-signing's unauthenticated key hint: SHA-256 of the PEM public key, hex."""
    return hashlib.sha256(public_key_pem(key)).hexdigest()


# ------------------------------------------------------------------------------- names


def _name_problem(name: object) -> str | None:
    """Why ``name`` is not a canonical relative POSIX path, or None when it is one."""
    if not isinstance(name, str) or not name:
        return "file name must be a non-empty string"
    if len(name) > MAX_NAME_CHARS or "\x00" in name or "\\" in name:
        return f"file name {name[:80]!r} is too long or holds NUL/backslash"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return f"file name {name!r} is not a canonical relative path"
    return None


def _order(name: str) -> tuple[str, ...]:
    # model_signing sorts resources as PurePosixPath, i.e. by path components
    return tuple(name.split("/"))


def _root_digest(hex_digests: Iterable[str]) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in hex_digests)).hexdigest()


def _pae(payload_type: bytes, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type, len(payload), payload)


def _ecdsa(public: ec.EllipticCurvePublicKey, *, deterministic: bool = False) -> ec.ECDSA:
    algorithm = _HASH_FOR_CURVE[public.curve.name]()
    return ec.ECDSA(algorithm, deterministic_signing=deterministic)


# ------------------------------------------------------------------------------- signing


def sign_digests(
    digests: Mapping[str, str], key: ec.EllipticCurvePrivateKey, *, model_name: str = "model"
) -> bytes:
    """Sign a package given as {relative name: SHA-256 hex}; returns ``signature.bin``."""
    if not digests:
        raise ValueError("nothing to sign: no files")
    if len(digests) > MAX_FILES:
        raise ValueError(f"{len(digests)} files, at most {MAX_FILES}")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("model_name must be a non-empty string")
    for name, digest in digests.items():
        problem = _name_problem(name)
        if problem:
            raise ValueError(problem)
        if name.split("/")[0] in IGNORE_PATHS:
            raise ValueError(f"{name!r} is a reserved name that model-signing would ignore")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError(f"digest of {name!r} is not lowercase SHA-256 hex")
    names = sorted(digests, key=_order)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": model_name, "digest": {"sha256": _root_digest(digests[n] for n in names)}}
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "resources": [{"name": n, "algorithm": "sha256", "digest": digests[n]} for n in names],
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": list(IGNORE_PATHS),
            },
        },
    }
    bundle = _make_bundle(protocol.canonical_json(statement), key)
    if len(bundle) > MAX_BUNDLE_BYTES:
        raise ValueError(f"signature would be {len(bundle)} bytes, limit {MAX_BUNDLE_BYTES}")
    return bundle


def sign_files(
    files: Mapping[str, bytes], key: ec.EllipticCurvePrivateKey, *, model_name: str = "model"
) -> bytes:
    """Sign a package held in memory ({name: bytes}, without ``signature.bin``)."""
    return sign_digests(
        {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        key,
        model_name=model_name,
    )


def _make_bundle(payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Wrap a statement in a DSSE envelope and a v0.3 bundle, field order as model-signing."""
    public = _public(key)
    pae = _pae(PAYLOAD_TYPE.encode(), payload)
    try:  # RFC 6979: the same package and key give the same signature.bin, byte for byte
        sig = key.sign(pae, _ecdsa(public, deterministic=True))
    except UnsupportedAlgorithm:
        sig = key.sign(pae, _ecdsa(public))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(public)}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------- verifying


def _parse_json(data: bytes, what: str) -> Any:
    """Strict JSON (:func:`fedlib.wire.protocol.strict_json`) refused as a VerificationError."""
    try:
        return strict_json(data, max_bytes=MAX_BUNDLE_BYTES, max_depth=MAX_JSON_DEPTH, what=what)
    except ValueError as exc:
        raise VerificationError(str(exc)) from None


def _obj(
    value: Any, what: str, required: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VerificationError(f"{what} must be a JSON object")
    missing, unknown = required - value.keys(), value.keys() - required - optional
    if missing or unknown:
        raise VerificationError(
            f"{what} has missing fields {sorted(missing)} / unknown fields {sorted(unknown)[:5]}"
        )
    return value


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _BASE64.fullmatch(value):
        raise VerificationError(f"{what} is not standard base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"{what} is not standard base64") from None


def _open_envelope(signature: bytes, trusted: Mapping[str, ec.EllipticCurvePublicKey]) -> bytes:
    """Check the bundle's DSSE signature with a pinned key; return the payload, unparsed."""
    if not isinstance(signature, bytes | bytearray):
        raise VerificationError("signature must be bytes")
    if len(signature) > MAX_BUNDLE_BYTES:
        raise VerificationError(
            f"signature bundle is {len(signature)} bytes, limit {MAX_BUNDLE_BYTES}"
        )
    bundle = _obj(
        _parse_json(bytes(signature), "signature bundle"),
        "signature bundle",
        {"mediaType", "verificationMaterial", "dsseEnvelope"},
    )
    if bundle["mediaType"] != BUNDLE_MEDIA_TYPE:
        raise VerificationError(f"bundle media type must be {BUNDLE_MEDIA_TYPE}")
    material = _obj(
        bundle["verificationMaterial"],
        "verificationMaterial (only offline key signatures are supported)",
        set(),
        frozenset({"publicKey", "tlogEntries"}),
    )
    if material.get("tlogEntries", []) != []:
        raise VerificationError("transparency-log entries are not supported (offline keys only)")
    hint = _obj(material.get("publicKey", {}), "publicKey", set(), frozenset({"hint"})).get("hint")
    if hint not in (None, "") and (not isinstance(hint, str) or not _HEX64.fullmatch(hint)):
        raise VerificationError("publicKey hint must be a SHA-256 hex string")
    envelope = _obj(
        bundle["dsseEnvelope"], "dsseEnvelope", {"payload", "payloadType", "signatures"}
    )
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise VerificationError(f"DSSE payload type must be {PAYLOAD_TYPE}")
    payload = _b64(envelope["payload"], "DSSE payload")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise VerificationError("DSSE envelope must carry exactly one signature")
    entry = _obj(signatures[0], "DSSE signature", {"sig"}, frozenset({"keyid"}))
    if not isinstance(entry.get("keyid", ""), str):
        raise VerificationError("DSSE keyid must be a string")
    sig = _b64(entry["sig"], "DSSE signature")
    if not sig:
        raise VerificationError("DSSE signature is empty")

    if not trusted:
        raise VerificationError("no trusted package-signing keys are configured")
    candidates = [k for k in trusted.values() if _usable(k)]
    if hint:  # unauthenticated: only narrows the search; the signature decides
        candidates = [k for k in candidates if key_hint(k) == hint]
        if not candidates:
            raise VerificationError(f"signed by an unknown key (hint {hint[:16]}…)")
    pae = _pae(PAYLOAD_TYPE.encode(), payload)
    for public in candidates:
        try:
            public.verify(sig, pae, _ecdsa(public))
        except (InvalidSignature, ValueError):
            continue
        return payload
    raise VerificationError("bad signature: no trusted key verifies the DSSE envelope")


def _usable(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _HASH_FOR_CURVE


def _read_statement(payload: bytes) -> dict[str, str]:
    """Parse a verified statement into {name: sha256 hex}; refuse anything off-format."""
    statement = _obj(
        _parse_json(payload, "signed statement"),
        "signed statement",
        {"_type", "subject", "predicateType", "predicate"},
    )
    if statement["_type"] != STATEMENT_TYPE:
        raise VerificationError(f"statement type must be {STATEMENT_TYPE}")
    if statement["predicateType"] != PREDICATE_TYPE:
        raise VerificationError(f"predicate type must be {PREDICATE_TYPE} (v0.1 is refused)")
    subjects = statement["subject"]
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise VerificationError("statement must have exactly one subject")
    subject = _obj(subjects[0], "subject", {"name", "digest"})
    root = _obj(subject["digest"], "subject digest", {"sha256"})["sha256"]
    if not isinstance(subject["name"], str) or not isinstance(root, str):
        raise VerificationError("subject name and digest must be strings")
    # v1.0: verifiers ignore predicate fields beyond these two
    predicate = statement["predicate"]
    if not isinstance(predicate, dict) or not {"serialization", "resources"} <= predicate.keys():
        raise VerificationError("predicate must hold 'serialization' and 'resources'")
    method = _obj(
        predicate["serialization"],
        "serialization",
        {"method", "hash_type", "allow_symlinks"},
        frozenset({"ignore_paths"}),
    )
    if method["method"] != "files" or method["hash_type"] != "sha256":
        raise VerificationError("only per-file SHA-256 serialization is supported")
    if not isinstance(method["allow_symlinks"], bool):
        raise VerificationError("serialization.allow_symlinks must be a boolean")
    ignored = method.get("ignore_paths", [])
    if not isinstance(ignored, list) or not all(isinstance(p, str) for p in ignored):
        raise VerificationError("serialization.ignore_paths must be a list of strings")
    resources = predicate["resources"]
    if not isinstance(resources, list) or not resources:
        raise VerificationError("statement lists no files")
    if len(resources) > MAX_FILES:
        raise VerificationError(f"statement lists {len(resources)} files, at most {MAX_FILES}")
    listed: dict[str, str] = {}
    for item in resources:
        entry = _obj(item, "resource", {"name", "algorithm", "digest"})
        name, digest = entry["name"], entry["digest"]
        problem = _name_problem(name)
        if problem:
            raise VerificationError(f"statement: {problem}")
        if entry["algorithm"] != "sha256" or not isinstance(digest, str):
            raise VerificationError(f"statement: {name!r} is not a SHA-256 resource")
        if not _HEX64.fullmatch(digest):
            raise VerificationError(f"statement: digest of {name!r} is not SHA-256 hex")
        if name in listed:
            raise VerificationError(f"statement lists {name!r} twice")
        listed[name] = digest
    if _root_digest(listed.values()) != root:
        raise VerificationError("statement is inconsistent: subject digest does not match files")
    return listed


def verify_digests(
    signature: bytes,
    digests: Mapping[str, str],
    trusted: Mapping[str, ec.EllipticCurvePublicKey],
) -> dict[str, str]:
    """Verify ``signature.bin`` against {name: SHA-256 hex} of every package file."""
    listed = _read_statement(_open_envelope(signature, trusted))
    unlisted = sorted(set(digests) - set(listed))
    if unlisted:
        raise VerificationError(f"unlisted file(s) not covered by the signature: {unlisted[:5]}")
    missing = sorted(set(listed) - set(digests))
    if missing:
        raise VerificationError(f"signed file(s) missing: {missing[:5]}")
    for name, digest in listed.items():
        if digests[name] != digest:
            raise VerificationError(f"{name} does not match its signed SHA-256 digest")
    return listed


def verify_files(
    signature: bytes,
    files: Mapping[str, bytes],
    trusted: Mapping[str, ec.EllipticCurvePublicKey],
) -> dict[str, str]:
    """Verify a package held in memory ({name: bytes}, without ``signature.bin``).

    Returns {name: sha256 hex}; raises :class:`VerificationError` saying why otherwise.
    """
    return verify_digests(
        signature,
        {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        trusted,
    )


# ------------------------------------------------------------------------------- folders


def _open_regular(path: Path, name: str, error: type[Exception]) -> BinaryIO:
    """Open a regular file without following a symlink or blocking on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"cannot open {name}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{name} is a symlink or special file")
    return os.fdopen(fd, "rb")


def _hash_directory(root: Path, error: type[Exception]) -> dict[str, str]:
    """SHA-256 of every regular file below ``root`` except the signature; no symlinks."""
    digests: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for entry in sorted(dirnames + filenames):
            path = base / entry
            name = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue
            if name == SIGNATURE_FILE:
                continue
            if not stat.S_ISREG(mode):
                raise error(f"{name} is a symlink or special file")
            if len(digests) >= MAX_FILES:
                raise error(f"more than {MAX_FILES} files in {root}")
            with _open_regular(path, name, error) as fh:
                digests[name] = hashlib.file_digest(fh, "sha256").hexdigest()  # type: ignore[arg-type]
    return digests


def sign_directory(path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign every file of a package folder and write ``<path>/signature.bin`` atomically."""
    root = Path(path)
    bundle = sign_digests(_hash_directory(root, ValueError), key, model_name=root.resolve().name)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{SIGNATURE_FILE}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bundle)
        os.replace(tmp, root / SIGNATURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return bundle


def verify_directory(
    path: str | os.PathLike[str], trusted: Mapping[str, ec.EllipticCurvePublicKey]
) -> dict[str, str]:
    """Verify a package folder against its ``signature.bin``; returns {name: sha256 hex}.

    The folder may hold nothing but the signed files. A caller that reads a file
    afterwards must check it against the returned digest (or read first and use
    :func:`verify_files`): the folder can change after this returns.
    """
    root = Path(path)
    try:
        with _open_regular(root / SIGNATURE_FILE, SIGNATURE_FILE, VerificationError) as fh:
            signature = fh.read(MAX_BUNDLE_BYTES + 1)
        digests = _hash_directory(root, VerificationError)
    except OSError as exc:
        raise VerificationError(f"cannot read package folder {root}: {exc}") from None
    return verify_digests(signature, digests, trusted)

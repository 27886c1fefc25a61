"""Air-gap bundles: export from a real channel on SeaweedFS, verify with no store at all.

The device side only ever gets bytes plus what it pins (root v1 and the package key).
Each refusal test changes one thing about an honest bundle and checks the refusal
reason, after the honest bundle was shown to pass.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tuf.api.metadata import Metadata, Timestamp

from client.cli import build_parser as client_parser
from fedlib.crypto import signing
from fedlib.crypto.pq_signing import public_pem
from fedlib.storage.store import LocalStore, S3Config, S3Store
from fedlib.trust.airgap import MAX_MEMBERS, BundleVerificationError, VerifiedBundle, verify_bundle
from fedlib.trust.airgap_export import export_bundle
from fedlib.trust.channel_layout import ChannelError, Expiry
from fedlib.trust.channel_repository import ChannelKeys, ChannelRepository, generate_signer
from scripts.seaweed import SeaweedServer

NOW = datetime.now(UTC).replace(microsecond=0)


def package(version: int, key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    """Small fake package files plus their OpenSSF signature."""
    files = {
        "model.onnx": f"onnx-graph-v{version}".encode() * 50,
        "weights.bin": bytes([version]) * 640,
        "metadata.json": json.dumps({"version": version, "kind": "test"}).encode(),
    }
    return {**files, signing.SIGNATURE_FILE: signing.sign_files(files, key)}


def pins(key: ec.EllipticCurvePrivateKey) -> dict[str, ec.EllipticCurvePublicKey]:
    return {signing.key_id(key): key.public_key()}


def make_channel(store: Any, keys_dir: Path, pkg_key: ec.EllipticCurvePrivateKey, **kw: Any):
    repo = ChannelRepository(store, ChannelKeys.generate(keys_dir), **kw)
    repo.init()
    v1, v2 = package(1, pkg_key), package(2, pkg_key)
    repo.publish(1, v1)
    repo.publish(2, v2, {"rollback_of": None})
    return repo, v1, v2


@pytest.fixture(scope="module")
def chan(s3_config: S3Config, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One channel on the session's SeaweedFS with v1 and v2, and v2 exported for 30 days."""
    store = S3Store(f"airgap-{uuid.uuid4().hex[:12]}", s3_config)
    store.ensure_bucket()
    pkg_key = signing.generate_signing_key()
    repo, v1, v2 = make_channel(store, tmp_path_factory.mktemp("keys"), pkg_key)
    bundle, info = export_bundle(
        store, version=2, expires_in_days=30, repository=repo, now=NOW, package_keys=pins(pkg_key)
    )
    return SimpleNamespace(
        repo=repo,
        store=store,
        root=repo.root_bytes(1),
        keys=pins(pkg_key),
        pkg_key=pkg_key,
        v1=v1,
        v2=v2,
        bundle=bundle,
        info=info,
    )


@pytest.fixture
def verify(chan: SimpleNamespace, tmp_path: Path) -> Callable[..., VerifiedBundle]:
    """verify_bundle with the device's pins and nothing else (no store, no endpoint)."""

    def run(bundle: bytes | Path, **kw: Any) -> VerifiedBundle:
        kw.setdefault("trusted_root", chan.root)
        kw.setdefault("trusted_package_keys", chan.keys)
        kw.setdefault("installed_version", 1)
        kw.setdefault("workdir", tmp_path / "work")
        return verify_bundle(bundle, **kw)

    return run


def refused(run: Callable[..., Any], bundle: Any, reasons: set[str], **kw: Any) -> str:
    with pytest.raises(BundleVerificationError) as info:
        run(bundle, **kw)
    assert info.value.reason in reasons, str(info.value)
    return str(info.value)


def members_of(bundle: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def build(members: list[tuple[tarfile.TarInfo, bytes]], fix_manifest: bool = False) -> bytes:
    """Re-pack members (an attacker's tool); optionally recompute manifest.json to match."""
    if fix_manifest:
        manifest = json.loads(dict((m.name, d) for m, d in members)["manifest.json"])
        manifest["files"] = {
            m.name: {"length": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for m, d in members
            if m.name != "manifest.json"
        }
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        members = [(m, data if m.name == "manifest.json" else d) for m, d in members]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info = tarfile.TarInfo(info.name) if info.isreg() else info
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def replace(bundle: bytes, name: str, data: bytes, fix_manifest: bool = True) -> bytes:
    members = members_of(bundle)
    assert name in [m.name for m, _ in members]
    return build([(m, data if m.name == name else d) for m, d in members], fix_manifest)


# ----------------------------------------------------------------------------- happy path


def test_bundle_layout_and_offline_verification(
    chan: SimpleNamespace,
    verify: Callable[..., VerifiedBundle],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    members = members_of(chan.bundle)
    names = [m.name for m, _ in members]
    assert names[:2] == ["README.txt", "manifest.json"]
    assert names[2:7] == [
        "metadata/1.root.json",
        "metadata/3.targets.json",
        "metadata/3.snapshot.json",
        "metadata/timestamp.json",
        names[6],
    ]
    for name, data in chan.v2.items():
        assert f"targets/v00000002/{hashlib.sha256(data).hexdigest()}.{name}" in names
    assert sum(n.endswith(".active.json") for n in names) == 1  # v2 is active
    assert not any("v00000001" in n for n in names)  # nothing of v1
    assert all(m.mtime == int(NOW.timestamp()) and m.uid == m.gid == 0 for m, _ in members)
    data = dict((m.name, d) for m, d in members)
    manifest = json.loads(data["manifest.json"])
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == {
            "length": len(data[name]),
            "sha256": hashlib.sha256(data[name]).hexdigest(),
        }
    assert (manifest["version"], manifest["active"], manifest["root_version"]) == (2, True, 1)
    # the bundle's own README shows commands the real fl-client parses, with --config
    commands = re.findall(r"^\s*(fl-client .+)$", data["README.txt"].decode(), re.M)
    assert [c.split()[1] for c in commands] == ["verify-bundle", "install-bundle"]
    for command in commands:
        assert client_parser().parse_args(shlex.split(command)[1:]).config == "client.json"
    # The bundle's timestamp is re-signed for 30 days and says so in signed metadata.
    ts = Metadata[Timestamp].from_bytes(data["metadata/timestamp.json"]).signed
    assert ts.expires == NOW + timedelta(days=30)
    assert ts.unrecognized_fields["x-fedlib-airgap"]["version"] == 2
    assert chan.info.resigned == ("snapshot", "timestamp")
    assert chan.info.expires == NOW + timedelta(days=30) and chan.info.size == len(chan.bundle)
    # The live channel was not touched: its timestamp still expires within a day.
    live = Metadata[Timestamp].from_bytes(chan.store.get("tuf/metadata/timestamp.json")).signed
    assert live.expires < NOW + timedelta(days=2) and "x-fedlib-airgap" not in (
        live.unrecognized_fields
    )

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("verification tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    result = verify(chan.bundle)
    assert result.version == 2 and result.files == chan.v2
    assert result.active and result.root_version == 1 and result.root == chan.root
    assert result.expires == NOW + timedelta(days=30) and result.created == NOW
    assert result.package == {"version": 2, "rollback_of": None, "files": sorted(chan.v2)}
    assert set(result.digests) == set(chan.v2) - {signing.SIGNATURE_FILE}
    assert result.bundle_sha256 == hashlib.sha256(chan.bundle).hexdigest()  # streamed
    assert list((tmp_path / "work").iterdir()) == []  # staging removed

    path = tmp_path / chan.info.filename
    path.write_bytes(chan.bundle)
    assert verify(path, installed_version=None).files == chan.v2


def test_verification_needs_no_endpoint(
    seaweed_factory: Callable[..., SeaweedServer], tmp_path: Path
) -> None:
    server = seaweed_factory()
    store = S3Store("channel", server.s3_config())
    store.ensure_bucket()
    pkg_key = signing.generate_signing_key()
    repo, _, v2 = make_channel(store, tmp_path / "keys", pkg_key)
    root = repo.root_bytes(1)
    bundle, _ = export_bundle(store, version=None, expires_in_days=7, repository=repo)
    server.stop()
    assert not server.running
    result = verify_bundle(
        bundle,
        trusted_root=root,
        trusted_package_keys=pins(pkg_key),
        installed_version=1,
        workdir=tmp_path / "device",
    )
    assert (result.version, result.files) == (2, v2)


def test_export_is_deterministic(chan: SimpleNamespace, verify: Callable[..., Any]) -> None:
    again, info = export_bundle(
        chan.store, version=2, expires_in_days=30, repository=chan.repo, now=NOW
    )
    assert again == chan.bundle and info == chan.info
    gz1, _ = export_bundle(
        chan.store, version=2, expires_in_days=30, repository=chan.repo, now=NOW, compress=True
    )
    gz2, gz_info = export_bundle(
        chan.store, version=2, expires_in_days=30, repository=chan.repo, now=NOW, compress=True
    )
    assert gz1 == gz2 and gzip.decompress(gz1) == chan.bundle
    assert gz_info.filename.endswith(".tar.gz")
    assert verify(gz1).files == chan.v2
    assert verify(gz1).bundle_sha256 == hashlib.sha256(gz1).hexdigest()  # of what was carried
    later, _ = export_bundle(
        chan.store,
        version=2,
        expires_in_days=30,
        repository=chan.repo,
        now=NOW + timedelta(seconds=1),
    )
    assert later != chan.bundle


# ----------------------------------------------------------------------------- refusals


def test_a_flipped_byte_in_any_member_is_refused(
    chan: SimpleNamespace, verify: Callable[..., Any]
) -> None:
    with tarfile.open(fileobj=io.BytesIO(chan.bundle), mode="r:") as tar:
        members = tar.getmembers()
    assert len(members) >= 11
    for member in members:
        broken = bytearray(chan.bundle)
        broken[member.offset_data + member.size // 2] ^= 0x01
        message = refused(verify, bytes(broken), {"tampered", "malformed"})
        assert member.name in message or "manifest.json" in message
    for member in members[:3]:  # a header byte: the tar checksum no longer matches
        broken = bytearray(chan.bundle)
        broken[member.offset + 10] ^= 0x01
        refused(verify, bytes(broken), {"malformed", "tampered", "incomplete"})


def test_tampering_with_a_consistent_manifest_is_refused_by_tuf(
    chan: SimpleNamespace, verify: Callable[..., Any]
) -> None:
    name = next(n for n, _ in [(m.name, d) for m, d in members_of(chan.bundle)] if "model" in n)
    evil = replace(chan.bundle, name, b"X" * len(chan.v2["model.onnx"]))
    message = refused(verify, evil, {"tampered"})
    assert "hash" in message
    # Extending the expiry by editing timestamp.json breaks its signature.
    data = dict((m.name, d) for m, d in members_of(chan.bundle))
    ts = json.loads(data["metadata/timestamp.json"])
    ts["signed"]["expires"] = "2099-01-01T00:00:00Z"
    evil = replace(chan.bundle, "metadata/timestamp.json", json.dumps(ts).encode())
    refused(verify, evil, {"unsigned"})
    # An extra file, even listed in the manifest, is not part of the signed channel.
    members = [*members_of(chan.bundle), (tarfile.TarInfo("targets/extra.bin"), b"junk")]
    refused(verify, build(members, fix_manifest=True), {"incomplete"})
    # Re-labelling the bundle as v1 (also listed in the signed targets) is refused.
    manifest = json.loads(data["manifest.json"])
    manifest["version"] = 1
    relabelled = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    refused(
        verify,
        replace(chan.bundle, "manifest.json", relabelled, fix_manifest=False),
        {
            "tampered",
            "incomplete",
        },
    )


@pytest.mark.parametrize("cut", [1, 512, 1024, 10240, "half", "first-member"])
def test_truncated_bundle_is_refused(
    chan: SimpleNamespace, verify: Callable[..., Any], cut: int | str
) -> None:
    size = len(chan.bundle)
    if cut == "half":
        end = size // 2
    elif cut == "first-member":
        end = 700
    else:
        assert isinstance(cut, int)
        end = size - cut
    refused(verify, chan.bundle[:end], {"truncated", "incomplete", "malformed"})


def test_truncated_gzip_bundle_is_refused(
    chan: SimpleNamespace, verify: Callable[..., Any]
) -> None:
    gz = gzip.compress(chan.bundle, mtime=0)
    assert verify(gz).version == 2
    refused(verify, gz[:-1], {"truncated", "malformed"})
    refused(verify, gz[: len(gz) // 2], {"truncated"})


def test_older_or_equal_version_is_refused(
    chan: SimpleNamespace, verify: Callable[..., Any]
) -> None:
    v1_bundle, info = export_bundle(
        chan.store, version=1, expires_in_days=30, repository=chan.repo, now=NOW
    )
    assert not info.active
    assert verify(v1_bundle, installed_version=None).files == chan.v1
    message = refused(verify, v1_bundle, {"older"}, installed_version=2)
    assert "version 1, older than the installed version 2" in message
    message = refused(verify, chan.bundle, {"older"}, installed_version=2)
    assert "the same as the installed version 2" in message


def test_expired_bundle_is_refused(chan: SimpleNamespace, verify: Callable[..., Any]) -> None:
    assert verify(chan.bundle, now=NOW + timedelta(days=29)).version == 2
    message = refused(verify, chan.bundle, {"expired"}, now=NOW + timedelta(days=31))
    assert "fresh export" in message
    # `now` can only tighten: a clock set back does not revive anything.
    assert verify(chan.bundle, now=NOW - timedelta(days=400)).version == 2
    # An export whose validity is already over is refused at the source.
    with pytest.raises(ChannelError, match="already have expired"):
        export_bundle(
            chan.store,
            version=2,
            expires_in_days=1,
            repository=chan.repo,
            now=NOW - timedelta(days=2),
        )
    # A bundle re-dated by editing its manifest disagrees with the signed marker.
    data = dict((m.name, d) for m, d in members_of(chan.bundle))
    manifest = json.loads(data["manifest.json"])
    manifest["expires"] = "2099-01-01T00:00:00Z"
    edited = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    refused(verify, replace(chan.bundle, "manifest.json", edited, fix_manifest=False), {"tampered"})


def test_bundle_from_another_channel_is_refused(
    chan: SimpleNamespace, verify: Callable[..., Any], tmp_path: Path
) -> None:
    # Same package key, same versions, but another channel's root: not the pinned one.
    other, _, _ = make_channel(LocalStore(tmp_path / "other"), tmp_path / "k2", chan.pkg_key)
    bundle, _ = export_bundle(other.store, version=2, expires_in_days=30, repository=other)
    message = refused(verify, bundle, {"unsigned"})
    assert "pinned root" in message
    assert verify(bundle, trusted_root=other.root_bytes(1)).version == 2


def test_package_signed_by_an_unpinned_key_is_refused(
    s3_bucket: S3Store, chan: SimpleNamespace, verify: Callable[..., Any], tmp_path: Path
) -> None:
    repo = ChannelRepository(s3_bucket, ChannelKeys.generate(tmp_path / "keys"))
    repo.init()
    rogue = signing.generate_signing_key()
    repo.publish(3, package(3, rogue))  # the channel signs whatever it is given
    bundle, _ = export_bundle(s3_bucket, version=3, expires_in_days=30, repository=repo)
    root = repo.root_bytes(1)
    with pytest.raises(ChannelError, match=r"self-check failed.*signature"):
        export_bundle(
            s3_bucket, version=3, expires_in_days=30, repository=repo, package_keys=chan.keys
        )
    message = refused(verify, bundle, {"signature"}, trusted_root=root)
    assert "pinned package key" in message
    both = {**chan.keys, **pins(rogue)}
    assert verify(bundle, trusted_root=root, trusted_package_keys=both).version == 3


def _evil(kind: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    def reg(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
        return tarfile.TarInfo(name), data

    def special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = type_, linkname
        return info, b""

    return {
        "dotdot": [reg("../outside/evil")],
        "nested-dotdot": [reg("metadata/../../outside/evil")],
        "absolute": [reg("/tmp/outside-evil")],
        "symlink": [special("targets/link", tarfile.SYMTYPE, "/etc/passwd")],
        "hardlink": [special("targets/hard", tarfile.LNKTYPE, "README.txt")],
        "device": [special("targets/dev", tarfile.CHRTYPE)],
        "fifo": [special("targets/fifo", tarfile.FIFOTYPE)],
        "directory": [special("targets/dir", tarfile.DIRTYPE)],
        "duplicate": [reg("README.txt", b"second readme")],
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "device",
        "fifo",
        "directory",
        "duplicate",
    ],
)
def test_unsafe_tar_members_are_refused(
    chan: SimpleNamespace, verify: Callable[..., Any], tmp_path: Path, kind: str
) -> None:
    bundle = build([*members_of(chan.bundle), *_evil(kind)])
    message = refused(verify, bundle, {"unsafe"}, workdir=tmp_path / "work" / "deep")
    assert "member" in message
    assert not (tmp_path / "outside").exists()
    assert not (tmp_path / "work" / "outside").exists()
    assert not Path("/tmp/outside-evil").exists()
    leftovers = list((tmp_path / "work").rglob("*"))
    assert all(p.is_dir() for p in leftovers)  # nothing was written


def test_size_and_member_caps(chan: SimpleNamespace, verify: Callable[..., Any]) -> None:
    refused(verify, chan.bundle, {"too_large"}, max_bundle_bytes=len(chan.bundle) - 1)
    gz = gzip.compress(chan.bundle, mtime=0)
    refused(verify, gz, {"too_large"}, max_bundle_bytes=len(gz) + 10)  # bomb-style inflation
    many = [(tarfile.TarInfo(f"targets/f{i}"), b"") for i in range(MAX_MEMBERS + 1)]
    refused(verify, build(many), {"too_large"})
    # A header claiming more bytes than the cap is refused before anything is read.
    liar = tarfile.TarInfo("targets/huge.bin")
    liar.size = 600 * 1024 * 1024
    header = liar.tobuf(tarfile.PAX_FORMAT)
    message = refused(verify, header + bytes(tarfile.RECORDSIZE - len(header)), {"too_large"})
    assert "huge.bin" in message
    # ...and so is a PAX header claiming 600 MiB, which tarfile would otherwise read whole.
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 600 * 1024 * 1024
    header = pax.tobuf(tarfile.USTAR_FORMAT)
    message = refused(verify, header + bytes(tarfile.RECORDSIZE - len(header)), {"too_large"})
    assert "header bomb" in message
    # Zeros past a tar writer's padding are refused as they arrive, not counted to the cap.
    message = refused(verify, chan.bundle + bytes(2 * tarfile.RECORDSIZE), {"malformed"})
    assert "zero bytes after the last member" in message


def test_root_rotation_is_walked_and_export_needs_online_keys(
    chan: SimpleNamespace, verify: Callable[..., Any], tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "chan")
    repo, _, v2 = make_channel(store, tmp_path / "keys", chan.pkg_key)
    root_v1 = repo.root_bytes(1)
    repo.rotate_root([generate_signer() for _ in range(3)])
    repo.refresh_timestamp(force=True)
    bundle, info = export_bundle(store, version=None, expires_in_days=10, repository=repo)
    assert info.root_version == 2
    assert "metadata/2.root.json" in info.members and "metadata/1.root.json" in info.members
    result = verify(bundle, trusted_root=root_v1)
    assert (result.version, result.files, result.root_version) == (2, v2, 2)
    assert result.root == repo.root_bytes(2)  # the device may re-pin to it
    assert verify(bundle, trusted_root=repo.root_bytes(2)).version == 2

    # Without the online keys the live one-day timestamp cannot be stretched.
    with pytest.raises(ChannelError, match="online keys"):
        export_bundle(store, version=2, expires_in_days=30)
    # ...but a channel whose own metadata lives long enough exports verbatim.
    long_lived = Expiry(
        targets=timedelta(days=90), snapshot=timedelta(days=40), timestamp=timedelta(days=40)
    )
    other, _, v2b = make_channel(
        LocalStore(tmp_path / "long"), tmp_path / "k3", chan.pkg_key, expiry=long_lived
    )
    bundle, info = export_bundle(other.store, version=2, expires_in_days=30)
    assert info.resigned == ()
    assert verify(bundle, trusted_root=other.root_bytes(1)).files == v2b
    # A verbatim bundle's manifest expiry is unsigned: stretching it gains nothing,
    # the signed timestamp (40 days) still bounds it.
    data = dict((m.name, d) for m, d in members_of(bundle))
    manifest = json.loads(data["manifest.json"])
    manifest["expires"] = "2099-01-01T00:00:00Z"
    stretched = replace(
        bundle,
        "manifest.json",
        json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(),
        fix_manifest=False,
    )
    root = other.root_bytes(1)
    assert verify(stretched, trusted_root=root).expires < NOW + timedelta(days=41)
    message = refused(
        verify, stretched, {"expired"}, trusted_root=root, now=NOW + timedelta(days=45)
    )
    assert "timestamp metadata expired" in message


# ----------------------------------------------------------------------------- bombs

MIB = 1024 * 1024
RSS_LIMIT_MIB = 64  # issue 16: a compressed bomb costs the device under 64 MB of RSS

# Runs in a fresh interpreter: peak RSS (VmHWM) after the imports, then after verifying.
_RSS_CHILD = """
import json, sys
from pathlib import Path

def peak_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise SystemExit("no VmHWM in /proc/self/status")

from fedlib.crypto.pq_signing import load_public_key
from fedlib.trust.airgap import BundleVerificationError, verify_bundle

bundle, root, key_id, key_pem, work = sys.argv[1:6]
root_json = Path(root).read_bytes()
keys = {key_id: load_public_key(Path(key_pem).read_bytes())}
baseline = peak_kib()
out = {"baseline_kib": baseline}
if bundle == "control":  # the measure sees an allocation of the size it must bound
    ballast = b"\\x01" * (100 * 1024 * 1024)
    out["reason"] = "control"
else:
    try:
        verify_bundle(Path(bundle), trusted_root=root_json, trusted_package_keys=keys,
                      installed_version=1, workdir=Path(work))
        out["reason"] = "accepted"
    except BundleVerificationError as exc:
        out["reason"], out["message"] = exc.reason, str(exc)
out["peak_kib"] = peak_kib()
out["left_in_workdir"] = sorted(p.name for p in Path(work).iterdir()) if bundle != "control" else []
print(json.dumps(out))
"""


def _zeros_gz(path: Path, mib: int, prefix: bytes = b"", suffix: bytes = b"") -> Path:
    """``prefix``, ``mib`` MiB of zeros and ``suffix`` as one gzip stream, streamed to disk."""
    zeros = bytes(MIB)
    with gzip.GzipFile(path, "wb", mtime=0) as gz:
        gz.write(prefix)
        for _ in range(mib):
            gz.write(zeros)
        gz.write(suffix)
    return path


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT)


@pytest.fixture(scope="module")
def bombs(chan: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each bomb the device must refuse within :data:`RSS_LIMIT_MIB` (and an honest
    bundle it accepts), as a file; ``zeros`` is 600 MiB of zeros, gzip'd."""
    base = tmp_path_factory.mktemp("bombs")
    out = {"honest": base / "honest.tar", "zeros": _zeros_gz(base / "zeros.gz", 600)}
    out["honest"].write_bytes(chan.bundle)  # control: the same child accepts this one

    # A consistent manifest listing a 500 MiB member (under the 512 MiB cap): every
    # byte is inflated, hashed and spooled to disk before TUF finds it unsigned.
    members = members_of(chan.bundle)
    pad, pad_size = "targets/v00000002/pad.bin", 500 * MIB
    digest = hashlib.sha256()
    for _ in range(pad_size // MIB):
        digest.update(bytes(MIB))
    manifest = json.loads(dict((m.name, d) for m, d in members)["manifest.json"])
    manifest["files"][pad] = {"length": pad_size, "sha256": digest.hexdigest()}
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    honest = [(m, data if m.name == "manifest.json" else d) for m, d in members]
    tar = build(honest)
    info = tarfile.TarInfo(pad)
    info.size = pad_size
    prefix = tar[: len(tar) - _tail_length(tar)] + _header(info)
    size = len(prefix) + pad_size + 2 * tarfile.BLOCKSIZE  # with the end-of-archive marker
    end = bytes(2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE)
    out["member"] = _zeros_gz(base / "member.tar.gz", pad_size // MIB, prefix, end)

    # The package's weights replaced by a gzip bomb (600 MiB of zeros), manifest fixed:
    # the device never inflates what is inside a member.
    weights = next(m.name for m, _ in members if m.name.endswith(".weights.bin"))
    out["nested"] = base / "nested.tar"
    out["nested"].write_bytes(replace(chan.bundle, weights, out["zeros"].read_bytes()))

    # Headers that claim 600 MiB: a member (refused from the header) and a PAX header,
    # which tarfile would read whole, followed by 600 MiB of zeros.
    liar = tarfile.TarInfo("targets/huge.bin")
    liar.size = 600 * MIB
    out["declared"] = _zeros_gz(base / "declared.tar.gz", 1, _header(liar))
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 600 * MIB
    out["pax"] = base / "pax.tar.gz"  # two gzip members: the header, then the 600 MiB
    gz_header = gzip.compress(pax.tobuf(tarfile.USTAR_FORMAT), mtime=0)
    out["pax"].write_bytes(gz_header + out["zeros"].read_bytes())
    return out


def _tail_length(tar: bytes) -> int:
    """Bytes after the last member's data: the end marker and the record padding."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        archive.getmembers()
        return len(tar) - archive.offset


def _peak_rss(chan: SimpleNamespace, bundle: str, tmp_path: Path) -> dict[str, Any]:
    """Verify ``bundle`` in a fresh interpreter; its refusal and peak RSS in KiB."""
    (tmp_path / "root.json").write_bytes(chan.root)
    key_id, key = next(iter(chan.keys.items()))
    (tmp_path / "key.pem").write_bytes(public_pem(key))
    work = tmp_path / "device"
    work.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    args = [bundle, str(tmp_path / "root.json"), key_id, str(tmp_path / "key.pem"), str(work)]
    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, *args],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["delta_mib"] = (result["peak_kib"] - result["baseline_kib"]) / 1024
    result["peak_mib"] = result["peak_kib"] / 1024
    return result


def test_rss_measure_sees_an_allocation(chan: SimpleNamespace, tmp_path: Path) -> None:
    """Control: the child's measure reports a 100 MiB allocation as over the limit."""
    result = _peak_rss(chan, "control", tmp_path)
    assert result["delta_mib"] > 90, result


@pytest.mark.parametrize(
    ("kind", "reasons"),
    [
        ("honest", {"accepted"}),
        ("zeros", {"malformed"}),
        ("member", {"incomplete"}),
        ("nested", {"tampered"}),
        ("declared", {"too_large"}),
        ("pax", {"too_large"}),
    ],
)
def test_bomb_is_refused_in_bounded_memory(
    chan: SimpleNamespace, bombs: dict[str, Path], tmp_path: Path, kind: str, reasons: set[str]
) -> None:
    """Issue 16 item 7: each bomb is refused, the device's RSS grows by under 64 MiB
    over its baseline (interpreter and imports, measured in the same child first)."""
    result = _peak_rss(chan, str(bombs[kind]), tmp_path)
    print(
        f"airgap bomb {kind}: {result['reason']}, peak RSS {result['peak_mib']:.1f} MiB, "
        f"+{result['delta_mib']:.1f} MiB over the {result['baseline_kib'] / 1024:.1f} MiB "
        f"baseline; {result.get('message', '')}"
    )
    assert result["reason"] in reasons, result
    assert result["delta_mib"] < RSS_LIMIT_MIB, result
    assert result["left_in_workdir"] == [], result  # the spooled members are gone

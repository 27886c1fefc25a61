"""Model registry on a real S3 server: signed write-once versions behind the TUF channel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedlib.crypto import signing
from fedlib.errors import ObjectExists, VerificationError
from fedlib.models.package import ModelPackage
from fedlib.server.registry import ModelRegistry
from fedlib.trust.channel_layout import ChannelError
from fedlib.trust.package import PACKAGE_FILES, SIGNATURE_FILE, package_prefix, verify_package_files


def bump(package: ModelPackage, version: int, **changes) -> ModelPackage:
    meta = package.metadata.model_copy(update={"version": version, **changes})
    return ModelPackage(metadata=meta, onnx_bytes=package.onnx_bytes, weights=package.weights)


def test_publish_and_read_active(deployment):
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    assert v1.version == 1 and registry.versions() == [1]
    assert registry.publish(bump(v1, 2))
    assert registry.active_version() == 2
    assert registry.read_active(min_version=2).version == 2
    assert not registry.publish(bump(v1, 2))  # identical republish is a no-op
    with pytest.raises(VerificationError, match="older than installed"):
        registry.read_active(min_version=3)


def test_a_version_is_written_once_and_versions_only_go_up(deployment):
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    registry.publish(bump(v1, 3))
    with pytest.raises(ObjectExists):
        registry.publish(bump(v1, 3, threshold=123.0))
    assert registry.read_version(3).metadata.threshold == v1.metadata.threshold
    with pytest.raises(ChannelError):
        registry.publish(bump(v1, 2))  # below the active version: refused by the channel
    assert registry.active_version() == 3


@pytest.mark.parametrize("victim", [*PACKAGE_FILES, SIGNATURE_FILE])
def test_tampered_file_is_refused(deployment, victim, caplog):
    """Each file has two copies (the channel's content-addressed target and the
    ``packages/`` archive); a read takes one matching the signed hash. One tampered copy
    is logged and read around; with both tampered the version does not verify."""
    registry = deployment.registry(signing=True)
    want = registry.read_version(1).digest()
    info = registry.channel.targets().targets[f"v00000001/{victim}"]
    copies = [registry.channel.layout.target_key(info), package_prefix(1) + victim]
    for n, key in enumerate(copies):
        data = bytearray(deployment.models.get(key))
        data[len(data) // 2] ^= 0x01
        deployment.models.delete(key)  # an attacker with write access to the bucket
        deployment.models.put(key, bytes(data))
        if n == 0:
            assert registry.read_version(1).digest() == want
            assert f"{key} does not match its signed target" in caplog.text
    with pytest.raises(VerificationError, match="no copy of v00000001/"):
        registry.read_version(1)


def test_package_signed_by_another_key_is_refused(deployment):
    v1 = deployment.registry().read_active()
    rogue_key = signing.generate_signing_key()
    rogue = ModelRegistry(
        deployment.models,
        {signing.key_id(rogue_key): rogue_key.public_key()},
        deployment.channel_keys(),
        signing_key=rogue_key,
    )
    files = {**v1.files(), SIGNATURE_FILE: signing.sign_files(v1.files(), rogue_key)}
    with pytest.raises(VerificationError):
        verify_package_files(files, deployment.registry().trusted)
    assert verify_package_files(files, rogue.trusted).version == 1  # only rogue pinners accept
    with pytest.raises(VerificationError):
        verify_package_files(deployment.registry().read_files(1), rogue.trusted)


def test_published_package_verifies_with_openssf_model_signing(deployment, tmp_path):
    """Interop: `model_signing verify key` accepts what we publish, and refuses tampering."""
    files = deployment.registry().read_files(1)
    folder = tmp_path / "v1"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    pub = tmp_path / "pub.pem"
    pub.write_bytes(signing.public_key_pem(deployment.package_signing_key()))
    cli = Path(sys.executable).with_name("model_signing")

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                str(cli),
                "verify",
                "key",
                str(folder),
                "--signature",
                str(folder / SIGNATURE_FILE),
                "--public_key",
                str(pub),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = verify()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (folder / "metadata.json").write_bytes(files["metadata.json"].replace(b"1", b"2", 1))
    assert verify().returncode != 0

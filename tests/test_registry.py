"""Model registry on a real S3 server: write-once versions, signed pointer, refusals."""

from __future__ import annotations

import pytest

from fedlib import crypto
from fedlib.errors import ObjectExists, VerificationError
from fedlib.registry import ModelPackage, ModelRegistry, package_prefix
from fedlib.store import NoSuchKey


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


def test_a_version_is_written_once(deployment):
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    registry.publish(bump(v1, 2))
    with pytest.raises(ObjectExists):
        registry.publish(bump(v1, 2, threshold=123.0))
    assert registry.read_version(2).metadata.threshold == v1.metadata.threshold


def test_pointer_never_moves_backwards(deployment):
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    registry.publish(bump(v1, 2))
    with pytest.raises(ValueError, match="only go up"):
        registry.set_active(1)
    with pytest.raises(VerificationError, match="older than installed"):
        registry.read_active(min_version=3)


@pytest.mark.parametrize("victim", ["model.onnx", "weights.bin", "metadata.json"])
def test_tampered_file_is_refused(deployment, victim):
    registry = deployment.registry(signing=True)
    key = package_prefix(1) + victim
    data = bytearray(deployment.models.get(key))
    data[len(data) // 2] ^= 0x01
    # an attacker with write access to the bucket replaces the object
    deployment.models.delete(key)
    deployment.models.put(key, bytes(data))
    with pytest.raises(VerificationError, match="does not match"):
        registry.read_version(1)


def test_package_signed_by_another_key_is_refused(deployment):
    rogue = ModelRegistry.for_key(deployment.models, crypto.generate_signing_key())
    v1 = deployment.registry().read_active()
    with pytest.raises(VerificationError):
        rogue.read_version(1)  # rogue trusts only itself; the real signature fails
    # and a package the rogue key signs is refused by readers pinned to the real key
    rogue_pkg = bump(v1, 5)
    rogue.store.put(package_prefix(5) + "model.onnx", rogue_pkg.onnx_bytes)
    with pytest.raises((VerificationError, NoSuchKey)):
        deployment.registry().read_version(5)


def test_pointer_signed_by_unknown_key_is_refused(deployment):
    from fedlib.registry import POINTER_DOMAIN, POINTER_KEY

    forged = crypto.sign_artefact(POINTER_DOMAIN, b'{"version":1}', crypto.generate_signing_key())
    deployment.models.put(POINTER_KEY, forged)
    with pytest.raises(VerificationError, match="not pinned"):
        deployment.registry().active_version()


def test_files_mixed_from_two_versions_are_refused(deployment):
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    registry.publish(bump(v1, 2, threshold=(v1.metadata.threshold or 0) + 1.0))
    meta_v1 = deployment.models.get(package_prefix(1) + "metadata.json")
    deployment.models.delete(package_prefix(2) + "metadata.json")
    deployment.models.put(package_prefix(2) + "metadata.json", meta_v1)
    with pytest.raises(VerificationError):
        registry.read_version(2)

"""Hybrid package signatures (OpenSSF ECDSA + ML-DSA-65): unit checks and a device that
requires both, against a real S3 server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.agent import run_cycle
from client.cli import main as client_main
from client.config import ClientConfig
from fedlib.crypto import pq_signing, signing
from fedlib.errors import VerificationError
from fedlib.ops.admin import client_config_document, write_client_config
from fedlib.trust.package import PQ_SIGNATURE_FILE, package_prefix, verify_package_files

FILES = {"model.onnx": b"graph", "weights.bin": b"\x00" * 16, "metadata.json": b"{}"}


def test_signature_covers_exactly_the_files():
    key = pq_signing.generate_key()
    trusted = {pq_signing.key_id(key): key.public_key()}
    sig = pq_signing.sign_files(FILES, key)
    pq_signing.verify_files(sig, FILES, trusted)
    for files in (
        {**FILES, "weights.bin": b"\x01" * 16},  # other bytes
        {**FILES, "extra.txt": b"x"},  # another file
        {k: v for k, v in FILES.items() if k != "metadata.json"},  # a file missing
    ):
        with pytest.raises(VerificationError, match="other files or other bytes"):
            pq_signing.verify_files(sig, files, trusted)
    other = pq_signing.generate_key()
    with pytest.raises(VerificationError, match="untrusted"):
        pq_signing.verify_files(sig, FILES, {pq_signing.key_id(other): other.public_key()})
    doc = json.loads(sig)
    doc["files"]["weights.bin"] = "0" * 64  # the digest list is what is signed
    with pytest.raises(VerificationError, match="does not verify"):
        pq_signing.verify_files(json.dumps(doc).encode(), FILES, trusted)
    with pytest.raises(VerificationError, match="malformed"):
        pq_signing.verify_files(b"[" * 100, FILES, trusted)


def test_package_needs_both_signatures_when_an_mldsa_key_is_trusted():
    ec_key, pq_key = signing.generate_signing_key(), pq_signing.generate_key()
    trusted_ec = {signing.key_id(ec_key): ec_key.public_key()}
    trusted_both = {**trusted_ec, pq_signing.key_id(pq_key): pq_key.public_key()}
    from fedlib.trust.package import SIGNATURE_FILE

    files = {**FILES, SIGNATURE_FILE: signing.sign_files(FILES, ec_key)}
    both = {**files, PQ_SIGNATURE_FILE: pq_signing.sign_files(FILES, pq_key)}
    from fedlib.trust.package import verify_signatures

    assert verify_signatures(both, trusted_both) == FILES
    assert verify_signatures(files, trusted_ec) == FILES  # classic devices: as before
    assert verify_signatures(both, trusted_ec) == FILES  # ...and they ignore the extra file
    with pytest.raises(VerificationError, match="missing and this device requires it"):
        verify_signatures(files, trusted_both)
    forged = pq_signing.sign_files(FILES, pq_signing.generate_key())
    with pytest.raises(VerificationError, match="untrusted"):
        verify_signatures({**files, PQ_SIGNATURE_FILE: forged}, trusted_both)
    with pytest.raises(VerificationError):  # the OpenSSF signature is still required
        verify_signatures({**FILES, PQ_SIGNATURE_FILE: both[PQ_SIGNATURE_FILE]}, trusted_both)


def test_device_enrolled_with_hybrid_signatures_requires_them(s3_config, tmp_path, small_dataset):
    from tests.helpers import build_deployment

    dep = build_deployment(s3_config, tmp_path / "keys", small_dataset, package_pq_signatures=True)
    assert pq_signing.split(dep.trusted_package_keys())[1]  # an ML-DSA key is trusted
    prefix = package_prefix(1)
    assert dep.models.exists(prefix + PQ_SIGNATURE_FILE)

    home = tmp_path / "dev-1"
    (home / "features").mkdir(parents=True)
    np.save(home / "features" / "w.npy", dep.dataset.clients[dep.dataset.client_ids[0]])
    assert client_main(["keygen", "--out", str(home / "state" / "client_key.pem")]) == 0
    fleet = dep.load_fleet()
    fleet.enroll("dev-1", (home / "state" / "client_key.pub.pem").read_bytes())
    dep.save_fleet(fleet)
    doc = client_config_document(
        dep,
        "dev-1",
        features_dir="features",
        state_dir="state",
        access_key=dep.s3.access_key,
        secret_key=dep.s3.secret_key,
    )
    write_client_config(home / "client.json", doc)
    config = ClientConfig.load(home / "client.json")
    assert config.checks_pq_package_signatures()
    report = run_cycle(config)
    assert report.ok and report.pulled_version == 1, report

    # The same version without its ML-DSA signature is refused by this device.
    files = dep.registry().read_files(1)
    stripped = {k: v for k, v in files.items() if k != PQ_SIGNATURE_FILE}
    with pytest.raises(VerificationError, match="requires it"):
        verify_package_files(stripped, config.trusted_package_keys())
    verify_package_files(files, config.trusted_package_keys())

    # A server (or a stolen ECDSA key) publishing v2 with the OpenSSF signature alone:
    # the channel serves it, the device refuses it and keeps version 1.
    from fedlib.models.package import ModelPackage
    from fedlib.server.registry import ModelRegistry

    classic_only = ModelRegistry(
        dep.models,
        dep.registry().trusted,
        dep.channel_keys(),
        signing_key=dep.package_signing_key(),
    )
    first = dep.registry().read_version(1)
    meta = first.metadata.model_copy(update={"version": 2, "parent_version": 1})
    classic_only.publish(ModelPackage(meta, first.onnx_bytes, first.weights))
    report = run_cycle(config)
    assert not report.ok and report.installed_version == 1, report
    assert "requires it" in (report.model_message or ""), report.model_message


def test_device_config_that_drops_pq_protection_is_refused():
    from fedlib.crypto import sealing
    from fedlib.trust import device_config

    server = sealing.generate_encryption_key("mlkem768-x25519")
    classic_server = sealing.generate_encryption_key("x25519")
    ec_key, pq_key = signing.generate_signing_key(), pq_signing.generate_key()

    def config(server_key, package_keys) -> device_config.DeviceConfig:
        public = server_key.public_key()
        return device_config.DeviceConfig.from_bytes(
            device_config.DeviceConfig.model_validate(
                {
                    "schema": device_config.DEVICE_CONFIG_SCHEMA,
                    "serial": 7,
                    "server_key": {
                        "key_id": sealing.key_id(public),
                        "suite": sealing.suite_name(sealing.suite_of(public)),
                        "public_key_pem": sealing.public_pem(public).decode(),
                    },
                    "package_signing_keys_pem": [
                        pq_signing.public_pem(k).decode() for k in package_keys
                    ],
                }
            ).to_bytes()
        )

    hybrid_all = config(server, [ec_key, pq_key])
    hybrid_sealing_only = config(server, [ec_key])
    classic = config(classic_server, [ec_key, pq_key])
    pq_suite, x_suite = sealing.SUITES["mlkem768-x25519"], sealing.SUITES["x25519"]
    assert device_config.refuses_downgrade(pq_suite, hybrid_all, require_pq=True) is None
    assert "post-quantum sealing" in device_config.refuses_downgrade(
        pq_suite, classic, require_pq=False
    )
    assert "post-quantum sealing" in device_config.refuses_downgrade(
        x_suite, classic, require_pq=True
    )
    assert device_config.refuses_downgrade(x_suite, classic, require_pq=False) is None  # no PQ yet
    why = device_config.refuses_downgrade(
        pq_suite, hybrid_sealing_only, require_pq=True, pq_packages=True
    )
    assert why and "ML-DSA-65" in why
    assert (
        device_config.refuses_downgrade(pq_suite, hybrid_all, require_pq=True, pq_packages=True)
        is None
    )
    # a config whose key does not match its declared id is malformed, not applied
    doc = json.loads(hybrid_all.to_bytes())
    doc["server_key"]["key_id"] = "0" * 32
    with pytest.raises(VerificationError, match="malformed"):
        device_config.DeviceConfig.from_bytes(json.dumps(doc).encode())

"""Issue 16 item 5: the version list is what the signed channel says, never a listing.

An attacker with write access to the models bucket (and no key) drops junk and signed
packages copied under other version numbers, or a self-signed root; every round keeps
working, the next version is the channel's next number, and the operator is told."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from fedlib.ops.admin import main as admin_main
from fedlib.storage.store import NoSuchKey
from fedlib.trust.package import package_prefix
from tests.test_registry import bump
from tests.test_round_runner import upload_updates

JUNK = "packages/v99999999/x"


def plant_junk(deployment) -> None:
    """Junk, and the signed version 1 copied under the next number and a far one."""
    models = deployment.models
    models.put(JUNK, b"junk")
    models.put("stray.bin", b"not a package")
    for name, data in deployment.registry().read_files(1).items():
        models.put(package_prefix(2) + name, data)
        models.put(package_prefix(7) + name, data)


def warned(integrity) -> set[str]:
    return {w.key for w in integrity.warnings}


def test_versions_and_next_number_come_from_the_signed_channel(deployment, caplog):
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    plant_junk(deployment)
    assert registry.versions() == [1] and registry.next_version() == 2
    for unnamed in (2, 7, 99999999):
        with pytest.raises(NoSuchKey):
            registry.read_version(unnamed)

    with caplog.at_level(logging.WARNING):
        report = registry.integrity()
    keys = warned(report)
    assert {JUNK, "stray.bin", package_prefix(2) + "model.onnx"} <= keys
    assert package_prefix(7) + "signature.bin" in keys
    assert not any(k.startswith((package_prefix(1), "tuf/")) for k in keys)
    assert report.total == len(keys) == 2 + 2 * 4 and not report.truncated
    assert f"models bucket integrity: {JUNK}" in caplog.text

    bounded = registry.integrity(limit=3)  # bounded report, full count
    assert len(bounded.warnings) == 3 and bounded.total == report.total
    assert registry.integrity(scan=5).truncated

    # the publish takes the channel's number and replaces the renumbered copy under it
    v2 = bump(v1, 2)
    assert registry.publish(v2)
    assert registry.versions() == [1, 2] and registry.next_version() == 3
    assert registry.read_version(2).digest() == v2.digest()
    after = warned(registry.integrity())
    assert not any(k.startswith(package_prefix(2)) for k in after)
    assert {JUNK, package_prefix(7) + "model.onnx"} <= after


def forged_root(deployment) -> bytes:
    """A ``2.root.json`` signed only by keys of the attacker's, naming them for every role."""
    attacker = CryptoSigner.generate_ed25519()
    root = Root(version=2, expires=datetime.now(UTC) + timedelta(days=30))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(attacker.public_key, role)
    md = Metadata(root)
    md.sign(attacker)
    return md.to_bytes()


def test_a_self_signed_root_dropped_in_the_bucket_is_ignored(deployment):
    """Before: the newest root in the bucket was trusted if it verified itself, so the
    server refused to publish (its keys were "not trusted by root v2") and a read-only
    reader would have followed the attacker's keys."""
    deployment.models.put("tuf/metadata/2.root.json", forged_root(deployment))
    registry = deployment.registry(signing=True)
    assert registry.channel.status().root_version == 1
    v1 = registry.read_active()
    assert registry.publish(bump(v1, registry.next_version()))
    assert registry.versions() == [1, 2]
    [warning] = registry.integrity().warnings
    assert warning.key == "tuf/metadata/2.root.json" and "root chain" in warning.reason


def test_rounds_through_fl_admin_keep_working_with_junk_in_the_models_bucket(
    admin_env, capsys, caplog, tmp_path
):
    """``fl-admin round`` (check_active, plan, publish) with the junk present: the new
    version is the channel's next number, and ``fl-admin status`` shows the warning.

    The quality gate is opened: what is under test is the registry, and the split key of
    each ``init`` is random, so on a rare calibration half four updates from an untrained
    version fail the per-class check (seen once in CI)."""
    from fedlib.server.deployment import Deployment
    from fedlib.server.settings import ServerSettings

    with admin_env["config"].open("a") as config:
        config.write("auc_floor = 0.0\nauc_tolerance = 1.0\nclass_detection_tolerance = 1.0\n")
    assert admin_main(["init", "--holdout", str(admin_env["holdout"])]) == 0
    dep = Deployment(ServerSettings.load())
    dep.dataset = admin_env["data"]
    plant_junk(dep)
    upload_updates(dep, 4)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert admin_main(["round", "--run-id", "junk-1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decision"] == "published", report
    assert report["published_version"] == 2 and report["accepted"] == 4
    assert f"models bucket integrity: {JUNK}" in caplog.text  # logged by plan
    registry = dep.registry()
    assert registry.versions() == [1, 2] and registry.active_version() == 2
    assert registry.read_version(2).metadata.round_id == "junk-1"

    assert admin_main(["round", "--run-id", "junk-2"]) == 0  # check_active over the junk
    assert "waiting" in capsys.readouterr().out

    assert admin_main(["status"]) == 0
    text = capsys.readouterr().out
    assert f"INTEGRITY WARNING models bucket {JUNK}" in text
    assert admin_main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in status["versions"]] == [1, 2]
    keys = {w["key"] for w in status["integrity"]["warnings"]}
    assert {JUNK, package_prefix(7) + "model.onnx", "stray.bin"} <= keys
    assert not any(k.startswith(package_prefix(2)) for k in keys)  # replaced by the publish

    # the signer of a version is read from what the channel vouches for, not packages/
    out = str(tmp_path / "signer.pub.pem")
    assert admin_main(["keys", "--export-package-key", out, "--version", "7"]) == 1
    assert "the channel names no version 7" in capsys.readouterr().err
    assert admin_main(["keys", "--export-package-key", out, "--version", "2"]) == 0


def test_the_rounds_page_shows_the_integrity_warning(dashboard_server):
    """The dashboard inside a real Airflow API server: the rounds page and the JSON."""
    from tests.test_plugin_api import bearer, get

    server = dashboard_server
    key = "packages/v00000099/model.onnx"
    server.deployment.models.put(key, b"junk")
    try:
        page = get(server, "/rounds", cookies={"_token": server.token()})
        assert page.status_code == 200
        assert 'id="integrity"' in page.text and key in page.text
        doc = get(server, "/api/integrity", headers=bearer(server.token())).json()
        assert doc["schema"] == "dadm.models-integrity.v1"
        assert key in {w["key"] for w in doc["warnings"]}
    finally:
        server.deployment.models.delete(key)  # the server is shared with other tests
    clean = get(server, "/rounds", cookies={"_token": server.token()})
    assert 'id="integrity"' not in clean.text


def test_fl_round_dag_publishes_the_channels_next_version_over_junk(airflow_deployment, dagbag):
    """The real fl_round DAG (dag.test): check_active, plan and publish with the junk."""
    from tests.test_fl_round_dag import T0, report_of, run_dag

    dep = airflow_deployment
    plant_junk(dep)
    upload_updates(dep, 4)
    dag_run = run_dag(dagbag, T0)
    assert dag_run.state == "success"
    report = report_of(dep, dag_run)
    assert report["decision"] == "published" and report["published_version"] == 2, report
    assert dep.registry().versions() == [1, 2] and dep.registry().active_version() == 2
    assert JUNK in warned(dep.registry().integrity())


def test_a_root_rotation_replaces_a_forged_root_in_its_slot(deployment):
    """Root N+1 follows the newest *verified* root: a forged ``2.root.json`` does not
    push the rotation to v3 (which no chain would reach); it is replaced."""
    deployment.models.put("tuf/metadata/2.root.json", forged_root(deployment))
    channel = deployment.channel_repository(signing=True)
    assert channel.rotate_root() == 2
    assert channel.status().root_version == 2
    assert not deployment.registry().integrity().warnings
    assert channel.rotate_root() == 3  # and the chain goes on from there

"""Key rotation without downtime, through ``fl-admin``/``fl-client`` on a real S3 server.

Each test rotates a key while devices keep uploading (updates sealed or signed with the
old key wait in the inbox across the rotation) and checks that every update gets
exactly one verdict and none is refused because of the rotation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.agent import run_cycle
from client.cli import main as client_main
from client.config import ClientConfig
from fedlib.crypto import sealing
from fedlib.ops.admin import main as admin_main
from fedlib.ops.admin import write_client_config
from fedlib.server.deployment import Deployment
from fedlib.server.settings import ServerSettings
from fedlib.trust import device_config
from fedlib.wire import protocol


@pytest.fixture
def fleet_env(admin_env, tmp_path, capsys):
    """An initialised deployment whose gate always publishes (rotation, not quality,
    is under test) and two enrolled devices with their own rows."""
    env = admin_env
    with env["config"].open("a") as f:
        f.write("min_clients = 1\nauc_tolerance = 1.0\nauc_floor = 0.0\n")
    assert admin_main(["init", "--holdout", str(env["holdout"])]) == 0
    configs = {}
    for i, cid in enumerate(["dev-1", "dev-2"]):
        home = tmp_path / cid
        (home / "features").mkdir(parents=True)
        np.save(home / "features" / "w.npy", env["data"].clients[env["data"].client_ids[i]])
        assert client_main(["keygen", "--out", str(home / "state" / "client_key.pem")]) == 0
        creds = env["server"].admin_credentials
        args = ["enroll", cid, "--public-key", str(home / "state" / "client_key.pub.pem")]
        args += ["--out", str(home / "client.json")]
        args += [f"--access-key={creds.access_key}", f"--secret-key={creds.secret_key}"]
        assert admin_main(args) == 0
        configs[cid] = home / "client.json"
    capsys.readouterr()
    env["clients"] = configs
    env["deployment"] = Deployment(ServerSettings.load(env["config"]))
    return env


def cycle(path: Path):
    report = run_cycle(ClientConfig.load(path))
    assert report.ok, report
    return report


def pending_headers(dep: Deployment) -> list[protocol.UpdateHeader]:
    out = []
    for info in dep.inbox.list("updates/"):
        parts = protocol.split_envelope(dep.inbox.get(info.key))
        out.append(protocol.parse_header(parts.header_bytes))
    return out


def run_round(capsys) -> dict:
    capsys.readouterr()
    assert admin_main(["round", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def keys_doc(capsys) -> dict:
    capsys.readouterr()
    assert admin_main(["keys", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_server_key_rotation_keeps_old_updates_and_refuses_a_downgrade(fleet_env, capsys):
    dep, clients = fleet_env["deployment"], fleet_env["clients"]
    first = dep.current_server_key_id()
    assert keys_doc(capsys)["server_keys"] == [
        {"key_id": first, "suite": "mlkem768-x25519", "current": True}
    ]
    for path in clients.values():  # sealed to the first key, waiting in the inbox
        assert cycle(path).uploaded
    assert {h.server_key_id for h in pending_headers(dep)} == {first}
    assert {h.suite for h in pending_headers(dep)} == {protocol.SUITE_MLKEM768_X25519}

    assert admin_main(["rotate-server-key", "--suite", "mlkem768-x25519"]) == 0
    second = dep.current_server_key_id()
    assert second != first
    # Retiring the old key now would strand the two waiting updates: refused.
    assert admin_main(["retire-server-key", first]) == 1  # refused, not a usage error
    assert "2 update(s) in the inbox are sealed to" in capsys.readouterr().err

    report = run_round(capsys)
    assert report["accepted"] == 2 and report["rejected"] == {}, report
    assert report["published_version"] == 2

    for path in clients.values():  # new version: they pull the signed config, then seal
        r = cycle(path)
        assert r.trained and r.uploaded
        assert any("device config" in m and second in m for m in r.messages), r.messages
    assert {h.server_key_id for h in pending_headers(dep)} == {second}
    assert admin_main(["retire-server-key", first]) == 0
    assert [k["key_id"] for k in keys_doc(capsys)["server_keys"]] == [second]
    report = run_round(capsys)
    assert report["accepted"] == 2 and report["rejected"] == {}, report

    # A config moving devices to classic X25519 is refused; they keep sealing hybrid.
    assert admin_main(["rotate-server-key", "--suite", "x25519"]) == 0
    classic = dep.current_server_key_id()
    report = run_cycle(ClientConfig.load(clients["dev-1"]))
    assert not report.ok
    assert any("refused device config" in m for m in report.messages), report.messages
    assert report.trained and report.uploaded  # still sealed, to the hybrid key
    (header,) = pending_headers(dep)
    assert header.server_key_id == second != classic
    assert header.suite == protocol.SUITE_MLKEM768_X25519

    # Retiring that key anyway (--force): the update sealed to it is quarantined.
    assert admin_main(["retire-server-key", second]) == 1
    assert "1 update(s) in the inbox are sealed to" in capsys.readouterr().err
    assert admin_main(["retire-server-key", second, "--force"]) == 0
    assert second not in [k["key_id"] for k in keys_doc(capsys)["server_keys"]]
    report = run_round(capsys)
    assert report["accepted"] == 0 and report["rejected"] == {"unknown_server_key": 1}, report


def test_server_accepting_only_the_hybrid_suite_quarantines_classic_updates(fleet_env, capsys):
    dep, clients = fleet_env["deployment"], fleet_env["clients"]
    # A device enrolled before the migration: classic key, no PQ requirement.
    assert admin_main(["rotate-server-key", "--suite", "x25519"]) == 0
    doc = json.loads(clients["dev-1"].read_text())
    doc["server_public_key_pem"] = sealing.public_pem(dep.current_server_public_key()).decode()
    doc["require_post_quantum"] = False
    write_client_config(clients["dev-1"], doc)
    assert admin_main(["rotate-server-key"]) == 0  # hybrid again, before dev-1 runs
    state = clients["dev-1"].parent / "state"
    report = run_cycle(ClientConfig.load(clients["dev-1"]))  # upgrades: allowed
    assert report.ok and report.uploaded
    (header,) = pending_headers(dep)
    assert header.suite == protocol.SUITE_MLKEM768_X25519
    assert device_config.DeviceConfig.from_bytes((state / "device-config.json").read_bytes())

    # Restricting the server to the hybrid suite refuses a classic envelope with a reason.
    with fleet_env["config"].open("a") as f:
        f.write('accepted_hpke_suites = ["mlkem768-x25519"]\n')
    classic = next(k["key_id"] for k in keys_doc(capsys)["server_keys"] if k["suite"] == "x25519")
    key = sealing.load_signing_key(state / "client_key.pem")
    ring = Deployment(ServerSettings.load(fleet_env["config"])).server_keyring()
    _, blob = sealing.seal_update(
        client_id="dev-1",
        client_key=key,
        server_public_key=ring.get(classic).public_key(),
        base_version=1,
        payload=b"x" * 64,
    )
    dep.inbox.put(protocol.inbox_key("dev-1", protocol.new_update_id()), blob)
    report = run_round(capsys)
    assert report["rejected"] == {"suite_not_accepted": 1}, report
    assert report["accepted"] == 1


def test_package_and_channel_key_rotation_under_uploads(fleet_env, capsys):
    dep, clients = fleet_env["deployment"], fleet_env["clients"]
    old_package = next(iter(dep.trusted_package_keys()))
    for path in clients.values():
        assert cycle(path).uploaded
    assert admin_main(["rotate-package-key"]) == 0
    for role in ("targets", "snapshot", "timestamp"):  # each through the root chain
        assert admin_main(["rotate-channel-key", "--role", role]) == 0
    capsys.readouterr()
    assert admin_main(["rotate-channel-key", "--role", "root", "--root-keys", "3"]) == 0
    assert "channel root keys rotated (root v5)" in capsys.readouterr().out
    assert len(dep.channel_repository(signing=True).keys.root) == 3
    keys = keys_doc(capsys)
    assert len(keys["package_signing_keys"]) == 2
    assert keys["channel"]["root_version"] == 5  # 3 online-role rotations, then the root's

    report = run_round(capsys)  # signed by the new key, published under root v5
    assert report["accepted"] == 2 and report["published_version"] == 2, report
    for path in clients.values():  # devices walk root 1 -> ... -> 5 and trust the new key
        r = cycle(path)
        assert r.pulled_version == 2 and r.trained and r.uploaded, r

    assert admin_main(["retire-package-key", old_package]) == 0
    for path in clients.values():
        report = run_cycle(ClientConfig.load(path))
        assert report.ok and report.installed_version == 2
        assert len(ClientConfig.load(path).package_signing_keys_pem) == 1  # enrolment file
        state_doc = json.loads((path.parent / "state" / "device-config.json").read_text())
        assert len(state_doc["package_signing_keys_pem"]) == 1
    report = run_round(capsys)
    assert report["accepted"] == 2 and report["rejected"] == {}, report
    assert report["published_version"] == 3
    for path in clients.values():  # v3 signed by the only trusted key: installs
        assert cycle(path).pulled_version == 3


def test_device_key_rotation_keeps_spooled_updates_until_revoked(fleet_env, capsys):
    dep, clients = fleet_env["deployment"], fleet_env["clients"]
    path = clients["dev-1"]
    state = path.parent / "state"
    old_id = sealing.key_id(sealing.load_signing_key(state / "client_key.pem"))
    assert cycle(path).uploaded  # signed by the old key, waiting in the inbox

    assert client_main(["rotate-key", "--config", str(path)]) == 0
    pub = state / "client_key.next.pub.pem"
    assert admin_main(["add-device-key", "--client-id", "dev-1", "--public-key", str(pub)]) == 0
    assert client_main(["rotate-key", "--config", str(path), "--activate"]) == 0
    new_id = sealing.key_id(sealing.load_signing_key(state / "client_key.pem"))
    assert new_id != old_id
    out = capsys.readouterr().out
    assert f"fl-admin revoke dev-1 --key-id {old_id}" in out

    report = run_round(capsys)  # the old key still works: nothing lost
    assert report["accepted"] == 1 and report["rejected"] == {}, report
    r = cycle(path)
    assert r.trained and r.uploaded
    (header,) = pending_headers(dep)
    assert header.client_key_id == new_id
    assert admin_main(["revoke", "dev-1", "--key-id", old_id]) == 0
    assert dep.load_fleet().client_ids() == ["dev-1", "dev-2"]  # still enrolled
    report = run_round(capsys)
    assert report["accepted"] == 1 and report["rejected"] == {}, report

    # An update signed with the revoked key is now refused with a reason.
    retired = next(state.glob("client_key.retired-*.pem"))
    _, blob = sealing.seal_update(
        client_id="dev-1",
        client_key=sealing.load_signing_key(retired),
        server_public_key=dep.current_server_public_key(),
        base_version=2,
        payload=b"x" * 64,
    )
    dep.inbox.put(protocol.inbox_key("dev-1", protocol.new_update_id()), blob)
    report = run_round(capsys)
    assert report["rejected"] == {"revoked_client": 1}, report

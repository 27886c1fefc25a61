"""fl-admin end to end through its CLI: init, enroll (least-privilege keys), status, revoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.agent import run_cycle
from client.cli import main as client_main
from client.config import ClientConfig
from fedlib.errors import StoreError
from fedlib.ops.admin import main as admin_main
from fedlib.storage.store import S3Store

BIN = Path(sys.executable).parent


def fl_admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``fl-admin`` in its own process: the exit status a shell sees."""
    return subprocess.run(
        [str(BIN / "fl-admin"), *args], capture_output=True, text=True, timeout=180, env=env
    )


def assert_refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1 with the reason as one ``fl-admin: ...`` line, last on stderr (library
    warnings may come before it), and no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    reasons = [line for line in lines if line.startswith("fl-admin: ")]
    assert len(reasons) == 1 and lines[-1] == reasons[0], proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in reasons[0], (fragment, reasons[0])


def test_init_enroll_status_revoke(admin_env, tmp_path, capsys):
    env = admin_env
    assert admin_main(["init", "--holdout", str(env["holdout"])]) == 0
    assert admin_main(["init", "--holdout", str(env["holdout"])]) == 0  # idempotent
    capsys.readouterr()

    device = tmp_path / "dev-1"
    (device / "features").mkdir(parents=True)
    np.save(device / "features" / "w.npy", env["data"].clients[env["data"].client_ids[0]])
    assert client_main(["keygen", "--out", str(device / "state" / "client_key.pem")]) == 0
    out = device / "client.json"
    assert (
        admin_main(
            [
                "enroll",
                "dev-1",
                "--public-key",
                str(device / "state" / "client_key.pub.pem"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    admin_key = env["server"].admin_credentials.access_key
    assert doc["s3"]["access_key"] and doc["s3"]["access_key"] != admin_key
    assert "PRIVATE KEY" not in out.read_text()  # no secret of the server's
    assert out.stat().st_mode & 0o777 == 0o600

    config = ClientConfig.load(out)
    report = run_cycle(config)  # pulls and uploads with its least-privilege keys
    assert report.ok and report.uploaded == [report.update_id], report
    device_inbox = S3Store(f"inbox-{env['tag']}", config.s3.to_store_config())
    with pytest.raises(StoreError, match=r"(?i)access denied"):
        list(device_inbox.list("updates/"))
    with pytest.raises(StoreError, match=r"(?i)access denied"):
        S3Store(f"models-{env['tag']}", config.s3.to_store_config()).put("x", b"y")

    capsys.readouterr()
    assert client_main(["status", "--config", str(out), "--json"]) == 0
    device = json.loads(capsys.readouterr().out)
    assert device["installed_version"] == 1 and device["sent_updates"] == 1
    assert admin_main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["active_version"] == 1 and status["pending_updates"] == 1
    assert status["versions"][0]["version"] == 1 and status["versions"][0]["auc"] > 0.5
    assert {"rollback_of", "published_at", "ap"} <= set(status["versions"][0])
    assert status["quarantined"] == 0 and status["clients"] == ["dev-1"]

    assert admin_main(["revoke", "dev-1"]) == 0
    with pytest.raises(StoreError):
        device_inbox.put("updates/dev-1/x", b"late")
    capsys.readouterr()
    assert admin_main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked_clients"] == ["dev-1"]


def test_round_through_cli(admin_env, tmp_path, capsys):
    from tests.test_client import make_client

    env = admin_env
    assert admin_main(["init", "--holdout", str(env["holdout"])]) == 0
    assert admin_main(["round", "--run-id", "r0"]) == 0
    assert "waiting: 0 of 2" in capsys.readouterr().out
    from fedlib.server.deployment import Deployment
    from fedlib.server.settings import ServerSettings

    dep = Deployment(ServerSettings.load())
    data = env["data"]
    for cid in data.client_ids[:2]:
        assert run_cycle(make_client(dep, tmp_path, cid, data.clients[cid])).uploaded
    capsys.readouterr()
    # a dry run evaluates and reports, publishes nothing and consumes nothing
    assert admin_main(["round", "--run-id", "r-dry", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["decision"] == "dry_run" and dry["accepted"] == 2, dry
    assert dry["published_version"] is None and dep.registry().versions() == [1]
    assert len(list(dep.inbox.list("updates/"))) == 2
    assert admin_main(["round", "--run-id", "r1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] == 2 and report["decision"] in {"published", "rejected"}
    for cid in data.client_ids[2:4]:
        assert run_cycle(make_client(dep, tmp_path, cid, data.clients[cid])).uploaded
    capsys.readouterr()
    assert admin_main(["round", "--run-id", "r2"]) == 0
    out = capsys.readouterr().out
    # progress while it runs, then the one-screen summary
    assert "plan: 2 updates from 2 clients in 1 shards" in out
    assert "shard 1/1: 2 accepted, 0 rejected" in out and "gate: candidate AUC" in out
    assert out.index("shard 1/1") < out.index("round r2:")
    assert "updates: 2 accepted, 0 rejected" in out


def test_holdout_and_config_through_cli(admin_env, capsys):
    from fedlib.server.deployment import Deployment
    from fedlib.server.settings import ServerSettings

    env = admin_env
    assert admin_main(["init", "--holdout", str(env["holdout"])]) == 0
    dep = Deployment(ServerSettings.load())
    first = dep.holdout_version()
    capsys.readouterr()
    assert admin_main(["holdout", str(env["holdout"])]) == 0
    assert f"holdout version {first + 1} is now current" in capsys.readouterr().out
    assert dep.holdout_version() == first + 1
    assert admin_main(["config", "--example"]) == 0
    assert capsys.readouterr().out == ServerSettings.example_toml()
    assert admin_main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["inbox_bucket"] == dep.settings.inbox_bucket


def test_exit_status_done_refused_failed_usage(admin_env, tmp_path):
    """0 done; 1 refused or failed (one line on stderr, no traceback); 2 usage."""
    holdout = str(admin_env["holdout"])
    # 2: argparse, before anything runs
    usage = fl_admin("enroll", "dev-1")
    assert usage.returncode == 2 and "usage: fl-admin enroll" in usage.stderr
    assert "required: --public-key, --out" in usage.stderr
    assert fl_admin("no-such-command").returncode == 2
    assert fl_admin("init", "--holdout", holdout, "--model-kind", "nope").returncode == 2
    # 1: a missing file (OSError), read before any key or bucket is made
    assert_refused(fl_admin("init", "--holdout", str(tmp_path / "gone.npz")), "gone.npz")
    assert not (tmp_path / "keys").exists()
    # 0: done
    done = fl_admin("init", "--holdout", holdout)
    assert done.returncode == 0 and "published version 1" in done.stdout and not done.stderr
    # 1: refused by the library (KeyError, ValueError)
    assert_refused(fl_admin("revoke", "nobody"), "no active key enrolled for nobody")
    assert_refused(fl_admin("credentials", "policy", "C*"), "bad client id 'C*'")
    keys = json.loads(fl_admin("keys", "--json").stdout)
    [current] = [k["key_id"] for k in keys["package_signing_keys"] if k["current"]]
    assert_refused(fl_admin("retire-package-key", current), "current package-signing key")
    # 1: a multi-line validation report becomes one line
    invalid = dict(os.environ, FL_MIN_CLIENTS="0")
    assert_refused(fl_admin("status", env=invalid), "min_clients", "greater than or equal to 1")
    # 1: the store refuses (StoreError from a real SeaweedFS: a wrong secret)
    wrong = dict(os.environ, FL_S3_SECRET_KEY="not-the-secret")
    assert_refused(fl_admin("status", env=wrong), "access denied", admin_env["tag"])
    assert fl_admin("status").returncode == 0


def test_client_json_is_private_from_the_first_byte(admin_env, tmp_path):
    """``enroll`` replaces client.json (it holds the device's S3 secret) atomically with
    mode 0600 set before any byte is written: even under umask 000 and over a
    world-readable file, no other user can read it, and no temp file is left behind."""
    assert admin_main(["init", "--holdout", str(admin_env["holdout"])]) == 0
    device = tmp_path / "dev-2"
    assert client_main(["keygen", "--out", str(device / "state" / "client_key.pem")]) == 0
    out = device / "client.json"
    out.write_text("{}")
    out.chmod(0o644)
    before = out.stat().st_ino
    old_umask = os.umask(0)
    try:
        proc = fl_admin(
            "enroll", "dev-2", "--public-key", str(device / "state" / "client_key.pub.pem"),
            "--out", str(out),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_mode & 0o777 == 0o600
        assert out.stat().st_ino != before  # replaced by rename, never rewritten in place
        assert json.loads(out.read_text())["s3"]["secret_key"]
        assert sorted(p.name for p in device.iterdir()) == ["client.json", "state"]
        ClientConfig.load(out).save(device / "copy.json")  # the device side writes alike
        assert (device / "copy.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)


def model_signing(*args: object) -> subprocess.CompletedProcess[str]:
    """OpenSSF's own reference CLI (the outside verifier's tool), offline."""
    return subprocess.run(
        [str(BIN / "model_signing"), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_outside_verifier_checks_a_package_with_the_exported_key(admin_env, tmp_path, capsys):
    """``fl-admin keys --export-package-key`` hands an outside verifier the public key the
    reference ``model_signing verify key`` accepts for a published package, exactly as
    the README shows; after a rotation, ``--version N`` exports the key that signed N."""
    from fedlib.server.deployment import Deployment
    from fedlib.server.settings import ServerSettings
    from fedlib.trust.package import package_prefix

    assert admin_main(["init", "--holdout", str(admin_env["holdout"])]) == 0
    dep = Deployment(ServerSettings.load())
    pkg = tmp_path / "v1"  # a copy of the version's folder in the models bucket
    pkg.mkdir()
    prefix = package_prefix(1)
    for info in dep.models.list(prefix):
        (pkg / info.key[len(prefix) :]).write_bytes(dep.models.get(info.key))
    assert (pkg / "signature.bin").exists()

    key = tmp_path / "package-signing.pub.pem"
    capsys.readouterr()
    assert admin_main(["keys", "--export-package-key", str(key)]) == 0
    said = capsys.readouterr().out
    assert "(signs new versions)" in said and f"--public_key {key}" in said
    assert key.stat().st_mode & 0o777 == 0o644 and b"PRIVATE" not in key.read_bytes()
    ok = model_signing(
        "verify", "key", pkg, "--signature", pkg / "signature.bin", "--public_key", key
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # a rotation: the new key signs new versions; version 1 keeps verifying with its own
    assert admin_main(["rotate-package-key"]) == 0
    new = tmp_path / "new.pem"
    assert admin_main(["keys", "--export-package-key", str(new)]) == 0
    assert new.read_bytes() != key.read_bytes()
    wrong = model_signing(
        "verify", "key", pkg, "--signature", pkg / "signature.bin", "--public_key", new
    )
    assert wrong.returncode != 0
    signer = tmp_path / "v1-signer.pem"
    capsys.readouterr()
    assert admin_main(["keys", "--export-package-key", str(signer), "--version", "1"]) == 0
    assert "(signed version 1)" in capsys.readouterr().out
    assert signer.read_bytes() == key.read_bytes()
    ok = model_signing(
        "verify", "key", pkg, "--signature", pkg / "signature.bin", "--public_key", signer
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # usage and refusals
    with pytest.raises(SystemExit) as usage:
        admin_main(["keys", "--version", "1"])
    assert usage.value.code == 2
    missing = ["keys", "--export-package-key", str(tmp_path / "x.pem"), "--version", "9"]
    assert admin_main(missing) == 1
    assert "v00000009" in capsys.readouterr().err
    unknown = ["keys", "--export-package-key", str(tmp_path / "y.pem"), "--key-id", "ab"]
    assert admin_main(unknown) == 1
    assert "no package-signing key ab" in capsys.readouterr().err

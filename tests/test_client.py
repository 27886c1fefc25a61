"""The device agent against a real S3 server: cycle, spool, offline and resume, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.agent import InstalledModels, run_cycle, status
from client.cli import main as client_main
from client.config import ClientConfig
from client.spool import Spool
from fedlib import failpoints
from fedlib.crypto import sealing, signing
from fedlib.files import TMP_PREFIX
from fedlib.models.package import ModelPackage
from fedlib.ops.admin import client_config_document, write_client_config
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import run_round
from fedlib.server.round_runner import round_inputs
from fedlib.server.rounds import open_and_validate
from fedlib.wire import protocol

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_client(deployment, tmp_path: Path, client_id: str, rows: np.ndarray, **overrides):
    """Key generation through the CLI, enrollment, feature files, client.json."""
    home = tmp_path / client_id
    (home / "features").mkdir(parents=True)
    np.save(home / "features" / "part-000.npy", rows)
    key_path = home / "state" / "client_key.pem"
    assert client_main(["keygen", "--out", str(key_path)]) == 0
    fleet = deployment.load_fleet()
    fleet.enroll(client_id, key_path.with_name("client_key.pub.pem").read_bytes())
    deployment.save_fleet(fleet)
    doc = client_config_document(
        deployment,
        client_id,
        features_dir="features",
        state_dir="state",
        access_key=deployment.s3.access_key,
        secret_key=deployment.s3.secret_key,
    )
    doc["s3"].update({"max_attempts": 1, "connect_timeout": 1.0, "read_timeout": 5.0})
    doc.update(overrides)
    write_client_config(home / "client.json", doc)
    return ClientConfig.load(home / "client.json")


def inbox_keys(deployment) -> list[str]:
    return [i.key for i in deployment.inbox.list("updates/")]


def test_cycle_uploads_one_sealed_update_the_server_accepts(deployment, tmp_path):
    rows = deployment.dataset.clients[deployment.dataset.client_ids[0]]
    config = make_client(deployment, tmp_path, "dev-1", rows)
    report = run_cycle(config)
    assert report.ok and report.trained and report.pulled_version == 1
    assert report.uploaded == [report.update_id]
    assert inbox_keys(deployment) == [protocol.inbox_key("dev-1", report.update_id)]

    key = inbox_keys(deployment)[0]
    blob = deployment.inbox.get(key)
    inputs = round_inputs(deployment, deployment.registry().read_active())
    accepted = open_and_validate(key, blob, inputs)
    assert accepted.meta.num_samples == rows.shape[0]
    assert accepted.header.base_version == 1

    again = run_cycle(config)  # one update per model version
    assert not again.trained and again.uploaded == []
    assert any("already sent" in m for m in again.messages)
    assert len(inbox_keys(deployment)) == 1
    assert status(config)["sent_updates"] == 1


def test_plaintext_holds_only_delta_and_small_metadata(deployment, tmp_path):
    """Invariant 1: decrypt what the device sent and look for its feature rows in it."""
    rows = deployment.dataset.clients[deployment.dataset.client_ids[1]]
    config = make_client(deployment, tmp_path, "dev-2", rows)
    run_cycle(config)
    key = inbox_keys(deployment)[0]
    opened = sealing.open_update(
        deployment.inbox.get(key), deployment.load_fleet(), deployment.server_keyring()
    )
    meta, delta_blob = protocol.decode_payload(opened.payload)
    assert set(meta.model_dump()) == {
        "schema_",
        "model_kind",
        "num_params",
        "num_samples",
        "epochs",
        "compression",
        "metrics",
    }
    assert set(meta.metrics) <= {"delta_norm"}
    package = deployment.registry().read_active()
    dim = package.metadata.num_params
    if package.metadata.training.compression == "topk16":
        k = max(1, int(np.ceil(package.metadata.training.topk_fraction * dim)))
        assert len(delta_blob) <= 20 + 4 * k  # header + index + 16-bit value per kept entry
    else:  # an exact kind's statistics: header + one float64 per parameter, nothing else
        assert package.metadata.training.compression == "dense64"
        assert len(delta_blob) == 20 + 8 * dim
    plaintext = opened.payload
    for row in rows[:50]:
        for dtype in (np.float32, np.float64):
            needle = np.asarray(row, dtype=dtype).tobytes()  # the whole row, as either float
            if np.count_nonzero(row) >= 3:
                assert needle not in plaintext
    assert b"tmpl_" not in plaintext  # no feature names / log text either


def test_offline_cycles_spool_then_upload_exactly_once(seaweed_factory, tmp_path, small_dataset):
    """Stop the S3 server to take the device offline; start it again to let it upload."""

    from tests.helpers import build_deployment

    server = seaweed_factory()
    dep = build_deployment(server.s3_config(max_attempts=2), tmp_path / "keys", small_dataset)
    data = dep.dataset
    config = make_client(
        dep, tmp_path, "dev-off", data.clients[data.client_ids[0]], one_update_per_version=False
    )

    first = run_cycle(config)
    assert first.uploaded == [first.update_id] and not first.offline

    server.stop()
    offline = [run_cycle(config) for _ in range(2)]
    for report in offline:
        assert report.ok and report.offline and report.trained
        assert any("wait in the spool" in m for m in report.messages)
    waiting = Spool(config.state_dir / "spool").pending()
    assert waiting == sorted(r.update_id for r in offline)
    assert client_main(["run", "--config", str(tmp_path / "dev-off" / "client.json")]) == 0

    server.restart()
    uploaded: list[str] = []
    for _ in range(3):  # a device retries on its next cron run if the server is still warming
        back = run_cycle(config)
        uploaded += back.uploaded + back.already_present
        if not back.offline:
            break
    assert not back.offline, back.messages
    assert uploaded[: len(waiting)] == waiting  # oldest first
    keys = [i.key for i in dep.inbox.list("updates/")]
    ids = [k.split("/")[2] for k in keys]
    assert len(ids) == len(set(ids)) == len(uploaded) + 1  # each once: first run + the rest
    assert set(waiting) <= set(ids)
    assert Spool(config.state_dir / "spool").pending() == []


def test_lost_acknowledgement_is_not_uploaded_twice(deployment, tmp_path):
    rows = deployment.dataset.clients[deployment.dataset.client_ids[2]]
    config = make_client(deployment, tmp_path, "dev-ack", rows)
    spool = Spool(config.state_dir / "spool")
    update_id = protocol.new_update_id()
    spool.add(update_id, b"envelope-bytes")
    # the PUT went through but the device died before it recorded that
    deployment.inbox.put(protocol.inbox_key("dev-ack", update_id), b"envelope-bytes")
    report = spool.upload(deployment.inbox, "dev-ack")
    assert report.already_present == [update_id] and report.uploaded == []
    assert spool.pending() == [] and spool.sent() == [update_id]
    assert inbox_keys(deployment) == [protocol.inbox_key("dev-ack", update_id)]


def fl_client_run(config: ClientConfig, **env: str) -> subprocess.CompletedProcess[str]:
    """``fl-client run`` in its own process, as cron starts it (failpoints from ``env``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DADM_FAILPOINTS")}
    return subprocess.run(
        [str(BIN / "fl-client"), "run", "--config", str(config.state_dir.parent / "client.json")],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fl_client_killed_mid_spool_write_recovers_and_the_round_publishes(deployment, tmp_path):
    """A real ``fl-client run`` is killed with SIGKILL (failpoint) once half its sealed
    update is in the spool's temp file, before the fsync and the rename. The next run
    sweeps the torn file, trains again (nothing recorded the update as made), uploads one
    whole update, and the round over it and three other devices publishes."""
    data = deployment.dataset
    configs = [make_client(deployment, tmp_path, c, data.clients[c]) for c in data.client_ids[:4]]
    victim = configs[0]
    pending = victim.state_dir / "spool" / "pending"

    killed = fl_client_run(victim, DADM_FAILPOINTS=failpoints.SPOOL_TORN_WRITE)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    (torn,) = pending.iterdir()  # what the kill left: a temp file with half an envelope
    assert torn.name.startswith(TMP_PREFIX) and torn.stat().st_size > 0
    torn_bytes = torn.read_bytes()
    assert inbox_keys(deployment) == []  # nothing reached the inbox
    assert not (victim.state_dir / "last_trained.json").exists()

    again = fl_client_run(victim)
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert not torn.exists() and list(pending.iterdir()) == []  # swept, and the new one sent
    (key,) = inbox_keys(deployment)
    whole = deployment.inbox.get(key)
    # The torn file was the first half of an envelope. The retrained envelope is a new one
    # (its header's numbers are rendered as text), so its length may differ by a few bytes.
    assert torn_bytes[:4] == whole[:4]  # the envelope magic
    assert abs(len(whole) // 2 - len(torn_bytes)) <= 16, (len(whole), len(torn_bytes))
    assert status(victim)["sent_updates"] == 1
    assert fl_client_run(victim).returncode == 0  # a third run sends nothing more
    assert inbox_keys(deployment) == [key]

    for config in configs[1:]:
        assert run_cycle(config).uploaded
    queued = inbox_keys(deployment)
    report = run_round(deployment, "after-the-kill")
    assert report.decision.value == "published", report.message
    assert report.accepted == 4 and not report.rejected
    verdicts = list(Ledger(deployment.state).verdicts())
    assert sorted(v.key for v in verdicts) == sorted(queued) and all(v.accepted for v in verdicts)
    assert inbox_keys(deployment) == []


def test_tampered_published_model_is_refused_and_old_one_kept(deployment, tmp_path):
    rows = deployment.dataset.clients[deployment.dataset.client_ids[3]]
    config = make_client(deployment, tmp_path, "dev-t", rows)
    assert run_cycle(config).pulled_version == 1
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    v2 = ModelPackage(
        metadata=v1.metadata.model_copy(update={"version": 2}),
        onnx_bytes=v1.onnx_bytes,
        weights=v1.weights,
    )
    registry.publish(v2)
    (key,) = [  # what devices download: the TUF target, not the server's archive copy
        i.key for i in deployment.models.list("tuf/targets/v00000002/") if "weights.bin" in i.key
    ]
    evil = deployment.models.get(key)
    deployment.models.delete(key)
    deployment.models.put(key, evil[:-8] + np.float64(1e6).tobytes())
    report = run_cycle(config)
    assert not report.ok and "refused" in report.model_message
    assert InstalledModels(config.state_dir / "models").current_version() == 1


def test_model_signed_by_unpinned_key_is_refused(deployment, tmp_path):
    rows = deployment.dataset.clients[deployment.dataset.client_ids[4]]
    other = signing.public_key_pem(signing.generate_signing_key()).decode()
    config = make_client(deployment, tmp_path, "dev-p", rows, package_signing_keys_pem=[other])
    report = run_cycle(config)
    assert not report.ok and "unknown key" in report.model_message
    assert InstalledModels(config.state_dir / "models").current_version() is None
    assert not report.trained


def test_channel_root_from_another_repository_is_refused(deployment, tmp_path):
    """A device pinned to another channel root trusts nothing this bucket serves."""
    from fedlib.storage.store import LocalStore
    from fedlib.trust.channel_repository import ChannelKeys, ChannelRepository

    other = ChannelRepository(
        LocalStore(tmp_path / "other-channel"), ChannelKeys.generate(tmp_path / "other-keys")
    )
    other.init()
    rows = deployment.dataset.clients[deployment.dataset.client_ids[5]]
    config = make_client(
        deployment, tmp_path, "dev-root", rows, channel_root_json=other.root_bytes().decode()
    )
    report = run_cycle(config)
    assert not report.ok and "refused" in report.model_message
    assert InstalledModels(config.state_dir / "models").current_version() is None


def test_csv_features_in_any_column_order(deployment, tmp_path):
    from client.features import FeatureError, load_features

    names = deployment.dataset.feature_names
    rows = deployment.dataset.clients[deployment.dataset.client_ids[0]][:20]
    order = list(reversed(range(len(names))))
    lines = [",".join(names[i] for i in order) + ",extra"]
    lines += [",".join(str(r[i]) for i in order) + ",9" for r in rows]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    loaded = load_features(tmp_path, names, max_rows=1000)
    assert np.allclose(loaded, rows)
    (tmp_path / "b.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(FeatureError, match="missing columns"):
        load_features(tmp_path, names, max_rows=1000)

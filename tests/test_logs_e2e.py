"""A device configured with only log paths, through the real CLIs: the operator mines a
vocabulary and counts a labeled holdout with it, devices read their syslog, train,
upload; a round publishes; a device scores its newest windows and explains the one it
flags. Nothing of a line (text, user, address, template) is in what a device uploads."""

from __future__ import annotations

import json
import time

import numpy as np

from bench.make_logs import anomalous_periods, device_logs, syslog_text, write_labels
from client.cli import main as client_main
from client.config import ClientConfig
from fedlib.crypto import sealing
from fedlib.ops.admin import main as admin_main
from fedlib.server.deployment import Deployment
from fedlib.server.settings import ServerSettings
from fedlib.wire import protocol
from fedlib.wire.vocabulary import TemplateVocabulary

WINDOW = 300
WINDOWS = 160  # per device: enough closed windows to train on (min_rows 10)


def recent_start(windows: int) -> float:
    """A window boundary ``windows`` + 2 windows ago: every window is closed by now and
    inside the device's retention."""
    now = time.time()
    return (now // WINDOW - windows - 2) * WINDOW


def test_a_device_with_only_log_paths_trains_uploads_scores_and_explains(
    admin_env, tmp_path, capsys
):
    # the operator: a vocabulary from sample logs, a labeled holdout counted with it
    sample = device_logs(900, windows=200, anomaly_rate=0.2, seed=3)
    (tmp_path / "sample.log").write_text(syslog_text(sample.lines))
    vocab_path = tmp_path / "vocabulary.json"
    assert (
        admin_main(
            [
                "templates",
                "learn",
                str(tmp_path / "sample.log"),
                "--format",
                "syslog",
                "--out",
                str(vocab_path),
            ]
        )
        == 0
    )
    vocabulary = TemplateVocabulary.from_json(vocab_path.read_bytes())
    assert 10 <= len(vocabulary.templates) <= 40, [t.pattern for t in vocabulary.templates]
    patterns = {t.pattern for t in vocabulary.templates}
    brute = "sshd: Failed password for invalid user <USER> from <IP> port <NUM> ssh2"
    assert brute in patterns

    periods = []
    holdout_files = []
    for i in range(2):
        start = recent_start(240) - (i + 1) * 5 * 86_400  # hosts apart: labels do not mix
        logs = device_logs(1000 + i, windows=240, anomaly_rate=0.2, seed=4, start=start)
        path = tmp_path / f"holdout-{i}.log"
        path.write_text(syslog_text(logs.lines))
        holdout_files.append(str(path))
        periods += anomalous_periods(logs.labels, logs.kinds, start=start)
    write_labels(tmp_path / "labels.csv", periods)
    holdout = tmp_path / "holdout-logs.npz"
    assert (
        admin_main(
            [
                "templates",
                "holdout",
                *holdout_files,
                "--vocabulary",
                str(vocab_path),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--out",
                str(holdout),
            ]
        )
        == 0
    )
    with np.load(holdout) as npz:
        assert list(npz["feature_names"]) == vocabulary.feature_names()
        assert 0 < npz["holdout_y"].sum() < len(npz["holdout_y"])
    assert admin_main(["init", "--holdout", str(holdout), "--vocabulary", str(vocab_path)]) == 0

    # three devices that know nothing but where their syslog is
    secrets = {"alice", "10.", "203.", "Accepted", "publickey", "password", "<USER>", "sshd"}
    configs = []
    for d in range(3):
        device = tmp_path / f"dev-{d}"
        (device / "log").mkdir(parents=True)
        logs = device_logs(d, windows=WINDOWS, seed=5, start=recent_start(WINDOWS))
        (device / "log" / "syslog").write_text(syslog_text(logs.lines))
        assert client_main(["keygen", "--out", str(device / "state" / "client_key.pem")]) == 0
        out = device / "client.json"
        assert (
            admin_main(
                [
                    "enroll",
                    f"dev-{d}",
                    "--public-key",
                    str(device / "state" / "client_key.pub.pem"),
                    "--out",
                    str(out),
                    "--log",
                    "log/syslog*",
                    "--log-format",
                    "syslog",
                    "--state-dir",
                    "state",
                ]
            )
            == 0
        )
        doc = json.loads(out.read_text())
        assert "features_dir" not in doc and doc["log_sources"] == [
            {"path": "log/syslog*", "format": "syslog"}
        ]
        capsys.readouterr()
        assert client_main(["run", "--config", str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["trained"] and report["uploaded"], report
        assert report["log_entries"] == len(logs.lines)
        assert report["num_rows"] == WINDOWS  # every window closed, each one row
        configs.append(ClientConfig.load(out))

    # what the devices uploaded: decrypted with the server's key, no line in it
    settings = ServerSettings.load(admin_env["config"])
    from fedlib.ops.admin import admin_s3_config

    deployment = Deployment(settings, admin_s3_config(settings, admin_env["config"]))
    keys = [i.key for i in deployment.inbox.list("updates/")]
    assert len(keys) == 3
    for key in keys:
        envelope = deployment.inbox.get(key)
        opened = sealing.open_update(envelope, deployment.load_fleet(), deployment.server_keyring())
        meta, _delta = protocol.decode_payload(opened.payload)
        for blob in (envelope, opened.payload, meta.model_dump_json().encode()):
            for secret in secrets:
                assert secret.encode() not in blob, (key, secret)

    capsys.readouterr()
    assert admin_main(["round", "--run-id", "logs-1", "--json"]) == 0
    round_report = json.loads(capsys.readouterr().out)
    assert round_report["accepted"] == 3, round_report
    assert round_report["decision"] in ("published", "rejected"), round_report
    # the candidate, trained on nothing but the devices' syslog, detects on the holdout
    assert round_report["candidate_metrics"]["auc"] > 0.9, round_report

    # a brute force in one of device 0's newest closed windows: flagged, and explained
    configs[0]
    attack_start = (time.time() // WINDOW - 1) * WINDOW - WINDOW  # closed by now
    rng = np.random.default_rng(9)
    lines = [
        (
            attack_start + rng.uniform(0, WINDOW - 1),
            f"sshd[{4000 + i}]: Failed password for invalid user admin from 203.0.113.{i % 250} "
            f"port {40000 + i} ssh2",
        )
        for i in range(300)
    ]
    live = tmp_path / "dev-0" / "log" / "syslog"
    with live.open("a") as fh:
        fh.write(syslog_text(sorted(lines)))
    capsys.readouterr()
    assert (
        client_main(
            [
                "score",
                "--config",
                str(tmp_path / "dev-0" / "client.json"),
                "--json",
                "--windows",
                "3",
            ]
        )
        == 0
    )
    scored = json.loads(capsys.readouterr().out)
    flagged = [w for w in scored["windows"] if w["flagged"]]
    attacked = [
        w
        for w in flagged
        if w["start"].startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(attack_start)))
    ]
    assert attacked, scored
    top = attacked[0]["templates"][0]
    assert top["pattern"] == brute and top["count"] >= 300 and top["deviation"] > 0, attacked
    assert top["example"] == brute  # the masked line, shown on the device only
    assert (
        client_main(
            ["score", "--config", str(tmp_path / "dev-0" / "client.json"), "--windows", "3"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "FLAGGED" in text and brute in text

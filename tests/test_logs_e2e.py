"""A device configured with only log paths, through the real CLIs: the operator mines a
vocabulary and counts a labeled holdout with it, devices read their syslog, train,
upload; a round publishes; a device scores its newest windows and explains the one it
flags. Nothing of a line (text, user, address, template) is in what a device uploads."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from bench.make_logs import anomalous_periods, device_logs, syslog_text, write_labels
from client.cli import main as client_main
from client.config import ClientConfig
from fedlib.crypto import sealing
from fedlib.models.logfeatures import MASK_NAMES
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


def labeled_hosts(tmp_path) -> list[str]:
    """Two labeled hosts' syslog (days apart, so their labels never mix) and
    ``labels.csv`` with their anomalous periods: what ``templates holdout`` counts."""
    periods, paths = [], []
    for i in range(2):
        start = recent_start(240) - (i + 1) * 5 * 86_400
        logs = device_logs(1000 + i, windows=240, anomaly_rate=0.2, seed=4, start=start)
        path = tmp_path / f"holdout-{i}.log"
        path.write_text(syslog_text(logs.lines))
        paths.append(str(path))
        periods += anomalous_periods(logs.labels, logs.kinds, start=start)
    write_labels(tmp_path / "labels.csv", periods)
    return paths


def device_with_syslog(tmp_path, d: int):
    """Device ``d``'s folder: its recent syslog in ``log/`` and a fresh key in ``state/``;
    returns (folder, the generated logs)."""
    device = tmp_path / f"dev-{d}"
    (device / "log").mkdir(parents=True)
    logs = device_logs(d, windows=WINDOWS, seed=5, start=recent_start(WINDOWS))
    (device / "log" / "syslog").write_text(syslog_text(logs.lines))
    assert client_main(["keygen", "--out", str(device / "state" / "client_key.pem")]) == 0
    return device, logs


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

    holdout_files = labeled_hosts(tmp_path)
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
        device, logs = device_with_syslog(tmp_path, d)
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


def _learn(tmp_path, name: str, lines, *extra: str):
    sample = tmp_path / f"{name}.log"
    sample.write_text(syslog_text(lines))
    out = tmp_path / f"{name}.json"
    argv = ["templates", "learn", str(sample), "--format", "syslog", "--out", str(out)]
    assert admin_main([*argv, *extra]) == 0
    return out


def _holdout(tmp_path, name: str, vocab_path, host_logs, labels_csv):
    out = tmp_path / f"{name}.npz"
    argv = ["templates", "holdout", *host_logs, "--vocabulary", str(vocab_path)]
    assert admin_main([*argv, "--labels", str(labels_csv), "--out", str(out)]) == 0
    return out


def test_a_new_vocabulary_is_a_new_version_and_devices_recount_their_windows(
    admin_env, tmp_path, capsys
):
    """Vocabulary 1 is mined from logs without any failed login; vocabulary 2 (learned
    against it) adds those templates. `templates publish` makes it version 2 with the
    surviving columns' parameters; a device that ran before it re-counts its retained
    windows with vocabulary 2 (exactly as the server counts its log), an update trained
    on version 1 is refused as `feature_mismatch`, and no rollback crosses the change."""
    from client.agent import local_rows
    from fedlib.models.model import FeatureSchema
    from fedlib.ops import templates
    from fedlib.ops.admin import admin_s3_config
    from fedlib.server.rounds import model_from_package

    sample = device_logs(900, windows=200, anomaly_rate=0.2, seed=3)
    plain = [(t, s) for t, s in sample.lines if "Failed password" not in s]
    v1_path = _learn(tmp_path, "v1", plain)
    v2_path = _learn(tmp_path, "v2", sample.lines, "--previous", str(v1_path))
    v1 = TemplateVocabulary.from_json(v1_path.read_bytes())
    v2 = TemplateVocabulary.from_json(v2_path.read_bytes())
    assert (v1.version, v2.version) == (1, 2)
    added = {t.pattern for t in v2.templates} - {t.pattern for t in v1.templates}
    assert any("Failed password" in p for p in added), added

    host_logs = labeled_hosts(tmp_path)
    h1 = _holdout(tmp_path, "h1", v1_path, host_logs, tmp_path / "labels.csv")
    h2 = _holdout(tmp_path, "h2", v2_path, host_logs, tmp_path / "labels.csv")
    assert admin_main(["init", "--holdout", str(h1), "--vocabulary", str(v1_path)]) == 0
    # a holdout of other features cannot replace the current one by the back door
    assert admin_main(["holdout", str(h2)]) == 1

    configs = []
    for d in range(3):
        device, _ = device_with_syslog(tmp_path, d)
        out = device / "client.json"
        argv = ["enroll", f"dev-{d}", "--public-key", str(device / "state" / "client_key.pub.pem")]
        assert admin_main([*argv, "--out", str(out), "--log", "log/syslog*"]) == 0
        configs.append(out)
    # device 0 runs under version 1: its update is in the inbox when the vocabulary moves
    capsys.readouterr()
    assert client_main(["run", "--config", str(configs[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["uploaded"]

    assert admin_main(["templates", "publish", str(v2_path), "--holdout", str(h2), "--json"]) == 0
    change = json.loads(capsys.readouterr().out)
    assert change["published_version"] == 2 and change["previous_version"] == 1, change
    assert change["vocabulary_version"] == 2
    assert change["new"] >= len(added) + 3  # the added templates, unknown, 2 set statistics
    assert change["carried"] >= 5 and change["metrics"]["auc"] > 0.5, change
    # publishing it again changes nothing
    assert admin_main(["templates", "publish", str(v2_path), "--holdout", str(h2), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["published_version"] is None

    settings = ServerSettings.load(admin_env["config"])
    deployment = Deployment(settings, admin_s3_config(settings, admin_env["config"]))
    registry = deployment.registry()
    assert registry.active_version() == 2
    # an older vocabulary is refused before anything is stored (the holdout stays v2's)
    holdout_version = deployment.holdout_version()
    assert admin_main(["templates", "publish", str(v1_path), "--holdout", str(h1)]) == 1
    assert "not newer" in capsys.readouterr().err
    assert deployment.holdout_version() == holdout_version
    new = registry.read_version(2)
    old = registry.read_version(1)
    schema = FeatureSchema.from_dict(new.metadata.feature_schema)
    assert schema.vocabulary == v2 and deployment.load_holdout().feature_names == schema.names
    assert new.metadata.parent_version == 1 and new.metadata.threshold is not None
    # a carried template column keeps the standardization its parameters were fitted in
    old_schema = FeatureSchema.from_dict(old.metadata.feature_schema)
    carried = v2.carried_features(v1)
    for name, was in carried.items():
        assert schema.mean[schema.names.index(name)] == old_schema.mean[old_schema.names.index(was)]
    assert model_from_package(new).score(np.zeros((1, schema.dim))).shape == (1,)

    # every device trains on version 2; device 0 re-counts the windows it kept from before
    for out in configs:
        assert client_main(["run", "--config", str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["trained"] and report["uploaded"], report
    config0 = ClientConfig.load(configs[0])
    rows = local_rows(config0, schema, max_rows=100_000)
    server_counted = templates.count_holdout(
        [tmp_path / "dev-0" / "log" / "syslog"],
        v2,
        log_format="syslog",
        regex=None,
        window_seconds=WINDOW,
        anomalous=[],
    ).features
    assert rows.shape == server_counted.shape == (WINDOWS, schema.dim)
    np.testing.assert_array_equal(rows, server_counted)

    capsys.readouterr()
    assert admin_main(["round", "--run-id", "vocab-2", "--json"]) == 0
    round_report = json.loads(capsys.readouterr().out)
    assert round_report["accepted"] == 3, round_report
    assert round_report["rejected"] == {"feature_mismatch": 1}, round_report

    # a rollback to version 1 would serve vocabulary 1 against a vocabulary-2 holdout
    argv = ["rollback", "--to-version", "1", "--reason", "test"]
    assert admin_main(argv) == 1
    assert "template vocabulary" in capsys.readouterr().err


def test_enroll_writes_the_zone_of_a_log_source(admin_env, tmp_path):
    """`fl-admin enroll --log-timezone` puts the zone in the device's log source (its
    RFC 3164 stamps are read in it); a zone the machine does not know is refused there,
    not discovered on the device."""
    assert admin_main(["init", "--holdout", str(admin_env["holdout"])]) == 0
    assert client_main(["keygen", "--out", str(tmp_path / "dev" / "client_key.pem")]) == 0
    argv = ["enroll", "dev-7", "--public-key", str(tmp_path / "dev" / "client_key.pub.pem")]
    out = tmp_path / "dev" / "client.json"
    log = ["--log", "/var/log/syslog*", "--log-format", "syslog"]
    assert admin_main([*argv, "--out", str(out), *log, "--log-timezone", "Mars/Olympus"]) == 1
    assert not out.exists()
    assert admin_main([*argv, "--out", str(out), *log, "--log-timezone", "Europe/Berlin"]) == 0
    config = ClientConfig.load(out)
    assert [s.timezone for s in config.log_sources] == ["Europe/Berlin"]
    assert config.log_sources[0].zone().utcoffset(None) is None  # a real zone, not UTC


def test_the_holdout_reads_stamps_in_the_zone_it_is_told(tmp_path):
    """`fl-admin templates holdout --timezone`: an RFC 3164 stamp written in Berlin at
    12:02 is 11:02 UTC, so a period given in UTC around 11:02 labels its window."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    first = datetime(2026, 1, 15, 12, 2, 3, tzinfo=berlin)
    second = datetime(2026, 1, 15, 13, 2, 3, tzinfo=berlin)
    log = tmp_path / "host.log"
    log.write_text(
        "".join(
            f"{w:%b} {w.day:>2} {w:%H:%M:%S} host sshd[1]: Accepted publickey for bob\n"
            for w in (first, second)
        )
    )
    os.utime(log, (second.timestamp(), second.timestamp()))
    start = datetime(2026, 1, 15, 11, 0, tzinfo=UTC).isoformat()
    end = datetime(2026, 1, 15, 11, 5, tzinfo=UTC).isoformat()
    (tmp_path / "labels.csv").write_text(f"start,end,class\n{start},{end},brute\n")
    vocab = TemplateVocabulary.model_validate(
        {
            "version": 1,
            "masks": MASK_NAMES,
            "templates": [{"id": 1, "pattern": "sshd: Accepted publickey for <USER>"}],
        }
    )
    (tmp_path / "v.json").write_bytes(vocab.to_json())
    out = tmp_path / "h.npz"
    argv = ["templates", "holdout", str(log), "--vocabulary", str(tmp_path / "v.json")]
    argv += ["--labels", str(tmp_path / "labels.csv"), "--out", str(out)]
    assert admin_main([*argv, "--timezone", "Europe/Berlin"]) == 0
    with np.load(out) as npz:
        assert npz["holdout_y"].tolist() == [1, 0]
    assert admin_main(argv) == 0  # read as UTC, the first line is an hour past the period
    with np.load(out) as npz:
        assert npz["holdout_y"].tolist() == [0, 0]

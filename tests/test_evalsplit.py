"""The holdout's calibration/evaluation split: no published figure is measured on rows
that fitted anything.

Unit tests for the split (keyed, deterministic, stratified, stable when rows are added),
the AUC's bootstrap interval and the precision warning; then the server path on a real
SeaweedFS deployment: a real round (sealed, signed updates, ONNX) publishes figures
computed on the evaluation rows only, its threshold and FLTrust reference come from the
calibration rows only (adding evaluation rows moves neither), a new holdout version
keeps old rows in their part, and ``fl-admin holdout`` reports the parts and warns.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from client.update import make_update
from fedlib.crypto import sealing
from fedlib.models import evaluation as ev
from fedlib.models.evaluation import (
    MAX_AUC_HALF_WIDTH,
    MIN_EVALUATION_ANOMALIES,
    auc_interval,
    precision_warnings,
    row_positions,
    split_holdout,
)
from fedlib.models.model import onnx_score
from fedlib.ops.admin import initial_package
from fedlib.ops.admin import main as admin_main
from fedlib.server import records, state_keys
from fedlib.server.deployment import Holdout
from fedlib.server.pipeline import run_round
from fedlib.server.round_runner import load_evaluation, round_inputs
from fedlib.wire import protocol
from tests.helpers import build_deployment

KEY = b"test-split-key"


def synthetic(n: int, anomaly_share: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < anomaly_share).astype(np.int8)
    x = rng.normal(size=(n, 4)).astype(np.float32) + y[:, None] * 1.5
    return x, y


def key_of(x: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.ascontiguousarray(x, dtype="<f4")]


# -- the split ---------------------------------------------------------------------------------


def test_the_split_is_disjoint_complete_deterministic_and_keyed():
    x, y = synthetic(2000)
    cal, evl = split_holdout(x, y, key=KEY, fraction=0.5)
    assert np.intersect1d(cal, evl).size == 0
    assert np.array_equal(np.sort(np.concatenate([cal, evl])), np.arange(y.size))
    again = split_holdout(x, y, key=KEY, fraction=0.5)
    assert np.array_equal(cal, again[0]) and np.array_equal(evl, again[1])
    other = split_holdout(x, y, key=b"another deployment", fraction=0.5)[0]
    # another key, another split (about half the rows change part)
    assert 0.4 < np.setxor1d(cal, other).size / y.size < 0.6


def test_the_split_is_stratified_by_label_and_class():
    x, y = synthetic(8000, anomaly_share=0.25)
    classes = np.where(y == 1, np.where(np.arange(y.size) % 2 == 0, "burst", "drift"), "")
    fraction = 0.3
    cal, _ = split_holdout(x, y, classes, key=KEY, fraction=fraction)
    in_cal = np.zeros(y.size, dtype=bool)
    in_cal[cal] = True
    for stratum in (y == 0, classes == "burst", classes == "drift"):
        n = int(stratum.sum())
        share = in_cal[stratum].mean()
        sigma = np.sqrt(fraction * (1 - fraction) / n)
        assert abs(share - fraction) < 4 * sigma, (n, share)


def test_old_rows_keep_their_part_when_a_new_version_adds_rows():
    x, y = synthetic(1000, seed=1)
    more_x, more_y = synthetic(700, seed=2)
    cal1, _ = split_holdout(x, y, key=KEY)
    x2, y2 = (
        np.concatenate([more_x[:300], x, more_x[300:]]),
        np.concatenate([more_y[:300], y, more_y[300:]]),
    )
    cal2, _ = split_holdout(x2, y2, key=KEY)
    before = {k for i, k in enumerate(key_of(x)) if i in set(cal1.tolist())}
    after_cal = set(cal2.tolist())
    after = {k for i, k in enumerate(key_of(x2)) if i in after_cal}
    old = set(key_of(x))
    assert before == after & old  # every old row is where it was
    assert len(after - old) > 0  # and new rows did land in calibration too


def test_identical_rows_share_a_part_and_the_position_is_a_function_of_the_row():
    x, _ = synthetic(400)
    x[10] = x[20]
    positions = row_positions(x, KEY)
    assert positions[10] == positions[20]
    assert np.array_equal(row_positions(x[::-1], KEY), positions[::-1])
    assert ((positions >= 0) & (positions < 1)).all()


def test_a_holdout_whose_part_would_lack_anomalies_is_refused():
    x, y = synthetic(400, anomaly_share=0.0)
    y[0] = 1  # one anomaly: one part has none
    with pytest.raises(ValueError, match="needs both in each part"):
        split_holdout(x, y, key=KEY)


# -- the bootstrap interval --------------------------------------------------------------------


def test_the_vectorised_bootstrap_is_the_auc_of_each_resample():
    """The Mann-Whitney-from-multiplicities computation equals sklearn on the resample
    drawn explicitly (ties included)."""
    x, y = synthetic(300, seed=3)
    scores = np.round(x.sum(axis=1), 1)  # ties
    pos, neg = scores[y == 1], np.sort(scores[y == 0])
    rng = np.random.default_rng(ev.BOOTSTRAP_SEED)
    w_neg = ev._multiplicities(rng, 50, neg.size)
    w_pos = ev._multiplicities(rng, 50, pos.size)
    below = np.searchsorted(neg, pos, "left")
    upto = np.searchsorted(neg, pos, "right")
    cum = np.concatenate([np.zeros((50, 1)), np.cumsum(w_neg, axis=1)], axis=1)
    fast = (w_pos * (cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below]))).sum(axis=1)
    fast /= pos.size * neg.size
    for b in (0, 7, 49):
        resample = np.concatenate(
            [np.repeat(neg, w_neg[b].astype(int)), np.repeat(pos, w_pos[b].astype(int))]
        )
        labels = np.concatenate([np.zeros(neg.size), np.ones(pos.size)])
        assert fast[b] == pytest.approx(roc_auc_score(labels, resample), abs=1e-12)


def test_the_interval_contains_the_estimate_is_fixed_and_narrows_with_more_rows():
    widths = []
    for n in (300, 3000):
        x, y = synthetic(n, seed=4)
        scores = x.sum(axis=1)
        low, high = auc_interval(scores, y)
        assert low <= roc_auc_score(y, scores) <= high
        assert (low, high) == auc_interval(scores, y)  # fixed seed: a re-run, same bytes
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 10x the rows, ~3x narrower


def test_the_warning_fires_on_few_anomalies_or_a_wide_interval():
    assert precision_warnings(MIN_EVALUATION_ANOMALIES, (0.80, 0.82)) == []
    few = precision_warnings(MIN_EVALUATION_ANOMALIES - 1, (0.80, 0.82))
    assert len(few) == 1 and "anomalies" in few[0]
    wide = precision_warnings(500, (0.80, 0.80 + 2 * MAX_AUC_HALF_WIDTH + 0.002))
    assert len(wide) == 1 and "interval" in wide[0]


def test_metrics_without_part_or_interval_read_and_write_as_before():
    old = {"ap": 0.6, "auc": 0.77, "fpr": 0.01, "n": 500.0, "n_anomalies": 100.0, "tpr": 0.4}
    record = records.Metrics.from_json(json.dumps(old).encode(), what="old")
    assert record.part is None and record.auc_low is None
    assert json.loads(record.to_json()) == old
    new = record.model_copy(update={"part": "evaluation", "auc_low": 0.7, "auc_high": 0.8})
    assert records.Metrics.from_json(new.to_json(), what="new") == new
    assert new.scalars() == {**old, "auc_low": 0.7, "auc_high": 0.8}


# -- the server path (real SeaweedFS, real round) -----------------------------------------------


def send_updates(deployment, clients: int = 3) -> None:
    data = deployment.dataset
    package = deployment.registry().read_active()
    fleet = deployment.load_fleet()
    for i, cid in enumerate(data.client_ids[:clients]):
        key = sealing.generate_signing_key()
        fleet.enroll(cid, sealing.public_pem(key))
        deployment.save_fleet(fleet)
        update = make_update(
            package,
            data.clients[cid],
            client_id=cid,
            client_key=key,
            server_public_key=deployment.current_server_public_key(),
            residual=None,
            seed=i,
        )
        deployment.inbox.put(protocol.inbox_key(cid, update.update_id), update.envelope)


def test_a_round_publishes_figures_measured_on_rows_its_threshold_never_saw(
    s3_config, tmp_path, small_dataset
):
    deployment = build_deployment(
        s3_config, tmp_path / "keys", small_dataset, auc_tolerance=1.0, auc_floor=0.0
    )
    parts = deployment.holdout_parts()
    cal, evl = parts.calibration, parts.evaluation
    assert not set(key_of(cal.features)) & set(key_of(evl.features))  # disjoint rows
    assert cal.labels.size + evl.labels.size == deployment.load_holdout().labels.size
    send_updates(deployment)
    report = run_round(deployment, "evalsplit")
    assert report.decision.value == "published", report.summary()
    package = deployment.registry().read_active()
    assert package.version == 2

    # the threshold is the benign-score quantile of the calibration rows, nothing else
    cal_scores, _ = onnx_score(package.onnx_bytes, cal.benign())
    threshold = float(np.quantile(cal_scores, deployment.settings.threshold_quantile))
    assert package.metadata.threshold == pytest.approx(threshold, rel=1e-5)

    # every published figure is the evaluation part's, recomputed here from its rows
    scores, flags = onnx_score(package.onnx_bytes, evl.features)
    benign, anomalous = evl.labels == 0, evl.labels == 1
    published = package.metadata.metrics
    assert published["n"] == evl.labels.size and published["n_anomalies"] == anomalous.sum()
    assert published["fpr"] == pytest.approx(flags[benign].mean())
    assert published["tpr"] == pytest.approx(flags[anomalous].mean())
    assert published["auc"] == pytest.approx(roc_auc_score(evl.labels, scores))
    assert published["auc_low"] <= published["auc"] <= published["auc_high"]

    # the report says so; the gate's own comparison is on the calibration rows
    assert report.candidate_metrics.part == "evaluation"
    assert report.candidate_metrics.n == evl.labels.size
    evaluation = load_evaluation(deployment, "evalsplit")
    assert evaluation.calibration_candidate.part == "calibration"
    assert evaluation.calibration_candidate.n == cal.labels.size
    assert f"gate on the {cal.labels.size} calibration rows" in report.message
    assert "evaluation rows AUC / AP" in report.summary()

    # the interval is shown: on the rounds page (the dashboard's own renderer, from the
    # stored report) and in `fl-admin status`'s document
    from starlette.requests import Request

    from fedlib.integrations.airflow.dashboard_app import Links, rounds_table, versions_table
    from fedlib.ops import dashboard
    from fedlib.ops.admin import status_document

    shown = f"[{published['auc_low']:.3f}, {published['auc_high']:.3f}]"
    links = Links(Request({"type": "http", "root_path": ""}))
    assert shown in rounds_table(links, dashboard.rounds(deployment, limit=5).items)
    assert shown in versions_table(dashboard.versions(deployment).items, links)
    status = status_document(deployment)
    (v2,) = (v for v in status["versions"] if v["version"] == 2)
    assert (v2["auc_low"], v2["auc_high"]) == (published["auc_low"], published["auc_high"])
    assert status["recent_rounds"][0]["candidate_auc_high"] == published["auc_high"]


def test_adding_evaluation_rows_moves_neither_threshold_nor_reference_but_the_fpr(
    s3_config, tmp_path, small_dataset
):
    """A new holdout version with extra benign rows that land in the evaluation part:
    version 1's threshold and the FLTrust reference are bit-identical, the published FPR
    changes (those rows are measured, never fitted)."""
    deployment = build_deployment(
        s3_config,
        tmp_path / "keys",
        small_dataset,
        robust_aggregation="fltrust",
        model_kind="autoencoder",
    )
    base = deployment.registry().read_active()
    v1 = deployment.load_holdout()
    key, fraction = deployment.holdout_split_key(), deployment.settings.holdout_calibration_fraction
    rng = np.random.default_rng(5)
    candidates = (v1.benign()[:200] * rng.uniform(20, 40, size=(200, 1))).astype(np.float32)
    extra = candidates[row_positions(candidates, key) >= fraction]  # evaluation rows
    assert len(extra) > 50
    v2 = Holdout(
        np.concatenate([v1.features, extra]),
        np.concatenate([v1.labels, np.zeros(len(extra), dtype=np.int8)]),
        v1.feature_names,
    )
    assert deployment.save_holdout(v2) == 2
    parts1, parts2 = deployment.holdout_parts(1), deployment.holdout_parts(2)
    assert np.array_equal(parts1.calibration.features, parts2.calibration.features)
    assert set(key_of(parts1.evaluation.features)) < set(key_of(parts2.evaluation.features))

    first, second = initial_package(deployment, v1), initial_package(deployment, v2)
    assert first.metadata.threshold == second.metadata.threshold
    assert second.metadata.metrics["fpr"] > first.metadata.metrics["fpr"]
    ref1 = round_inputs(deployment, base, 1).reference
    ref2 = round_inputs(deployment, base, 2).reference
    assert ref1 is not None and ref2 is not None and np.array_equal(ref1, ref2)


def test_the_split_key_is_made_once_per_deployment(admin_env, capsys):
    """``fl-admin init`` draws a deployment's key (the test helper pins one instead)."""
    from fedlib.ops.admin import _deployment

    assert admin_main(["init", "--holdout", str(admin_env["holdout"])]) == 0
    capsys.readouterr()
    dep = _deployment(argparse.Namespace(config=None))
    stored = records.HoldoutSplitKey.from_json(dep.state.get(state_keys.HOLDOUT_SPLIT_KEY))
    assert bytes.fromhex(stored.key) == dep.holdout_split_key() == dep.holdout_split_key()
    assert len(stored.key) == 64 and stored.key != hashlib.sha256(b"").hexdigest()


def test_fl_admin_holdout_reports_the_parts_and_warns_when_anomalies_are_few(
    admin_env, tmp_path, capsys
):
    env = admin_env
    assert admin_main(["init", "--holdout", str(env["holdout"])]) == 0
    capsys.readouterr()
    assert admin_main(["holdout", "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    data = env["data"]
    assert doc["calibration"]["rows"] + doc["evaluation"]["rows"] == data.holdout_y.size
    assert doc["calibration"]["anomalies"] + doc["evaluation"]["anomalies"] == data.holdout_y.sum()
    active = doc["active"]
    assert active["auc_low"] <= active["auc"] <= active["auc_high"]
    # ~50 evaluation anomalies under an untrained model: an interval far wider than 0.02
    assert any("interval" in w for w in doc["warnings"]), doc
    assert "WARNING: the active model's AUC interval" in out.err
    assert admin_main(["status"]) == 0  # version 1's published AUC with its interval
    assert f"[{active['auc_low']:.3f}, {active['auc_high']:.3f}]" in capsys.readouterr().out

    # a holdout with 24 anomalies: about 12 evaluate, below the rule's 30
    y = data.holdout_y
    keep = np.flatnonzero(y == 0).tolist() + np.flatnonzero(y == 1)[:24].tolist()
    few = tmp_path / "few.npz"
    np.savez(few, holdout_X=data.holdout_X[keep], holdout_y=y[keep])
    assert admin_main(["holdout", str(few)]) == 0
    out = capsys.readouterr()
    assert "holdout version 2 is now current" in out.out
    assert "evaluation" in out.out and "calibration" in out.out
    assert "WARNING: the evaluation part has" in out.err
    assert f"(< {MIN_EVALUATION_ANOMALIES})" in out.err


# -- the bench ----------------------------------------------------------------------------------


def test_bench_figures_are_on_evaluation_rows_next_to_the_in_sample_ones(small_dataset, capsys):
    """``bench.quality``'s FPR is the evaluation rows' (``bench.evalsplit`` recomputes it
    there), and the protocol before the split is 1% by construction on its own rows."""
    from bench.evalsplit import main as evalsplit_main

    assert evalsplit_main(["--dataset", str(small_dataset), "--seeds", "1", "--rounds", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration_rows"] + doc["evaluation_rows"] == doc["holdout_rows"]
    assert doc["federated_fpr_reported_by_quality"] == doc["out_of_sample_fpr"]
    benign = doc["holdout_rows"] - doc["calibration_anomalies"] - doc["evaluation_anomalies"]
    assert abs(doc["in_sample_whole_holdout_fpr"] - 0.01) <= 1 / benign
    assert doc["auc_low"] <= doc["out_of_sample_auc"] <= doc["auc_high"]

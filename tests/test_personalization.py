"""On-device personalization: the calibration itself, the device's real cycle, the CLI.

Unit tests build two devices with disjoint behaviour (device A logs templates 0-7, B
templates 8-15) and a fleet model trained on both: a window normal on A is ordinary for
the fleet, so only a per-device calibration can tell that it is foreign on B.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client.calibration import (
    CalibrationConfig,
    CalibrationError,
    DeviceCalibration,
    fit_calibration,
)
from fedlib.models.model import AnomalyModel, FeatureSchema, create_model

D = 16
NAMES = [f"tmpl_{i:02d}" for i in range(D)]
Sampler = Callable[[int], np.ndarray]


def device(rng: np.random.Generator, heavy: np.ndarray) -> Sampler:
    """Overdispersed template counts: busy on ``heavy``, a trickle elsewhere."""
    rates = np.full(D, 0.3)
    rates[heavy] = rng.uniform(5.0, 30.0, heavy.size)

    def sample(n: int) -> np.ndarray:
        activity = rng.gamma(6.0, 1.0 / 6.0, (n, 1))
        return rng.poisson(rates * activity).astype(np.float32)

    return sample


def two_devices(seed: int) -> tuple[Sampler, Sampler, FeatureSchema, AnomalyModel]:
    """Devices A and B and a fleet model (Gaussian) of their pooled rows."""
    rng = np.random.default_rng(seed)
    a, b = device(rng, np.arange(0, 8)), device(rng, np.arange(8, 16))
    fleet = np.concatenate([a(600), b(600)])
    schema = FeatureSchema.from_data(NAMES, fleet)
    model = create_model("gaussian", schema)
    model.fit_local(fleet, epochs=1, seed=0)
    model.calibrate_threshold(fleet, quantile=0.99)
    return a, b, schema, model


def calibrate(
    rows: np.ndarray, schema: FeatureSchema, model: AnomalyModel, **config: float
) -> DeviceCalibration:
    return fit_calibration(
        rows,
        model.score(rows),
        schema,
        model_digest="test-model",
        model_version=3,
        config=CalibrationConfig(**config),  # type: ignore[arg-type]
    )


def test_a_window_normal_on_a_is_flagged_on_b_and_not_on_a() -> None:
    a, b, schema, model = two_devices(seed=1)
    cal_a, cal_b = calibrate(a(400), schema, model), calibrate(b(400), schema, model)
    fresh_a = a(2000)
    g = model.score(fresh_a)
    assert model.threshold is not None
    global_flags = float((g > model.threshold).mean())
    on_a = float(cal_a.flag(fresh_a, g).mean())
    on_b = float(cal_b.flag(fresh_a, g).mean())
    assert global_flags < 0.05  # the fleet model calls A's normal windows normal...
    assert on_a < 0.05  # ...and so does A's own calibration...
    assert on_b > 0.95  # ...but on B they are foreign.
    # The local part is what sees it: its standardized score is far out on B only.
    _, local_on_b = cal_b.components(fresh_a, g)
    _, local_on_a = cal_a.components(fresh_a, g)
    assert np.median(local_on_b) > 10 * max(1.0, np.median(np.abs(local_on_a)))


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_threshold_honours_the_false_alarm_rate_on_fresh_benign_windows(rate: float) -> None:
    """Averaged over devices so the check is tight: the threshold comes from out-of-fold
    scores with a conformal rank, so fresh benign windows are flagged at about ``rate``."""
    rates = []
    for seed in range(8):
        a, _, schema, model = two_devices(seed)
        cal = calibrate(a(400), schema, model, false_alarm_rate=rate)
        fresh = a(5000)
        rates.append(float(cal.flag(fresh, model.score(fresh)).mean()))
    n_fit = 400
    slack = 3.0 * math.sqrt(rate * (1 - rate) / n_fit / len(rates)) + 0.1 * rate
    assert abs(float(np.mean(rates)) - rate) < slack, rates
    assert all(r < 3 * rate for r in rates), rates  # and no single device is far off


def test_few_rows_still_give_the_configured_rate() -> None:
    """Why cross-fitting: with 60 rows for 16 features, in-sample Mahalanobis distances are
    much smaller than a fresh window's; a threshold taken from them flags about twice the
    configured rate (measured: 0.10 for 0.05). Out-of-fold scores do not."""
    rate, rates = 0.05, []
    for seed in range(12):
        a, _, schema, model = two_devices(seed)
        cal = calibrate(a(60), schema, model, false_alarm_rate=rate)
        fresh = a(4000)
        rates.append(float(cal.flag(fresh, model.score(fresh)).mean()))
    assert 0.5 * rate < float(np.mean(rates)) < 1.5 * rate, rates


def bursts(rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
    """Anomalies of A: two templates it barely logs fire in bulk (each row its own pair)."""
    rows = rows.copy()
    for row in rows:
        row[rng.choice(np.arange(8, 16), 2, replace=False)] += rng.integers(20, 60, 2)
    return rows


def test_a_few_anomalies_in_the_devices_history_do_not_hide_the_next_ones() -> None:
    """5% of the rows a device calibrates on are anomalies (its history is unlabeled):
    a plain 1% quantile lands among them and the device stops flagging them; the
    (opt-in) outlier fence keeps the threshold in the benign tail."""
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        a, _, schema, model = two_devices(seed)
        rows = np.concatenate([a(570), bursts(rng, a(30))])
        fenced = calibrate(rows, schema, model, outlier_fence=4.0)
        plain = calibrate(rows, schema, model)
        bad, fresh = bursts(rng, a(1000)), a(4000)
        g_bad, g_fresh = model.score(bad), model.score(fresh)
        assert fenced.flag(bad, g_bad).mean() > 0.95
        assert plain.flag(bad, g_bad).mean() < 0.5  # what the fence is there for
        assert fenced.flag(fresh, g_fresh).mean() < 0.03


def test_json_round_trip_is_exact_and_pickle_free(tmp_path: Path) -> None:
    a, _, schema, model = two_devices(seed=2)
    rows = a(300)
    settings = {"false_alarm_rate": 0.02, "global_weight": 0.3, "outlier_fence": 5.0}
    cal = calibrate(rows, schema, model, **settings)
    data = cal.to_json()
    (tmp_path / "calibration.json").write_bytes(data)
    back = DeviceCalibration.from_json((tmp_path / "calibration.json").read_bytes())
    assert back.to_dict() == cal.to_dict() == json.loads(data)
    assert back.config == cal.config and back.model_version == 3
    probe = a(50)
    g = model.score(probe)
    np.testing.assert_array_equal(back.score(probe, g), cal.score(probe, g))
    # deterministic: the same rows give the same bytes (a device can skip identical refits)
    assert calibrate(rows, schema, model, **settings).to_json() == data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="something-else/1"), "not a device calibration"),
        (lambda d: d.pop("threshold"), "missing \\['threshold'\\]"),
        (lambda d: d.update(extra=1), "unknown \\['extra'\\]"),
        (lambda d: d.update(local_mean=d["local_mean"][:-1]), "does not match"),
        (lambda d: d.update(local_scale=0.0), "positive"),
        (lambda d: d.update(threshold="high"), "malformed"),
        (lambda d: d["config"].update(false_alarm_rate=0.9), "false_alarm_rate"),
        (lambda d: d["config"].update(colour="red"), "unknown calibration settings"),
        (lambda d: d["config"].update(outlier_fence=-1.0), "outlier_fence"),
    ],
)
def test_bad_stored_calibration_is_refused_clearly(
    mutate: Callable[[dict], object], message: str
) -> None:
    a, _, schema, model = two_devices(seed=3)
    raw = calibrate(a(100), schema, model).to_dict()
    mutate(raw)
    with pytest.raises(CalibrationError, match=message):
        DeviceCalibration.from_dict(raw)


def test_insufficient_or_bad_input_gives_a_clear_error() -> None:
    a, _, schema, model = two_devices(seed=4)
    rows = a(100)
    g = model.score(rows)
    with pytest.raises(CalibrationError, match="at least 20 rows"):
        fit_calibration(rows[:19], g[:19], schema, model_digest="m")
    with pytest.raises(CalibrationError, match="expected 100 global scores"):
        fit_calibration(rows, g[:-1], schema, model_digest="m")
    bad = g.copy()
    bad[3] = np.nan
    with pytest.raises(CalibrationError, match="not finite"):
        fit_calibration(rows, bad, schema, model_digest="m")
    negative = rows.copy()
    negative[0, 0] = -1
    with pytest.raises(CalibrationError, match="non-negative"):
        fit_calibration(negative, g, schema, model_digest="m")
    with pytest.raises(CalibrationError, match="false_alarm_rate"):
        CalibrationConfig(false_alarm_rate=0.0)
    with pytest.raises(CalibrationError, match="min_rows"):
        CalibrationConfig(min_rows=5)
    cal = fit_calibration(rows, g, schema, model_digest="m")
    with pytest.raises(ValueError, match="feature columns"):
        cal.score(rows[:, :-1], g)
    # an overflowed global score (NaN) on a scored row counts as anomalous, not as normal
    assert cal.flag(rows[:2], np.array([np.nan, g[1]]))[0]


def test_dataset_names_the_owner_of_each_pooled_row(tmp_path: Path) -> None:
    """bench.quality scores a pooled row with its owner's calibration: the owners must be
    right (a pooled benign row passes its owner's threshold and is more normal for its
    owner than for any other device), optional, and checked on load."""
    from bench.make_dataset import load_dataset, make_dataset, save_dataset

    arrays = make_dataset(
        clients=4, windows_per_client=300, holdout_benign=400, holdout_anomalies=20, seed=3
    )
    data = load_dataset(save_dataset(arrays, tmp_path / "fleet.npz"))
    assert data.holdout_owner is not None
    assert data.holdout_owner.shape == data.holdout_y.shape
    assert set(data.holdout_owner.tolist()) == set(data.client_ids)
    fleet = np.concatenate([data.clients[c] for c in data.client_ids])
    schema = FeatureSchema.from_data(data.feature_names, fleet)
    model = create_model("gaussian", schema)
    model.fit_local(fleet, epochs=1, seed=0)
    cals = {c: calibrate(data.clients[c], schema, model) for c in data.client_ids}
    benign = data.holdout_y == 0
    x, owner = data.holdout_X[benign], data.holdout_owner[benign]
    g = model.score(x)
    for cid in data.client_ids:
        mine = owner == cid
        assert cals[cid].flag(x[mine], g[mine]).mean() < 0.05
        typical = {c: float(np.median(cal.score(x[mine], g[mine]))) for c, cal in cals.items()}
        assert min(typical, key=typical.__getitem__) == cid, typical  # most normal for its owner

    base = {"X_a": np.ones((3, 2)), "holdout_X": np.ones((2, 2)), "holdout_y": np.array([0, 1])}
    np.savez(tmp_path / "plain.npz", **base)
    assert load_dataset(tmp_path / "plain.npz").holdout_owner is None
    for owner_array, message in (
        (np.array(["a", "zz"]), "without X_"),
        (np.array(["a"]), "one client id"),
        (np.array([1, 2]), "one client id"),
    ):
        np.savez(tmp_path / "bad.npz", **base, holdout_owner=owner_array)
        with pytest.raises(ValueError, match=message):
            load_dataset(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- the device


def test_device_calibrates_keeps_it_local_and_scores_with_it(deployment, tmp_path, capsys):
    """The real cycle against SeaweedFS: calibrate after install, never upload it, show it
    in ``status``, score a file with ``fl-client score``, refit only when something changed."""
    from sklearn.metrics import roc_auc_score

    from client.agent import CALIBRATION_FILE, run_cycle, status
    from client.cli import main as client_main
    from fedlib.crypto import sealing
    from fedlib.models.model import onnx_score
    from fedlib.wire import protocol
    from tests.test_client import make_client

    data = deployment.dataset
    cid = data.client_ids[0]
    rows = data.clients[cid]
    config = make_client(deployment, tmp_path, "dev-cal", rows)
    config_path = str(tmp_path / "dev-cal" / "client.json")

    report = run_cycle(config)
    assert report.ok and report.trained and report.calibration_threshold is not None
    cal = DeviceCalibration.from_json((config.state_dir / CALIBRATION_FILE).read_bytes())
    assert cal.threshold == report.calibration_threshold
    assert (cal.model_version, cal.num_rows) == (1, rows.shape[0])
    assert any(m.startswith("calibrated version 1") for m in report.messages)

    # It never leaves the device: the inbox holds the update alone, and its plaintext
    # carries none of the calibration.
    (key,) = [i.key for i in deployment.inbox.list("updates/")]
    assert key == protocol.inbox_key("dev-cal", report.update_id)
    opened = sealing.open_update(
        deployment.inbox.get(key), deployment.load_fleet(), deployment.server_keyring()
    )
    for needle in (
        np.float64(cal.threshold).tobytes(),
        cal.local_mean.astype(np.float64).tobytes()[:16],
        cal.local_mean.astype(np.float32).tobytes()[:16],
        b"calibrat",
        b"threshold",
    ):
        assert needle not in opened.payload

    info = status(config)["calibration"]
    assert info["threshold"] == cal.threshold and info["current"] is True  # type: ignore[index]
    assert client_main(["status", "--config", config_path]) == 0
    assert f"threshold {cal.threshold:.4f}" in capsys.readouterr().out

    # Score the device's own holdout: its benign windows, its anomalies, and windows of
    # devices with other roles (normal for the fleet, foreign here).
    x, y = data.client_holdouts[cid]
    np.save(tmp_path / "windows.npy", x)
    assert client_main(["score", str(tmp_path / "windows.npy"), "--config", config_path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["personalized"] is True and out["rows"] == x.shape[0] == len(out["score"])
    assert out["threshold"] == cal.threshold and out["model_version"] == 1
    package = deployment.registry().read_active()
    g = onnx_score(package.onnx_bytes, x)[0]
    np.testing.assert_allclose(out["score"], cal.score(x, g), rtol=1e-12)
    np.testing.assert_allclose(out["global_score"], g, rtol=1e-12)
    flag = np.asarray(out["flag"])
    assert np.array_equal(flag, np.asarray(out["score"]) > cal.threshold)
    assert out["flagged"] == int(flag.sum())
    assert flag[y == 0].mean() <= 0.05  # its own normal windows mostly pass
    assert roc_auc_score(y, out["score"]) > roc_auc_score(y, out["global_score"])

    # Unchanged model and rows: no refit. A new feature file: refit on the new rows.
    again = run_cycle(config)
    assert again.calibration_threshold == cal.threshold
    assert not any(m.startswith("calibrated") for m in again.messages)
    np.save(config.features_dir / "part-001.npy", x[y == 0])
    grown = run_cycle(config)
    assert any(m.startswith("calibrated version 1") for m in grown.messages)
    refit = DeviceCalibration.from_json((config.state_dir / CALIBRATION_FILE).read_bytes())
    assert refit.num_rows == rows.shape[0] + int((y == 0).sum())

    # A calibration of another model is not applied: global scores only, and it says why.
    stale = refit.to_dict() | {"model_digest": "0" * 64, "model_version": 0}
    (config.state_dir / CALIBRATION_FILE).write_text(json.dumps(stale))
    assert client_main(["score", str(tmp_path / "windows.npy"), "--config", config_path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["personalized"] is False and "model version 0" in out["reason"]
    assert out["score"] == out["global_score"] and out["threshold"] is None
    assert run_cycle(config).calibration_threshold == refit.threshold  # the next run refits

    # Bad input gets a clear error, not a traceback.
    bad = x.copy()
    bad[0, 0] = -3
    np.save(tmp_path / "bad.npy", bad)
    assert client_main(["score", str(tmp_path / "bad.npy"), "--config", config_path]) == 2
    assert "non-negative" in capsys.readouterr().err


def test_device_with_personalization_off_or_too_few_rows(deployment, tmp_path):
    from client.agent import CALIBRATION_FILE, run_cycle, status
    from tests.test_client import make_client

    rows = deployment.dataset.clients[deployment.dataset.client_ids[1]]
    off = make_client(deployment, tmp_path, "dev-off", rows, personalization={"enabled": False})
    report = run_cycle(off)
    assert report.ok and report.trained and report.calibration_threshold is None
    assert not (off.state_dir / CALIBRATION_FILE).exists()
    assert status(off)["calibration"] is None

    few = make_client(deployment, tmp_path, "dev-few", rows[:12])
    report = run_cycle(few)
    assert report.ok and report.trained  # training still goes on (min_rows 10)
    assert report.calibration_threshold is None
    assert any("not calibrating" in m and "at least 20 rows" in m for m in report.messages)

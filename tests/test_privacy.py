"""Differential privacy: accounting against dp_accounting, reproducible server noise,
adaptive clipping, device-side clipping/noise, and real DP rounds over S3 (metadata and
report carry the cumulative epsilon; the budget refuses publishing and loses nothing)."""

from __future__ import annotations

import hashlib
import hmac
import math

import dp_accounting
import numpy as np
import pytest
from pydantic import ValidationError

from fedlib.crypto import sealing
from fedlib.server import privacy, state_keys
from fedlib.server.aggregation import AggregationConfig, dp_project
from fedlib.server.ledger import Ledger
from fedlib.server.privacy import Accountant, PrivacyConfig, calibrate_noise
from fedlib.server.settings import ServerSettings
from fedlib.wire import compression, protocol

DELTA = 1e-5


def reference_epsilon(rounds: list[tuple[tuple[float, ...], int]], delta: float, kind: str):
    """The same composition, built directly with dp_accounting."""
    acc = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    for multipliers, count in rounds:
        events = [dp_accounting.GaussianDpEvent(m) for m in multipliers]
        event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return acc.get_epsilon(delta)


# -- accounting ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize(("z", "rounds"), [(0.9, 1), (1.5, 10), (4.0, 100)])
def test_accountant_agrees_with_dp_accounting(kind, z, rounds):
    ours = Accountant(kind).add((z,), rounds).epsilon(DELTA)
    assert ours == pytest.approx(reference_epsilon([((z,), rounds)], DELTA, kind), rel=1e-9)
    # the Gaussian mechanism's single-round epsilon from the library's own closed form
    if rounds == 1 and kind == "pld":
        exact = dp_accounting.get_epsilon_gaussian(z, DELTA)
        assert ours == pytest.approx(exact, rel=2e-2)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_delta():
    by_rounds = [Accountant().add((2.0,), k).epsilon(DELTA) for k in (1, 2, 5, 20, 100)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds)
    by_noise = [Accountant().add((z,), 10).epsilon(DELTA) for z in (0.8, 1.0, 2.0, 8.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    by_delta = [Accountant().add((2.0,), 10).epsilon(d) for d in (1e-9, 1e-6, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True)
    assert Accountant().epsilon(DELTA) == 0.0


def test_composition_one_round_at_a_time_and_mixed_rounds():
    one_by_one = Accountant()
    for _ in range(7):
        one_by_one.add((1.3,))
    assert one_by_one.rounds == 7
    assert one_by_one.epsilon(DELTA) == pytest.approx(Accountant().add((1.3,), 7).epsilon(DELTA))
    mixed = Accountant().add((1.3,), 4).add((2.5, 9.0), 3)
    expected = reference_epsilon([((1.3,), 4), ((2.5, 9.0), 3)], DELTA, "rdp")
    assert mixed.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    # RDP composition is additive: the mix costs less than its worst part done 7 times
    assert mixed.epsilon(DELTA) < Accountant().add((1.3,), 7).epsilon(DELTA)


def test_adaptive_split_costs_what_the_total_noise_multiplier_says():
    """Andrew et al.'s adjustment: the sum's Gaussian (z_sum) and the bit query's
    (2 sigma_b) together are one Gaussian of multiplier z in RDP."""
    config = PrivacyConfig(
        mode="central", noise_multiplier=1.2, adaptive_clipping=True, clipped_count_stddev=5.0
    )
    z_sum, z_bits = config.round_multipliers()
    assert z_bits == 10.0 and z_sum > 1.2
    assert z_sum**-2 + z_bits**-2 == pytest.approx(1.2**-2)
    split = Accountant().add((z_sum, z_bits), 50).epsilon(DELTA)
    assert split == pytest.approx(Accountant().add((1.2,), 50).epsilon(DELTA), rel=1e-6)
    fixed = PrivacyConfig(mode="central", noise_multiplier=1.2)
    assert fixed.round_multipliers() == (1.2,)


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("rounds", [1, 20, 100])
def test_calibrate_noise_round_trips(target, rounds):
    z = calibrate_noise(target, DELTA, rounds)
    spent = Accountant().add((z,), rounds).epsilon(DELTA)
    assert spent <= target and spent >= target * 0.995
    assert Accountant().add((z * 0.98,), rounds).epsilon(DELTA) > target  # minimal noise


def test_calibrated_noise_orders():
    assert calibrate_noise(3.0, DELTA, 10) < calibrate_noise(3.0, DELTA, 100)
    assert calibrate_noise(8.0, DELTA, 100) < calibrate_noise(1.0, DELTA, 100)
    assert calibrate_noise(3.0, 1e-3, 100) < calibrate_noise(3.0, 1e-7, 100)


def test_local_mode_charges_a_device_the_replace_one_gaussian():
    """Replace-one: sensitivity 2C, so noise z*C is a Gaussian of multiplier z/2; the
    calibrated z spends the target over the planned rounds."""
    config = PrivacyConfig(mode="local", target_epsilon=4.0, rounds=30, budget_epsilon=4.0)
    (half,) = config.round_multipliers()
    assert half == pytest.approx(config.total_noise_multiplier / 2)
    assert Accountant().add((half,), 30).epsilon(DELTA) <= 4.0
    cap = config.max_device_updates()
    assert cap == 30 or (cap > 30 and Accountant().add((half,), cap).epsilon(DELTA) <= 4.0)
    assert Accountant().add((half,), cap + 1).epsilon(DELTA) > 4.0


def test_max_rounds_within_is_the_largest_that_fits():
    k = privacy.max_rounds_within((3.0,), 2.0, DELTA)
    assert Accountant().add((3.0,), k).epsilon(DELTA) <= 2.0
    assert Accountant().add((3.0,), k + 1).epsilon(DELTA) > 2.0


# -- noise ------------------------------------------------------------------------------------


def test_noise_is_reproducible_from_secret_and_run_id_and_nothing_else(tmp_path):
    secret = privacy.load_noise_secret(tmp_path / "keys")
    assert len(secret) == 32 and privacy.load_noise_secret(tmp_path / "keys") == secret
    assert (tmp_path / "keys" / privacy.NOISE_SECRET_FILE).stat().st_mode & 0o777 == 0o600
    draw = privacy.noise_rng(secret, "scheduled__2026-01-01").normal(size=1000)
    again = privacy.noise_rng(secret, "scheduled__2026-01-01").normal(size=1000)
    other_run = privacy.noise_rng(secret, "scheduled__2026-01-02").normal(size=1000)
    other_secret = privacy.noise_rng(bytes(32), "scheduled__2026-01-01").normal(size=1000)
    assert np.array_equal(draw, again)
    assert not np.allclose(draw, other_run) and not np.allclose(draw, other_secret)
    assert abs(np.corrcoef(draw, other_run)[0, 1]) < 0.15
    # the seed is HMAC-SHA256 keyed by the secret, with a domain label before the run id
    seed = privacy.noise_seed(secret, "r")
    assert seed == hmac.new(secret, b"dadm-fl/dp-noise/v1\x00r", hashlib.sha256).digest()
    with pytest.raises(FileNotFoundError):
        privacy.load_noise_secret(tmp_path / "elsewhere", create=False)


def test_init_secret_through_fl_admin(tmp_path, capsys, monkeypatch):
    """The read-only secrets mount case: the secret is made once, then only kept."""
    from fedlib.ops.admin import main as admin_main

    keys = tmp_path / "keys"
    assert admin_main(["privacy", "init-secret", str(keys)]) == 0
    path = keys / privacy.NOISE_SECRET_FILE
    assert capsys.readouterr().out.strip() == f"{path}: created"
    secret = path.read_bytes()
    assert len(secret) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert admin_main(["privacy", "init-secret", str(keys)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: kept" and path.read_bytes() == secret
    # without DIR: the deployment's keys_dir
    config = tmp_path / "fl-server.toml"
    config.write_text(f'keys_dir = "{tmp_path / "other"}"\n')
    monkeypatch.delenv("FL_KEYS_DIR", raising=False)
    assert admin_main(["--config", str(config), "privacy", "init-secret"]) == 0
    assert (tmp_path / "other" / privacy.NOISE_SECRET_FILE).stat().st_size == 32


def test_central_release_adds_noise_of_the_calibrated_scale_once():
    config = PrivacyConfig(mode="central", noise_multiplier=2.0)
    mean = np.linspace(-0.1, 0.1, 200_000)
    release = privacy.release_round(config, mean, 8, 0.5, (0, 0), np.random.default_rng(1))
    noise_on_sum = (release.noisy_mean - mean) * 8
    assert np.std(noise_on_sum) == pytest.approx(2.0 * 0.5, rel=0.01)
    assert abs(np.mean(noise_on_sum)) < 0.01
    assert release.next_clip_norm == 0.5  # fixed clipping
    local = PrivacyConfig(mode="local", noise_multiplier=2.0)
    assert np.array_equal(privacy.release_round(local, mean, 8, 0.5, (0, 0), None).noisy_mean, mean)


def test_server_projection_enforces_the_clip_norm():
    config = AggregationConfig(dp_mode="central", dp_clip=1.0)
    big = compression.DecodedDelta(4, np.arange(4), np.array([3.0, 4.0, 0.0, 0.0]))
    small = compression.DecodedDelta(4, None, np.array([0.3, 0.4, 0.0, 0.0]))
    assert np.linalg.norm(dp_project(big, config).values) <= 1.0
    assert np.allclose(dp_project(big, config).values, [0.6, 0.8, 0, 0], atol=1e-6)
    assert dp_project(small, config) is small
    with pytest.raises(ValueError):
        AggregationConfig(dp_mode="central", dp_clip=20.0)  # above the hard norm bound


# -- adaptive clipping ------------------------------------------------------------------------


@pytest.mark.parametrize(("quantile", "start"), [(0.5, 0.05), (0.5, 20.0), (0.8, 1.0)])
def test_adaptive_clip_moves_to_the_target_quantile_of_the_norms(quantile, start):
    rng = np.random.default_rng(3)
    config = PrivacyConfig(
        mode="central",
        noise_multiplier=1.0,
        adaptive_clipping=True,
        target_quantile=quantile,
        expected_clients=500,
    )
    clip = start
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=500)  # median 1
        unclipped = int(np.sum(norms <= clip))
        fraction = privacy.noisy_unclipped_fraction(unclipped, 500, config.count_stddev, rng)
        clip = privacy.next_clip_norm(
            clip,
            fraction,
            target_quantile=quantile,
            learning_rate=config.clip_learning_rate,
        )
    truth = float(np.exp(0.5 * _normal_quantile(quantile)))
    assert clip == pytest.approx(truth, rel=0.1)
    assert privacy.next_clip_norm(2.0, None, target_quantile=0.5, learning_rate=0.2) == 2.0


def _normal_quantile(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


# -- settings ---------------------------------------------------------------------------------


def test_settings_validate_the_dp_options():
    assert ServerSettings().privacy().enabled is False
    ok = ServerSettings(
        dp_mode="central", dp_target_epsilon=3.0, dp_rounds=50, model_kind="autoencoder"
    )
    assert ok.privacy().total_noise_multiplier == pytest.approx(calibrate_noise(3.0, DELTA, 50))
    training = ok.training("autoencoder")
    assert training.dp is not None and training.dp.mode == "central"
    assert training.clip_norm == ok.dp_clip_norm
    for bad in (
        {"dp_mode": "central"},  # no noise
        {"dp_mode": "central", "dp_target_epsilon": 3.0, "dp_noise_multiplier": 1.0},
        {"dp_mode": "central", "dp_noise_multiplier": 1.0, "robust_aggregation": "fltrust"},
        {"dp_mode": "local", "dp_noise_multiplier": 1.0, "model_kind": "gaussian"},
        {  # the bit query's noise would need more than the whole round's budget
            "dp_mode": "central",
            "dp_noise_multiplier": 4.0,
            "dp_adaptive_clipping": True,
            "dp_clipped_count_stddev": 1.0,
        },
        {"dp_mode": "central", "dp_noise_multiplier": 1.0, "dp_delta": 1.0},
    ):
        with pytest.raises(ValidationError):
            ServerSettings(**{"model_kind": "autoencoder", **bad})
    with pytest.raises(ValidationError, match="iterative"):  # an exact kind
        ServerSettings(dp_mode="central", dp_noise_multiplier=1.0, model_kind="gmm")


# -- the device ---------------------------------------------------------------------------------


def _device_update(package, delta, **kwargs):
    from client.update import seal_delta

    server = sealing.generate_encryption_key()
    ring = sealing.ServerKeyring()
    ring.add(server)
    key = sealing.generate_signing_key()
    from fedlib.server.fleet import Fleet

    fleet = Fleet()
    fleet.enroll("dev-1", sealing.public_pem(key))
    update = seal_delta(
        package,
        delta,
        50,
        client_id="dev-1",
        client_key=key,
        server_public_key=server.public_key(),
        residual=None,
        **kwargs,
    )
    opened = sealing.open_update(update.envelope, fleet, ring)
    meta, blob = protocol.decode_payload(opened.payload)
    return meta, compression.decode(blob, expected_dim=delta.size).to_dense()


def _package_with(training):
    from fedlib.models.model import FeatureSchema, create_model
    from fedlib.server.rounds import package_model

    schema = FeatureSchema.from_data(["a", "b", "c"], np.ones((4, 3)), "log1p")
    return package_model(create_model("autoencoder", schema, seed=0), version=1, training=training)


def test_device_reports_the_clipping_bit_in_central_mode_and_noises_in_local_mode():
    central = ServerSettings(
        dp_mode="central",
        dp_noise_multiplier=0.5,
        dp_adaptive_clipping=True,
        dp_clip_norm=1.0,
        compression="dense32",
        model_kind="autoencoder",
    ).training("autoencoder")
    package = _package_with(central)
    dim = package.metadata.num_params
    direction = np.ones(dim) / math.sqrt(dim)
    meta, sent = _device_update(package, 3.0 * direction)
    assert meta.metrics[protocol.UNCLIPPED_METRIC] == 0.0 and meta.num_samples == 50
    assert np.linalg.norm(sent) <= 1.0
    meta, _ = _device_update(package, 0.5 * direction)
    assert meta.metrics[protocol.UNCLIPPED_METRIC] == 1.0

    local = ServerSettings(
        dp_mode="local",
        dp_noise_multiplier=2.0,
        dp_clip_norm=1.0,
        compression="dense32",
        model_kind="autoencoder",
    ).training("autoencoder")
    package = _package_with(local)
    meta, sent = _device_update(package, 0.5 * direction, noise_rng=np.random.default_rng(0))
    assert meta.metrics == {} and meta.num_samples == 1  # no norm, no row count
    noise = sent - 0.5 * direction
    assert np.std(noise) == pytest.approx(2.0, rel=0.1)
    off = _package_with(ServerSettings(compression="dense32").training("autoencoder"))
    assert b'"dp"' not in off.metadata.to_json() and b'"privacy"' not in off.metadata.to_json()


# -- real rounds over S3 --------------------------------------------------------------------------


def _dp_deployment(s3_config, tmp_path, small_dataset, **settings):
    from tests.helpers import build_deployment

    base = {
        "model_kind": "autoencoder",  # DP is for the iterative kind
        "dp_mode": "central",
        "dp_noise_multiplier": 1.0,
        "dp_clip_norm": 1.0,
        "dp_adaptive_clipping": True,
        "dp_expected_clients": 4,
        "auc_tolerance": 1.0,  # the gate publishes whatever the noise did to the AUC
        "auc_floor": 0.0,
    }
    return build_deployment(s3_config, tmp_path / "keys", small_dataset, **{**base, **settings})


def _upload(deployment, indices, *, seed=0):
    from tests.test_round_runner import upload_updates

    sent = {}
    for i in indices:
        sent.update(upload_updates(deployment, 1, seed=seed + i, start=i))
    return sent


def test_dp_rounds_record_cumulative_epsilon_in_metadata_and_report(
    s3_config, tmp_path, small_dataset
):
    from fedlib.ops import dashboard
    from fedlib.server.pipeline import run_round

    dep = _dp_deployment(s3_config, tmp_path, small_dataset)
    v1 = dep.registry().read_active().metadata
    assert v1.training.dp is not None and v1.training.dp.report_unclipped
    assert v1.training.clip_norm == 1.0
    multipliers = dep.settings.privacy().round_multipliers()

    _upload(dep, range(4))
    first = run_round(dep, "dp-1")
    assert first.decision == "published", first.message
    meta = dep.registry().read_version(first.published_version).metadata
    one_round = Accountant().add(multipliers, 1).epsilon(DELTA)
    assert meta.privacy is not None and meta.privacy.rounds == 1
    assert meta.privacy.epsilon == pytest.approx(one_round)
    assert meta.privacy.delta == DELTA and meta.privacy.clip_norm == 1.0
    assert first.privacy.epsilon == pytest.approx(one_round)
    assert "privacy (central DP): epsilon" in first.summary()
    # adaptive clipping: the next C travels to the devices in the signed package
    assert meta.training.clip_norm != 1.0 and meta.training.dp.mode == "central"
    assert first.privacy.next_clip_norm == meta.training.clip_norm

    _upload(dep, range(4), seed=10)
    second = run_round(dep, "dp-2")
    assert second.decision == "published", second.message
    meta2 = dep.registry().read_version(second.published_version).metadata
    two_rounds = Accountant().add(multipliers, 2).epsilon(DELTA)
    assert meta2.privacy.rounds == 2 and meta2.privacy.epsilon == pytest.approx(two_rounds)
    assert meta2.privacy.clip_norm == meta.training.clip_norm  # the round used v2's C

    rows = {r.run_id: r for r in dashboard.rounds(dep).items}
    assert rows["dp-2"].privacy_epsilon == pytest.approx(two_rounds)
    assert rows["dp-2"].privacy_delta == DELTA
    versions = {v.version: v for v in dashboard.version_rows(dep)}
    assert versions[second.published_version].privacy_epsilon == pytest.approx(two_rounds)
    from fedlib.integrations.airflow.dashboard_app import rounds_table

    class _Links:
        def __getattr__(self, name):
            return lambda *args: "#"

    html = rounds_table(_Links(), [rows["dp-2"]])
    assert "Privacy ε (δ)" in html and f"{two_rounds:.3g} (1e-05)" in html


def test_budget_stops_publishing_without_losing_updates(s3_config, tmp_path, small_dataset):
    from fedlib.server.pipeline import run_round
    from fedlib.server.round_runner import load_verdicts
    from fedlib.server.state_keys import PRIVACY_SPENT as PRIVACY_SPENT_PREFIX

    multipliers = (1.0,)
    one, two = (Accountant().add(multipliers, k).epsilon(DELTA) for k in (1, 2))
    dep = _dp_deployment(
        s3_config,
        tmp_path,
        small_dataset,
        dp_adaptive_clipping=False,
        dp_budget_epsilon=(one + two) / 2,  # room for one round, not two
    )
    _upload(dep, range(3))
    first = run_round(dep, "b-1")
    assert first.decision == "published" and first.privacy.epsilon == pytest.approx(one)

    sent = _upload(dep, range(3), seed=20)
    second = run_round(dep, "b-2")
    assert second.decision == "privacy_budget"
    assert "privacy budget" in second.message and "nothing computed or published" in second.message
    assert second.privacy.refused and second.published_version is None
    assert "REFUSED" in second.summary()
    assert dep.registry().active_version() == first.published_version
    # nothing lost: every update has exactly one verdict (accepted), none is left behind
    verdicts = load_verdicts(dep, "b-2")
    assert sorted(v.key for v in verdicts) == sorted(sent) and all(v.accepted for v in verdicts)
    ledger = Ledger(dep.state)
    assert all(ledger.read(k).run_id == "b-2" for k in sent)
    assert list(dep.inbox.list("updates/")) == []
    # the refused round computed nothing and was not charged
    assert [i.key for i in dep.state.list("rounds/b-2/candidate/")] == []
    charged = [i.key for i in dep.state.list(PRIVACY_SPENT_PREFIX)]
    assert len(charged) == 1 and charged[0].endswith("/b-1.json")


def test_a_device_counts_once_per_round_and_a_replay_reproduces_the_noise(
    s3_config, tmp_path, small_dataset
):
    from fedlib.server import round_runner as rr

    dep = _dp_deployment(s3_config, tmp_path, small_dataset)
    _upload(dep, range(3))
    extra = _upload(dep, [0], seed=99)  # device 0 sends a second update
    (extra_key,) = extra

    def run(run_id):
        plan = rr.plan_round(dep, run_id, interval_key="i-1", interval_end_ms=2**62)
        for index in range(plan.shard_count):
            rr.process_shard(dep, run_id, index)
        rr.reduce_round(dep, run_id)
        rr.build_round_candidate(dep, run_id)
        evaluation = rr.evaluate_round(dep, run_id)
        return plan, evaluation

    plan, _ = run("r-1")
    assert plan.updates == 4 and plan.client_count == 3
    verdicts = rr.load_verdicts(dep, "r-1")  # one vote per device: the newest is kept
    assert sum(v.accepted for v in verdicts) == 3
    assert [v.reason for v in verdicts if not v.accepted] == ["superseded"]
    report = rr.finalize_round(dep, "r-1", decision="rejected")
    assert report.accepted == 3 and report.rejected == {"superseded": 1}
    assert list(dep.inbox.list("updates/")) == []
    assert Ledger(dep.state).read(extra_key) is not None

    replay_plan, evaluation = run("r-replay")
    assert replay_plan.replay_of == "r-1"
    assert evaluation.replay is not None and evaluation.replay.matches, evaluation.replay
    assert evaluation.replay.candidate_digest == report.candidate_digest
    assert len(list(dep.state.list(state_keys.PRIVACY_SPENT))) == 1  # a replay is not charged


def test_local_mode_round_takes_noised_updates_and_charges_each_device(
    s3_config, tmp_path, small_dataset
):
    from fedlib.server.pipeline import run_round
    from fedlib.server.round_runner import load_verdicts

    dep = _dp_deployment(
        s3_config,
        tmp_path,
        small_dataset,
        dp_mode="local",
        dp_noise_multiplier=0.5,
        dp_adaptive_clipping=False,
        dp_budget_epsilon=1000.0,
    )
    v1 = dep.registry().read_active().metadata
    assert v1.training.dp.mode == "local" and v1.training.dp.noise_multiplier == 0.5
    assert v1.training.dp.max_updates == dep.settings.privacy().max_device_updates() > 1
    _upload(dep, range(3))
    report = run_round(dep, "local-1")
    assert report.decision == "published", report.message
    verdicts = load_verdicts(dep, "local-1")
    assert all(v.accepted and v.num_samples == 1 for v in verdicts)  # no row counts sent
    # noised updates are far above C and still admitted (the widened hard bound)
    assert all(v.norm > 1.0 for v in verdicts)
    meta = dep.registry().read_version(report.published_version).metadata
    assert meta.privacy.mode == "local"
    assert meta.privacy.epsilon == pytest.approx(Accountant().add((0.25,), 1).epsilon(DELTA))


def test_a_local_dp_device_stops_at_its_own_budget(s3_config, tmp_path, small_dataset):
    from client.agent import run_cycle
    from tests.test_client import make_client

    one, two = (Accountant().add((0.25,), k).epsilon(DELTA) for k in (1, 2))
    dep = _dp_deployment(
        s3_config,
        tmp_path,
        small_dataset,
        dp_mode="local",
        dp_noise_multiplier=0.5,
        dp_adaptive_clipping=False,
        dp_budget_epsilon=(one + two) / 2,
    )
    assert dep.registry().read_active().metadata.training.dp.max_updates == 1
    rows = dep.dataset.clients[dep.dataset.client_ids[0]]
    config = make_client(dep, tmp_path, "dev-dp", rows, one_update_per_version=False)
    first = run_cycle(config)
    assert first.trained and len(first.uploaded) == 1
    second = run_cycle(config)  # the same version again: only the DP budget stops it
    assert not second.trained and second.uploaded == []
    assert any("local DP budget spent (1 updates)" in m for m in second.messages)
    assert len(list(dep.inbox.list("updates/"))) == 1

"""One device, one bounded vote, over real S3 and real crypto: a device flooding a round
or claiming absurd sample counts gets at most its capped share, and the report, its
summary and the rounds page show every device's accepted count and share."""

from __future__ import annotations

import time

import numpy as np
import pytest

from client.update import make_update, seal_delta
from fedlib.models.training import local_delta
from fedlib.server import round_runner as rr
from fedlib.server.pipeline import run_round
from fedlib.server.records import Decision, RoundReport
from fedlib.server.state_keys import RunKeys
from fedlib.server.strategy import aggregator_from_bytes
from fedlib.wire import protocol
from tests.helpers import build_deployment
from tests.test_round_runner import enroll

ATTACK_UPDATES = 40


def _honest(deployment, count: int) -> None:
    package = deployment.registry().read_active()
    server_public = deployment.current_server_public_key()
    data = deployment.dataset
    for i, cid in enumerate(data.client_ids[:count]):
        update = make_update(
            package,
            data.clients[cid],
            client_id=cid,
            client_key=enroll(deployment, cid),
            server_public_key=server_public,
            residual=None,
            seed=i,
        )
        deployment.inbox.put(protocol.inbox_key(cid, update.update_id), update.envelope)


def _attacker(deployment, delta: np.ndarray, *, updates: int, num_samples: int) -> None:
    """``updates`` valid, signed updates from one enrolled device, each carrying ``delta``."""
    package = deployment.registry().read_active()
    server_public = deployment.current_server_public_key()
    key = enroll(deployment, "mallory")
    for _ in range(updates):
        update = seal_delta(
            package,
            delta,
            num_samples,
            client_id="mallory",
            client_key=key,
            server_public_key=server_public,
            residual=None,
        )
        deployment.inbox.put(protocol.inbox_key("mallory", update.update_id), update.envelope)


def _reduced(deployment, run_id: str, **plan_args) -> np.ndarray:
    """Plan, every shard and reduce; the round's mean delta."""
    plan = rr.plan_round(deployment, run_id, **plan_args)
    for index in range(plan.shard_count):
        rr.process_shard(deployment, run_id, index)
    started = time.perf_counter()
    rr.reduce_round(deployment, run_id)
    print(f"MEASURED reduce of {run_id}: {time.perf_counter() - started:.3f} s")
    base = deployment.registry().read_version(plan.base_version)
    data = deployment.state.get(RunKeys(run_id).aggregate)
    return aggregator_from_bytes(data, rr.aggregation_of(deployment, base)).mean_delta()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _flood(s3_config, tmp_path, small_dataset, name: str, **settings):
    dep = build_deployment(s3_config, tmp_path / name, small_dataset, **settings)
    dim = dep.registry().read_active().metadata.num_params
    direction = np.random.default_rng(16).normal(size=dim)
    direction /= np.linalg.norm(direction)
    _honest(dep, 5)
    _attacker(dep, 0.9 * direction, updates=ATTACK_UPDATES, num_samples=200)
    return dep, direction


def _accepted_from(deployment, run_id: str, client_id: str) -> int:
    return sum(
        v.accepted and v.client_id == client_id for v in rr.load_verdicts(deployment, run_id)
    )


def test_forty_updates_from_one_device_get_at_most_the_capped_share(
    s3_config, tmp_path, small_dataset
):
    """40 valid updates along one direction from one device, 5 honest devices: without
    the cap the attacker holds almost all the weight and the aggregate points along its
    direction; with it (default 0.25) its share is at most the cap.

    Written to hold with or without the plan keeping one accepted update per device
    (issue 16, item 3, the other half): shares are summed per device either way, and
    the "before" figures are checked only when the flood was accepted."""
    before, direction = _flood(
        s3_config,
        tmp_path,
        small_dataset,
        "before",
        max_device_weight_share=1.0,
        count_cap_factor=0.0,
    )
    mean_before = _reduced(before, "r-before")
    weights_before = rr.load_round_weights(before, "r-before")
    share_before = {d.client_id: d.weight_share for d in weights_before.devices}
    flooded = _accepted_from(before, "r-before", "mallory") > 1

    after, _ = _flood(s3_config, tmp_path, small_dataset, "after")
    assert after.settings.max_device_weight_share == 0.25  # the default
    mean_after = _reduced(after, "r-after")
    weights_after = rr.load_round_weights(after, "r-after")
    shares = {d.client_id: d for d in weights_after.devices}
    mallory = _accepted_from(after, "r-after", "mallory")
    assert shares["mallory"].accepted == mallory >= 1
    assert shares["mallory"].weight_share <= 0.25
    assert weights_after.reweighted <= mallory  # only the attacker's updates re-read
    assert not any(d.capped or d.clipped for cid, d in shares.items() if cid != "mallory")
    assert sum(d.weight_share for d in weights_after.devices) == pytest.approx(1.0)

    cos_before, cos_after = _cosine(mean_before, direction), _cosine(mean_after, direction)
    decision_before = run_round(before, "r-before-full").decision.value
    print(
        f"MEASURED flood ({mallory} of {ATTACK_UPDATES} accepted): attacker share "
        f"{share_before['mallory']:.4f} -> {shares['mallory'].weight_share:.4f}; cosine "
        f"with the attack direction {cos_before:.4f} -> {cos_after:.4f}; decision "
        f"without the cap: {decision_before}"
    )
    if flooded:
        assert share_before["mallory"] > 0.85 and shares["mallory"].capped
        assert weights_after.reweighted == mallory
        assert cos_after < cos_before
    assert cos_after < 0.5

    # the rest of the round: the report, its summary, the dashboard's rows
    report = run_round(after, "r-after-full")  # a fresh run over the same inbox
    print(f"MEASURED flood decision with the cap: {report.decision.value}")
    devices = {d.client_id: d for d in report.devices}
    assert report.accepted == sum(d.accepted for d in devices.values())
    assert devices["mallory"].accepted == _accepted_from(after, "r-after-full", "mallory")
    largest = max(devices.values(), key=lambda d: (d.weight_share, d.client_id))
    assert report.largest_share_client == largest.client_id
    assert report.largest_weight_share == largest.weight_share <= 0.25
    line = f"largest weight share {largest.weight_share:.1%} ({largest.client_id})"
    assert line in report.summary()

    from fedlib.integrations.airflow.dashboard_app import devices_table, rounds_table
    from fedlib.ops import dashboard

    row = dashboard.round_detail(after, "r-after-full")
    assert row.largest_share_client == largest.client_id and len(row.devices) == 6
    api = {d["client_id"]: d for d in dashboard.to_jsonable(row)["devices"]}  # /api/rounds/<run>
    assert api["mallory"]["accepted"] == devices["mallory"].accepted
    assert api["mallory"]["weight_share"] == devices["mallory"].weight_share
    html = devices_table(row.devices)
    for d in row.devices:
        assert d.accepted == devices[d.client_id].accepted
        assert d.weight_share == devices[d.client_id].weight_share
        assert (
            f'data-client-id="{d.client_id}"><td>{d.client_id}</td>'
            f'<td class="num">{d.accepted}</td><td class="num share">{d.weight_share:.1%}</td>'
        ) in html

    class _Links:
        def round(self, run_id):
            return f"/rounds/{run_id}"

        def quarantine(self, run_id):
            return f"/rounds/{run_id}/quarantine"

        def run_ui(self, run_id):
            return f"/runs/{run_id}"

    table = rounds_table(_Links(), [row])
    shown = f"{largest.weight_share:.1%}<br><code>{largest.client_id}</code>"
    assert "Largest device share" in table and shown in table

    from fedlib.ops.admin import status_document

    [recent] = status_document(after)["recent_rounds"]
    assert recent["largest_share_client"] == largest.client_id
    assert recent["largest_weight_share"] == largest.weight_share


def test_a_gaussian_update_claiming_2_to_the_40_rows_is_clipped(s3_config, tmp_path, small_dataset):
    """The Gaussian kind weighs by rows: a claim of 2**40 rows took the 65,536 cap, 99% of
    the weight. Now it is clipped to 4x the round's median count and its share capped."""
    results = {}
    for name, settings in (
        ("before", {"max_device_weight_share": 1.0, "count_cap_factor": 0.0}),
        ("after", {}),
    ):
        dep = build_deployment(
            s3_config, tmp_path / name, small_dataset, model_kind="gaussian", **settings
        )
        _honest(dep, 5)
        package = dep.registry().read_active()
        rows = dep.dataset.clients[dep.dataset.client_ids[5]]
        delta, _ = local_delta(package, rows, seed=5)
        _attacker(dep, delta, updates=1, num_samples=2**40)
        report = run_round(dep, f"g-{name}")
        weights = rr.load_round_weights(dep, f"g-{name}")
        results[name] = (report, weights)
    before = {d.client_id: d for d in results["before"][1].devices}
    report, weights = results["after"]
    after = {d.client_id: d for d in weights.devices}
    print(
        f"MEASURED gaussian 2**40 claim: share {before['mallory'].weight_share:.4f} -> "
        f"{after['mallory'].weight_share:.4f}, count cap {weights.count_cap}; decisions "
        f"{results['before'][0].decision.value} -> {report.decision.value}"
    )
    assert before["mallory"].weight_share > 0.95 and not before["mallory"].clipped
    assert after["mallory"].clipped and after["mallory"].weight_share <= 0.25
    assert weights.count_cap is not None and weights.count_cap < 2**16
    assert report.devices and report.largest_weight_share <= 0.25


def test_a_reweighted_round_replays_to_the_same_bytes(s3_config, tmp_path, small_dataset):
    """The reduce step's correction re-reads the archived bytes: re-running the interval
    recomputes the identical aggregate and candidate (what backfills compare)."""
    # a share of 0.1 with 6 devices: equal weights, so updates are reweighted whether
    # or not the plan keeps one update per device
    dep, _ = _flood(s3_config, tmp_path, small_dataset, "replay", max_device_weight_share=0.1)
    far = 2**62
    _reduced(dep, "i-1", interval_key="2026-12-05", interval_end_ms=far)
    weights = rr.load_round_weights(dep, "i-1")
    assert weights.equal_weights and weights.reweighted >= 1
    rr.build_round_candidate(dep, "i-1")
    rr.evaluate_round(dep, "i-1")
    rr.finalize_round(dep, "i-1", decision=Decision.REJECTED)
    replay = rr.plan_round(dep, "i-2", interval_key="2026-12-05")
    assert replay.replay_of == "i-1"
    _reduced(dep, "i-2", interval_key="2026-12-05")
    first = dep.state.get(RunKeys("i-1").aggregate)
    assert dep.state.get(RunKeys("i-2").aggregate) == first
    assert rr.load_round_weights(dep, "i-2") == rr.load_round_weights(dep, "i-1")
    rr.build_round_candidate(dep, "i-2")
    assert rr.evaluate_round(dep, "i-2").replay.matches


def test_reports_before_device_shares_still_read_and_render():
    from pathlib import Path

    from fedlib.integrations.airflow.dashboard_app import devices_table, fmt_share

    path = Path(__file__).parent / "fixtures/state-v0/dp/reports/run-dp.json"
    report = RoundReport.from_json(path.read_bytes())
    assert report.devices is None and report.largest_weight_share is None
    assert "largest weight share" not in report.summary()

    class Row:
        largest_weight_share = None
        largest_share_client = None

    assert fmt_share(Row()) == "—"
    assert "no per-device weights recorded" in devices_table(())


@pytest.mark.parametrize("mode", ["fltrust", "trimmed_mean"])
def test_reduce_equals_summing_with_the_final_weights(s3_config, tmp_path, small_dataset, mode):
    """Under FLTrust (trust-scaled, capped deltas) and the trimmed mean (rows), the
    corrected aggregate is byte for byte the one made by adding every archived update
    with its final weight from the start."""
    from fedlib.server.aggregation import final_weights
    from fedlib.server.rounds import open_and_validate, summed_delta
    from fedlib.server.strategy import new_aggregator

    dep = build_deployment(
        s3_config, tmp_path / mode, small_dataset, robust_aggregation=mode, model_kind="autoencoder"
    )
    _honest(dep, 5)
    package = dep.registry().read_active()
    delta, _ = local_delta(package, dep.dataset.clients[dep.dataset.client_ids[5]], seed=5)
    _attacker(dep, delta, updates=10, num_samples=200)  # benign-looking, but ten of them
    _reduced(dep, "w-1")

    weights = rr.load_round_weights(dep, "w-1")
    mallory = next(d for d in weights.devices if d.client_id == "mallory")
    assert mallory.weight_share <= 0.25
    plan = rr.load_plan(dep, "w-1")
    base = dep.registry().read_version(plan.base_version)
    inputs = rr.round_inputs(dep, base, plan.holdout_version)
    accepted = [v for v in rr.load_verdicts(dep, "w-1") if v.accepted]
    if _accepted_from(dep, "w-1", "mallory") > 1:
        assert mallory.capped and weights.reweighted >= 1
    updates = [rr._update_weight(v, plan.base_version) for v in accepted]
    policy = final_weights(lambda: updates, inputs.aggregation)
    direct = new_aggregator(base.metadata.num_params, inputs.aggregation)
    for verdict, update in zip(accepted, updates, strict=True):
        units = policy.units(update)
        blob = rr.archived_envelope(dep, "w-1", verdict.key)
        update_delta, _ = summed_delta(open_and_validate(verdict.key, blob, inputs), inputs)
        if units:
            direct.add(update_delta, units / 2**16)
    assert dep.state.get(RunKeys("w-1").aggregate) == direct.to_bytes()


def test_gmm_rounds_over_s3_are_centralized_em_steps(s3_config, tmp_path, small_dataset):
    """The Gaussian mixture through real rounds (sealed dense64 statistics, SeaweedFS, the
    round runner): with every device in each round and ``min_rows`` 0, each published
    version's params are one EM step on the pooled rows from the version before, and the
    model gets better than version 1 (what the gate checks)."""
    from fedlib.models.model import FeatureSchema, load_model
    from fedlib.models.package import ModelPackage

    def params_of(package: ModelPackage) -> tuple[FeatureSchema, np.ndarray]:
        return FeatureSchema.from_dict(package.metadata.feature_schema), package.weights

    dep = build_deployment(  # no share cap: the weights are the row counts (231 of 866)
        s3_config,
        tmp_path / "gmm",
        small_dataset,
        model_kind="gmm",
        auc_tolerance=1.0,
        max_device_weight_share=1.0,
    )
    v1 = dep.registry().read_active()
    spec = {**v1.metadata.model_spec, "min_rows": 0}
    dep.settings = dep.settings.model_copy(update={"model_kind": "gmm"})
    ids = dep.dataset.client_ids
    pooled = np.concatenate([dep.dataset.clients[c] for c in ids])
    base: ModelPackage = v1
    for r in range(3):
        schema, weights = params_of(base)
        centralized = load_model("gmm", schema, spec, weights, None)
        centralized.fit_local(pooled, epochs=1, seed=0)
        package = base
        server_public = dep.current_server_public_key()
        for i, cid in enumerate(ids):
            local = load_model("gmm", schema, spec, weights, None)
            n = local.fit_local(dep.dataset.clients[cid], epochs=1, seed=i)
            update = seal_delta(
                package,
                local.params() - weights,
                n,
                client_id=cid,
                client_key=enroll(dep, cid),
                server_public_key=server_public,
                residual=None,
                clip=False,
            )
            dep.inbox.put(protocol.inbox_key(cid, update.update_id), update.envelope)
        report = run_round(dep, f"gmm-{r}")
        assert report.decision.value == "published", report.summary()
        assert report.accepted == len(ids)
        base = dep.registry().read_active()
        np.testing.assert_allclose(params_of(base)[1], centralized.params(), rtol=0, atol=1e-6)
    assert base.metadata.metrics is not None and v1.metadata.metrics is not None
    assert base.metadata.metrics["auc"] > v1.metadata.metrics["auc"]


def test_reduce_weighs_from_the_shards_weight_records(s3_config, tmp_path, small_dataset):
    """Reduce reads each shard's weight record (five columns), not its verdicts; the
    record holds every accepted update's weight fields; a shard that wrote none (it ran
    before they existed) is weighed from its verdicts, to the same aggregate bytes."""
    dep = build_deployment(s3_config, tmp_path / "records", small_dataset)
    _honest(dep, 4)
    package = dep.registry().read_active()
    delta, _ = local_delta(package, dep.dataset.clients[dep.dataset.client_ids[4]], seed=4)
    _attacker(dep, delta, updates=6, num_samples=10_000)
    _reduced(dep, "rec-1", shard_size=3)
    keys = RunKeys("rec-1")
    plan = rr.load_plan(dep, "rec-1")
    assert plan.shard_count > 1
    aggregate = dep.state.get(keys.aggregate)
    weights = rr.load_round_weights(dep, "rec-1")
    assert weights is not None and len(weights.devices) == 5
    for index in range(plan.shard_count):
        verdicts = rr.get_record(dep, keys.shard_verdicts(index), rr.ShardVerdicts).verdicts
        from_record = rr.shard_weights(dep, plan, index)
        assert from_record == [
            rr._update_weight(v, plan.base_version) for v in verdicts if v.accepted
        ]
    verdicts_of = {i: dep.state.get(keys.shard_verdicts(i)) for i in range(plan.shard_count)}
    for index in range(plan.shard_count):  # the records alone: verdicts gone
        dep.state.delete(keys.shard_verdicts(index))
    dep.state.delete(keys.aggregate)
    rr.reduce_round(dep, "rec-1")
    assert dep.state.get(keys.aggregate) == aggregate
    for index, blob in verdicts_of.items():  # the verdicts alone: records gone
        dep.state.put(keys.shard_verdicts(index), blob)
        dep.state.delete(keys.shard_weights(index))
    dep.state.delete(keys.aggregate)
    rr.reduce_round(dep, "rec-1")
    assert dep.state.get(keys.aggregate) == aggregate
    assert rr.load_round_weights(dep, "rec-1") == weights

"""The round's weight policy (one device, one bounded share) and the exact reweighting
of a sum: unit tests, no stores involved."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib.server.aggregation import (
    WEIGHT_FRACTION_BITS,
    AggregationConfig,
    StreamingAggregator,
    UpdateWeight,
    WeightPolicy,
    count_cap,
    final_weights,
    staleness_weight,
)
from fedlib.server.robust import RobustAggregator
from fedlib.wire import compression

ONE = 1 << WEIGHT_FRACTION_BITS


def _dense(values: np.ndarray) -> compression.DecodedDelta:
    return compression.DecodedDelta(dim=values.shape[0], indices=None, values=values)


def _sparse(dim: int, indices: np.ndarray, values: np.ndarray) -> compression.DecodedDelta:
    return compression.DecodedDelta(dim=dim, indices=indices.astype(np.int64), values=values)


def _w(units: int) -> float:
    return math.ldexp(float(units), -WEIGHT_FRACTION_BITS)


def _updates(spec: list[tuple[str, int, int]]) -> list[UpdateWeight]:
    """(client, num_samples, units) -> UpdateWeight, fresh (staleness 0)."""
    return [
        UpdateWeight(key=f"updates/{c}/{i:04d}", client_id=c, num_samples=n, staleness=0, units=u)
        for i, (c, n, u) in enumerate(spec)
    ]


# -- exact remove -------------------------------------------------------------------------------


def test_add_then_remove_leaves_the_zero_state_bit_for_bit():
    rng = np.random.default_rng(1)
    config = AggregationConfig()
    zero = StreamingAggregator(300, config).to_bytes()
    agg = StreamingAggregator(300, config)
    dense = _dense(rng.normal(size=300) * 0.1)
    sparse = _sparse(300, np.array([3, 7, 299]), rng.normal(size=3))
    u1 = agg.add(dense, 37.25)
    u2 = agg.add(sparse, 1.5)
    agg.remove(dense, u1)
    agg.remove(sparse, u2)
    assert agg.count == 0 and agg.weight_units == 0
    assert agg.to_bytes() == zero


def test_remove_after_a_carry_and_a_round_trip_through_bytes():
    """A partial read back from bytes has no pending offsets: removing a dense update
    from it must still be exact (the offset counter goes negative and comes back)."""
    rng = np.random.default_rng(2)
    config = AggregationConfig()
    deltas = [_dense(rng.normal(size=50)) for _ in range(5)]
    agg = StreamingAggregator(50, config)
    units = [agg.add(d, 1.0 + i) for i, d in enumerate(deltas)]
    loaded = StreamingAggregator.from_bytes(agg.to_bytes(), config)
    loaded.remove(deltas[2], units[2])
    direct = StreamingAggregator(50, config)
    for i, d in enumerate(deltas):
        if i != 2:
            direct.add(d, 1.0 + i)
    assert loaded.to_bytes() == direct.to_bytes()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.01, 5000.0), min_size=2, max_size=8),
    st.lists(st.integers(0, 70000), min_size=2, max_size=8),
    st.integers(0, 2**31),
)
def test_reweighting_equals_summing_with_the_final_weights(weights, new_units, seed):
    rng = np.random.default_rng(seed)
    config = AggregationConfig()
    n = min(len(weights), len(new_units))
    deltas = [
        _dense(rng.normal(size=40))
        if i % 2
        else _sparse(40, np.arange(i, 40, 3), rng.normal(size=len(range(i, 40, 3))))
        for i in range(n)
    ]
    first = StreamingAggregator(40, config)
    units = [first.add(d, w) for d, w in zip(deltas, weights[:n], strict=True)]
    for d, old, new in zip(deltas, units, new_units[:n], strict=True):
        first.reweight(d, old, new)
    direct = StreamingAggregator(40, config)
    for d, new in zip(deltas, new_units[:n], strict=True):
        if new:
            direct.add(d, _w(new))
    assert first.to_bytes() == direct.to_bytes()


def test_robust_reweight_changes_the_row_weight_or_drops_it():
    config = AggregationConfig(robust="median")
    rows = [_dense(np.full(4, float(v))) for v in (1, 2, 3)]
    agg = RobustAggregator(4, config)
    units = [agg.add(r, 1.0) for r in rows]
    agg.reweight(rows[2], units[2], 5 * ONE)  # the 3s now hold most of the weight
    assert np.allclose(agg.mean_delta(), 3.0)
    agg.reweight(rows[2], 5 * ONE, 0)
    assert agg.count == 2 and np.allclose(agg.mean_delta(), 1.5)
    with pytest.raises(ValueError, match="no row"):
        agg.reweight(rows[2], ONE, ONE)


# -- the policy ---------------------------------------------------------------------------------


def _final(
    updates: list[UpdateWeight], config: AggregationConfig
) -> tuple[WeightPolicy, list[int]]:
    """The policy over ``updates`` and each update's final units, in order."""
    policy = final_weights(lambda: updates, config)
    return policy, [policy.units(u) for u in updates]


def test_count_cap_is_the_lower_median_over_devices_times_the_factor():
    config = AggregationConfig(count_cap_factor=4)
    honest = [("a", 100, ONE), ("b", 300, ONE), ("c", 200, ONE)]
    attack = [("m", 2**40, ONE)] * 40
    assert count_cap([100, 300, 200], config) == 800
    # the attacker's 40 updates count once (its smallest claim): one place in the median
    assert _final(_updates(honest + attack), config)[0].count_cap == 800
    assert count_cap([100, 300, 200, 2**40], config) == 800
    assert count_cap([100, 300, 200], AggregationConfig()) is None


def test_a_claim_of_2_to_the_40_rows_is_clipped_to_the_fleet_cap():
    config = AggregationConfig(count_cap_factor=4, max_device_share=1.0)
    spec = [("a", 100, 100 * ONE), ("b", 120, 120 * ONE), ("m", 2**40, config.max_weight * ONE)]
    policy, units = _final(_updates(spec), config)
    assert policy.count_cap == 480
    assert units[:2] == [100 * ONE, 120 * ONE]
    assert units[2] == 480 * ONE  # as if it had reported 480 rows
    m = next(d for d in policy.devices if d.client_id == "m")
    assert m.clipped and not m.capped and m.share == pytest.approx(480 / 700)
    assert policy.spread == {}


def test_clipping_keeps_staleness_and_never_raises_a_weight():
    """A clipped update weighs what an honest report of the cap would, staleness
    included; with per-step weighting (FedNova) a big claim already weighs at most the
    batch size, and clipping must not raise it."""
    for batch, clipped in ((0, True), (32, False)):
        config = AggregationConfig(count_cap_factor=2, local_batch_size=batch)
        updates = [
            UpdateWeight(f"k/{c}", c, n, s, round(staleness_weight(n, s, config) * ONE))
            for c, n, s in (("a", 64, 0), ("b", 64, 0), ("m", 10_000, 3))
        ]
        policy, units = _final(updates, config)
        m = next(d for d in policy.devices if d.client_id == "m")
        assert m.clipped is clipped
        if clipped:
            assert abs(units[2] - staleness_weight(128, 3, config) * ONE) <= 1
        else:
            assert units[2] == updates[2].units


def test_forty_updates_from_one_device_get_at_most_the_share_cap():
    config = AggregationConfig(max_device_share=0.25)
    honest = [(f"h{i}", 100, 100 * ONE) for i in range(6)]
    attack = [("m", 100, 100 * ONE)] * 40
    policy, units = _final(_updates(honest + attack), config)
    shares = {d.client_id: d for d in policy.devices}
    assert shares["m"].accepted == 40 and shares["m"].capped
    assert shares["m"].share <= 0.25
    assert shares["m"].share == pytest.approx(0.25, abs=1e-6)
    assert all(units[i] == 100 * ONE for i in range(6))  # honest ones untouched
    assert sum(units[6:]) == shares["m"].units
    # kept per update only for the capped device (memory is per device otherwise)
    assert sorted(policy.spread) == sorted(u.key for u in _updates(honest + attack)[6:])
    assert sum(units) == sum(d.units for d in policy.devices)


def test_fewer_devices_than_one_over_the_share_get_equal_weights():
    config = AggregationConfig(max_device_share=0.25)
    policy, units = _final(_updates([("a", 10, 10 * ONE), ("b", 90, 90 * ONE)]), config)
    assert policy.equal_weights
    assert [d.share for d in policy.devices] == [0.5, 0.5]
    assert units == [10 * ONE, 10 * ONE]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(1, 10**9)), min_size=1, max_size=30),
    st.sampled_from([0.1, 0.2, 0.25, 1 / 3, 0.5, 1.0]),
)
def test_no_device_exceeds_the_cap_and_uncapped_devices_keep_their_weight(rows, share):
    config = AggregationConfig(max_device_share=share)
    updates = _updates([(f"c{c}", 1, u) for c, u in rows])
    policy, units = _final(updates, config)
    total = sum(units)
    assert total == sum(d.units for d in policy.devices)
    if policy.equal_weights:
        assert len({d.units for d in policy.devices}) == 1
        assert Fraction(share) * len(policy.devices) < 1  # the exact rule, not float
        return
    for d in policy.devices:
        assert d.units * 1.0 / total <= share + 1e-12
        if not d.capped:
            mine = [i for i, u in enumerate(updates) if u.client_id == d.client_id]
            assert all(units[i] == updates[i].units for i in mine)


def test_dp_rounds_keep_weight_one():
    config = AggregationConfig(
        dp_mode="central", dp_clip=1.0, max_device_share=0.25, count_cap_factor=4
    )
    updates = _updates([("a", 10, ONE), ("b", 2**40, ONE)])
    policy, units = _final(updates, config)
    assert units == [ONE, ONE] and policy.count_cap is None


def test_the_policy_is_deterministic_whatever_the_input_order():
    config = AggregationConfig(max_device_share=0.3, count_cap_factor=2)
    spec = [("a", 50, 7 * ONE), ("m", 900, 3 * ONE), ("m", 10, 11 * ONE), ("b", 40, 5 * ONE)]
    spec += [("c", 60, 9 * ONE), ("m", 70, 13 * ONE)]
    updates = _updates(spec)
    forward, forward_units = _final(updates, config)
    backward, backward_units = _final(updates[::-1], config)
    assert forward_units == backward_units[::-1]
    assert forward.devices == backward.devices

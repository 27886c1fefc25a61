"""Robust aggregation: the statistics are right, order- and shard-independent, and resist
outliers that move FedAvg's mean; FLTrust weighting refuses updates against clean data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from fedlib.errors import RejectedUpdate
from fedlib.server.aggregation import AggregationConfig, StreamingAggregator
from fedlib.server.robust import RobustAggregator, trusted, weighted_trimmed_mean
from fedlib.server.strategy import aggregator_from_bytes, new_aggregator
from fedlib.wire.compression import DecodedDelta

DIM = 64


def dense(values: np.ndarray) -> DecodedDelta:
    return DecodedDelta(values.size, None, np.asarray(values, dtype=np.float64))


def config(method: str, trim: float = 0.2) -> AggregationConfig:
    return AggregationConfig(robust=method, trim_fraction=trim)


def test_equal_weights_match_scipy_trim_mean_and_numpy_median() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((20, DIM)).astype(np.float32)
    ones = np.ones(20)
    np.testing.assert_allclose(
        weighted_trimmed_mean(values, ones, 0.2),
        stats.trim_mean(values.astype(np.float64), 0.2, axis=0),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        weighted_trimmed_mean(values, ones, 0.5),
        np.median(values.astype(np.float64), axis=0),
        atol=1e-12,
    )
    odd = values[:7]
    np.testing.assert_allclose(
        weighted_trimmed_mean(odd, np.ones(7), 0.5),
        np.median(odd.astype(np.float64), axis=0),
        atol=1e-12,
    )


def test_weights_count_like_repeated_rows() -> None:
    """A row of weight 3 is the same as three copies of it (integer weights)."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((6, DIM)).astype(np.float32)
    weights = np.array([1, 3, 2, 1, 1, 2], dtype=np.float64)
    repeated = np.repeat(rows, weights.astype(int), axis=0)
    for trim in (0.0, 0.1, 0.2, 0.5):
        np.testing.assert_allclose(
            weighted_trimmed_mean(rows, weights, trim),
            weighted_trimmed_mean(repeated, np.ones(len(repeated)), trim),
            atol=1e-9,
        )
    np.testing.assert_allclose(
        weighted_trimmed_mean(rows, weights, 0.0), np.average(rows, axis=0, weights=weights)
    )


@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_same_bits_in_any_order_and_any_sharding(method: str) -> None:
    rng = np.random.default_rng(2)
    updates = [(rng.standard_normal(DIM), float(rng.integers(1, 9))) for _ in range(23)]
    cfg = config(method)

    def run(order: list[int], shards: int) -> RobustAggregator:
        parts = [RobustAggregator(DIM, cfg) for _ in range(shards)]
        for n, i in enumerate(order):
            parts[n % shards].add(dense(updates[i][0]), updates[i][1])
        total = RobustAggregator(DIM, cfg)
        for part in parts:  # through bytes, as shards hand them to reduce
            total.merge(RobustAggregator.from_bytes(part.to_bytes(), cfg))
        return total

    first = run(list(range(23)), 1)
    other = run(list(rng.permutation(23)), 4)
    assert first.to_bytes() == other.to_bytes()
    assert first.mean_delta().tobytes() == other.mean_delta().tobytes()
    assert first.count == 23


@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_outliers_move_the_mean_but_not_the_robust_statistic(method: str) -> None:
    rng = np.random.default_rng(3)
    honest = [rng.normal(0.1, 0.05, DIM) for _ in range(16)]
    hostile = [-9.0 * np.ones(DIM) / np.sqrt(DIM) for _ in range(4)]  # 20%, norm 9
    fedavg = StreamingAggregator(DIM, AggregationConfig())
    robust = new_aggregator(DIM, config(method))
    for delta in honest + hostile:
        fedavg.add(dense(delta), 1.0)
        robust.add(dense(delta), 1.0)
    truth = np.mean(honest, axis=0)
    assert np.abs(fedavg.mean_delta() - truth).min() > 0.2
    assert np.abs(robust.mean_delta() - truth).max() < 0.06


def test_rows_file_is_checked_and_bounds_still_apply() -> None:
    cfg = config("trimmed_mean")
    agg = RobustAggregator(DIM, cfg)
    agg.add(dense(np.ones(DIM) * 0.1), 1.0)
    data = agg.to_bytes()
    assert aggregator_from_bytes(data, cfg).to_bytes() == data
    with pytest.raises(ValueError):
        RobustAggregator.from_bytes(data[:-1], cfg)
    with pytest.raises(ValueError):
        RobustAggregator.from_bytes(b"FLPS" + data[4:], cfg)
    with pytest.raises(RejectedUpdate) as err:
        agg.add(dense(np.full(DIM, 100.0)), 1.0)
    assert err.value.reason == "norm_exceeded"
    with pytest.raises(ValueError):
        AggregationConfig(robust="mode")
    with pytest.raises(ValueError):
        AggregationConfig(robust="trimmed_mean", trim_fraction=0.5)


def test_fltrust_refuses_flipped_and_orthogonal_updates_and_caps_scaled_ones() -> None:
    rng = np.random.default_rng(4)
    reference = rng.standard_normal(DIM)
    honest = reference + 0.5 * rng.standard_normal(DIM)
    kept, score = trusted(dense(honest), reference)
    assert 0.5 < score <= 1
    with pytest.raises(RejectedUpdate) as err:
        trusted(dense(-honest), reference)
    assert err.value.reason == "distrusted"
    orthogonal = rng.standard_normal(DIM)
    orthogonal -= orthogonal @ reference / (reference @ reference) * reference
    with pytest.raises(RejectedUpdate):
        trusted(dense(orthogonal), reference)
    scaled, _ = trusted(dense(honest * 1000), reference)
    assert scaled.l2_norm() == pytest.approx(np.linalg.norm(reference), rel=1e-9)
    sparse = DecodedDelta(DIM, np.array([1, 5], dtype=np.int64), reference[[1, 5]].copy())
    kept, score = trusted(sparse, reference)
    assert score > 0 and kept.indices is not None
    # FLTrust keeps FedAvg's streaming sum
    assert isinstance(new_aggregator(DIM, config("fltrust")), StreamingAggregator)
    assert dataclasses.replace(config("fltrust"), robust="none").robust == "none"

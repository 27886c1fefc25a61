"""Streaming aggregation: weights, bounds, exact determinism, bounded memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib import compression
from fedlib.aggregation import AggregationConfig, StreamingAggregator, staleness_weight
from fedlib.errors import RejectedUpdate

DIM = 300
CFG = AggregationConfig(norm_bound=50.0)


def make_updates(seed: int, count: int, *, topk: float = 0.2):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        delta = rng.normal(size=DIM) * rng.uniform(0.01, 1.0)
        mode = "topk16" if i % 2 else "dense32"
        blob = compression.encode(
            delta, compression.CompressionConfig(mode=mode, topk_fraction=topk)
        )
        decoded = compression.decode(blob, expected_dim=DIM)
        weight = staleness_weight(int(rng.integers(1, 5000)), int(rng.integers(0, 4)), CFG)
        out.append((decoded, weight))
    return out


def aggregate(updates, shards: int = 1) -> StreamingAggregator:
    parts = [StreamingAggregator(DIM, CFG) for _ in range(shards)]
    for i, (delta, weight) in enumerate(updates):
        parts[i % shards].add(delta, weight)
    total = parts[0]
    for part in parts[1:]:
        total = StreamingAggregator.from_bytes(total.to_bytes(), CFG)
        total.merge(StreamingAggregator.from_bytes(part.to_bytes(), CFG))
    return total


def test_weighted_mean_matches_float_reference():
    updates = make_updates(0, 40)
    agg = aggregate(updates)
    dense = np.array([d.to_dense() for d, _ in updates])
    weights = np.array([w for _, w in updates])
    expected = (weights[:, None] * dense).sum(axis=0) / weights.sum()
    assert np.allclose(agg.mean_delta(), expected, rtol=1e-7, atol=1e-9)
    base = np.linspace(-1, 1, DIM)
    assert np.allclose(agg.apply(base), base + expected, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), perm_seed=st.integers(0, 10_000), shards=st.integers(1, 7))
def test_bit_identical_under_any_order_and_sharding(seed, perm_seed, shards):
    updates = make_updates(seed, 23)
    reference = aggregate(updates).apply(np.zeros(DIM))
    order = np.random.default_rng(perm_seed).permutation(len(updates))
    shuffled = aggregate([updates[i] for i in order], shards=shards).apply(np.zeros(DIM))
    assert (
        hashlib.sha256(reference.tobytes()).digest() == hashlib.sha256(shuffled.tobytes()).digest()
    )


def test_staleness_weight_and_bounds():
    cfg = AggregationConfig(staleness_exponent=1.0, max_staleness=3, max_sample_weight=1000)
    assert staleness_weight(100, 0, cfg) == 100
    assert staleness_weight(100, 1, cfg) == pytest.approx(50)
    assert staleness_weight(100, 3, cfg) == pytest.approx(25)
    assert staleness_weight(10_000, 0, cfg) == 1000  # capped sample count
    with pytest.raises(RejectedUpdate) as err:
        staleness_weight(100, 4, cfg)
    assert err.value.reason == "too_stale"
    with pytest.raises(RejectedUpdate) as err:
        staleness_weight(100, -1, cfg)
    assert err.value.reason == "unknown_base_version"


def test_stale_update_counts_less():
    cfg = AggregationConfig(staleness_exponent=1.0, norm_bound=10)
    fresh = compression.decode(
        compression.encode(np.ones(4), compression.CompressionConfig("dense64")), expected_dim=4
    )
    stale = compression.decode(
        compression.encode(-np.ones(4), compression.CompressionConfig("dense64")), expected_dim=4
    )
    agg = StreamingAggregator(4, cfg)
    agg.add(fresh, staleness_weight(100, 0, cfg))
    agg.add(stale, staleness_weight(100, 3, cfg))
    assert np.allclose(agg.mean_delta(), (100 - 25) / 125)


def test_norm_bound_and_shape_are_enforced():
    cfg = AggregationConfig(norm_bound=1.0)
    agg = StreamingAggregator(DIM, cfg)
    big = compression.decode(
        compression.encode(np.full(DIM, 0.5), compression.CompressionConfig("dense32")),
        expected_dim=DIM,
    )
    with pytest.raises(RejectedUpdate) as err:
        agg.add(big, 1.0)
    assert err.value.reason == "norm_exceeded"
    other = compression.decode(
        compression.encode(np.zeros(5), compression.CompressionConfig("dense32")), expected_dim=5
    )
    with pytest.raises(RejectedUpdate) as err:
        agg.add(other, 1.0)
    assert err.value.reason == "shape_mismatch"
    assert agg.count == 0


def test_empty_aggregate_leaves_base_unchanged():
    agg = StreamingAggregator(DIM, CFG)
    base = np.arange(DIM, dtype=np.float64)
    assert np.array_equal(agg.apply(base), base)


def test_partial_sum_refuses_other_config_and_garbage():
    agg = aggregate(make_updates(1, 3))
    blob = agg.to_bytes()
    with pytest.raises(ValueError):
        StreamingAggregator.from_bytes(blob, AggregationConfig(norm_bound=1e6))
    with pytest.raises(ValueError):
        StreamingAggregator.from_bytes(blob[:-1], CFG)
    with pytest.raises(ValueError):
        StreamingAggregator.from_bytes(b"junk", CFG)


def test_many_extreme_updates_do_not_overflow():
    """Thousands of updates at the norm bound with the largest weight stay exact."""
    cfg = AggregationConfig(norm_bound=1.0, max_sample_weight=1 << 16)
    delta = compression.decode(
        compression.encode(np.eye(1, 8).ravel(), compression.CompressionConfig("dense64")),
        expected_dim=8,
    )
    agg = StreamingAggregator(8, cfg)
    for _ in range(3000):
        agg.add(delta, float(1 << 16))
    assert agg.mean_delta()[0] == pytest.approx(1.0, abs=1e-12)


def test_memory_does_not_grow_with_updates():
    dim = 50_000
    cfg = AggregationConfig(norm_bound=100.0)
    rng = np.random.default_rng(0)
    blobs = [
        compression.encode(rng.normal(size=dim), compression.CompressionConfig("topk16", 0.01))
        for _ in range(4)
    ]
    agg = StreamingAggregator(dim, cfg)

    def peak_for(n: int) -> int:
        tracemalloc.start()
        for i in range(n):
            agg.add(compression.decode(blobs[i % 4], expected_dim=dim), 10.0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_for(20), peak_for(400)
    assert large < small * 1.5 + 64 * 1024

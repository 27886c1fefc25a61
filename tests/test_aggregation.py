"""Streaming aggregation: weights, bounds, exact determinism, bounded memory."""

from __future__ import annotations

import functools
import hashlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib.errors import RejectedUpdate
from fedlib.server.aggregation import AggregationConfig, StreamingAggregator, staleness_weight
from fedlib.wire import compression

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


# --------------------------------------------------------------------------- server optimizer


def _dense(values: np.ndarray) -> compression.DecodedDelta:
    blob = compression.encode(values, compression.CompressionConfig("dense64"))
    return compression.decode(blob, expected_dim=values.size)


def _aggregate_one(delta: np.ndarray, cfg: AggregationConfig) -> StreamingAggregator:
    agg = StreamingAggregator(delta.size, cfg)
    agg.add(_dense(delta), 1.0)
    return agg


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_step_formula(nesterov: bool) -> None:
    cfg = AggregationConfig(server_momentum=0.9, server_lr=0.5, server_nesterov=nesterov)
    base = np.array([1.0, -2.0, 0.0, 4.0])
    delta = np.array([0.5, 0.25, -1.0, 0.0])
    old = np.array([0.1, 0.0, 0.2, -0.4])
    params, buffer = _aggregate_one(delta, cfg).step(base, old)
    expected_buffer = 0.9 * old + delta
    direction = 0.9 * expected_buffer + delta if nesterov else expected_buffer
    np.testing.assert_allclose(buffer, expected_buffer, rtol=0, atol=1e-12)
    np.testing.assert_allclose(params, base + 0.5 * direction, rtol=0, atol=1e-12)


def test_step_is_deterministic_and_its_state_round_trips_as_float64_bytes() -> None:
    """A round is a pure function of (base, stored buffer, aggregate), bit for bit."""
    cfg = AggregationConfig(norm_bound=50.0, server_momentum=0.9)
    updates = make_updates(3, 9)

    def total(order: list[int], shards: int) -> StreamingAggregator:
        parts = [StreamingAggregator(DIM, cfg) for _ in range(shards)]
        for j, i in enumerate(order):
            parts[j % shards].add(*updates[i])
        for part in parts[1:]:
            parts[0].merge(StreamingAggregator.from_bytes(part.to_bytes(), cfg))
        return parts[0]

    base = np.linspace(-1, 1, DIM)
    p1, m1 = total(list(range(9)), 1).step(base, None)
    assert m1 is not None and m1.dtype == np.float64 and m1.shape == (DIM,)
    stored = np.ascontiguousarray(m1, "<f8").tobytes()  # how the round runner keeps it
    p2, m2 = total(list(range(9)), 3).step(p1, np.frombuffer(stored, dtype="<f8"))
    p2_again, m2_again = total(list(range(8, -1, -1)), 2).step(p1.copy(), m1.copy())
    assert m2 is not None and m2_again is not None
    assert p2.tobytes() == p2_again.tobytes() and m2.tobytes() == m2_again.tobytes()
    assert not np.array_equal(p2, total(list(range(9)), 1).step(p1, None)[0])  # state matters


def test_step_without_or_with_foreign_state_starts_from_zero() -> None:
    cfg = AggregationConfig(server_momentum=0.9)
    delta = np.array([1.0, -1.0, 0.5])
    base = np.zeros(3)
    fresh = _aggregate_one(delta, cfg).step(base, None)
    resized = _aggregate_one(delta, cfg).step(base, np.ones(5))
    zeros = _aggregate_one(delta, cfg).step(base, np.zeros(3))
    for params, buffer in (fresh, resized):
        assert params.tobytes() == zeros[0].tobytes()
        assert buffer is not None and buffer.tobytes() == delta.tobytes()
    np.testing.assert_allclose(fresh[0], 1.9 * delta)  # Nesterov: (1 + beta) * delta
    with pytest.raises(ValueError):
        _aggregate_one(delta, cfg).step(base, np.array([0.0, np.nan, 0.0]))
    plain_params, plain_state = _aggregate_one(delta, AggregationConfig()).step(base, np.ones(3))
    assert plain_state is None and np.array_equal(plain_params, delta)


def test_rows_per_step_weighting() -> None:
    cfg = AggregationConfig(local_batch_size=32, staleness_exponent=1.0, max_sample_weight=1000)
    assert staleness_weight(10, 0, cfg) == 10  # one step on 10 rows
    assert staleness_weight(64, 0, cfg) == 32
    assert staleness_weight(100, 0, cfg) == 25  # four steps
    assert staleness_weight(100, 1, cfg) == pytest.approx(12.5)
    assert staleness_weight(10**6, 0, cfg) == pytest.approx(1000 / 32)  # cap first
    assert cfg.max_weight == 32
    assert cfg.grid_bits > AggregationConfig(max_sample_weight=1000).grid_bits
    with pytest.raises(ValueError):
        AggregationConfig(local_batch_size=-1)


def test_large_norm_bound_keeps_exact_kinds_exact() -> None:
    """Gaussian moments need a bound of ~1e4; the fixed-point grid must stay fine enough."""
    cfg = AggregationConfig(norm_bound=1e4)
    rng = np.random.default_rng(4)
    deltas = [rng.normal(size=DIM) * 50 for _ in range(20)]
    weights = [float(n) for n in rng.integers(200, 1200, size=20)]
    agg = StreamingAggregator(DIM, cfg)
    for delta, weight in zip(deltas, weights, strict=True):
        agg.add(_dense(delta), weight)
    expected = np.average(np.array(deltas), axis=0, weights=weights)
    np.testing.assert_allclose(agg.mean_delta(), expected, rtol=0, atol=1e-9)


# --- toy non-IID federation: least squares, clients of very different sizes and inputs


def _toy_clients(seed: int, count: int = 6, d: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    clients = []
    for _ in range(count):
        n = int(rng.integers(20, 400))
        x = rng.normal(size=(n, d)) * rng.lognormal(0, 1.0, size=d) + rng.normal(size=d)
        y = x @ w_true + rng.normal(size=n) * 0.1 + rng.normal() * 2  # client offset
        clients.append((np.c_[x, np.ones(n)], y))
    return clients


def _toy_excess_loss(
    clients: list[tuple[np.ndarray, np.ndarray]],
    cfg: AggregationConfig,
    *,
    rounds: int,
    lr_scale: float,
    topk: float | None = None,
) -> float:
    """Pooled excess loss after FedAvg rounds of local minibatch SGD (batch 16)."""
    x_all = np.concatenate([x for x, _ in clients])
    y_all = np.concatenate([y for _, y in clients])
    w_opt = np.linalg.lstsq(x_all, y_all, rcond=None)[0]
    lr = lr_scale / float(np.max(np.sum(x_all**2, axis=1)))
    mode = compression.CompressionConfig("topk16", topk) if topk else None
    rng = np.random.default_rng(0)
    w = np.zeros(x_all.shape[1])
    state = None
    residuals: list[np.ndarray | None] = [None] * len(clients)
    for _ in range(rounds):
        agg = StreamingAggregator(w.size, cfg)
        for i, (x, y) in enumerate(clients):
            local = w.copy()
            perm = rng.permutation(len(y))
            for start in range(0, len(y), 16):
                b = perm[start : start + 16]
                local -= lr * 2 * x[b].T @ (x[b] @ local - y[b]) / len(b)
            delta = local - w
            if mode is None:
                decoded = _dense(delta)
            else:
                blob, residuals[i] = compression.compress_with_feedback(
                    delta + (residuals[i] if residuals[i] is not None else 0.0), None, mode
                )
                decoded = compression.decode(blob, expected_dim=w.size)
            agg.add(decoded, staleness_weight(len(y), 0, cfg))
        w, state = agg.step(w, state)

    def loss(v: np.ndarray) -> float:
        return float(np.mean((x_all @ v - y_all) ** 2))

    return loss(w) - loss(w_opt)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_rows_per_step_weighting_follows_the_pooled_gradient(seed: int) -> None:
    """Deltas are sums of ceil(n / B) steps: weighting them by n again skews the objective.

    With a tiny local learning rate a round's mean delta is a weighted sum of the
    clients' gradients; only rows-per-step weights make it the pooled gradient.
    """
    clients = _toy_clients(seed)
    x_all = np.concatenate([x for x, _ in clients])
    y_all = np.concatenate([y for _, y in clients])
    w = np.zeros(x_all.shape[1])
    pooled = 2 * x_all.T @ (x_all @ w - y_all) / len(y_all)
    lr = 1e-3 / float(np.max(np.sum(x_all**2, axis=1)))
    misalignment = {}
    for batch in (0, 16):
        cfg = AggregationConfig(norm_bound=100.0, local_batch_size=batch)
        agg = StreamingAggregator(w.size, cfg)
        rng = np.random.default_rng(0)
        for x, y in clients:
            local = w.copy()
            perm = rng.permutation(len(y))
            for start in range(0, len(y), 16):
                b = perm[start : start + 16]
                local -= lr * 2 * x[b].T @ (x[b] @ local - y[b]) / len(b)
            agg.add(_dense(local - w), staleness_weight(len(y), 0, cfg))
        mean = agg.mean_delta()
        misalignment[batch] = 1 + mean @ pooled / np.linalg.norm(mean) / np.linalg.norm(pooled)
    assert misalignment[16] < 1e-3
    assert misalignment[16] < 0.2 * misalignment[0], misalignment


@pytest.mark.parametrize("seed", [0, 2])
def test_nesterov_momentum_beats_averaging_and_heavy_ball_under_topk(seed: int) -> None:
    clients = _toy_clients(seed, count=8, d=40)
    plain = AggregationConfig(norm_bound=100.0, local_batch_size=16)
    nesterov = AggregationConfig(norm_bound=100.0, local_batch_size=16, server_momentum=0.9)
    heavy = AggregationConfig(
        norm_bound=100.0, local_batch_size=16, server_momentum=0.9, server_nesterov=False
    )
    run = functools.partial(_toy_excess_loss, clients, rounds=60, lr_scale=0.5, topk=0.1)
    plain_loss, nesterov_loss, heavy_loss = run(plain), run(nesterov), run(heavy)
    assert nesterov_loss < 0.5 * plain_loss, (nesterov_loss, plain_loss)
    assert nesterov_loss < 0.5 * heavy_loss, (nesterov_loss, heavy_loss)


def test_rounding_matches_numpy_rint_ties_and_limits_included() -> None:
    """add() rounds with a float constant, not np.rint: the same integers, half to even."""
    from fedlib.server.aggregation import _ROUNDER_BITS, _offset_rounded

    rng = np.random.default_rng(7)
    values = np.concatenate(
        [rng.normal(size=997) * 1e-3, [0.5, 1.5, -0.5, -2.5, 0.0, 3.0, 2.0**51, -(2.0**51)]]
    )
    for scale in (1.0, 3.0, 2.0**-20, 2.0**31 * 1234.5):
        wide = values.astype(np.float64) * scale
        keep = np.abs(wide) <= 2.0**51  # the grid keeps every contribution in this range
        expected = np.rint(wide[keep]).astype(np.int64)
        got = _offset_rounded(values[keep], np.float64(scale), np.empty(int(keep.sum())))
        assert np.array_equal(got - _ROUNDER_BITS, expected)


def test_exact_integer_sum_across_carries_with_dense_and_sparse_updates() -> None:
    """Dense adds carry their rounding offset in the low words until the next carry; the
    totals still equal the exact sum of rint(w * delta * 2**G), crossing many carries."""
    from fedlib.server.aggregation import WEIGHT_FRACTION_BITS

    dim = 64
    cfg = AggregationConfig(norm_bound=1.0, max_sample_weight=1 << 16)
    rng = np.random.default_rng(11)
    agg = StreamingAggregator(dim, cfg)
    expected = [0] * dim
    for i in range(1500):  # ~3 carries' worth of adds
        delta = rng.normal(size=dim)
        delta *= rng.uniform(0.5, 0.999) / np.linalg.norm(delta)  # near the norm bound
        mode = "topk16" if i % 3 == 0 else "dense64"
        decoded = compression.decode(
            compression.encode(delta, compression.CompressionConfig(mode, topk_fraction=0.25)),
            expected_dim=dim,
        )
        units = agg.add(decoded, float(rng.integers(1, 1 << 16)))
        scale = np.float64(2.0 ** (cfg.grid_bits - WEIGHT_FRACTION_BITS) * units)
        contribution = np.rint(decoded.values * scale).astype(np.int64)
        coords = range(dim) if decoded.indices is None else decoded.indices.tolist()
        for coord, q in zip(coords, contribution.tolist(), strict=True):
            expected[coord] += q
    data = agg.to_bytes()
    body = len(data) - 16 * dim
    lo = np.frombuffer(data, "<i8", dim, body).tolist()
    hi = np.frombuffer(data, "<i8", dim, body + 8 * dim).tolist()
    assert [h * 2**32 + low for h, low in zip(hi, lo, strict=True)] == expected
    assert max(abs(v) for v in expected) > 2**53  # past what a float64 sum holds exactly

"""Tests for fedlib.wire.compression: round trips, wire format, error feedback, hostile blobs."""

from __future__ import annotations

import math
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlib.errors import RejectedUpdate
from fedlib.wire.compression import (
    CompressionConfig,
    DecodedDelta,
    compress_with_feedback,
    decode,
    dense_float32_bytes,
    encode,
)

# The wire format is a contract with deployed devices, so the tests pin it independently.
HEADER = struct.Struct("<4sBBHIIf")
MODE_CODES = {"topk16": 1, "dense16": 2, "dense32": 3, "dense64": 4}
IDX_NONE, IDX_GAP16, IDX_ABS16, IDX_ABS32 = 0, 1, 2, 3
DECODE_REASONS = {"malformed", "shape_mismatch", "non_finite", "oversized"}
FP16_REL = 2.0**-11  # half an fp16 ulp, relative
MODES = ["topk16", "dense16", "dense32", "dense64"]

FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def header(blob: bytes) -> tuple[bytes, int, int, int, int, int, float]:
    return HEADER.unpack_from(blob)


def pack(
    *,
    mode: int = 1,
    idx: int = IDX_ABS16,
    reserved: int = 0,
    dim: int = 10,
    k: int = 1,
    scale: float = 1.0,
    magic: bytes = b"FLC1",
) -> bytes:
    return HEADER.pack(magic, mode, idx, reserved, dim, k, scale)


def with_field(blob: bytes, **fields: object) -> bytes:
    """Replace header fields of a valid blob, keeping the body."""
    names = ("magic", "mode", "idx", "reserved", "dim", "k", "scale")
    current = dict(zip(names, header(blob), strict=True))
    current.update(fields)
    return pack(**current) + blob[HEADER.size :]  # type: ignore[arg-type]


def reject_reason(blob: bytes, expected_dim: int, **kw: int) -> str:
    with pytest.raises(RejectedUpdate) as exc:
        decode(blob, expected_dim=expected_dim, **kw)
    return exc.value.reason


def assert_consistent(d: DecodedDelta, expected_dim: int) -> None:
    """What every successful decode must guarantee to the aggregator."""
    assert d.dim == expected_dim
    assert d.values.dtype == np.float64 and d.values.ndim == 1
    assert not d.values.flags.writeable
    assert np.isfinite(d.values).all()
    if d.indices is None:
        assert d.values.shape == (expected_dim,)
    else:
        assert d.indices.dtype == np.int64
        assert d.indices.shape == d.values.shape
        assert 1 <= d.nnz <= expected_dim
        assert d.indices[0] >= 0 and d.indices[-1] < expected_dim
        assert (np.diff(d.indices) > 0).all()
    if expected_dim <= 1 << 24:  # a sparse header may claim 2**32 params: no 32 GiB vector
        dense = d.to_dense()
        assert dense.shape == (expected_dim,) and dense.dtype == np.float64
    assert math.isfinite(d.l2_norm())


def decode_or_reject(blob: bytes, expected_dim: int, max_dim: int = 50_000_000) -> None:
    try:
        d = decode(blob, expected_dim=expected_dim, max_dim=max_dim)
    except RejectedUpdate as e:
        assert e.reason in DECODE_REASONS
    else:
        assert_consistent(d, expected_dim)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "topk8"},
        {"topk_fraction": 0.0},
        {"topk_fraction": -0.1},
        {"topk_fraction": 1.5},
        {"topk_fraction": float("nan")},
        {"topk_fraction": float("inf")},
        {"topk_fraction": True},
        {"topk_fraction": "0.1"},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CompressionConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_and_full_fraction() -> None:
    assert CompressionConfig() == CompressionConfig("topk16", 0.1)
    assert CompressionConfig(topk_fraction=1).topk_fraction == 1


# --------------------------------------------------------------------------- encode input


@pytest.mark.parametrize(
    "bad",
    [
        np.array([1.0, np.nan]),
        np.array([np.inf, 0.0]),
        np.zeros((2, 3)),
        np.float64(1.0),
        np.zeros(0),
        np.array([True, False]),
        np.array([1 + 2j]),
        np.array(["a"]),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_encode_refuses_bad_input(bad: np.ndarray, mode: str) -> None:
    with pytest.raises(ValueError):
        encode(bad, CompressionConfig(mode))  # type: ignore[arg-type]


def test_encode_refuses_values_outside_the_mode_range() -> None:
    with pytest.raises(ValueError):
        encode(np.array([1e39, 0.0]), CompressionConfig("dense32"))
    with pytest.raises(ValueError):
        encode(np.array([1e300, 0.0]), CompressionConfig("dense16"))
    # dense64 carries the same vector exactly.
    x = np.array([1e300, -1e-300])
    assert np.array_equal(decode(encode(x, CompressionConfig("dense64")), expected_dim=2).values, x)


def test_encode_accepts_integer_and_float32_input() -> None:
    x = np.arange(-5, 5, dtype=np.int32)
    d = decode(encode(x, CompressionConfig("dense64")), expected_dim=10)
    assert np.array_equal(d.values, x.astype(np.float64))
    y = np.linspace(-1, 1, 7, dtype=np.float32)
    d = decode(encode(y, CompressionConfig("dense32")), expected_dim=7)
    assert np.array_equal(d.values, y.astype(np.float64))


# --------------------------------------------------------------------------- round trips


def test_dense64_is_exact() -> None:
    x = np.random.default_rng(1).standard_normal(1000)
    x[::7] *= 1e-200
    x[::11] *= 1e200
    d = decode(encode(x, CompressionConfig("dense64")), expected_dim=x.size)
    assert d.indices is None and d.nnz == x.size
    assert np.array_equal(d.values, x) and np.array_equal(d.to_dense(), x)


def test_dense32_equals_float32_cast() -> None:
    x = np.random.default_rng(2).standard_normal(1000) * 1e3
    blob = encode(x, CompressionConfig("dense32"))
    assert len(blob) == HEADER.size + 4 * x.size
    assert header(blob)[6] == 1.0
    d = decode(blob, expected_dim=x.size)
    assert np.array_equal(d.values, x.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("magnitude", [1e-30, 1e-8, 1.0, 1e6, 1e30])
def test_dense16_within_fp16_precision_of_the_largest_value(magnitude: float) -> None:
    x = np.random.default_rng(3).standard_normal(5000) * magnitude
    blob = encode(x, CompressionConfig("dense16"))
    assert len(blob) == HEADER.size + 2 * x.size
    d = decode(blob, expected_dim=x.size)
    err = np.abs(d.values - x)
    # Scaling keeps tiny deltas out of fp16 subnormals: the error is relative, per element.
    assert (err <= FP16_REL * np.abs(x) + 1e-6 * np.abs(x).max()).all()
    assert err.max() <= FP16_REL * np.abs(x).max()


def test_16bit_scale_maps_largest_value_near_2_15() -> None:
    x = np.array([3e-7, -1e-7, 0.0])
    blob = encode(x, CompressionConfig("dense16"))
    scale = header(blob)[6]
    top = np.frombuffer(blob, dtype="<f2", count=3, offset=HEADER.size)[0]
    assert 2.0**14 < float(top) <= 2.0**15 * (1 + 2**-10)
    assert scale == pytest.approx(3e-7 / 2**15, rel=1e-6)


@pytest.mark.parametrize("mode", ["topk16", "dense16", "dense32", "dense64"])
def test_all_zero_delta_is_valid(mode: str) -> None:
    blob = encode(np.zeros(50), CompressionConfig(mode, 0.1))  # type: ignore[arg-type]
    d = decode(blob, expected_dim=50)
    assert header(blob)[6] == 1.0
    assert not d.to_dense().any() and d.l2_norm() == 0.0


def test_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    rng = np.random.default_rng(4)
    dim = 10_000
    x = rng.permutation(np.linspace(1e-3, 5.0, dim)) * rng.choice([-1.0, 1.0], dim)
    d = decode(encode(x, CompressionConfig("topk16", 0.05)), expected_dim=dim)
    k = 500
    assert d.nnz == k
    assert d.indices is not None
    assert np.array_equal(d.indices, np.sort(np.argsort(-np.abs(x))[:k]))
    assert np.allclose(d.values, x[d.indices], rtol=FP16_REL, atol=0)
    dense = d.to_dense()
    dropped = np.ones(dim, bool)
    dropped[d.indices] = False
    assert not dense[dropped].any()


@pytest.mark.parametrize(
    ("dim", "fraction", "k"),
    [(1000, 0.01, 10), (100, 0.07, 7), (3, 0.5, 2), (10, 1e-9, 1), (7, 1.0, 7), (200_000, 1e-5, 2)],
)
def test_topk_count_is_ceil_of_fraction(dim: int, fraction: float, k: int) -> None:
    x = np.arange(1, dim + 1, dtype=np.float64)
    blob = encode(x, CompressionConfig("topk16", fraction))
    assert header(blob)[5] == k
    assert decode(blob, expected_dim=dim).nnz == k


def test_decoded_arrays_are_private_and_read_only() -> None:
    blob = bytearray(encode(np.arange(1.0, 11.0), CompressionConfig("topk16", 0.5)))
    d = decode(blob, expected_dim=10)
    before = d.to_dense()
    blob[HEADER.size :] = bytes(len(blob) - HEADER.size)
    assert np.array_equal(d.to_dense(), before)
    assert d.indices is not None
    with pytest.raises(ValueError):
        d.values[0] = 1.0
    with pytest.raises(ValueError):
        d.indices[0] = 1


def test_l2_norm_and_to_dense_agree() -> None:
    x = np.random.default_rng(5).standard_normal(300)
    for mode in MODES:
        d = decode(encode(x, CompressionConfig(mode, 0.2)), expected_dim=300)  # type: ignore[arg-type]
        assert d.l2_norm() == pytest.approx(float(np.linalg.norm(d.to_dense())), rel=1e-12)
    huge = DecodedDelta(dim=2, indices=None, values=np.array([1e300, 1e300]))
    assert huge.l2_norm() == pytest.approx(math.sqrt(2) * 1e300)
    tiny = DecodedDelta(dim=2, indices=None, values=np.array([1e-300, 1e-300]))
    assert tiny.l2_norm() == pytest.approx(math.sqrt(2) * 1e-300)


def test_decoded_delta_validates_shapes() -> None:
    with pytest.raises(ValueError):
        DecodedDelta(dim=3, indices=None, values=np.zeros(2))
    with pytest.raises(ValueError):
        DecodedDelta(dim=3, indices=np.array([0, 1]), values=np.zeros(1))
    with pytest.raises(ValueError):
        DecodedDelta(dim=3, indices=None, values=np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError):
        DecodedDelta(dim=3, indices=None, values=np.zeros((3, 1)))


# --------------------------------------------------------------------------- index encodings


def sparse_vector(dim: int, idx: list[int]) -> np.ndarray:
    x = np.zeros(dim)
    x[idx] = np.arange(len(idx), 0, -1, dtype=np.float64) + 1.0
    return x


@pytest.mark.parametrize(
    ("dim", "idx", "encoding", "index_bytes"),
    [
        (1000, [0, 5, 999], IDX_ABS16, 2),
        (65536, [0, 65535], IDX_ABS16, 2),  # largest dim whose indices fit in uint16
        (65537, [3, 65536], IDX_GAP16, 2),  # gap 65533 still fits
        (200_000, [100, 200, 60_000, 120_000, 180_000, 199_999], IDX_GAP16, 2),
        (200_000, [65535, 131070], IDX_GAP16, 2),  # first index and gap both exactly 65535
        (200_000, [0, 65536], IDX_ABS32, 4),  # gap of 65536 no longer fits
        (200_000, [0, 150_000], IDX_ABS32, 4),
        (200_000, [65536, 65537], IDX_ABS32, 4),  # first index too large for uint16
    ],
)
def test_index_encoding_choice_and_round_trip(
    dim: int, idx: list[int], encoding: int, index_bytes: int
) -> None:
    x = sparse_vector(dim, idx)
    blob = encode(x, CompressionConfig("topk16", len(idx) / dim))
    assert header(blob)[2] == encoding
    assert len(blob) == HEADER.size + len(idx) * (index_bytes + 2)
    d = decode(blob, expected_dim=dim)
    assert d.indices is not None
    assert d.indices.tolist() == idx
    assert np.allclose(d.to_dense(), x, rtol=FP16_REL, atol=0)


def test_topk_1_percent_of_100k_is_under_3_percent_of_dense_float32() -> None:
    x = np.random.default_rng(6).standard_normal(100_000)
    blob = encode(x, CompressionConfig("topk16", 0.01))
    assert dense_float32_bytes(100_000) == 400_000
    assert len(blob) <= 0.03 * dense_float32_bytes(100_000)
    assert decode(blob, expected_dim=100_000).nnz == 1000


def test_dense_float32_bytes() -> None:
    assert dense_float32_bytes(0) == 0
    assert dense_float32_bytes(12345) == 49380
    with pytest.raises(ValueError):
        dense_float32_bytes(-1)


def test_topk_of_a_large_vector_round_trips() -> None:
    # Speed is measured in bench/, not asserted here; this keeps the large-vector path.
    x = np.random.default_rng(7).standard_normal(100_000)
    d = decode(encode(x, CompressionConfig("topk16", 0.01)), expected_dim=x.size)
    expected = np.sort(np.argsort(np.abs(x))[-1000:])
    assert d.indices is not None
    np.testing.assert_array_equal(d.indices, expected)
    np.testing.assert_allclose(d.values, x[expected], rtol=FP16_REL, atol=0)


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("mode", ["topk16", "dense16", "dense32"])
def test_feedback_conserves_the_total(mode: str) -> None:
    rng = np.random.default_rng(8)
    dim, steps = 2000, 60
    cfg = CompressionConfig(mode, 0.02)  # type: ignore[arg-type]
    residual = None
    sent = np.zeros(dim)
    total = np.zeros(dim)
    for _ in range(steps):
        delta = rng.standard_normal(dim) * rng.uniform(1e-4, 1.0)
        total += delta
        blob, residual = compress_with_feedback(delta, residual, cfg)
        assert residual.dtype == np.float64 and residual.shape == (dim,)
        sent += decode(blob, expected_dim=dim).to_dense()
    assert residual is not None
    assert np.abs(residual).max() > 0  # something really was held back
    np.testing.assert_allclose(sent + residual, total, rtol=1e-12, atol=1e-12)


def test_feedback_tracks_the_true_sum_better_than_plain_topk() -> None:
    rng = np.random.default_rng(9)
    dim, steps = 1000, 200
    cfg = CompressionConfig("topk16", 0.05)
    # A few large noisy coordinates dominate every step; the many small ones drift
    # consistently and plain top-k never sends them.
    drift = rng.uniform(0.01, 0.05, dim) * rng.choice([-1.0, 1.0], dim)
    residual = None
    with_fb = np.zeros(dim)
    without = np.zeros(dim)
    total = np.zeros(dim)
    for _ in range(steps):
        delta = drift.copy()
        delta[:10] += rng.standard_normal(10) * 5.0
        total += delta
        blob, residual = compress_with_feedback(delta, residual, cfg)
        with_fb += decode(blob, expected_dim=dim).to_dense()
        without += decode(encode(delta, cfg), expected_dim=dim).to_dense()
    err_fb = np.linalg.norm(with_fb - total)
    err_plain = np.linalg.norm(without - total)
    assert err_fb < 0.25 * err_plain


def test_feedback_validates_residual() -> None:
    cfg = CompressionConfig()
    with pytest.raises(ValueError):
        compress_with_feedback(np.ones(5), np.ones(4), cfg)
    with pytest.raises(ValueError):
        compress_with_feedback(np.ones(5), np.full(5, np.nan), cfg)


def test_feedback_none_residual_equals_zero_residual() -> None:
    x = np.random.default_rng(10).standard_normal(100)
    cfg = CompressionConfig("topk16", 0.1)
    b1, r1 = compress_with_feedback(x, None, cfg)
    b2, r2 = compress_with_feedback(x, np.zeros(100), cfg)
    assert b1 == b2 and np.array_equal(r1, r2)
    assert np.allclose(decode(b1, expected_dim=100).to_dense() + r1, x, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- hostile blobs


def valid_topk_blob(dim: int = 10, idx: tuple[int, ...] = (2, 5)) -> bytes:
    return encode(sparse_vector(dim, list(idx)), CompressionConfig("topk16", len(idx) / dim))


def test_rejects_short_and_foreign_blobs() -> None:
    assert reject_reason(b"", 10) == "malformed"
    assert reject_reason(b"FLC1", 10) == "malformed"
    assert reject_reason(valid_topk_blob()[: HEADER.size - 1], 10) == "malformed"
    assert reject_reason(with_field(valid_topk_blob(), magic=b"FLC2"), 10) == "malformed"
    assert reject_reason("not bytes", 10) == "malformed"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"mode": 0}, "malformed"),
        ({"mode": 5}, "malformed"),
        ({"idx": 0}, "malformed"),  # topk needs indices
        ({"idx": 4}, "malformed"),
        ({"reserved": 1}, "malformed"),
        ({"reserved": 0x8000}, "malformed"),
        ({"dim": 11}, "shape_mismatch"),
        ({"dim": 9}, "shape_mismatch"),
        ({"k": 0}, "malformed"),
        ({"k": 11}, "malformed"),
        ({"k": 3}, "malformed"),  # length no longer matches
        ({"k": 2**32 - 1}, "malformed"),
        ({"scale": float("nan")}, "non_finite"),
        ({"scale": float("inf")}, "non_finite"),
        ({"scale": 0.0}, "non_finite"),
        ({"scale": -1.0}, "non_finite"),
    ],
)
def test_rejects_bad_topk_header_fields(fields: dict[str, object], reason: str) -> None:
    assert reject_reason(with_field(valid_topk_blob(), **fields), 10) == reason


@pytest.mark.parametrize("idx_code", [IDX_GAP16, IDX_ABS16, IDX_ABS32])
def test_rejects_k_out_of_range_even_when_length_matches(idx_code: int) -> None:
    # k = 0 with an empty body and k > dim with a full body both have a matching length.
    assert reject_reason(pack(mode=1, idx=idx_code, dim=10, k=0), 10) == "malformed"
    size = 4 if idx_code == IDX_ABS32 else 2
    body = np.ones(11, dtype="<u4" if size == 4 else "<u2").tobytes() + bytes(2 * 11)
    assert reject_reason(pack(mode=1, idx=idx_code, dim=10, k=11) + body, 10) == "malformed"
    assert reject_reason(pack(mode=2, idx=IDX_NONE, dim=10, k=0), 10) == "malformed"


def test_dense_header_rules() -> None:
    for mode in ("dense16", "dense32", "dense64"):
        blob = encode(np.arange(10.0), CompressionConfig(mode))  # type: ignore[arg-type]
        assert header(blob)[2] == IDX_NONE
        assert reject_reason(with_field(blob, idx=IDX_ABS16), 10) == "malformed"
        assert reject_reason(with_field(blob, k=9), 10) == "malformed"
        assert reject_reason(blob + b"\0", 10) == "malformed"
        assert reject_reason(blob[:-1], 10) == "malformed"
    for mode in ("dense32", "dense64"):
        blob = encode(np.arange(10.0), CompressionConfig(mode))  # type: ignore[arg-type]
        assert reject_reason(with_field(blob, scale=2.0), 10) == "malformed"


def test_oversized_dim_refused_even_when_expected() -> None:
    blob = encode(np.ones(1000), CompressionConfig("dense32"))
    assert reject_reason(blob, 1000, max_dim=999) == "oversized"
    assert decode(blob, expected_dim=1000, max_dim=1000).dim == 1000


@pytest.mark.parametrize(
    ("idx_code", "raw", "dim"),
    [
        (IDX_ABS16, [3, 3], 10),  # duplicate
        (IDX_ABS16, [5, 3], 10),  # decreasing
        (IDX_ABS16, [3, 10], 10),  # out of range
        (IDX_ABS32, [0, 2**32 - 1], 10),  # out of range
        (IDX_ABS32, [7, 7], 70_000),
        (IDX_GAP16, [3, 0], 10),  # zero gap = duplicate
        (IDX_GAP16, [3, 7], 10),  # cumsum 10 out of range
        (IDX_GAP16, [65535, 65535, 65535], 150_000),  # cumsum past dim, no uint16 wrap
        (IDX_GAP16, [10], 10),
    ],
)
def test_rejects_bad_indices(idx_code: int, raw: list[int], dim: int) -> None:
    dtype = "<u4" if idx_code == IDX_ABS32 else "<u2"
    k = len(raw)
    body = np.array(raw, dtype=dtype).tobytes() + np.ones(k, dtype="<f2").tobytes()
    blob = pack(mode=1, idx=idx_code, dim=dim, k=k) + body
    assert reject_reason(blob, dim) == "malformed"


def test_accepts_hand_built_gap16_blob() -> None:
    body = np.array([65535, 65535, 2], dtype="<u2").tobytes()
    body += np.array([1.0, -2.0, 0.5], dtype="<f2").tobytes()
    d = decode(
        pack(mode=1, idx=IDX_GAP16, dim=150_000, k=3, scale=0.25) + body, expected_dim=150_000
    )
    assert d.indices is not None
    assert d.indices.tolist() == [65535, 131070, 131072]
    assert d.values.tolist() == [0.25, -0.5, 0.125]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("mode", MODES)
def test_rejects_non_finite_values(bad: float, mode: str) -> None:
    blob = bytearray(encode(np.arange(1.0, 11.0), CompressionConfig(mode, 0.5)))  # type: ignore[arg-type]
    dtype = {"topk16": "<f2", "dense16": "<f2", "dense32": "<f4", "dense64": "<f8"}[mode]
    size = np.dtype(dtype).itemsize
    blob[-size:] = np.array([bad], dtype=dtype).tobytes()
    assert reject_reason(bytes(blob), 10) == "non_finite"


def test_huge_declared_sizes_do_not_allocate() -> None:
    dim = 2**32 - 1
    tiny = [
        pack(mode=1, idx=IDX_ABS32, dim=dim, k=dim) + b"\0" * 64,
        pack(mode=1, idx=IDX_GAP16, dim=dim, k=dim - 1) + b"\0" * 64,
        pack(mode=2, idx=IDX_NONE, dim=dim, k=dim) + b"\0" * 64,
        pack(mode=4, idx=IDX_NONE, dim=dim, k=dim),
    ]
    tracemalloc.start()
    try:
        for blob in tiny:
            assert reject_reason(blob, dim, max_dim=dim) == "malformed"
            assert reject_reason(blob, dim) == "oversized"
            assert reject_reason(blob, 10) == "shape_mismatch"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


# --------------------------------------------------------------------------- properties

finite_arrays = hnp.arrays(
    np.float64,
    st.integers(1, 300),
    elements=st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e-300, -5e-324]),
)
configs = st.builds(
    CompressionConfig,
    mode=st.sampled_from(MODES),
    topk_fraction=st.floats(1e-6, 1.0, exclude_min=True),
)


@FAST
@given(x=finite_arrays, cfg=configs)
def test_property_round_trip(x: np.ndarray, cfg: CompressionConfig) -> None:
    blob = encode(x, cfg)
    d = decode(blob, expected_dim=x.size)
    assert_consistent(d, x.size)
    dense = d.to_dense()
    if cfg.mode == "dense64":
        assert np.array_equal(dense, x)
    elif cfg.mode == "dense32":
        assert np.array_equal(dense, x.astype(np.float32).astype(np.float64))
    else:
        scale = header(blob)[6]
        kept = np.ones(x.size, bool) if d.indices is None else np.zeros(x.size, bool)
        if d.indices is not None:
            kept[d.indices] = True
            raw = cfg.topk_fraction * x.size
            near_int = abs(raw - round(raw)) <= 1e-9 * max(1.0, raw)
            expected = {min(x.size, max(1, math.ceil(raw)))}
            if near_int:  # float noise such as 0.07 * 100 == 7.000000000000001
                expected.add(max(1, round(raw)))
            assert d.nnz in expected
        # Kept coordinates: fp16 relative precision, plus subnormal granularity of the scale.
        err = np.abs(dense - x)
        assert (err[kept] <= FP16_REL * np.abs(x[kept]) + 2.0**-24 * scale).all()
        # Dropped coordinates are never larger than any kept one.
        if not kept.all():
            assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()
            assert not dense[~kept].any()


@FAST
@given(data=st.binary(max_size=200), expected_dim=st.integers(1, 100))
def test_property_arbitrary_bytes(data: bytes, expected_dim: int) -> None:
    decode_or_reject(data, expected_dim)
    decode_or_reject(b"FLC1" + data, expected_dim)


@FAST
@given(
    mode=st.integers(0, 6),
    idx=st.integers(0, 5),
    reserved=st.sampled_from([0, 0, 1, 65535]),
    dim=st.integers(1, 40) | st.sampled_from([65536, 65537, 2**31, 2**32 - 1]),
    k=st.integers(0, 40) | st.sampled_from([2**31, 2**32 - 1]),
    scale=st.floats(width=32) | st.just(1.0),
    body=st.binary(max_size=400),
)
def test_property_random_headers(
    mode: int, idx: int, reserved: int, dim: int, k: int, scale: float, body: bytes
) -> None:
    blob = pack(mode=mode, idx=idx, reserved=reserved, dim=dim, k=k, scale=scale) + body
    decode_or_reject(blob, dim, max_dim=2**32)
    decode_or_reject(blob, 7)


@st.composite
def mutated_blobs(draw: st.DrawFn) -> tuple[bytes, int]:
    x = draw(finite_arrays)
    cfg = draw(configs)
    blob = encode(x, cfg)
    kind = draw(st.sampled_from(["truncate", "flip", "field", "extend"]))
    if kind == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        pos = draw(st.integers(0, len(blob) - 1))
        mask = draw(st.integers(1, 255))
        blob = blob[:pos] + bytes([blob[pos] ^ mask]) + blob[pos + 1 :]
    elif kind == "extend":
        blob += draw(st.binary(min_size=1, max_size=16))
    else:
        name = draw(st.sampled_from(["mode", "idx", "reserved", "dim", "k", "scale"]))
        value: object
        if name == "scale":
            value = draw(st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 2.0, 1e-45]))
        elif name in ("mode", "idx"):
            value = draw(st.integers(0, 255))
        elif name == "reserved":
            value = draw(st.integers(1, 65535))
        else:
            value = draw(st.integers(0, 2**32 - 1) | st.sampled_from([0, x.size + 1]))
        blob = with_field(blob, **{name: value})
    return blob, x.size


@FAST
@given(case=mutated_blobs())
def test_property_mutated_blobs(case: tuple[bytes, int]) -> None:
    blob, dim = case
    decode_or_reject(blob, dim)
    decode_or_reject(blob, dim, max_dim=2**32)

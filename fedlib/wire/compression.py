"""Compact wire encoding of model deltas: top-k sparsification with fp16 values.

Devices are often on slow links, so a delta is shrunk before sealing: only the
largest coordinates are sent (Deep Gradient Compression), with error feedback so the
dropped mass is not lost but carried into the next update. Dense modes exist for
small vectors and for sufficient statistics that must stay exact (``dense64``).

The server decodes blobs that came from untrusted devices, so :func:`decode` checks
every header field and the exact total length *before* allocating anything sized by
the header, and refuses with :class:`~fedlib.errors.RejectedUpdate`.

Wire format (little-endian)::

    header  = magic b"FLC1" | u8 mode | u8 index encoding | u16 reserved (0)
              | u32 dim | u32 k | f32 scale                        (20 bytes)
    indices = k entries (topk16 only), see ``_IDX_*``
    values  = k entries: float16 (value / scale), float32 or float64
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np

from fedlib.errors import RejectedUpdate

Mode = Literal["topk16", "dense16", "dense32", "dense64"]

MAGIC: Final[bytes] = b"FLC1"
_HEADER: Final[struct.Struct] = struct.Struct("<4sBBHIIf")
HEADER_SIZE: Final[int] = _HEADER.size
_U32_MAX: Final[int] = 2**32 - 1

_MODE_CODES: Final[dict[str, int]] = {"topk16": 1, "dense16": 2, "dense32": 3, "dense64": 4}
_CODE_MODES: Final[dict[int, str]] = {v: k for k, v in _MODE_CODES.items()}
# Little-endian value dtype on the wire, per mode code.
_VALUE_DTYPES: Final[dict[int, str]] = {1: "<f2", 2: "<f2", 3: "<f4", 4: "<f8"}

# Index encodings. Dense modes carry none; topk16 picks the most compact one.
_IDX_NONE: Final[int] = 0
_IDX_GAP16: Final[int] = 1  # first index, then differences, each uint16
_IDX_ABS16: Final[int] = 2  # absolute uint16 (only possible when dim <= 65536)
_IDX_ABS32: Final[int] = 3  # absolute uint32
_INDEX_DTYPES: Final[dict[int, str]] = {_IDX_GAP16: "<u2", _IDX_ABS16: "<u2", _IDX_ABS32: "<u4"}

# 16-bit modes map the largest |value| to about 2**15: far below the fp16 maximum
# (65504) so rounding can't overflow, and high enough that small deltas keep full
# fp16 precision instead of underflowing to subnormals.
_FP16_TARGET: Final[float] = 2.0**15
_F32 = np.finfo(np.float32)
_F32_TINY: Final[float] = float(_F32.tiny)


@dataclass(frozen=True)
class CompressionConfig:
    """How a device encodes its delta; ``topk_fraction`` only matters for ``topk16``."""

    mode: Mode = "topk16"
    topk_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ValueError(f"unknown compression mode {self.mode!r}")
        f = self.topk_fraction
        if isinstance(f, bool) or not isinstance(f, int | float):
            raise ValueError(f"topk_fraction must be a number, got {f!r}")
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise ValueError(f"topk_fraction must be in (0, 1], got {f!r}")


@dataclass(frozen=True)
class DecodedDelta:
    """A validated delta; sparse (``indices`` set) or dense (``indices is None``).

    Arrays are private read-only copies, so later changes to the blob can't alter
    an update that was already validated. Values are float64 whatever the wire
    dtype: widening once here is cheaper than mixed-dtype arithmetic in every pass
    after it (measured in ``bench.aggregate``).
    """

    dim: int
    indices: np.ndarray | None
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.values.ndim != 1 or self.values.dtype != np.float64:
            raise ValueError("values must be a 1-D float64 array")
        if self.indices is None:
            if self.values.shape[0] != self.dim:
                raise ValueError("dense values must have length dim")
        elif (
            self.indices.ndim != 1
            or self.indices.dtype != np.int64
            or self.indices.shape != self.values.shape
        ):
            raise ValueError("indices must be a 1-D int64 array as long as values")

    def to_dense(self) -> np.ndarray:
        """The full float64 vector of length ``dim`` (a fresh, writable array)."""
        if self.indices is None:
            return self.values.copy()
        out = np.zeros(self.dim, dtype=np.float64)
        out[self.indices] = self.values
        return out

    def l2_norm(self) -> float:
        """Euclidean norm (computed once: the values are read-only); inf or NaN if a value
        is; huge or subnormal values are rescaled so that their squares don't overflow to
        inf or underflow to 0.

        np.dot (BLAS ddot, 10 us per 100k values; einsum takes 26). Rounds run it with
        BLAS limited to one thread (``fedlib.server.aggregation.single_threaded_blas``)."""
        cached = self.__dict__.get("_l2_norm")
        if cached is None:
            cached = _l2_norm(self.values)
            self.__dict__["_l2_norm"] = cached  # frozen: no __setattr__
        return cached

    def scaled(self, factor: float) -> DecodedDelta:
        """The same delta times ``factor``."""
        return DecodedDelta(self.dim, self.indices, self.values * factor)

    @property
    def nnz(self) -> int:
        """Number of transmitted coordinates: ``k`` for topk16, ``dim`` for dense modes."""
        return int(self.values.shape[0])


def dense_float32_bytes(dim: int) -> int:
    """Size of the same vector sent uncompressed as float32, the baseline in reports."""
    if dim < 0:
        raise ValueError("dim must be >= 0")
    return int(dim) * 4


def _topk_count(dim: int, fraction: float) -> int:
    """``max(1, ceil(fraction * dim))``, tolerant of float noise such as 0.07 * 100."""
    x = fraction * dim
    r = round(x)
    k = r if abs(x - r) <= 1e-9 * max(1.0, x) else math.ceil(x)
    return min(dim, max(1, k))


def _as_delta(delta: np.ndarray) -> np.ndarray:
    """The sender's delta as finite 1-D float64; ValueError is the sender's own bug."""
    arr = np.asarray(delta)
    if arr.ndim != 1:
        raise ValueError(f"delta must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"delta must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError("delta must not be empty")
    if arr.shape[0] > _U32_MAX:
        raise ValueError("delta too long for the wire format")
    out = arr.astype(np.float64, copy=False)
    if not np.isfinite(out).all():
        raise ValueError("delta contains non-finite values")
    return out


def _fp16_scale(max_abs: float) -> float:
    """The float32 scale that maps ``max_abs`` to about 2**15 (1.0 for an all-zero delta)."""
    if max_abs == 0.0:
        return 1.0
    # Clamp to the smallest normal float32: deltas below ~4e-34 lose relative precision,
    # which is harmless and keeps the scale exactly representable.
    with np.errstate(over="ignore"):
        scale = float(np.float32(max(max_abs / _FP16_TARGET, _F32_TINY)))
    if not math.isfinite(scale):
        raise ValueError(f"delta magnitude {max_abs!r} too large for 16-bit modes")
    return scale


def _pick_index_encoding(indices: np.ndarray, dim: int) -> tuple[int, np.ndarray]:
    """The most compact index encoding for sorted ``indices`` and its wire array."""
    if dim <= 65536:
        return _IDX_ABS16, indices.astype("<u2")
    gaps = np.diff(indices, prepend=0)
    if int(gaps.max()) < 65536:
        return _IDX_GAP16, gaps.astype("<u2")
    return _IDX_ABS32, indices.astype("<u4")


def encode(delta: np.ndarray, config: CompressionConfig) -> bytes:
    """Serialize ``delta`` per ``config``; lossy except for ``dense64``."""
    x = _as_delta(delta)
    dim = int(x.shape[0])
    mode = _MODE_CODES[config.mode]
    scale = 1.0
    idx_code = _IDX_NONE
    idx_bytes = b""
    if config.mode == "topk16":
        k = _topk_count(dim, config.topk_fraction)
        mags = np.abs(x)
        if k < dim:
            sel = np.argpartition(mags, dim - k)[dim - k :]
            sel.sort()
        else:
            sel = np.arange(dim, dtype=np.int64)
        vals = x[sel]
        scale = _fp16_scale(float(mags[sel].max()))
        idx_code, wire_idx = _pick_index_encoding(sel.astype(np.int64, copy=False), dim)
        idx_bytes = wire_idx.tobytes()
        val_bytes = (vals / scale).astype("<f2").tobytes()
    elif config.mode == "dense16":
        k = dim
        scale = _fp16_scale(float(np.abs(x).max()))
        val_bytes = (x / scale).astype("<f2").tobytes()
    elif config.mode == "dense32":
        k = dim
        with np.errstate(over="ignore"):
            v32 = x.astype("<f4")
        if not np.isfinite(v32).all():
            raise ValueError("delta exceeds the float32 range; use dense64")
        val_bytes = v32.tobytes()
    else:
        k = dim
        val_bytes = x.astype("<f8").tobytes()
    header = _HEADER.pack(MAGIC, mode, idx_code, 0, dim, k, scale)
    return b"".join((header, idx_bytes, val_bytes))


def decode(blob: bytes, *, expected_dim: int, max_dim: int = 50_000_000) -> DecodedDelta:
    """Parse an untrusted blob; every refusal is a :class:`RejectedUpdate`.

    Sizes declared in the header are checked against ``expected_dim``, ``max_dim``
    and the actual blob length before any array is built, so a tiny blob claiming a
    huge vector costs nothing.
    """
    if expected_dim < 1 or max_dim < 1:
        raise ValueError("expected_dim and max_dim must be >= 1")
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise RejectedUpdate("malformed", f"blob must be bytes, got {type(blob).__name__}")
    buf = bytes(blob)
    if len(buf) < HEADER_SIZE:
        raise RejectedUpdate("malformed", f"blob of {len(buf)} bytes is shorter than the header")
    magic, mode, idx_code, reserved, dim, k, scale = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise RejectedUpdate("malformed", "bad magic")
    if mode not in _CODE_MODES:
        raise RejectedUpdate("malformed", f"unknown mode code {mode}")
    sparse = _CODE_MODES[mode] == "topk16"
    if (idx_code not in _INDEX_DTYPES) if sparse else (idx_code != _IDX_NONE):
        raise RejectedUpdate("malformed", f"index encoding {idx_code} invalid for this mode")
    if reserved != 0:
        raise RejectedUpdate("malformed", "reserved header field is not zero")
    if dim != expected_dim:
        raise RejectedUpdate("shape_mismatch", f"dim {dim} != expected {expected_dim}")
    if dim > max_dim:
        raise RejectedUpdate("oversized", f"dim {dim} exceeds the limit {max_dim}")
    if sparse and not 1 <= k <= dim:
        raise RejectedUpdate("malformed", f"k={k} outside [1, dim={dim}]")
    if not sparse and k != dim:
        raise RejectedUpdate("malformed", f"dense blob with k={k} != dim={dim}")
    val_dtype = np.dtype(_VALUE_DTYPES[mode])
    idx_dtype = np.dtype(_INDEX_DTYPES[idx_code]) if sparse else None
    idx_size = idx_dtype.itemsize if idx_dtype is not None else 0
    expected_len = HEADER_SIZE + k * (idx_size + val_dtype.itemsize)
    if len(buf) != expected_len:
        raise RejectedUpdate(
            "malformed", f"blob is {len(buf)} bytes, header implies {expected_len}"
        )
    if not (math.isfinite(scale) and scale > 0.0):
        raise RejectedUpdate("non_finite", f"scale {scale!r} is not finite and positive")
    if val_dtype.itemsize > 2 and scale != 1.0:
        raise RejectedUpdate("malformed", "scale must be 1.0 in dense32/dense64 modes")

    indices: np.ndarray | None = None
    offset = HEADER_SIZE
    if idx_dtype is not None:
        raw = np.frombuffer(buf, dtype=idx_dtype, count=k, offset=offset).astype(np.int64)
        offset += k * idx_size
        if idx_code == _IDX_GAP16:
            if k > 1 and not raw[1:].all():
                raise RejectedUpdate("malformed", "zero gap: duplicate index")
            indices = np.cumsum(raw)
        else:
            if k > 1 and not (np.diff(raw) > 0).all():
                raise RejectedUpdate("malformed", "indices are not strictly increasing")
            indices = raw
        if int(indices[-1]) >= dim:
            raise RejectedUpdate("malformed", f"index {int(indices[-1])} out of range [0, {dim})")
        indices.flags.writeable = False

    values = np.frombuffer(buf, dtype=val_dtype, count=k, offset=offset).astype(np.float64)
    if scale != 1.0:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are refused just below
            values *= scale
    values.flags.writeable = False
    delta = DecodedDelta(dim=dim, indices=indices, values=values)
    if not math.isfinite(delta.l2_norm()):  # one pass, kept: not finite iff a value is not
        raise RejectedUpdate("non_finite", "values contain NaN or infinity")
    return delta


def _l2_norm(values: np.ndarray) -> float:
    """Euclidean norm of float64 ``values``: NaN or inf iff a value is NaN or inf."""
    norm = math.sqrt(float(np.dot(values, values)))
    if (math.isinf(norm) and np.isfinite(values).all()) or (
        norm == 0.0 and values.any()  # squares of subnormals underflow
    ):
        m = float(np.max(np.abs(values)))
        unit = values / m
        norm = m * math.sqrt(float(np.dot(unit, unit)))
    return norm


def compress_with_feedback(
    delta: np.ndarray, residual: np.ndarray | None, config: CompressionConfig
) -> tuple[bytes, np.ndarray]:
    """Encode ``delta + residual`` and return what was lost as the next residual.

    Error feedback (Deep Gradient Compression): both the dropped coordinates and the
    fp16 rounding error are carried forward, so nothing is lost over many rounds.
    """
    x = _as_delta(delta)
    if residual is None:
        acc = x.copy()
    else:
        r = _as_delta(residual)
        if r.shape != x.shape:
            raise ValueError(f"residual shape {r.shape} != delta shape {x.shape}")
        acc = x + r
    blob = encode(acc, config)
    dim = int(x.shape[0])
    sent = decode(blob, expected_dim=dim, max_dim=dim).to_dense()
    return blob, acc - sent

"""On-device personalization: a per-device calibration of the global model.

Why: what is normal differs per device. The fleet model learns the union of every
device's behaviour, so a window that is ordinary on a web server but has never happened
on this database host looks normal to it (on the synthetic fleet the global model
scores such "foreign profile" windows near chance). Each device fixes that with its own
rows, and nothing of it leaves the device:

* the global score is standardized by the device's own benign score distribution
  (robust z of the log score: median and MAD), i.e. "how unusual for *this* device";
* a local Gaussian of the device's own features (in the global model's scaled space;
  covariance shrunk toward its diagonal plus a variance floor, so a few hundred rows
  are enough) gives a squared Mahalanobis distance, standardized the same way from
  out-of-fold scores (k-fold cross-fitting: in-sample distances are optimistic and
  would give too many false alarms);
* combined score ``w * z_global + (1 - w) * z_local``;
* a per-device threshold: the conformal ``1 - false_alarm_rate`` quantile of the
  combined out-of-fold scores of the device's own rows, so a fresh benign window is
  flagged with about that probability.

The fitted rows are the device's own history (the rows it trains on), assumed mostly
benign: the median/MAD tolerate some contamination; anomalies beyond the false-alarm
budget raise the threshold (fewer alarms, not more) unless the opt-in outlier fence is
set. The global model's scores are an input, so this works for every model kind and
uses what ships (the ONNX graph). Numpy only; stored as JSON (no pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

from fedlib.models.model import FeatureSchema

__all__ = [
    "FORMAT",
    "CalibrationConfig",
    "CalibrationError",
    "DeviceCalibration",
    "fit_calibration",
]

FORMAT: Final[str] = "dadm-fl/device-calibration/1"
_MAD_TO_STD: Final[float] = 1.4826  # MAD of a normal distribution -> its std
_SCALE_FLOOR: Final[float] = 1e-6  # log-score units: a constant score must not divide by 0
_SCORE_FLOOR: Final[float] = 1e-12  # scores are >= 0; log needs > 0
_FOLD_SEED: Final[int] = 0  # fixed: the same rows give the same calibration, bit for bit
_KEYS: Final[frozenset[str]] = frozenset(
    {
        "format",
        "schema",
        "model_version",
        "model_digest",
        "config",
        "num_rows",
        "local_mean",
        "local_whitener",
        "global_center",
        "global_scale",
        "local_center",
        "local_scale",
        "threshold",
        "data_fingerprint",
    }
)


class CalibrationError(ValueError):
    """The calibration cannot be fitted, loaded or applied (the message says why)."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How a device calibrates; the defaults are what the benchmark measured.

    ``false_alarm_rate``: share of the device's own benign windows it may flag.
    ``global_weight``: weight of the standardized global score (the rest is local).
    ``shrinkage``: pull of the local covariance toward its diagonal (0 = sample covariance).
    ``variance_floor``: added to every local variance, in units of the fleet's variance
    (the global schema scales each feature to variance 1), so a template the device
    never logs does not get an infinite weight.
    ``outlier_fence`` (off by default): when more than ``false_alarm_rate`` of the
    device's rows score beyond this many robust standard deviations above the median,
    they are taken for contamination and left out of the threshold. Measured on the
    synthetic fleet, 1% target: with 5% anomalies among the rows, fence 4 lifts detection
    at the threshold from 0.17 to 0.70; but against a heavy-tailed global score (the
    untrained version 1) it took a benign tail for contamination (false alarms up to 13%
    on a device), so it is for devices known to have dirty histories.
    """

    false_alarm_rate: float = 0.01
    global_weight: float = 0.5
    shrinkage: float = 0.5
    variance_floor: float = 0.01
    outlier_fence: float | None = None
    folds: int = 5
    min_rows: int = 20

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alarm_rate < 0.5:
            raise CalibrationError("false_alarm_rate must be in (0, 0.5)")
        if not 0.0 <= self.global_weight <= 1.0:
            raise CalibrationError("global_weight must be in [0, 1]")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise CalibrationError("shrinkage must be in [0, 1]")
        if not (math.isfinite(self.variance_floor) and self.variance_floor > 0.0):
            raise CalibrationError("variance_floor must be a positive number")
        if self.outlier_fence is not None and not self.outlier_fence > 0.0:
            raise CalibrationError("outlier_fence must be positive (or None: no fence)")
        if not isinstance(self.folds, int) or self.folds < 2:
            raise CalibrationError("folds must be an int >= 2")
        if not isinstance(self.min_rows, int) or self.min_rows < 2 * self.folds:
            raise CalibrationError(f"min_rows must be an int >= 2 * folds ({2 * self.folds})")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CalibrationConfig:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise CalibrationError(f"unknown calibration settings: {sorted(unknown)}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise CalibrationError(str(exc)) from None


def _log_scores(scores: np.ndarray) -> np.ndarray:
    """Log of non-negative anomaly scores; NaN counts as +inf (an overflowed model)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=np.inf)
    return np.log(np.maximum(s, _SCORE_FLOOR))


def _robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based scale (std as fallback, then a floor): robust to a few outliers."""
    center = float(np.median(values))
    scale = _MAD_TO_STD * float(np.median(np.abs(values - center)))
    if scale < _SCALE_FLOOR:
        scale = float(np.std(values))
    return center, max(scale, _SCALE_FLOOR)


def _gaussian(z: np.ndarray, config: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, W)`` of the shrunk local Gaussian, ``W W^T = cov^-1`` (Cholesky)."""
    mean = z.mean(axis=0)
    dev = z - mean
    cov = dev.T @ dev / max(z.shape[0] - 1, 1)
    diag = np.diag(np.diag(cov))
    cov = (1.0 - config.shrinkage) * cov + config.shrinkage * diag
    cov[np.diag_indices_from(cov)] += config.variance_floor
    chol = np.linalg.cholesky(cov)  # positive definite: the floor is > 0
    return mean, np.linalg.solve(chol, np.eye(cov.shape[0])).T


def _mahalanobis(z: np.ndarray, mean: np.ndarray, whitener: np.ndarray) -> np.ndarray:
    return np.sum(np.square((z - mean) @ whitener), axis=1)


def _check_scores(global_scores: Any, n: int) -> np.ndarray:
    g = np.asarray(global_scores, dtype=np.float64)
    if g.shape != (n,):
        raise CalibrationError(f"expected {n} global scores (one per row), got shape {g.shape}")
    return g


@dataclass(frozen=True, eq=False)
class DeviceCalibration:
    """One device's calibration of one global model version (see the module docstring)."""

    schema: FeatureSchema
    model_version: int | None
    model_digest: str  # SHA-256 of the global model's ONNX bytes the global stats belong to
    config: CalibrationConfig
    num_rows: int
    local_mean: np.ndarray  # (d,) in the schema's scaled space
    local_whitener: np.ndarray  # (d, d)
    global_center: float
    global_scale: float
    local_center: float
    local_scale: float
    threshold: float
    data_fingerprint: str = ""  # opaque identity of the fitted rows (lets a device skip refits)

    def __post_init__(self) -> None:
        d = self.schema.dim
        if self.local_mean.shape != (d,) or self.local_whitener.shape != (d, d):
            raise CalibrationError(f"local model does not match the {d} schema features")
        values = [
            self.global_center,
            self.global_scale,
            self.local_center,
            self.local_scale,
            self.threshold,
        ]
        if not (
            all(math.isfinite(v) for v in values)
            and np.all(np.isfinite(self.local_mean))
            and np.all(np.isfinite(self.local_whitener))
        ):
            raise CalibrationError("calibration values must be finite")
        if self.global_scale <= 0.0 or self.local_scale <= 0.0:
            raise CalibrationError("calibration scales must be positive")

    @property
    def false_alarm_rate(self) -> float:
        return self.config.false_alarm_rate

    def components(self, x_raw: Any, global_scores: Any) -> tuple[np.ndarray, np.ndarray]:
        """Standardized ``(global, local)`` scores: robust z against this device's benign rows."""
        z = self.schema.apply(x_raw)
        g = _check_scores(global_scores, z.shape[0])
        zg = (_log_scores(g) - self.global_center) / self.global_scale
        d2 = _mahalanobis(z, self.local_mean, self.local_whitener)
        zl = (_log_scores(d2) - self.local_center) / self.local_scale
        return zg, zl

    def score(self, x_raw: Any, global_scores: Any) -> np.ndarray:
        """Personalized anomaly score per row (higher = more anomalous for this device)."""
        zg, zl = self.components(x_raw, global_scores)
        w = self.config.global_weight
        return w * zg + (1.0 - w) * zl

    def flag(self, x_raw: Any, global_scores: Any) -> np.ndarray:
        """Rows above this device's threshold."""
        return self.score(x_raw, global_scores) > self.threshold

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; floats round-trip exactly through ``json``."""
        return {
            "format": FORMAT,
            "schema": self.schema.to_dict(),
            "model_version": self.model_version,
            "model_digest": self.model_digest,
            "config": asdict(self.config),
            "num_rows": self.num_rows,
            "local_mean": [float(v) for v in self.local_mean],
            "local_whitener": [[float(v) for v in row] for row in self.local_whitener],
            "global_center": self.global_center,
            "global_scale": self.global_scale,
            "local_center": self.local_center,
            "local_scale": self.local_scale,
            "threshold": self.threshold,
            "data_fingerprint": self.data_fingerprint,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DeviceCalibration:
        """Inverse of :meth:`to_dict`; refuses other formats, missing or unknown keys."""
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
            raise CalibrationError(f"not a device calibration (expected format {FORMAT!r})")
        if set(raw) != _KEYS:
            missing, extra = sorted(_KEYS - set(raw)), sorted(set(raw) - _KEYS)
            raise CalibrationError(f"calibration keys: missing {missing}, unknown {extra}")
        try:
            version = raw["model_version"]
            return cls(
                schema=FeatureSchema.from_dict(raw["schema"]),
                model_version=None if version is None else int(version),
                model_digest=str(raw["model_digest"]),
                config=CalibrationConfig.from_dict(raw["config"]),
                num_rows=int(raw["num_rows"]),
                local_mean=np.asarray(raw["local_mean"], dtype=np.float64),
                local_whitener=np.asarray(raw["local_whitener"], dtype=np.float64),
                global_center=float(raw["global_center"]),
                global_scale=float(raw["global_scale"]),
                local_center=float(raw["local_center"]),
                local_scale=float(raw["local_scale"]),
                threshold=float(raw["threshold"]),
                data_fingerprint=str(raw["data_fingerprint"]),
            )
        except CalibrationError:
            raise
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"malformed calibration: {exc}") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> DeviceCalibration:
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise CalibrationError(f"calibration is not valid JSON: {exc}") from None
        return cls.from_dict(raw)


def fit_calibration(
    x_raw: Any,
    global_scores: Any,
    schema: FeatureSchema,
    *,
    model_digest: str,
    model_version: int | None = None,
    config: CalibrationConfig | None = None,
    data_fingerprint: str = "",
) -> DeviceCalibration:
    """Fit the device's calibration from its own (mostly benign) rows.

    ``global_scores`` are the global model's scores of the same rows (what ships: the
    ONNX graph). Deterministic: the same rows and scores give the same calibration.
    """
    config = config or CalibrationConfig()
    try:
        z = schema.apply(x_raw)
    except ValueError as exc:
        raise CalibrationError(f"cannot calibrate on these rows: {exc}") from None
    n = int(z.shape[0])
    if n < config.min_rows:
        raise CalibrationError(
            f"calibration needs at least {config.min_rows} rows of the device's own data, got {n}"
        )
    g = _check_scores(global_scores, n)
    if not np.all(np.isfinite(g)):
        raise CalibrationError("the global model's scores of the calibration rows are not finite")

    # Out-of-fold local distances: each row scored by a Gaussian fitted without it.
    folds = np.array_split(np.random.default_rng(_FOLD_SEED).permutation(n), config.folds)
    oof = np.empty(n)
    try:
        for held in folds:
            train = np.ones(n, dtype=bool)
            train[held] = False
            mean_k, w_k = _gaussian(z[train], config)
            oof[held] = _mahalanobis(z[held], mean_k, w_k)
        mean, whitener = _gaussian(z, config)
    except np.linalg.LinAlgError as exc:  # only with absurd magnitudes (inf covariance)
        raise CalibrationError(f"the local model cannot be fitted on these rows: {exc}") from None

    log_g, log_l = _log_scores(g), _log_scores(oof)
    global_center, global_scale = _robust_location_scale(log_g)
    local_center, local_scale = _robust_location_scale(log_l)
    w = config.global_weight
    combined = w * (log_g - global_center) / global_scale
    combined += (1.0 - w) * (log_l - local_center) / local_scale
    # Rows far beyond the bulk are taken for contamination (anomalies in the device's own
    # history) when there are more of them than the false-alarm budget: then they, not the
    # benign tail, would set the threshold.
    kept = combined
    if config.outlier_fence is not None:
        center, scale = _robust_location_scale(combined)
        inside = combined <= center + config.outlier_fence * scale
        if int((~inside).sum()) > config.false_alarm_rate * n:
            kept = combined[inside]
    kept = np.sort(kept)
    # Conformal (split) quantile: the ceil((m + 1)(1 - rate))-th smallest out-of-fold
    # score, so a fresh benign window exceeds it with probability <= rate (exchangeable rows).
    # (With m < 1/rate - 1 there is no such rank: the largest score is the threshold.)
    m = int(kept.size)
    rank = min(m, math.ceil((m + 1) * (1.0 - config.false_alarm_rate) - 1e-9))  # fp slack
    threshold = float(kept[rank - 1])
    return DeviceCalibration(
        schema=schema,
        model_version=model_version,
        model_digest=model_digest,
        config=config,
        num_rows=n,
        local_mean=mean,
        local_whitener=whitener,
        global_center=global_center,
        global_scale=global_scale,
        local_center=local_center,
        local_scale=local_scale,
        threshold=threshold,
        data_fingerprint=data_fingerprint,
    )

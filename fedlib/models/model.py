"""Anomaly models over per-window event-template counts, and their ONNX export.

Every model works on *scaled* features: raw counts -> ``schema.transform`` (``log1p``
by default) -> ``(x - mean) / std``. The scaling constants live in a
:class:`FeatureSchema` built from aggregated sufficient statistics
(:func:`feature_moments` on each device, :meth:`FeatureSchema.from_moments` on the
server), so no raw row ever has to leave a device.

Model kinds sit behind a registry (:data:`KINDS`, :func:`register_kind`): protocol,
aggregation and evaluation only see a flat float64 parameter vector (``params`` /
``set_params``), a row count from ``fit_local`` (the FedAvg weight), ``score`` and the
ONNX bytes from ``to_onnx``. Adding a kind touches nothing outside its class.

The exported ONNX graph does the whole pipeline on **raw** counts, so devices and the
server's holdout evaluation run exactly what ships:

* input ``features``: float32 ``[N, d]`` raw counts (columns in ``schema.names`` order);
* output ``score``: float32 ``[N]``, higher = more anomalous (same definition as
  :meth:`AnomalyModel.score`);
* output ``is_anomaly``: bool ``[N]`` = ``score > threshold``. An uncalibrated model
  (``threshold is None``) is exported with ``+inf``: it scores but flags nothing.

Heavy dependencies are imported lazily: scikit-learn for the autoencoder, ``onnx`` /
``skl2onnx`` only for export (server side), ``onnxruntime`` only for
:func:`onnx_score`. Importing this module needs numpy alone. No pickle anywhere:
a model is fully described by ``(kind, schema.to_dict(), spec, params(), threshold)``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeVar

import numpy as np

from fedlib.wire.vocabulary import TemplateVocabulary

if TYPE_CHECKING:
    from sklearn.neural_network import MLPRegressor

__all__ = [
    "KINDS",
    "ONNX_OPSET",
    "STD_FLOOR",
    "AnomalyModel",
    "AutoencoderModel",
    "FeatureSchema",
    "GaussianMixtureModel",
    "GaussianModel",
    "choose_transform",
    "create_model",
    "feature_moments",
    "load_model",
    "onnx_score",
    "register_kind",
]

Transform = Literal["log1p", "identity"]
TRANSFORMS: Final[tuple[str, ...]] = ("log1p", "identity")
STD_FLOOR: Final[float] = 1e-6
"""Lower bound on a feature's std: a template never seen in training must not divide by 0."""

ONNX_OPSET: Final[int] = 18
"""Default-domain opset of exported graphs (ReduceMean/ReduceSumSquare take axes as input)."""
ONNX_IR_VERSION: Final[int] = 8
"""IR version matching opset 18, readable by every onnxruntime >= 1.14."""
ONNX_INPUT: Final[str] = "features"
ONNX_SCORE: Final[str] = "score"
ONNX_FLAG: Final[str] = "is_anomaly"

_KIND_RE = re.compile(r"^[a-z0-9_]{1,32}$")  # same pattern as protocol.UpdateMeta.model_kind


# --------------------------------------------------------------------------- features


def _transform(x: np.ndarray, transform: str) -> np.ndarray:
    """Apply the per-feature transform in float64."""
    x = np.asarray(x, dtype=np.float64)
    if transform == "log1p":
        return np.log1p(x)
    if transform == "identity":
        return x.copy()
    raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


def _check_raw(x_raw: Any, transform: str, d: int | None = None) -> np.ndarray:
    """Validate a raw feature matrix: 2-D, finite, and non-negative for ``log1p``."""
    x = np.asarray(x_raw, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D matrix, got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"expected {d} feature columns, got {x.shape[1]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinity")
    if transform == "log1p" and x.size and float(x.min()) < 0.0:
        raise ValueError("log1p features are counts and must be non-negative")
    return x


def choose_transform(x_raw: Any) -> Transform:
    """``log1p`` for counts (every value a non-negative integer), else ``identity``.

    Why: per-window event counts are heavy-tailed, and ``log1p`` keeps one busy window
    from dominating the scaling; measurements (lengths, concentrations) are not counts,
    and compressing them hides the anomalies (measured by ``bench.select`` on the
    real-data tables). Decided from the rows the scaling is fitted on, so it needs no
    label and no device row.
    """
    x = np.asarray(x_raw, dtype=np.float64)
    if x.size and np.all(np.isfinite(x)) and float(x.min()) >= 0.0 and np.all(x == np.rint(x)):
        return "log1p"
    return "identity"


def feature_moments(x_raw: Any, transform: str = "log1p") -> tuple[int, np.ndarray, np.ndarray]:
    """Return ``(n, sum, sum of squares)`` of transformed features, float64.

    These are what a device shares to build the scaling: sums are additive across
    devices, so the server gets exact pooled mean/std without seeing a row.
    """
    x = _check_raw(x_raw, transform)
    t = _transform(x, transform)
    return int(t.shape[0]), t.sum(axis=0), np.square(t).sum(axis=0)


@dataclass(frozen=True)
class FeatureSchema:
    """Column names plus the transform and standardization every model applies first.

    ``vocabulary``: when devices count log lines into features, the template vocabulary
    the names come from (:meth:`TemplateVocabulary.feature_names`), signed with the model
    so every device maps a line to the same column."""

    names: list[str]
    transform: Transform
    mean: list[float]
    std: list[float]
    vocabulary: TemplateVocabulary | None = None

    def __post_init__(self) -> None:
        if self.vocabulary is not None and self.names != self.vocabulary.feature_names():
            raise ValueError(
                f"feature names are not those of template vocabulary {self.vocabulary.version}"
            )
        d = len(self.names)
        if d == 0:
            raise ValueError("a feature schema needs at least one feature")
        if len(set(self.names)) != d or not all(isinstance(n, str) for n in self.names):
            raise ValueError("feature names must be distinct strings")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; expected one of {TRANSFORMS}")
        if len(self.mean) != d or len(self.std) != d:
            raise ValueError("mean and std need one entry per feature name")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std must be finite")
        if min(self.std) <= 0.0:
            raise ValueError("std must be positive")

    @property
    def dim(self) -> int:
        """Number of features ``d``."""
        return len(self.names)

    def apply(self, x_raw: Any) -> np.ndarray:
        """Raw counts -> scaled float64 features ``(transform(x) - mean) / std``."""
        x = _check_raw(x_raw, self.transform, self.dim)
        t = _transform(x, self.transform)
        return (t - self._mean_arr()) / self._std_arr()

    def _mean_arr(self) -> np.ndarray:
        return np.asarray(self.mean, dtype=np.float64)

    def _std_arr(self) -> np.ndarray:
        return np.maximum(np.asarray(self.std, dtype=np.float64), STD_FLOOR)

    @classmethod
    def from_moments(
        cls,
        names: Sequence[str],
        transform: Transform,
        n: int,
        s: Any,
        ss: Any,
    ) -> FeatureSchema:
        """Build the schema from (possibly summed) :func:`feature_moments` outputs."""
        if n <= 0:
            raise ValueError("moments need at least one row")
        s_arr = np.asarray(s, dtype=np.float64)
        ss_arr = np.asarray(ss, dtype=np.float64)
        d = len(names)
        if s_arr.shape != (d,) or ss_arr.shape != (d,):
            raise ValueError(f"moment vectors must have shape ({d},)")
        mean = s_arr / n
        var = np.maximum(ss_arr / n - np.square(mean), 0.0)
        std = np.maximum(np.sqrt(var), STD_FLOOR)
        return cls(
            names=list(names),
            transform=transform,
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
        )

    @classmethod
    def from_data(
        cls,
        names: Sequence[str],
        x_raw: Any,
        transform: Transform = "log1p",
        *,
        vocabulary: TemplateVocabulary | None = None,
    ) -> FeatureSchema:
        """Moments of one matrix (the server's holdout at ``fl-admin init``, tests)."""
        n, s, ss = feature_moments(x_raw, transform)
        schema = cls.from_moments(names, transform, n, s, ss)
        return dataclasses.replace(schema, vocabulary=vocabulary) if vocabulary else schema

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; floats round-trip exactly through ``json``. Without a
        vocabulary the key is left out (older packages keep their bytes and digests)."""
        doc: dict[str, Any] = {
            "names": list(self.names),
            "transform": self.transform,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }
        if self.vocabulary is not None:
            doc["vocabulary"] = self.vocabulary.model_dump(mode="json", by_alias=True)
        return doc

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FeatureSchema:
        """Inverse of :meth:`to_dict`; refuses missing or unknown keys."""
        keys = {"names", "transform", "mean", "std"}
        if set(raw) - {"vocabulary"} != keys:
            raise ValueError(f"feature schema keys must be exactly {sorted(keys)} (+ vocabulary)")
        vocabulary = raw.get("vocabulary")
        return cls(
            names=[str(n) for n in raw["names"]],
            transform=raw["transform"],
            mean=[float(v) for v in raw["mean"]],
            std=[float(v) for v in raw["std"]],
            vocabulary=None
            if vocabulary is None
            else TemplateVocabulary.model_validate(vocabulary),
        )


def carried_schema(
    old: FeatureSchema, vocabulary: TemplateVocabulary, benign_raw: Any
) -> tuple[FeatureSchema, list[int | None]]:
    """The feature schema of ``vocabulary`` replacing ``old``'s, and for each new column
    the old column whose parameters carry over (None: a new column).

    A carried column keeps its old standardization, so the parameters fitted in it
    mean what they meant; a new one is standardized by the moments of ``benign_raw``
    (the server's benign holdout rows counted with ``vocabulary``). Which columns carry
    is :meth:`TemplateVocabulary.carried_features`'s decision; without an old
    vocabulary (a model of feature files) none does."""
    names = vocabulary.feature_names()
    carried = vocabulary.carried_features(old.vocabulary) if old.vocabulary else {}
    position = {name: j for j, name in enumerate(old.names)}
    source = [position.get(carried[name]) if name in carried else None for name in names]
    fresh = FeatureSchema.from_data(names, benign_raw, old.transform)
    mean = [old.mean[j] if j is not None else m for j, m in zip(source, fresh.mean, strict=True)]
    std = [old.std[j] if j is not None else s for j, s in zip(source, fresh.std, strict=True)]
    schema = FeatureSchema(names, old.transform, mean, std, vocabulary=vocabulary)
    return schema, source


# --------------------------------------------------------------------------- registry


class AnomalyModel(abc.ABC):
    """One anomaly model kind: flat parameters for FedAvg, a score, an ONNX export."""

    kind: ClassVar[str]
    preferred_compression: ClassVar[str]
    #: True when params are sufficient statistics: the n-weighted mean of local fits is
    #: the pooled fit, so updates travel exactly (dense64) and the server takes a plain
    #: mean (no momentum, no staleness discount beyond what the config says).
    sufficient_statistics: ClassVar[bool] = False
    #: For sufficient-statistics kinds: True when ``fit_local`` ignores the current
    #: params, so one round reaches the pooled fit; False when a round is one step of
    #: an iteration over statistics (EM), run for as many rounds as iterative kinds.
    one_round: ClassVar[bool] = True
    default_spec: ClassVar[Mapping[str, Any]] = {}
    #: Spec keys added after packages were first stored, each with the value that keeps
    #: the behaviour from before it: a stored spec without the key reads as that value
    #: (:func:`load_model`), while a new model gets ``default_spec``.
    legacy_spec: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, schema: FeatureSchema, spec: Mapping[str, Any] | None = None) -> None:
        self.schema = schema
        self.spec: dict[str, Any] = self._resolve_spec(spec)
        self.threshold: float | None = None

    # -- spec -----------------------------------------------------------------
    @classmethod
    def _resolve_spec(cls, spec: Mapping[str, Any] | None) -> dict[str, Any]:
        """Fill defaults, refuse unknown keys, normalize through JSON (so it stays JSON-able)."""
        given = dict(spec or {})
        unknown = set(given) - set(cls.default_spec)
        if unknown:
            raise ValueError(f"unknown {cls.kind} spec keys: {sorted(unknown)}")
        merged = json.loads(json.dumps({**cls.default_spec, **given}))
        cls._check_spec(merged)
        return merged

    @classmethod
    @abc.abstractmethod
    def _check_spec(cls, spec: dict[str, Any]) -> None:
        """Validate hyperparameter values; raise ValueError on nonsense."""

    # -- parameters -----------------------------------------------------------
    @abc.abstractmethod
    def _init_params(self, seed: int) -> None:
        """Set fresh parameters, a deterministic function of ``seed``."""

    @property
    @abc.abstractmethod
    def num_params(self) -> int:
        """Length of the flat parameter vector."""

    @abc.abstractmethod
    def params(self) -> np.ndarray:
        """Float64 1-D copy of all trainable parameters."""

    def set_params(self, vec: Any) -> None:
        """Replace all parameters from a flat vector; ValueError on wrong length/non-finite."""
        arr = np.asarray(vec, dtype=np.float64)
        if arr.ndim != 1 or arr.shape[0] != self.num_params:
            raise ValueError(
                f"{self.kind} expects a 1-D vector of {self.num_params} params, "
                f"got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError("params contain NaN or infinity")
        self._set_params(arr.copy())

    @abc.abstractmethod
    def _set_params(self, vec: np.ndarray) -> None:
        """Install a validated float64 vector (owned by the callee)."""

    def remapped(self, schema: FeatureSchema, source: Sequence[int | None]) -> AnomalyModel:
        """This model on other feature columns (a new template vocabulary): column ``j``
        of ``schema`` is column ``source[j]`` of this model's, whose parameters carry
        over, or new (None). A new column starts where the schema's standardization
        puts it (mean 0, variance 1, independent of the rest) and, until devices train
        on it, has no say in what the carried columns learned. The threshold is unset:
        the caller calibrates it on the new columns."""
        if len(source) != schema.dim:
            raise ValueError(f"source names {len(source)} columns, the schema has {schema.dim}")
        if schema.transform != self.schema.transform:
            raise ValueError("parameters do not carry across a change of transform")
        index = np.array([-1 if j is None else j for j in source], dtype=np.int64)
        if np.any(index >= self.schema.dim) or np.any(index < -1):
            raise ValueError(f"source columns must be below {self.schema.dim}")
        picked = index[index >= 0]
        if np.unique(picked).size != picked.size:
            raise ValueError("an old column can carry into one new column only")
        model = type(self)(schema, self.spec)
        model._init_params(0)
        model._carry(self, index)
        return model

    @abc.abstractmethod
    def _carry(self, old: Any, index: np.ndarray) -> None:
        """Install ``old``'s parameters on the columns ``index >= 0`` (old column
        ``index[j]``), the neutral ones elsewhere."""

    def statistics_reference(self) -> np.ndarray:
        """For sufficient-statistics kinds: the statistics a device's E-step is computed
        against (what a damped server step starts from, see
        :func:`fedlib.server.rounds.stepwise_statistics`); the params themselves unless
        ``fit_local`` first changes them deterministically (a mixture's splits)."""
        return self.params()

    # -- training and scoring -------------------------------------------------
    @abc.abstractmethod
    def fit_local(self, x_raw: Any, *, epochs: int, seed: int) -> int:
        """Train on local raw rows from the current params; return the rows used."""

    @abc.abstractmethod
    def score(self, x_raw: Any) -> np.ndarray:
        """Float64 anomaly score per row, higher = more anomalous."""

    def calibrate_threshold(self, x_benign_raw: Any, quantile: float = 0.99) -> float:
        """Set ``threshold`` to the ``quantile`` of benign scores and return it."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError("quantile must be in (0, 1]")
        scores = self.score(x_benign_raw)
        if scores.size == 0:
            raise ValueError("calibration needs at least one benign row")
        self.threshold = float(np.quantile(scores, quantile))
        return self.threshold

    # -- export ---------------------------------------------------------------
    @abc.abstractmethod
    def _onnx_core(self) -> tuple[list[Any], list[Any], str]:
        """Nodes and initializers mapping scaled ``_fl_z`` to a float32 [N] score.

        Returns ``(nodes, initializers, score_tensor_name)``.
        """

    def to_onnx(self) -> bytes:
        """Serialized ONNX model of the whole raw-counts -> score/flag pipeline.

        Deterministic: the same model gives the same bytes (the server hashes them).
        """
        core_nodes, core_inits, score_name = self._onnx_core()
        return _assemble_onnx(self, core_nodes, core_inits, score_name)

    def _scaled(self, x_raw: Any) -> np.ndarray:
        return self.schema.apply(x_raw)

    def _check_rows(self, z: np.ndarray, epochs: int) -> int:
        n = int(z.shape[0])
        if n == 0:
            raise ValueError("fit_local needs at least one row")
        if epochs < 1:
            raise ValueError("epochs must be >= 1")
        return n


KINDS: dict[str, type[AnomalyModel]] = {}
"""Registered model kinds by name; populate with :func:`register_kind`."""

_M = TypeVar("_M", bound=type[AnomalyModel])


def register_kind(cls: _M) -> _M:
    """Class decorator adding a model kind to :data:`KINDS` under ``cls.kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"model kind must match {_KIND_RE.pattern}, got {kind!r}")
    if not isinstance(getattr(cls, "preferred_compression", None), str):
        raise ValueError(f"model kind {kind!r} must set preferred_compression")
    existing = KINDS.get(kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"model kind {kind!r} is already registered")
    KINDS[kind] = cls
    return cls


def _kind_class(kind: str) -> type[AnomalyModel]:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}") from None


def create_model(
    kind: str,
    schema: FeatureSchema,
    *,
    spec: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> AnomalyModel:
    """A fresh model of ``kind``; its params are a deterministic function of ``seed``."""
    model = _kind_class(kind)(schema, spec)
    model._init_params(seed)
    return model


def load_model(
    kind: str,
    schema: FeatureSchema,
    spec: Mapping[str, Any] | None,
    params: Any,
    threshold: float | None,
) -> AnomalyModel:
    """Rebuild a model from its stored description (no pickle involved).

    A stored spec that predates a key reads it as the kind's ``legacy_spec`` value, so an
    old package scores exactly as it did when it was published.
    """
    cls = _kind_class(kind)
    model = cls(schema, {**cls.legacy_spec, **(spec or {})})
    model.set_params(params)
    if threshold is not None:
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
    model.threshold = threshold
    return model


# --------------------------------------------------------------------------- autoencoder


def _target(z: np.ndarray) -> np.ndarray:
    """Autoencoder target; scikit-learn wants a 1-D ``y`` for a single output column."""
    return z.ravel() if z.shape[1] == 1 else z


@register_kind
class AutoencoderModel(AnomalyModel):
    """MLP autoencoder (scaled -> scaled); score = mean squared reconstruction error.

    Parameter vector layout (the FedAvg/compression contract): all weight matrices
    ``coefs_[0], coefs_[1], ...`` flattened row-major (shape ``(fan_in, fan_out)``),
    then all biases ``intercepts_[0], intercepts_[1], ...`` — the layer order of
    scikit-learn's own ``_pack``.

    Default shape ``d -> 96 -> 32 -> d`` (8,360 params for d = 40). Why: the code layer
    must stay narrower than the input (one hidden layer of 48+ units learns the identity
    and drops to ~0.90 AUC on the synthetic fleet, 32 gives ~0.975), and a wider encoder
    in front of it makes the vector large enough that top-7.5% + fp16 fits in 10% of the
    dense float32 bytes *including* the ~660-byte sealed-envelope overhead; with the
    2,632-param ``[32]`` net only ~3.5% fits, and that learned too slowly (0.89 vs 0.96
    dense after 60 rounds).

    Learning rate 0.002, local momentum 0.9 and no ``error_clip`` are this kind's
    defaults, searched by ``bench.select`` on validation splits only (five real-data
    tasks and a synthetic validation fleet, bench/results/selection.json); the same
    search chose the Gaussian mixture (``gmm``) as the deployment's default kind.
    ``error_clip`` caps each feature's squared error in the score at ``error_clip**2``
    (0 = no cap) so that one feature far outside what training saw does not outrank
    every real anomaly; a deployment may set it. Packages stored before the key read
    it as 0.
    """

    kind = "autoencoder"
    preferred_compression = "topk16"
    default_spec: ClassVar[Mapping[str, Any]] = {
        "hidden": [96, 32],
        "activation": "tanh",
        "learning_rate_init": 0.002,
        "batch_size": 32,
        "alpha": 1e-4,
        "solver": "sgd",
        "momentum": 0.9,
        "error_clip": 0.0,
    }
    legacy_spec: ClassVar[Mapping[str, Any]] = {"error_clip": 0.0}

    def __init__(self, schema: FeatureSchema, spec: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, spec)
        d = schema.dim
        units = [d, *self.spec["hidden"], d]
        self._shapes: list[tuple[int, int]] = list(itertools.pairwise(units))
        self._est = self._build_estimator()

    @classmethod
    def _check_spec(cls, spec: dict[str, Any]) -> None:
        hidden = spec["hidden"]
        if (
            not isinstance(hidden, list)
            or not hidden
            or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)
        ):
            raise ValueError("hidden must be a non-empty list of positive ints")
        if spec["activation"] not in ("tanh", "relu", "logistic", "identity"):
            raise ValueError(f"unsupported activation {spec['activation']!r}")
        if not float(spec["learning_rate_init"]) > 0.0:
            raise ValueError("learning_rate_init must be positive")
        bs = spec["batch_size"]
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ValueError("batch_size must be a positive int")
        if not float(spec["alpha"]) >= 0.0:
            raise ValueError("alpha must be >= 0")
        if spec["solver"] not in ("adam", "sgd"):
            raise ValueError(f"unsupported solver {spec['solver']!r}")
        if not 0.0 <= float(spec["momentum"]) < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        clip = spec["error_clip"]
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0.0 <= clip < 1e6:
            raise ValueError("error_clip must be a number >= 0 (0 = no cap)")

    def _build_estimator(self) -> MLPRegressor:
        """An MLPRegressor with its internal structure built (weights overwritten later).

        One ``partial_fit`` on a zero row allocates ``coefs_``/``intercepts_`` and the
        bookkeeping; ``shuffle=False`` because :meth:`fit_local` shuffles with its own
        seed, ``max_iter=1`` so each ``partial_fit`` is exactly one pass.
        """
        from sklearn.neural_network import MLPRegressor

        est = MLPRegressor(
            hidden_layer_sizes=tuple(self.spec["hidden"]),
            activation=self.spec["activation"],
            solver=self.spec["solver"],
            momentum=float(self.spec["momentum"]),
            alpha=float(self.spec["alpha"]),
            batch_size=1,
            learning_rate_init=float(self.spec["learning_rate_init"]),
            max_iter=1,
            shuffle=False,
            random_state=0,
        )
        zero = np.zeros((1, self.schema.dim), dtype=np.float64)
        est.partial_fit(zero, _target(zero))
        return est

    @property
    def num_params(self) -> int:
        return sum(fi * fo + fo for fi, fo in self._shapes)

    def _init_params(self, seed: int) -> None:
        """Glorot-uniform weights and biases, as scikit-learn draws them, from ``seed``."""
        rng = np.random.default_rng(seed)
        factor = 2.0 if self.spec["activation"] == "logistic" else 6.0
        coefs, intercepts = [], []
        for fi, fo in self._shapes:
            bound = math.sqrt(factor / (fi + fo))
            coefs.append(rng.uniform(-bound, bound, (fi, fo)))
            intercepts.append(rng.uniform(-bound, bound, fo))
        self._set_params(np.concatenate([c.ravel() for c in coefs] + intercepts))

    def params(self) -> np.ndarray:
        parts = [c.ravel() for c in self._est.coefs_] + [b.ravel() for b in self._est.intercepts_]
        return np.concatenate(parts).astype(np.float64, copy=True)

    def _set_params(self, vec: np.ndarray) -> None:
        coefs: list[np.ndarray] = []
        intercepts: list[np.ndarray] = []
        off = 0
        for fi, fo in self._shapes:
            coefs.append(vec[off : off + fi * fo].reshape(fi, fo).copy())
            off += fi * fo
        for _fi, fo in self._shapes:
            intercepts.append(vec[off : off + fo].copy())
            off += fo
        # partial_fit rebuilds its parameter list from these attributes on every call,
        # so training continues from exactly these arrays.
        self._est.coefs_ = coefs
        self._est.intercepts_ = intercepts
        self._reset_optimizer()

    def _carry(self, old: AutoencoderModel, index: np.ndarray) -> None:
        """The hidden layers as they were; a new column's input weights, output weights
        and output bias are 0, so it changes no code and is reconstructed as its mean."""
        keep = index >= 0
        coefs = [c.copy() for c in old._est.coefs_]
        intercepts = [b.copy() for b in old._est.intercepts_]
        d = self.schema.dim
        first = np.zeros((d, coefs[0].shape[1]))
        first[keep] = coefs[0][index[keep]]
        last = np.zeros((coefs[-1].shape[0], d))
        last[:, keep] = coefs[-1][:, index[keep]]
        bias = np.zeros(d)
        bias[keep] = intercepts[-1][index[keep]]
        coefs[0], coefs[-1], intercepts[-1] = first, last, bias
        self._set_params(np.concatenate([c.ravel() for c in coefs] + intercepts))

    def _reset_optimizer(self) -> None:
        """Drop optimizer state so training depends only on params, data, epochs, seed."""
        if hasattr(self._est, "_optimizer"):
            del self._est._optimizer

    def fit_local(self, x_raw: Any, *, epochs: int, seed: int) -> int:
        """``epochs`` shuffled passes (fresh optimizer state) from the current params.

        The default solver is SGD with momentum: with non-IID clients, Adam's per-client
        step normalization made FedAvg plateau far below centralized training
        (measured on the synthetic fleet: ~0.80 vs ~0.93 AUC after 60 rounds).
        """
        z = self._scaled(x_raw)
        n = self._check_rows(z, epochs)
        self._reset_optimizer()
        self._est.set_params(batch_size=min(int(self.spec["batch_size"]), n))
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            zs = z[rng.permutation(n)]
            self._est.partial_fit(zs, _target(zs))
        self._reset_optimizer()
        self._est.loss_curve_ = []  # bounded memory on long-lived device models
        return n

    def _reconstruct(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(self._est.predict(z), dtype=np.float64).reshape(z.shape)

    def score(self, x_raw: Any) -> np.ndarray:
        z = self._scaled(x_raw)
        if z.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        err = np.square(self._reconstruct(z) - z)
        clip = float(self.spec["error_clip"])
        if clip > 0.0:
            err = np.minimum(err, clip * clip)
        return np.mean(err, axis=1)

    def _onnx_core(self) -> tuple[list[Any], list[Any], str]:
        """skl2onnx's MLPRegressor graph, with its output reshape fixed, plus the MSE score.

        The converter ends with ``Reshape(out, [-1, 1])`` (sklearn-onnx issue 474), which
        flattens a multi-output autoencoder to ``(N*d, 1)``; the shape initializer is
        replaced by ``[-1, d]`` before ``Sub``/``Mul``/``ReduceMean(axis 1)``.
        """
        from onnx import helper, numpy_helper
        from skl2onnx import to_onnx as skl_to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        d = self.schema.dim
        mlp = skl_to_onnx(
            self._est,
            initial_types=[("_fl_z", FloatTensorType([None, d]))],
            target_opset={"": ONNX_OPSET},
        )
        g = mlp.graph
        out_name = g.output[0].name
        reshapes = [n for n in g.node if n.op_type == "Reshape" and n.output[0] == out_name]
        if len(reshapes) != 1:
            raise RuntimeError("unexpected skl2onnx MLPRegressor graph: no final Reshape")
        shape_name = reshapes[0].input[1]
        inits = []
        for init in g.initializer:
            if init.name == shape_name:
                init = numpy_helper.from_array(np.array([-1, d], dtype=np.int64), shape_name)
            inits.append(init)
        nodes = list(g.node)
        nodes += [
            helper.make_node("Sub", [out_name, "_fl_z"], ["_fl_err"], name="_fl_err"),
            helper.make_node("Mul", ["_fl_err", "_fl_err"], ["_fl_sq"], name="_fl_sq"),
        ]
        squared = "_fl_sq"
        clip = float(self.spec["error_clip"])
        if clip > 0.0:
            cap = np.array(clip * clip, dtype=np.float32)
            inits.append(numpy_helper.from_array(cap, "_fl_cap"))
            nodes.append(helper.make_node("Min", [squared, "_fl_cap"], ["_fl_sqc"], name="_fl_cap"))
            squared = "_fl_sqc"
        nodes.append(
            helper.make_node(
                "ReduceMean", [squared, "_fl_axis1"], ["_fl_score"], name="_fl_mse", keepdims=0
            )
        )
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "_fl_axis1"))
        return nodes, inits, "_fl_score"


# --------------------------------------------------------------------------- gaussian


def _whitener(cov: np.ndarray, floor: float) -> tuple[np.ndarray, float]:
    """``(W, log det cov)`` with ``W W^T = cov^-1`` (``W = L^-T`` from Cholesky).

    Averaged or tampered params can make a covariance indefinite; then its eigenvalues
    are clipped at ``floor``.
    """
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh(cov)
        vals = np.maximum(vals, floor)
        return vecs / np.sqrt(vals), float(np.sum(np.log(vals)))
    w = np.linalg.solve(chol, np.eye(cov.shape[0])).T
    return w, 2.0 * float(np.sum(np.log(np.diag(chol))))


@register_kind
class GaussianModel(AnomalyModel):
    """Gaussian model of scaled features; score = squared Mahalanobis distance.

    Params are ``[mu (d), upper triangle incl. diagonal of E[z z^T] (d(d+1)/2, row-major
    np.triu_indices order)]``. Both are plain means, so the row-weighted FedAvg of
    clients' local moments *is* the pooled moment: federated == centralized, exactly.
    Covariance = ``M2 - mu mu^T + ridge * mean(diag) * I`` (the ridge is relative to
    the average variance, so it means the same whatever the feature scale).
    """

    kind = "gaussian"
    preferred_compression = "dense64"
    sufficient_statistics = True
    default_spec: ClassVar[Mapping[str, Any]] = {"ridge": 1e-3}

    def __init__(self, schema: FeatureSchema, spec: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, spec)
        d = schema.dim
        self._triu = np.triu_indices(d)
        self._mu = np.zeros(d, dtype=np.float64)
        self._m2 = np.eye(d, dtype=np.float64)
        self._whitener: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def _check_spec(cls, spec: dict[str, Any]) -> None:
        ridge = spec["ridge"]
        if not isinstance(ridge, int | float) or not 0.0 < float(ridge) < 1e6:
            raise ValueError("ridge must be a positive number")

    @property
    def num_params(self) -> int:
        d = self.schema.dim
        return d + d * (d + 1) // 2

    def _init_params(self, seed: int) -> None:
        """Standard normal in scaled space (what the schema promises); ``seed`` unused."""
        d = self.schema.dim
        self._install(np.zeros(d), np.eye(d))

    def params(self) -> np.ndarray:
        return np.concatenate([self._mu, self._m2[self._triu]]).astype(np.float64, copy=True)

    def _set_params(self, vec: np.ndarray) -> None:
        d = self.schema.dim
        m2 = np.zeros((d, d), dtype=np.float64)
        m2[self._triu] = vec[d:]
        m2 = m2 + np.triu(m2, 1).T
        self._install(vec[:d].copy(), m2)

    def _install(self, mu: np.ndarray, m2: np.ndarray) -> None:
        self._mu = np.asarray(mu, dtype=np.float64)
        self._m2 = np.asarray(m2, dtype=np.float64)
        self._whitener = None

    def _carry(self, old: GaussianModel, index: np.ndarray) -> None:
        """Moments of the carried columns as they were; a new column has mean 0,
        ``E[z^2]`` 1 and no correlation (the moments of N(0, 1) independent of the rest)."""
        keep = np.flatnonzero(index >= 0)
        src = index[keep]
        mu = np.zeros(self.schema.dim)
        mu[keep] = old._mu[src]
        m2 = np.eye(self.schema.dim)
        m2[np.ix_(keep, keep)] = old._m2[np.ix_(src, src)]
        self._install(mu, m2)

    def fit_local(self, x_raw: Any, *, epochs: int, seed: int) -> int:
        """Replace params by the local moments (``epochs``/``seed`` have no effect)."""
        z = self._scaled(x_raw)
        n = self._check_rows(z, epochs)
        self._install(z.sum(axis=0) / n, (z.T @ z) / n)
        return n

    def _whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, W)`` with ``W W^T = cov^-1``, so ``score = ||(z - mu) W||^2``.

        ``W = L^-T`` from the Cholesky factor ``cov = L L^T``. Averaged or tampered params
        can make the covariance indefinite; then eigenvalues are clipped at the ridge.
        """
        if self._whitener is None:
            d = self.schema.dim
            cov = self._m2 - np.outer(self._mu, self._mu)
            cov = 0.5 * (cov + cov.T)
            scale = float(np.trace(cov)) / d
            ridge = float(self.spec["ridge"]) * (scale if scale > 0.0 else 1.0)
            cov[np.diag_indices(d)] += ridge
            w, _ = _whitener(cov, ridge)
            self._whitener = (self._mu.copy(), w)
        return self._whitener

    def score(self, x_raw: Any) -> np.ndarray:
        z = self._scaled(x_raw)
        mu, w = self._whitening()
        return np.sum(np.square((z - mu) @ w), axis=1)

    def _onnx_core(self) -> tuple[list[Any], list[Any], str]:
        from onnx import helper, numpy_helper

        mu, w = self._whitening()
        nodes = [
            helper.make_node("Sub", ["_fl_z", "_fl_mu"], ["_fl_dev"], name="_fl_center"),
            helper.make_node("MatMul", ["_fl_dev", "_fl_w"], ["_fl_white"], name="_fl_whiten"),
            helper.make_node(
                "ReduceSumSquare",
                ["_fl_white", "_fl_axis1"],
                ["_fl_score"],
                name="_fl_mahalanobis",
                keepdims=0,
            ),
        ]
        inits = [
            numpy_helper.from_array(mu.astype(np.float32), "_fl_mu"),
            numpy_helper.from_array(w.astype(np.float32), "_fl_w"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "_fl_axis1"),
        ]
        return nodes, inits, "_fl_score"


# --------------------------------------------------------------------------- gaussian mixture


@register_kind
class GaussianMixtureModel(AnomalyModel):
    """Mixture of full-covariance Gaussians in scaled space, fitted by federated EM.

    Score = ``C - log p(z)`` with ``C`` the largest value ``log p`` can take (the log of
    the sum of the components' peak densities), so scores are >= 0 like every other kind's.

    One round is one EM iteration, exactly: each device runs the E-step under the
    current mixture and sends the row means of its sufficient statistics
    (responsibility ``r``, ``r z``, ``r z z^T`` per component); their row-weighted mean
    is the pooled E-step, so the server's plain mean followed by the M-step in
    :meth:`_mixture` is a centralized EM step whatever the skew between devices.

    Params are those statistics, ``[pi (K), S1 (K*d), S2 (K * d(d+1)/2, upper
    triangles, np.triu_indices order)]``; a component with ``pi`` below
    :attr:`DEAD_WEIGHT` is empty. No data is needed to start: version 1 is one component
    ``N(0, I)`` (what the scaling promises). While fewer than ``components`` are live,
    :meth:`fit_local` first splits the heaviest live components in two along their
    principal axis (mean +- half a standard deviation), a deterministic function of the
    params, so every device splits the same way and the mixture doubles each round until
    it is full (LBG initialisation). A component that empties is refilled the same way.

    ``reg`` is added to every covariance's diagonal, in scaled units (variance 1), after
    ``shrinkage`` pulled each component's covariance towards their weighted mean (a
    component fitted on few rows borrows the shape of all). The defaults (32, 0.01,
    0.25) were chosen by ``bench.select`` on validation splits only
    (bench/results/selection.json), where the best trial beat the autoencoder's default
    by more than one standard error of the per-view differences.
    """

    kind = "gmm"
    preferred_compression = "dense64"
    sufficient_statistics = True
    one_round = False
    default_spec: ClassVar[Mapping[str, Any]] = {
        "components": 32,
        "reg": 0.01,
        "shrinkage": 0.25,
        "min_rows": 10,
    }
    DEAD_WEIGHT: ClassVar[float] = 1e-6
    SPLIT_STEP: ClassVar[float] = 0.5

    def __init__(self, schema: FeatureSchema, spec: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, spec)
        d = schema.dim
        k = int(self.spec["components"])
        self._triu = np.triu_indices(d)
        self._pi = np.zeros(k, dtype=np.float64)
        self._s1 = np.zeros((k, d), dtype=np.float64)
        self._s2 = np.zeros((k, d, d), dtype=np.float64)
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def _check_spec(cls, spec: dict[str, Any]) -> None:
        k = spec["components"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 256:
            raise ValueError("components must be an int in [1, 256]")
        reg = spec["reg"]
        if isinstance(reg, bool) or not isinstance(reg, int | float) or not 0.0 < reg < 1e6:
            raise ValueError("reg must be a positive number")
        min_rows = spec["min_rows"]
        if isinstance(min_rows, bool) or not isinstance(min_rows, int | float) or min_rows < 0:
            raise ValueError("min_rows must be a number >= 0")
        shrink = spec["shrinkage"]
        if isinstance(shrink, bool) or not isinstance(shrink, int | float) or not 0 <= shrink <= 1:
            raise ValueError("shrinkage must be a number in [0, 1]")

    @property
    def num_params(self) -> int:
        d = self.schema.dim
        k = int(self.spec["components"])
        return k * (1 + d + d * (d + 1) // 2)

    def _init_params(self, seed: int) -> None:
        """One live component, ``N(0, I)`` in scaled space; ``seed`` unused."""
        d = self.schema.dim
        pi = np.zeros_like(self._pi)
        pi[0] = 1.0
        s2 = np.zeros_like(self._s2)
        s2[0] = np.eye(d)
        self._install(pi, np.zeros_like(self._s1), s2)

    def params(self) -> np.ndarray:
        upper = self._s2[:, self._triu[0], self._triu[1]]
        return np.concatenate([self._pi, self._s1.ravel(), upper.ravel()]).astype(np.float64)

    def _set_params(self, vec: np.ndarray) -> None:
        d = self.schema.dim
        k = int(self.spec["components"])
        pi = vec[:k].copy()
        s1 = vec[k : k + k * d].reshape(k, d).copy()
        s2 = np.zeros((k, d, d), dtype=np.float64)
        s2[:, self._triu[0], self._triu[1]] = vec[k + k * d :].reshape(k, -1)
        s2 = s2 + np.triu(s2, 1).transpose(0, 2, 1)
        self._install(pi, s1, s2)

    def _install(self, pi: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
        self._pi, self._s1, self._s2 = pi, s1, s2
        self._cache = None

    def _carry(self, old: GaussianMixtureModel, index: np.ndarray) -> None:
        """Each component's statistics of the carried columns as they were; in a new
        column every component is N(0, 1), independent of the rest: ``E[r z] = 0``,
        ``E[r z^2] = pi``, no cross terms."""
        keep = np.flatnonzero(index >= 0)
        new = np.flatnonzero(index < 0)
        src = index[keep]
        k, d = self._s1.shape
        pi = old._pi.copy()
        s1 = np.zeros((k, d))
        s1[:, keep] = old._s1[:, src]
        s2 = np.zeros((k, d, d))
        s2[:, keep[:, None], keep[None, :]] = old._s2[:, src[:, None], src[None, :]]
        s2[:, new, new] = pi[:, None]
        self._install(pi, s1, s2)

    def _live(self) -> np.ndarray:
        return np.flatnonzero(self._pi > self.DEAD_WEIGHT)

    def _covariances(self, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(means, covariances)`` of the live components (the M-step)."""
        d = self.schema.dim
        w = self._pi[live]
        mu = self._s1[live] / w[:, None]
        cov = self._s2[live] / w[:, None, None] - np.einsum("ki,kj->kij", mu, mu)
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))
        shrink = float(self.spec["shrinkage"])
        if shrink > 0.0:
            pooled = np.einsum("k,kij->ij", w / float(np.sum(w)), cov)
            cov = (1.0 - shrink) * cov + shrink * pooled
        cov[:, np.arange(d), np.arange(d)] += float(self.spec["reg"])
        return mu, cov

    def _mixture(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(log_weights, means, whiteners, log_norms)`` of the live components.

        ``W_k W_k^T = cov_k^-1`` (``W = L^-T`` from Cholesky); averaged or tampered
        params can make a covariance indefinite, then its eigenvalues are clipped at
        ``reg``. ``log_norms`` is ``log pi_k - log det(cov_k)/2 - d log(2 pi)/2``.
        """
        if self._cache is None:
            d = self.schema.dim
            reg = float(self.spec["reg"])
            live = self._live()
            if live.size == 0:
                raise ValueError("gmm params have no component with positive weight")
            mu, cov = self._covariances(live)
            whiteners = np.empty_like(cov)
            log_det = np.empty(live.size)
            for j in range(live.size):
                whiteners[j], log_det[j] = _whitener(cov[j], reg)
            weights = self._pi[live] / float(np.sum(self._pi[live]))
            log_norm = np.log(weights) - 0.5 * log_det - 0.5 * d * math.log(2.0 * math.pi)
            self._cache = (np.log(weights), mu, whiteners, log_norm)
        return self._cache

    def _log_components(self, z: np.ndarray) -> np.ndarray:
        """``[N, K_live]``: ``log pi_k + log N(z; mu_k, cov_k)``."""
        _, mu, whiteners, log_norm = self._mixture()
        maha = np.stack(
            [np.sum(np.square((z - mu[j]) @ whiteners[j]), axis=1) for j in range(mu.shape[0])],
            axis=1,
        )
        return log_norm - 0.5 * maha

    def _split(self) -> None:
        """Fill empty slots by splitting the heaviest live components (see the class doc)."""
        live = self._live()
        dead = np.setdiff1d(np.arange(self._pi.size), live)
        n_split = min(live.size, dead.size)
        if n_split == 0:
            return
        mu, cov = self._covariances(live)
        pi, s1, s2 = self._pi.copy(), self._s1.copy(), self._s2.copy()
        order = np.argsort(-self._pi[live], kind="stable")[:n_split]
        for slot, j in zip(dead[:n_split], order, strict=True):
            vals, vecs = np.linalg.eigh(cov[j])
            step = self.SPLIT_STEP * math.sqrt(max(float(vals[-1]), 0.0)) * vecs[:, -1]
            half = 0.5 * pi[live[j]]
            for target, m in ((live[j], mu[j] + step), (slot, mu[j] - step)):
                pi[target] = half
                s1[target] = half * m
                s2[target] = half * (cov[j] + np.outer(m, m))
        self._install(pi, s1, s2)

    def statistics_reference(self) -> np.ndarray:
        """The installed statistics after the splits every device makes first."""
        installed = (self._pi, self._s1, self._s2)
        try:
            self._split()
            return self.params()
        finally:
            self._install(*installed)

    def fit_local(self, x_raw: Any, *, epochs: int, seed: int) -> int:
        """One E-step under the current (split) mixture; params become this device's
        row-mean statistics. ``epochs`` and ``seed`` have no effect: a round is one EM
        iteration, so that the server's mean stays the pooled E-step.

        A component this device's rows barely populate is withheld: its statistics would
        be the mean of those few rows, and one unusual window alone in a component would
        travel as itself. A component is sent only where its responsibilities amount to
        ``min_rows`` effective rows or more (``(sum r)^2 / sum r^2``); in its place the
        device repeats the installed mixture's own statistics for it (public, and a
        component nobody sends keeps its estimate instead of emptying). ``min_rows = 0``
        sends everything: the exact pooled E-step."""
        z = self._scaled(x_raw)
        n = self._check_rows(z, epochs)
        self._split()
        live = self._live()
        log_comp = self._log_components(z)
        top = log_comp.max(axis=1, keepdims=True)
        resp = np.exp(log_comp - top)
        resp /= resp.sum(axis=1, keepdims=True)
        mass = resp.sum(axis=0)
        effective = np.square(mass) / np.maximum(np.square(resp).sum(axis=0), 1e-300)
        sent = effective >= float(self.spec["min_rows"])
        pi, s1, s2 = self._pi.copy(), self._s1.copy(), self._s2.copy()
        for j, slot in enumerate(live):  # one BLAS product per component
            if not sent[j]:
                continue
            pi[slot] = mass[j] / n
            s1[slot] = resp[:, j] @ z / n
            moment = (z * resp[:, j : j + 1]).T @ z / n
            s2[slot] = np.triu(moment) + np.triu(moment, 1).T  # exactly what params() keeps
        self._install(pi, s1, s2)
        return n

    def score(self, x_raw: Any) -> np.ndarray:
        z = self._scaled(x_raw)
        log_comp = self._log_components(z)
        _, _, _, log_norm = self._mixture()
        peak = float(np.logaddexp.reduce(log_norm))
        return peak - np.logaddexp.reduce(log_comp, axis=1)

    def _onnx_core(self) -> tuple[list[Any], list[Any], str]:
        """Whiten every component in one MatMul, then ``peak - ReduceLogSumExp``."""
        from onnx import helper, numpy_helper

        _, mu, whiteners, log_norm = self._mixture()
        k, d = mu.shape
        w_all = whiteners.transpose(1, 0, 2).reshape(d, k * d)
        shift = np.einsum("ki,kij->kj", mu, whiteners).reshape(k * d)
        peak = float(np.logaddexp.reduce(log_norm))
        nodes = [
            helper.make_node("MatMul", ["_fl_z", "_fl_gw"], ["_fl_gzw"], name="_fl_gwhiten"),
            helper.make_node("Sub", ["_fl_gzw", "_fl_gshift"], ["_fl_gdev"], name="_fl_gcenter"),
            helper.make_node("Reshape", ["_fl_gdev", "_fl_gshape"], ["_fl_gdev3"], name="_fl_g3"),
            helper.make_node(
                "ReduceSumSquare",
                ["_fl_gdev3", "_fl_axis2"],
                ["_fl_gmaha"],
                name="_fl_gmaha",
                keepdims=0,
            ),
            helper.make_node("Mul", ["_fl_gmaha", "_fl_ghalf"], ["_fl_gm"], name="_fl_gscale"),
            helper.make_node("Add", ["_fl_gm", "_fl_gnorm"], ["_fl_glog"], name="_fl_gaddnorm"),
            helper.make_node(
                "ReduceLogSumExp",
                ["_fl_glog", "_fl_axis1"],
                ["_fl_glse"],
                name="_fl_glse",
                keepdims=0,
            ),
            helper.make_node("Sub", ["_fl_gpeak", "_fl_glse"], ["_fl_score"], name="_fl_gscore"),
        ]
        inits = [
            numpy_helper.from_array(w_all.astype(np.float32), "_fl_gw"),
            numpy_helper.from_array(shift.astype(np.float32), "_fl_gshift"),
            numpy_helper.from_array(np.array([-1, k, d], dtype=np.int64), "_fl_gshape"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "_fl_axis2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "_fl_axis1"),
            numpy_helper.from_array(np.array(-0.5, dtype=np.float32), "_fl_ghalf"),
            numpy_helper.from_array(log_norm.astype(np.float32), "_fl_gnorm"),
            numpy_helper.from_array(np.array(peak, dtype=np.float32), "_fl_gpeak"),
        ]
        return nodes, inits, "_fl_score"


# --------------------------------------------------------------------------- ONNX


def _assemble_onnx(
    model: AnomalyModel, core_nodes: list[Any], core_inits: list[Any], score_name: str
) -> bytes:
    """Wrap a model core with raw-count preprocessing and score/flag outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    schema = model.schema
    d = schema.dim
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    src = ONNX_INPUT
    if schema.transform == "log1p":
        inits.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), "_fl_one"))
        nodes.append(helper.make_node("Add", [src, "_fl_one"], ["_fl_xp1"], name="_fl_add1"))
        nodes.append(helper.make_node("Log", ["_fl_xp1"], ["_fl_t"], name="_fl_log"))
        src = "_fl_t"
    inits.append(numpy_helper.from_array(schema._mean_arr().astype(np.float32), "_fl_mean"))
    inits.append(numpy_helper.from_array(schema._std_arr().astype(np.float32), "_fl_std"))
    nodes.append(helper.make_node("Sub", [src, "_fl_mean"], ["_fl_c"], name="_fl_center_feat"))
    nodes.append(helper.make_node("Div", ["_fl_c", "_fl_std"], ["_fl_z"], name="_fl_scale"))
    nodes.extend(core_nodes)
    inits.extend(core_inits)
    nodes.append(helper.make_node("Identity", [score_name], [ONNX_SCORE], name="_fl_score_out"))
    threshold = math.inf if model.threshold is None else float(model.threshold)
    inits.append(numpy_helper.from_array(np.array(threshold, dtype=np.float32), "_fl_threshold"))
    nodes.append(
        helper.make_node("Greater", [ONNX_SCORE, "_fl_threshold"], [ONNX_FLAG], name="_fl_flag")
    )
    graph = helper.make_graph(
        nodes,
        f"fedlib_{model.kind}",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, [None, d])],
        [
            helper.make_tensor_value_info(ONNX_SCORE, TensorProto.FLOAT, [None]),
            helper.make_tensor_value_info(ONNX_FLAG, TensorProto.BOOL, [None]),
        ],
        initializer=inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="fedlib",
        producer_version="1",
    )
    proto.ir_version = ONNX_IR_VERSION
    helper.set_model_props(
        proto,
        {
            "fedlib.kind": model.kind,
            "fedlib.feature_names": json.dumps(list(schema.names), separators=(",", ":")),
        },
    )
    onnx.checker.check_model(proto)
    return proto.SerializeToString(deterministic=True)


@functools.lru_cache(maxsize=8)
def _session(onnx_bytes: bytes) -> Any:
    """A single-threaded onnxruntime session (cached: building one costs milliseconds)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_score(onnx_bytes: bytes, x_raw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported model on raw counts: ``(scores float64 [N], flags bool [N])``."""
    sess = _session(bytes(onnx_bytes))
    x = np.asarray(x_raw, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D matrix, got shape {x.shape}")
    d = sess.get_inputs()[0].shape[1]
    if isinstance(d, int) and x.shape[1] != d:
        raise ValueError(f"expected {d} feature columns, got {x.shape[1]}")
    score, flag = sess.run([ONNX_SCORE, ONNX_FLAG], {ONNX_INPUT: np.ascontiguousarray(x)})
    return np.asarray(score, dtype=np.float64).reshape(-1), np.asarray(flag, dtype=bool).reshape(-1)

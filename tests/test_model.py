"""Tests for fedlib.models.model: scaling from moments, parameter contract, detection, ONNX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from sklearn.metrics import roc_auc_score

from fedlib.models.model import (
    KINDS,
    AnomalyModel,
    FeatureSchema,
    choose_transform,
    create_model,
    feature_moments,
    load_model,
    onnx_score,
    register_kind,
)

D = 16
NAMES = [f"tpl_{i:02d}" for i in range(D)]
ALL_KINDS = ["autoencoder", "gaussian", "gmm"]


class World:
    """Poisson event-template counts from a few device profiles, plus injected bursts."""

    def __init__(self, seed: int, d: int = D, profiles: int = 3) -> None:
        self.rng = np.random.default_rng(seed)
        self.d = d
        # every template occurs in every profile, so no feature hits the std floor
        self.rates = self.rng.gamma(0.8, 4.0, size=(profiles, d)) + 0.3

    def benign(self, n: int, profile_p: np.ndarray | None = None) -> np.ndarray:
        k = self.rates.shape[0]
        p = self.rng.choice(k, size=n, p=profile_p)
        scale = self.rng.lognormal(0.0, 0.25, size=(n, 1))
        return self.rng.poisson(self.rates[p] * scale).astype(np.float32)

    def anomalous(self, n: int) -> np.ndarray:
        x = self.benign(n).astype(np.float64)
        for row in x:
            cols = self.rng.choice(self.d, size=3, replace=False)
            row[cols] = self.rng.poisson(12.0, size=3)
        return x.astype(np.float32)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=7)


@pytest.fixture(scope="module")
def train(world: World) -> np.ndarray:
    return world.benign(1500)


@pytest.fixture(scope="module")
def schema(train: np.ndarray) -> FeatureSchema:
    return FeatureSchema.from_data(NAMES, train)


@pytest.fixture(scope="module")
def holdout(world: World) -> tuple[np.ndarray, np.ndarray]:
    benign = world.benign(600)
    anomalous = world.anomalous(120)
    x = np.concatenate([benign, anomalous])
    y = np.concatenate([np.zeros(len(benign)), np.ones(len(anomalous))])
    return x, y


def _trained(kind: str, schema: FeatureSchema, train: np.ndarray) -> AnomalyModel:
    model = create_model(kind, schema, seed=3)
    # an EM kind's fit_local is one iteration (one round); give it as many as epochs
    for _ in range(1 if model.one_round else 15):
        model.fit_local(train, epochs=15, seed=11)
    return model


# --------------------------------------------------------------------------- schema


def test_schema_json_round_trip(schema: FeatureSchema) -> None:
    wire = json.dumps(schema.to_dict())
    back = FeatureSchema.from_dict(json.loads(wire))
    assert back == schema
    assert back.to_dict() == schema.to_dict()
    with pytest.raises(ValueError):
        FeatureSchema.from_dict({**schema.to_dict(), "extra": 1})
    with pytest.raises(ValueError):
        FeatureSchema.from_dict({**schema.to_dict(), "transform": "sqrt"})


@pytest.mark.parametrize("transform", ["log1p", "identity"])
def test_from_moments_equals_direct_mean_std(train: np.ndarray, transform: Any) -> None:
    # three "devices" share only (n, sum, sum of squares)
    parts = np.array_split(train, [200, 900])
    moments = [feature_moments(p, transform) for p in parts]
    n = sum(m[0] for m in moments)
    s = np.sum([m[1] for m in moments], axis=0)
    ss = np.sum([m[2] for m in moments], axis=0)
    schema = FeatureSchema.from_moments(NAMES, transform, n, s, ss)

    t = np.log1p(train.astype(np.float64)) if transform == "log1p" else train.astype(np.float64)
    assert n == len(train)
    np.testing.assert_allclose(schema.mean, t.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(schema.std, t.std(axis=0), rtol=1e-9, atol=1e-12)
    z = schema.apply(train)
    assert z.dtype == np.float64
    np.testing.assert_allclose(z, (t - t.mean(axis=0)) / t.std(axis=0), rtol=1e-8, atol=1e-9)


def test_choose_transform_log1p_for_counts_identity_for_measurements() -> None:
    from fedlib.server.settings import ServerSettings

    counts = np.array([[0.0, 3.0, 12.0], [1.0, 0.0, 250.0]])
    measurements = np.array([[5.1, 3.5, 1.4], [6.2, 2.9, 4.3]])
    assert choose_transform(counts) == "log1p"
    assert choose_transform(measurements) == "identity"
    assert choose_transform(-counts) == "identity"  # negative values are not counts
    assert choose_transform(np.array([[1.0, np.inf]])) == "identity"
    assert ServerSettings().feature_transform == "auto"
    assert ServerSettings().transform_for(measurements) == "identity"
    assert ServerSettings(feature_transform="log1p").transform_for(measurements) == "log1p"


def test_std_floor_and_input_validation() -> None:
    x = np.zeros((10, 2), dtype=np.float32)
    x[:, 1] = np.arange(10)
    schema = FeatureSchema.from_data(["never", "ramp"], x)
    assert schema.std[0] == pytest.approx(1e-6)
    assert np.all(np.isfinite(schema.apply(x)))
    with pytest.raises(ValueError):
        schema.apply(np.ones((3, 3)))  # wrong width
    with pytest.raises(ValueError):
        schema.apply(-np.ones((3, 2)))  # negative counts under log1p
    with pytest.raises(ValueError):
        schema.apply(np.full((3, 2), np.nan))


# --------------------------------------------------------------------------- registry


def test_registry_and_spec_defaults(schema: FeatureSchema) -> None:
    assert {"autoencoder", "gaussian", "gmm"} <= set(KINDS)
    assert KINDS["autoencoder"].preferred_compression == "topk16"
    assert KINDS["gaussian"].preferred_compression == "dense64"
    ae = create_model("autoencoder", schema, spec={"hidden": [8]})
    assert ae.spec["hidden"] == [8]
    assert set(ae.spec) == {
        "hidden",
        "activation",
        "learning_rate_init",
        "batch_size",
        "alpha",
        "solver",
        "momentum",
        "error_clip",
    }
    assert json.loads(json.dumps(ae.spec)) == ae.spec
    assert ae.num_params == D * 8 + 8 * D + 8 + D
    default = create_model("autoencoder", schema)
    assert default.spec["solver"] == "sgd"
    # the committed selection (bench.select) compared against what ships: the deployment's
    # model_kind with its spec; what it chose is its kind's default spec (README says why
    # the chosen kind is not the deployment default yet)
    from fedlib.server.settings import ServerSettings

    federated = json.loads(
        (Path(__file__).parents[1] / "bench/results/selection.json").read_text()
    )["federated"]
    assert ServerSettings().model_kind == federated["default"]["kind"]
    for params in (federated["default"], federated["chosen"]):
        shipped = create_model(params["kind"], schema)
        for key, value in params.items():
            if key in shipped.spec:
                assert shipped.spec[key] == value, key
        assert set(params) - {"kind", "server_momentum", "topk_fraction"} <= set(shipped.spec)
    assert default.num_params == D * 96 + 96 * 32 + 32 * D + 96 + 32 + D
    for bad in (
        {"solver": "lbfgs"},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"hidden": []},
        {"error_clip": -1.0},
        {"error_clip": True},
        {"error_clip": "1"},
    ):
        with pytest.raises(ValueError):
            create_model("autoencoder", schema, spec=bad)
    with pytest.raises(ValueError):
        create_model("nope", schema)
    with pytest.raises(ValueError):
        create_model("autoencoder", schema, spec={"hiden": [8]})
    with pytest.raises(ValueError):
        create_model("gaussian", schema, spec={"ridge": -1.0})
    gmm = create_model("gmm", schema, spec={"components": 4})
    assert gmm.num_params == 4 * (1 + D + D * (D + 1) // 2)
    for bad_gmm in (
        {"components": 0},
        {"components": 2.5},
        {"components": True},
        {"reg": 0.0},
        {"shrinkage": 1.5},
        {"shrinkage": -0.1},
    ):
        with pytest.raises(ValueError):
            create_model("gmm", schema, spec=bad_gmm)


def test_new_kind_plugs_in_without_touching_anything(schema: FeatureSchema) -> None:
    @register_kind
    class MeanShift(AnomalyModel):
        kind = "test_meanshift"
        preferred_compression = "dense64"
        default_spec: ClassVar[dict[str, Any]] = {}

        @classmethod
        def _check_spec(cls, spec: dict[str, Any]) -> None:
            pass

        @property
        def num_params(self) -> int:
            return self.schema.dim

        def _init_params(self, seed: int) -> None:
            self._mu = np.zeros(self.schema.dim)

        def params(self) -> np.ndarray:
            return self._mu.copy()

        def _set_params(self, vec: np.ndarray) -> None:
            self._mu = vec

        def _carry(self, old: Any, index: np.ndarray) -> None:
            self._mu = np.where(index >= 0, old._mu[np.maximum(index, 0)], 0.0)

        def fit_local(self, x_raw: Any, *, epochs: int, seed: int) -> int:
            z = self._scaled(x_raw)
            self._mu = z.mean(axis=0)
            return len(z)

        def score(self, x_raw: Any) -> np.ndarray:
            return np.sum(np.square(self._scaled(x_raw) - self._mu), axis=1)

        def _onnx_core(self) -> tuple[list[Any], list[Any], str]:
            raise NotImplementedError

    try:
        model = create_model("test_meanshift", schema)
        assert model.num_params == D
        with pytest.raises(ValueError):
            register_kind(type("Clash", (MeanShift,), {}))  # same kind name, other class
    finally:
        del KINDS["test_meanshift"]


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_params_round_trip_and_wrong_length(
    kind: str, schema: FeatureSchema, train: np.ndarray
) -> None:
    model = _trained(kind, schema, train)
    vec = model.params()
    assert vec.dtype == np.float64 and vec.ndim == 1 and vec.shape == (model.num_params,)
    vec[0] += 123.0  # params() is a copy
    assert model.params()[0] != vec[0]

    other = create_model(kind, schema, seed=99)
    other.set_params(model.params())
    np.testing.assert_array_equal(other.params(), model.params())
    np.testing.assert_array_equal(other.score(train[:50]), model.score(train[:50]))

    for bad in (vec[:-1], np.append(vec, 0.0), vec.reshape(1, -1)):
        with pytest.raises(ValueError):
            other.set_params(bad)
    nan_vec = model.params()
    nan_vec[3] = np.nan
    with pytest.raises(ValueError):
        other.set_params(nan_vec)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_create_model_deterministic_per_seed(kind: str, schema: FeatureSchema) -> None:
    a = create_model(kind, schema, seed=5).params()
    b = create_model(kind, schema, seed=5).params()
    np.testing.assert_array_equal(a, b)
    if kind == "autoencoder":
        assert not np.array_equal(a, create_model(kind, schema, seed=6).params())


def test_autoencoder_trains_from_current_params(schema: FeatureSchema, train: np.ndarray) -> None:
    a = create_model("autoencoder", schema, seed=0)
    b = create_model("autoencoder", schema, seed=1)
    b.fit_local(train[300:600], epochs=3, seed=9)  # leaves optimizer history behind
    b.set_params(a.params())
    assert a.fit_local(train[:300], epochs=2, seed=4) == 300
    assert b.fit_local(train[:300], epochs=2, seed=4) == 300
    # same start, data, epochs and seed -> same result (no hidden optimizer state)
    np.testing.assert_array_equal(a.params(), b.params())
    c = create_model("autoencoder", schema, seed=1)
    c.fit_local(train[:300], epochs=2, seed=4)
    assert not np.allclose(c.params(), a.params())
    # a second round starts where the first ended, not from the init
    before = a.params()
    a.fit_local(train[:300], epochs=1, seed=5)
    step = np.linalg.norm(a.params() - before)
    assert 0.0 < step < np.linalg.norm(before - create_model("autoencoder", schema).params())


def test_autoencoder_fit_lowers_reconstruction_error(
    world: World, schema: FeatureSchema, train: np.ndarray
) -> None:
    model = create_model("autoencoder", schema, seed=0)
    benign = world.benign(400)
    before = model.score(benign).mean()
    model.fit_local(train, epochs=10, seed=0)
    after = model.score(benign).mean()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_separates_injected_anomalies(
    kind: str, schema: FeatureSchema, train: np.ndarray, holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = holdout
    model = _trained(kind, schema, train)
    scores = model.score(x)
    assert scores.shape == (len(x),) and scores.dtype == np.float64
    assert roc_auc_score(y, scores) > 0.8


def test_gaussian_federated_equals_pooled(world: World, schema: FeatureSchema) -> None:
    mixes = [np.array(p) for p in ([0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1, 0, 0])]
    clients = [world.benign(n, p) for n, p in zip((37, 410, 123, 260), mixes, strict=True)]
    global_model = create_model("gaussian", schema)
    total = 0
    acc = np.zeros(global_model.num_params)
    for i, rows in enumerate(clients):
        local = load_model("gaussian", schema, global_model.spec, global_model.params(), None)
        n = local.fit_local(rows, epochs=1, seed=i)
        assert n == len(rows)
        acc += n * local.params()
        total += n
    federated = load_model("gaussian", schema, None, acc / total, None)

    pooled = create_model("gaussian", schema)
    pooled.fit_local(np.concatenate(clients), epochs=1, seed=0)
    probe = np.concatenate([world.benign(200), world.anomalous(50)])
    s_fed, s_pool = federated.score(probe), pooled.score(probe)
    assert np.max(np.abs(s_fed - s_pool)) <= 1e-9
    # and a single client alone is a different model, so the test can fail
    solo = create_model("gaussian", schema)
    solo.fit_local(clients[0], epochs=1, seed=0)
    assert np.max(np.abs(solo.score(probe) - s_pool)) > 1e-3


def _gmm_round(global_model: AnomalyModel, schema: FeatureSchema, clients: list[np.ndarray]) -> Any:
    """One federated round: each device's E-step from the global params, row-weighted mean."""
    acc = np.zeros(global_model.num_params)
    total = 0
    for i, rows in enumerate(clients):
        local = load_model("gmm", schema, global_model.spec, global_model.params(), None)
        n = local.fit_local(rows, epochs=1, seed=i)
        acc += n * local.params()
        total += n
    return acc / total


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_gmm_federated_em_equals_pooled_em_every_round(
    world: World, schema: FeatureSchema, shrinkage: float
) -> None:
    """Non-IID devices, 12 rounds: every round's mean of device statistics is the pooled
    E-step, so the federated mixture is the centralized EM's, round for round."""
    mixes = [np.array(p) for p in ([0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1, 0, 0])]
    clients = [world.benign(n, p) for n, p in zip((37, 410, 123, 260), mixes, strict=True)]
    spec = {"components": 6, "reg": 0.05, "shrinkage": shrinkage, "min_rows": 0}
    federated = create_model("gmm", schema, spec=spec)
    pooled = create_model("gmm", schema, spec=spec)
    rows = np.concatenate(clients)
    for _ in range(12):
        federated.set_params(_gmm_round(federated, schema, clients))
        pooled.fit_local(rows, epochs=1, seed=0)
        np.testing.assert_allclose(federated.params(), pooled.params(), rtol=0, atol=1e-9)
    probe = np.concatenate([world.benign(200), world.anomalous(50)])
    assert np.max(np.abs(federated.score(probe) - pooled.score(probe))) <= 1e-6
    # the splits filled every component, and one device alone is another model
    assert int(np.sum(federated.params()[:6] > 1e-6)) == 6
    solo = create_model("gmm", schema, spec=spec)
    for _ in range(12):
        solo.fit_local(clients[0], epochs=1, seed=0)
    assert np.max(np.abs(solo.score(probe) - pooled.score(probe))) > 1e-3


def test_gmm_update_never_carries_one_window_alone(world: World, schema: FeatureSchema) -> None:
    """A device's unusual window, alone in a component, would travel as that component's
    mean; with the default ``min_rows`` the component is withheld, and every mean a device
    sends averages at least that many effective rows. Without the floor the row is
    there, so the test can fail."""
    trained = _trained("gmm", schema, world.benign(1500))
    rows = world.benign(300, np.array([1.0, 0.0, 0.0]))  # one profile ...
    outlier = world.benign(1, np.array([0.0, 0.0, 1.0]))  # ... and one window of another
    device = np.concatenate([rows, outlier])
    target = schema.apply(outlier)[0]

    def sent(min_rows: float) -> np.ndarray:
        spec = {**trained.spec, "min_rows": min_rows}
        local = load_model("gmm", schema, spec, trained.params(), None)
        local.fit_local(device, epochs=1, seed=0)
        return local.params()

    def sent_means(min_rows: float) -> tuple[np.ndarray, np.ndarray]:
        vec = sent(min_rows)
        k = int(trained.spec["components"])
        pi, s1 = vec[:k], vec[k : k + k * D].reshape(k, D)
        mask = pi > 0
        return s1[mask] / pi[mask][:, None], pi[mask] * len(device)

    means, _ = sent_means(0)
    assert np.min(np.linalg.norm(means - target, axis=1)) < 1e-3  # the window itself
    assert trained.spec["min_rows"] >= 5
    means, _ = sent_means(trained.spec["min_rows"])
    assert np.min(np.linalg.norm(means - target, axis=1)) > 0.5
    # a device with too few rows for any component sends the installed mixture back
    np.testing.assert_array_equal(sent(1e9), trained.params())


def test_gmm_starts_from_one_component_and_doubles_until_full(
    schema: FeatureSchema, train: np.ndarray
) -> None:
    model = create_model("gmm", schema, spec={"components": 8})
    live = [int(np.sum(model.params()[:8] > 1e-6))]
    for _ in range(4):
        model.fit_local(train, epochs=1, seed=0)
        live.append(int(np.sum(model.params()[:8] > 1e-6)))
    assert live == [1, 2, 4, 8, 8]
    assert abs(float(np.sum(model.params()[:8])) - 1.0) < 1e-12  # weights stay a distribution


def test_gmm_scores_are_nonnegative_and_survive_tampered_params(
    schema: FeatureSchema, train: np.ndarray, holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    """Scores are >= 0 (device calibration takes their log); second moments that no data
    could give (an indefinite covariance) are clipped, not a crash or NaN."""
    model = _trained("gmm", schema, train)
    x, _ = holdout
    assert float(model.score(x).min()) >= 0.0
    vec = model.params()
    k = int(model.spec["components"])
    vec[k + k * D :] *= -1.0  # every second moment negated
    broken = load_model("gmm", schema, model.spec, vec, None)
    scores = broken.score(x)
    assert np.all(np.isfinite(scores)) and float(scores.min()) >= 0.0
    empty = model.params()
    empty[:k] = 0.0
    with pytest.raises(ValueError, match="no component"):
        load_model("gmm", schema, model.spec, empty, None).score(x)


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_onnx_parity_shapes_and_flags(
    kind: str,
    world: World,
    schema: FeatureSchema,
    train: np.ndarray,
    holdout: tuple[np.ndarray, np.ndarray],
) -> None:
    model = _trained(kind, schema, train)
    model.calibrate_threshold(world.benign(500), quantile=0.95)
    blob = model.to_onnx()
    assert len(blob) < 64_000

    proto = onnx.load_from_string(blob)
    assert [i.name for i in proto.graph.input] == ["features"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == D
    assert [o.name for o in proto.graph.output] == ["score", "is_anomaly"]

    x, _ = holdout
    ref = model.score(x)
    scores, flags = onnx_score(blob, x)
    assert scores.shape == (len(x),) and scores.dtype == np.float64
    assert flags.shape == (len(x),) and flags.dtype == np.bool_
    scale = max(1.0, float(np.max(np.abs(ref))))
    assert np.max(np.abs(scores - ref)) <= 1e-4 * scale

    for n in (1, 257):
        rows = np.concatenate([x, x])[:n]
        s, f = onnx_score(blob, rows)
        assert s.shape == (n,) and f.shape == (n,)
        np.testing.assert_allclose(s, model.score(rows), rtol=1e-4, atol=1e-4 * scale)

    # flags agree with the Python threshold wherever float32 rounding cannot matter
    assert model.threshold is not None
    clear = np.abs(ref - model.threshold) > 1e-4 * scale
    np.testing.assert_array_equal(flags[clear], (ref > model.threshold)[clear])
    assert 0 < flags.sum() < len(flags)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_uncalibrated_model_flags_nothing(
    kind: str, schema: FeatureSchema, holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    model = create_model(kind, schema, seed=0)
    assert model.threshold is None
    _, flags = onnx_score(model.to_onnx(), holdout[0])
    assert not flags.any()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_onnx_export_deterministic(kind: str, schema: FeatureSchema, train: np.ndarray) -> None:
    model = _trained(kind, schema, train)
    model.calibrate_threshold(train)
    first = model.to_onnx()
    assert model.to_onnx() == first
    # a model rebuilt from its stored description exports the same bytes
    clone = load_model(kind, schema, model.spec, model.params(), model.threshold)
    assert clone.to_onnx() == first
    model.threshold = model.threshold * 2
    assert model.to_onnx() != first


# --------------------------------------------------------------------------- error cap


def test_error_clip_caps_each_feature_in_python_and_onnx(
    schema: FeatureSchema, train: np.ndarray
) -> None:
    """A capped score bounds what one wild feature adds (at most clip^2 / d per feature),
    and the exported graph applies the same cap."""
    capped = create_model("autoencoder", schema, spec={"hidden": [8], "error_clip": 1.0}, seed=0)
    capped.fit_local(train, epochs=3, seed=0)
    plain = load_model(
        "autoencoder", schema, {**capped.spec, "error_clip": 0.0}, capped.params(), None
    )
    x = train[:20].astype(np.float64)
    x[:, 0] = 1e6  # one feature far outside anything seen
    s_capped, s_plain = capped.score(x), plain.score(x)
    assert np.all(s_capped <= 1.0 + 1e-12)  # mean of per-feature errors each <= 1.0^2
    assert np.all(s_plain > 10 * s_capped)
    z = schema.apply(x)
    expected = np.minimum(np.square(capped._reconstruct(z) - z), 1.0).mean(axis=1)
    np.testing.assert_allclose(s_capped, expected, rtol=1e-12)
    onnx_scores, _ = onnx_score(capped.to_onnx(), x)
    np.testing.assert_allclose(onnx_scores, s_capped, rtol=1e-4, atol=1e-5)
    onnx_plain, _ = onnx_score(plain.to_onnx(), x)
    np.testing.assert_allclose(onnx_plain, s_plain, rtol=1e-4)


def test_stored_spec_without_error_clip_scores_as_before(
    schema: FeatureSchema, train: np.ndarray
) -> None:
    """A package stored before ``error_clip`` existed reads it as 0 (no cap) and scores
    the plain mean squared error, as when it was published; a new model gets the
    default."""
    model = create_model("autoencoder", schema, seed=0)
    assert model.spec["error_clip"] == KINDS["autoencoder"].default_spec["error_clip"]
    stored = {k: v for k, v in model.spec.items() if k != "error_clip"}
    old = load_model("autoencoder", schema, stored, model.params(), None)
    assert old.spec["error_clip"] == 0.0
    x = train[:50]
    z = schema.apply(x)
    np.testing.assert_allclose(
        old.score(x), np.square(old._reconstruct(z) - z).mean(axis=1), rtol=1e-12
    )


def _partial_rounds(
    schema: FeatureSchema, devices: list[np.ndarray], spec: dict[str, Any], step: float, rounds: int
) -> AnomalyModel:
    """Rounds that each hear from one device only, in turn, through the server's step."""
    from fedlib.server.rounds import stepwise_statistics

    model = create_model("gmm", schema, spec=spec)
    for r in range(rounds):
        base = model.params()
        pooled = _gmm_round(model, schema, [devices[r % len(devices)]])
        model.set_params(stepwise_statistics(model, base, pooled - base, step))
    return model


def test_gmm_stepwise_em_remembers_devices_a_round_did_not_hear(
    world: World, schema: FeatureSchema
) -> None:
    """Three devices of one profile each, every round hears from one of them: a full EM
    step (1) refits the mixture to the last device's rows and forgets the other two;
    stepwise EM at the round's share of the fleet (1/3) keeps them, close to the
    mixture fitted on all rows, and its statistics stay a mixture (weights sum to 1)."""
    from sklearn.metrics import roc_auc_score

    devices = [world.benign(300, np.eye(3)[p]) for p in range(3)]
    spec = {"components": 6, "reg": 0.05, "shrinkage": 0.25, "min_rows": 0}
    pooled = create_model("gmm", schema, spec=spec)
    for _ in range(12):
        pooled.fit_local(np.concatenate(devices), epochs=1, seed=0)
    full = _partial_rounds(schema, devices, spec, 1.0, 24)
    stepwise = _partial_rounds(schema, devices, spec, 1 / 3, 24)
    assert np.sum(stepwise.params()[:6]) == pytest.approx(1.0, abs=1e-9)
    forgotten = world.benign(300, np.eye(3)[0])  # the device heard least recently
    anomalies = world.anomalous(150)

    def auc(model: AnomalyModel) -> float:
        scores = model.score(np.concatenate([forgotten, anomalies]))
        return float(roc_auc_score(np.r_[np.zeros(300), np.ones(150)], scores))

    # measured: pooled 0.971, full steps 0.237, stepwise 0.962
    assert auc(full) < 0.6  # the forgotten device's rows now look anomalous
    assert auc(stepwise) >= auc(pooled) - 0.03

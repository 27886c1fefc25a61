"""The synthetic benchmark dataset: deterministic, well-formed, non-IID, and loadable safely."""

from __future__ import annotations

import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

# The repository root is not an installed package; make `bench` importable under plain pytest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.make_dataset import (
    ANOMALY_CODES,
    ANOMALY_TYPE_NAMES,
    FOREIGN_PROFILE,
    load_dataset,
    main,
    make_dataset,
    save_dataset,
)

SMALL = {
    "clients": 6,
    "templates": 24,
    "windows_per_client": 80,
    "holdout_benign": 100,
    "holdout_anomalies": 50,
    "client_holdout_benign": 20,
    "client_holdout_anomalies": 10,
}


@pytest.fixture(scope="module")
def small() -> dict[str, np.ndarray]:
    return make_dataset(seed=7, **SMALL)


def test_same_seed_gives_identical_arrays_and_bytes(tmp_path: Path) -> None:
    a, b = make_dataset(seed=3, **SMALL), make_dataset(seed=3, **SMALL)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key])
    # Via the CLI twice: the files themselves must be byte-identical.
    args = ["--clients", "4", "--templates", "20", "--windows-per-client", "30"]
    args += ["--holdout-benign", "20", "--holdout-anomalies", "10", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.npz")]) == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_different_seed_differs(small: dict[str, np.ndarray]) -> None:
    other = make_dataset(seed=8, **SMALL)
    assert not np.array_equal(small["holdout_X"], other["holdout_X"])
    first = str(small["client_ids"][0])
    assert small[f"X_{first}"].shape != other[f"X_{first}"].shape or not np.array_equal(
        small[f"X_{first}"], other[f"X_{first}"]
    )


def test_format_shapes_and_dtypes(small: dict[str, np.ndarray]) -> None:
    ids = [str(c) for c in small["client_ids"]]
    assert ids == [f"client-{k:02d}" for k in range(1, SMALL["clients"] + 1)]
    n_features = SMALL["templates"]
    names = small["feature_names"]
    assert names.dtype.kind == "U" and names.shape == (n_features,)
    assert len(set(names.tolist())) == n_features
    assert all(n.startswith("tmpl_") for n in names.tolist())
    sizes = []
    for cid in ids:
        X = small[f"X_{cid}"]
        assert X.dtype == np.float32 and X.ndim == 2 and X.shape[1] == n_features
        assert (X >= 0).all() and np.array_equal(X, np.round(X))
        sizes.append(X.shape[0])
        hx, hy = small[f"holdout_X_{cid}"], small[f"holdout_y_{cid}"]
        ht = small[f"holdout_anomaly_type_{cid}"]
        assert hx.dtype == np.float32 and hx.shape == (30, n_features)
        assert hy.dtype == np.int8 and ht.dtype == np.int8
        assert hy.sum() == SMALL["client_holdout_anomalies"]
        np.testing.assert_array_equal(ht > 0, hy == 1)
    assert len(set(sizes)) > 1, "client sizes should vary (non-IID in quantity)"
    total = SMALL["holdout_benign"] + SMALL["holdout_anomalies"]
    assert small["holdout_X"].dtype == np.float32
    assert small["holdout_X"].shape == (total, n_features)
    assert small["holdout_y"].dtype == np.int8 and small["anomaly_type"].dtype == np.int8
    assert int(small["holdout_y"].sum()) == SMALL["holdout_anomalies"]
    np.testing.assert_array_equal(small["anomaly_type"] > 0, small["holdout_y"] == 1)
    assert small["anomaly_type_names"].tolist() == list(ANOMALY_TYPE_NAMES)
    # Rows are shuffled, not sorted by label.
    assert small["holdout_y"][: SMALL["holdout_benign"]].any()


def test_every_anomaly_type_has_a_fair_share(small: dict[str, np.ndarray]) -> None:
    types = small["anomaly_type"][small["anomaly_type"] > 0]
    counts = np.bincount(types, minlength=len(ANOMALY_TYPE_NAMES))[1:]
    assert (counts >= 0.1 * types.size).all(), counts
    per_client = np.concatenate(
        [small[f"holdout_anomaly_type_{c}"] for c in small["client_ids"].tolist()]
    )
    assert set(per_client.tolist()) == {0, *ANOMALY_CODES}


def test_foreign_profile_is_normal_for_the_fleet_but_not_for_the_device(
    small: dict[str, np.ndarray],
) -> None:
    """Per-client foreign windows resemble another device more than the owner."""
    ids = small["client_ids"].tolist()
    means = {c: np.log1p(small[f"X_{c}"]).mean(axis=0) for c in ids}
    closer_elsewhere = 0
    total = 0
    for c in ids:
        X = np.log1p(small[f"holdout_X_{c}"])
        foreign = X[small[f"holdout_anomaly_type_{c}"] == FOREIGN_PROFILE]
        for row in foreign:
            own = np.linalg.norm(row - means[c])
            best_other = min(np.linalg.norm(row - means[o]) for o in ids if o != c)
            closer_elsewhere += best_other < own
            total += 1
    assert total > 0 and closer_elsewhere / total > 0.8


def test_clients_are_non_iid(small: dict[str, np.ndarray]) -> None:
    ids = small["client_ids"].tolist()
    profiles = []
    for c in ids:
        counts = small[f"X_{c}"].sum(axis=0)
        profiles.append(counts / counts.sum())
    tv = [
        0.5 * np.abs(profiles[i] - profiles[j]).sum() for i, j in combinations(range(len(ids)), 2)
    ]
    assert np.mean(tv) > 0.3, tv
    # Activity levels differ as well, not only the mix.
    totals = [small[f"X_{c}"].sum(axis=1).mean() for c in ids]
    assert max(totals) > 1.5 * min(totals)


def test_contamination_changes_training_data_only_when_asked() -> None:
    clean = make_dataset(seed=1, **SMALL)
    dirty = make_dataset(seed=1, contamination=0.2, **SMALL)
    first = str(clean["client_ids"][0])
    assert clean[f"X_{first}"].shape == dirty[f"X_{first}"].shape
    assert not np.array_equal(clean[f"X_{first}"], dirty[f"X_{first}"])
    np.testing.assert_array_equal(clean["holdout_X"], dirty["holdout_X"])


def test_save_and_load_roundtrip_without_pickle(
    small: dict[str, np.ndarray], tmp_path: Path
) -> None:
    path = save_dataset(small, tmp_path / "sub" / "ds.npz")
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == set(small)
        assert z["feature_names"].tolist() == small["feature_names"].tolist()
    ds = load_dataset(path)
    assert ds.client_ids == small["client_ids"].tolist()
    assert ds.feature_names == small["feature_names"].tolist()
    assert ds.n_features == SMALL["templates"]
    for c in ds.client_ids:
        np.testing.assert_array_equal(ds.clients[c], small[f"X_{c}"])
        X, y = ds.client_holdouts[c]
        np.testing.assert_array_equal(X, small[f"holdout_X_{c}"])
        np.testing.assert_array_equal(y, small[f"holdout_y_{c}"])
    np.testing.assert_array_equal(ds.holdout_y, small["holdout_y"])
    assert ds.anomaly_type is not None
    assert ds.anomaly_type_names == list(ANOMALY_TYPE_NAMES)


def test_load_accepts_a_minimal_foreign_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "foreign.npz"
    np.savez(
        path,
        X_b=rng.normal(size=(5, 3)),
        X_a=rng.normal(size=(4, 3)),
        holdout_X=rng.normal(size=(6, 3)),
        holdout_y=np.array([0, 1, 0, 0, 1, 0]),
    )
    ds = load_dataset(path)
    assert ds.client_ids == ["a", "b"]
    assert ds.feature_names == ["f0", "f1", "f2"]
    assert ds.client_holdouts == {}
    assert ds.anomaly_type is None
    assert ds.clients["a"].dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X_a": np.ones((3, 4)), "holdout_X": np.ones((2, 4))}, "holdout_y"),
        ({"holdout_X": np.ones((2, 4)), "holdout_y": np.array([0, 1])}, "no client"),
        (
            {"X_a": np.ones((3, 5)), "holdout_X": np.ones((2, 4)), "holdout_y": np.array([0, 1])},
            "features",
        ),
        (
            {"X_a": np.ones((3, 4)), "holdout_X": np.ones((2, 4)), "holdout_y": np.array([0, 2])},
            "0 \\(benign\\) or 1",
        ),
        (
            {"X_a": np.ones((3, 4)), "holdout_X": np.ones((2, 4)), "holdout_y": np.array([0, 0])},
            "at least one",
        ),
        (
            {"X_a": np.ones((3, 4)), "holdout_X": np.ones((2, 4)), "holdout_y": np.array([0])},
            "labels",
        ),
        (
            {
                "X_a": np.ones(4),
                "holdout_X": np.ones((2, 4)),
                "holdout_y": np.array([0, 1]),
            },
            "2-D",
        ),
        (
            {
                "X_a": np.ones((3, 4)),
                "holdout_X": np.ones((2, 4)),
                "holdout_y": np.array([0, 1]),
                "feature_names": np.array(["x", "y"]),
            },
            "feature_names",
        ),
        (
            {
                "X_a": np.full((3, 4), np.nan),
                "holdout_X": np.ones((2, 4)),
                "holdout_y": np.array([0, 1]),
            },
            "NaN",
        ),
    ],
)
def test_load_refuses_broken_files(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_load_refuses_pickled_arrays(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(
        path,
        X_a=np.ones((3, 2)),
        holdout_X=np.ones((2, 2)),
        holdout_y=np.array([0, 1]),
        feature_names=np.array(["a", "b"], dtype=object),
    )
    with pytest.raises(ValueError):
        load_dataset(path)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="clients"):
        make_dataset(clients=1)
    with pytest.raises(ValueError, match="templates"):
        make_dataset(templates=5)
    with pytest.raises(ValueError, match="anomalies"):
        make_dataset(holdout_anomalies=2)

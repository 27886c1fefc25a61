"""Real-data anomaly tasks built from labeled data that ships inside scikit-learn.

Nothing is downloaded: ``load_digits``, ``load_breast_cancer``, ``load_wine`` and
``load_iris`` read CSV files inside the installed wheel. Each task names some classes
benign and the rest anomalous, then splits the rows once, deterministically (a fixed
seed per task), into three disjoint parts:

* **test holdout** (:attr:`Task.test_X`, :attr:`Task.test_y`): 30% of the benign rows and
  60% of the anomalous ones. Only :func:`bench.suite` touches it, once per detector, after
  every hyperparameter is fixed.
* **devices**: the other 70% of the benign rows, dealt to devices non-IID (Dirichlet
  label skew over the benign classes; a task with one benign class is skewed over
  k-means clusters of its rows instead), each device's rows split 75/25 into train and
  validation rows. Training only ever sees the train rows (benign: novelty detection).
* **validation anomalies**: the other 40% of the anomalous rows, a small labeled set
  held by the operator, disjoint from the test holdout. With the devices' validation
  rows it is the validation split (:meth:`Task.selection_view`) every detector is tuned
  and early-stopped on.

Every row keeps its index in the source table (``*_index``), so a test can check the
three parts are disjoint and that a selection view carries no test row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TEST_BENIGN_SHARE = 0.30
TEST_ANOMALY_SHARE = 0.60
DEVICE_VALIDATION_SHARE = 0.25
DIRICHLET_ALPHA = 0.5
MIN_DEVICE_ROWS = 8


@dataclass(frozen=True)
class SelectionView:
    """What model selection may see: devices' train rows and the validation split.

    Built without test rows (by construction, :meth:`Task.selection_view`); ``index``
    lists the source rows it holds so tests can prove it.
    """

    name: str
    feature_names: list[str]
    clients: dict[str, np.ndarray]  # device id -> train rows (benign)
    val_X: np.ndarray
    val_y: np.ndarray
    index: np.ndarray  # source-table index of every row above

    @property
    def pooled(self) -> np.ndarray:
        """All devices' train rows (what a centralized baseline trains on)."""
        return np.concatenate([self.clients[c] for c in sorted(self.clients)])


@dataclass(frozen=True)
class Task:
    """One task's three disjoint parts (see the module docstring)."""

    name: str
    description: str
    feature_names: list[str]
    device_train: dict[str, np.ndarray]
    device_val: dict[str, np.ndarray]
    val_anomalies: np.ndarray
    test_X: np.ndarray
    test_y: np.ndarray
    train_index: dict[str, np.ndarray]
    val_index: np.ndarray  # device validation rows then validation anomalies
    test_index: np.ndarray

    def selection_view(self) -> SelectionView:
        """Train rows plus the validation split; no test row is in it."""
        ids = sorted(self.device_train)
        benign = np.concatenate([self.device_val[c] for c in ids])
        val_x = np.concatenate([benign, self.val_anomalies])
        val_y = np.concatenate(
            [np.zeros(len(benign), np.int8), np.ones(len(self.val_anomalies), np.int8)]
        )
        index = np.concatenate([*(self.train_index[c] for c in ids), self.val_index])
        return SelectionView(
            name=self.name,
            feature_names=list(self.feature_names),
            clients={c: self.device_train[c] for c in ids},
            val_X=val_x,
            val_y=val_y,
            index=index,
        )

    def stats(self) -> dict[str, int]:
        """Row counts of each part (reported next to the figures)."""
        return {
            "devices": len(self.device_train),
            "features": len(self.feature_names),
            "train_rows": int(sum(len(v) for v in self.device_train.values())),
            "val_benign_rows": int(sum(len(v) for v in self.device_val.values())),
            "val_anomaly_rows": len(self.val_anomalies),
            "test_benign_rows": int((self.test_y == 0).sum()),
            "test_anomaly_rows": int((self.test_y == 1).sum()),
        }


def _skew_groups(x: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """The groups devices are skewed over: benign classes, or 4 k-means clusters of one."""
    if len(np.unique(labels)) > 1:
        return labels
    from sklearn.cluster import KMeans

    z = np.log1p(x)
    z = (z - z.mean(axis=0)) / np.maximum(z.std(axis=0), 1e-6)
    return KMeans(n_clusters=4, n_init=4, random_state=seed).fit_predict(z)


def _deal(groups: np.ndarray, devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions dealt to devices with Dirichlet(alpha) shares per group (label skew);
    redrawn until every device holds at least MIN_DEVICE_ROWS rows."""
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for g in np.unique(groups):
            pos = rng.permutation(np.flatnonzero(groups == g))
            shares = rng.dirichlet(np.full(devices, DIRICHLET_ALPHA))
            cuts = (np.cumsum(shares)[:-1] * len(pos)).astype(int)
            for d, chunk in enumerate(np.split(pos, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_DEVICE_ROWS:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"cannot deal {len(groups)} rows to {devices} devices")


def build_task(
    name: str,
    description: str,
    x: np.ndarray,
    labels: np.ndarray,
    anomaly_classes: set[int],
    feature_names: list[str],
    *,
    devices: int,
    seed: int,
) -> Task:
    """Split one labeled table into devices, validation anomalies and the test holdout."""
    x = np.asarray(x, dtype=np.float64)
    if x.min() < 0:
        raise ValueError(f"{name}: features must be non-negative (log1p scaling)")
    rng = np.random.default_rng(seed)
    anomalous = np.isin(labels, sorted(anomaly_classes))
    benign_idx = rng.permutation(np.flatnonzero(~anomalous))
    anomaly_idx = rng.permutation(np.flatnonzero(anomalous))
    n_test_b = round(TEST_BENIGN_SHARE * len(benign_idx))
    n_test_a = round(TEST_ANOMALY_SHARE * len(anomaly_idx))
    test_idx = np.concatenate([benign_idx[:n_test_b], anomaly_idx[:n_test_a]])
    device_idx = benign_idx[n_test_b:]
    val_anomaly_idx = np.sort(anomaly_idx[n_test_a:])
    groups = _skew_groups(x[device_idx], labels[device_idx], seed)
    train: dict[str, np.ndarray] = {}
    val: dict[str, np.ndarray] = {}
    for d, pos in enumerate(_deal(groups, devices, rng)):
        rows = rng.permutation(device_idx[pos])
        n_val = max(1, round(DEVICE_VALIDATION_SHARE * len(rows)))
        cid = f"dev{d:02d}"
        val[cid], train[cid] = np.sort(rows[:n_val]), np.sort(rows[n_val:])
    ids = sorted(train)
    return Task(
        name=name,
        description=description,
        feature_names=list(feature_names),
        device_train={c: x[train[c]] for c in ids},
        device_val={c: x[val[c]] for c in ids},
        val_anomalies=x[val_anomaly_idx],
        test_X=x[test_idx],
        test_y=anomalous[test_idx].astype(np.int8),
        train_index=train,
        val_index=np.concatenate([*(val[c] for c in ids), val_anomaly_idx]),
        test_index=test_idx,
    )


def _digits(anomaly: int) -> Task:
    from sklearn.datasets import load_digits

    ds = load_digits()
    return build_task(
        f"digits-{anomaly}",
        f"8x8 handwritten digits (1797 rows, 64 pixel counts 0-16); digit {anomaly} is the "
        "anomaly, devices skewed over the nine other digits",
        ds.data,
        ds.target,
        {anomaly},
        [f"px{i}" for i in range(64)],
        devices=10,
        seed=1700 + anomaly,
    )


def _breast_cancer() -> Task:
    from sklearn.datasets import load_breast_cancer

    ds = load_breast_cancer()
    return build_task(
        "breast-cancer",
        "Wisconsin diagnostic breast cancer (569 rows, 30 cell-nucleus measurements); "
        "malignant is the anomaly, devices skewed over k-means clusters of benign rows",
        ds.data,
        ds.target,
        {0},  # target 0 = malignant
        [str(n).replace(" ", "_") for n in ds.feature_names],
        devices=6,
        seed=1710,
    )


def _wine() -> Task:
    from sklearn.datasets import load_wine

    ds = load_wine()
    return build_task(
        "wine",
        "Wine recognition (178 rows, 13 chemical measurements); cultivar 0 is the anomaly, "
        "devices skewed over cultivars 1 and 2",
        ds.data,
        ds.target,
        {0},
        [str(n) for n in ds.feature_names],
        devices=4,
        seed=1711,
    )


def _iris() -> Task:
    from sklearn.datasets import load_iris

    ds = load_iris()
    return build_task(
        "iris",
        "Iris (150 rows, 4 measurements); virginica is the anomaly, devices skewed over "
        "setosa and versicolor",
        ds.data,
        ds.target,
        {2},
        [str(n).replace(" ", "_") for n in ds.feature_names],
        devices=4,
        seed=1712,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "digits-0": lambda: _digits(0),
    "digits-8": lambda: _digits(8),
    "breast-cancer": _breast_cancer,
    "wine": _wine,
    "iris": _iris,
}
"""The suite: five tasks from four bundled tables (two anomaly digits, one easy, one hard)."""


def load_task(name: str) -> Task:
    """Build one task by name (deterministic: the same rows on every call)."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None

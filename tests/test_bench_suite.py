"""The real-data quality suite's protocol: disjoint parts, selection without the test rows,
and a tiny end-to-end run whose JSON adds up (no timing, no figure thresholds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from bench.select import select_centralized
from bench.tasks import TASKS, load_task


def _labels(name: str) -> np.ndarray:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "breast": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }[name.split("-")[0]]
    return loader().target


ANOMALY = {"digits-0": {0}, "digits-8": {8}, "breast-cancer": {0}, "wine": {0}, "iris": {2}}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_parts_are_disjoint_and_labeled_right(name):
    """Train, validation and test rows come from disjoint source rows; devices train on
    benign rows only; the selection view holds no test row; the split is deterministic."""
    assert len(TASKS) >= 5
    task = load_task(name)
    train = np.concatenate(list(task.train_index.values()))
    parts = [train, task.val_index, task.test_index]
    every = np.concatenate(parts)
    assert len(np.unique(every)) == len(every)  # no source row in two parts
    view = task.selection_view()
    assert not set(view.index.tolist()) & set(task.test_index.tolist())
    assert len(view.index) == len(train) + len(task.val_index)
    labels = _labels(name)
    anomalous = np.isin(labels, sorted(ANOMALY[name]))
    assert not anomalous[train].any()
    assert np.array_equal(anomalous[task.test_index], task.test_y.astype(bool))
    assert task.test_y.min() == 0 and task.test_y.max() == 1
    assert view.val_y.min() == 0 and view.val_y.max() == 1
    # non-IID: devices differ in size (Dirichlet shares), each has train and val rows
    sizes = [len(v) for v in task.device_train.values()]
    assert min(sizes) >= 1 and max(sizes) > 1.5 * min(sizes)
    assert all(len(v) >= 1 for v in task.device_val.values())
    again = load_task(name)
    assert np.array_equal(again.test_index, task.test_index)


def test_selection_does_not_depend_on_test_rows():
    """By construction: scrambling the test holdout changes nothing selection sees or picks."""
    task = load_task("iris")
    rng = np.random.default_rng(0)
    scrambled = dataclasses.replace(
        task,
        test_X=rng.uniform(0, 100, task.test_X.shape),
        test_y=1 - task.test_y,
    )
    a = select_centralized(task.selection_view(), budget=2)
    b = select_centralized(scrambled.selection_view(), budget=2)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_select_and_suite_small(tmp_path: Path, capsys):
    """bench.select then bench.suite at a tiny budget: the chosen configurations are the
    best validation trials, the suite reports every detector per task and on average, and
    the goal figures are the ones computed from the per-task rows."""
    from bench.select import FEDERATED_SPACES
    from bench.select import main as select_main
    from bench.suite import CENTRALIZED
    from bench.suite import main as suite_main

    argv = ["--budget", "2", "--rounds", "2", "--tasks", "iris,wine", "--json"]
    assert select_main(argv) == 0
    sel = json.loads(capsys.readouterr().out)
    for task in ("iris", "wine"):
        for detector in CENTRALIZED:
            entry = sel["centralized"][task][detector]
            assert len(entry["trials"]) == 2
            assert entry["chosen_val_auc"] == max(t["val_auc"] for t in entry["trials"])
    fed = sel["federated"]
    assert fed["trials"][0]["params"] == fed["default"]
    for kind in FEDERATED_SPACES:  # every kind's search gets the same budget
        assert sum(t["params"]["kind"] == kind for t in fed["trials"]) == 2, kind
    best = max(fed["trials"], key=lambda t: t["mean_val_auc"])
    assert fed["best_trial"] == best["params"]
    moved = fed["best_minus_default"] > fed["standard_error"]
    assert fed["chosen"] == (best["params"] if moved else fed["default"])
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(sel))

    assert suite_main(["--selection", str(path), "--seeds", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [t["task"] for t in r["tasks"]] == ["iris", "wine"]
    for row in r["tasks"]:
        for key in ("federated_default", *CENTRALIZED, "no_training", "best_centralized"):
            assert 0.0 <= row["auc"][key] <= 1.0, key
        best = max(CENTRALIZED, key=lambda d: sel["centralized"][row["task"]][d]["chosen_val_auc"])
        assert row["best_centralized_detector"] == best
        assert row["auc"]["best_centralized"] == row["auc"][best]
        assert row["auc"]["best_centralized_oracle"] >= row["auc"]["best_centralized"]
    gaps = [t["federated_minus_best_centralized"] for t in r["tasks"]]
    goal = r["goals"]["mean_gap_to_best_centralized"]
    assert goal["figure"] == pytest.approx(float(np.mean(gaps)))
    assert goal["met"] == (goal["figure"] >= -0.02)
    worst = r["goals"]["worst_gap_to_isolation_forest"]
    assert worst["figure"] == min(t["federated_minus_isolation_forest"] for t in r["tasks"])


def test_the_default_stays_unless_a_trial_beats_it_by_more_than_one_standard_error():
    from bench.select import choose_federated

    def trial(name, aucs):
        return {
            "params": {"name": name},
            "val_auc": dict(zip("abcd", aucs, strict=True)),
            "mean_val_auc": sum(aucs) / len(aucs),
        }

    incumbent = trial("default", [0.80, 0.90, 0.70, 0.95])
    noisy = trial("noisy", [0.85, 0.86, 0.74, 0.91])  # +0.0025 on average, differences +-0.05
    clear = trial("clear", [0.83, 0.93, 0.73, 0.97])  # +0.0275, every view better
    assert choose_federated([incumbent, noisy])["chosen"] == {"name": "default"}
    decided = choose_federated([incumbent, noisy, clear])
    assert decided["chosen"] == {"name": "clear"} and decided["best_trial"] == {"name": "clear"}
    assert decided["best_minus_default"] > decided["standard_error"]

"""Hyperparameter selection on the validation split only, for every detector of the suite.

    python -m bench.select --json [--budget 12] [--rounds 100] [--tasks digits-0,wine]
        > bench/results/selection.json

Every search gets the same budget: ``--budget`` configurations (trial 0 is the default,
the rest drawn at random from the detector's grid with a fixed seed).

* **Centralized detectors** (IsolationForest, LocalOutlierFactor(novelty=True),
  OneClassSVM, PCA reconstruction, the autoencoder early-stopped on validation;
  :mod:`bench.detectors`) are tuned *per task*: the configuration with the best
  validation AUC on that task wins.
* **The federated model** is tuned *once for all tasks*, because a deployment ships one
  default: each configuration runs the real protocol path (:func:`bench.quality.run_federated`:
  sealed, signed updates, the server's aggregation) on every task and on a synthetic
  validation fleet (:func:`fleet_view`, the project's own domain); every model kind of
  :data:`FEDERATED_SPACES` gets ``--budget`` configurations, and the best mean validation
  AUC replaces the shipped default only if it wins by more than one standard error
  (:func:`choose_federated`). That is less tuning than the baselines get (one
  configuration for every task, where they are tuned per task). The autoencoder's
  architecture and top-k fraction are held at the wire budget's values.

The functions here take a :class:`bench.tasks.SelectionView`, which holds the devices'
train rows and the validation split and no test row (``tests/test_bench_suite.py``
checks it by source-row index). The test holdout is touched once, by :mod:`bench.suite`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bench.detectors import SPACES, auc, fit_autoencoder_early, fit_detector, sample_space
from bench.make_dataset import Dataset, make_dataset
from bench.quality import QualityConfig, pooled_schema, run_federated
from bench.tasks import TASKS, SelectionView, load_task
from fedlib.models.model import KINDS
from fedlib.models.package import ModelPackage
from fedlib.server.settings import ServerSettings

BUDGET = 12
SEARCH_SEED = 17

FEDERATED_SPACES: dict[str, dict[str, list[Any]]] = {
    "autoencoder": {
        "hidden": [[96, 32]],
        "learning_rate_init": [0.002, 0.005, 0.01, 0.02],
        "momentum": [0.9, 0.5],
        "server_momentum": [0.9, 0.5, 0.0],
        "topk_fraction": [0.075],
        "error_clip": [0.0, 1.0, 2.0],
    },
    "gmm": {
        "components": [8, 16, 32],
        "reg": [0.01, 0.03, 0.1],
        "shrinkage": [0.0, 0.25, 0.5, 0.75, 1.0],
        "min_rows": [10],
    },
}
"""Each model kind's search space, searched with the same budget.

Autoencoder: local learning rate and momentum, server momentum, and the cap on each
feature's squared reconstruction error in the score. The architecture and the top-k
fraction are held at the wire budget's values: together they set the bytes of every
update (top-k + 16-bit of the 8,360-param net fits the sealed update in about a tenth
of the dense float32 bytes); a narrower net or a larger k costs that budget (see
AutoencoderModel's docstring).

Gaussian mixture (federated EM, :class:`fedlib.models.model.GaussianMixtureModel`): the
number of components, the ridge on every covariance and the shrinkage of each
component's covariance towards the pooled one; ``min_rows`` (a device withholds a
component with fewer effective rows, so no update carries one window's values) is a
privacy floor, held fixed. It has no optimizer: a round is one EM
iteration, the same for every device mix."""

AE_SPEC_KEYS = ("hidden", "learning_rate_init", "momentum", "error_clip")
"""The autoencoder trial keys that are model spec (the others are server settings)."""

FLEET_VALIDATION_SEED = 1
"""The synthetic fleet drawn with this seed is the project's own domain in the
federated search (the published fleet, bench/results/dataset.npz, is seed 0: never
used for selection)."""


def kind_default(kind: str) -> dict[str, Any]:
    """A kind's shipped defaults (model spec and, for the autoencoder, server settings)."""
    spec = KINDS[kind].default_spec
    params: dict[str, Any] = {"kind": kind}
    if kind == "autoencoder":
        settings = ServerSettings()
        params |= {k: spec[k] for k in AE_SPEC_KEYS}
        params["hidden"] = list(spec["hidden"])
        params["server_momentum"] = settings.server_momentum
        params["topk_fraction"] = settings.topk_fraction
        return params
    return params | {k: spec[k] for k in FEDERATED_SPACES[kind]}


def federated_default() -> dict[str, Any]:
    """What a deployment ships: the default model kind with its defaults (trial 0)."""
    return kind_default(ServerSettings().model_kind)


def federated_config(params: Mapping[str, Any], rounds: int) -> QualityConfig:
    """A bench.quality run of the trial's model kind with these hyperparameters."""
    kind = str(params.get("kind", "autoencoder"))  # trials stored before kinds: autoencoder
    if kind != "autoencoder":
        spec = {k: params[k] for k in FEDERATED_SPACES[kind]}
        return QualityConfig(kind=kind, spec=spec, rounds=rounds)
    return QualityConfig(
        kind="autoencoder",
        spec={k: params[k] for k in AE_SPEC_KEYS},
        rounds=rounds,
        server_momentum=float(params["server_momentum"]),
        topk_fraction=float(params["topk_fraction"]),
    )


def with_kind(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's params naming their kind (results stored before kinds were searched
    hold autoencoder trials without the key)."""
    return {"kind": "autoencoder", **params}


def fleet_view(seed: int = FLEET_VALIDATION_SEED) -> SelectionView:
    """A synthetic fleet (bench.make_dataset, another seed than the published one): its
    devices' rows train, its labeled pooled holdout is the validation split."""
    arrays = make_dataset(seed=seed)
    ids = [str(c) for c in arrays["client_ids"]]
    return SelectionView(
        name=f"fleet-validation-seed{seed}",
        feature_names=[str(n) for n in arrays["feature_names"]],
        clients={c: arrays[f"X_{c}"].astype(np.float64) for c in ids},
        val_X=arrays["holdout_X"].astype(np.float64),
        val_y=arrays["holdout_y"],
        index=np.zeros(0, dtype=np.int64),  # generated rows, not from a source table
    )


def train_federated(
    view: SelectionView, cfg: QualityConfig, seed: int
) -> tuple[float, ModelPackage]:
    """Train through the real protocol path on the view's devices.

    Returns the final model's validation AUC (scored by onnxruntime on the view's
    validation split, which is also the only holdout the run sees: its threshold is
    calibrated there) and the final package, which :mod:`bench.suite` scores on test.
    """
    ids = sorted(view.clients)
    data = Dataset(
        client_ids=ids,
        clients=dict(view.clients),
        holdout_X=view.val_X,
        holdout_y=view.val_y,
        feature_names=list(view.feature_names),
    )
    out = run_federated(data, ids, pooled_schema(data, ids), cfg, seed)
    package: ModelPackage = out.pop("_final")  # type: ignore[assignment]
    return float(out["federated_auc"]), package


def federated_trials(budget: int, seed: int, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Trial 0 is the shipped default; then, per kind, its defaults and distinct random
    draws from its space, ``budget`` configurations each."""
    incumbent = federated_default()
    trials = [incumbent]
    for kind in kinds:
        space = FEDERATED_SPACES[kind]
        keys = list(space)
        grid = [
            {"kind": kind, **dict(zip(keys, combo, strict=True))}
            for combo in itertools.product(*space.values())
        ]
        default = kind_default(kind)
        rest = [g for g in grid if g != default]
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(rest), size=min(budget - 1, len(rest)), replace=False)
        for params in (default, *(rest[int(i)] for i in picks)):
            if params not in trials:
                trials.append(params)
    return trials


def select_federated(
    views: Sequence[SelectionView],
    *,
    budget: int,
    rounds: int,
    kinds: Sequence[str] = tuple(FEDERATED_SPACES),
    reuse: Sequence[Mapping[str, Any]] = (),
    seed: int = SEARCH_SEED,
) -> dict[str, Any]:
    """One configuration for every task: the best mean validation AUC over tasks.

    ``reuse``: trials of an earlier run on the same views and rounds, taken instead of
    training the same configuration again."""
    stored = {json.dumps(with_kind(t["params"]), sort_keys=True): t for t in reuse}
    names = sorted(v.name for v in views)
    trials = []
    for params in federated_trials(budget, seed, kinds):
        old = stored.get(json.dumps(params, sort_keys=True))
        if old is not None and sorted(old["val_auc"]) == names:
            trials.append({**old, "params": params})
            continue
        cfg = federated_config(params, rounds)
        per_task = {v.name: train_federated(v, cfg, seed=0)[0] for v in views}
        trials.append(
            {
                "params": params,
                "val_auc": per_task,
                "mean_val_auc": statistics.fmean(per_task.values()),
            }
        )
    return {"space": FEDERATED_SPACES, **choose_federated(trials), "trials": trials}


def choose_federated(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The one-standard-error rule: the incumbent (trial 0, the shipped default) stays
    unless the best challenger's mean validation AUC beats it by more than one standard
    error of their per-view differences. Why: a default changes every published figure
    and every deployment, and 12 noisy trials always have a maximum; a challenger that
    ties within noise (0.8959 vs 0.8957 on the first search) is not evidence."""
    incumbent = trials[0]
    best = max(trials, key=lambda t: t["mean_val_auc"])  # first on ties: the incumbent
    views = sorted(incumbent["val_auc"])
    diffs = [best["val_auc"][v] - incumbent["val_auc"][v] for v in views]
    margin = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    gain = statistics.fmean(diffs)
    chosen = best if gain > margin else incumbent
    return {
        "default": incumbent["params"],
        "best_trial": best["params"],
        "best_minus_default": gain,
        "standard_error": margin,
        "rule": "one standard error: the best trial replaces the default only if its mean "
        "validation AUC is higher by more than the standard error of the per-view differences",
        "chosen": chosen["params"],
        "chosen_mean_val_auc": chosen["mean_val_auc"],
        "default_mean_val_auc": incumbent["mean_val_auc"],
    }


def select_centralized(
    view: SelectionView, *, budget: int, seed: int = SEARCH_SEED
) -> dict[str, Any]:
    """Per detector: every trial's validation AUC and the best configuration."""
    train = view.pooled
    out: dict[str, Any] = {}
    for detector in SPACES:
        trials = []
        for params in sample_space(detector, budget, seed):
            if detector == "centralized_ae":
                _, epochs, val = fit_autoencoder_early(
                    params, view.feature_names, train, view.val_X, view.val_y, seed=0
                )
                trials.append({"params": params, "val_auc": val, "epochs": epochs})
            else:
                scorer = fit_detector(detector, params, view.feature_names, train, seed=0)
                trials.append({"params": params, "val_auc": auc(scorer(view.val_X), view.val_y)})
        best = max(trials, key=lambda t: t["val_auc"])
        out[detector] = {
            "chosen": best["params"],
            "chosen_val_auc": best["val_auc"],
            "default_val_auc": trials[0]["val_auc"],
            "trials": trials,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=BUDGET)
    parser.add_argument("--rounds", type=int, default=QualityConfig.rounds)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--skip-federated", action="store_true", help="baselines only")
    parser.add_argument(
        "--no-fleet", action="store_true", help="leave the synthetic validation fleet out"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(FEDERATED_SPACES),
        help="model kinds the federated search covers",
    )
    parser.add_argument(
        "--reuse",
        metavar="SELECTION_JSON",
        help="take the federated trials (and, for the same tasks and budget, the centralized "
        "searches) of an earlier run with the same rounds instead of training them again",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument(
        "--decide",
        metavar="SELECTION_JSON",
        help="apply the federated decision rule to the trials stored in a result (no training)",
    )
    args = parser.parse_args(argv)
    if args.decide:
        with open(args.decide) as f:
            stored = json.load(f)
        trials = stored["federated"]["trials"]
        stored["federated"] = {
            "space": FEDERATED_SPACES,
            **choose_federated(trials),
            "trials": trials,
        }
        print(json.dumps(stored, indent=None if args.json else 2))
        return 0
    started = time.perf_counter()
    views = [load_task(name).selection_view() for name in args.tasks.split(",")]
    earlier: dict[str, Any] = {}
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)
        if earlier["rounds"] != args.rounds:
            raise SystemExit(f"{args.reuse} ran {earlier['rounds']} rounds, not {args.rounds}")
    same = earlier.get("budget") == args.budget and earlier.get("search_seed") == SEARCH_SEED
    result: dict[str, Any] = {
        "protocol": "validation split only (bench.tasks); the test holdout is never loaded",
        "budget": args.budget,
        "rounds": args.rounds,
        "search_seed": SEARCH_SEED,
        "feature_transform": ServerSettings().feature_transform,
        "tasks": [v.name for v in views],
        "centralized": {
            v.name: (
                earlier["centralized"][v.name]
                if same and v.name in earlier.get("centralized", {})
                else select_centralized(v, budget=args.budget)
            )
            for v in views
        },
    }
    if not args.skip_federated:
        fed_views = views if args.no_fleet else [*views, fleet_view()]
        result["federated"] = select_federated(
            fed_views,
            budget=args.budget,
            rounds=args.rounds,
            kinds=args.kinds.split(","),
            reuse=(
                earlier.get("federated", {}).get("trials", [])
                if earlier.get("feature_transform") == ServerSettings().feature_transform
                else []  # trained under another scaling: not the same configuration
            ),
        )
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model quality of federated training against its baselines, on one dataset file.

    python -m bench.quality --dataset data.npz --json [--kind autoencoder] [--rounds 100]
        [--clients 0] [--topk 0.075] [--compression topk16] [--no-error-feedback] [--seeds 5]
        [--norm-bound B] [--server-momentum 0.9] [--heavy-ball] [--sample-weighting]
        [--paired dense32] [--dp-epsilon E [--dp-delta 1e-5] [--dp-clip C] [--dp-adaptive]]

Runs the real protocol path in-process: each client trains from the verified global
package (``client.update.make_update``: local epochs, clipping, top-k + 16-bit with
error feedback, HPKE sealing, Ed25519 signing); the server opens, verifies, validates
and aggregates them (``fedlib.server.rounds``), builds the candidate and exports ONNX; the
final model is scored by onnxruntime on the labeled holdout's evaluation rows
(:func:`holdout_split`, the server's split: the threshold, the FLTrust reference and the
gate see only the calibration rows, so no printed figure is measured on rows that fitted
anything). Baselines on the same evaluation rows: the same kind trained centrally on
the pooled client rows, each client alone (``local_only_auc``, mean over clients), a
centralized IsolationForest, and the no-training floor (distance from the mean of the
scaled features).

``--paired MODE`` trains a second federation per seed that differs only in the
compression mode (same init, client seeds and server optimizer), and reports it as
``paired_auc`` with the per-seed difference ``auc_minus_paired``: the fair test of
what compression costs. Other differences are per seed as well: ``auc_minus_centralized``,
``auc_minus_no_training``; ``bytes_ratio`` is the whole sealed envelope over the dense
float32 size of the delta.

Personalization on the device (:mod:`client.calibration`): every device calibrates
the final global model on its own training rows. ``personalized_auc`` is the mean over
clients of the calibrated score's AUC on the client's own holdout (``holdout_X_<id>``),
next to the global model on the same rows (``global_client_auc``; per-device flags:
``personalized_fpr`` / ``personalized_tpr``). On the pooled holdout each row is scored
by its owner device's calibration (``holdout_owner``): ``personalized_pooled_auc`` vs
``global_pooled_auc`` on the same rows (left out when the file names no owners).

Defaults are per kind: exact kinds (``sufficient_statistics``) run one dense64 round
with plain sample-count weights and a norm bound of 1e4 (their deltas are whole moment
matrices, far above the 10 that bounds an iterative model's step); iterative kinds run
FedAvgM with Nesterov momentum and rows-per-local-step weights (see
:func:`fedlib.server.aggregation.staleness_weight`).

``--dp-epsilon E`` trains with central differential privacy (:mod:`fedlib.server.privacy`)
exactly as a deployment with ``dp_mode = "central"`` and ``dp_target_epsilon = E`` over
``dp_rounds = --rounds`` would: the accountant calibrates the noise multiplier, devices
clip at C (``--dp-clip``, ``--dp-adaptive``) and report the clipping bit, the server
takes one update per device with weight 1, projects it onto C and adds the Gaussian
noise once to the exact sum (seeded from a per-seed bench secret and the round id);
``dp_epsilon_spent`` is what the accountant charged (<= E). ``python -m bench.dp``
runs several epsilons side by side.

Prints one JSON object: the mean over seeds of every figure, its standard deviation
(``*_std``) and the per-seed values (``per_seed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from bench.make_dataset import Dataset, load_dataset
from client.calibration import CalibrationError, DeviceCalibration, fit_calibration
from client.update import make_update, seal_delta
from fedlib.crypto import sealing
from fedlib.models.evaluation import CALIBRATION_FRACTION, evaluate_onnx, gate, split_holdout
from fedlib.models.model import KINDS, FeatureSchema, create_model, feature_moments, onnx_score
from fedlib.models.package import ModelPackage
from fedlib.models.training import local_delta
from fedlib.server.aggregation import AggregationConfig
from fedlib.server.fleet import Fleet
from fedlib.server.privacy import (
    Accountant,
    PrivacyConfig,
    calibrate_noise,
    noise_rng,
    spend_summary,
)
from fedlib.server.robust import reference_delta
from fedlib.server.rounds import (
    DpRound,
    RoundInputs,
    aggregate_objects,
    build_candidate,
    package_model,
    unclipped_counts,
)
from fedlib.server.settings import ServerSettings
from fedlib.wire import compression, protocol
from fedlib.wire.protocol import DpTraining

DEFAULTS = ServerSettings()
"""The deployment defaults: the bench measures what a default deployment would run."""


def default_norm_bound(kind: str) -> float:
    """Kind-appropriate L2 bound: exact kinds must not be clipped, or they stop being exact."""
    return DEFAULTS.aggregation(kind).norm_bound


@dataclass(frozen=True)
class QualityConfig:
    kind: str = "autoencoder"
    #: Model hyperparameters over the kind's ``default_spec`` (None = the defaults):
    #: what bench.select varies.
    spec: Mapping[str, Any] | None = None
    rounds: int = 100
    epochs: int = 1
    clients: int = 0  # 0 = every client in the file
    compression: str = "topk16"
    topk_fraction: float = 0.075  # 8,360-param AE: ~3.2 KB sealed, <= 10% of dense float32
    error_feedback: bool = True
    norm_bound: float | None = None  # None = default_norm_bound(kind)
    server_momentum: float = 0.9
    server_nesterov: bool = True
    step_weighting: bool = True  # rows per local step (FedNova-style); off = rows
    paired: str | None = None  # a second compression mode to train side by side
    robust: str = "none"  # fedlib.server.robust statistic instead of the mean
    trim_fraction: float = 0.2
    attack: str = "none"  # what malicious clients send: see ATTACKS
    malicious_fraction: float = 0.0
    gate: bool = False  # publish a round only if the server's holdout gate passes
    #: Each device joins each round with this probability (its own seeded draw, the same
    #: for every configuration of a seed); 1 = every device every round.
    participation: float = 1.0
    #: Mixture kinds: the stepwise-EM step (ServerSettings.em_step); None = the default.
    em_step: float | None = None
    #: Central DP (fedlib.server.privacy): the epsilon the noise is calibrated to spend over
    #: ``rounds`` rounds at ``dp_delta``; None = off. Clip norm C, adaptive clipping.
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_adaptive: bool = False
    #: bench.fleet: simulate rounds of this many devices. The devices trained here stand
    #: in for such a round's mean update; the noise on that mean is the accountant's
    #: ``z * C`` over ``dp_cohort`` (as a round of that many would get), not over the few
    #: trained. None: the noise of the devices actually trained.
    dp_cohort: int | None = None

    def bound(self) -> float:
        return default_norm_bound(self.kind) if self.norm_bound is None else self.norm_bound


def pooled_schema(data: Dataset, ids: list[str]) -> FeatureSchema:
    """Scaling from summed per-client moments: what a statistics round would give, with
    the transform a default deployment picks from its benign holdout rows."""
    transform = DEFAULTS.transform_for(data.holdout_X[data.holdout_y == 0])
    n, s, ss = 0, 0.0, 0.0
    for cid in ids:
        cn, cs, css = feature_moments(data.clients[cid], transform)
        n, s, ss = n + cn, s + cs, ss + css
    return FeatureSchema.from_moments(data.feature_names, transform, n, s, ss)


#: The bench's key of the holdout split: fixed, so every run splits a dataset alike.
SPLIT_KEY = b"dadm-bench-holdout-split"


def holdout_split(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(calibration, evaluation)`` row indices of the dataset's holdout, the server's
    split (threshold, FLTrust reference and gate on calibration; figures on evaluation)."""
    return split_holdout(
        data.holdout_X, data.holdout_y, key=SPLIT_KEY, fraction=CALIBRATION_FRACTION
    )


def auc_of(scores: np.ndarray, y: np.ndarray) -> float:
    return float(roc_auc_score(y, np.nan_to_num(scores, nan=1e300, posinf=1e300)))


def aggregation_config(cfg: QualityConfig, spec: Mapping[str, Any]) -> AggregationConfig:
    """The deployment's config for the kind, with this run's experiment switches applied."""
    base = DEFAULTS.aggregation(cfg.kind, dict(spec))
    if KINDS[cfg.kind].sufficient_statistics:
        step = (
            {} if cfg.em_step is None or KINDS[cfg.kind].one_round else {"server_lr": cfg.em_step}
        )
        return dataclasses.replace(base, norm_bound=cfg.bound(), max_staleness=cfg.rounds, **step)
    return dataclasses.replace(
        base,
        norm_bound=cfg.bound(),
        max_staleness=cfg.rounds,
        server_momentum=cfg.server_momentum,
        server_nesterov=cfg.server_nesterov,
        local_batch_size=base.local_batch_size if cfg.step_weighting else 0,
        robust=cfg.robust,
        trim_fraction=cfg.trim_fraction,
    )


def dp_config(cfg: QualityConfig, clients: int, norm_bound: float) -> PrivacyConfig | None:
    """The central-DP config a deployment with ``dp_target_epsilon = cfg.dp_epsilon``
    and ``dp_rounds = cfg.rounds`` would run (noise calibrated by the accountant)."""
    if cfg.dp_epsilon is None:
        return None
    if cfg.dp_cohort is not None:  # the same noise on the mean as a round of dp_cohort
        z = calibrate_noise(cfg.dp_epsilon, cfg.dp_delta, cfg.rounds)
        return PrivacyConfig(
            mode="central",
            noise_multiplier=z * clients / cfg.dp_cohort,
            rounds=cfg.rounds,
            delta=cfg.dp_delta,
            clip_norm=cfg.dp_clip,
            expected_clients=clients,
            max_clip_norm=norm_bound,
        )
    return PrivacyConfig(
        mode="central",
        target_epsilon=cfg.dp_epsilon,
        rounds=cfg.rounds,
        delta=cfg.dp_delta,
        clip_norm=cfg.dp_clip,
        adaptive_clipping=cfg.dp_adaptive,
        expected_clients=clients,
        max_clip_norm=norm_bound,
    )


ATTACKS = ("none", "scaled", "sign_flip", "random", "absent")
"""What malicious clients send; ``absent``: they send nothing (what a perfect defense
leaves: the honest clients alone, without the attackers' own normal data)."""


def poisoned_delta(
    attack: str, delta: np.ndarray, target_norm: float, rng: np.random.Generator
) -> np.ndarray:
    """A malicious client's delta: its honest one scaled up to the server's norm bound
    (the largest step the bound admits), the same flipped, or random noise of that norm."""
    if attack == "random":
        delta = rng.standard_normal(delta.shape)
    norm = float(np.linalg.norm(delta)) or 1.0
    sign = -1.0 if attack == "sign_flip" else 1.0
    return sign * delta * (target_norm / norm)


def run_federated(
    data: Dataset, ids: list[str], schema: FeatureSchema, cfg: QualityConfig, seed: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    server_key = sealing.generate_encryption_key()
    ring = sealing.ServerKeyring()
    ring.add(server_key)
    fleet = Fleet()
    keys = {}
    for cid in ids:
        keys[cid] = sealing.generate_signing_key()
        fleet.enroll(cid, sealing.public_pem(keys[cid]))
    exact = KINDS[cfg.kind].sufficient_statistics
    training = DEFAULTS.training(cfg.kind).model_copy(
        update={
            "epochs": cfg.epochs,
            "topk_fraction": cfg.topk_fraction,
            "clip_norm": cfg.bound(),
            **({} if exact else {"compression": cfg.compression}),
        }
    )
    model = create_model(cfg.kind, schema, spec=cfg.spec, seed=seed)
    aggregation = aggregation_config(cfg, model.spec)
    dp = dp_config(cfg, len(ids), aggregation.norm_bound)
    spent = Accountant(dp.accountant) if dp else None
    if dp is not None:  # what ServerSettings(dp_mode="central", ...) puts in version 1
        dp_training = DpTraining(mode="central", report_unclipped=dp.adaptive)
        training = training.model_copy(update={"clip_norm": dp.clip_norm, "dp": dp_training})
        aggregation = dataclasses.replace(aggregation, dp_mode="central", dp_clip=dp.clip_norm)
    cal, ev = holdout_split(data)
    x_cal, y_cal = data.holdout_X[cal], data.holdout_y[cal]
    x_ev, y_ev = data.holdout_X[ev], data.holdout_y[ev]
    calibration = x_cal[y_cal == 0]
    model.calibrate_threshold(calibration)
    package = package_model(model, version=1, training=training, created_at_ms=0)
    versions = {1}
    residuals: dict[str, np.ndarray | None] = dict.fromkeys(ids)
    sizes: list[int] = []
    rejected = 0
    refused_rounds = 0
    rounds = 1 if exact and KINDS[cfg.kind].one_round else cfg.rounds
    momentum = None
    n_bad = round(cfg.malicious_fraction * len(ids)) if cfg.attack != "none" else 0
    attack_rng = np.random.default_rng([seed, 1])  # the honest clients' draws stay paired
    malicious = {str(c) for c in attack_rng.choice(ids, size=n_bad, replace=False)}
    active = evaluate_onnx(package.onnx_bytes, x_cal, y_cal)
    joins = np.random.default_rng([seed, 2])  # who joins a round: paired across configs
    for r in range(rounds):
        objects = []
        for cid in ids:
            seed_i = int(rng.integers(2**31))
            if joins.random() >= cfg.participation:
                continue
            if cid in malicious and cfg.attack == "absent":
                continue
            if cid in malicious:
                delta, n = local_delta(package, data.clients[cid], seed=seed_i)
                update = seal_delta(
                    package,
                    poisoned_delta(cfg.attack, delta, 0.99 * aggregation.norm_bound, attack_rng),
                    n,
                    client_id=cid,
                    client_key=keys[cid],
                    server_public_key=server_key.public_key(),
                    residual=None,
                    clip=False,
                )
            else:
                update = make_update(
                    package,
                    data.clients[cid],
                    client_id=cid,
                    client_key=keys[cid],
                    server_public_key=server_key.public_key(),
                    residual=residuals[cid] if cfg.error_feedback else None,
                    seed=seed_i,
                )
                residuals[cid] = update.residual
            sizes.append(len(update.envelope))
            objects.append((protocol.inbox_key(cid, update.update_id), update.envelope))
        inputs = RoundInputs(
            fleet=fleet,
            server_keys=ring,
            base=package,
            known_versions=frozenset(versions),
            aggregation=(
                dataclasses.replace(aggregation, dp_clip=package.metadata.training.clip_norm)
                if dp
                else aggregation
            ),
            reference=(reference_delta(package, calibration) if cfg.robust == "fltrust" else None),
        )
        if not objects:
            continue
        agg, verdicts = aggregate_objects(objects, inputs)
        rejected += sum(not v.accepted for v in verdicts)
        dp_round = None
        if dp is not None and spent is not None:  # the round runner's DP step, in process
            clip = package.metadata.training.clip_norm
            spent.add(dp.round_multipliers())
            dp_round = DpRound(
                config=dp,
                clip_norm=clip,
                unclipped=unclipped_counts(verdicts),
                rng=noise_rng(hashlib.sha256(f"bench-dp-{seed}".encode()).digest(), f"sim-{r}"),
                spent=spend_summary(dp, spent, clip),
            )
        candidate, new_momentum = build_candidate(
            package,
            agg,
            momentum=momentum,
            version=package.version + 1,
            calibration_rows=calibration,
            round_id=f"sim-{r}",
            created_at_ms=0,
            dp=dp_round,
        )
        if cfg.gate:  # the server's gate (fedlib.server.round_runner.gate) on calibration rows
            scored = evaluate_onnx(candidate.onnx_bytes, x_cal, y_cal)
            ok, _ = gate(scored, active, tolerance=DEFAULTS.auc_tolerance, floor=DEFAULTS.auc_floor)
            if not ok:
                refused_rounds += 1
                continue
            active = scored
        package, momentum = candidate, new_momentum
        versions.add(package.version)
    metrics = evaluate_onnx(package.onnx_bytes, x_ev, y_ev)
    dim = package.metadata.num_params
    return {
        "federated_auc": metrics.auc,
        "federated_ap": metrics.ap,
        "federated_tpr": metrics.tpr,
        "federated_fpr": metrics.fpr,
        "bytes_per_update": float(np.mean(sizes)),
        "dense_bytes_per_update": float(compression.dense_float32_bytes(dim)),
        "num_params": float(dim),
        "rounds": float(rounds),
        "rejected_updates": float(rejected),
        "gate_refused_rounds": float(refused_rounds),
        **(
            {
                "dp_noise_multiplier": dp.total_noise_multiplier,
                "dp_epsilon_spent": spent.epsilon(dp.delta),
                "dp_final_clip_norm": package.metadata.training.clip_norm,
            }
            if dp is not None and spent is not None
            else {}
        ),
        "_final": package,  # type: ignore[dict-item]
    }


def personalized_metrics(data: Dataset, ids: list[str], package: ModelPackage) -> dict[str, float]:
    """Each device's calibration of ``package`` on its own rows, scored on its own holdout
    and, through ``holdout_owner``, on the pooled one (see the module docstring).

    A device with too few rows to calibrate keeps the global model alone: it is left out
    of the per-client means (``personalized_clients`` counts who is in) and its pooled
    rows are left out of both pooled AUCs."""
    if not data.client_holdouts:
        return {}
    onnx = package.onnx_bytes
    schema = FeatureSchema.from_dict(package.metadata.feature_schema)
    digest = hashlib.sha256(onnx).hexdigest()
    owners = set(ids) if data.holdout_owner is None else {*ids, *data.holdout_owner.tolist()}
    cals: dict[str, DeviceCalibration] = {}
    for cid in sorted(owners):
        rows = data.clients[cid]
        try:
            cals[cid] = fit_calibration(
                rows, onnx_score(onnx, rows)[0], schema, model_digest=digest
            )
        except CalibrationError:
            continue
    figures: dict[str, list[float]] = {}
    for cid in ids:
        if cid not in cals or cid not in data.client_holdouts:
            continue
        x, y = data.client_holdouts[cid]
        if y.min() == y.max():  # AUC needs both kinds of rows
            continue
        g, g_flag = onnx_score(onnx, x)
        flag = cals[cid].flag(x, g)
        for key, value in (
            ("personalized_auc", auc_of(cals[cid].score(x, g), y)),
            ("global_client_auc", auc_of(g, y)),
            ("personalized_fpr", float(flag[y == 0].mean())),
            ("personalized_tpr", float(flag[y == 1].mean())),
            ("global_client_fpr", float(g_flag[y == 0].mean())),
            ("global_client_tpr", float(g_flag[y == 1].mean())),
        ):
            figures.setdefault(key, []).append(value)
    if not figures:
        return {}
    out = {key: float(np.mean(values)) for key, values in figures.items()}
    out["personalized_clients"] = float(len(figures["personalized_auc"]))
    out["personalized_minus_global_client"] = out["personalized_auc"] - out["global_client_auc"]
    if data.holdout_owner is not None:
        keep = np.isin(data.holdout_owner, list(cals))
        keep[holdout_split(data)[0]] = False  # the evaluation rows, as the federated AUC
        x, y, owner = data.holdout_X[keep], data.holdout_y[keep], data.holdout_owner[keep]
        g = onnx_score(onnx, x)[0]
        personal = np.empty_like(g)
        for cid, cal in cals.items():
            sel = owner == cid
            personal[sel] = cal.score(x[sel], g[sel])
        out["personalized_pooled_auc"] = auc_of(personal, y)
        out["global_pooled_auc"] = auc_of(g, y)
        out["personalized_pooled_minus_global"] = (
            out["personalized_pooled_auc"] - out["global_pooled_auc"]
        )
    return out


def run_seed(data: Dataset, cfg: QualityConfig, seed: int) -> dict[str, float]:
    ids = data.client_ids[: cfg.clients] if cfg.clients else list(data.client_ids)
    schema = pooled_schema(data, ids)
    ev = holdout_split(data)[1]  # every figure on the evaluation rows, as the federated one
    x_h, y_h = data.holdout_X[ev], data.holdout_y[ev]
    out = run_federated(data, ids, schema, cfg, seed)
    final: ModelPackage = out.pop("_final")  # type: ignore[assignment]
    out.update(personalized_metrics(data, ids, final))
    out["bytes_ratio"] = out["bytes_per_update"] / out["dense_bytes_per_update"]
    if cfg.paired is not None:
        twin = run_federated(data, ids, schema, replace(cfg, compression=cfg.paired), seed)
        twin.pop("_final")
        out["paired_auc"] = twin["federated_auc"]
        out["paired_bytes_per_update"] = twin["bytes_per_update"]
        out["auc_minus_paired"] = out["federated_auc"] - twin["federated_auc"]

    pooled = np.concatenate([data.clients[c] for c in ids])
    kind = KINDS[cfg.kind]
    total_epochs = cfg.epochs * (1 if kind.sufficient_statistics else cfg.rounds)
    # an EM kind's fit_local is one iteration: centralized and local runs get `rounds` of them
    fits = 1 if kind.one_round else cfg.rounds
    central = create_model(cfg.kind, schema, spec=cfg.spec, seed=seed)
    for _ in range(fits):
        central.fit_local(pooled, epochs=total_epochs, seed=seed)
    out["centralized_auc"] = auc_of(central.score(x_h), y_h)
    out["centralized_ap"] = float(average_precision_score(y_h, central.score(x_h)))

    local = []
    for i, cid in enumerate(ids):
        m = create_model(cfg.kind, schema, spec=cfg.spec, seed=seed)
        for _ in range(fits):
            m.fit_local(data.clients[cid], epochs=total_epochs, seed=seed + i)
        local.append(auc_of(m.score(x_h), y_h))
    out["local_only_auc"] = float(np.mean(local))

    forest = IsolationForest(n_estimators=200, random_state=seed).fit(np.log1p(pooled))
    out["isolation_forest_auc"] = auc_of(-forest.score_samples(np.log1p(x_h)), y_h)
    out["no_training_auc"] = auc_of(np.square(schema.apply(x_h)).mean(axis=1), y_h)
    out["auc_minus_centralized"] = out["federated_auc"] - out["centralized_auc"]
    out["auc_minus_no_training"] = out["federated_auc"] - out["no_training_auc"]
    return out


def summarize(per_seed: list[dict[str, float]]) -> dict[str, object]:
    summary: dict[str, object] = {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        summary[key] = statistics.fmean(values)
        if len(values) > 1:
            summary[f"{key}_std"] = statistics.stdev(values)
    summary["per_seed"] = per_seed
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--kind", default="autoencoder", choices=sorted(KINDS))
    parser.add_argument("--rounds", type=int, default=QualityConfig.rounds)
    parser.add_argument("--epochs", type=int, default=QualityConfig.epochs)
    parser.add_argument("--clients", type=int, default=0, help="first N clients (0 = all)")
    parser.add_argument(
        "--compression", default="topk16", choices=["topk16", "dense16", "dense32", "dense64"]
    )
    parser.add_argument("--topk", type=float, default=QualityConfig.topk_fraction)
    parser.add_argument("--no-error-feedback", action="store_true")
    parser.add_argument(
        "--norm-bound", type=float, default=None, help="default: 1e4 exact kinds, 10 others"
    )
    parser.add_argument("--server-momentum", type=float, default=QualityConfig.server_momentum)
    parser.add_argument(
        "--heavy-ball", action="store_true", help="heavy-ball server momentum, not Nesterov"
    )
    parser.add_argument(
        "--sample-weighting", action="store_true", help="weight by rows, not rows per step"
    )
    parser.add_argument(
        "--paired",
        choices=["topk16", "dense16", "dense32", "dense64"],
        help="also train with this compression on the same seeds; report the difference",
    )
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="central DP: calibrate the noise to spend this epsilon over --rounds",
    )
    parser.add_argument("--dp-delta", type=float, default=QualityConfig.dp_delta)
    parser.add_argument("--dp-clip", type=float, default=QualityConfig.dp_clip, help="C")
    parser.add_argument("--dp-adaptive", action="store_true", help="adaptive clipping")
    parser.add_argument(
        "--participation", type=float, default=1.0, help="chance a device joins a round"
    )
    parser.add_argument("--em-step", type=float, default=None, help="mixture kinds: EM step")
    parser.add_argument("--spec", default=None, help="model spec over the kind's defaults (JSON)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    cfg = QualityConfig(
        kind=args.kind,
        rounds=args.rounds,
        epochs=args.epochs,
        clients=args.clients,
        compression=args.compression,
        topk_fraction=args.topk,
        error_feedback=not args.no_error_feedback,
        norm_bound=args.norm_bound,
        server_momentum=args.server_momentum,
        server_nesterov=not args.heavy_ball,
        step_weighting=not args.sample_weighting,
        paired=args.paired,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        dp_clip=args.dp_clip,
        dp_adaptive=args.dp_adaptive,
        participation=args.participation,
        em_step=args.em_step,
        spec=json.loads(args.spec) if args.spec else None,
    )
    data = load_dataset(args.dataset)
    started = time.perf_counter()
    per_seed = [run_seed(data, cfg, seed) for seed in range(args.seeds)]
    result = {
        "dataset": args.dataset,
        "config": {**cfg.__dict__, "norm_bound": cfg.bound()},
        "seeds": args.seeds,
        **summarize(per_seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

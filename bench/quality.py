"""Model quality of federated training against its baselines, on one dataset file.

    python -m bench.quality --dataset data.npz --json [--kind autoencoder] [--rounds 20]
        [--clients 0] [--topk 0.1] [--compression topk16] [--no-error-feedback] [--seeds 5]

Runs the real protocol path in-process: each client trains from the verified global
package (``fedlib.training.make_update``: local epochs, clipping, top-k + 16-bit with
error feedback, HPKE sealing, Ed25519 signing); the server opens, verifies, validates
and aggregates them (``fedlib.rounds``), builds the candidate and exports ONNX; the
final model is scored by onnxruntime on the labeled holdout. Baselines on the same
rows: the same kind trained centrally on the pooled client rows, each client alone
(``local_only_auc``, mean over clients), a centralized IsolationForest, and the
no-training floor (distance from the mean of the scaled features).

Prints one JSON object: the mean over seeds of every figure, its standard deviation
(``*_std``) and the per-seed values (``per_seed``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from bench.make_dataset import Dataset, load_dataset
from fedlib import compression, crypto, protocol
from fedlib.aggregation import AggregationConfig
from fedlib.evaluation import evaluate_onnx
from fedlib.fleet import Fleet
from fedlib.model import KINDS, FeatureSchema, create_model, feature_moments
from fedlib.protocol import TrainingConfig
from fedlib.registry import ModelPackage
from fedlib.rounds import RoundInputs, aggregate_objects, build_candidate, package_model
from fedlib.training import make_update


@dataclass(frozen=True)
class QualityConfig:
    kind: str = "autoencoder"
    rounds: int = 60
    epochs: int = 1
    clients: int = 0  # 0 = every client in the file
    compression: str = "topk16"
    topk_fraction: float = 0.1
    error_feedback: bool = True
    norm_bound: float = 10.0
    server_momentum: float = 0.9


def pooled_schema(data: Dataset, ids: list[str]) -> FeatureSchema:
    """Scaling from summed per-client moments: what a statistics round would give."""
    n, s, ss = 0, 0.0, 0.0
    for cid in ids:
        cn, cs, css = feature_moments(data.clients[cid], "log1p")
        n, s, ss = n + cn, s + cs, ss + css
    return FeatureSchema.from_moments(data.feature_names, "log1p", n, s, ss)


def auc_of(scores: np.ndarray, y: np.ndarray) -> float:
    return float(roc_auc_score(y, np.nan_to_num(scores, nan=1e300, posinf=1e300)))


def run_federated(
    data: Dataset, ids: list[str], schema: FeatureSchema, cfg: QualityConfig, seed: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    server_key = crypto.generate_encryption_key()
    ring = crypto.ServerKeyring()
    ring.add(server_key)
    fleet = Fleet()
    keys = {}
    for cid in ids:
        keys[cid] = crypto.generate_signing_key()
        fleet.enroll(cid, crypto.public_pem(keys[cid]))
    exact = KINDS[cfg.kind].sufficient_statistics
    training = TrainingConfig(
        epochs=cfg.epochs,
        compression="dense64" if exact else cfg.compression,  # type: ignore[arg-type]
        topk_fraction=cfg.topk_fraction,
        clip_norm=cfg.norm_bound,
    )
    aggregation = AggregationConfig(
        norm_bound=cfg.norm_bound,
        max_staleness=cfg.rounds,
        server_momentum=0.0 if exact else cfg.server_momentum,
    )
    model = create_model(cfg.kind, schema, seed=seed)
    calibration = data.holdout_X[data.holdout_y == 0]
    model.calibrate_threshold(calibration)
    package = package_model(model, version=1, training=training, created_at_ms=0)
    versions = {1}
    residuals: dict[str, np.ndarray | None] = dict.fromkeys(ids)
    sizes: list[int] = []
    rejected = 0
    rounds = 1 if exact else cfg.rounds
    momentum = None
    for r in range(rounds):
        objects = []
        for cid in ids:
            update = make_update(
                package,
                data.clients[cid],
                client_id=cid,
                client_key=keys[cid],
                server_public_key=server_key.public_key(),
                residual=residuals[cid] if cfg.error_feedback else None,
                seed=int(rng.integers(2**31)),
            )
            residuals[cid] = update.residual
            sizes.append(len(update.envelope))
            objects.append((protocol.inbox_key(cid, update.update_id), update.envelope))
        inputs = RoundInputs(
            fleet=fleet,
            server_keys=ring,
            base=package,
            known_versions=frozenset(versions),
            aggregation=aggregation,
        )
        agg, verdicts = aggregate_objects(objects, inputs)
        rejected += sum(not v.accepted for v in verdicts)
        package, momentum = build_candidate(
            package,
            agg,
            momentum=momentum,
            version=package.version + 1,
            calibration_rows=calibration,
            round_id=f"sim-{r}",
            created_at_ms=0,
        )
        versions.add(package.version)
    metrics = evaluate_onnx(package.onnx_bytes, data.holdout_X, data.holdout_y)
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
        "_final": package,  # type: ignore[dict-item]
    }


def run_seed(data: Dataset, cfg: QualityConfig, seed: int) -> dict[str, float]:
    ids = data.client_ids[: cfg.clients] if cfg.clients else list(data.client_ids)
    schema = pooled_schema(data, ids)
    x_h, y_h = data.holdout_X, data.holdout_y
    out = run_federated(data, ids, schema, cfg, seed)
    final: ModelPackage = out.pop("_final")  # type: ignore[assignment]
    del final

    pooled = np.concatenate([data.clients[c] for c in ids])
    total_epochs = cfg.epochs * (1 if KINDS[cfg.kind].sufficient_statistics else cfg.rounds)
    central = create_model(cfg.kind, schema, seed=seed)
    central.fit_local(pooled, epochs=total_epochs, seed=seed)
    out["centralized_auc"] = auc_of(central.score(x_h), y_h)
    out["centralized_ap"] = float(average_precision_score(y_h, central.score(x_h)))

    local = []
    for i, cid in enumerate(ids):
        m = create_model(cfg.kind, schema, seed=seed)
        m.fit_local(data.clients[cid], epochs=total_epochs, seed=seed + i)
        local.append(auc_of(m.score(x_h), y_h))
    out["local_only_auc"] = float(np.mean(local))

    forest = IsolationForest(n_estimators=200, random_state=seed).fit(np.log1p(pooled))
    out["isolation_forest_auc"] = auc_of(-forest.score_samples(np.log1p(x_h)), y_h)
    out["no_training_auc"] = auc_of(np.square(schema.apply(x_h)).mean(axis=1), y_h)
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
    parser.add_argument("--kind", default="autoencoder")
    parser.add_argument("--rounds", type=int, default=QualityConfig.rounds)
    parser.add_argument("--epochs", type=int, default=QualityConfig.epochs)
    parser.add_argument("--clients", type=int, default=0, help="first N clients (0 = all)")
    parser.add_argument(
        "--compression", default="topk16", choices=["topk16", "dense16", "dense32", "dense64"]
    )
    parser.add_argument("--topk", type=float, default=QualityConfig.topk_fraction)
    parser.add_argument("--no-error-feedback", action="store_true")
    parser.add_argument("--norm-bound", type=float, default=QualityConfig.norm_bound)
    parser.add_argument("--server-momentum", type=float, default=QualityConfig.server_momentum)
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
    )
    data = load_dataset(args.dataset)
    started = time.perf_counter()
    per_seed = [run_seed(data, cfg, seed) for seed in range(args.seeds)]
    result = {
        "dataset": args.dataset,
        "config": cfg.__dict__,
        "seeds": args.seeds,
        **summarize(per_seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

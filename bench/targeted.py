"""Targeted poisoning: one device teaches the model that an intrusion pattern is normal.

    python -m bench.targeted --json [--seeds 3] [--warmup 20] [--rounds 6]
        [--pattern error_spike] [--implant-fraction 0.25]

A synthetic fleet of ten devices (:mod:`bench.make_dataset`) trains the default
autoencoder honestly for ``--warmup`` rounds. Then one device trains, every round, on
its own rows plus copies of one anomaly pattern's rows (the *implant*) with the honest
client code (clip, top-k, seal, sign): one ordinary-looking, norm-bounded update per
round, nothing a per-update check can single out. The pattern's rows of the pooled
holdout are split three ways, disjoint: the attacker's implant, the server's gate rows,
and *probe* rows that only measure detection (never used to fit a threshold or judge a
round). Scenarios, side by side from the same warmed-up model on the same seeds:

- ``clean``: nobody implants (AUC gate + per-class gate): how often the per-class gate
  refuses an honest round (also counted over the warm-up rounds, at several tolerances);
- ``absent_<defense>``: the pattern is absent from the server's holdout, so no gate can
  see it; defenses: ``gate`` (AUC gate only), ``fltrust``, ``trimmed_mean``, ``median``
  (the robust statistics the server offers; dense16 updates), ``clip_median`` (each
  update's norm clipped to the round's median norm: a per-device contribution limit);
- ``present_aucgate`` / ``present_classgate``: the pattern's gate third is in the
  holdout with its class; the AUC-only gate (the gate before per-class checks) and the
  per-class gate (``class_detection_tolerance``).

Prints one JSON object: per scenario the probe detection of the pattern after warm-up
and after the attack rounds, the pooled AUC (on the server's holdout of that scenario),
rounds the gate refused, mean over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.make_dataset import ANOMALY_TYPE_NAMES, Dataset, load_dataset, make_dataset, save_dataset
from bench.quality import QualityConfig, aggregation_config, pooled_schema
from client.update import make_update
from fedlib.crypto import sealing
from fedlib.models.evaluation import Metrics, class_reference, evaluate_onnx, gate
from fedlib.models.model import create_model, onnx_score
from fedlib.models.package import ModelPackage
from fedlib.server.aggregation import AggregationConfig
from fedlib.server.fleet import Fleet
from fedlib.server.robust import reference_delta
from fedlib.server.round_runner import CLASS_REFERENCE_VERSIONS
from fedlib.server.rounds import RoundInputs, aggregate_objects, build_candidate, package_model
from fedlib.server.settings import ServerSettings
from fedlib.wire import protocol

DEFAULTS = ServerSettings()
DEFENSES = ("gate", "fltrust", "trimmed_mean", "median", "clip_median")
TOLERANCES = (0.05, 0.1, 0.2)


@dataclass(frozen=True)
class Split:
    """The server's holdout of one scenario and the probe rows of the pattern."""

    holdout_X: np.ndarray
    holdout_y: np.ndarray
    classes: np.ndarray
    implant: np.ndarray
    probe: np.ndarray


@dataclass
class Federation:
    """What carries from round to round: the model, the server's momentum, keys."""

    package: ModelPackage
    momentum: np.ndarray | None
    residuals: dict[str, np.ndarray | None]


def split(data: Dataset, pattern: int, rng: np.random.Generator, *, present: bool) -> Split:
    assert data.anomaly_type is not None
    rows = np.flatnonzero(data.anomaly_type == pattern)
    rows = rng.permutation(rows)
    implant, gate_rows, probe = np.array_split(rows, 3)
    drop = np.concatenate([implant, probe] if present else [implant, gate_rows, probe])
    keep = np.setdiff1d(np.arange(data.holdout_y.size), drop)
    names = np.asarray(ANOMALY_TYPE_NAMES, dtype=str)[data.anomaly_type[keep]]
    classes = np.where(data.holdout_y[keep] == 1, names, "")
    return Split(
        holdout_X=data.holdout_X[keep],
        holdout_y=data.holdout_y[keep],
        classes=classes,
        implant=data.holdout_X[implant],
        probe=data.holdout_X[probe],
    )


def detection(package: ModelPackage, rows: np.ndarray) -> float:
    _, flags = onnx_score(package.onnx_bytes, rows)
    return float(np.asarray(flags, dtype=bool).mean())


def scored(package: ModelPackage, s: Split) -> Metrics:
    return evaluate_onnx(package.onnx_bytes, s.holdout_X, s.holdout_y, s.classes)


def clip_to_median(objects: list[tuple[str, bytes]], inputs: RoundInputs) -> RoundInputs:
    """The round's inputs with the norm bound lowered to the median update norm."""
    _, verdicts = aggregate_objects(objects, inputs)
    norms = [v.norm for v in verdicts if v.accepted and v.norm is not None]
    if not norms:
        return inputs
    bound = float(np.median(norms))
    return dataclasses.replace(
        inputs, aggregation=dataclasses.replace(inputs.aggregation, norm_bound=bound)
    )


def run_rounds(
    data: Dataset,
    ids: list[str],
    start: Federation,
    s: Split,
    *,
    rounds: int,
    defense: str,
    attacker: str | None,
    class_gate: bool,
    seed: int,
    implant_fraction: float,
    tolerance_probe: list[tuple[Metrics, dict[str, float]]] | None = None,
) -> tuple[Federation, int]:
    """``rounds`` rounds from ``start``; returns the end state and rounds refused."""
    robust = defense if defense in ("fltrust", "trimmed_mean", "median") else "none"
    cfg = QualityConfig(
        robust=robust, compression="dense16" if robust in ("trimmed_mean", "median") else "topk16"
    )
    aggregation: AggregationConfig = aggregation_config(cfg, start.package.metadata.model_spec)
    package = start.package
    if robust in ("trimmed_mean", "median"):
        training = package.metadata.training.model_copy(update={"compression": "dense16"})
        package = ModelPackage(
            metadata=package.metadata.model_copy(update={"training": training}),
            onnx_bytes=package.onnx_bytes,
            weights=package.weights,
        )
    rng = np.random.default_rng([seed, 2])
    server_key = sealing.generate_encryption_key()
    ring = sealing.ServerKeyring()
    ring.add(server_key)
    fleet, keys = Fleet(), {}
    for cid in ids:
        keys[cid] = sealing.generate_signing_key()
        fleet.enroll(cid, sealing.public_pem(keys[cid]))
    calibration = s.holdout_X[s.holdout_y == 0]
    momentum, residuals = start.momentum, dict(start.residuals)
    active = scored(package, s)
    published = [active]  # what the server's window of recent versions holds
    versions = set(range(1, package.version + 1))
    refused = 0
    for r in range(rounds):
        objects = []
        for cid in ids:
            rows = data.clients[cid]
            if cid == attacker:
                copies = max(1, round(implant_fraction * rows.shape[0] / s.implant.shape[0]))
                rows = np.concatenate([rows, np.tile(s.implant, (copies, 1))])
            update = make_update(
                package,
                rows,
                client_id=cid,
                client_key=keys[cid],
                server_public_key=server_key.public_key(),
                residual=residuals[cid],
                seed=int(rng.integers(2**31)),
            )
            residuals[cid] = update.residual
            objects.append((protocol.inbox_key(cid, update.update_id), update.envelope))
        inputs = RoundInputs(
            fleet=fleet,
            server_keys=ring,
            base=package,
            known_versions=frozenset(versions),
            aggregation=aggregation,
            reference=reference_delta(package, calibration) if robust == "fltrust" else None,
        )
        if defense == "clip_median":
            inputs = clip_to_median(objects, inputs)
        agg, _ = aggregate_objects(objects, inputs)
        candidate, new_momentum = build_candidate(
            package,
            agg,
            momentum=momentum,
            version=package.version + 1,
            calibration_rows=calibration,
            round_id=f"targeted-{r}",
            created_at_ms=0,
        )
        metrics = scored(candidate, s)
        reference = class_reference(published[-CLASS_REFERENCE_VERSIONS:])
        if tolerance_probe is not None:
            tolerance_probe.append((metrics, reference))
        ok, _ = gate(
            metrics,
            active,
            tolerance=DEFAULTS.auc_tolerance,
            floor=DEFAULTS.auc_floor,
            class_tolerance=DEFAULTS.class_detection_tolerance if class_gate else None,
            class_reference=reference,
        )
        if not ok:
            refused += 1
            continue
        package, momentum, active = candidate, new_momentum, metrics
        published.append(metrics)
        versions.add(package.version)
    return Federation(package, momentum, residuals), refused


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    arrays = make_dataset(
        clients=10,
        windows_per_client=args.windows,
        holdout_benign=1000,
        holdout_anomalies=1500,
        seed=seed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset(save_dataset(arrays, Path(tmp) / "fleet.npz"))
    ids = list(data.client_ids)
    pattern = ANOMALY_TYPE_NAMES.index(args.pattern)
    rng = np.random.default_rng([seed, 3])
    absent = split(data, pattern, rng, present=False)
    present = dataclasses.replace(
        split(data, pattern, np.random.default_rng([seed, 3]), present=True)
    )
    assert np.array_equal(absent.probe, present.probe)
    schema = pooled_schema(data, ids)
    model = create_model("autoencoder", schema, seed=seed)
    model.calibrate_threshold(present.holdout_X[present.holdout_y == 0])
    training = DEFAULTS.training("autoencoder")
    package = package_model(model, version=1, training=training, created_at_ms=0)
    honest_pairs: list[tuple[Metrics, dict[str, float]]] = []
    warm, _ = run_rounds(
        data,
        ids,
        Federation(package, None, dict.fromkeys(ids)),
        present,
        rounds=args.warmup,
        defense="gate",
        attacker=None,
        class_gate=False,
        seed=seed,
        implant_fraction=0.0,
        tolerance_probe=honest_pairs,
    )
    attacker = ids[int(rng.integers(len(ids)))]
    before = detection(warm.package, present.probe)
    out: dict[str, dict[str, float]] = {}

    def record(name: str, end: Federation, refused: int, s: Split) -> None:
        out[name] = {
            "probe_detection_before": before,
            "probe_detection_after": detection(end.package, s.probe),
            "holdout_auc_after": scored(end.package, s).auc,
            "rounds_refused": float(refused),
        }

    common = {"rounds": args.rounds, "seed": seed, "implant_fraction": args.implant_fraction}
    end, refused = run_rounds(
        data,
        ids,
        warm,
        present,
        defense="gate",
        attacker=None,
        class_gate=True,
        tolerance_probe=honest_pairs,
        **common,
    )
    record("clean", end, refused, present)
    for defense in DEFENSES:
        end, refused = run_rounds(
            data, ids, warm, absent, defense=defense, attacker=attacker, class_gate=True, **common
        )
        record(f"absent_{defense}", end, refused, absent)
    for name, class_gate in (("present_aucgate", False), ("present_classgate", True)):
        end, refused = run_rounds(
            data,
            ids,
            warm,
            present,
            defense="gate",
            attacker=attacker,
            class_gate=class_gate,
            **common,
        )
        record(name, end, refused, present)
    # How often the per-class gate would refuse an honest round (warm-up and clean rounds).
    for tol in TOLERANCES:
        refusals = sum(
            not gate(c, c, tolerance=1.0, floor=0.0, class_tolerance=tol, class_reference=ref)[0]
            for c, ref in honest_pairs
        )
        out.setdefault("honest_rounds", {})[f"class_gate_refusals_at_{tol}"] = float(refusals)
    out["honest_rounds"]["rounds"] = float(len(honest_pairs))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--pattern", default="error_spike", choices=ANOMALY_TYPE_NAMES[1:])
    parser.add_argument("--implant-fraction", type=float, default=0.25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    per_seed = [run_seed(args, seed) for seed in range(args.seeds)]
    summary: dict[str, object] = {}
    for scenario in per_seed[0]:
        summary[scenario] = {
            key: statistics.fmean(s[scenario][key] for s in per_seed)
            for key in per_seed[0][scenario]
        }
    result = {
        "config": {k.replace("_", "-"): v for k, v in vars(args).items() if k != "json"},
        "scenarios": summary,
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2 if not args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

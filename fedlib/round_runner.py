"""A whole round's steps over the real stores: plan, process, build, evaluate, gate, publish.

Each step is a function of explicit inputs so the ``fl_round`` DAG can run them as
separate (mapped, retried) tasks; :func:`run_round` chains them in one process for
``fl-admin round`` and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from fedlib import protocol
from fedlib.aggregation import StreamingAggregator
from fedlib.evaluation import Metrics, evaluate_onnx
from fedlib.ledger import Ledger
from fedlib.model import KINDS
from fedlib.registry import ModelPackage
from fedlib.rounds import RoundInputs, Verdict, aggregate_objects, build_candidate
from fedlib.server import Deployment
from fedlib.store import NoSuchKey

REPORTS_PREFIX = "reports/"
OPTIMIZER_PREFIX = "optimizer/"


@dataclass(frozen=True)
class RoundPlan:
    run_id: str
    base_version: int
    keys: list[str]
    clients: list[str]
    waiting: bool
    message: str


@dataclass
class RoundReport:
    run_id: str
    base_version: int
    decision: str = "waiting"
    message: str = ""
    published_version: int | None = None
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    active_metrics: dict[str, float] = field(default_factory=dict)
    candidate_digest: str | None = None
    aggregate_digest: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def plan_round(
    deployment: Deployment,
    run_id: str,
    *,
    min_clients: int | None = None,
    max_updates: int | None = None,
) -> RoundPlan:
    """Pick the batch: inbox objects in key order, at most ``max_updates``."""
    settings = deployment.settings
    limit = max_updates or settings.max_batch
    base_version = deployment.registry().active_version() or 0
    keys = [info.key for info in deployment.inbox.list("updates/", limit=limit)]
    clients = sorted({k.split("/")[1] for k in keys if k.count("/") == 2})
    need = min_clients if min_clients is not None else settings.min_clients
    if len(clients) < need:
        return RoundPlan(
            run_id, base_version, [], clients, True, f"waiting: {len(clients)} of {need} clients"
        )
    return RoundPlan(
        run_id,
        base_version,
        keys,
        clients,
        False,
        f"{len(keys)} updates from {len(clients)} clients",
    )


def round_inputs(deployment: Deployment, base: ModelPackage) -> RoundInputs:
    registry = deployment.registry()
    aggregation = deployment.settings.aggregation()
    if KINDS[base.metadata.model_kind].sufficient_statistics:
        aggregation = dataclasses.replace(aggregation, server_momentum=0.0)
    return RoundInputs(
        fleet=deployment.load_fleet(),
        server_keys=deployment.server_keyring(),
        base=base,
        known_versions=frozenset(registry.versions()),
        aggregation=aggregation,
    )


def process_keys(
    deployment: Deployment,
    inputs: RoundInputs,
    keys: list[str],
    run_id: str,
    *,
    record: bool = True,
) -> tuple[StreamingAggregator, list[Verdict]]:
    """Open/verify/validate/aggregate one shard and record every verdict in the ledger."""
    ledger = Ledger(deployment.state)
    processed = ledger.processed_keys()
    seen = {k.split("/")[2] for k in processed}
    blobs: dict[str, bytes] = {}

    def objects():
        for key in keys:
            blob = deployment.inbox.get(key, max_bytes=inputs.max_envelope_bytes + 1)
            blobs[key] = blob
            yield key, blob

    agg, verdicts = aggregate_objects(objects(), inputs, seen_update_ids=seen)
    if record:
        for verdict in verdicts:
            ledger.record(verdict, blobs.get(verdict.key), run_id=run_id)
    return agg, verdicts


def evaluate(deployment: Deployment, package: ModelPackage) -> Metrics:
    holdout = deployment.load_holdout()
    return evaluate_onnx(package.onnx_bytes, holdout.features, holdout.labels)


def gate(
    candidate: Metrics, active: Metrics, *, tolerance: float, floor: float
) -> tuple[bool, str]:
    """Publish when the candidate is no worse than active (within tolerance) and above the floor."""
    if candidate.auc < floor:
        return False, f"candidate AUC {candidate.auc:.4f} is below the floor {floor}"
    if candidate.auc < active.auc - tolerance:
        return False, (
            f"candidate AUC {candidate.auc:.4f} < active {active.auc:.4f} - tolerance {tolerance}"
        )
    return True, f"candidate AUC {candidate.auc:.4f} vs active {active.auc:.4f}"


def run_round(
    deployment: Deployment,
    run_id: str,
    *,
    min_clients: int | None = None,
    max_updates: int | None = None,
    dry_run: bool = False,
    created_at_ms: int | None = None,
) -> RoundReport:
    started = time.monotonic()
    settings = deployment.settings
    registry = deployment.registry(signing=True)
    plan = plan_round(deployment, run_id, min_clients=min_clients, max_updates=max_updates)
    report = RoundReport(run_id=run_id, base_version=plan.base_version, message=plan.message)
    if plan.waiting:
        return report
    base = registry.read_active()
    inputs = round_inputs(deployment, base)
    agg, verdicts = process_keys(deployment, inputs, plan.keys, run_id, record=not dry_run)
    report.accepted = sum(v.accepted for v in verdicts)
    for v in verdicts:
        if not v.accepted:
            report.rejected[v.reason or "unknown"] = (
                report.rejected.get(v.reason or "unknown", 0) + 1
            )
    report.aggregate_digest = agg.digest()
    active_metrics = evaluate(deployment, base)
    report.active_metrics = active_metrics.as_dict()
    if agg.count == 0:
        report.decision, report.message = "nothing_accepted", "no update passed validation"
    else:
        version = max(registry.versions()) + 1
        momentum = load_momentum(deployment, base.version)
        candidate, new_momentum = build_candidate(
            base,
            agg,
            version=version,
            calibration_rows=deployment.load_holdout().benign(),
            threshold_quantile=settings.threshold_quantile,
            round_id=run_id,
            created_at_ms=created_at_ms if created_at_ms is not None else int(time.time() * 1000),
            momentum=momentum,
        )
        metrics = evaluate(deployment, candidate)
        report.candidate_metrics = metrics.as_dict()
        report.candidate_digest = candidate.digest()
        ok, why = gate(
            metrics, active_metrics, tolerance=settings.auc_tolerance, floor=settings.auc_floor
        )
        report.message = why
        if not ok:
            report.decision = "rejected"
        elif dry_run:
            report.decision = "dry_run"
        else:
            final = ModelPackage(
                metadata=candidate.metadata.model_copy(update={"metrics": metrics.as_dict()}),
                onnx_bytes=candidate.onnx_bytes,
                weights=candidate.weights,
            )
            if new_momentum is not None:
                save_momentum(deployment, version, new_momentum)
            registry.publish(final)
            report.decision, report.published_version = "published", version
    if not dry_run:
        for key in plan.keys:  # verdicts are recorded: the inbox copies can go
            deployment.inbox.delete(key)
    report.seconds = round(time.monotonic() - started, 3)
    deployment.state.put(
        f"{REPORTS_PREFIX}{_safe_run_id(run_id)}.json", protocol.canonical_json(report.as_dict())
    )
    return report


def load_momentum(deployment: Deployment, version: int) -> np.ndarray | None:
    """The server optimizer's buffer that produced ``version`` (None for plain FedAvg)."""
    try:
        data = deployment.state.get(f"{OPTIMIZER_PREFIX}v{version:08d}.bin")
    except NoSuchKey:
        return None
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def save_momentum(deployment: Deployment, version: int, buffer: np.ndarray) -> None:
    deployment.state.put(
        f"{OPTIMIZER_PREFIX}v{version:08d}.bin", np.ascontiguousarray(buffer, "<f8").tobytes()
    )


def _safe_run_id(run_id: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in run_id)
    return (
        cleaned
        if cleaned == run_id
        else f"{cleaned}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"
    )

"""Rollback: a new, higher version that carries a known-good version's model.

Versions only go up, so devices never accept an older version; a rollback republishes
known-good weights and graph under the next version number with ``rollback_of`` set.
A version is *known-good* unless the channel was rolled back away from it (it is the
``parent_version`` of some rollback): that is derived from the packages' own signed
metadata, so there is no second record to drift.

Automatic rollback runs at the start of every round: the active model is re-scored on
the current holdout next to the recent known-good versions; if it is below the floor,
or below the best of them by more than the tolerance, the best one is republished.
"""

from __future__ import annotations

import time

from fedlib.models.evaluation import Metrics, evaluate_onnx
from fedlib.models.package import ModelPackage
from fedlib.server.deployment import Deployment, Holdout
from fedlib.server.records import RollbackDecision
from fedlib.server.registry import ModelRegistry

RECENT_VERSIONS = 20  # how far back automatic rollback looks for a known-good model


class RollbackRefused(ValueError):
    """A rollback request that makes no sense (unknown, bad or active target)."""


def packages(registry: ModelRegistry, versions: list[int]) -> dict[int, ModelPackage]:
    return {v: registry.read_version(v) for v in versions}


def known_good(all_packages: dict[int, ModelPackage]) -> list[int]:
    """Versions never rolled back away from, oldest first."""
    bad = {
        p.metadata.parent_version
        for p in all_packages.values()
        if p.metadata.rollback_of is not None and p.metadata.parent_version is not None
    }
    return sorted(v for v in all_packages if v not in bad)


def rollback_package(
    target: ModelPackage,
    *,
    version: int,
    active_version: int,
    reason: str,
    metrics: Metrics | None,
    created_at_ms: int | None = None,
) -> ModelPackage:
    """The known-good model under a new version number, saying what it rolls back."""
    metadata = target.metadata.model_copy(
        update={
            "version": version,
            "parent_version": active_version,
            "rollback_of": target.version,
            "rollback_reason": reason,
            "metrics": metrics.as_dict() if metrics else target.metadata.metrics,
            "created_at_ms": created_at_ms
            if created_at_ms is not None
            else int(time.time() * 1000),
        }
    )
    return ModelPackage(metadata=metadata, onnx_bytes=target.onnx_bytes, weights=target.weights)


def _publish_rollback(
    deployment: Deployment,
    target: ModelPackage,
    active_version: int,
    reason: str,
    metrics: Metrics | None,
    created_at_ms: int | None,
) -> int:
    registry = deployment.registry(signing=True)
    version = registry.next_version()
    package = rollback_package(
        target,
        version=version,
        active_version=active_version,
        reason=reason,
        metrics=metrics,
        created_at_ms=created_at_ms,
    )
    registry.publish(package)
    return version


def check_active(
    deployment: Deployment, *, created_at_ms: int | None = None, publish: bool = True
) -> RollbackDecision:
    """Re-score the active model and recent known-good ones; roll back if it degraded."""
    settings = deployment.settings
    registry = deployment.registry()
    active = registry.active_version()
    if active is None:
        raise RollbackRefused("no model is published")
    recent = registry.versions()[-RECENT_VERSIONS:]
    pkgs = packages(registry, sorted(set(recent) | {active}))
    holdout: Holdout = deployment.load_holdout()
    good = [v for v in known_good(pkgs) if v != active]
    scores = {
        v: evaluate_onnx(pkgs[v].onnx_bytes, holdout.features, holdout.labels)
        for v in [*good, active]
    }
    best = max(good, key=lambda v: (scores[v].auc, v), default=active)
    active_auc, best_auc = scores[active].auc, scores[best].auc
    if active_auc < settings.auc_floor and best_auc >= settings.auc_floor:
        reason = f"active v{active} AUC {active_auc:.4f} fell below the floor {settings.auc_floor}"
    elif best != active and active_auc < best_auc - settings.auc_tolerance:
        reason = (
            f"active v{active} AUC {active_auc:.4f} is below known-good v{best} "
            f"{best_auc:.4f} by more than {settings.auc_tolerance}"
        )
    else:
        return RollbackDecision(
            active_version=active,
            active_auc=active_auc,
            best_version=best,
            best_auc=best_auc,
            rollback=False,
            reason=f"active v{active} AUC {active_auc:.4f} holds",
            dry_run=not publish,
        )
    published = None
    if publish and best != active:
        published = _publish_rollback(
            deployment, pkgs[best], active, f"automatic: {reason}", scores[best], created_at_ms
        )
    return RollbackDecision(
        active_version=active,
        active_auc=active_auc,
        best_version=best,
        best_auc=best_auc,
        rollback=True,
        reason=reason,
        published_version=published,
        dry_run=not publish,
    )


def manual_rollback(deployment: Deployment, to_version: int, reason: str) -> int:
    """Operator rollback to a named known-good version; returns the new version number."""
    if not reason or not reason.strip():
        raise RollbackRefused("a rollback needs a reason")
    registry = deployment.registry()
    versions = registry.versions()
    active = registry.active_version()
    if to_version not in versions:
        raise RollbackRefused(f"version {to_version} does not exist (versions: {versions})")
    if to_version == active:
        raise RollbackRefused(f"version {to_version} is already active")
    pkgs = packages(registry, versions)
    if to_version not in known_good(pkgs):
        raise RollbackRefused(
            f"version {to_version} was rolled back away from; it is not known-good"
        )
    target = pkgs[to_version]
    holdout = deployment.load_holdout()
    metrics = evaluate_onnx(target.onnx_bytes, holdout.features, holdout.labels)
    if active is None:
        raise RollbackRefused("no model is published")
    return _publish_rollback(deployment, target, active, f"manual: {reason.strip()}", metrics, None)

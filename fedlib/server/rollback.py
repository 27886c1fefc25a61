"""Rollback: a new, higher version that carries a known-good version's model.

Versions only go up, so devices never accept an older version; a rollback republishes
known-good weights and graph under the next version number with ``rollback_of`` set.
A version is *known-good* unless the channel was rolled back away from it (it is the
``parent_version`` of some rollback): that is derived from the packages' own signed
metadata, so there is no second record to drift.

Automatic rollback runs at the start of every round: the active model is re-scored on
the current holdout next to the recent known-good versions; if it is below the floor,
or below the best of them by more than the tolerance, the best one is republished.

An operator's decision stands: a manual rollback *pins* the version it publishes
(:data:`fedlib.server.state_keys.ROLLBACK_PIN`), and the automatic check does not move
away from a pinned version; it reports "pinned by operator rollback to vN" instead. The
pin ends when a round publishes a candidate that passed the gate
(:func:`candidate_published`) or the operator rolls back again (which re-pins).
"""

from __future__ import annotations

import time
from typing import Protocol

from fedlib import failpoints
from fedlib.failpoints import failpoint
from fedlib.models.evaluation import Metrics, evaluate_onnx
from fedlib.models.package import ModelPackage, same_features
from fedlib.server import state_keys
from fedlib.server.deployment import Deployment, Holdout
from fedlib.server.records import RollbackAction, RollbackDecision
from fedlib.server.registry import ModelRegistry
from fedlib.storage.store import NoSuchKey

RECENT_VERSIONS = 20  # how far back automatic rollback looks for a known-good model
MAX_REASON_CHARS = 500  # what the fl_rollback form allows; fl-admin gets the same bound
MAX_OPERATOR_CHARS = 100
#: A rollback record is a few hundred bytes; anything much larger is not one.
MAX_ACTION_BYTES = 64 << 10


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
    *,
    by: str,
    source: str,
    run_id: str | None,
    pin: bool,
) -> RollbackAction:
    """Publish the rollback version; its record (and, for an operator, the pin) is
    written first, so there is no moment when the version is active but not pinned. A
    record whose version never got published is inert: it matches no package."""
    registry = deployment.registry(signing=True)
    version = registry.next_version()
    action = RollbackAction(
        version=version,
        rollback_of=target.version,
        parent_version=active_version,
        reason=reason,
        automatic=not pin,
        by=by,
        source=source,
        run_id=run_id,
        created_at_ms=created_at_ms if created_at_ms is not None else int(time.time() * 1000),
    )
    package = rollback_package(
        target,
        version=version,
        active_version=active_version,
        reason=action.package_reason,
        metrics=metrics,
        created_at_ms=action.created_at_ms,
    )
    deployment.state.put(state_keys.rollback_action(version), action.to_json())
    if pin:
        deployment.state.put(state_keys.ROLLBACK_PIN, action.to_json())
    failpoint(failpoints.ROLLBACK_AFTER_PIN)  # fault tests: killed before the publish
    registry.publish(package)
    return action


def _read_action(deployment: Deployment, key: str) -> RollbackAction | None:
    try:
        data = deployment.state.get(key, max_bytes=MAX_ACTION_BYTES)
    except NoSuchKey:
        return None
    return RollbackAction.from_json(data, what=key)


def matches(action: RollbackAction, package: ModelPackage | VersionFacts) -> bool:
    """Whether a rollback record is about this package: same version, same rollback, same
    reason. A record left by a publish that failed names a version number that someone
    else (an automatic rollback, a round) may take next; that one is not the operator's."""
    meta = package.metadata if isinstance(package, ModelPackage) else package
    return (
        package.version == action.version
        and meta.rollback_of == action.rollback_of
        and meta.parent_version == action.parent_version
        and meta.rollback_reason == action.package_reason
    )


class VersionFacts(Protocol):
    """What :func:`matches` needs of a version (a package's metadata, a dashboard row)."""

    @property
    def version(self) -> int: ...
    @property
    def rollback_of(self) -> int | None: ...
    @property
    def parent_version(self) -> int | None: ...
    @property
    def rollback_reason(self) -> str | None: ...


def rollback_action(deployment: Deployment, version: VersionFacts) -> RollbackAction | None:
    """Who made a rollback version and from which run (None without a matching record: a
    version made before records existed, or not a rollback)."""
    if version.rollback_of is None:
        return None
    action = _read_action(deployment, state_keys.rollback_action(version.version))
    return action if action is not None and matches(action, version) else None


def pin_of(deployment: Deployment, active: ModelPackage) -> RollbackAction | None:
    """The operator's pin, if it pins ``active`` (the active package is that rollback)."""
    pin = _read_action(deployment, state_keys.ROLLBACK_PIN)
    return pin if pin is not None and matches(pin, active) else None


def active_pin(deployment: Deployment) -> RollbackAction | None:
    """The operator rollback that pins the active version now (None: not pinned)."""
    registry = deployment.registry()
    active = registry.active_version()
    return None if active is None else pin_of(deployment, registry.read_version(active))


def candidate_published(deployment: Deployment, version: int) -> bool:
    """A round published ``version`` after the gate passed it: the operator's pin ends
    (the channel moved on on merit). Returns whether a pin was cleared."""
    pin = _read_action(deployment, state_keys.ROLLBACK_PIN)
    if pin is None or pin.version >= version:
        return False
    deployment.state.delete(state_keys.ROLLBACK_PIN)
    return True


def check_active(
    deployment: Deployment,
    *,
    run_id: str | None = None,
    created_at_ms: int | None = None,
    publish: bool = True,
) -> RollbackDecision:
    """Re-score the active model and recent known-good ones; roll back if it degraded,
    unless an operator's rollback pins the active version. Compared on the holdout's
    calibration part (a decision); a rollback version publishes evaluation-part figures."""
    settings = deployment.settings
    registry = deployment.registry()
    active = registry.active_version()
    if active is None:
        raise RollbackRefused("no model is published")
    recent = registry.versions()[-RECENT_VERSIONS:]
    pkgs = packages(registry, sorted(set(recent) | {active}))
    parts = deployment.holdout_parts()
    holdout: Holdout = parts.calibration  # a decision: calibration rows
    # Only versions that read the active's features: the others (before a template
    # vocabulary change) cannot be scored on today's holdout, nor served in its place.
    good = [
        v
        for v in known_good(pkgs)
        if v != active and same_features(pkgs[v].metadata, pkgs[active].metadata)
    ]
    scores = {
        v: evaluate_onnx(pkgs[v].onnx_bytes, holdout.features, holdout.labels)
        for v in [*good, active]
    }
    best = max(good, key=lambda v: (scores[v].auc, v), default=active)
    active_auc, best_auc = scores[active].auc, scores[best].auc
    due: str | None = None
    if active_auc < settings.auc_floor and best_auc >= settings.auc_floor:
        due = f"active v{active} AUC {active_auc:.4f} fell below the floor {settings.auc_floor}"
    elif best != active and active_auc < best_auc - settings.auc_tolerance:
        due = (
            f"active v{active} AUC {active_auc:.4f} is below known-good v{best} "
            f"{best_auc:.4f} by more than {settings.auc_tolerance}"
        )
    pin = pin_of(deployment, pkgs[active])
    if due is None or pin is not None:
        if pin is not None:
            reason = f"pinned by {pin.describe()}" + (
                f"; automatic rollback held: {due}" if due else ""
            )
        else:
            reason = f"active v{active} AUC {active_auc:.4f} holds"
        return RollbackDecision(
            active_version=active,
            active_auc=active_auc,
            best_version=best,
            best_auc=best_auc,
            rollback=False,
            reason=reason,
            dry_run=not publish,
            pinned=pin,
        )
    published = None
    if publish and best != active:
        published = _publish_rollback(
            deployment,
            pkgs[best],
            active,
            due,
            evaluate_onnx(  # published with the version: evaluation rows
                pkgs[best].onnx_bytes,
                parts.evaluation.features,
                parts.evaluation.labels,
                interval=True,
            ),
            created_at_ms,
            by="automatic",
            source="fl_round",
            run_id=run_id,
            pin=False,
        ).version
    return RollbackDecision(
        active_version=active,
        active_auc=active_auc,
        best_version=best,
        best_auc=best_auc,
        rollback=True,
        reason=due,
        published_version=published,
        dry_run=not publish,
    )


def manual_rollback(
    deployment: Deployment,
    to_version: int,
    reason: str,
    *,
    by: str,
    source: str,
    run_id: str | None = None,
) -> RollbackAction:
    """Operator rollback to a named known-good version: publishes it under a new version
    and pins that version. The one code path of ``fl_rollback`` and ``fl-admin rollback``."""
    reason = (reason or "").strip()
    if not reason:
        raise RollbackRefused("a rollback needs a reason")
    if len(reason) > MAX_REASON_CHARS:
        raise RollbackRefused(f"the reason is longer than {MAX_REASON_CHARS} characters")
    by = (by or "").strip()[:MAX_OPERATOR_CHARS] or "unknown"
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
    if active is not None and not same_features(target.metadata, pkgs[active].metadata):
        raise RollbackRefused(
            f"version {to_version} reads other features than active v{active} (a template "
            "vocabulary change lies between them): the holdout cannot score it and devices "
            "count for the active vocabulary; a rollback stays on this side of the change"
        )
    holdout = deployment.holdout_parts().evaluation  # published with the version
    metrics = evaluate_onnx(target.onnx_bytes, holdout.features, holdout.labels, interval=True)
    if active is None:
        raise RollbackRefused("no model is published")
    return _publish_rollback(
        deployment,
        target,
        active,
        reason,
        metrics,
        None,
        by=by,
        source=source,
        run_id=run_id,
        pin=True,
    )

"""The round, defined once: its steps in order, what each needs, and one :func:`decide`.

The ``fl_round`` DAG makes one task of each step (``process_shard`` mapped over the
plan's shards) and ``fl-admin round`` runs them in this process with :func:`run_round`;
both call the step functions below and nothing else, and a test checks that the DAG's
task order is :data:`STEPS`. A step reads its inputs from the state bucket (by run id)
and returns a small typed record (what the DAG passes on through XCom).

- ``check_active``: automatic rollback check (publishes nothing in a dry run; moves
  nothing while an operator's rollback pins the active version);
- ``refresh_channel``: re-sign the TUF timestamp/snapshot before they expire;
- ``plan``: the batch, in shards of whole devices (or "waiting" below ``min_clients``:
  then the shards hold only junk and replays, judged and cleared all the same);
- ``process_shard`` (mapped): verify, decrypt, validate, exact partial sum, verdicts;
- ``reduce`` -> ``build_candidate`` -> ``evaluate``;
- ``gate``: :func:`decide` on the evaluation: publish or not;
- ``publish``: only when the gate says :attr:`Decision.PUBLISHED` (ends a rollback pin);
- ``record_shard`` (mapped): each shard's ledger verdicts, quarantine and inbox deletes
  (not in a dry run or a replay), so no round-wide step grows with the batch;
- ``finalize``: the round report from one small record per shard, the interval record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedlib.server import round_runner, state_keys
from fedlib.server.deployment import Deployment
from fedlib.server.records import (
    AggregateResult,
    CandidateResult,
    Decision,
    Evaluation,
    RollbackDecision,
    RoundPlan,
    RoundReport,
    ShardRecorded,
    ShardResult,
)
from fedlib.server.rollback import candidate_published
from fedlib.server.rollback import check_active as rollback_check
from fedlib.trust.channel_repository import ChannelRepository


@dataclass(frozen=True)
class RoundRun:
    """One run of the round: its id, the operator's parameters and its fixed time.

    ``interval_key``/``interval_end_ms``: the data interval of a run with a logical date
    (scheduled runs, backfills); None for runs without one, which take all pending.
    ``step_aside``: why this run takes nothing (a scheduled run while a backfill's runs
    are queued or running: they take their intervals first, in order); None: it plans."""

    run_id: str
    min_clients: int | None = None
    max_updates: int | None = None
    dry_run: bool = False
    created_at_ms: int | None = None
    interval_key: str | None = None
    interval_end_ms: int | None = None
    step_aside: str | None = None


# -- the steps --------------------------------------------------------------------------------


def check_active(deployment: Deployment, run: RoundRun) -> RollbackDecision:
    """Automatic rollback before anything else (:mod:`fedlib.server.rollback`); a dry run
    reports a rollback that is due without publishing it."""
    decision = rollback_check(
        deployment, run_id=run.run_id, created_at_ms=run.created_at_ms, publish=not run.dry_run
    )
    round_runner.put_record(deployment, state_keys.RunKeys(run.run_id).rollback, decision)
    return decision


def refresh_channel(deployment: Deployment, run: RoundRun) -> list[str]:
    """Re-sign the channel's timestamp/snapshot before they expire: devices refuse expired
    metadata, so without this a quiet week would look like a freeze attack. Not a
    publication (no version changes), so dry runs refresh too."""
    del run
    return ChannelRepository(deployment.models, deployment.channel_keys()).refresh_timestamp()


def plan(deployment: Deployment, run: RoundRun) -> RoundPlan:
    return round_runner.plan_round(
        deployment,
        run.run_id,
        min_clients=run.min_clients,
        max_updates=run.max_updates,
        created_at_ms=run.created_at_ms,
        interval_key=run.interval_key,
        interval_end_ms=run.interval_end_ms,
        step_aside=run.step_aside,
    )


def process_shard(deployment: Deployment, run: RoundRun, index: int) -> ShardResult:
    return round_runner.process_shard(deployment, run.run_id, index)


def reduce(deployment: Deployment, run: RoundRun) -> AggregateResult:
    return round_runner.reduce_round(deployment, run.run_id)


def build_candidate(deployment: Deployment, run: RoundRun) -> CandidateResult | None:
    return round_runner.build_round_candidate(deployment, run.run_id)


def evaluate(deployment: Deployment, run: RoundRun) -> Evaluation:
    return round_runner.evaluate_round(deployment, run.run_id)


def gate(deployment: Deployment, run: RoundRun) -> Decision:
    """The round's decision as far as it is known before publishing."""
    return decide(
        round_runner.load_plan(deployment, run.run_id),
        round_runner.load_evaluation(deployment, run.run_id),
        dry_run=run.dry_run,
    )


def publish(deployment: Deployment, run: RoundRun) -> int:
    """Publish the candidate the gate passed; that ends an operator's rollback pin."""
    version = round_runner.publish_round(deployment, run.run_id)
    candidate_published(deployment, version)
    return version


def settled(deployment: Deployment, run: RoundRun) -> tuple[RoundPlan, Decision, int | None]:
    """Decide (again: the same inputs give the same answer) and check that a publication
    the gate passed really happened: what must hold before anything is consumed. Returns
    the plan it read, the decision and the published version."""
    round_plan = round_runner.load_plan(deployment, run.run_id)
    decision = decide(
        round_plan, round_runner.load_evaluation(deployment, run.run_id), dry_run=run.dry_run
    )
    published_version = None
    if decision is Decision.PUBLISHED:
        published_version = round_runner.load_candidate(deployment, run.run_id).version
        if published_version not in deployment.registry().versions():
            raise RuntimeError(
                f"run {run.run_id}: the gate passed candidate v{published_version} "
                "but it was not published (did the publish step fail?)"
            )
    return round_plan, decision, published_version


def record_shard(deployment: Deployment, run: RoundRun, index: int) -> ShardRecorded:
    """One shard's verdicts into the ledger and its judged objects out of the inbox, once
    the round is settled; a dry run or a replay only counts."""
    round_plan, _, _ = settled(deployment, run)
    consume = not run.dry_run and round_plan.replay_of is None
    return round_runner.record_shard(deployment, run.run_id, index, consume=consume)


def finalize(deployment: Deployment, run: RoundRun) -> RoundReport:
    """Settle the round again, then write the report (and the interval record)."""
    _, decision, published_version = settled(deployment, run)
    consume = not run.dry_run  # a waiting plan holds only junk and replays: cleared
    return round_runner.finalize_round(
        deployment,
        run.run_id,
        decision=decision,
        published_version=published_version,
        consume=consume,
    )


# -- the one decision ---------------------------------------------------------------------------


def aggregates(deployment: Deployment, run: RoundRun) -> bool:
    """Whether the run's plan has a batch to aggregate (the steps with ``needs_batch``
    run); False for a waiting round."""
    return not round_runner.load_plan(deployment, run.run_id).waiting


def decide(plan: RoundPlan, evaluation: Evaluation | None, *, dry_run: bool) -> Decision:
    """How a round ends, from its plan and evaluation (the gate's inputs): the only
    place that maps them to a :class:`Decision`, for the gate and the report alike."""
    if plan.waiting:
        return Decision.WAITING
    if evaluation is None:
        raise ValueError(f"run {plan.run_id} has a batch but no evaluation yet")
    if plan.replay_of:
        matches = evaluation.replay is not None and evaluation.replay.matches
        return Decision.REPLAY_MATCH if matches else Decision.REPLAY_MISMATCH
    if evaluation.privacy is not None and evaluation.privacy.refused:
        return Decision.PRIVACY_BUDGET
    if evaluation.candidate is None:
        return Decision.NOTHING_ACCEPTED
    if not evaluation.publish:
        return Decision.REJECTED
    if dry_run:
        return Decision.DRY_RUN
    return Decision.PUBLISHED


# -- the definition -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step: its name (the DAG's task id), its function, and when it runs."""

    name: str
    run: Callable[..., Any]
    #: Mapped over the plan's shards (one call per shard index).
    mapped: bool = False
    #: Runs only when the plan has a batch to aggregate (skipped by a waiting round,
    #: whose shards only judge junk and replays).
    needs_batch: bool = False
    #: Runs only when the gate decided :attr:`Decision.PUBLISHED`.
    needs_publish: bool = False


STEPS: tuple[Step, ...] = (
    Step("check_active", check_active),
    Step("refresh_channel", refresh_channel),
    Step("plan", plan),
    Step("process_shard", process_shard, mapped=True),
    Step("reduce", reduce, needs_batch=True),
    Step("build_candidate", build_candidate, needs_batch=True),
    Step("evaluate", evaluate, needs_batch=True),
    Step("gate", gate, needs_batch=True),
    Step("publish", publish, needs_batch=True, needs_publish=True),
    Step("record_shard", record_shard, mapped=True),
    Step("finalize", finalize),
)


def run_round(
    deployment: Deployment,
    run_id: str,
    *,
    min_clients: int | None = None,
    max_updates: int | None = None,
    dry_run: bool = False,
    created_at_ms: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> RoundReport:
    """Every step of :data:`STEPS` in order, in this process (``fl-admin round``);
    ``progress`` gets one line per step (and per shard) for people watching."""
    run = RoundRun(
        run_id=run_id,
        min_clients=min_clients,
        max_updates=max_updates,
        dry_run=dry_run,
        created_at_ms=created_at_ms,
    )
    say = progress or (lambda _line: None)
    round_plan: RoundPlan | None = None
    decision: Decision | None = None
    reason = ""
    report: RoundReport | None = None
    for step in STEPS:
        if step.needs_batch and (round_plan is None or round_plan.waiting):
            continue
        if step.needs_publish and decision is not Decision.PUBLISHED:
            continue
        if step.mapped and round_plan is not None:
            for index in range(round_plan.shard_count):
                shard: ShardResult | ShardRecorded = step.run(deployment, run, index)
                rejected = sum(shard.rejected.values())
                done = " recorded" if isinstance(shard, ShardRecorded) else ""
                say(
                    f"shard {index + 1}/{round_plan.shard_count}{done}: "
                    f"{shard.accepted} accepted, {rejected} rejected"
                )
            continue
        result = step.run(deployment, run)
        if isinstance(result, RoundPlan):
            round_plan = result
        elif isinstance(result, Evaluation):
            reason = result.reason
        elif isinstance(result, Decision):
            decision = result
            result = f"{reason} -> {decision.value}"
        elif isinstance(result, RoundReport):
            report = result
        say(f"{step.name}: {_describe(result)}")
    if report is None:
        raise RuntimeError("the pipeline ended without a report: finalize must be last")
    return report


def _describe(result: Any) -> str:
    if isinstance(result, RollbackDecision):
        return result.reason
    if isinstance(result, RoundPlan):
        return result.message
    if isinstance(result, Evaluation):
        return result.reason
    if isinstance(result, Decision):
        return result.value
    if isinstance(result, RoundReport):
        return f"{result.decision.value}, ledger and report written"
    if isinstance(result, list):
        return f"re-signed {', '.join(result)}" if result else "nothing due"
    if isinstance(result, int):
        return f"version {result}"
    if result is None:
        return "no candidate"
    return str(getattr(result, "digest", result))

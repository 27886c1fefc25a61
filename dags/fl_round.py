"""
### fl_round: one federated round over the S3 inbox

Periodically (default every 15 minutes, `schedule` in `fl-server.toml`) takes the
pending updates from the inbox bucket and:

0. **check_active**: re-scores the active model on the current holdout next to recent
   known-good versions and **rolls back automatically** (a new version carrying the
   best known-good model, `rollback_of` set) when it fell below the floor or behind
   the best by more than the tolerance. After an operator's rollback (`fl_rollback`,
   `fl-admin rollback`) the active version is **pinned**: the check moves nothing and
   says "pinned by operator rollback to vN" until a round publishes a candidate that
   passed the gate. It emits the `fl_model` asset event only when it published.
   **refresh_channel** re-signs the TUF timestamp/snapshot before they expire.
1. **plan**: lists the inbox by device (round-robin, at most `max_objects_per_device`
   objects per device, bounded batch) and splits it into shards of whole devices; with
   fewer than `min_clients` devices pending the run is "waiting": its shards hold only
   junk and replays, which are judged and cleared; nothing is aggregated.
2. **process_shard** (mapped): verifies each envelope's signature, decrypts (only here),
   validates, and writes the shard's exact partial sum and per-update verdicts to the
   state bucket. XCom carries only keys and digests.
3. **reduce** → **build_candidate** → **evaluate** (the exported ONNX graph on the
   labeled holdout, next to the active model) → **gate**.
4. **publish** a signed package (emits the `fl_model` asset event with version and
   metrics), or keep the active model.
5. **record_shard** (mapped): per shard, one write-once ledger verdict per update
   (rejected ones quarantined with their bytes and reason), then its inbox copies
   deleted; **finalize** writes the round report from one small record per shard; the
   task log ends with a readable summary.

**Backfills are safe.** A run with a logical date takes the updates that arrived by its
data interval's end (and that no earlier run took) and records what it produced for
that interval. `airflow backfill create --max-active-runs 1` over a gap takes each
interval's updates in order; a scheduled run that comes due while a backfill's runs are
queued or running steps aside (takes nothing, says why). Running the same interval again
(a backfill with `--reprocess-behavior completed`, or clearing the run) recomputes the
round from its archived inputs, reports whether the candidate's digest matches the
original byte for byte, and publishes nothing. After an outage the first scheduled run
takes every update received meanwhile (one catch-up round).

Manual runs take **Params**: `min_clients` (override for this run), `dry_run`
(evaluate and report, publish and consume nothing), `max_updates`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

from fedlib.integrations.airflow import runtime

SETTINGS = runtime.settings()
MODEL_ASSET = runtime.MODEL_ASSET


@dag(
    dag_id="fl_round",
    schedule=SETTINGS.dag_schedule,
    start_date=runtime.START_DATE,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["federated-learning", "round"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20)},
    params={
        "min_clients": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Minimum clients",
            description="Override min_clients for this run (empty: the configured value).",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Evaluate and report, but publish nothing and consume no update.",
        ),
        "max_updates": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=1_000_000,
            title="Maximum updates",
            description="Cap on updates taken from the inbox.",
        ),
    },
)
def fl_round() -> None:
    """Tasks are the steps of :data:`fedlib.server.pipeline.STEPS`, in that order."""

    @task(outlets=[runtime.MODEL_ASSET_IF_PUBLISHED])
    def check_active() -> dict:
        ctx = get_current_context()
        decision = pipeline().check_active(runtime.deployment(), runtime.round_run(ctx))
        runtime.log.info("active model check: %s", decision.reason)
        if decision.published_version is not None:  # the model asset changes only now
            ctx["outlet_events"][runtime.MODEL_ASSET_IF_PUBLISHED].add(
                MODEL_ASSET,
                extra={
                    "version": decision.published_version,
                    "run_id": ctx["run_id"],
                    "rollback_of": decision.best_version,
                    "auc": decision.best_auc,
                },
            )
        return decision.to_doc()

    @task
    def refresh_channel() -> list[str]:
        ctx = get_current_context()
        renewed = pipeline().refresh_channel(runtime.deployment(), runtime.round_run(ctx))
        runtime.log.info("channel metadata re-signed: %s", renewed or "none due")
        return renewed

    @task
    def plan() -> list[int]:
        ctx = get_current_context()
        result = pipeline().plan(runtime.deployment(), runtime.planning_run(ctx))
        runtime.log.info("plan: %s", result.message)
        return list(range(result.shard_count))  # a waiting round still judges its junk

    @task(max_active_tis_per_dagrun=8)
    def process_shard(index: int) -> dict:
        ctx = get_current_context()
        result = pipeline().process_shard(runtime.deployment(), runtime.round_run(ctx), index)
        runtime.log.info(
            "shard %d: %d accepted, rejected %s", index, result.accepted, result.rejected
        )
        return result.to_doc()

    @task
    def reduce(shards: object) -> dict[str, object]:
        ctx = get_current_context()
        deployment, run = runtime.deployment(), runtime.round_run(ctx)
        if not pipeline().aggregates(deployment, run):
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException("waiting round: nothing to aggregate")
        return pipeline().reduce(deployment, run).to_doc()

    @task
    def build_candidate(aggregate: object) -> dict[str, object] | None:
        ctx = get_current_context()
        candidate = pipeline().build_candidate(runtime.deployment(), runtime.round_run(ctx))
        return None if candidate is None else candidate.to_doc()

    @task
    def evaluate(candidate: object) -> dict[str, object]:
        ctx = get_current_context()
        evaluation = pipeline().evaluate(runtime.deployment(), runtime.round_run(ctx))
        runtime.log.info("evaluation: %s", evaluation.reason)
        return evaluation.to_doc()

    @task.branch
    def gate(evaluation: object) -> list[str]:
        ctx = get_current_context()
        decision = pipeline().gate(runtime.deployment(), runtime.round_run(ctx))
        runtime.log.info("gate: %s", decision.value)
        return ["publish"] if decision.value == "published" else []

    @task(outlets=[MODEL_ASSET])
    def publish() -> int:
        ctx = get_current_context()
        deployment = runtime.deployment()
        version = pipeline().publish(deployment, runtime.round_run(ctx))
        metrics = deployment.registry().read_version(version).metadata.metrics
        ctx["outlet_events"][MODEL_ASSET].extra = {
            "version": version,
            "run_id": ctx["run_id"],
            "auc": metrics.get("auc"),
            "ap": metrics.get("ap"),
        }
        runtime.log.info("published version %d (%s)", version, metrics)
        return version

    @task(trigger_rule=TriggerRule.NONE_FAILED, max_active_tis_per_dagrun=8)
    def record_shard(index: int) -> dict:
        ctx = get_current_context()
        result = pipeline().record_shard(runtime.deployment(), runtime.round_run(ctx), index)
        runtime.log.info(
            "shard %d recorded: %d accepted, rejected %s", index, result.accepted, result.rejected
        )
        return result.to_doc()

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def finalize() -> dict:
        ctx = get_current_context()
        report = pipeline().finalize(runtime.deployment(), runtime.round_run(ctx))
        runtime.log.info("round summary\n%s", report.summary())
        return report.to_doc()

    guard = check_active()
    shards = plan()
    guard >> refresh_channel() >> shards
    results = process_shard.expand(index=shards)
    branch = gate(evaluate(build_candidate(reduce(results))))
    published = publish()
    recorded = record_shard.expand(index=shards)
    done = finalize()
    branch >> published >> recorded >> done
    shards >> done


def pipeline():
    """The round's steps (:mod:`fedlib.server.pipeline`); imported inside tasks to keep
    DAG parsing fast."""
    from fedlib.server import pipeline as module

    return module


fl_round()

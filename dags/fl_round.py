"""
### fl_round: one federated round over the S3 inbox

Periodically (default every 15 minutes, `schedule` in `fl-server.toml`) takes the
pending updates from the inbox bucket and:

0. **check_active**: re-scores the active model on the current holdout next to recent
   known-good versions and **rolls back automatically** (a new version carrying the
   best known-good model, `rollback_of` set) when it fell below the floor or behind
   the best by more than the tolerance.
   **refresh_channel** re-signs the TUF timestamp/snapshot before they expire.
1. **plan**: lists the inbox (bounded batch, inbox order) and splits it into shards;
   with fewer than `min_clients` devices pending the run ends early ("waiting").
2. **process_shard** (mapped): verifies each envelope's signature, decrypts (only here),
   validates, and writes the shard's exact partial sum and per-update verdicts to the
   state bucket. XCom carries only keys and digests.
3. **reduce** → **build_candidate** → **evaluate** (the exported ONNX graph on the
   labeled holdout, next to the active model) → **gate**.
4. **publish** a signed package (emits the `fl_model` asset event with version and
   metrics), or keep the active model.
5. **finalize**: one write-once ledger verdict per update, rejected ones quarantined
   with their bytes and reason, inbox copies deleted, round report written; the task
   log ends with a readable summary.

**Backfills are safe.** A run with a logical date takes the updates that arrived by its
data interval's end and records what it produced for that interval. Running the same
interval again (a backfill with `--reprocess-behavior completed`, or clearing the run)
recomputes the round from its archived inputs, reports whether the candidate's digest
matches the original byte for byte, and publishes nothing. Intervals missed while the
scheduler was down are processed in order by a backfill with `--max-active-runs 1`.

Manual runs take **Params**: `min_clients` (override for this run), `dry_run`
(evaluate and report, publish and consume nothing), `max_updates`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, Param, TriggerRule, dag, get_current_context, task

from fedlib.integrations.airflow import runtime

SETTINGS = runtime.settings()
# One logical asset per deployment ("the published model"), whatever the bucket is called.
MODEL_ASSET = Asset(name="fl_model", uri="dadm-fl://model/active")


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
    @task(outlets=[MODEL_ASSET])
    def check_active() -> dict:
        """Automatic rollback: re-score the active model on the current holdout first."""
        ctx = get_current_context()
        decision = runtime.round_runner().check_active_model(
            runtime.deployment(), ctx["run_id"], created_at_ms=runtime.run_timestamp_ms(ctx)
        )
        runtime.log.info("active model check: %s", decision["reason"])
        if decision.get("published_version"):
            ctx["outlet_events"][MODEL_ASSET].extra = {
                "version": decision["published_version"],
                "run_id": ctx["run_id"],
                "rollback_of": decision["best_version"],
                "auc": decision["best_auc"],
            }
        return decision

    @task
    def refresh_channel() -> list[str]:
        """Re-sign the channel's timestamp/snapshot before they expire (devices refuse
        expired metadata: without this, a quiet week would look like a freeze attack)."""
        from fedlib.trust.channel_repository import ChannelRepository

        deployment = runtime.deployment()
        renewed = ChannelRepository(
            deployment.models, deployment.channel_keys()
        ).refresh_timestamp()
        runtime.log.info("channel metadata re-signed: %s", renewed or "none due")
        return renewed

    @task
    def plan() -> list[int]:
        ctx = get_current_context()
        params = ctx["params"]
        interval_key, interval_end_ms = runtime.run_interval(ctx)
        result = runtime.round_runner().plan_round(
            runtime.deployment(),
            ctx["run_id"],
            min_clients=params.get("min_clients"),
            max_updates=params.get("max_updates"),
            created_at_ms=runtime.run_timestamp_ms(ctx),
            interval_key=interval_key,
            interval_end_ms=interval_end_ms,
        )
        runtime.log.info("plan: %s", result.message)
        return list(range(result.shard_count))

    @task(max_active_tis_per_dagrun=8)
    def process_shard(index: int) -> dict:
        result = runtime.round_runner().process_shard(
            runtime.deployment(), get_current_context()["run_id"], index
        )
        runtime.log.info(
            "shard %d: %d accepted, rejected %s", index, result.accepted, result.rejected
        )
        return {"index": index, "digest": result.partial_digest, "accepted": result.accepted}

    @task
    def reduce(shards: list[dict]) -> dict:
        return runtime.round_runner().reduce_round(
            runtime.deployment(), get_current_context()["run_id"]
        )

    @task
    def build_candidate(aggregate: dict) -> dict | None:
        return runtime.round_runner().build_round_candidate(
            runtime.deployment(), get_current_context()["run_id"]
        )

    @task
    def evaluate(candidate: dict | None) -> dict:
        return runtime.round_runner().evaluate_round(
            runtime.deployment(), get_current_context()["run_id"]
        )

    @task.branch
    def gate(evaluation: dict) -> str:
        dry_run = get_current_context()["params"].get("dry_run")
        runtime.log.info("gate: %s", evaluation.get("reason"))
        return "publish" if evaluation.get("publish") and not dry_run else "finalize"

    @task(outlets=[MODEL_ASSET])
    def publish() -> int:
        ctx = get_current_context()
        deployment = runtime.deployment()
        version = runtime.round_runner().publish_round(deployment, ctx["run_id"])
        metrics = deployment.registry().read_version(version).metadata.metrics
        ctx["outlet_events"][MODEL_ASSET].extra = {
            "version": version,
            "run_id": ctx["run_id"],
            "auc": metrics.get("auc"),
            "ap": metrics.get("ap"),
        }
        runtime.log.info("published version %d (%s)", version, metrics)
        return version

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def finalize(published: int | None = None) -> dict:
        ctx = get_current_context()
        deployment = runtime.deployment()
        run_id = ctx["run_id"]
        plan_doc = runtime.round_runner().load_plan(deployment, run_id)
        dry_run = bool(ctx["params"].get("dry_run"))
        if plan_doc.waiting:
            decision = "waiting"
        elif published:
            decision = "published"
        else:
            evaluation = ctx["ti"].xcom_pull(task_ids="evaluate") or {}
            if evaluation.get("candidate") is None:
                decision = "nothing_accepted"
            elif not evaluation.get("publish"):
                decision = "rejected"
            else:
                decision = "dry_run" if dry_run else "not_published"
        report = runtime.round_runner().finalize_round(
            deployment,
            run_id,
            decision=decision,
            published_version=published,
            dry_run=dry_run or plan_doc.waiting,
        )
        runtime.log.info("round summary\n%s", report.summary())
        return report.as_dict()

    guard = check_active()
    shards = plan()
    guard >> refresh_channel() >> shards
    results = process_shard.expand(index=shards)
    evaluation = evaluate(build_candidate(reduce(results)))
    branch = gate(evaluation)
    published = publish()
    branch >> published
    done = finalize(published)
    branch >> done
    shards >> done


fl_round()

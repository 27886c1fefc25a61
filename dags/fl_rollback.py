"""
### fl_rollback: roll the model channel back to a known-good version, by hand

Publishes a **new** version (versions only go up, devices never accept an older one)
that carries the model of `to_version`, with `rollback_of` and your `reason` recorded
in its signed metadata. Devices pick it up on their next cycle.

Refused, with the reason in the UI and the task log: a version that does not exist, the
version that is already active, and a version the channel was already rolled back away
from (not known-good). `fl_round` also rolls back automatically when the active model
degrades on the holdout; this DAG is the operator's override, and it stands: the version
it publishes is **pinned** (automatic rollback leaves it alone) until a round publishes
a candidate that passed the gate, or you roll back again. `fl-admin rollback
--to-version N --reason TEXT` does the same from a shell (same code).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

from fedlib.integrations.airflow import runtime

MODEL_ASSET = runtime.MODEL_ASSET


@dag(
    dag_id="fl_rollback",
    schedule=None,
    start_date=runtime.START_DATE,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["federated-learning", "rollback"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=20)},
    params={
        "to_version": Param(
            type="integer",
            minimum=1,
            title="Roll back to version",
            description="A published, known-good version (see the rounds page or fl-admin status).",
        ),
        "reason": Param(
            type="string",
            minLength=3,
            maxLength=500,
            title="Reason",
            description="Why; recorded in the new version's signed metadata.",
        ),
    },
)
def fl_rollback() -> None:
    @task(outlets=[MODEL_ASSET])
    def rollback() -> int:
        from airflow.sdk.exceptions import AirflowFailException

        from fedlib.server.rollback import RollbackRefused, manual_rollback

        ctx = get_current_context()
        params = ctx["params"]
        try:
            action = manual_rollback(
                runtime.deployment(),
                int(params["to_version"]),
                str(params["reason"]),
                by=getattr(ctx["dag_run"], "triggering_user_name", None) or "airflow",
                source="fl_rollback",
                run_id=ctx["run_id"],
            )
        except RollbackRefused as exc:  # nonsense is refused at once, without retries
            raise AirflowFailException(f"rollback refused: {exc}") from None
        ctx["outlet_events"][MODEL_ASSET].extra = {
            "version": action.version,
            "rollback_of": action.rollback_of,
            "run_id": ctx["run_id"],
        }
        runtime.log.info("published version %d: %s", action.version, action.describe())
        return action.version

    rollback()


fl_rollback()

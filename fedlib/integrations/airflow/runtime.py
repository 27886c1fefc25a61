"""How Airflow tasks (and the dashboard app) build the deployment, defined once.

Settings come from fedlib's ``fl-server.toml`` (and ``FL_*`` variables), overridden at
task run time by the Airflow Variable ``fl_settings``. The S3 endpoint and credentials
come from the Airflow connection ``fl_s3`` (``AIRFLOW_CONN_FL_S3``: conn_type ``aws``,
login/password, ``extra.endpoint_url``, ``extra.region_name``), read through the amazon
provider's :class:`AwsBaseHook`, so Airflow masks the secret in task logs. A missing or
unusable connection is an error that names it, never a silent switch to other
credentials. DAG files import this module at parse time: it imports nothing heavy.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias

from fedlib.server.settings import ServerSettings

if TYPE_CHECKING:
    from fedlib.server.deployment import Deployment
    from fedlib.server.pipeline import RoundRun
    from fedlib.storage.store import S3Config

S3_CONN_ID = "fl_s3"
SETTINGS_VARIABLE = "fl_settings"
START_DATE = datetime(2026, 1, 1, tzinfo=UTC)
#: One logical asset per deployment ("the published model"), whatever the bucket is
#: called; ``fl_round`` and ``fl_rollback`` emit its events when they publish, and only
#: then (a DAG scheduled on it runs once per new version).
MODEL_ASSET = Asset(name="fl_model", uri="dadm-fl://model/active")
#: The outlet of a task that publishes only sometimes (``fl_round.check_active``): a task
#: with ``MODEL_ASSET`` itself as outlet emits an event on every success, whereas through
#: this alias an event exists only when the task adds one (when it published).
MODEL_ASSET_IF_PUBLISHED = AssetAlias(name="fl_model_if_published")
log = logging.getLogger("dadm_fl")


class S3ConnectionError(RuntimeError):
    """The ``fl_s3`` connection is missing or lacks what the deployment needs."""


def settings() -> ServerSettings:
    """File + environment settings: what DAG parsing may read (no metadata-DB access)."""
    return ServerSettings.load()


def task_settings() -> ServerSettings:
    """At task run time the Airflow Variable ``fl_settings`` (JSON) overrides the file."""
    from airflow.sdk import Variable

    overrides = Variable.get(SETTINGS_VARIABLE, default=None, deserialize_json=True)
    return ServerSettings.load(overrides=overrides or None)


def s3_config() -> S3Config:
    """S3 endpoint and credentials from the ``fl_s3`` connection (amazon provider hook)."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    from fedlib.storage.store import S3Config

    hook = AwsBaseHook(aws_conn_id=S3_CONN_ID, client_type="s3")
    try:
        hook.get_connection(S3_CONN_ID)
    except AirflowNotFoundException:
        raise S3ConnectionError(
            f"no Airflow connection {S3_CONN_ID!r}: set AIRFLOW_CONN_FL_S3 (conn_type aws, "
            "login, password, extra.endpoint_url) or create it in the UI"
        ) from None
    wrapper = hook.conn_config
    if not wrapper.aws_access_key_id or not wrapper.aws_secret_access_key:
        raise S3ConnectionError(f"connection {S3_CONN_ID!r} has no login/password (S3 keys)")
    return S3Config(
        endpoint_url=wrapper.endpoint_url,
        region=wrapper.region_name or "us-east-1",
        access_key=wrapper.aws_access_key_id,
        secret_key=wrapper.aws_secret_access_key,
    )


def deployment() -> Deployment:
    from fedlib.server.deployment import Deployment

    return Deployment(task_settings(), s3_config())


def round_run(context: Any) -> RoundRun:
    """The pipeline's view of a DAG run: its id, Params and data interval."""
    from fedlib.server.pipeline import RoundRun

    params = context["params"]
    interval_key, interval_end_ms = run_interval(context)
    return RoundRun(
        run_id=context["run_id"],
        min_clients=params.get("min_clients"),
        max_updates=params.get("max_updates"),
        dry_run=bool(params.get("dry_run")),
        created_at_ms=run_timestamp_ms(context),
        interval_key=interval_key,
        interval_end_ms=interval_end_ms,
    )


def planning_run(context: Any) -> RoundRun:
    """:func:`round_run` for the plan step, which alone decides whether the run steps aside
    (:func:`backfill_ahead`); the other steps read that decision from the plan."""
    from dataclasses import replace

    return replace(round_run(context), step_aside=backfill_ahead(context))


def backfill_ahead(context: Any) -> str | None:
    """Why a scheduled run takes nothing, or None. A scheduled run is created at the tick
    and outranks backfill runs (Airflow starts them first and counts them apart), so
    after a gap it would take every update a backfill's earlier intervals are about to
    take, one at a time and in order. It steps aside while any other run of the DAG is
    queued or running (``max_active_runs=1``: that is a backfill's, or a manual run that
    takes everything anyway); the first scheduled run after the backfill takes what
    arrived since. Manual and backfill runs never step aside."""
    dag_run = context["dag_run"]
    if dag_run.run_type != "scheduled":
        return None
    active = context["ti"].get_dr_count(dag_id=dag_run.dag_id, states=["queued", "running"])
    if active <= 1:  # this run alone
        return None
    return f"{active - 1} other run(s) of {dag_run.dag_id} queued or running (a backfill's first)"


def run_interval(context: Any) -> tuple[str | None, int | None]:
    """(interval key, end in ms) for runs with a logical date (scheduled, backfill, manual
    with a date); (None, None) for runs without one, which take everything pending."""
    if context.get("logical_date") is None:
        return None, None
    end = context.get("data_interval_end") or context["logical_date"]
    return end.isoformat(), int(end.timestamp() * 1000)


def run_timestamp_ms(context: Any) -> int:
    """A round's fixed time: its logical date, or when it was due (manual/asset runs)."""
    dag_run = context["dag_run"]
    moment = context.get("logical_date") or getattr(dag_run, "run_after", None)
    return int(moment.timestamp() * 1000) if moment else 0

"""Glue between Airflow and fedlib shared by the DAG files: settings and the S3 connection.

Imported by the DAG files and the dashboard app. The S3 endpoint and credentials come from the
Airflow connection ``fl_s3`` (``AIRFLOW_CONN_FL_S3``: conn_type aws, login/password,
``extra.endpoint_url``, ``extra.region_name``); everything else from fedlib's settings
(``fl-server.toml``), overridden at task run time by the Airflow Variable ``fl_settings``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fedlib.server.settings import ServerSettings

if TYPE_CHECKING:
    from fedlib.server.deployment import Deployment
    from fedlib.storage.store import S3Config

S3_CONN_ID = "fl_s3"
START_DATE = datetime(2026, 1, 1, tzinfo=UTC)
log = logging.getLogger("dadm_fl")


SETTINGS_VARIABLE = "fl_settings"


def settings() -> ServerSettings:
    """File + environment settings: what DAG parsing may read (no metadata-DB access)."""
    return ServerSettings.load()


def task_settings() -> ServerSettings:
    """At task run time the Airflow Variable ``fl_settings`` (JSON) overrides the file."""
    from airflow.sdk import Variable

    overrides = Variable.get(SETTINGS_VARIABLE, default=None, deserialize_json=True)
    return ServerSettings.load(overrides=overrides or None)


def s3_config() -> S3Config:
    """S3 settings from the ``fl_s3`` connection, falling back to fedlib's environment."""
    from airflow.sdk import Connection

    from fedlib.storage.store import S3Config

    try:
        conn = Connection.get(S3_CONN_ID)
    except Exception:  # no such connection: FL_S3_* / AWS_* variables
        return task_settings().s3()
    extra: dict[str, Any] = conn.extra_dejson or {}
    return S3Config(
        endpoint_url=extra.get("endpoint_url") or extra.get("host"),
        region=extra.get("region_name", "us-east-1"),
        access_key=conn.login or None,
        secret_key=conn.password or None,
    )


def deployment() -> Deployment:
    from fedlib.server.deployment import Deployment

    return Deployment(task_settings(), s3_config())


def round_runner():
    """fedlib's round steps; imported inside tasks to keep DAG parsing fast."""
    from fedlib.server import round_runner as module

    return module


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

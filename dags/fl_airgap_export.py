"""
### fl_airgap_export: a signed bundle for a site with no network

Writes one bundle file into the air-gap bucket (`bundles/`), with a small JSON record
next to it: the model package of `version` (default: the active one), the TUF channel
metadata a disconnected device needs (every root version it may have to walk, and a
timestamp re-signed to stay valid for `expires_in_days`), a manifest of SHA-256
digests and a README. The export verifies its own output as a device would.

Fetch it with `fl-admin bundles list` and `fl-admin bundles get KEY --out FILE` (the task
log names it as `s3://BUCKET/KEY`), carry the file across, then on the far side, with no
network at all:

    fl-client verify-bundle BUNDLE --config client.json
    fl-client install-bundle BUNDLE --config client.json

A tampered, truncated, expired or older bundle is refused with the reason.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

from fedlib.integrations.airflow import runtime


@dag(
    dag_id="fl_airgap_export",
    schedule=None,
    start_date=runtime.START_DATE,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["federated-learning", "air-gap"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=20)},
    params={
        "version": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Model version",
            description="The version to export (empty: the active one).",
        ),
        "expires_in_days": Param(
            30,
            type="integer",
            minimum=1,
            maximum=365,
            title="Valid for (days)",
            description="How long the far side may take to install it.",
        ),
    },
)
def fl_airgap_export() -> None:
    @task
    def export() -> dict:
        from fedlib.server.airgap import export_to_airgap_bucket

        params = get_current_context()["params"]
        record = export_to_airgap_bucket(
            runtime.deployment(),
            version=params.get("version"),
            expires_in_days=int(params["expires_in_days"]),
        )
        runtime.log.info(
            "bundle for version %s: %s (%d bytes, sha256 %s, expires %s)",
            record["version"],
            record["url"],
            record["size"],
            record["sha256"],
            record["expires"],
        )
        return record

    export()


fl_airgap_export()

"""The fl_round DAG run for real (dag.test) against the real S3 server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from client.agent import run_cycle
from fedlib.ledger import Ledger
from fedlib.round_runner import REPORTS_PREFIX, safe_run_id
from tests.test_client import make_client

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def run_dag(dagbag, when: datetime, **conf):
    dag = dagbag.dags["fl_round"]
    dag_run = dag.test(logical_date=when, run_conf=conf or None)
    return dag_run


def report_of(deployment, dag_run) -> dict:
    import json

    return json.loads(deployment.state.get(f"{REPORTS_PREFIX}{safe_run_id(dag_run.run_id)}.json"))


def test_five_devices_then_a_round_publishes_a_better_model(airflow_deployment, dagbag, tmp_path):
    dep = airflow_deployment
    data = dep.dataset
    configs = [make_client(dep, tmp_path, cid, data.clients[cid]) for cid in data.client_ids[:5]]
    for config in configs:
        assert run_cycle(config).uploaded
    dag_run = run_dag(dagbag, T0)
    assert dag_run.state == "success"
    report = report_of(dep, dag_run)
    assert report["decision"] == "published", report
    assert report["accepted"] == 5 and report["published_version"] == 2
    registry = dep.registry()
    assert registry.active_version() == 2
    v1, v2 = registry.read_version(1), registry.read_version(2)
    assert v2.metadata.metrics["auc"] > v1.metadata.metrics["auc"]
    assert list(dep.inbox.list("updates/")) == []
    assert len(list(Ledger(dep.state).verdicts())) == 5

    again = run_dag(dagbag, T0 + timedelta(minutes=15))
    assert again.state == "success"
    assert report_of(dep, again)["decision"] == "waiting"
    assert registry.active_version() == 2

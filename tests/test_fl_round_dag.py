"""The fl_round DAG run for real (dag.test) against the real S3 server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from client.agent import run_cycle
from fedlib.crypto import sealing
from fedlib.server.ledger import Ledger
from fedlib.server.state_keys import RunKeys
from fedlib.wire import protocol
from tests.test_client import make_client
from tests.test_round_runner import enroll, forged_payload_update, upload_updates

T0 = datetime(2027, 3, 1, tzinfo=UTC)  # after every upload: runs take what arrived by then


def run_dag(dagbag, when: datetime, **conf):
    dag = dagbag.dags["fl_round"]
    # every Param explicitly: dag.test() keeps a previous run's conf on the shared DAG object
    full = {"min_clients": None, "dry_run": False, "max_updates": None, **conf}
    return dag.test(logical_date=when, run_conf=full)


def report_of(deployment, dag_run) -> dict:
    import json

    return json.loads(deployment.state.get(RunKeys(dag_run.run_id).report))


def model_asset_events(run_id: str) -> list[dict]:
    """The extras of the fl_model asset events a run emitted (from Airflow's own DB)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == "fl_model")
        ).all()
        return [dict(e.extra) for e in rows if e.extra.get("run_id") == run_id]


def activate_assets() -> None:
    """What the scheduler does for every asset a DAG references (dag.test does not)."""
    from airflow.models.asset import AssetActive, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        active = set(session.execute(select(AssetActive.name, AssetActive.uri)).all())
        for asset in session.scalars(select(AssetModel)):
            if (asset.name, asset.uri) not in active:
                session.add(AssetActive.for_asset(asset))


def test_five_devices_then_a_round_publishes_a_better_model(airflow_deployment, dagbag, tmp_path):
    dep = airflow_deployment
    data = dep.dataset
    idle = run_dag(dagbag, T0 - timedelta(minutes=15))  # nothing uploaded yet
    assert idle.state == "success" and report_of(dep, idle)["decision"] == "waiting"
    activate_assets()
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

    (event,) = model_asset_events(dag_run.run_id)
    assert event["version"] == 2 and event["auc"] == v2.metadata.metrics["auc"]

    again = run_dag(dagbag, T0 + timedelta(minutes=15))
    assert again.state == "success"
    assert report_of(dep, again)["decision"] == "waiting"
    assert registry.active_version() == 2


def upload_after_plan(upload):
    """An Airflow listener that uploads one more update right after ``plan`` succeeds.

    (Airflow is imported here, not at module level: AIRFLOW_HOME is set by a fixture.)
    """
    from airflow.listeners import hookimpl

    class UploadAfterPlan:
        key: str | None = None

        @hookimpl
        def on_task_instance_success(self, previous_state, task_instance):
            if task_instance.task_id == "plan" and self.key is None:
                self.key = upload()

    return UploadAfterPlan()


def test_bad_updates_quarantined_and_late_upload_goes_to_next_round(
    airflow_deployment, dagbag, tmp_path
):
    dep = airflow_deployment
    good = upload_updates(dep, 3)
    package = dep.registry().read_active()
    dim = package.metadata.num_params
    mallory = enroll(dep, "mallory")
    stranger = sealing.generate_signing_key()
    expected = {}
    k0, env0 = next(iter(good.items()))
    forged = protocol.inbox_key("mallory", protocol.new_update_id())
    dep.inbox.put(forged, env0[:-1] + bytes([env0[-1] ^ 1]))
    expected[forged] = "bad_signature"
    expected[forged_payload_update(dep, "mallory", stranger, np.zeros(dim))] = "unknown_client"
    expected[forged_payload_update(dep, "mallory", mallory, np.zeros(dim), nan=True)] = "non_finite"
    expected[forged_payload_update(dep, "mallory", mallory, np.zeros(dim), base_version=9)] = (
        "unknown_base_version"
    )
    junk = protocol.inbox_key("mallory", protocol.new_update_id())
    dep.inbox.put(junk, b"\x00" * 100)
    expected[junk] = "malformed"

    late_client = dep.dataset.client_ids[5]
    from airflow.sdk.listener import get_listener_manager

    listener = upload_after_plan(lambda: next(iter(upload_updates(dep, 1, start=5))))
    manager = get_listener_manager()
    manager.add_listener(listener)
    try:
        first = run_dag(dagbag, T0)
    finally:
        manager.clear()
    assert first.state == "success"
    report = report_of(dep, first)
    assert report["decision"] == "published" and report["accepted"] == 3, report
    ledger = Ledger(dep.state)
    for key, reason in expected.items():
        verdict = ledger.read(key)
        assert verdict and verdict.reason == reason, (key, verdict)
        assert any(i.key.endswith(".bin") for i in dep.state.list("quarantine/" + key[8:]))
    assert listener.key and listener.key.split("/")[1] == late_client
    assert ledger.read(listener.key) is None  # not in the first round...
    assert [i.key for i in dep.inbox.list("updates/")] == [listener.key]

    dep.inbox.put(k0, env0)  # ...and a replay of an update the first round aggregated
    k1, env1 = list(good.items())[1]
    dep.inbox.put(k1, env1 + b"!")  # other bytes under an id that was already processed
    upload_updates(dep, 1, start=4)
    second = run_dag(dagbag, T0 + timedelta(minutes=15), min_clients=1)
    assert second.state == "success"
    report2 = report_of(dep, second)
    assert report2["accepted"] == 2, report2
    assert report2["rejected"] == {"duplicate_update_id": 1, "replay": 1}, report2
    assert ledger.read(listener.key).run_id == second.run_id  # ...but in the next one
    assert ledger.read(k0).run_id == first.run_id  # the first verdict stands
    assert list(dep.inbox.list("updates/")) == []


def test_dry_run_consumes_and_publishes_nothing(airflow_deployment, dagbag):
    dep = airflow_deployment
    upload_updates(dep, 2)
    dag_run = run_dag(dagbag, T0, dry_run=True)
    assert dag_run.state == "success"
    report = report_of(dep, dag_run)
    assert report["decision"] == "dry_run" and report["candidate_metrics"]
    assert dep.registry().active_version() == 1
    assert len(list(dep.inbox.list("updates/"))) == 2
    assert list(Ledger(dep.state).verdicts()) == []


def test_params_are_validated(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dagbag.dags["fl_round"].test(logical_date=T0, run_conf={"max_updates": 0})


def test_airflow_variable_overrides_settings(airflow_deployment, dagbag, monkeypatch):
    """``fl_settings`` (an Airflow Variable, JSON) changes min_clients for the tasks."""
    import json

    dep = airflow_deployment
    upload_updates(dep, 2)
    monkeypatch.setenv("AIRFLOW_VAR_FL_SETTINGS", json.dumps({"min_clients": 3}))
    dag_run = run_dag(dagbag, T0)
    assert report_of(dep, dag_run)["message"] == "waiting: 2 of 3 clients"
    monkeypatch.setenv("AIRFLOW_VAR_FL_SETTINGS", json.dumps({"min_clients": 2}))
    assert report_of(dep, run_dag(dagbag, T0 + timedelta(minutes=15)))["decision"] == "published"


def test_stale_update_is_quarantined_as_too_stale(airflow_deployment, dagbag, monkeypatch):
    import json

    from tests.test_registry import bump

    dep = airflow_deployment
    registry = dep.registry(signing=True)
    v1 = registry.read_active()
    stale_key = upload_updates(dep, 1, start=5)  # trained against version 1
    registry.publish(bump(v1, 2))
    registry.publish(bump(v1, 3))
    upload_updates(dep, 2)  # trained against version 3
    monkeypatch.setenv("AIRFLOW_VAR_FL_SETTINGS", json.dumps({"max_staleness": 1}))
    dag_run = run_dag(dagbag, T0)
    report = report_of(dep, dag_run)
    assert report["accepted"] == 2 and report["rejected"] == {"too_stale": 1}, report
    (key,) = stale_key
    assert Ledger(dep.state).read(key).reason == "too_stale"

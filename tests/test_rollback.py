"""Rollback, automatic (in fl_round) and manual (fl_rollback), through real Airflow runs."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from client.agent import InstalledModels, run_cycle
from fedlib.models.package import ModelPackage
from fedlib.server.rollback import (
    RollbackRefused,
    check_active,
    known_good,
    manual_rollback,
    packages,
)
from fedlib.server.rounds import model_from_package, package_model
from tests.test_client import make_client
from tests.test_fl_round_dag import report_of, run_dag

T0 = datetime(2027, 4, 1, tzinfo=UTC)


def publish_degraded(deployment) -> ModelPackage:
    """What a publish with the gate disabled could ship: a model that flags the wrong rows."""
    registry = deployment.registry(signing=True)
    v1 = registry.read_active()
    model = model_from_package(v1)
    rng = np.random.default_rng(0)
    model.set_params(rng.normal(scale=3.0, size=model.num_params))
    model.calibrate_threshold(deployment.load_holdout().benign())
    bad = package_model(
        model,
        version=max(registry.versions()) + 1,
        training=v1.metadata.training,
        parent_version=v1.version,
    )
    registry.publish(bad)
    return bad


def test_manual_rollback_refuses_nonsense_and_publishes_a_new_version(deployment):
    v1 = deployment.registry().read_active()
    bad = publish_degraded(deployment)
    with pytest.raises(RollbackRefused, match="does not exist"):
        manual_rollback(deployment, 9, "typo")
    with pytest.raises(RollbackRefused, match="already active"):
        manual_rollback(deployment, bad.version, "no-op")
    with pytest.raises(RollbackRefused, match="reason"):
        manual_rollback(deployment, 1, "  ")
    version = manual_rollback(deployment, 1, "v2 flags the wrong hosts")
    registry = deployment.registry()
    assert version == 3 and registry.active_version() == 3
    v3 = registry.read_version(3)
    assert v3.metadata.rollback_of == 1 and v3.metadata.parent_version == bad.version
    assert "wrong hosts" in v3.metadata.rollback_reason
    assert v3.onnx_bytes == v1.onnx_bytes and np.array_equal(v3.weights, v1.weights)
    assert known_good(packages(registry, registry.versions())) == [1, 3]
    with pytest.raises(RollbackRefused, match="not known-good"):
        manual_rollback(deployment, bad.version, "back to the bad one")


def test_check_active_keeps_a_healthy_model(deployment):
    decision = check_active(deployment)
    assert not decision.rollback and decision.published_version is None
    assert deployment.registry().active_version() == 1


def test_fl_round_rolls_back_automatically_and_devices_install_it(
    airflow_deployment, dagbag, tmp_path
):
    dep = airflow_deployment
    data = dep.dataset
    config = make_client(dep, tmp_path, "dev-r", data.clients[data.client_ids[0]])
    bad = publish_degraded(dep)
    assert run_cycle(config).pulled_version == bad.version  # devices got the bad model

    dag_run = run_dag(dagbag, T0)
    assert dag_run.state == "success"
    report = report_of(dep, dag_run)
    rollback = report["rollback"]
    assert rollback["rollback"] and rollback["best_version"] == 1, rollback
    assert rollback["active_auc"] < rollback["best_auc"]
    new = rollback["published_version"]
    assert new == bad.version + 1
    meta = dep.registry().read_version(new).metadata
    assert meta.rollback_of == 1 and meta.rollback_reason.startswith("automatic")

    cycle = run_cycle(config)
    assert cycle.pulled_version == new
    assert InstalledModels(config.state_dir / "models").current_version() == new

    calm = run_dag(dagbag, T0.replace(hour=1))  # the rolled-back model holds: no new version
    assert not report_of(dep, calm)["rollback"]["rollback"]
    assert dep.registry().active_version() == new


def test_fl_rollback_dag(airflow_deployment, dagbag):
    dep = airflow_deployment
    publish_degraded(dep)
    dag = dagbag.dags["fl_rollback"]
    refused = dag.test(run_conf={"to_version": 2, "reason": "already active"})
    assert refused.state == "failed"
    assert dep.registry().active_version() == 2
    done = dag.test(run_conf={"to_version": 1, "reason": "operator says so"})
    assert done.state == "success"
    assert dep.registry().active_version() == 3
    assert dep.registry().read_version(3).metadata.rollback_of == 1


def test_a_dry_run_publishes_nothing_not_even_a_due_rollback(airflow_deployment, dagbag):
    """The DAG's dry run and ``fl-admin round --dry-run`` report the rollback that is due
    and publish nothing (the drift this test pins: the DAG used to publish it)."""
    from fedlib.server.pipeline import run_round

    dep = airflow_deployment
    bad = publish_degraded(dep)
    versions = dep.registry().versions()

    dag_run = run_dag(dagbag, T0.replace(hour=3), dry_run=True)
    assert dag_run.state == "success"
    rollback = report_of(dep, dag_run)["rollback"]
    assert rollback["rollback"] and rollback["dry_run"] is True, rollback
    assert rollback["published_version"] is None
    assert dep.registry().versions() == versions
    assert dep.registry().active_version() == bad.version

    report = run_round(dep, "dry-cli", dry_run=True)
    assert report.rollback is not None and report.rollback.rollback
    assert report.rollback.published_version is None
    assert "not published: dry run" in report.summary()
    assert dep.registry().versions() == versions

    report = run_round(dep, "real-cli")  # without dry run, the same check rolls back
    assert report.rollback is not None and report.rollback.published_version == bad.version + 1

"""Rollback, automatic (in fl_round) and manual (fl_rollback), through real Airflow runs."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from client.agent import InstalledModels, run_cycle
from fedlib.models.package import ModelPackage
from fedlib.server import state_keys
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
    who = {"by": "ops", "source": "fl-admin"}
    with pytest.raises(RollbackRefused, match="does not exist"):
        manual_rollback(deployment, 9, "typo", **who)
    with pytest.raises(RollbackRefused, match="already active"):
        manual_rollback(deployment, bad.version, "no-op", **who)
    with pytest.raises(RollbackRefused, match="reason"):
        manual_rollback(deployment, 1, "  ", **who)
    action = manual_rollback(deployment, 1, "v2 flags the wrong hosts", **who)
    registry = deployment.registry()
    assert action.version == 3 and registry.active_version() == 3
    assert (action.rollback_of, action.parent_version, action.by) == (1, bad.version, "ops")
    v3 = registry.read_version(3)
    assert v3.metadata.rollback_of == 1 and v3.metadata.parent_version == bad.version
    assert "wrong hosts" in v3.metadata.rollback_reason
    assert v3.onnx_bytes == v1.onnx_bytes and np.array_equal(v3.weights, v1.weights)
    assert known_good(packages(registry, registry.versions())) == [1, 3]
    with pytest.raises(RollbackRefused, match="not known-good"):
        manual_rollback(deployment, bad.version, "back to the bad one", **who)


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


# -- an operator's decision stands (issue 16, item 8) ----------------------------------------


def publish_better(deployment, run_id: str) -> int:
    """A real round (the pipeline ``fl-admin round`` runs) over five devices' updates:
    a version that scores above v1 on the holdout."""
    from fedlib.server.pipeline import run_round
    from tests.test_round_runner import upload_updates

    upload_updates(deployment, 5, seed=len(deployment.registry().versions()))
    report = run_round(deployment, run_id)
    assert report.decision.value == "published", report.summary()
    return report.published_version


def pinned_deployment(dep, dagbag) -> tuple[int, int, int]:
    """v1; v2 (a round's, better than v1 by more than the tolerance); v3 (degraded); then
    the operator rolls back to v1 with ``fl_rollback`` -> v4. Without the pin, the next
    automatic check would roll forward to v2, the best known-good version."""
    better = publish_better(dep, "better")
    scores = {v: dep.registry().read_version(v).metadata.metrics["auc"] for v in (1, better)}
    assert scores[better] > scores[1] + dep.settings.auc_tolerance, scores
    publish_degraded(dep)
    done = dagbag.dags["fl_rollback"].test(
        run_conf={"to_version": 1, "reason": "v2 misses a new attack; back to v1"}
    )
    assert done.state == "success"
    pinned = dep.registry().active_version()
    assert dep.registry().read_version(pinned).metadata.rollback_of == 1
    return better, pinned, done.run_id


def test_an_operator_rollback_stands_until_a_candidate_passes_the_gate(airflow_deployment, dagbag):
    from fedlib.server.pipeline import run_round
    from tests.test_fl_round_dag import activate_assets

    dep = airflow_deployment
    better, pinned, rollback_run = pinned_deployment(dep, dagbag)
    activate_assets()
    # what the check would do without the pin: roll forward to v2 (dry run: publish nothing)
    assert check_active(dep, publish=False).pinned is not None

    dag_run = run_dag(dagbag, T0)
    assert dag_run.state == "success"
    assert dep.registry().active_version() == pinned  # not rolled forward to v2
    report = report_of(dep, dag_run)
    check = report["rollback"]
    assert not check["rollback"] and check["published_version"] is None, check
    assert check["reason"].startswith("pinned by operator rollback to v1"), check
    assert f"is below known-good v{better}" in check["reason"]  # what was held, said
    assert check["pinned"]["run_id"] == rollback_run and check["pinned"]["source"] == "fl_rollback"
    assert asset_events_of(dag_run) == []  # nothing published, no asset event

    from fedlib.server.records import RoundReport

    summary = RoundReport.from_doc(report).summary()
    assert "PINNED: pinned by operator rollback to v1" in summary, summary

    cli = run_round(dep, "cli-pinned")  # fl-admin round: the same steps, the same answer
    assert cli.rollback is not None and cli.rollback.pinned is not None
    assert "pinned by operator rollback to v1" in cli.summary()
    assert dep.registry().active_version() == pinned

    from fedlib.ops import dashboard

    (row,) = [r for r in dashboard.rounds(dep).items if r.run_id == dag_run.run_id]
    assert row.rollback is not None and row.rollback.pinned
    assert row.rollback.reason.startswith("pinned by operator rollback to v1")
    from urllib.parse import quote

    from starlette.requests import Request

    from fedlib.integrations.airflow import dashboard_app as app

    links = app.Links(Request({"type": "http", "root_path": "", "headers": []}))
    page = app.rounds_table(links, [row])  # the rounds page says it
    assert 'class="badge rollback">pinned<' in page and "pinned by operator rollback to v1" in page
    versions = {v.version: v for v in dashboard.versions(dep).items}
    assert versions[pinned].rollback_run_id == rollback_run
    assert versions[pinned].rollback_source == "fl_rollback"
    page = app.versions_table(list(versions.values()), links)  # linked to its run, with why
    assert f'href="/dags/fl_rollback/runs/{quote(rollback_run, safe="")}"' in page
    assert "manual: v2 misses a new attack; back to v1" in page

    # a round whose candidate passes the gate publishes and ends the pin
    from tests.test_round_runner import upload_updates

    upload_updates(dep, 5, seed=100)
    moved = run_dag(dagbag, T0.replace(hour=1))
    assert moved.state == "success"
    report = report_of(dep, moved)
    assert report["decision"] == "published", report
    assert report["rollback"]["pinned"] is not None  # its check still saw the pin...
    new = report["published_version"]
    assert dep.registry().active_version() == new == pinned + 1
    assert [(t, e["version"]) for t, e in asset_events_of(moved)] == [("publish", new)]
    assert dep.state.exists(state_keys.ROLLBACK_PIN) is False  # ...and its publish ended it
    after = run_dag(dagbag, T0.replace(hour=2))  # unpinned: the automatic check is back
    check = report_of(dep, after)["rollback"]
    assert check["pinned"] is None and not check["reason"].startswith("pinned"), check


def asset_events_of(dag_run) -> list[tuple[str, dict]]:
    """Every fl_model asset event a DAG run emitted, as (task id, extra), from Airflow's
    own DB by the event's source run (extras or not: a bare event triggers consumers too)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == "fl_model")
            .where(AssetEvent.source_dag_id == dag_run.dag_id)
            .where(AssetEvent.source_run_id == dag_run.run_id)
        ).all()
        return [(e.source_task_id, dict(e.extra or {})) for e in rows]


def test_asset_events_only_when_a_version_is_published(airflow_deployment, dagbag):
    """The fl_model asset event means "a new version": check_active emits one only when
    it published a rollback, so quiet rounds emit none (before: one per round)."""
    from tests.test_fl_round_dag import activate_assets

    dep = airflow_deployment
    first = run_dag(dagbag, T0.replace(hour=5))
    activate_assets()
    quiet = [run_dag(dagbag, T0.replace(hour=5, minute=10 * i)) for i in range(1, 5)]
    assert all(r.state == "success" for r in [first, *quiet])
    assert [e for r in [first, *quiet] for e in asset_events_of(r)] == []
    bad = publish_degraded(dep)
    rolled = run_dag(dagbag, T0.replace(hour=6))
    new = report_of(dep, rolled)["rollback"]["published_version"]
    assert new == bad.version + 1
    ((task, event),) = asset_events_of(rolled)
    assert task == "check_active" and event["version"] == new and event["rollback_of"] == 1
    done = dagbag.dags["fl_rollback"].test(run_conf={"to_version": 1, "reason": "re-pin v1"})
    assert done.state == "success"
    assert [e["version"] for _, e in asset_events_of(done)] == [new + 1]


def admin_sees(deployment, tmp_path, monkeypatch) -> None:
    """Point ``fl-admin`` at the test deployment (settings file, S3 keys in the env)."""
    settings = deployment.settings
    names = ("inbox_bucket", "models_bucket", "state_bucket", "airgap_bucket", "keys_dir")
    toml = tmp_path / "fl-admin.toml"
    toml.write_text(
        "\n".join(f'{n} = "{getattr(settings, n)}"' for n in names)
        + f'\ns3_endpoint_url = "{deployment.s3.endpoint_url}"\n'
    )
    monkeypatch.setenv("FL_SERVER_CONFIG", str(toml))
    monkeypatch.setenv("FL_S3_ACCESS_KEY", deployment.s3.access_key)
    monkeypatch.setenv("FL_S3_SECRET_KEY", deployment.s3.secret_key)


def test_fl_admin_rollback_pins_like_the_dag_and_status_shows_it(
    deployment, tmp_path, monkeypatch, capsys
):
    """``fl-admin rollback`` is ``fl_rollback`` without the UI: the same function, the same
    refusals (exit 1, reason on stderr), the same pin that ``fl-admin round`` honours."""
    import json

    from fedlib.ops.admin import main as admin_main

    dep = deployment
    better = publish_better(dep, "better")
    bad = publish_degraded(dep)
    admin_sees(dep, tmp_path, monkeypatch)
    capsys.readouterr()

    assert admin_main(["rollback", "--to-version", str(bad.version), "--reason", "x"]) == 1
    assert "already active" in capsys.readouterr().err
    assert admin_main(["rollback", "--to-version", "1", "--reason", "r" * 501]) == 1
    assert "longer than 500" in capsys.readouterr().err
    assert dep.registry().versions() == [1, better, bad.version]

    assert (
        admin_main(
            ["rollback", "--to-version", "1", "--reason", "v2 misses an attack", "--by", "alice"]
        )
        == 0
    )
    out = capsys.readouterr().out
    pinned = bad.version + 1
    assert f"published version {pinned}: operator rollback to v1" in out, out
    assert "by alice via fl-admin: v2 misses an attack" in out
    meta = dep.registry().read_version(pinned).metadata
    assert meta.rollback_of == 1 and meta.rollback_reason == "manual: v2 misses an attack"

    assert admin_main(["round", "--run-id", "after-pin"]) == 0
    out = capsys.readouterr().out
    assert "check_active: pinned by operator rollback to v1" in out, out
    assert f"is below known-good v{better}" in out  # held, and said so
    assert dep.registry().active_version() == pinned

    assert admin_main(["status"]) == 0
    out = capsys.readouterr().out
    assert "pinned:          by operator rollback to v1" in out, out
    assert "by alice via fl-admin: manual: v2 misses an attack)" in out
    assert admin_main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pinned"]["version"] == pinned and doc["pinned"]["by"] == "alice"
    (row,) = [v for v in doc["versions"] if v["version"] == pinned]
    assert row["rollback_by"] == "alice" and row["rollback_source"] == "fl-admin"

    # the operator acts again: another rollback re-pins (to the version the check wanted)
    assert admin_main(["rollback", "--to-version", str(better), "--reason", "fixed"]) == 0
    capsys.readouterr()
    decision = check_active(dep)
    assert decision.pinned is not None and decision.pinned.rollback_of == better
    assert dep.registry().active_version() == pinned + 1


def test_fl_admin_rollback_killed_between_its_pin_and_its_publish(
    deployment, tmp_path, monkeypatch
):
    """A real ``fl-admin rollback`` killed with SIGKILL (failpoint) after it wrote its
    record and the operator's pin for v3 (= v1, from the degraded v2), before publishing
    v3. That pin names a version that never became active, so it pins nothing: the next
    ``fl-admin round`` (a new process) rolls back from the degraded v2 by itself, and its
    rollback, which takes the same number with the same target and parent, is not taken
    for the operator's (the signed reason differs). The operator's re-run then pins."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from fedlib import failpoints
    from fedlib.ops import dashboard
    from fedlib.server.records import RollbackAction

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DADM_FAILPOINTS")}
    env["PYTHONPATH"] = str(root)

    def fl_admin(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "fl-admin"), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )

    bad = publish_degraded(deployment)
    admin_sees(deployment, tmp_path, monkeypatch)
    env.update({k: v for k, v in os.environ.items() if k.startswith("FL_")})
    rollback = ("rollback", "--to-version", "1", "--reason", "back to v1", "--by", "ops")

    killed = fl_admin(*rollback, DADM_FAILPOINTS=failpoints.ROLLBACK_AFTER_PIN)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    pin = RollbackAction.from_json(deployment.state.get(state_keys.ROLLBACK_PIN))
    assert (pin.version, pin.rollback_of, pin.parent_version) == (bad.version + 1, 1, bad.version)
    assert deployment.registry().versions() == [1, bad.version]  # never published
    assert deployment.registry().active_version() == bad.version

    after = fl_admin("round", "--run-id", "after-the-kill")
    assert after.returncode == 0, (after.stdout, after.stderr)
    registry = deployment.registry()
    assert registry.active_version() == pin.version  # the check rolled back by itself
    meta = registry.read_version(pin.version).metadata
    assert (meta.rollback_of, meta.parent_version) == (1, bad.version)
    assert check_active(deployment).pinned is None  # the leftover pin pins nothing
    (row,) = [v for v in dashboard.versions(deployment).items if v.version == pin.version]
    assert (row.rollback_by, row.rollback_source) == ("automatic", "fl_round")
    assert row.rollback_run_id == "after-the-kill"

    # the operator sees the kill and runs the command again: now it publishes and pins
    again = fl_admin(*rollback)
    assert again.returncode == 0, (again.stdout, again.stderr)
    status = json.loads(fl_admin("status", "--json").stdout)
    assert status["pinned"]["version"] == pin.version + 1 and status["pinned"]["by"] == "ops"
    assert registry.active_version() == pin.version + 1
    assert check_active(deployment).pinned is not None

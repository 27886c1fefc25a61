"""DAG files: they import cleanly and follow the project's conventions."""

from __future__ import annotations


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"fl_round", "fl_rollback", "fl_airgap_export"} <= set(dagbag.dags)


def test_every_dag_sets_retries_tags_and_docs(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no doc_md"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_fl_round_shape(dagbag):
    dag = dagbag.dags["fl_round"]
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert set(dag.params) == {"min_clients", "dry_run", "max_updates"}
    assert {t.task_id for t in dag.tasks} == {
        "check_active",
        "refresh_channel",
        "plan",
        "process_shard",
        "reduce",
        "build_candidate",
        "evaluate",
        "gate",
        "publish",
        "record_shard",
        "finalize",
    }


def test_fl_round_tasks_are_the_pipeline_steps_in_order(dagbag):
    """One definition of the round: the DAG's tasks, in dependency order, are
    ``fedlib.server.pipeline.STEPS`` (what ``fl-admin round`` runs), and each task's code
    calls the step of its name."""
    import inspect

    from fedlib.server.pipeline import STEPS

    dag = dagbag.dags["fl_round"]
    order = [task.task_id for task in dag.topological_sort()]
    assert order == [step.name for step in STEPS]
    for task in dag.tasks:
        source = inspect.getsource(task.python_callable)
        assert f"pipeline().{task.task_id}(" in source, task.task_id

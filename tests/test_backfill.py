"""Backfills: a processed interval is recomputed and compared, never republished;
intervals are processed in order, by when the store received each update. Real Airflow
runs for given logical dates."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from client.update import make_update
from fedlib.server.ledger import Ledger
from fedlib.server.round_runner import load_plan, plan_keys
from fedlib.wire import protocol
from tests.test_fl_round_dag import report_of, run_dag
from tests.test_round_runner import enroll


def upload_at(deployment, client_index: int, created: datetime) -> str:
    """An update a device created at ``created`` (its UUIDv7 says so) and uploads now."""
    data = deployment.dataset
    cid = data.client_ids[client_index]
    key = enroll(deployment, cid)
    update = make_update(
        deployment.registry().read_active(),
        data.clients[cid],
        client_id=cid,
        client_key=key,
        server_public_key=deployment.current_server_public_key(),
        residual=None,
        seed=client_index,
        created_at_ms=int(created.timestamp() * 1000),
    )
    object_key = protocol.inbox_key(cid, update.update_id)
    deployment.inbox.put(object_key, update.envelope, if_absent=True)
    return object_key


def test_intervals_in_order_by_receipt_time_then_a_replay_publishes_nothing(
    airflow_deployment, dagbag
):
    """Interval membership is when the store received an update. A run for an interval
    that ended before the uploads takes none of them, even the one whose UUIDv7 claims
    that interval; the next intervals take them in order; re-running one is a replay."""
    dep = airflow_deployment
    slot = timedelta(minutes=15)
    # The first uploads and the back-dated one must be received in one slot: not across
    # a boundary the store's clock may pass while they are sent (a loaded machine).
    to_boundary = slot - (datetime.now(UTC) - datetime.fromtimestamp(0, UTC)) % slot
    if to_boundary < timedelta(seconds=60):
        time.sleep(to_boundary.total_seconds() + 1)
    now = datetime.now(UTC)
    first = [upload_at(dep, i, now) for i in (0, 1)]
    received = max(i.last_modified_ms for i in dep.inbox.list("updates/"))
    epoch = datetime.fromtimestamp(0, UTC)
    l1 = epoch + (datetime.fromtimestamp(received / 1000, UTC) - epoch) // slot * slot + slot
    l0, l2 = l1 - 2 * slot, l1 + slot  # l0's interval ended before anything was received
    back_dated = upload_at(dep, 4, l0 - timedelta(minutes=5))  # claims l0's interval
    first.append(back_dated)

    run0 = run_dag(dagbag, l0, min_clients=1)
    r0 = report_of(dep, run0)
    assert r0["decision"] == "waiting" and r0["deferred"] == {"after_interval": 3}, r0
    assert list(plan_keys(dep, load_plan(dep, run0.run_id))) == []
    ledger = Ledger(dep.state)
    assert ledger.read(back_dated) is None

    run1 = run_dag(dagbag, l1)
    second = [upload_at(dep, i, now) for i in (2, 3)]  # received after run1 planned
    run2 = run_dag(dagbag, l2)
    assert sorted(plan_keys(dep, load_plan(dep, run1.run_id))) == sorted(first)
    assert sorted(plan_keys(dep, load_plan(dep, run2.run_id))) == sorted(second)
    r1, r2 = report_of(dep, run1), report_of(dep, run2)
    assert (r1["decision"], r1["published_version"]) == ("published", 2), r1
    assert (r2["decision"], r2["published_version"]) == ("published", 3), r2
    assert r2["base_version"] == 2
    assert {ledger.read(k).run_id for k in first} == {run1.run_id}
    assert {ledger.read(k).run_id for k in second} == {run2.run_id}

    # a backfill over an interval already processed: recomputed, compared, not republished
    again = run_dag(dagbag, l1)
    report = report_of(dep, again)
    assert report["decision"] == "replay_match", report
    assert report["replay"]["of"] == run1.run_id
    assert report["replay"]["candidate_digest"] == r1["candidate_digest"]
    assert report["published_version"] is None
    assert dep.registry().versions() == [1, 2, 3] and dep.registry().active_version() == 3
    assert {ledger.read(k).run_id for k in first} == {run1.run_id}  # counted once


def test_a_run_that_steps_aside_takes_nothing_and_the_next_run_takes_it_all(deployment):
    """A scheduled run during a backfill plans nothing (not even junk): the backfill's
    runs take their intervals first; a later run takes what is still pending."""
    from fedlib.server.round_runner import plan_round

    now = datetime.now(UTC)
    keys = [upload_at(deployment, i, now) for i in (0, 1)]
    deployment.inbox.put("updates/junk-object", b"not an envelope")
    reason = "1 other run(s) of fl_round queued or running (a backfill's first)"
    aside = plan_round(deployment, "scheduled-aside", step_aside=reason)
    assert (aside.updates, aside.shard_count, aside.waiting) == (0, 0, True), aside
    assert aside.message == f"waiting: {reason}"
    assert list(plan_keys(deployment, aside)) == []
    later = plan_round(deployment, "scheduled-after")
    assert sorted(plan_keys(deployment, later)) == sorted([*keys, "updates/junk-object"])
    assert not later.waiting

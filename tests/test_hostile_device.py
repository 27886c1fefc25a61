"""A hostile device cannot stall or steer a round (issue 16): fair planning, one vote per
device, server-side time and per-device replay detection. Real SeaweedFS, real crypto,
real Airflow (dag.test) and the real ``fl-admin`` entry point."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np

from fedlib.server import round_runner as rr
from fedlib.server import state_keys
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import run_round
from fedlib.wire import protocol
from tests.test_fl_round_dag import T0, report_of, run_dag
from tests.test_round_runner import enroll, put_dense_update, upload_updates

#: The flood: more one-byte objects than a round's batch, under a prefix that sorts first.
N_JUNK = 2000
MAX_BATCH = 200
FLOOD = "updates/--flood/"  # "-" sorts before every client id's first character


def flood(deployment, count: int = N_JUNK) -> list[str]:
    keys = [f"{FLOOD}{i:05d}" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: deployment.inbox.put(k, b"\x00"), keys))
    return keys


def sealed(deployment, client_id, key, *, scale=0.0, update_id=None, created_at_ms=None):
    """A valid update of ``client_id`` (a small constant delta), put in the inbox."""
    dim = deployment.registry().read_active().metadata.num_params
    return put_dense_update(
        deployment,
        client_id,
        key,
        np.full(dim, scale),
        update_id=update_id,
        created_at_ms=created_at_ms,
    )


def pending(deployment, prefix="updates/") -> list[str]:
    return [i.key for i in deployment.inbox.list(prefix)]


def fl_admin(deployment, tmp_path, monkeypatch, *args: str) -> int:
    """``fl-admin`` (its real entry point) on this deployment's buckets."""
    from fedlib.ops.admin import main

    settings = deployment.settings
    names = ("inbox_bucket", "models_bucket", "state_bucket", "airgap_bucket", "keys_dir")
    toml = tmp_path / "fl-admin.toml"
    toml.write_text(
        "\n".join(f'{n} = "{getattr(settings, n)}"' for n in names)
        + f'\ns3_endpoint_url = "{deployment.s3.endpoint_url}"'
        + f"\nmin_clients = {settings.min_clients}\nmax_batch = {settings.max_batch}\n"
    )
    monkeypatch.setenv("FL_SERVER_CONFIG", str(toml))
    monkeypatch.setenv("FL_S3_ACCESS_KEY", deployment.s3.access_key)
    monkeypatch.setenv("FL_S3_SECRET_KEY", deployment.s3.secret_key)
    return main(list(args))


def test_a_junk_flood_neither_stalls_the_round_nor_survives_waiting_rounds(
    s3_config, tmp_path, small_dataset, monkeypatch, capsys
):
    """2,000 one-byte objects under a prefix that sorts first, a batch of 200: the round
    still aggregates both honest devices (the plan used to take the first 200 keys, all
    junk, and wait for ever); the junk group gets what the devices leave of the batch,
    and waiting rounds keep clearing it, a batch at a time."""
    import json

    from tests.helpers import build_deployment

    dep = build_deployment(s3_config, tmp_path / "keys", small_dataset, max_batch=MAX_BATCH)
    junk = flood(dep)
    honest = upload_updates(dep, 2)

    assert fl_admin(dep, tmp_path, monkeypatch, "round", "--run-id", "flood-1", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    judged_first = MAX_BATCH - 2
    assert report["accepted"] == 2 and report["rejected"] == {"malformed_name": judged_first}
    assert report["decision"] in {"published", "rejected"}
    ledger = Ledger(dep.state)
    for key in honest:
        assert ledger.read(key).accepted
    assert len(pending(dep, FLOOD)) == N_JUNK - judged_first
    plan = rr.load_plan(dep, "flood-1")
    assert plan.capped_groups == 1 and plan.client_count == 2

    # nobody honest pending: the round waits, and still judges and clears junk
    assert fl_admin(dep, tmp_path, monkeypatch, "round", "--run-id", "flood-2", "--json") == 0
    waiting = json.loads(capsys.readouterr().out)
    assert waiting["decision"] == "waiting" and waiting["rejected"] == {"malformed_name": MAX_BATCH}
    assert waiting["message"].startswith(f"waiting: 0 of 2 clients; judging {MAX_BATCH}")
    assert len(pending(dep, FLOOD)) == N_JUNK - judged_first - MAX_BATCH
    judged = [k for k in junk if k not in set(pending(dep, FLOOD))]
    for key in judged:  # each one ledgered and its byte kept: nothing lost
        verdict = ledger.read(key)
        assert verdict is not None and verdict.reason == "malformed_name"
        assert dep.state.get(state_keys.quarantine_bytes(key, verdict.sha256)) == b"\x00"


def test_a_waiting_round_keeps_well_formed_updates_for_the_next_round(deployment):
    """Below ``min_clients`` the plan judges only junk: the one honest update stays, is
    not ledgered, and is aggregated once a second device shows up."""
    flood(deployment, 40)
    (key,) = upload_updates(deployment, 1)
    report = run_round(deployment, "w-1", max_updates=30)
    assert report.decision == "waiting" and report.rejected == {"malformed_name": 29}
    assert report.deferred == {"max_batch": 1, "waiting": 1}, report.deferred  # of those listed
    assert Ledger(deployment.state).read(key) is None
    assert key in pending(deployment)
    upload_updates(deployment, 1, start=1)
    after = run_round(deployment, "w-2")
    assert after.accepted == 2 and after.rejected == {"malformed_name": 11}, after.summary()
    assert pending(deployment) == []


def test_a_device_over_the_cap_keeps_the_rest_for_later_rounds(deployment):
    """20 valid updates of one device, a cap of 16: 16 are judged this round (one vote,
    15 superseded), 4 stay in the inbox for the next round, which gives it one vote more."""
    key = enroll(deployment, "mallory")
    for i in range(20):
        sealed(deployment, "mallory", key, scale=1e-3 * (i + 1))
    upload_updates(deployment, 1)
    first = run_round(deployment, "cap-1")
    assert first.accepted == 2 and first.rejected == {"superseded": 15}, first.summary()
    assert rr.load_plan(deployment, "cap-1").capped_groups == 1
    assert first.capped_devices == ["mallory"], first.summary()
    assert "over the per-device cap (the rest waits): mallory" in first.summary()
    assert len(pending(deployment, "updates/mallory/")) == 4
    second = run_round(deployment, "cap-2", min_clients=1)
    assert second.accepted == 1 and second.rejected == {"superseded": 3}, second.summary()
    assert second.capped_devices is None
    assert pending(deployment) == []


def test_a_junk_flood_does_not_stall_the_dag(airflow_deployment, dagbag):
    """The same attack through a real ``fl_round`` run (batch capped by ``max_updates``)."""
    dep = airflow_deployment
    flood(dep)
    honest = upload_updates(dep, 2)
    dag_run = run_dag(dagbag, T0, max_updates=MAX_BATCH)
    assert dag_run.state == "success"
    report = report_of(dep, dag_run)
    judged_first = MAX_BATCH - 2
    assert report["accepted"] == 2 and report["rejected"] == {"malformed_name": judged_first}
    assert all(Ledger(dep.state).read(k).accepted for k in honest)

    waiting = run_dag(dagbag, T0 + timedelta(minutes=15), max_updates=MAX_BATCH)
    assert waiting.state == "success"
    report = report_of(dep, waiting)
    assert report["decision"] == "waiting", report
    assert report["rejected"] == {"malformed_name": MAX_BATCH}, report
    assert len(pending(dep, FLOOD)) == N_JUNK - judged_first - MAX_BATCH


def test_forty_valid_updates_from_one_device_get_one_vote(s3_config, tmp_path, small_dataset):
    """40 valid updates of one device in one round: one accepted (the newest received),
    39 ``superseded`` naming it, every one ledgered with its bytes kept."""
    from tests.helpers import build_deployment

    dep = build_deployment(s3_config, tmp_path / "keys", small_dataset, max_objects_per_device=64)
    key = enroll(dep, "mallory")
    sent = dict(sealed(dep, "mallory", key, scale=1e-3 * (i + 1)) for i in range(40))
    (other,) = upload_updates(dep, 1)
    listed = [i for i in dep.inbox.list("updates/mallory/")]
    newest = max(listed, key=lambda i: (i.last_modified_ms, i.key)).key

    report = run_round(dep, "vote-1")
    assert report.accepted == 2 and report.rejected == {"superseded": 39}, report.summary()
    ledger = Ledger(dep.state)
    assert ledger.read(newest).accepted
    for object_key, envelope in sent.items():
        if object_key == newest:
            continue
        verdict = ledger.read(object_key)
        assert verdict.reason == "superseded" and newest in verdict.detail
        kept = state_keys.quarantine_bytes(object_key, hashlib.sha256(envelope).hexdigest())
        assert dep.state.get(kept) == envelope
    assert pending(dep) == []
    accepted = [v.key for v in rr.load_verdicts(dep, "vote-1") if v.accepted]
    assert sorted(accepted) == sorted([newest, other])


def test_the_update_received_last_is_kept_whatever_its_id(deployment):
    """Which vote counts is decided by the server's receipt time, not by the id a device
    chose: the update received last is kept even when its id sorts first."""
    from fedlib.server.rounds import aggregate_objects

    key = enroll(deployment, "mallory")
    early = sealed(deployment, "mallory", key, created_at_ms=2_000_000_000_000)
    late = sealed(deployment, "mallory", key, created_at_ms=1_000_000_000_000)
    assert late[0] < early[0]  # the later upload claims the earlier time
    base = deployment.registry().read_active()
    inputs = rr.round_inputs(deployment, base)
    received = {early[0]: 1_000, late[0]: 2_000}
    _, verdicts = aggregate_objects([late, early], inputs, received_ms=received)
    by_key = {v.key: v for v in verdicts}
    assert by_key[late[0]].accepted
    assert by_key[early[0]].reason == "superseded" and late[0] in by_key[early[0]].detail
    # the same stream, the other receipt order: the other update is the vote
    _, verdicts = aggregate_objects([late, early], inputs, received_ms={early[0]: 3_000})
    assert [v.key for v in verdicts if v.accepted] == [early[0]]


def test_the_same_update_id_from_two_devices_is_two_updates(deployment):
    """Replay detection is per device: a second device reusing an update id (a copy,
    or an attacker pre-empting it) does not turn the honest update into a replay."""
    uid = protocol.new_update_id()
    first = sealed(deployment, "alice", enroll(deployment, "alice"), update_id=uid)
    second = sealed(deployment, "bob", enroll(deployment, "bob"), update_id=uid)
    report = run_round(deployment, "same-id")
    assert report.accepted == 2 and not report.rejected, report.summary()
    ledger = Ledger(deployment.state)
    assert ledger.read(first[0]).accepted and ledger.read(second[0]).accepted


def test_a_back_dated_update_id_does_not_join_a_past_interval(deployment):
    """Interval membership is the store's receipt time: an update whose UUIDv7 claims
    1970 (or an hour ago) is not taken by the run of an interval that ended before it
    was received; it waits for the next interval."""
    now_ms = int(time.time() * 1000)
    key = enroll(deployment, "mallory")
    dated_1970, _ = sealed(deployment, "mallory", key, created_at_ms=1_000)
    hour_ago, _ = sealed(deployment, "mallory", key, created_at_ms=now_ms - 3_600_000)
    honest = upload_updates(deployment, 2)
    past_end = now_ms - 60_000  # an interval that ended a minute before the uploads
    plan = rr.plan_round(
        deployment, "past", interval_key="past", interval_end_ms=past_end, min_clients=1
    )
    assert list(rr.plan_keys(deployment, plan)) == [] and plan.waiting
    assert plan.deferred == {"after_interval": 4}

    current = rr.plan_round(
        deployment, "now", interval_key="now", interval_end_ms=now_ms + 3_600_000
    )
    taken = set(rr.plan_keys(deployment, current))
    assert {dated_1970, hour_ago, *honest} == taken


def test_list_level_finds_devices_without_walking_their_keys(deployment, tmp_path):
    """The plan's device discovery: one level under ``updates/`` (the "directories" and
    the objects directly there), the same on SeaweedFS and on a local directory."""
    from fedlib.storage.store import LocalStore

    keys = ["updates/a/1", "updates/a/2", "updates/b/x/y", "updates/loose", "updates/c-d/1"]
    local = LocalStore(tmp_path / "inbox")
    for store in (deployment.inbox, local):
        for key in keys:
            store.put(key, b"1")
        level = store.list_level("updates/")
        assert level.prefixes == ["updates/a/", "updates/b/", "updates/c-d/"], store
        assert [o.key for o in level.objects] == ["updates/loose"], store
        assert level.objects[0].size == 1 and level.objects[0].last_modified_ms > 0
        assert store.list_level("updates/b/").prefixes == ["updates/b/x/"]
        assert store.list_level("nothing/").prefixes == []


def test_a_device_s_objects_are_never_split_across_shards(deployment):
    """Why the quarantine quota is exact within a round: whole devices per shard, even
    when a device has more objects than a shard's size."""
    keys = {}
    for name in ("dev-a", "dev-b", "dev-c"):
        key = enroll(deployment, name)
        keys[name] = {sealed(deployment, name, key, scale=1e-3 * i)[0] for i in range(5)}
    plan = rr.plan_round(deployment, "whole-devices", shard_size=4)
    shards = [set(rr.load_shard(deployment, plan, i).keys) for i in range(plan.shard_count)]
    assert plan.shard_count == 3 and sum(map(len, shards)) == 15
    for device_keys in keys.values():
        assert sum(bool(device_keys & shard) for shard in shards) == 1


def test_chunked_listings_plan_like_a_listing_per_device(deployment, monkeypatch):
    """The plan reads devices from flat listings of chunks of the inbox, side by side;
    however the chunks are cut (1, 2 or 3 devices each) and wherever a chunk's listing is
    cut short (1, 4, 7 keys: the devices it did not cover are then listed one by one),
    the groups are the same as with a listing per device, in the store's listing order,
    including devices over the cap (a listing leaves one by skipping past it, but not
    ``dev-a``, a stem) and ids that sort apart in the two listing orders (``dev-a``,
    ``dev-a-b``, ``dev-a.c``)."""
    sizes = {"dev-a": 20, "dev-a-b": 1, "dev-a.c": 2, "dev-b": 1, "dev-c": 40, "dev-d": 2}
    for client, n in sizes.items():
        for _ in range(n):
            deployment.inbox.put(protocol.inbox_key(client, protocol.new_update_id()), b"x")
    deployment.inbox.put("updates/stray", b"x")
    deployment.inbox.put("updates/Not A Client/x", b"x")  # a segment that is no client id
    deployment.inbox.put("updates/dev-b/deeper/x", b"x")  # under a device, not a name

    def groups() -> list[tuple[str | None, list[str], bool]]:
        return [
            (g.client_id, [e[0].key for e in g.entries], g.capped)
            for g in rr.inbox_groups(deployment, 16)
        ]

    whole = groups()
    assert {c: len(keys) for c, keys, _ in whole} == {
        None: 2,
        "dev-a": 16,
        "dev-a-b": 1,
        "dev-a.c": 2,
        "dev-b": 2,
        "dev-c": 16,
        "dev-d": 2,
    }
    one_by_one = {
        c: [i.key for i in deployment.inbox.list(f"updates/{c}/", limit=16)] for c in sizes
    }
    assert {c: keys for c, keys, _ in whole if c} == one_by_one
    capped = {c for c, _, cap in whole if cap}
    assert capped == {"dev-a", "dev-c"}
    store_order = list(
        dict.fromkeys(
            i.key.split("/")[1] for i in deployment.inbox.list("updates/") if i.key.count("/") == 2
        )
    )
    assert [c for c, _, _ in whole if c] == [c for c in store_order if c in sizes]
    for chunk in (1, 2, 3):
        monkeypatch.setattr(rr, "LISTING_CHUNK", chunk)
        assert groups() == whole, chunk
        for limit in (1, 4, 7):
            monkeypatch.setattr(rr, "CHUNK_KEY_LIMIT", limit)
            assert groups() == whole, (chunk, limit)
        monkeypatch.undo()


def test_listing_chunks_are_cut_where_both_listing_orders_agree():
    """A cut never separates an id from its stem (``a`` and ``a-b``: byte order puts
    ``a-b/`` first, SeaweedFS's walk ``a/``), and only stems are never skipped past."""
    prefixes = [f"updates/{n}/" for n in ("a", "a-b", "a-b.c", "a0", "b", "c", "c.d", "e")]
    chunks = rr.ListingChunks.of(prefixes)
    assert chunks.stems == {"updates/a/", "updates/a-b/", "updates/c/"}
    for size in (1, 2, 3):
        cut = rr.ListingChunks.of(prefixes, size=size).chunks
        assert sorted(p for chunk in cut for p in chunk) == sorted(prefixes)
        for chunk in cut:
            names = {p[:-1] for p in chunk}
            for name in names:  # a stem's longer names stay with it
                assert all(
                    o[:-1] in names for o in prefixes if o.startswith(name) and o[len(name)] < "/"
                ), (size, cut)
    assert rr.ListingChunks.of(prefixes, size=1).chunks == [
        ["updates/a/", "updates/a-b/", "updates/a-b.c/"],
        ["updates/a0/"],
        ["updates/b/"],
        ["updates/c/", "updates/c.d/"],
        ["updates/e/"],
    ]

"""Hostile inbox names and bounded quarantine, over real SeaweedFS (issue 16, items 1-2).

A device controls the names under its own inbox prefix. Every name outside the grammar
``updates/<client id>/<UUIDv7>`` gets one verdict under a key the server derives (a
digest), is quarantined (bounded) and removed, and the next round runs clean.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from fedlib.errors import RejectedUpdate
from fedlib.server import state_keys
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import run_round
from fedlib.server.records import QuarantineStub, RoundReport
from fedlib.wire import protocol
from tests.test_round_runner import upload_updates

UID = "01a2461b-0195-7fa4-aed4-2796133d49cf"


def hostile_names() -> dict[str, str]:
    """name -> what it is; every one is addressable on S3 (object_store can name it)."""
    return {
        "updates/mallory/" + "x" * 251: "the observed attack: 251 characters",
        "updates/mallory/" + "y" * 255: "255 bytes, the most one SeaweedFS segment holds",
        "updates/mallory/" + "é" * 120: "unicode, 240 bytes",
        "updates/mallory/" + UID.upper(): "a UUIDv7 in uppercase (not canonical)",
        "updates/mallory/" + UID.replace("-", ""): "a UUIDv7 without dashes",
        f"updates/mallory/{UID}/extra": "an extra segment",
        "updates/mallory/0190a0a0-0000-4000-8000-000000000000": "a UUIDv4",
        f"updates/Mallory_X/{UID}": "no client id",
    }


def test_the_inbox_grammar_is_strict():
    good = f"updates/dev-1/{UID}"
    assert protocol.parse_inbox_key(good) == ("dev-1", UID)
    unaddressable = [f"updates/mallory/{UID}\n", f"updates/mallory/{UID}/../x"]
    for name in [*hostile_names(), *unaddressable]:  # "\n": "$" would have matched it
        with pytest.raises(RejectedUpdate) as info:
            protocol.parse_inbox_key(name)
        assert info.value.reason == "malformed_name"
        assert len(str(info.value)) < 200
        ledger_key = state_keys.ledger_entry(name)
        assert len(ledger_key) <= len("ledger/") + 63 + len("/_name/") + 64 + len(".json")
        digest = hashlib.sha256(name.encode()).hexdigest()
        assert ledger_key.endswith(f"/{digest}.json")
        assert state_keys.inbox_key_of_ledger_entry(ledger_key) is None
    assert state_keys.ledger_entry("updates/mallory/" + "x" * 251).startswith(
        "ledger/mallory/_name/"
    )
    assert state_keys.ledger_entry(f"updates/Mallory_X/{UID}").startswith("ledger/_other/")


def test_hostile_names_get_one_bounded_verdict_and_the_next_round_runs_clean(admin_env, capsys):
    """Through ``fl-admin round``: each hostile name is judged once (malformed_name),
    its verdict and quarantine keys are digests, its inbox object is gone."""
    from fedlib.ops.admin import main as admin_main
    from fedlib.server.deployment import Deployment
    from fedlib.server.settings import ServerSettings

    env = admin_env
    assert admin_main(["init", "--holdout", str(env["holdout"])]) == 0
    dep = Deployment(ServerSettings.load())
    dep.dataset = env["data"]
    upload_updates(dep, 2)
    names = hostile_names()
    for name in names:
        dep.inbox.put(name, b"junk under " + name.encode())
    listed = {i.key for i in dep.inbox.list("updates/")}
    assert set(names) <= listed, set(names) - listed  # SeaweedFS stores each name as is

    capsys.readouterr()
    assert admin_main(["round", "--run-id", "names-1", "--json"]) == 0
    report = RoundReport.model_validate(json.loads(capsys.readouterr().out))
    assert report.accepted == 2, report.summary()
    assert report.rejected == {"malformed_name": len(names)}, report.summary()
    assert report.unrecorded is None
    ledger = Ledger(dep.state)
    for name in names:
        entry = ledger.read(name)
        assert entry is not None and entry.reason == "malformed_name" and entry.key == name
        kept = state_keys.quarantine_bytes(name, entry.sha256)
        assert dep.state.get(kept) == b"junk under " + name.encode()
        assert max(len(seg.encode()) for seg in kept.split("/")) <= 80
    entries = [i.key for i in dep.state.list(state_keys.LEDGER)]
    assert len(entries) == 2 + len(names)  # one verdict per object
    assert list(dep.inbox.list("updates/")) == []

    upload_updates(dep, 2, start=2)
    capsys.readouterr()
    assert admin_main(["round", "--run-id", "names-2", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accepted"] == 2 and again["rejected"] == {}, again


def test_unaddressable_names_are_judged_and_removed(deployment):
    """Names object_store cannot address (a control character, a trailing ``/``) that
    SeaweedFS keeps as sent: the inbox listing skips them, so finalize finds them through
    the control plane; each gets one ``malformed_name`` verdict under the digest of its
    name, a stub in quarantine, and is deleted. The round around them publishes."""
    import botocore.exceptions

    client = deployment.inbox._control()
    bucket = deployment.settings.inbox_bucket
    odd = [
        "updates/mallory//x",
        "updates/mallory/dir/",
        "updates/mallory/a\x01b",
        f"updates/mallory/{UID}\n",
        f"updates/mallory/{UID}/../x",
    ]
    refused = set()
    for name in odd:
        try:
            client.put_object(Bucket=bucket, Key=name, Body=b"junk:" + name.encode())
        except botocore.exceptions.ClientError:
            refused.add(name)
    stored = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    dotdot = f"updates/mallory/{UID}/../x"
    assert refused == {dotdot}  # SeaweedFS refuses a '..' segment (InvalidRequest)
    assert "updates/mallory/x" in stored  # ...and folds '//' into '/': judged as usual
    unaddressable = set(odd) - {dotdot, "updates/mallory//x"}
    assert unaddressable <= stored
    assert not unaddressable & {i.key for i in deployment.inbox.list("updates/")}
    # what SeaweedFS holds under each name (it keeps a trailing-'/' name as an empty
    # directory marker, whatever the body was)
    held = {n: client.get_object(Bucket=bucket, Key=n)["Body"].read() for n in unaddressable}
    assert held["updates/mallory/dir/"] == b""

    upload_updates(deployment, 2)
    report = run_round(deployment, "odd-1")
    assert report.decision == "published" and report.accepted == 2, report.summary()
    assert report.rejected == {"malformed_name": 1 + len(unaddressable)}, report.summary()
    ledger = Ledger(deployment.state)
    assert ledger.read("updates/mallory/x").reason == "malformed_name"
    for name in unaddressable:
        entry = ledger.read(name)
        assert entry is not None and entry.reason == "malformed_name" and entry.key == name
        assert state_keys.ledger_entry(name).startswith("ledger/mallory/_name/")
        stub = QuarantineStub.from_json(
            deployment.state.get(state_keys.quarantine_stub(name, entry.sha256))
        )
        blob = held[name]
        assert stub.kept_because == "unaddressable" and stub.size == len(blob)
        assert (stub.sha256, bytes.fromhex(stub.prefix_hex)) == (entry.sha256, blob)
        assert entry.sha256 == hashlib.sha256(blob).hexdigest()
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)  # the inbox is empty

    upload_updates(deployment, 2, start=2)
    again = run_round(deployment, "odd-2")
    assert again.accepted == 2 and again.rejected == {}, again.summary()


def test_shards_search_their_ranges_of_the_inbox_for_unaddressable_names(deployment):
    """Issue 18: the mapped shards search the inbox for names the data path cannot
    address, each its own range in listing order (cut at keys the shards own: the last
    range runs to the end), so the round-wide ``finalize`` lists nothing. Names before
    every device, inside one, between two (under an id that sorts apart in SeaweedFS's
    directory order and in byte order: ``x-y`` and ``x``) and after the last: each
    judged once, and more than one shard found some."""
    from fedlib.server.records import ShardRecorded
    from fedlib.server.round_runner import load_plan, load_shard
    from fedlib.server.state_keys import RunKeys

    deployment.settings = deployment.settings.model_copy(update={"shard_size": 2})
    sent = upload_updates(deployment, 5)
    ids = sorted({key.split("/")[1] for key in sent})
    client = deployment.inbox._control()
    bucket = deployment.settings.inbox_bucket
    odd = [
        "updates/0\x01first",
        f"updates/{ids[0]}/in\x01side",
        f"updates/{ids[1]}-y/\x02between",
        f"updates/{ids[3]}/dir/",
        "updates/zz/\x03last",
    ]
    for name in odd:
        client.put_object(Bucket=bucket, Key=name, Body=b"junk")

    report = run_round(deployment, "ranges-1")
    assert report.decision == "published" and report.accepted == 5, report.summary()
    assert report.rejected == {"malformed_name": len(odd)}, report.summary()
    plan = load_plan(deployment, "ranges-1")
    assert plan.shards_search_names and plan.shard_count >= 3
    ranges = [load_shard(deployment, plan, i).search_range for i in range(plan.shard_count)]
    cuts = [r for r in ranges if r is not None]
    assert len(cuts) >= 3 and cuts[0].after is None and cuts[-1].through is None
    assert all(a.through == b.after for a, b in itertools.pairwise(cuts)), cuts
    found = [
        ShardRecorded.from_json(
            deployment.state.get(RunKeys("ranges-1").shard_recorded(i))
        ).rejected.get("malformed_name", 0)
        for i in range(plan.shard_count)
    ]
    assert sum(found) == len(odd) and sum(1 for n in found if n) >= 2, (found, ranges)
    ledger = Ledger(deployment.state)
    for name in odd:
        entry = ledger.read(name)
        assert entry is not None and entry.reason == "malformed_name" and entry.key == name
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)  # the inbox is empty


def test_oversized_objects_are_kept_as_stubs_not_copies(deployment):
    """Two uploads over the envelope limit: quarantine keeps a stub each (first bytes,
    full SHA-256 streamed from the inbox, size), not the 64 MiB objects."""
    limit = protocol.MAX_ENVELOPE_BYTES
    blobs = {}
    for i, cid in enumerate(deployment.dataset.client_ids[2:4]):
        key = protocol.inbox_key(cid, protocol.new_update_id())
        blob = bytes([i + 1]) * 16 + bytes(limit + 1 + i)
        deployment.inbox.put(key, blob)
        blobs[key] = blob
    upload_updates(deployment, 2)
    report = run_round(deployment, "big-1")
    assert report.rejected == {"oversized": 2}, report.summary()
    kept = sum(i.size for i in deployment.state.list(state_keys.QUARANTINE))
    assert kept < 2 * 16 * 1024, kept  # was 2 x 64 MiB
    stub_bytes = deployment.settings.quarantine_stub_bytes
    for key, blob in blobs.items():
        entry = Ledger(deployment.state).read(key)
        assert entry is not None and entry.reason == "oversized" and entry.size == len(blob)
        stub = QuarantineStub.from_json(
            deployment.state.get(state_keys.quarantine_stub(key, entry.sha256))
        )
        assert stub.kept_because == "oversized" and stub.size == len(blob)
        assert stub.sha256 == hashlib.sha256(blob).hexdigest()
        assert bytes.fromhex(stub.prefix_hex) == blob[:stub_bytes]
        assert not deployment.state.exists(state_keys.quarantine_bytes(key, entry.sha256))
    assert list(deployment.inbox.list("updates/")) == []


def test_an_object_over_the_hash_limit_is_stubbed_without_reading_it_whole(
    s3_config, tmp_path, small_dataset
):
    """A device may upload far more than the envelope limit (multipart: terabytes);
    past ``quarantine_hash_max_bytes`` the stub keeps the prefix and size, no digest."""
    from tests.helpers import build_deployment

    dep = build_deployment(
        s3_config, tmp_path / "keys", small_dataset, quarantine_hash_max_bytes=1 << 20
    )
    key = protocol.inbox_key("mallory", protocol.new_update_id())
    blob = b"\x07" * 10 + bytes(protocol.MAX_ENVELOPE_BYTES + 1)
    dep.inbox.put(key, blob)
    upload_updates(dep, 2)
    report = run_round(dep, "huge-1")
    assert report.rejected == {"oversized": 1}, report.summary()
    stub = QuarantineStub.from_json(dep.state.get(state_keys.quarantine_stub(key, None)))
    assert (stub.sha256, stub.size) == (None, len(blob))
    assert bytes.fromhex(stub.prefix_hex) == blob[: dep.settings.quarantine_stub_bytes]
    assert list(dep.inbox.list("updates/")) == []


def test_a_device_past_its_quarantine_quota_gets_stubs(s3_config, tmp_path, small_dataset):
    """Quarantine keeps a device's rejected bytes whole up to its quota, then stubs."""
    from tests.helpers import build_deployment

    dep = build_deployment(
        s3_config,
        tmp_path / "keys",
        small_dataset,
        quarantine_quota_bytes=25_000,
        quarantine_stub_bytes=64,
    )
    junk = {}
    for i in range(4):
        key = protocol.inbox_key("mallory", protocol.new_update_id())
        junk[key] = bytes([i]) * 10_000
        dep.inbox.put(key, junk[key])
    upload_updates(dep, 2)
    report = run_round(dep, "quota-1")
    assert report.rejected == {"malformed": 4}, report.summary()
    whole, stubs = [], []
    for key, blob in junk.items():
        digest = hashlib.sha256(blob).hexdigest()
        if dep.state.exists(state_keys.quarantine_bytes(key, digest)):
            assert dep.state.get(state_keys.quarantine_bytes(key, digest)) == blob
            whole.append(key)
        else:
            stub = QuarantineStub.from_json(dep.state.get(state_keys.quarantine_stub(key, digest)))
            assert stub.kept_because == "quarantine_quota"
            assert (stub.sha256, stub.size, stub.prefix_hex) == (digest, 10_000, blob[:64].hex())
            stubs.append(key)
    assert len(whole) == 2 and len(stubs) == 2  # 2 x 10 kB fit 25 kB, the third would not
    used = sum(i.size for i in dep.state.list("quarantine/mallory/"))
    assert used < 25_000 + 2 * 4096, used
    assert list(dep.inbox.list("updates/")) == []


def test_a_round_deletes_expired_quarantine_and_keeps_the_ledger(deployment):
    from fedlib.server import round_runner as rr

    key = protocol.inbox_key("mallory", protocol.new_update_id())
    deployment.inbox.put(key, b"junk")
    upload_updates(deployment, 2)
    report = run_round(deployment, "keep-1")
    assert report.rejected == {"malformed": 1} and report.quarantine_expired == 0
    held = [i.key for i in deployment.state.list(state_keys.QUARANTINE)]
    assert len(held) == 2  # the bytes and the reason
    days = deployment.settings.quarantine_retention_days
    later = int(max(i.last_modified_ms for i in deployment.state.list("quarantine/")))
    assert rr.expire_quarantine(deployment, now_ms=later + int(days * 86_400_000) - 1000) == 0
    assert rr.expire_quarantine(deployment, now_ms=later + int(days * 86_400_000) + 1000) == 2
    assert list(deployment.state.list(state_keys.QUARANTINE)) == []
    assert Ledger(deployment.state).read(key).reason == "malformed"  # the verdict stays


def test_a_verdict_that_cannot_be_written_never_blocks_the_round(
    seaweed_factory, tmp_path, small_dataset
):
    """A real fault: the server's SeaweedFS identity may not write under ``ledger/mallory/``
    nor under the first device's ledger prefix. Each round finishes, writes every other
    verdict, reports the unwritten ones (count and key digests). The first device's
    accepted update is in the round's sum already: its verdict goes under a digest key at
    once and its object goes (uploaded again later, it is a replay). Mallory's junk stays
    in the inbox; after ``verdict_write_attempts`` rounds it gets an ``unrecordable``
    verdict under a digest key, a bounded stub in quarantine, and goes."""
    from fedlib.server.deployment import Deployment
    from scripts.seaweed import Credentials
    from tests.helpers import build_deployment

    server = seaweed_factory()
    admin = build_deployment(server.s3_config(), tmp_path / "keys", small_dataset, min_clients=1)
    state, inbox = admin.settings.state_bucket, admin.settings.inbox_bucket
    models = admin.settings.models_bucket
    creds = Credentials("fl-server-noledger", "fl-server-noledger-secret")
    writable = [
        state_keys.ROUNDS,
        state_keys.REPORTS,
        state_keys.ARCHIVE,
        state_keys.OPTIMIZER,
        state_keys.INTERVALS,
        state_keys.PRIVACY_SPENT,
        state_keys.QUARANTINE,
        state_keys.VERDICT_ATTEMPTS,
        state_keys.QUARANTINE_SWEEP,
        state_keys.LEDGER + state_keys.UNRECORDABLE,
        # every device's ledger but the first one's and mallory's
        *(f"{state_keys.LEDGER}{cid}/" for cid in admin.dataset.client_ids[1:]),
    ]
    server.identities = [
        {
            "name": "fl-server-without-mallorys-ledger",
            "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
            "actions": [
                "Read",
                "List",
                f"Write:{inbox}/*",
                f"Write:{models}/*",
                *(f"Write:{state}/{prefix}*" for prefix in writable),
            ],
        }
    ]
    server.restart()
    server_side = Deployment(admin.settings, server.s3_config(creds, max_attempts=1))

    junk = protocol.inbox_key("mallory", protocol.new_update_id())
    admin.inbox.put(junk, b"junk" * 100)
    digest = state_keys.key_digest(junk)
    limit = admin.settings.verdict_write_attempts
    first = upload_updates(admin, 1)  # accepted, but its own ledger key is refused
    (first_key,) = first
    first_blob = admin.inbox.get(first_key)
    for attempt in range(1, limit):
        honest = upload_updates(admin, 2, start=2 * attempt - 1)
        report = run_round(server_side, f"unwritable-{attempt}")
        accepted = 3 if attempt == 1 else 2
        assert report.accepted == accepted, report.summary()
        assert report.rejected == {"malformed": 1}, report.summary()
        assert report.unrecorded is not None, report.summary()
        if attempt == 1:  # the accepted one went under its digest key at once
            assert (report.unrecorded.count, report.unrecorded.unrecordable) == (2, 1)
            assert sorted(report.unrecorded.sample) == sorted(
                [digest, state_keys.key_digest(first_key)]
            )
            fallback = json.loads(admin.state.get(state_keys.ledger_fallback(first_key)))
            assert fallback["accepted"] is True and fallback["key"] == first_key
            assert not admin.state.exists(state_keys.ledger_entry(first_key))
            assert Ledger(admin.state).read(first_key).accepted is True  # via the digest
        else:
            assert (report.unrecorded.count, report.unrecorded.unrecordable) == (1, 0)
            assert report.unrecorded.sample == [digest]
        assert [i.key for i in admin.inbox.list("updates/")] == [junk]  # stays
        for key in honest:  # the rest of the shard was written and consumed
            assert Ledger(admin.state).read(key).accepted is True
        assert Ledger(admin.state).read(junk) is None

    last = run_round(server_side, f"unwritable-{limit}")
    assert last.unrecorded is not None and last.unrecorded.unrecordable == 1, last.summary()
    assert list(admin.inbox.list("updates/")) == []
    entry = admin.state.get(state_keys.ledger_fallback(junk))
    assert json.loads(entry)["reason"] == "unrecordable" and json.loads(entry)["key"] == junk
    stub = QuarantineStub.from_json(admin.state.get(state_keys.quarantine_unrecordable(junk)))
    assert stub.kept_because == "unrecordable" and stub.size == 400
    assert stub.sha256 == hashlib.sha256(b"junk" * 100).hexdigest()

    upload_updates(admin, 1, start=2 * limit - 1)
    clean = run_round(server_side, "unwritable-after")
    assert clean.unrecorded is None and clean.rejected == {}, clean.summary()

    # The update judged under the digest key, uploaded again: a replay, never summed twice.
    admin.inbox.put(first_key, first_blob)
    upload_updates(admin, 1, start=1, seed=99)
    again = run_round(admin, "unwritable-replayed")
    assert again.accepted == 1 and again.rejected == {"replay": 1}, again.summary()
    entry = Ledger(admin.state).read(first_key)
    assert entry is not None and entry.reason == "replay", entry


def test_the_251_character_name_through_the_fl_round_dag(airflow_deployment, dagbag):
    """The observed attack through a real ``fl_round`` run: one verdict, quarantined,
    removed; and the next run does not raise again."""
    from datetime import timedelta

    from tests.test_fl_round_dag import T0, report_of, run_dag

    dep = airflow_deployment
    upload_updates(dep, 2)
    name = "updates/mallory/" + "x" * 251
    dep.inbox.put(name, b"junk")
    first = run_dag(dagbag, T0)
    assert first.state == "success"
    report = report_of(dep, first)
    assert report["accepted"] == 2 and report["rejected"] == {"malformed_name": 1}, report
    entry = Ledger(dep.state).read(name)
    assert entry is not None and entry.reason == "malformed_name" and entry.key == name
    assert dep.state.get(state_keys.quarantine_bytes(name, entry.sha256)) == b"junk"
    assert list(dep.inbox.list("updates/")) == []

    upload_updates(dep, 2, start=2)
    second = run_dag(dagbag, T0 + timedelta(minutes=15))
    assert second.state == "success"
    assert report_of(dep, second)["rejected"] == {}, report_of(dep, second)

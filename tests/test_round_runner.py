"""A whole round over real S3: clients' updates in, a verdict per object, a new version out."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from client.update import make_update
from fedlib.crypto import sealing
from fedlib.server import state_keys
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import run_round
from fedlib.wire import compression, protocol


def enroll(deployment, client_id):
    """A fresh signing key for ``client_id``; next to an enrolled one, the rotation path."""
    key = sealing.generate_signing_key()
    fleet = deployment.load_fleet()
    fleet.enroll(client_id, sealing.public_pem(key), add_key=bool(fleet.active_keys(client_id)))
    deployment.save_fleet(fleet)
    return key


def upload_updates(deployment, count: int, *, seed: int = 0, start: int = 0):
    package = deployment.registry().read_active()
    server_public = deployment.current_server_public_key()
    data = deployment.dataset
    sent = {}
    for i, cid in enumerate(data.client_ids[start : start + count]):
        key = enroll(deployment, cid)
        update = make_update(
            package,
            data.clients[cid],
            client_id=cid,
            client_key=key,
            server_public_key=server_public,
            residual=None,
            seed=seed + i,
        )
        object_key = protocol.inbox_key(cid, update.update_id)
        deployment.inbox.put(object_key, update.envelope, if_absent=True)
        sent[object_key] = update.envelope
    return sent


def forged_payload_update(deployment, client_id, key, delta, *, base_version=1, nan=False):
    return put_dense_update(deployment, client_id, key, delta, base_version=base_version, nan=nan)[
        0
    ]


def put_dense_update(
    deployment,
    client_id,
    key,
    delta,
    *,
    base_version=None,
    nan=False,
    update_id=None,
    created_at_ms=None,
):
    """Seal ``delta`` (dense32, 100 samples) as ``client_id`` and put it in the inbox;
    (object key, envelope). ``base_version`` None: the active version."""
    package = deployment.registry().read_active()
    blob = compression.encode(delta, compression.CompressionConfig("dense32"))
    if nan:  # a sender that does not use our encoder: NaN in the values
        blob = blob[:-4] + np.float32("nan").tobytes()
    meta = protocol.UpdateMeta.model_validate(
        {
            "schema": protocol.META_SCHEMA,
            "model_kind": package.metadata.model_kind,
            "num_params": package.metadata.num_params,
            "num_samples": 100,
            "epochs": 1,
            "compression": "dense32",
        }
    )
    header, envelope = sealing.seal_update(
        client_id=client_id,
        client_key=key,
        server_public_key=deployment.current_server_public_key(),
        base_version=package.version if base_version is None else base_version,
        payload=protocol.encode_payload(meta, blob),
        update_id=update_id,
        created_at_ms=created_at_ms,
    )
    object_key = protocol.inbox_key(client_id, header.update_id)
    deployment.inbox.put(object_key, envelope)
    return object_key, envelope


def test_round_publishes_then_waits(deployment):
    upload_updates(deployment, 4)
    report = run_round(deployment, "run-1")
    assert report.decision == "published", report.message
    assert report.published_version == 2 and report.accepted == 4 and not report.rejected
    assert deployment.registry().active_version() == 2
    assert list(deployment.inbox.list("updates/")) == []  # verdicts first, then deleted
    assert len(list(Ledger(deployment.state).verdicts())) == 4

    again = run_round(deployment, "run-2")
    assert again.decision == "waiting" and again.message.startswith("waiting: 0 of 2")
    assert deployment.registry().active_version() == 2


def test_bad_updates_are_quarantined_good_ones_aggregated(deployment):
    good = upload_updates(deployment, 3)
    package = deployment.registry().read_active()
    dim = package.metadata.num_params
    key = enroll(deployment, "mallory")
    stranger = sealing.generate_signing_key()  # never enrolled

    bad = {}
    # forged signature: flip a bit of a valid envelope's signature
    k0, env0 = next(iter(good.items()))
    victim = protocol.inbox_key("mallory", protocol.new_update_id())
    bad[victim] = "bad_signature"
    deployment.inbox.put(victim, env0[:-1] + bytes([env0[-1] ^ 1]))
    # unknown client
    bad[forged_payload_update(deployment, "mallory", stranger, np.zeros(dim))] = "unknown_client"
    bad[forged_payload_update(deployment, "mallory", key, np.zeros(dim), nan=True)] = "non_finite"
    bad[forged_payload_update(deployment, "mallory", key, np.full(dim, 1e3))] = "norm_exceeded"
    # a base version that was never published
    bad[forged_payload_update(deployment, "mallory", key, np.zeros(dim), base_version=7)] = (
        "unknown_base_version"
    )

    report = run_round(deployment, "run-bad")
    assert report.decision == "published", report.message
    assert report.accepted == 3
    ledger = Ledger(deployment.state)
    for object_key, reason in bad.items():
        verdict = ledger.read(object_key)
        assert verdict is not None and verdict.accepted is False
        assert verdict.reason == reason, (object_key, verdict)
        quarantined = [i.key for i in deployment.state.list("quarantine/" + object_key[8:])]
        assert any(k.endswith(".bin") for k in quarantined)
    for object_key in good:
        assert ledger.read(object_key).accepted is True

    # replay: the same accepted envelope uploaded again after its round
    deployment.inbox.put(k0, env0)
    upload_updates(deployment, 2, seed=50)  # two fresh clients' worth of updates
    replay_round = run_round(deployment, "run-replay")
    assert replay_round.rejected.get("replay") == 1
    assert ledger.read(k0).accepted is True  # the first verdict stands


def test_an_object_overwritten_after_judgment_is_neither_lost_nor_miscounted(deployment):
    """The bytes that were judged are what the archive keeps; the new bytes stay in the
    inbox and meet their ledger entry in the next round (duplicate_update_id)."""
    from fedlib.server import round_runner as rr

    sent = upload_updates(deployment, 3)
    plan = rr.plan_round(deployment, "r-a")
    for index in range(plan.shard_count):
        rr.process_shard(deployment, "r-a", index)
    key, original = next(iter(sent.items()))
    deployment.inbox.put(key, original + b"swapped")  # the client overwrites its object
    rr.reduce_round(deployment, "r-a")
    rr.build_round_candidate(deployment, "r-a")
    rr.evaluate_round(deployment, "r-a")
    rr.finalize_round(deployment, "r-a", decision="rejected")

    verdict = Ledger(deployment.state).read(key)
    assert verdict.accepted and verdict.sha256 == hashlib.sha256(original).hexdigest()
    archived = rr.archived_envelope(deployment, "r-a", key)
    assert archived == original
    assert [i.key for i in deployment.inbox.list("updates/")] == [key]  # not deleted

    upload_updates(deployment, 2, start=3)
    nxt = run_round(deployment, "r-b")
    assert nxt.rejected == {"duplicate_update_id": 1}
    assert list(deployment.inbox.list("updates/")) == []


def test_archive_pack_round_trips_and_refuses_tampering():
    import pytest

    from fedlib.server.round_runner import pack_envelopes, unpack_envelopes

    entries = [("updates/a/1", b"x" * 10), ("updates/b/2", b""), ("updates/c/3", b"\x00\xff")]
    data = pack_envelopes(entries)
    assert unpack_envelopes(data) == dict(entries)
    assert unpack_envelopes(pack_envelopes([])) == {}
    flipped = bytearray(data)
    flipped[-1] ^= 1  # the last envelope's bytes no longer match their digest
    for bad in (data[:-1], data + b"\x00", bytes(flipped), b"FLPS" + data[4:]):
        with pytest.raises(ValueError):
            unpack_envelopes(bad)


def test_run_round_refreshes_the_channel_like_the_dag(deployment):
    """``fl-admin round`` re-signs channel metadata that is about to expire, as the DAG's
    ``refresh_channel`` task does (devices refuse expired metadata)."""
    from datetime import timedelta

    from fedlib.trust.channel_layout import Expiry
    from fedlib.trust.channel_repository import ChannelRepository

    short = ChannelRepository(
        deployment.models, deployment.channel_keys(), expiry=Expiry(timestamp=timedelta(minutes=1))
    )
    short.refresh_timestamp(force=True)  # a timestamp that expires in a minute: due
    before = short.status()
    report = run_round(deployment, "refresh-1")  # nothing pending: waits, still refreshes
    assert report.decision == "waiting"
    after = ChannelRepository(deployment.models, deployment.channel_keys()).status()
    assert after.timestamp_version == before.timestamp_version + 1


def test_a_failed_quarantine_stub_fails_the_shard_and_deletes_nothing(
    seaweed_factory, tmp_path, small_dataset
):
    """An oversized update is quarantined unread, as a stub (first bytes, SHA-256 streamed
    from the inbox, size) in the state bucket. When that write fails (here: a real
    SeaweedFS identity for the server that may write the round's files but not
    ``quarantine/``), the shard fails, the inbox object stays, and a retry with a working
    identity quarantines its stub."""
    import pytest

    from fedlib.errors import StoreError
    from fedlib.server import round_runner as rr
    from fedlib.server.deployment import Deployment
    from fedlib.server.records import QuarantineStub
    from scripts.seaweed import Credentials
    from tests.helpers import build_deployment

    server = seaweed_factory()
    admin = build_deployment(server.s3_config(), tmp_path / "keys", small_dataset)
    state = admin.settings.state_bucket
    no_quarantine = Credentials("fl-server-noq", "fl-server-noq-secret")
    server.identities = [
        {
            "name": "fl-server-without-quarantine",
            "credentials": [
                {"accessKey": no_quarantine.access_key, "secretKey": no_quarantine.secret_key}
            ],
            "actions": [
                "Read",
                "List",
                f"Write:{state}/{state_keys.ROUNDS}*",
                f"Write:{state}/{state_keys.ARCHIVE}*",
            ],
        }
    ]
    server.restart()  # s3.json is read at start

    upload_updates(admin, 2)
    cid = admin.dataset.client_ids[2]
    oversized = protocol.inbox_key(cid, protocol.new_update_id())
    blob = bytes(protocol.MAX_ENVELOPE_BYTES + 1)
    admin.inbox.put(oversized, blob)
    before = sorted(i.key for i in admin.inbox.list("updates/"))

    restricted = Deployment(admin.settings, server.s3_config(no_quarantine, max_attempts=1))
    plan = rr.plan_round(restricted, "run-fault")
    assert plan.shard_count == 1 and plan.updates == 3
    with pytest.raises(StoreError, match="access denied"):
        rr.process_shard(restricted, "run-fault", 0)
    assert sorted(i.key for i in admin.inbox.list("updates/")) == before  # nothing deleted
    assert admin.inbox.get(oversized) == blob
    assert list(admin.state.list(state_keys.QUARANTINE)) == []
    assert not admin.state.exists(state_keys.RunKeys("run-fault").shard_verdicts(0))

    report = run_round(admin, "run-retry")  # the same inbox, an identity that may quarantine
    assert report.accepted == 2 and report.rejected == {"oversized": 1}, report.summary()
    verdict = Ledger(admin.state).read(oversized)
    assert verdict is not None and verdict.reason == "oversized"
    kept = state_keys.quarantine_stub(oversized, None)
    quarantined = [i.key for i in admin.state.list(state_keys.QUARANTINE)]
    assert [k for k in quarantined if not k.endswith(".reason.json")] == [kept]
    stub = QuarantineStub.from_json(admin.state.get(kept))
    assert (stub.sha256, stub.size) == (hashlib.sha256(blob).hexdigest(), len(blob))
    assert stub.kept_because == "oversized"
    assert list(admin.inbox.list("updates/")) == []


def test_each_shard_records_its_own_verdicts_and_finalize_reads_one_record_per_shard(
    deployment,
):
    """Issue 18 item 3: the per-update work of finishing a round (ledger verdicts, inbox
    deletes) is the mapped ``record_shard`` step's, so the round-wide ``finalize`` does
    not grow with the batch. Shown by taking the per-update data away before finalize:
    the shards' verdict files are deleted after ``record_shard``, and finalize still
    reports every update from the shards' small records. ``record_shard`` run twice (a
    retry) changes nothing."""
    from fedlib.server import pipeline
    from fedlib.server.pipeline import STEPS, RoundRun
    from fedlib.server.records import ShardRecorded
    from fedlib.server.round_runner import load_plan
    from fedlib.server.state_keys import RunKeys

    deployment.settings = deployment.settings.model_copy(update={"shard_size": 2})
    sent = upload_updates(deployment, 5)
    run = RoundRun(run_id="per-shard")
    for step in STEPS[: [s.name for s in STEPS].index("record_shard")]:  # up to publish
        if step.needs_publish and pipeline.gate(deployment, run).value != "published":
            continue
        if step.mapped:
            for index in range(load_plan(deployment, run.run_id).shard_count):
                step.run(deployment, run, index)
        else:
            step.run(deployment, run)
    plan = load_plan(deployment, run.run_id)
    assert not plan.waiting and deployment.registry().active_version() == 2
    assert plan.shard_count >= 2
    ledger = Ledger(deployment.state)
    assert all(ledger.read(key) is None for key in sent)  # nothing recorded yet

    first = pipeline.record_shard(deployment, run, 0)
    shard0 = {v for v in sent if ledger.read(v) is not None}
    assert len(shard0) == first.accepted > 0  # shard 0's verdicts, and only those
    assert not shard0 & {i.key for i in deployment.inbox.list("updates/")}  # its objects gone
    assert pipeline.record_shard(deployment, run, 0) == first  # a retry: the same
    for index in range(1, plan.shard_count):
        pipeline.record_shard(deployment, run, index)
    keys = RunKeys(run.run_id)
    for index in range(plan.shard_count):
        assert isinstance(
            ShardRecorded.model_validate_json(deployment.state.get(keys.shard_recorded(index))),
            ShardRecorded,
        )
        deployment.state.delete(keys.shard_verdicts(index))  # the per-update data: gone

    report = pipeline.finalize(deployment, run)
    assert report.decision.value == "published" and report.accepted == 5, report.summary()
    assert all(ledger.read(key).run_id == run.run_id for key in sent)
    assert list(deployment.inbox.list("updates/")) == []


def _plan_requests(
    seaweed_factory, tmp_path, small_dataset, pending: int, *, flood: int = 0
) -> dict[str, int]:
    """The S3 requests one plan makes over ``pending`` well-formed objects (one a device),
    by type, as the SeaweedFS server itself counts them (its Prometheus counter);
    ``flood``: that many more objects of the middle device."""
    from bench.fleet import s3_requests
    from fedlib.server import round_runner as rr
    from scripts.demo import free_port
    from tests.helpers import build_deployment

    metrics_port = free_port(9400)
    server = seaweed_factory(metrics_port=metrics_port)
    deployment = build_deployment(server.s3_config(), tmp_path / f"keys-{pending}", small_dataset)
    for i in range(pending):  # the plan reads names only: any bytes under a well-formed key
        deployment.inbox.put(protocol.inbox_key(f"device-{i:05d}", protocol.new_update_id()), b"x")
    flooder = f"device-{pending // 2:05d}"
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda _: deployment.inbox.put(
                    protocol.inbox_key(flooder, protocol.new_update_id()), b"x"
                ),
                range(flood),
            )
        )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    buckets = {deployment.inbox.bucket, deployment.state.bucket}
    before = s3_requests(url, buckets, settle=True)
    plan = rr.plan_round(deployment, f"plan-{pending}", min_clients=1, shard_size=1000)
    cap = deployment.settings.max_objects_per_device
    expected = pending if not flood else pending - 1 + cap
    assert plan.updates == expected and plan.client_count == pending and not plan.waiting
    after = s3_requests(url, buckets, settle=True)
    return {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind]}


def test_a_plan_makes_no_request_per_object(seaweed_factory, tmp_path, small_dataset):
    """The plan is the one task no worker count shortens: over 40 and over 400 pending
    updates it makes the same requests (the listing reads 1,000 keys a page; no ledger
    lookup per object: the shards do those, in parallel)."""
    few = _plan_requests(seaweed_factory, tmp_path, small_dataset, 40)
    many = _plan_requests(seaweed_factory, tmp_path, small_dataset, 400)
    assert many == few, (few, many)
    assert sum(many.values()) < 40, many


def test_a_flooding_device_costs_the_plan_one_listing_request(
    seaweed_factory, tmp_path, small_dataset
):
    """A device with 1,500 objects in the middle of the inbox costs the plan one listing
    request more than a device with one: its chunk's listing takes what the per-device
    cap needs and starts again past the device (without that, 15 pages of its keys)."""
    one = _plan_requests(seaweed_factory, tmp_path / "one", small_dataset, 40)
    flooded = _plan_requests(seaweed_factory, tmp_path / "flood", small_dataset, 40, flood=1500)
    assert sum(flooded.values()) <= sum(one.values()) + 1, (one, flooded)


def test_a_retried_shard_does_not_take_its_own_verdicts_for_replays(deployment):
    """A shard task run again after its run wrote some of its verdicts (the objects not
    yet deleted) sums the same objects to the same partial: only another run's verdict
    makes a key a replay."""
    from fedlib.server import round_runner as rr
    from fedlib.server.state_keys import RunKeys

    upload_updates(deployment, 3)
    plan = rr.plan_round(deployment, "r-retry")
    assert plan.shard_count == 1
    first = rr.process_shard(deployment, "r-retry", 0)
    ledger = Ledger(deployment.state)
    for verdict in rr.load_verdicts(deployment, "r-retry"):
        assert ledger.record(verdict, run_id="r-retry")  # written; the deletes never ran
    partial = deployment.state.get(RunKeys("r-retry").shard_partial(0))
    again = rr.process_shard(deployment, "r-retry", 0)
    assert again == first and again.accepted == 3
    assert deployment.state.get(RunKeys("r-retry").shard_partial(0)) == partial


def test_a_report_lists_the_largest_shares_and_counts_every_device(deployment, monkeypatch):
    """The report (and finalize, which writes it) stays bounded: it lists the largest
    weight shares and the count; every device's share is in the round's weights record."""
    from fedlib.server import records
    from fedlib.server import round_runner as rr

    monkeypatch.setattr(records, "REPORT_DEVICES_LISTED", 2)
    upload_updates(deployment, 3)
    report = run_round(deployment, "r-listed")
    assert report.decision == "published", report.message
    weights = rr.load_round_weights(deployment, "r-listed")
    assert weights is not None and len(weights.devices) == 3
    ranked = sorted(weights.devices, key=lambda d: (d.weight_share, d.client_id), reverse=True)
    assert report.device_count == 3 and report.devices == ranked[:2]
    assert report.largest_share_client == weights.largest.client_id
    assert "devices: 3," in report.summary()

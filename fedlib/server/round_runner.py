"""A round's server-side steps over the real stores, each a function of explicit inputs.

:mod:`fedlib.server.pipeline` orders them (the ``fl_round`` DAG runs each as its own,
mapped and retried, task; ``fl-admin round`` runs them in one process). Each step reads
what it needs from the state bucket and writes its result there as a typed record
(:mod:`fedlib.server.records`, keys from :mod:`fedlib.server.state_keys`),
deterministically, so a retried task rewrites the same bytes and XCom only carries keys
and digests.

Exactly-once: a shard's verdicts are per-run files (rewritten on retry); only
:func:`finalize_round` writes the write-once ledger entries (and quarantine copies), and
only then are inbox objects deleted. An inbox object whose key already has a ledger
entry is a replay. Objects of a run that never finalized stay in the inbox and are
picked up by the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from fedlib import failpoints
from fedlib.crypto import sealing
from fedlib.errors import RejectedUpdate, StoreError
from fedlib.failpoints import failpoint
from fedlib.models.package import ModelPackage, same_features, weights_from_bytes
from fedlib.server import privacy, robust, state_keys
from fedlib.server.aggregation import (
    AggregationConfig,
    UpdateWeight,
    final_weights,
    single_threaded_blas,
)
from fedlib.server.deployment import Deployment, Holdout
from fedlib.server.ledger import Ledger
from fedlib.server.records import (
    CAPPED_DEVICES_LISTED,
    AggregateResult,
    CandidateResult,
    Decision,
    DeviceShare,
    Evaluation,
    InboxRange,
    IntervalRecord,
    Metrics,
    PrivacyCharge,
    PrivacyRecord,
    PrivacySummary,
    QuarantineStub,
    QuarantineSweep,
    Record,
    ReplayCheck,
    RollbackDecision,
    RoundPlan,
    RoundReport,
    RoundWeights,
    RoundWeightsSummary,
    ShardKeys,
    ShardRecorded,
    ShardResult,
    ShardVerdicts,
    ShardWeights,
    UnrecordedVerdicts,
    Verdict,
)
from fedlib.server.rounds import (
    DpRound,
    RoundInputs,
    aggregate_objects,
    build_candidate,
    open_and_validate,
    summed_delta,
    unclipped_counts,
)
from fedlib.server.state_keys import RunKeys
from fedlib.server.strategy import aggregator_from_bytes, new_aggregator
from fedlib.storage.store import (
    WHOLE_LISTING,
    ListingSpan,
    NoSuchKey,
    ObjectInfo,
    ObjectStore,
    ObjectTooLarge,
)
from fedlib.trust.package import PACKAGE_FILES
from fedlib.wire import protocol
from fedlib.wire.protocol import PackageMetadata

if TYPE_CHECKING:
    from fedlib.models.evaluation import Metrics as ScoredMetrics
    from fedlib.server.registry import ModelRegistry

#: S3 requests one shard keeps in flight (inbox GETs ahead of the verifier; archive
#: writes). Enough to hide a local S3's latency behind the verifier's CPU; each GET in
#: flight holds at most one envelope, so a shard holds this many beyond its judged ones.
SHARD_IO_CONCURRENCY = 8

R = TypeVar("R", bound=Record)


def put_record(deployment: Deployment, key: str, record: Record) -> None:
    deployment.state.put(key, record.to_json())


def get_record(deployment: Deployment, key: str, kind: type[R]) -> R:
    return kind.from_json(deployment.state.get(key), what=key)


def find_record(deployment: Deployment, key: str, kind: type[R]) -> R | None:
    """The record at ``key``, or None when there is none (a step that did not run)."""
    try:
        return get_record(deployment, key, kind)
    except NoSuchKey:
        return None


# -- plan ---------------------------------------------------------------------------------


def plan_keys(deployment: Deployment, plan: RoundPlan) -> Iterator[str]:
    """Every key of a plan, shard by shard."""
    for index in range(plan.shard_count):
        yield from load_shard(deployment, plan, index).keys


_PACK_MAGIC = b"FLAR\x01"


def pack_envelopes(entries: list[tuple[str, bytes]]) -> bytes:
    """``(key, envelope)`` pairs in one object: count, then per entry the key, the
    envelope's SHA-256 and length, and the envelope (big-endian lengths)."""
    parts = [_PACK_MAGIC, struct.pack(">I", len(entries))]
    for key, blob in entries:
        raw = key.encode()
        parts += [struct.pack(">H", len(raw)), raw, hashlib.sha256(blob).digest()]
        parts += [struct.pack(">I", len(blob)), blob]
    return b"".join(parts)


def unpack_envelopes(data: bytes) -> dict[str, bytes]:
    """The inverse of :func:`pack_envelopes`; refuses a pack that is cut, padded or whose
    envelope does not match its recorded digest."""
    view = memoryview(data)
    if not data.startswith(_PACK_MAGIC) or len(data) < len(_PACK_MAGIC) + 4:
        raise ValueError("not an archive pack")
    pos = len(_PACK_MAGIC)
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    out: dict[str, bytes] = {}
    for _ in range(count):
        if pos + 2 > len(data):
            raise ValueError("archive pack is cut short")
        (key_len,) = struct.unpack_from(">H", data, pos)
        end = pos + 2 + key_len + 32 + 4
        if end > len(data):
            raise ValueError("archive pack is cut short")
        key = bytes(view[pos + 2 : pos + 2 + key_len]).decode()
        digest = bytes(view[pos + 2 + key_len : end - 4])
        (size,) = struct.unpack_from(">I", data, end - 4)
        if end + size > len(data):
            raise ValueError("archive pack is cut short")
        blob = bytes(view[end : end + size])
        if hashlib.sha256(blob).digest() != digest:
            raise ValueError(f"archived bytes of {key} do not match their digest")
        out[key] = blob
        pos = end + size
    if pos != len(data):
        raise ValueError("archive pack has trailing bytes")
    return out


def archived_envelope(deployment: Deployment, run_id: str, key: str) -> bytes:
    """The bytes run ``run_id`` accepted under ``key`` (tests, audits)."""
    plan = load_plan(deployment, run_id)
    for index in range(plan.shard_count):
        if key in load_shard(deployment, plan, index).keys:
            return unpack_envelopes(deployment.state.get(RunKeys(plan.run_id).archive(index)))[key]
    raise NoSuchKey(key, f"not in the plan of {run_id}")


def load_shard(deployment: Deployment, plan: RoundPlan, index: int) -> ShardKeys:
    return get_record(deployment, RunKeys(plan.shard_run).shard_keys(index), ShardKeys)


def arrival_ms(info: ObjectInfo) -> int:
    """When an update belongs to a round: when the store received it (the server's
    clock). Never the time inside the device-chosen UUIDv7: a back-dated id must not
    join an interval that is already past."""
    return info.last_modified_ms


INBOX = "updates/"


@dataclasses.dataclass
class _Group:
    """One device's objects listed for a round (``client_id`` None: the junk group of
    keys outside ``updates/<client>/``), each with whether its name is well-formed."""

    client_id: str | None
    entries: list[tuple[ObjectInfo, bool]]  # (info, well-formed name)
    capped: bool = False
    taken: int = 0

    def well_formed(self, count: int | None = None) -> int:
        chosen = self.entries if count is None else self.entries[:count]
        return sum(ok for _, ok in chosen)


def _device_of(prefix: str) -> str | None:
    """The client id of an inbox "directory" ``updates/<segment>/``, None if the segment
    is not a client id (its keys can never be well-formed updates)."""
    segment = prefix[len(INBOX) : -1]
    try:
        protocol.inbox_key(segment, "x")
    except ValueError:
        return None
    return segment


def _well_formed(key: str) -> bool:
    try:
        protocol.parse_inbox_key(key)
    except RejectedUpdate:
        return False
    return True


def inbox_groups(
    deployment: Deployment,
    cap: int,
    *,
    junk_limit: int | None = None,
    interval_end_ms: int | None = None,
) -> Iterator[_Group]:
    """The inbox by device, each group listed up to ``cap`` objects (one more to know
    it was capped), so a device with 100k objects costs one bounded listing a round.
    Keys directly under ``updates/`` or under a segment that is not a client id form one
    junk group, listed up to ``junk_limit`` (default ``cap``): it may take what the
    devices leave of the batch. Objects received after ``interval_end_ms`` are marked
    late. No object is looked up in the ledger here (that is one request per object, in
    the one task no worker count shortens): the shard that opens an object checks its
    verdict (:func:`process_shard`).

    The devices come from one delimited listing (cheap: it does not descend into them);
    their keys from flat listings of :data:`LISTING_CHUNK` devices each, side by side
    (:func:`chunk_listing`), so the plan's listing time does not grow with the inbox on
    the store's cores. A device a chunk's listing did not cover whole is listed on its
    own. Groups are yielded in the store's listing order (the junk group first)."""
    level = deployment.inbox.list_level(INBOX)
    junk_limit = cap if junk_limit is None else junk_limit

    def group_of(client: str | None, listed: list[ObjectInfo], limit: int) -> _Group:
        capped = len(listed) > limit
        entries = []
        for info in listed[:limit]:
            if interval_end_ms is not None and arrival_ms(info) > interval_end_ms:
                entries.append((info, False))  # late: dropped by the plan
                continue
            entries.append((info, client is not None and _well_formed(info.key)))
        return _Group(client, entries, capped=capped)

    junk: list[ObjectInfo] = list(level.objects[: junk_limit + 1])
    clients: dict[str, str] = {}  # device prefix -> client id
    for prefix in level.prefixes:
        client = _device_of(prefix)
        if client is not None:
            clients[prefix] = client
        elif len(junk) <= junk_limit:
            junk += deployment.inbox.list(prefix, limit=junk_limit + 1 - len(junk))
    if junk:
        yield group_of(None, junk, junk_limit)

    chunks = ListingChunks.of(level.prefixes)

    def list_chunk(number: int) -> tuple[list[str], dict[str, list[ObjectInfo]]]:
        """A chunk's devices in the store's order (those it did not cover last) and the
        objects of those it covered."""
        flat, whole = chunk_listing(deployment.inbox, chunks, number, cap + 1)
        wanted = [prefix for prefix in chunks.chunks[number] if prefix in clients]
        listed = listed_devices(flat, wanted, cap + 1, whole=whole)
        return [*listed, *(p for p in wanted if p not in listed)], listed

    def own_listing(prefix: str) -> list[ObjectInfo]:
        return list(deployment.inbox.list(prefix, limit=cap + 1))

    with ThreadPoolExecutor(SHARD_IO_CONCURRENCY, thread_name_prefix="plan") as pool:
        order: list[str] = []
        known: dict[str, list[ObjectInfo]] = {}
        for chunk_order, chunk_known in pool.map(list_chunk, range(len(chunks.chunks))):
            order += chunk_order
            known.update(chunk_known)
        # only the devices no chunk covered go to the pool one by one (a task per device
        # costs more than the device's grouping: 0.6 s at 10,000 devices)
        unlisted = [prefix for prefix in order if prefix not in known]
        listings = pool.map(own_listing, unlisted)
        for prefix in order:
            listed = known[prefix] if prefix in known else next(listings)
            group = group_of(clients[prefix], listed[: cap + 1], cap)
            if group.entries:
                yield group


#: Devices (level-one prefixes of the inbox) one flat listing of the plan covers: with a
#: key a device, a page (1,000 keys) holds the chunk and the next chunk's first keys, so a
#: chunk is one request (on SeaweedFS, continuing a listing from a key inside a device
#: costs as much as a page: 0.08 s).
LISTING_CHUNK = 900
#: Keys one chunk's listing reads at most (then a page more): past that, the devices it
#: did not cover are listed one by one.
CHUNK_KEY_LIMIT = 10_000
#: Appended to a prefix ending in ``/``: a listing that starts after it starts past every
#: key of that prefix (no valid UTF-8 key continues the prefix with a higher character).
PAST_PREFIX = "\U0010ffff"


@dataclasses.dataclass(frozen=True)
class ListingChunks:
    """The inbox's level-one prefixes cut into runs of about :data:`LISTING_CHUNK`, each
    listed on its own, from past the previous run's last prefix.

    Stores list in two orders: bytes (AWS, MinIO, a directory: ``a-b/`` before ``a/``)
    and SeaweedFS's directory walk (``a/`` before ``a-b/``), whose StartAfter also drops
    keys below it in bytes. They disagree only on a name and its *stem*, the name
    followed by a character below ``/``. A cut is made only before a prefix with no stem
    in the level, so every chunk holds the same prefixes in either order and starts past
    the previous one in both; a listing skips past a prefix only if it is no one's stem.
    """

    chunks: list[list[str]]
    chunk_of: dict[str, int]
    stems: frozenset[str]

    @classmethod
    def of(cls, prefixes: list[str], size: int | None = None) -> ListingChunks:
        """Cut in name order, where a stem comes right before the names it is the stem of
        (``a``, ``a-b``, ``a-b.c``, ``a.x``, then ``a0``): a cut before a prefix with no
        stem in the level separates no name from its stem."""
        size = LISTING_CHUNK if size is None else size
        names = set(prefixes)
        stems: set[str] = set()
        chunks: list[list[str]] = []
        for prefix in sorted(names, key=lambda p: p[:-1]):
            mine = {
                prefix[:i] + "/"
                for i in range(len(INBOX) + 1, len(prefix) - 1)
                if prefix[i] < "/" and prefix[:i] + "/" in names
            }
            stems |= mine
            if not chunks or (len(chunks[-1]) >= size and not mine):
                chunks.append([])
            chunks[-1].append(prefix)
        chunk_of = {prefix: n for n, chunk in enumerate(chunks) for prefix in chunk}
        return cls(chunks, chunk_of, frozenset(stems))

    def start_after(self, number: int) -> str | None:
        """Where chunk ``number``'s listing starts: past the previous chunk's last prefix
        in bytes (the walk may still meet earlier chunks' keys: they are skipped)."""
        return None if number == 0 else max(self.chunks[number - 1]) + PAST_PREFIX


def chunk_listing(
    store: ObjectStore, chunks: ListingChunks, number: int, per_prefix: int
) -> tuple[list[ObjectInfo], bool]:
    """Chunk ``number``'s keys, at most ``per_prefix`` of each prefix, from a flat
    listing of the inbox that starts at the chunk and stops past it; whether it covered
    the chunk whole (False: it stopped at :data:`CHUNK_KEY_LIMIT`).

    Keys directly under the inbox (the junk group's), of other chunks, and under
    prefixes the level did not have (they arrived since) are not the chunk's. A prefix
    with more keys than ``per_prefix`` is left by starting the listing again past it,
    so a device flooding the inbox costs a page, not its keys. A page asks for as many
    keys as the chunk has prefixes not yet met, plus ``per_prefix`` (the one it is in
    may have that many more) and one, so a chunk of one key a device is one request
    that reads at most ``per_prefix + 1`` keys of the next chunk."""
    flat: list[ObjectInfo] = []
    taken = Counter[str]()
    read, after = 0, chunks.start_after(number)
    while read <= CHUNK_KEY_LIMIT:
        page = min(1_000, len(chunks.chunks[number]) - len(taken) + per_prefix + 1)
        listed = 0
        for info in store.list(INBOX, start_after=after, limit=page):
            listed, read, after = listed + 1, read + 1, info.key
            head, sep, _ = info.key[len(INBOX) :].partition("/")
            prefix = f"{INBOX}{head}/"
            chunk = chunks.chunk_of.get(prefix) if sep else None
            if chunk is None or chunk < number:
                continue
            if chunk > number:
                return flat, True
            if taken[prefix] < per_prefix:
                taken[prefix] += 1
                flat.append(info)
            elif prefix not in chunks.stems:
                after = prefix + PAST_PREFIX
                break
        else:
            if listed < page:
                return flat, True  # the end of the inbox
    return flat, False


def listed_devices(
    flat: list[ObjectInfo], prefixes: list[str], per_device: int, *, whole: bool
) -> dict[str, list[ObjectInfo]]:
    """Each device prefix's objects (up to ``per_device``) from one flat listing of
    part of the inbox (:func:`chunk_listing`), for the devices it covers whole; the
    others need a listing of their own.

    Why: with one pending update per device, a listing per device is one request per
    device; the flat listing reads up to 1,000 keys a request. A device's keys are
    contiguous in any listing order (they share a prefix), so every device the listing
    has passed is complete; only the one it stopped in may not be. ``whole``: the
    listing reached the end of its part (then a device not in it has nothing)."""
    wanted = set(prefixes)
    found: dict[str, list[ObjectInfo]] = {}
    last: str | None = None
    for info in flat:
        head, sep, _ = info.key[len(INBOX) :].partition("/")
        prefix = f"{INBOX}{head}/" if sep else None
        last = prefix
        if prefix in wanted:
            entries = found.setdefault(prefix, [])
            if len(entries) < per_device:
                entries.append(info)
    if not whole and last is not None:
        found.pop(last, None)  # the listing stopped inside it: list it on its own
    elif whole:  # a device not seen has nothing
        for prefix in wanted - found.keys():
            found[prefix] = []
    return found


def plan_round(
    deployment: Deployment,
    run_id: str,
    *,
    min_clients: int | None = None,
    max_updates: int | None = None,
    shard_size: int | None = None,
    created_at_ms: int | None = None,
    interval_key: str | None = None,
    interval_end_ms: int | None = None,
    step_aside: str | None = None,
) -> RoundPlan:
    """Pick the batch fairly and split it into shards of whole devices; save the plan.

    Devices are walked round-robin, each getting at most ``max_objects_per_device``
    objects (the junk group too), the total bounded by ``max_updates``/``max_batch``:
    one device's junk cannot crowd out the others. ``min_clients`` counts devices with a
    planned object whose name is a well-formed update key; what the object holds (a
    valid update, garbage, a replay of a judged key) is found by its shard, so a device
    counts once either way, like a device that uploads garbage. A waiting round still
    plans (and so judges and clears) the malformed names; well-formed updates stay in
    the inbox. The plan's cost is the inbox listing (1,000 keys a request), no request
    per object. A run for a data interval takes what the store received by the
    interval's end. If that interval was already processed, the plan is the original one
    (a *replay*): the round is recomputed from the archived inputs and compared, and
    nothing is published. A run that steps aside (``step_aside``: why) lists nothing and
    takes nothing: a waiting round that leaves the whole inbox to the runs before it.
    """
    if interval_key is not None:
        record = interval_record(deployment, interval_key)
        if record is not None:
            original = load_plan(deployment, record.run_id)
            plan = original.model_copy(
                update={
                    "run_id": run_id,
                    "replay_of": record.run_id,
                    "candidate_version": record.candidate_version,
                    "message": f"replay of {record.run_id} (interval {interval_key})",
                }
            )
            put_record(deployment, RunKeys(run_id).plan, plan)
            return plan
    settings = deployment.settings
    limit = max_updates or settings.max_batch
    size = shard_size or settings.shard_size
    registry = deployment.registry()
    base_version = registry.active_version()
    if base_version is None:
        raise NoSuchKey("channel/active.json", "no model published: run fl-admin init")
    registry.integrity()  # logs what the signed channel does not name; reads ignore it
    deferred = Counter[str]()
    groups: list[_Group] = []
    cap = settings.max_objects_per_device
    listed: Iterable[_Group] = ()
    if step_aside is None:
        listed = inbox_groups(deployment, cap, junk_limit=limit, interval_end_ms=interval_end_ms)
    for group in listed:
        if interval_end_ms is not None:  # received after the interval: the next one's
            late = [e for e in group.entries if arrival_ms(e[0]) > interval_end_ms]
            deferred["after_interval"] += len(late)
            group.entries = [e for e in group.entries if arrival_ms(e[0]) <= interval_end_ms]
        groups.append(group)
    # Round-robin: one object per group per pass, at most ``cap`` each, until the batch
    # is full. When the batch is smaller than the number of devices, the walk starts at
    # a place that moves with the run id (a retry plans the same), so no device always
    # comes last. What the devices leave of the batch goes to the junk group: judging
    # junk takes no one's vote, and a flood is cleared in batches, not 16 at a time.
    start = int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % max(len(groups), 1)
    walk = groups[start:] + groups[:start]
    budget = limit
    while budget > 0:
        progressed = False
        for group in walk:
            if budget > 0 and group.taken < min(len(group.entries), cap):
                group.taken, budget, progressed = group.taken + 1, budget - 1, True
        if not progressed:
            break
    for group in groups:
        if group.client_id is None:
            extra = min(budget, len(group.entries) - group.taken)
            group.taken, budget = group.taken + extra, budget - extra
    deferred["max_batch"] += sum(len(g.entries) - g.taken for g in groups)
    fresh_clients = sum(1 for g in groups if g.client_id is not None and g.well_formed(g.taken))
    need = min_clients if min_clients is not None else settings.min_clients
    waiting = step_aside is not None or fresh_clients < need

    # groups come in the store's listing order, so shards do too
    shards: list[list[ObjectInfo]] = [[]]
    #: per shard, the last well-formed key it takes, in listing order (None: none)
    last_device_key: list[str | None] = [None]
    updates = 0
    for group in groups:  # whole groups per shard: a device's keys are contiguous
        chosen = group.entries[: group.taken]
        if waiting:  # only what is judged without a round: malformed names
            deferred["waiting"] += group.well_formed(group.taken)
            chosen = [e for e in chosen if not e[1]]
        if shards[-1] and len(shards[-1]) + len(chosen) > size:
            shards.append([])
            last_device_key.append(None)
        shards[-1].extend(info for info, _ in chosen)
        updates += len(chosen)
        # a range ends at a well-formed key: a malformed one may be what the listing
        # made of a name it cannot address, which does not exist under that name
        ends = [info.key for info, well_formed in chosen if well_formed]
        if ends:
            last_device_key[-1] = ends[-1]
    if not shards[-1]:
        shards.pop()
    ranges = search_ranges(last_device_key[: len(shards)])
    with ThreadPoolExecutor(SHARD_IO_CONCURRENCY, thread_name_prefix="plan") as pool:
        written = [
            pool.submit(
                put_record,
                deployment,
                RunKeys(run_id).shard_keys(index),
                ShardKeys(
                    keys=[i.key for i in shard],
                    received_ms=[i.last_modified_ms for i in shard],
                    search_range=ranges[index],
                ),
            )
            for index, shard in enumerate(shards)
        ]
        for future in written:
            future.result()
    shard_count = len(shards)
    capped = sum(g.capped for g in groups)
    capped_devices = sorted(g.client_id for g in groups if g.capped and g.client_id is not None)
    if step_aside:
        message = f"waiting: {step_aside}"
    elif waiting:
        message = f"waiting: {fresh_clients} of {need} clients"
        if updates:
            message += f"; judging {updates} malformed or replayed objects"
    else:
        message = f"{updates} updates from {fresh_clients} clients in {shard_count} shards"
    if capped:
        message += f"; {capped} devices over the per-device cap"
    plan = RoundPlan(
        run_id=run_id,
        base_version=base_version,
        shard_count=shard_count,
        updates=updates,
        client_count=fresh_clients,
        waiting=waiting,
        message=message,
        created_at_ms=created_at_ms if created_at_ms is not None else int(time.time() * 1000),
        interval_key=interval_key,
        interval_end_ms=interval_end_ms,
        holdout_version=deployment.holdout_version(),
        deferred={k: v for k, v in sorted(deferred.items()) if v} or None,
        capped_groups=capped or None,
        capped_devices=capped_devices[:CAPPED_DEVICES_LISTED] or None,
        shards_search_names=any(r is not None for r in ranges),
    )
    put_record(deployment, RunKeys(run_id).plan, plan)
    return plan


def search_ranges(last_keys: list[str | None]) -> list[InboxRange | None]:
    """Cut the inbox, in listing order, into one range per shard that took device keys
    (``last_keys``: each shard's last such key, in listing order, shard after shard),
    for the shards' search for names the data path cannot address: each range ends at
    its own shard's last key (the shard searches before it deletes anything), the last
    one runs to the inbox's end, and together they cover it once."""
    cuts = [(index, key) for index, key in enumerate(last_keys) if key is not None]
    ranges: list[InboxRange | None] = [None] * len(last_keys)
    after = None
    for number, (index, key) in enumerate(cuts):
        ranges[index] = InboxRange(after=after, through=None if number == len(cuts) - 1 else key)
        after = key
    return ranges


def interval_record(deployment: Deployment, interval_key: str) -> IntervalRecord | None:
    """What the round of a data interval produced, once it finished (None: not yet)."""
    return find_record(deployment, state_keys.interval(interval_key), IntervalRecord)


def load_plan(deployment: Deployment, run_id: str) -> RoundPlan:
    return get_record(deployment, RunKeys(run_id).plan, RoundPlan)


# -- shards -------------------------------------------------------------------------------


def aggregation_of(deployment: Deployment, base: ModelPackage) -> AggregationConfig:
    """The aggregation config of rounds on ``base`` (all that reduce and build need).

    With DP, the round's clip norm C comes from ``base`` (adaptive clipping moves it
    from version to version): central mode projects every update onto it; local mode
    widens the hard norm bound to admit a clipped delta plus the device's noise.
    """
    config = deployment.settings.aggregation(base.metadata.model_kind, base.metadata.model_spec)
    if config.dp_mode == "off":
        return config
    clip = round_clip_norm(deployment, base)
    if config.dp_mode == "central":
        return dataclasses.replace(config, dp_clip=clip)
    bound = deployment.settings.privacy().local_norm_bound(clip, base.metadata.num_params)
    return dataclasses.replace(config, norm_bound=max(config.norm_bound, bound))


def round_clip_norm(deployment: Deployment, base: ModelPackage) -> float:
    """C of rounds on ``base``: the clip norm its package told devices, or the configured
    initial one when ``base`` predates DP (its devices clipped at the wider norm bound;
    the server's projection still enforces C)."""
    training = base.metadata.training
    if training.dp is not None:
        return training.clip_norm
    return deployment.settings.privacy().clip_norm


def other_features(
    registry: ModelRegistry, base: ModelPackage, known: frozenset[int], max_staleness: int
) -> frozenset[int]:
    """The versions an update may name as its base without being too stale whose
    features are not ``base``'s (one signed ``metadata.json`` read each): a template
    vocabulary published between them. Published versions never change, so a retried
    or replayed shard gets the same set."""
    window = [v for v in known if base.version - max_staleness <= v < base.version]
    if not window:
        return frozenset()
    targets = registry.channel.targets()
    return frozenset(
        v for v in window if not same_features(registry.read_metadata(v, targets), base.metadata)
    )


def round_inputs(
    deployment: Deployment, base: ModelPackage, holdout_version: int | None = None
) -> RoundInputs:
    """Validation inputs of a round; with FLTrust, the reference delta trained on the
    benign rows of the round's holdout's calibration part (the clean data the server
    already holds; the evaluation part stays unseen by anything that fits)."""
    aggregation = aggregation_of(deployment, base)
    reference = None
    if aggregation.robust == "fltrust":
        benign = deployment.holdout_parts(holdout_version).calibration.benign()
        reference = robust.reference_delta(base, benign)
    registry = deployment.registry()
    known = frozenset(registry.versions())
    return RoundInputs(
        reference=reference,
        fleet=deployment.load_fleet(),
        server_keys=deployment.server_keyring(),
        base=base,
        known_versions=known,
        other_features=other_features(registry, base, known, aggregation.max_staleness),
        aggregation=aggregation,
        accepted_suites=frozenset(
            sealing.SUITES[name] for name in deployment.settings.accepted_hpke_suites
        ),
    )


def process_shard(deployment: Deployment, run_id: str, index: int) -> ShardResult:
    """Open, verify, validate and sum one shard; write its partial sum, then its verdicts.

    Each object's ledger entry is looked up here, beside its GET (the plan makes no
    request per object): a key judged before (a re-upload under a judged name, or an
    object a crashed run judged but did not delete) gets a ``replay`` or
    ``duplicate_update_id`` verdict and is never counted again."""
    plan = load_plan(deployment, run_id)
    shard = load_shard(deployment, plan, index)
    keys, replays = shard.keys, set(shard.replays)
    base = deployment.registry().read_version(plan.base_version)
    inputs = round_inputs(deployment, base, plan.holdout_version)

    refused: list[Verdict] = []
    ledger = Ledger(deployment.state)
    judged: dict[str, tuple[bytes, str]] = {}  # this shard's bytes and ETags (bounded)
    # A replay only recomputes; a fresh run keeps each judged object's bytes as soon as
    # its verdict is made, on threads, while the next objects are being opened.
    keeper = None if plan.replay_of else JudgedBytesKeeper(deployment, ledger)

    def refuse(verdict: Verdict, blob: bytes | None) -> None:
        refused.append(verdict)
        if keeper is not None:
            keeper.keep(verdict, blob)

    if plan.replay_of:  # recompute from the archived bytes the original run accepted
        original = RunKeys(plan.replay_of)  # the replayed plan is the original's: same keys
        judged_then = get_record(deployment, original.shard_verdicts(index), ShardVerdicts)
        accepted = {v.key: v.sha256 for v in judged_then.verdicts if v.accepted}
        pack = unpack_envelopes(deployment.state.get(original.archive(index))) if accepted else {}

        def fetch(key: str) -> tuple[bytes, str]:
            if key not in accepted or key in replays or key not in pack:
                raise NoSuchKey(key, "not accepted in the original run")
            return pack[key], accepted[key]
    else:
        fallback = ledger.fallback_digests()  # judged, but under the digest of their name

        def fetch(key: str) -> tuple[bytes, str]:
            if ledger.has_verdict(key, fallback):  # one HEAD; the entry is read only then
                first = ledger.read(key)
                if first is None or first.run_id != run_id:  # not this run's own, retried
                    replays.add(key)  # set.add under the GIL, before objects() reads it
            return deployment.inbox.get_with_etag(key, max_bytes=inputs.max_envelope_bytes)

    def objects() -> Generator[tuple[str, bytes]]:
        for key, fetched in prefetched(keys, fetch, SHARD_IO_CONCURRENCY):
            if isinstance(fetched, NoSuchKey):
                continue  # deleted by an operator since the plan
            if isinstance(fetched, ObjectTooLarge):
                verdict = Verdict(
                    key=key,
                    sha256="",
                    size=fetched.size,
                    accepted=False,
                    reason="oversized",
                    detail=str(fetched),
                    etag=fetched.etag,
                )
                refuse(verdict, None)
                continue
            if isinstance(fetched, BaseException):
                raise fetched
            blob, etag = fetched
            judged[key] = (blob, etag)
            if key in replays:
                first = ledger.read(key)
                first_run = first.run_id if first else None
                digest = hashlib.sha256(blob).hexdigest()
                if first is not None and first.sha256 == digest:
                    reason = "replay"
                    detail = f"already processed in {first_run}"
                else:
                    reason = "duplicate_update_id"
                    detail = f"other bytes under an update id processed in {first_run}"
                verdict = Verdict(
                    key=key,
                    sha256=digest,
                    size=len(blob),
                    accepted=False,
                    reason=reason,
                    detail=detail,
                )
                refuse(verdict, blob)
                continue
            yield key, blob

    def keep_judged(keeper: JudgedBytesKeeper, verdict: Verdict) -> None:
        keeper.keep(verdict, judged[verdict.key][0])

    stream = objects()
    try:
        agg, verdicts = aggregate_objects(
            stream,
            inputs,
            received_ms=dict(zip(keys, shard.received_ms, strict=True))
            if shard.received_ms is not None
            else None,
            on_verdict=None if keeper is None else functools.partial(keep_judged, keeper),
        )
        if keeper is not None:
            keeper.wait()  # every judged object kept before the shard's results exist
    finally:
        stream.close()  # stops the GETs still in flight if the shard failed
        if keeper is not None:
            keeper.close()
    verdicts = sorted(
        (
            v if v.etag else v.model_copy(update={"etag": judged.get(v.key, (b"", None))[1]})
            for v in [*verdicts, *refused]
        ),
        key=lambda v: v.key,
    )
    run_keys = RunKeys(run_id)
    if keeper is not None:  # the accepted bytes, for backfill replays: before the verdicts
        accepted_bytes = [(v.key, judged[v.key][0]) for v in verdicts if v.accepted]
        if accepted_bytes:
            deployment.state.put(run_keys.archive(index), pack_envelopes(accepted_bytes))
    partial = agg.to_bytes()
    deployment.state.put(run_keys.shard_partial(index), partial)
    put_record(deployment, run_keys.shard_weights(index), weights_of(verdicts, plan.base_version))
    failpoint(failpoints.SHARD_AFTER_PARTIAL)  # fault tests: a worker killed right here
    put_record(deployment, run_keys.shard_verdicts(index), ShardVerdicts(verdicts=verdicts))
    rejected = Counter(v.reason or "unknown" for v in verdicts if not v.accepted)
    return ShardResult(
        index=index,
        partial_key=run_keys.shard_partial(index),
        partial_digest=hashlib.sha256(partial).hexdigest(),
        accepted=sum(v.accepted for v in verdicts),
        rejected=dict(sorted(rejected.items())),
    )


def shard_verdicts(
    deployment: Deployment, run_id: str, plan: RoundPlan | None = None
) -> Iterator[list[Verdict]]:
    """A run's verdicts one shard at a time (memory bounded by the shard size)."""
    plan = plan or load_plan(deployment, run_id)
    keys = RunKeys(run_id)
    for index in range(plan.shard_count):
        yield get_record(deployment, keys.shard_verdicts(index), ShardVerdicts).verdicts


def load_verdicts(deployment: Deployment, run_id: str) -> list[Verdict]:
    """Every verdict of a run (tests, reports); rounds stream :func:`shard_verdicts`."""
    return [v for shard in shard_verdicts(deployment, run_id) for v in shard]


# -- reduce, candidate, evaluation ----------------------------------------------------------


def reduce_round(deployment: Deployment, run_id: str) -> AggregateResult:
    """Merge the shards' partial sums (exact integer addition: order does not matter),
    then give every accepted update its final weight (:func:`final_weights`: counts
    clipped to the round's cap, each device's share capped) and correct the sum.

    Only updates whose weight changes are re-read (from the shard's archive pack, the
    bytes the shard accepted) and re-derived with the shard's own :func:`summed_delta`;
    the correction is exact, so the aggregate is the one summing with the final weights
    would give, and a replay recomputes the same bytes."""
    plan = load_plan(deployment, run_id)
    keys = RunKeys(run_id)
    base = deployment.registry().read_version(plan.base_version)
    aggregation = aggregation_of(deployment, base)
    total = new_aggregator(base.metadata.num_params, aggregation)
    for index in range(plan.shard_count):
        data = deployment.state.get(keys.shard_partial(index))
        total.merge(aggregator_from_bytes(data, aggregation))

    # The weight policy's passes go over the shards' weight records (five numbers an
    # accepted update, read side by side), not over the verdicts.
    with ThreadPoolExecutor(SHARD_IO_CONCURRENCY, thread_name_prefix="reduce") as pool:
        weights = list(
            pool.map(functools.partial(shard_weights, deployment, plan), range(plan.shard_count))
        )
    policy = final_weights(lambda: itertools.chain.from_iterable(weights), aggregation)
    inputs: RoundInputs | None = None
    reweighted = 0
    with single_threaded_blas():
        for index, updates in enumerate(weights):
            todo = []  # this shard's updates whose weight changes (bounded by the shard)
            for update in updates:
                if (units := policy.units(update)) != update.units:
                    todo.append((update, units))
            if not todo:
                continue
            inputs = inputs or round_inputs(deployment, base, plan.holdout_version)
            pack = unpack_envelopes(deployment.state.get(RunKeys(plan.shard_run).archive(index)))
            for update, units in todo:
                opened = open_and_validate(update.key, pack[update.key], inputs)
                delta, _ = summed_delta(opened, inputs)
                total.reweight(delta, update.units, units)
            reweighted += len(todo)
    shares = [
        DeviceShare(
            client_id=d.client_id,
            accepted=d.accepted,
            weight_share=d.share,
            clipped=d.clipped,
            capped=d.capped,
        )
        for d in policy.devices
    ]
    put_record(
        deployment,
        keys.weights,
        RoundWeights(
            devices=shares,
            count_cap=policy.count_cap,
            max_device_share=aggregation.max_device_share,
            equal_weights=policy.equal_weights,
            reweighted=reweighted,
        ),
    )
    put_record(deployment, keys.weights_summary, RoundWeightsSummary.of(shares))
    blob = total.to_bytes()
    deployment.state.put(keys.aggregate, blob)
    return AggregateResult(count=total.count, digest=hashlib.sha256(blob).hexdigest())


def weights_of(verdicts: list[Verdict], base_version: int) -> ShardWeights:
    """A shard's :class:`ShardWeights`: its accepted verdicts as the weight policy's input."""
    updates = [_update_weight(v, base_version) for v in verdicts if v.accepted]
    return ShardWeights(
        keys=[u.key for u in updates],
        client_ids=[u.client_id for u in updates],
        num_samples=[u.num_samples for u in updates],
        staleness=[u.staleness for u in updates],
        units=[u.units for u in updates],
    )


def shard_weights(deployment: Deployment, plan: RoundPlan, index: int) -> list[UpdateWeight]:
    """Shard ``index``'s accepted updates as the weight policy sees them; from its
    verdicts if it wrote no weights record (a shard that ran before they existed)."""
    keys = RunKeys(plan.run_id)
    record = find_record(deployment, keys.shard_weights(index), ShardWeights)
    if record is None:
        verdicts = get_record(deployment, keys.shard_verdicts(index), ShardVerdicts).verdicts
        record = weights_of(verdicts, plan.base_version)
    columns = (record.keys, record.client_ids, record.num_samples, record.staleness, record.units)
    return [
        UpdateWeight(key=k, client_id=c, num_samples=n, staleness=s, units=u)
        for k, c, n, s, u in zip(*columns, strict=True)
    ]


def _update_weight(verdict: Verdict, base_version: int) -> UpdateWeight:
    """An accepted verdict as the weight policy's input (its fields are server facts,
    but for the self-reported count the policy clips)."""
    if (
        verdict.client_id is None
        or verdict.num_samples is None
        or verdict.base_version is None
        or not verdict.weight_units
    ):
        raise ValueError(f"accepted verdict of {verdict.key} lacks its weight fields")
    return UpdateWeight(
        key=verdict.key,
        client_id=verdict.client_id,
        num_samples=verdict.num_samples,
        staleness=base_version - verdict.base_version,
        units=verdict.weight_units,
    )


def load_round_weights(deployment: Deployment, run_id: str) -> RoundWeights | None:
    """The reduce step's per-device weights (None: the step did not run, or predates them)."""
    return find_record(deployment, RunKeys(run_id).weights, RoundWeights)


def load_weights_summary(deployment: Deployment, run_id: str) -> RoundWeightsSummary | None:
    """What the report says of the weights: the reduce step's summary (a run reduced
    before summaries existed: made from its full weights record)."""
    summary = find_record(deployment, RunKeys(run_id).weights_summary, RoundWeightsSummary)
    if summary is None and (weights := load_round_weights(deployment, run_id)) is not None:
        summary = RoundWeightsSummary.of(weights.devices)
    return summary


def weight_report_fields(summary: RoundWeightsSummary | None) -> dict[str, Any]:
    """The round report's device count, largest shares and the largest share (a
    bounded part of the weights: finalize reads no record per device)."""
    if summary is None:
        return {}
    largest = summary.top[0] if summary.top else None
    return {
        "devices": summary.top,
        "device_count": summary.device_count,
        "largest_weight_share": largest.weight_share if largest else None,
        "largest_share_client": largest.client_id if largest else None,
    }


def load_momentum(deployment: Deployment, version: int) -> np.ndarray | None:
    """The server optimizer's buffer that produced ``version`` (None for plain FedAvg)."""
    try:
        data = deployment.state.get(state_keys.optimizer(version))
    except NoSuchKey:
        return None
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def build_round_candidate(deployment: Deployment, run_id: str) -> CandidateResult | None:
    """Apply the aggregate to the base model; save the candidate files (not published).

    With DP on, :func:`round_privacy` first checks the budget and charges the round;
    the noise is added here, once, to the reduced aggregate (None: budget refused)."""
    plan = load_plan(deployment, run_id)
    registry = deployment.registry()
    base = registry.read_version(plan.base_version)
    keys = RunKeys(run_id)
    agg = aggregator_from_bytes(
        deployment.state.get(keys.aggregate), aggregation_of(deployment, base)
    )
    if agg.count == 0:
        return None
    version = plan.candidate_version or registry.next_version()
    dp, training = None, None
    if deployment.settings.dp_mode != "off":
        dp = round_privacy(deployment, plan, base, agg.count)
        if dp is None:
            return None  # the privacy budget refused the round: nothing was computed
        dp_training = deployment.settings.training(base.metadata.model_kind).dp
        training = base.metadata.training.model_copy(update={"dp": dp_training})
    elif base.metadata.training.dp is not None:  # DP switched off: devices stop too
        plain = deployment.settings.training(base.metadata.model_kind)
        training = base.metadata.training.model_copy(
            update={"dp": None, "clip_norm": plain.clip_norm}
        )
    candidate, momentum = build_candidate(
        base,
        agg,
        version=version,
        calibration_rows=deployment.holdout_parts(plan.holdout_version).calibration.benign(),
        threshold_quantile=deployment.settings.threshold_quantile,
        round_id=plan.replay_of or run_id,
        created_at_ms=plan.created_at_ms,
        momentum=load_momentum(deployment, base.version),
        training=training,
        dp=dp,
    )
    if dp is not None:
        recorded = get_record(deployment, keys.privacy, PrivacyRecord)
        next_clip = candidate.metadata.training.clip_norm
        put_record(
            deployment, keys.privacy, recorded.model_copy(update={"next_clip_norm": next_clip})
        )
    for name, data in candidate.files().items():
        deployment.state.put(keys.candidate(name), data)
    if momentum is not None:
        deployment.state.put(
            keys.candidate("momentum.bin"), np.ascontiguousarray(momentum, "<f8").tobytes()
        )
    return CandidateResult(version=version, digest=candidate.digest())


def spent_rounds(deployment: Deployment, *, exclude: str | None = None) -> privacy.Accountant:
    """Every DP round charged so far (one listing), less run ``exclude``, in an accountant.

    A round is charged when its noised aggregate is computed, published or not."""
    accountant = privacy.Accountant(deployment.settings.dp_accountant)
    skip = state_keys.safe_segment(exclude) if exclude else None
    for info in deployment.state.list(state_keys.PRIVACY_SPENT):
        charge = state_keys.parse_privacy_charge(info.key)
        if charge is None or charge[0] == skip:
            continue
        accountant.add(charge[1])
    return accountant


def round_privacy(
    deployment: Deployment, plan: RoundPlan, base: ModelPackage, count: int
) -> DpRound | None:
    """The DP side of building a candidate; None when the budget refuses the round.

    Order matters: the budget is checked first (a refused round computes no noised
    aggregate and charges nothing), then the round is charged, and only then is the
    noised candidate computed, so no release exists that the accountant does not know.
    A retried task rewrites the same charge (keyed by run id) and finds the same answer.
    A replay reuses the original run's decision, noise seed and spend: it recomputes
    the identical candidate (its digest is compared) and charges nothing new.
    """
    settings = deployment.settings
    config = settings.privacy()
    clip = round_clip_norm(deployment, base)
    multipliers = config.round_multipliers()
    record_key = RunKeys(plan.run_id).privacy
    round_id = plan.replay_of or plan.run_id
    original = (
        find_record(deployment, RunKeys(plan.replay_of).privacy, PrivacyRecord)
        if plan.replay_of
        else None
    )
    if original is not None:
        record = original.model_copy(update={"replay_of": plan.replay_of})
        put_record(deployment, record_key, record)
        if record.refused:
            return None
    else:
        before = spent_rounds(deployment, exclude=plan.run_id)
        after = before.copy()
        if not plan.replay_of:
            after.add(multipliers)
        spent = privacy.spend_summary(config, after, clip)
        budget = config.budget_epsilon
        record = PrivacyRecord(
            mode=config.mode,
            round_id=round_id,
            clip_norm=clip,
            multipliers=list(multipliers),
            count=count,
            spent=spent,
            epsilon_before=before.epsilon(config.delta),
        )
        if budget is not None and record.spent.epsilon > budget:
            reason = (
                f"privacy budget: this round would bring epsilon to "
                f"{record.spent.epsilon:.4g} (delta {config.delta:g}), over the budget of "
                f"{budget:g} (spent so far {record.epsilon_before:.4g} in "
                f"{before.rounds} rounds); nothing computed or published"
            )
            put_record(
                deployment,
                record_key,
                record.model_copy(update={"refused": True, "reason": reason}),
            )
            return None
        if not plan.replay_of:  # the charge, before any noised value exists
            put_record(
                deployment,
                state_keys.privacy_charge(plan.run_id, multipliers),
                PrivacyCharge(run_id=plan.run_id, multipliers=list(multipliers), mode=config.mode),
            )
        put_record(deployment, record_key, record)
    unclipped = (0, 0)
    if config.adaptive:
        ones = reported = 0
        for verdicts in shard_verdicts(deployment, plan.run_id, plan):
            o, r = unclipped_counts(verdicts)
            ones, reported = ones + o, reported + r
        unclipped = (ones, reported)
    secret = privacy.load_noise_secret(deployment.keys_dir)
    return DpRound(
        config=config,
        clip_norm=clip,
        unclipped=unclipped,
        rng=privacy.noise_rng(secret, round_id),
        spent=record.spent.model_dump(),
    )


def load_round_privacy(deployment: Deployment, run_id: str) -> PrivacyRecord | None:
    """What a run's DP step decided; None: DP was off (or the step did not run)."""
    return find_record(deployment, RunKeys(run_id).privacy, PrivacyRecord)


def load_candidate(deployment: Deployment, run_id: str) -> ModelPackage:
    keys = RunKeys(run_id)
    files = {name: deployment.state.get(keys.candidate(name)) for name in PACKAGE_FILES}
    metadata = PackageMetadata.from_json(files["metadata.json"])
    return ModelPackage(
        metadata=metadata,
        onnx_bytes=files["model.onnx"],
        weights=weights_from_bytes(files["weights.bin"], metadata.num_params),
    )


def evaluate(
    deployment: Deployment,
    package: ModelPackage,
    holdout: Holdout | None = None,
    *,
    interval: bool = False,
) -> ScoredMetrics:
    """``package`` scored on ``holdout`` (default: the current holdout's evaluation part)."""
    holdout = holdout or deployment.holdout_parts().evaluation
    from fedlib.models.evaluation import evaluate_onnx

    return evaluate_onnx(
        package.onnx_bytes, holdout.features, holdout.labels, holdout.classes, interval=interval
    )


#: Published versions whose per-class detection the gate compares a candidate with.
CLASS_REFERENCE_VERSIONS = 20


def recent_class_reference(
    deployment: Deployment, holdout: Holdout, base: ModelPackage, active: ScoredMetrics
) -> dict[str, float] | None:
    """The best per-class detection of the active model and the last
    :data:`CLASS_REFERENCE_VERSIONS` published versions on ``holdout`` (None: the
    holdout names no classes). A window, not the active model alone, so that a class
    eroded a little per round still meets the tolerance as a whole. Only versions that
    read ``base``'s features: one before a template vocabulary change cannot be scored
    on this holdout."""
    if holdout.classes is None:
        return None
    from fedlib.models.evaluation import class_reference

    registry = deployment.registry()
    targets = registry.channel.targets()
    recent = [active]
    for version in registry.versions()[-CLASS_REFERENCE_VERSIONS:]:
        package = registry.read_version(version, targets)
        if same_features(package.metadata, base.metadata):
            recent.append(evaluate(deployment, package, holdout))
    return class_reference(recent)


def _metrics(scored: ScoredMetrics, part: Literal["calibration", "evaluation"]) -> Metrics:
    return Metrics(
        **scored.as_dict(), class_detection=dict(scored.class_detection) or None, part=part
    )


def evaluate_round(deployment: Deployment, run_id: str) -> Evaluation:
    """Score candidate and active model on the round's holdout via ONNX; the gate's verdict.

    The gate compares them on the calibration part; the figures published (report,
    package metadata) are from the evaluation part, with the AUC's bootstrap interval."""
    plan = load_plan(deployment, run_id)
    parts = deployment.holdout_parts(plan.holdout_version)
    holdout = parts.calibration
    base_pkg = deployment.registry().read_version(plan.base_version)
    active = evaluate(deployment, base_pkg, holdout)
    published = evaluate(deployment, base_pkg, parts.evaluation, interval=True)
    original = interval_record(deployment, plan.interval_key or "") if plan.replay_of else None
    dp_record = load_round_privacy(deployment, run_id)
    candidate: Metrics | None = None
    calibration_candidate: Metrics | None = None
    replay: ReplayCheck | None = None
    try:
        candidate_pkg = load_candidate(deployment, run_id)
    except NoSuchKey:
        publish = False
        reason = (dp_record.reason if dp_record else None) or "no update passed validation"
        if plan.replay_of:
            matches = original is None or original.candidate_digest is None
            replay = ReplayCheck(of=plan.replay_of, matches=matches)
    else:
        scored = evaluate(deployment, candidate_pkg, holdout)
        from fedlib.models.evaluation import gate

        publish, reason = gate(
            scored,
            active,
            tolerance=deployment.settings.auc_tolerance,
            floor=deployment.settings.auc_floor,
            class_tolerance=deployment.settings.class_detection_tolerance,
            class_reference=recent_class_reference(deployment, holdout, base_pkg, active),
        )
        reason += f" (gate on the {holdout.labels.size} calibration rows)"
        calibration_candidate = _metrics(scored, "calibration")
        candidate = _metrics(
            evaluate(deployment, candidate_pkg, parts.evaluation, interval=True), "evaluation"
        )
        if plan.replay_of:
            digest = candidate_pkg.digest()
            original_digest = original.candidate_digest if original else None
            matches = digest == original_digest
            replay = ReplayCheck(
                of=plan.replay_of,
                matches=matches,
                candidate_digest=digest,
                original_digest=original_digest,
                published_version=original.published_version if original else None,
            )
            publish = False
            reason = (
                f"replay of {plan.replay_of}: recomputed candidate "
                + ("matches the original byte for byte" if matches else "DIFFERS")
                + "; nothing published"
            )
    evaluation = Evaluation(
        active=_metrics(published, "evaluation"),
        candidate=candidate,
        calibration_active=_metrics(active, "calibration"),
        calibration_candidate=calibration_candidate,
        holdout_version=holdout.version,
        publish=publish,
        reason=reason,
        privacy=dp_record,
        replay=replay,
    )
    put_record(deployment, RunKeys(run_id).evaluation, evaluation)
    return evaluation


def load_evaluation(deployment: Deployment, run_id: str) -> Evaluation | None:
    return find_record(deployment, RunKeys(run_id).evaluation, Evaluation)


# -- publish, finalize -----------------------------------------------------------------------


def publish_round(deployment: Deployment, run_id: str) -> int:
    """Publish the evaluated candidate (idempotent: a retry republishes identical bytes)."""
    keys = RunKeys(run_id)
    evaluation = get_record(deployment, keys.evaluation, Evaluation)
    if evaluation.candidate is None or not evaluation.publish:
        raise ValueError(f"run {run_id}: the gate did not pass a candidate; nothing to publish")
    candidate = load_candidate(deployment, run_id)
    final = ModelPackage(
        metadata=candidate.metadata.model_copy(update={"metrics": evaluation.candidate.scalars()}),
        onnx_bytes=candidate.onnx_bytes,
        weights=candidate.weights,
    )
    try:
        momentum = deployment.state.get(keys.candidate("momentum.bin"))
    except NoSuchKey:
        momentum = None
    if momentum is not None:
        deployment.state.put(state_keys.optimizer(final.version), momentum)
    deployment.registry(signing=True).publish(final)
    return final.version


def finalize_round(
    deployment: Deployment,
    run_id: str,
    *,
    decision: Decision,
    published_version: int | None = None,
    consume: bool = True,
) -> RoundReport:
    """The round report, from the shards' :class:`ShardRecorded` records (the mapped
    ``record_shard`` step wrote each shard's verdicts and deleted its inbox copies, so
    this round-wide step reads one small record per shard, never one per update), plus
    the bounded round-wide chores: the quarantine retention sweep, the interval record,
    and names the data path cannot address when no shard searched for them (a plan with
    no device keys, a replay: the shards search their ranges otherwise).

    ``decision`` comes from :func:`fedlib.server.pipeline.decide`; ``consume`` False (a
    dry run) writes the report only: no verdict, nothing deleted. A waiting round's plan
    holds only junk and replays: their verdicts are written and they leave the inbox. A
    shard without its record (a run planned before ``record_shard`` existed) is recorded
    here."""
    plan = load_plan(deployment, run_id)
    keys = RunKeys(run_id)
    evaluation = load_evaluation(deployment, run_id)
    fields: dict[str, Any] = {
        "run_id": run_id,
        "base_version": plan.base_version,
        "decision": decision,
        "message": plan.message,
        "published_version": published_version,
        "rollback": find_record(deployment, keys.rollback, RollbackDecision),
    }
    if evaluation is not None:
        fields.update(
            candidate_metrics=evaluation.candidate,
            active_metrics=evaluation.active,
            message=evaluation.reason,
            holdout_version=evaluation.holdout_version,
        )
    if plan.replay_of:
        replay = evaluation.replay if evaluation else None
        fields.update(
            replay=replay,
            candidate_digest=replay.candidate_digest if replay else None,
            active_metrics=None,
            candidate_metrics=None,
            holdout_version=None,
        )
        report = RoundReport(**fields)
    else:
        accepted, rejected = 0, Counter[str]()
        unrecorded = UnrecordedVerdicts()
        for index in range(plan.shard_count):
            recorded = shard_recorded(deployment, run_id, index, consume=consume)
            accepted += recorded.accepted
            rejected.update(recorded.rejected)
            unrecorded = _merge_summaries(unrecorded, recorded.unrecorded)
        candidate_version = None
        with contextlib.suppress(NoSuchKey):
            fields["aggregate_digest"] = hashlib.sha256(
                deployment.state.get(keys.aggregate)
            ).hexdigest()
            candidate = load_candidate(deployment, run_id)
            fields["candidate_digest"], candidate_version = candidate.digest(), candidate.version
        fields.update(weight_report_fields(load_weights_summary(deployment, run_id)))
        report = RoundReport(
            **fields,
            accepted=accepted,
            rejected=dict(sorted(rejected.items())),
            privacy=PrivacySummary.of(load_round_privacy(deployment, run_id)),
            deferred=plan.deferred,
            capped_devices=plan.capped_devices,
        )
        if consume:
            odd, failed = 0, list[tuple[Verdict, bool]]()
            if not plan.shards_search_names or plan.replay_of is not None:
                odd, failed = judge_unaddressable(deployment, run_id)  # the whole inbox
            unrecorded = _merge_unrecorded(unrecorded, failed)
            rejected_all = Counter(report.rejected)
            rejected_all["malformed_name"] += odd
            expired = expire_quarantine(deployment)
            report = report.model_copy(
                update={
                    "rejected": dict(sorted((+rejected_all).items())),
                    "unrecorded": unrecorded if unrecorded.count else None,
                    "quarantine_expired": expired,
                }
            )
            if plan.interval_key and not plan.waiting:  # a waiting interval is not done
                put_record(
                    deployment,
                    state_keys.interval(plan.interval_key),
                    IntervalRecord(
                        run_id=run_id,
                        decision=decision,
                        candidate_digest=report.candidate_digest,
                        candidate_version=candidate_version,
                        published_version=published_version,
                    ),
                )
    put_record(deployment, keys.report, report)
    return report


def record_shard(
    deployment: Deployment, run_id: str, index: int, *, consume: bool
) -> ShardRecorded:
    """One shard's share of finishing a round: judge the names the data path cannot
    address in its range of the inbox (:func:`judge_unaddressable`; counted as
    ``malformed_name``), write its verdicts to the ledger (once per object; every verdict
    of the shard before any of its objects is deleted), delete its judged inbox copies,
    then its :class:`ShardRecorded`. Idempotent: a retry finds the
    verdicts written (write-once) and the objects gone. ``consume`` False counts only."""
    verdicts = get_record(deployment, RunKeys(run_id).shard_verdicts(index), ShardVerdicts)
    judged = verdicts.verdicts
    unrecorded = UnrecordedVerdicts()
    odd_names = 0
    if consume:
        # first its range of the inbox, while its own last key (where the range ends)
        # is still there
        search = get_record(deployment, RunKeys(run_id).shard_keys(index), ShardKeys).search_range
        if search is not None:
            odd_names, odd_failed = judge_unaddressable(deployment, run_id, search)
            unrecorded = _merge_unrecorded(unrecorded, odd_failed)
        ledger = Ledger(deployment.state)
        with ThreadPoolExecutor(SHARD_IO_CONCURRENCY, thread_name_prefix="record") as pool:
            written, failed = record_verdicts(deployment, ledger, judged, run_id, pool)
            unrecorded = _merge_unrecorded(unrecorded, failed)
            delete_judged(deployment, written, pool=pool)
    rejected = Counter(v.reason for v in judged if not v.accepted and v.reason)
    rejected["malformed_name"] += odd_names
    recorded = ShardRecorded(
        index=index,
        consumed=consume,
        accepted=sum(v.accepted for v in judged),
        rejected=dict(sorted((+rejected).items())),
        unrecorded=unrecorded,
    )
    put_record(deployment, RunKeys(run_id).shard_recorded(index), recorded)
    return recorded


def shard_recorded(
    deployment: Deployment, run_id: str, index: int, *, consume: bool
) -> ShardRecorded:
    """The shard's record, or (none yet, or written with another ``consume``) made now."""
    found = find_record(deployment, RunKeys(run_id).shard_recorded(index), ShardRecorded)
    if found is not None and found.consumed == consume:
        return found
    return record_shard(deployment, run_id, index, consume=consume)


def _merge_summaries(a: UnrecordedVerdicts, b: UnrecordedVerdicts) -> UnrecordedVerdicts:
    return UnrecordedVerdicts(
        count=a.count + b.count,
        sample=[*a.sample, *b.sample][:UNRECORDED_SAMPLE],
        unrecordable=a.unrecordable + b.unrecordable,
    )


#: Key digests of unwritten verdicts a report lists (the count is exact).
UNRECORDED_SAMPLE = 20


def record_verdicts(
    deployment: Deployment,
    ledger: Ledger,
    verdicts: list[Verdict],
    run_id: str,
    pool: ThreadPoolExecutor,
) -> tuple[list[Verdict], list[tuple[Verdict, bool]]]:
    """Write a shard's verdicts; (written ones, failed ones with "got unrecordable").

    A verdict whose write fails with a store error does not stop the others: its object
    stays in the inbox, and its attempt count (a state key from the digest of its name)
    goes up. At ``verdict_write_attempts`` it gets an ``unrecordable`` verdict under a
    digest key instead, with a bounded stub in quarantine, and its object goes. An
    accepted verdict is in this round's sum already: it goes under the digest key at
    once (as accepted), so a later round does not add the update again."""
    settings = deployment.settings
    limit = settings.verdict_write_attempts
    stub_bytes = settings.quarantine_stub_bytes

    def write(verdict: Verdict) -> tuple[Verdict, bool] | None:
        try:
            ledger.record(verdict, run_id=run_id)
        except StoreError as exc:
            error = str(exc)[:500]
        else:
            return None
        try:
            if verdict.accepted:  # already in this round's sum: never aggregate it again
                ledger.record_fallback(verdict, run_id=run_id)
                return verdict, True
            if ledger.bump_attempts(verdict.key, error) < limit:
                return verdict, False
            digest = deployment.inbox.digest(
                verdict.key, prefix_bytes=stub_bytes, hash_max=settings.quarantine_hash_max_bytes
            )
            stub = QuarantineStub(
                key_sha256=state_keys.key_digest(verdict.key),
                sha256=digest.sha256 or None,
                size=digest.size,
                prefix_hex=digest.prefix.hex(),
                kept_because="unrecordable",
                etag=digest.etag,
            )
            detail = f"verdict {verdict.reason or 'accepted'} unwritten in {limit} rounds: {error}"
            ledger.record_unrecordable(verdict, run_id=run_id, detail=detail, stub=stub)
        except StoreError:
            return verdict, False  # stays in the inbox; the next round tries again
        return verdict, True

    outcomes = list(pool.map(write, verdicts))
    failed = [o for o in outcomes if o is not None]
    unwritten = {v.key for v, final in failed if not final}
    return [v for v in verdicts if v.key not in unwritten], failed


def _merge_unrecorded(
    summary: UnrecordedVerdicts, failed: list[tuple[Verdict, bool]]
) -> UnrecordedVerdicts:
    sample = [*summary.sample]
    for verdict, _ in failed:
        if len(sample) < UNRECORDED_SAMPLE:
            sample.append(state_keys.key_digest(verdict.key))
    return UnrecordedVerdicts(
        count=summary.count + len(failed),
        sample=sample,
        unrecordable=summary.unrecordable + sum(final for _, final in failed),
    )


#: Inbox objects with names the data path cannot address that one search judges (a
#: round's ``finalize``, or each shard in its range).
UNADDRESSABLE_PER_ROUND = 100
#: Keys a shard's search for such names reads at most (its range is about a shard of the
#: batch; what a flood of deferred keys hides waits for a later round).
SEARCH_KEYS_PER_RANGE = 10_000


def judge_unaddressable(
    deployment: Deployment, run_id: str, within: InboxRange | None = None
) -> tuple[int, list[tuple[Verdict, bool]]]:
    """Judge inbox objects whose names object_store cannot address (a control character,
    an empty segment, a trailing ``/``): the inbox listing skips them, so no plan holds
    them. Each gets a ``malformed_name`` verdict under the digest of its name, a stub in
    quarantine (streamed through the control plane), and is deleted; at most
    :data:`UNADDRESSABLE_PER_ROUND` per search, in the whole inbox or ``within`` a range
    (at most :data:`SEARCH_KEYS_PER_RANGE` keys read). A verdict already written (a
    retried task, ranges that met) counts once. Returns (judged, failed writes)."""
    ledger = Ledger(deployment.state)
    stub_bytes = deployment.settings.quarantine_stub_bytes
    judged, failed = 0, []
    span = (
        ListingSpan(within.after, within.through, SEARCH_KEYS_PER_RANGE)
        if within
        else WHOLE_LISTING
    )
    found = deployment.inbox.list_unaddressable(INBOX, limit=UNADDRESSABLE_PER_ROUND, span=span)
    for info in found:
        try:
            digest = deployment.inbox.digest_unaddressable(
                info.key,
                prefix_bytes=stub_bytes,
                hash_max=deployment.settings.quarantine_hash_max_bytes,
            )
        except StoreError:
            continue  # gone since the listing, or unreadable now: the next round looks again
        verdict = Verdict(
            key=info.key,
            sha256=digest.sha256,
            size=digest.size,
            accepted=False,
            reason="malformed_name",
            detail="object key cannot be addressed (control character, empty segment or "
            "trailing '/')",
            etag=digest.etag,
        )
        stub = QuarantineStub(
            key_sha256=state_keys.key_digest(info.key),
            sha256=digest.sha256 or None,
            size=digest.size,
            prefix_hex=digest.prefix.hex(),
            kept_because="unaddressable",
            etag=digest.etag,
        )
        try:
            ledger.keep_stub(verdict, stub)
            first = ledger.record(verdict, run_id=run_id)
        except StoreError:
            failed.append((verdict, False))  # stays; the next round tries again
            continue
        deployment.inbox.delete_unaddressable(info.key, etag=digest.etag)
        judged += first
    return judged, failed


def expire_quarantine(deployment: Deployment, *, now_ms: int | None = None) -> int:
    """Delete quarantine objects older than ``quarantine_retention_days`` (by the store's
    receipt time); the count deleted. Bounded per round: it scans at most
    ``quarantine_expire_per_round`` objects from where the last round stopped, so a
    large quarantine costs each round the same. Ledger entries stay: they are the
    exactly-once record."""
    settings = deployment.settings
    limit = settings.quarantine_expire_per_round
    if limit == 0:
        return 0
    now = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now - int(settings.quarantine_retention_days * 86_400_000)
    cursor = find_record(deployment, state_keys.QUARANTINE_SWEEP, QuarantineSweep)
    after = cursor.after if cursor else None
    scanned, doomed, last = 0, [], None
    for info in deployment.state.list(state_keys.QUARANTINE, start_after=after, limit=limit):
        scanned, last = scanned + 1, info.key
        if info.last_modified_ms and info.last_modified_ms < cutoff:
            doomed.append(info.key)
    for key in doomed:
        deployment.state.delete(key)
    # a short page means the end of the quarantine: start over next round
    put_record(
        deployment,
        state_keys.QUARANTINE_SWEEP,
        QuarantineSweep(after=last if scanned >= limit else None),
    )
    return len(doomed)


def load_report(deployment: Deployment, run_id: str) -> RoundReport | None:
    return find_record(deployment, RunKeys(run_id).report, RoundReport)


class JudgedBytesKeeper:
    """Keep exactly the bytes that were rejected, bounded: in quarantine whole while the
    device's quarantined bytes stay under ``quarantine_quota_bytes``, else (and for
    oversized objects, never read whole: streamed from the inbox) as a stub with the
    first bytes, the full SHA-256 and the size; accepted ones go into the shard's
    archive pack. Content-addressed and write-once, so a retry rewrites nothing and a
    client overwriting its object changes nothing, and the writes may run in any order:
    up to ``width`` at a time on threads, started as verdicts come in. :meth:`wait`
    returns once every write is done and raises the first failure (in the order they
    were kept)."""

    def __init__(self, deployment: Deployment, ledger: Ledger, width: int | None = None) -> None:
        width = SHARD_IO_CONCURRENCY if width is None else width
        self._state = deployment.state
        self._inbox = deployment.inbox
        self._quota = deployment.settings.quarantine_quota_bytes
        self._stub_bytes = deployment.settings.quarantine_stub_bytes
        self._hash_max = deployment.settings.quarantine_hash_max_bytes
        self._used: dict[str, int] = {}  # quarantine prefix -> bytes (listed once, then kept)
        self._ledger = ledger
        self._pool = (
            ThreadPoolExecutor(width, thread_name_prefix="shard-keep") if width > 1 else None
        )
        self._pending: list[Callable[[], object]] = []  # sequential mode: run in wait()
        self._futures: list[Future[object]] = []

    def keep(self, verdict: Verdict, blob: bytes | None) -> None:
        """Start keeping one judged object (``blob`` None: it was never read)."""
        if verdict.accepted:
            return  # accepted bytes go into the shard's archive pack (process_shard)
        call: Callable[[], object]
        if blob is not None:
            if self._charge(verdict.key, len(blob)):
                call = functools.partial(self._ledger.keep_rejected_bytes, verdict, blob)
            else:
                stub = self._stub(verdict, blob, "quarantine_quota")
                call = functools.partial(self._ledger.keep_stub, verdict, stub)
        elif verdict.reason == "oversized":
            call = functools.partial(self._quarantine_unread, verdict)
        else:
            return
        if self._pool is None:
            self._pending.append(call)
        else:
            self._futures.append(self._pool.submit(call))

    def wait(self) -> None:
        for call in self._pending:
            call()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()

    def close(self) -> None:
        """Release the threads (after :meth:`wait`, or when the shard failed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _charge(self, inbox_key: str, size: int) -> bool:
        """Whether ``size`` more bytes fit the device's quota (then they are counted).

        The device's usage is the listed size of its quarantine prefix (a server-side
        fact), listed once per shard. That is exact within a round: the plan puts all of
        a device's objects in one shard (the junk group too), and ``fl_round`` runs one
        at a time (``max_active_runs=1``). Only two rounds started by hand at once (an
        ``fl-admin round`` beside a DAG run) could each admit the remainder."""
        prefix = state_keys.quarantine_owner_prefix(inbox_key)
        if prefix not in self._used:
            self._used[prefix] = sum(info.size for info in self._state.list(prefix))
        if self._used[prefix] + size > self._quota:
            return False
        self._used[prefix] += size
        return True

    def _stub(self, verdict: Verdict, blob: bytes, because: str) -> QuarantineStub:
        return QuarantineStub.model_validate(
            {
                "key_sha256": state_keys.key_digest(verdict.key),
                "sha256": verdict.sha256 or hashlib.sha256(blob).hexdigest(),
                "size": len(blob),
                "prefix_hex": blob[: self._stub_bytes].hex(),
                "kept_because": because,
                "etag": verdict.etag or "",
            }
        )

    def _quarantine_unread(self, verdict: Verdict) -> None:
        """Keep a stub of an object refused unread (oversized): streamed from the inbox
        in bounded chunks for its SHA-256 and first bytes, never copied whole. A failed
        read or write raises and fails the shard, so finalize never deletes its bytes."""
        digest = self._inbox.digest(
            verdict.key, prefix_bytes=self._stub_bytes, hash_max=self._hash_max
        )
        stub = QuarantineStub(
            key_sha256=state_keys.key_digest(verdict.key),
            sha256=digest.sha256 or None,
            size=digest.size,
            prefix_hex=digest.prefix.hex(),
            kept_because="oversized",
            etag=digest.etag,
        )
        self._ledger.keep_stub(verdict, stub)


def keep_judged_bytes(
    deployment: Deployment,
    ledger: Ledger,
    verdicts: list[Verdict],
    judged: dict[str, tuple[bytes, str]],
) -> None:
    """Keep the judged bytes of a finished list of verdicts (see :class:`JudgedBytesKeeper`)."""
    keeper = JudgedBytesKeeper(deployment, ledger)
    try:
        for verdict in verdicts:
            keeper.keep(verdict, judged[verdict.key][0] if verdict.key in judged else None)
        keeper.wait()
    finally:
        keeper.close()


def prefetched(
    keys: Iterable[str], fetch: Callable[[str], Any], width: int
) -> Iterator[tuple[str, Any]]:
    """``(key, fetch(key))`` in key order, with the exception raised instead of the result
    where there was one. ``width`` fetches run ahead on threads (S3 latency overlaps the
    caller's CPU work); at most ``width + 1`` are outstanding (running or done and not
    yet taken), so at most that many fetched objects wait in memory."""
    if width <= 1:
        for key in keys:
            try:
                yield key, fetch(key)
            except Exception as exc:
                yield key, exc
        return
    pool = ThreadPoolExecutor(width, thread_name_prefix="shard-io")
    pending: deque[tuple[str, Future[Any]]] = deque()
    todo = iter(keys)
    try:
        for key in itertools.islice(todo, width):
            pending.append((key, pool.submit(fetch, key)))
        while pending:
            key, future = pending.popleft()
            for following in itertools.islice(todo, 1):
                pending.append((following, pool.submit(fetch, following)))
            try:
                outcome = future.result()
            except Exception as exc:
                outcome = exc
            del future
            yield key, outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def delete_judged(
    deployment: Deployment, verdicts: list[Verdict], *, pool: ThreadPoolExecutor | None = None
) -> None:
    """Delete an inbox object only if it is still the version that was judged; one that
    changed since stays for the next round (where it meets its ledger entry)."""
    judged = {v.key: v.etag for v in verdicts}
    last: dict[str, str] = {}  # client -> its last judged key
    for key in judged:
        if key.count("/") == 2:
            client = key.split("/")[1]
            last[client] = max(last.get(client, key), key)

    def unchanged(client: str) -> list[str]:
        """The client's judged keys still holding the judged version (one listing)."""
        found: list[str] = []
        for info in deployment.inbox.list(f"updates/{client}/"):
            if info.key.count("/") == 2 and info.key > last[client]:
                break  # the plan took a device's first keys: the rest is not ours to read
            if info.key in judged and judged[info.key] == info.etag:
                found.append(info.key)
        return found

    clients = sorted(last)
    listed = map(unchanged, clients) if pool is None else pool.map(unchanged, clients)
    doomed = [key for keys in listed for key in keys]
    for key in judged:
        if key.count("/") != 2:  # keys outside the layout were listed under updates/ too
            for info in deployment.inbox.list(key, limit=1):
                if info.key == key and judged[key] == info.etag:
                    doomed.append(key)
    if pool is None:
        for key in doomed:
            deployment.inbox.delete(key)
    else:
        list(pool.map(deployment.inbox.delete, doomed))

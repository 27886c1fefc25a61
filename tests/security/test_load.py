"""Load: 11,000 queued updates from 11,000 clients through ``run_round`` on real S3.

Updates are crafted, not trained: a small random top-k delta per update, encoded with
the devices' encoder, wrapped in a valid payload for the active package, sealed to the
server's current key and signed by its own enrolled Ed25519 key (one device, one
update: a round counts one vote per device, see ``tests/test_hostile_device.py``). They go into the
inbox over 16 threads (one shared boto3 client, which is thread-safe).

Two rounds over the same deployment: the first takes 1,000 updates (``max_updates``),
the second the 10,000 behind them, with the same shard size. Each must raise nothing,
accept every update, leave exactly one ledger verdict per inbox key and an empty inbox.
The Python heap peak of each round (``tracemalloc``: numpy buffers are traced too) is
measured; the per-update part of its growth must stay far below one envelope (no
payload is held beyond its shard). Times and peaks are printed, not asserted on time.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from collections import Counter

from bench.crafted import enroll_fleet, upload_crafted
from fedlib.server import state_keys
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import run_round

SMALL = 1_000
LARGE = 10_000
CLIENTS = SMALL + LARGE
THREADS = 16
# The issue asks for a heap peak independent of the number of updates. The plan holds
# each pending device's listing (at most ``max_objects_per_device`` entries each: it
# grows with the devices waiting in the inbox, the same 11k-then-10k for both rounds
# here) and writes one key file per shard, shards hold one shard's envelopes, record_shard
# reads verdicts one shard at a time. Measured before issue 16 (1,000 devices): 6.1 MiB
# at 1k and 6.5 MiB at 10k updates (tracemalloc, shard size 500).
MAX_BOOKKEEPING = 256  # bytes of round-wide heap growth per extra update
MAX_PEAK_RATIO = 1.2  # 10x the updates, at most 1.2x the heap peak


def measured_round(deployment, run_id: str, **kwargs):
    """``run_round`` with the Python heap peak (bytes) of the round itself."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        started = time.perf_counter()
        report = run_round(deployment, run_id, **kwargs)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return report, peak - base, elapsed


def ledger_counts(deployment) -> Counter:
    return Counter(
        state_keys.inbox_key_of_ledger_entry(info.key)
        for info in deployment.state.list(state_keys.LEDGER)
    )


def test_ten_thousand_updates_from_ten_thousand_clients(deployment):
    started = time.perf_counter()
    clients = enroll_fleet(deployment, CLIENTS, "load")

    t0 = time.perf_counter()
    keys = [key for key, _ in upload_crafted(deployment, clients, SMALL + LARGE, seed=0)]
    upload_s = time.perf_counter() - t0
    assert len(set(keys)) == SMALL + LARGE
    listed = list(deployment.inbox.list("updates/"))
    queued = [info.key for info in listed]
    assert sorted(queued) == sorted(keys)
    envelope = sum(info.size for info in listed) / len(listed)
    print(
        f"\nupload: {len(keys)} updates from {CLIENTS} clients in {upload_s:.1f} s "
        f"({len(keys) / upload_s:.0f}/s, {THREADS} threads), {envelope:.0f} B each"
    )

    small, small_peak, small_s = measured_round(deployment, "load-1k", max_updates=SMALL)
    assert small.accepted == SMALL and not small.rejected, small.message
    assert small.decision in {"published", "rejected"}, small.message
    first = set(queued) - {info.key for info in deployment.inbox.list("updates/")}
    assert len(first) == SMALL

    large, large_peak, large_s = measured_round(deployment, "load-10k")
    assert large.accepted == LARGE and not large.rejected, large.message
    assert large.decision in {"published", "rejected"}, large.message
    assert list(deployment.inbox.list("updates/")) == []

    verdicts = ledger_counts(deployment)
    assert set(verdicts) == set(keys)
    assert set(verdicts.values()) == {1}
    ledger = Ledger(deployment.state)
    runs = Counter()
    for key in keys[:: (SMALL + LARGE) // 200]:  # a sample of full verdicts (GETs are slow)
        verdict = ledger.read(key)
        assert verdict is not None and verdict.accepted is True
        assert verdict.run_id == ("load-1k" if key in first else "load-10k")
        runs[verdict.run_id] += 1
    assert small.accepted + large.accepted == SMALL + LARGE

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"round {SMALL}: {small_s:.1f} s ({SMALL / small_s:.0f}/s), "
        f"heap peak {small_peak / 2**20:.1f} MiB; {small.decision}\n"
        f"round {LARGE}: {large_s:.1f} s ({LARGE / large_s:.0f}/s), "
        f"heap peak {large_peak / 2**20:.1f} MiB; {large.decision}\n"
        f"peak ratio {large_peak / small_peak:.2f}; process max RSS {rss_mib:.0f} MiB; "
        f"sampled verdicts {dict(runs)}; total {time.perf_counter() - started:.1f} s"
    )
    growth = (large_peak - small_peak) / (LARGE - SMALL)
    print(f"heap growth {growth:.0f} B per extra update (envelope {envelope:.0f} B)")
    assert growth <= MAX_BOOKKEEPING < envelope, (small_peak, large_peak, envelope)
    assert large_peak <= MAX_PEAK_RATIO * small_peak, (small_peak, large_peak)

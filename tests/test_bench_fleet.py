"""bench.fleet at a tiny size: the simulated fleet's rounds add up, the S3 server's own
request counts agree with what a round must do, and the DP noise is the cohort's."""

from __future__ import annotations

import json
import math

import pytest

from bench.fleet import main as fleet_main
from bench.fleet import workers_needed


def test_workers_needed_divides_what_the_schedule_leaves():
    assert workers_needed(100_000, 100.0, 100.0, 900.0) == 2  # 1,000 s of work in 800 s
    assert workers_needed(10, 100.0, 0.0, 900.0) == 1
    assert workers_needed(720_000, 100.0, 0.0, 900.0) == 8
    with pytest.raises(ValueError, match="exceeds the schedule"):
        workers_needed(10, 100.0, 900.0, 900.0)


@pytest.mark.s3
def test_fleet_small(capsys, small_dataset, tmp_path):
    argv = ["--devices", "60,120", "--rounds", "2", "--participation", "0.5"]
    argv += ["--stragglers", "0.3", "--shard-size", "16", "--dataset", str(small_dataset)]
    argv += ["--dp-fleets", "40,4000", "--epsilons", "3", "--dp-rounds", "2", "--seeds", "1"]
    argv += ["--airflow-result", str(tmp_path / "absent.json"), "--json"]
    assert fleet_main(argv) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    r = json.loads(out)

    fleets = r["systems"]["fleets"]
    assert [f["devices"] for f in fleets] == [60, 120]
    for fleet in fleets:
        first, second = fleet["rounds"]
        assert first["stragglers_taken"] == 0
        assert second["stragglers_taken"] == first["stragglers_late"]  # late, not lost
        for rnd in (first, second):
            arriving = rnd["online"] - rnd["stragglers_late"] + rnd["stragglers_taken"]
            assert rnd["updates"] == arriving  # every update that arrived, once
            assert rnd["decision"] in ("published", "rejected")
            assert rnd["shards"] >= math.ceil(rnd["updates"] / 16)  # at most 16 a shard
            requests = rnd["s3_requests"]
            # the S3 server's own count: each inbox copy deleted once, after its verdict
            assert requests["DELETE"] == rnd["updates"]
            assert requests["PUT"] >= rnd["updates"]
            assert requests["GET"] >= rnd["updates"]  # each envelope read at least once
            per_step = rnd["s3_requests_per_step"]
            assert per_step["record_shard"]["DELETE"] == rnd["updates"]
            assert sum(s.get("GET", 0) for s in per_step.values()) == requests["GET"]
            assert rnd["per_update_s"] + rnd["round_wide_s"] == pytest.approx(
                rnd["wall_s"], abs=0.02
            )
            assert rnd["peak_rss_mb"] > 50
    schedule = r["systems"]["schedule"]
    assert set(schedule) == {"devices", "schedule_s", "typical_round_updates", "in_process"}
    ours = schedule["in_process"]
    assert ours["workers_all_online"] == workers_needed(
        120, ours["per_worker_updates_per_s"], ours["round_wide_s"], 900.0
    )

    dp = r["dp"]
    assert dp["trained_devices"] == 6 and dp["rounds"] == 2
    rows = dp["epsilons"]["3"]["fleets"]
    z = dp["epsilons"]["3"]["noise_multiplier"]
    assert [row["devices_per_round"] for row in rows] == [20, 2000]
    for row in rows:
        assert row["noise_std_on_mean"] == pytest.approx(z * 1.0 / row["devices_per_round"])
        assert row["auc_minus_no_dp"] == pytest.approx(row["auc"] - dp["no_dp_auc"])
        assert row["within_tolerance"] == (row["auc_minus_no_dp"] >= -0.02)
    first_ok = next((row["fleet"] for row in rows if row["within_tolerance"]), None)
    assert dp["smallest_fleet_within_tolerance"] == {"3": first_ok}

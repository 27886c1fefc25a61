"""The performance benchmarks run once at a tiny size: they work and their JSON adds up.

No timing assertions (machines are noisy); only presence and self-consistency of the
figures, and the properties that do not depend on speed (exact sums, byte ordering).
"""

from __future__ import annotations

import json

import pytest

from bench.aggregate import main as aggregate_main
from bench.client import PHASES
from bench.client import main as client_main
from bench.wire import main as wire_main


def _run(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1  # exactly one JSON object
    return json.loads(out)


def test_aggregate_small(capsys):
    r = _run(aggregate_main, ["--updates", "20", "--params", "1000"], capsys)
    assert (r["updates"], r["params"]) == (20, 1000)
    for key in (
        "ours_updates_per_s",
        "ours_topk_updates_per_s",
        "flower_inplace_updates_per_s",
        "flower_aggregate_updates_per_s",
        "speed_ratio",
        "speed_ratio_topk",
        "ours_peak_rss_mb",
        "flower_peak_rss_mb",
        "flower_aggregate_peak_rss_mb",
        "memory_ratio",
    ):
        assert r[key] > 0, key
    rate = r["ours_updates_per_s"] / r["flower_inplace_updates_per_s"]
    assert r["speed_ratio"] == pytest.approx(rate)
    rate = r["ours_updates_per_s"] / r["flower_aggregate_updates_per_s"]
    assert r["speed_ratio_vs_aggregate"] == pytest.approx(rate)
    mem = r["flower_peak_rss_mb"] / r["ours_peak_rss_mb"]
    assert r["memory_ratio"] == pytest.approx(mem)
    assert r["ours_baseline_rss_mb"] <= r["ours_peak_rss_mb"]
    assert r["flower_baseline_rss_mb"] <= r["flower_peak_rss_mb"]
    # Both computed the same weighted mean; ours exactly (fixed point), Flower in float32.
    assert r["max_abs_diff"] < 1e-6 and r["max_abs_diff_aggregate"] < 1e-6
    assert r["ours_max_abs_err_vs_f64"] < 1e-12
    assert r["ours_max_abs_err_vs_f64"] <= r["flower_max_abs_err_vs_f64"]
    assert set(r["goals_met"]) == {"speed_ratio", "memory_ratio"}


def test_wire_small(capsys):
    r = _run(wire_main, ["--params", "1000"], capsys)
    assert r["roundtrip_ok"] is True
    assert r["dense_float32_bytes"] == 4000
    assert r["flower_bytes"] > r["dense_float32_bytes"]  # npy header on top of the floats
    assert r["flower_fitres_proto_bytes"] >= r["flower_bytes"]
    assert (
        r["ours_topk1_bytes"]
        < r["ours_topk_default_bytes"]
        < r["ours_topk10_bytes"]
        < r["ours_dense16_bytes"]
        < r["ours_dense32_bytes"]
    )
    assert r["ours_topk10_bytes"] < r["dense_float32_bytes"]
    # dense32 is the raw floats plus a fixed envelope overhead (header, HPKE, signature)
    overhead = r["ours_dense32_bytes"] - r["dense_float32_bytes"]
    assert 0 < overhead < 2048
    assert r["ratio_topk1_vs_dense32"] == pytest.approx(
        r["ours_topk1_bytes"] / r["dense_float32_bytes"]
    )
    suite = r["suites"][r["suite"]]
    assert r["suite"] == "mlkem768-x25519"  # the default: post-quantum
    # hybrid vs classic, same delta: the ML-KEM ciphertext is the whole difference
    pq = r["pq_cost"]
    extra = pq["extra_bytes_per_update"]
    assert (
        extra
        == r["suites"]["mlkem768-x25519"]["topk1_bytes"] - r["suites"]["x25519"]["topk1_bytes"]
    )
    assert 1088 - 64 < extra <= 1088  # minus the shorter suite name in the header
    assert pq["seal_us"]["x25519"] > 0 and pq["open_us"]["mlkem768-x25519"] > 0
    assert suite["topk1_nnz"] == 10 and suite["topk10_nnz"] == 100
    assert suite["dense16_nnz"] == suite["dense32_nnz"] == 1000
    assert suite["topk1_bytes"] == r["ours_topk1_bytes"]


def test_wire_meets_its_size_goal_at_full_size(capsys):
    """Sizes are deterministic, so the issue's byte goal can be a test (no timing)."""
    r = _run(wire_main, [], capsys)
    assert r["params"] == 100_000
    assert r["goals_met"] == {"ratio_topk1_vs_dense32": True}


def test_client_small(s3_config, small_dataset, capsys):
    argv = ["--rows", "300", "--dataset", str(small_dataset)]
    argv += ["--s3-endpoint", s3_config.endpoint_url]
    argv += [f"--s3-access-key={s3_config.access_key}", f"--s3-secret-key={s3_config.secret_key}"]
    r = _run(client_main, argv, capsys)
    assert r["rows"] == 300 and r["server_opened"] == 2
    assert r["cycle"]["num_rows"] == 300 and r["cycle"]["command"] == "fl-client run"
    for key in ("cycle_wall_s", "cycle_cpu_s", "cycle_peak_rss_mb", "update_bytes"):
        assert r[key] > 0, key
    assert set(r["phases"]) == set(PHASES)
    for name, phase in r["phases"].items():
        assert phase["wall_s"] >= 0 and phase["cpu_s"] >= 0, name
        assert 0 < phase["peak_rss_mb"] <= r["phases_total"]["peak_rss_mb"], name
        for field in ("wall_s", "cpu_s", "peak_rss_mb"):
            if name in ("train", "compress", "seal", "upload"):
                assert r[f"{name}_{field}"] == phase[field]
    peaks = [p["peak_rss_mb"] for p in r["phases"].values()]
    assert max(peaks) == r["phases_total"]["peak_rss_mb"]
    assert r["phases_total"]["cpu_s"] >= sum(p["cpu_s"] for p in r["phases"].values()) - 0.05
    # the phases device ran the same path on the same rows: same envelope size +- digits
    assert abs(r["phases_total"]["update_bytes"] - r["update_bytes"]) < 64
    assert set(r["goals_met"]) == {"cycle_cpu_s", "cycle_peak_rss_mb"}


@pytest.mark.slow  # starts its own SeaweedFS and worker processes
def test_round_small(capsys):
    """bench.round end to end at a tiny size: its own SeaweedFS, two shard sizes."""
    from bench.round import main as round_main

    argv = ["--updates", "40", "--params", "2000", "--clients", "40", "--shard-size", "500,7"]
    r = _run(round_main, argv, capsys)
    assert (r["updates"], r["params"], r["shard_size"]) == (40, 2000, 500)
    assert abs(r["num_params"] - 2000) <= 20 and r["shards"] == 1
    assert r["accepted"] == 40 and r["rejected"] == 0
    for key in (
        "pipeline_updates_per_s",
        "boto3_get_updates_per_s",
        "store_get_updates_per_s",
        "async_get_updates_per_s",
        "io_get_put_updates_per_s",
        "overhead_ratio",
        "peak_rss_mb",
        "concurrency",
    ):
        assert r[key] > 0, key
    for loop in ("boto3_get", "store_get", "async_get", "io_get_put"):
        assert len(r[f"{loop}_runs_updates_per_s"]) == 2  # before and after the pipeline
        assert r[f"{loop}_updates_per_s"] == max(r[f"{loop}_runs_updates_per_s"])
    # the headline is against the fastest GET-only loop of the run, boto3's is a second figure
    fastest = max(r[f"{loop}_updates_per_s"] for loop in ("boto3_get", "store_get", "async_get"))
    assert r["fastest_get_updates_per_s"] == fastest
    assert r[f"{r['fastest_get']}_updates_per_s"] == fastest
    assert r["overhead_ratio"] == pytest.approx(r["pipeline_updates_per_s"] / fastest)
    for loop, ratio in (
        ("boto3_get", "overhead_ratio_vs_boto3"),
        ("io_get_put", "overhead_ratio_vs_get_put"),
    ):
        assert r[ratio] == pytest.approx(r["pipeline_updates_per_s"] / r[f"{loop}_updates_per_s"])
    assert r["crypto_cpu_ms_per_update"] > 0 and r["fastest_get_cpu_ms_per_update"] > 0
    assert 0 < r["overhead_ratio_bound"] <= 1
    assert r["pipeline_cpu_ms_per_update"] > 0 and r["pipeline_cpu_bound_updates_per_s"] > 0
    # the aggregate's bytes do not depend on how the batch was sharded
    assert [run["shard_size"] for run in r["runs"]] == [500, 7]
    assert [run["shards"] for run in r["runs"]] == [1, 6]
    assert all(run["accepted"] == 40 for run in r["runs"])
    assert r["digests_match"] is True
    assert {run["result_digest"] for run in r["runs"]} == {r["result_digest"]}
    assert len(r["result_digest"]) == 64
    assert set(r["goals_met"]) == {"pipeline_updates_per_s", "overhead_ratio"}


def test_quality_reports_personalization_small(small_dataset, capsys):
    """bench.quality at a tiny size: the on-device personalization figures are there, are
    AUCs/rates, add up, and the global side matches the pooled evaluation it sits next to."""
    from bench.make_dataset import load_dataset
    from bench.quality import main as quality_main

    data = load_dataset(small_dataset)
    r = _run(quality_main, ["--dataset", str(small_dataset), "--rounds", "2"], capsys)
    (seed,) = r["per_seed"]
    assert seed["personalized_clients"] == len(data.client_holdouts) == len(data.client_ids)
    for key in (
        "personalized_auc",
        "global_client_auc",
        "personalized_pooled_auc",
        "global_pooled_auc",
        "personalized_fpr",
        "personalized_tpr",
        "global_client_fpr",
        "global_client_tpr",
    ):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["personalized_minus_global_client"] == pytest.approx(
        r["personalized_auc"] - r["global_client_auc"]
    )
    assert r["personalized_pooled_minus_global"] == pytest.approx(
        r["personalized_pooled_auc"] - r["global_pooled_auc"]
    )
    # every pooled row has a calibrated owner, so the global side is the federated AUC
    assert r["global_pooled_auc"] == pytest.approx(r["federated_auc"], abs=1e-9)
    # the point of it: each device's own anomalies, foreign behaviour included, rank higher
    assert r["personalized_auc"] > r["global_client_auc"]
    assert r["personalized_fpr"] < 0.1 and r["personalized_tpr"] > r["personalized_fpr"]


def test_dp_small(capsys, small_dataset):
    """bench.dp: every epsilon on the same seeds, noise calibrated by the accountant."""
    from bench.dp import main as dp_main
    from fedlib.server.privacy import calibrate_noise

    r = _run(
        dp_main,
        ["--dataset", str(small_dataset), "--rounds", "2", "--seeds", "2", "--epsilons", "inf,3"],
        capsys,
    )
    assert set(r["results"]) == {"inf", "3"} and r["clients"] == 6
    off, dp = r["results"]["inf"], r["results"]["3"]
    assert "noise_multiplier" not in off and len(off["auc"]["per_seed"]) == 2
    assert dp["noise_multiplier"] == pytest.approx(calibrate_noise(3.0, 1e-5, 2))
    assert 2.99 <= dp["epsilon_charged"] <= 3.0
    paired = [a - b for a, b in zip(dp["auc"]["per_seed"], off["auc"]["per_seed"], strict=True)]
    assert dp["auc_minus_no_dp"]["per_seed"] == pytest.approx(paired)
    assert dp["noise_std_on_mean"] == pytest.approx(dp["noise_multiplier"] * 1.0 / 6)
    for entry in (off, dp):
        assert 0 <= entry["published_auc"]["mean"] <= 1
        assert all(0 <= k <= 2 for k in entry["gate_refused_rounds"]["per_seed"])


def test_targeted_small(capsys):
    """bench.targeted: every scenario from the same warmed-up model, probe rows apart."""
    from bench.targeted import DEFENSES, TOLERANCES
    from bench.targeted import main as targeted_main

    r = _run(
        targeted_main,
        ["--seeds", "1", "--warmup", "2", "--rounds", "1", "--windows", "120"],
        capsys,
    )
    scenarios = r["scenarios"]
    expected = {"clean", "present_aucgate", "present_classgate", "honest_rounds"}
    assert set(scenarios) == expected | {f"absent_{d}" for d in DEFENSES}
    before = {s["probe_detection_before"] for n, s in scenarios.items() if n != "honest_rounds"}
    assert len(before) == 1  # one warmed-up model for every scenario
    for name, s in scenarios.items():
        if name != "honest_rounds":
            assert 0 <= s["probe_detection_after"] <= 1 and 0 <= s["rounds_refused"] <= 1
    honest = scenarios["honest_rounds"]
    assert honest["rounds"] == 3  # two warm-up rounds and the clean one
    refusals = [honest[f"class_gate_refusals_at_{t}"] for t in TOLERANCES]
    assert refusals == sorted(refusals, reverse=True)  # a wider tolerance refuses less

"""The holdout's optional anomaly classes and the gate's per-class check.

Unit tests for the holdout format, the per-class detection and the gate's decision;
one real round (SeaweedFS, sealed updates, ONNX) in which a device trains on its own
rows plus copies of one anomaly class: the per-class gate refuses the candidate while
the AUC gate alone would publish it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from client.update import make_update
from fedlib.crypto import sealing
from fedlib.models.evaluation import (
    MIN_CLASS_ROWS,
    Metrics,
    class_reference,
    gate,
    score_metrics,
)
from fedlib.server.deployment import Holdout
from fedlib.server.pipeline import run_round
from fedlib.server.round_runner import load_evaluation
from fedlib.wire import protocol
from tests.helpers import build_deployment


def metrics(auc: float, **detection: float) -> Metrics:
    return Metrics(
        auc=auc, ap=0.5, tpr=0.5, fpr=0.01, n=100, n_anomalies=50, class_detection=detection
    )


def test_holdout_classes_round_trip_and_are_read_from_the_dataset_layout():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([0, 1, 1, 0, 1, 0], dtype=np.int8)
    classes = np.array(["", "burst", "silent", "", "", ""])
    again = Holdout.from_bytes(Holdout(x, y, ["a", "b"], classes=classes).to_bytes())
    assert again.classes is not None and list(again.classes) == list(classes)

    buf = io.BytesIO()  # what bench.make_dataset writes: codes and their names
    np.savez(
        buf,
        holdout_X=x,
        holdout_y=y,
        anomaly_type=np.array([0, 2, 1, 0, 1, 0], dtype=np.int8),
        anomaly_type_names=np.array(["benign", "burst", "silent"]),
    )
    read = Holdout.from_bytes(buf.getvalue())
    assert read.classes is not None
    assert list(read.classes) == ["", "silent", "burst", "", "burst", ""]
    assert Holdout.from_bytes(Holdout(x, y, ["a", "b"]).to_bytes()).classes is None


@pytest.mark.parametrize(
    "classes, message",
    [
        (["burst", "burst", "silent", "", "", ""], "benign row"),
        (["", "bad name!", "silent", "", "", ""], "is not"),
        (["", "burst"], "one entry per holdout row"),
    ],
)
def test_holdout_classes_are_checked(classes, message):
    x = np.zeros((6, 2), dtype=np.float32)
    y = np.array([0, 1, 1, 0, 1, 0], dtype=np.int8)
    with pytest.raises(ValueError, match=message):
        Holdout(x, y, ["a", "b"], classes=np.array(classes))


def test_class_detection_is_the_flagged_share_of_each_large_enough_class():
    n = MIN_CLASS_ROWS
    labels = np.r_[np.zeros(n), np.ones(2 * n + 5)].astype(np.int8)
    classes = np.r_[np.full(n, ""), np.full(n, "burst"), np.full(n, "silent"), np.full(5, "tiny")]
    flags = np.zeros(labels.size, dtype=bool)
    flags[n : n + n // 2] = True  # half the bursts
    flags[2 * n :] = True  # every silent and tiny row
    scores = flags.astype(float) + np.linspace(0, 0.1, labels.size)
    detected = score_metrics(scores, flags, labels, classes).class_detection
    assert detected == {"burst": pytest.approx(0.5), "silent": 1.0}  # "tiny" is too small


def test_the_gate_refuses_a_candidate_that_forgets_one_class_while_its_auc_holds():
    active = metrics(0.90, burst=0.95, silent=0.80)
    kept = metrics(0.91, burst=0.90, silent=0.81)
    forgot = metrics(0.91, burst=0.40, silent=0.90)
    assert gate(kept, active, tolerance=0.01, floor=0.6, class_tolerance=0.1)[0]
    ok, reason = gate(forgot, active, tolerance=0.01, floor=0.6, class_tolerance=0.1)
    assert not ok and "'burst'" in reason and "0.400" in reason
    assert gate(forgot, active, tolerance=0.01, floor=0.6)[0]  # no per-class check asked


def test_the_reference_is_the_best_recent_detection_so_slow_erosion_is_caught():
    history = [metrics(0.9, burst=0.95), metrics(0.9, burst=0.88), metrics(0.9, burst=0.82)]
    reference = class_reference(history)
    assert reference == {"burst": 0.95}
    candidate = metrics(0.9, burst=0.80)  # 0.02 below the active one, 0.15 below the best
    assert gate(candidate, history[-1], tolerance=0.01, floor=0.6, class_tolerance=0.1)[0]
    ok, reason = gate(
        candidate,
        history[-1],
        tolerance=0.01,
        floor=0.6,
        class_tolerance=0.1,
        class_reference=reference,
    )
    assert not ok and "recent best 0.950" in reason


def implant_round(deployment, cls: str, copies: int) -> None:
    """Two honest devices, and one that adds ``copies`` x the holdout's rows of ``cls``
    to its own training rows (the holdout is the server's; the attacker stands in for a
    device that has seen the same pattern)."""
    data = deployment.dataset
    holdout = deployment.load_holdout()
    implant = holdout.features[holdout.classes == cls]
    package = deployment.registry().read_active()
    fleet = deployment.load_fleet()
    server_public = deployment.current_server_public_key()
    for i, cid in enumerate(data.client_ids[:3]):
        key = sealing.generate_signing_key()
        fleet.enroll(cid, sealing.public_pem(key))
        deployment.save_fleet(fleet)
        rows = data.clients[cid]
        if i == 2:
            rows = np.concatenate([rows, np.tile(implant, (copies, 1))])
        update = make_update(
            package,
            rows,
            client_id=cid,
            client_key=key,
            server_public_key=server_public,
            residual=None,
            seed=i,
        )
        deployment.inbox.put(protocol.inbox_key(cid, update.update_id), update.envelope)


@pytest.mark.parametrize("class_tolerance, decision", [(0.1, "rejected"), (1.0, "published")])
def test_a_device_implanting_a_holdout_class_is_refused_by_the_per_class_gate(
    s3_config, tmp_path, large_holdout_dataset, class_tolerance, decision
):
    deployment = build_deployment(
        s3_config,
        tmp_path / "keys",
        large_holdout_dataset,
        auc_tolerance=1.0,  # only the per-class check can refuse
        auc_floor=0.0,
        class_detection_tolerance=class_tolerance,
    )
    implant_round(deployment, "error_spike", copies=8)
    report = run_round(deployment, f"implant-{class_tolerance}")
    assert report.accepted == 3, report.summary()
    assert report.decision == decision, report.summary()
    # what the gate judged: the holdout's calibration rows (the report shows evaluation rows)
    evaluation = load_evaluation(deployment, f"implant-{class_tolerance}")
    active = evaluation.calibration_active.class_detection
    candidate = evaluation.calibration_candidate.class_detection
    assert active is not None and candidate is not None
    lost = active["error_spike"] - candidate["error_spike"]
    assert lost > 0.1, report.summary()  # the implant did make the class "normal"
    if decision == "rejected":
        assert "error_spike" in report.message
        assert deployment.registry().active_version() == 1

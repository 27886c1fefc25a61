"""Model poisoning through the real round (S3, sealed and signed envelopes, ONNX gate).

One of five devices (20%) trains honestly, then sends its delta flipped and scaled to
just under the server's norm bound: the strongest update the bound lets through. With
plain FedAvg the candidate is damaged and the holdout gate refuses it (the active model
stays); with FLTrust the poisoned update is quarantined as ``distrusted``; with the
coordinate-wise trimmed mean it is outvoted. Both defended rounds publish a model at
least as good as the active one. Figures over 100 rounds: ``bench.poisoning``.
"""

from __future__ import annotations

import numpy as np
import pytest

from client.update import make_update, seal_delta
from fedlib.crypto import sealing
from fedlib.models.training import local_delta
from fedlib.server.ledger import Ledger
from fedlib.server.pipeline import run_round
from fedlib.server.round_runner import load_evaluation
from fedlib.wire import protocol
from tests.helpers import build_deployment

HONEST, ATTACKER = 4, 1


def upload_round(deployment, *, attack: str) -> str:
    """Four honest updates and one poisoned one; returns the poisoned object's key."""
    package = deployment.registry().read_active()
    server_public = deployment.current_server_public_key()
    data = deployment.dataset
    fleet = deployment.load_fleet()
    keys = {}
    for cid in data.client_ids[: HONEST + ATTACKER]:
        keys[cid] = sealing.generate_signing_key()
        fleet.enroll(cid, sealing.public_pem(keys[cid]))
    deployment.save_fleet(fleet)
    bound = deployment.settings.norm_bound
    poisoned_key = ""
    for i, cid in enumerate(data.client_ids[: HONEST + ATTACKER]):
        common = {
            "client_id": cid,
            "client_key": keys[cid],
            "server_public_key": server_public,
            "residual": None,
        }
        if i < HONEST:
            update = make_update(package, data.clients[cid], seed=i, **common)
        else:
            delta, n = local_delta(package, data.clients[cid], seed=i)
            sign = -1.0 if attack == "sign_flip" else 1.0
            poisoned = sign * delta * (0.99 * bound / np.linalg.norm(delta))
            update = seal_delta(package, poisoned, n, clip=False, **common)
        key = protocol.inbox_key(cid, update.update_id)
        deployment.inbox.put(key, update.envelope, if_absent=True)
        if i >= HONEST:
            poisoned_key = key
    return poisoned_key


@pytest.fixture
def make_deployment(s3_config, tmp_path, small_dataset):
    def make(**settings):
        return build_deployment(  # attacks and defenses on the iterative kind's deltas
            s3_config,
            tmp_path / f"keys-{len(settings)}-{id(settings)}",
            small_dataset,
            **{"model_kind": "autoencoder", **settings},
        )

    return make


def test_without_a_defense_the_poisoned_candidate_is_refused_by_the_gate(make_deployment):
    deployment = make_deployment()
    upload_round(deployment, attack="sign_flip")
    report = run_round(deployment, "poisoned-fedavg")
    assert report.accepted == HONEST + ATTACKER  # the bound alone lets it through
    assert report.decision == "rejected", report.summary()
    # the damage the gate judged, on the holdout's calibration rows
    evaluation = load_evaluation(deployment, "poisoned-fedavg")
    damage = evaluation.calibration_active.auc - evaluation.calibration_candidate.auc
    assert damage > deployment.settings.auc_tolerance, report.summary()
    assert deployment.registry().active_version() == 1


def test_fltrust_quarantines_the_flipped_update_and_publishes(make_deployment):
    deployment = make_deployment(robust_aggregation="fltrust")
    poisoned = upload_round(deployment, attack="sign_flip")
    report = run_round(deployment, "poisoned-fltrust")
    assert report.rejected == {"distrusted": 1}, report.summary()
    assert report.decision == "published", report.summary()
    assert report.candidate_metrics is not None and report.active_metrics is not None
    assert report.candidate_metrics.auc >= report.active_metrics.auc
    verdict = Ledger(deployment.state).read(poisoned)
    assert verdict.reason == "distrusted" and "cosine" in verdict.detail


@pytest.mark.parametrize("attack", ["sign_flip", "scaled"])
def test_trimmed_mean_outvotes_the_poisoned_update_and_publishes(make_deployment, attack):
    deployment = make_deployment(robust_aggregation="trimmed_mean")
    package = deployment.registry().read_active()
    assert package.metadata.training.compression == "dense16"  # what robust mode asks
    upload_round(deployment, attack=attack)
    report = run_round(deployment, f"poisoned-trimmed-{attack}")
    assert report.accepted == HONEST + ATTACKER
    assert report.decision == "published", report.summary()
    assert report.candidate_metrics.auc >= report.active_metrics.auc

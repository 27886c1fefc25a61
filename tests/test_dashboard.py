"""The operators' view model over a real deployment (S3, signed packages, real rounds)."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET

import pytest

from fedlib.ops import dashboard
from fedlib.ops.dashboard import RejectedCandidate, VersionRow, render_plot_svg
from tests.plugin_fixtures import (
    RUN_PUBLISH,
    RUN_QUARANTINE,
    RUN_REJECTED,
    RUN_ROLLBACK,
    build_history,
)

SVG = "{http://www.w3.org/2000/svg}"


def test_dashboard_over_a_real_history(deployment):
    history = build_history(deployment)
    reports = history.reports
    assert reports[RUN_PUBLISH]["decision"] == "published"
    assert reports[RUN_QUARANTINE]["decision"] == "published"
    assert reports[RUN_REJECTED]["decision"] == "rejected"
    assert reports[RUN_ROLLBACK]["decision"] == "waiting"

    # rounds: newest first, every field from the reports
    page = dashboard.rounds(deployment, limit=10)
    assert page.total == 4 and not page.has_older and not page.has_newer
    assert [r.run_id for r in page.items] == [
        RUN_ROLLBACK,
        RUN_REJECTED,
        RUN_QUARANTINE,
        RUN_PUBLISH,
    ]
    by_id = {r.run_id: r for r in page.items}
    for run_id, report in reports.items():
        row = by_id[run_id]
        assert row.decision == report["decision"] and row.accepted == report["accepted"]
        assert row.rejected == report["rejected"] and row.base_version == report["base_version"]
        assert row.published_version == report["published_version"]
        assert row.created_at_ms and row.finished_at_ms
    quarantine_row = by_id[RUN_QUARANTINE]
    assert quarantine_row.rejected == {"norm_exceeded": 1, "unknown_client": 1}
    assert quarantine_row.rejected_total == 2 and quarantine_row.accepted == 2
    rejected_row = by_id[RUN_REJECTED]
    assert rejected_row.candidate_metrics["auc"] < 0.9999 and rejected_row.active_metrics
    rollback = by_id[RUN_ROLLBACK].rollback
    assert rollback.rolled_back and rollback.published_version == history.rollback_version
    assert rollback.active_version == history.degraded_version
    assert not by_id[RUN_PUBLISH].rollback.rolled_back

    # paging: bounded, newest first, every round exactly once
    first = dashboard.rounds(deployment, limit=3)
    second = dashboard.rounds(deployment, limit=3, offset=3)
    assert len(first.items) == 3 and first.has_older and not first.has_newer
    assert len(second.items) == 1 and second.has_newer and not second.has_older
    assert {r.run_id for r in first.items + second.items} == set(reports)
    assert dashboard.clamp_page(10_000, -5) == (dashboard.MAX_LIMIT, 0)
    assert dashboard.round_detail(deployment, RUN_REJECTED) == rejected_row
    assert dashboard.round_detail(deployment, "no-such-run") is None

    # versions: 1, two published rounds, the degraded one and the rollback
    versions = dashboard.versions(deployment, limit=10)
    assert versions.total == 5 == history.rollback_version
    assert [v.version for v in versions.items] == [5, 4, 3, 2, 1]
    rows = {v.version: v for v in versions.items}
    assert rows[5].active and rows[5].is_rollback and rows[5].parent_version == 4
    assert rows[5].rollback_of == rollback.best_version
    assert rows[5].rollback_reason.startswith("automatic")
    # the degraded version was published without the gate: no metrics recorded
    assert rows[4].rolled_back and not rows[4].active and rows[4].auc is None
    assert rows[2].round_id == RUN_PUBLISH and rows[3].round_id == RUN_QUARANTINE
    assert rows[2].auc == reports[RUN_PUBLISH]["candidate_metrics"]["auc"]
    assert all(v.error is None and v.ap is not None for v in versions.items if v.version != 4)
    older = dashboard.versions(deployment, limit=2, offset=3)
    assert [v.version for v in older.items] == [2, 1] and older.total == 5

    # rejected candidates
    [candidate] = dashboard.rejected_candidates(deployment)
    assert candidate.run_id == RUN_REJECTED and candidate.base_version == 3
    assert candidate.candidate_auc == reports[RUN_REJECTED]["candidate_metrics"]["auc"]

    # quarantine of one round: from its verdicts and the ledger
    q = dashboard.quarantine(deployment, RUN_QUARANTINE)
    assert q.total == 2 and {r.key: r.reason for r in q.items} == history.refused
    for row in q.items:
        assert row.quarantined and row.time_ms and row.client_id == "mallory"
        assert row.size > 0 and row.detail
        # the real object key of the kept bytes, and they are the bytes that were judged
        assert row.quarantine_key.startswith("quarantine/mallory/")
        assert row.quarantine_key.endswith(".bin")
        assert hashlib.sha256(deployment.state.get(row.quarantine_key)).hexdigest() == row.sha256
    assert dashboard.quarantine(deployment, RUN_QUARANTINE, limit=1, offset=1).items == q.items[1:]
    assert dashboard.quarantine(deployment, RUN_PUBLISH).total == 0
    assert dashboard.quarantine(deployment, "no-such-run") is None

    # fl-admin status shows the same rows
    from fedlib.ops.admin import status_document

    status = status_document(deployment)
    assert [v["version"] for v in status["versions"]] == [1, 2, 3, 4, 5]
    # two quarantined updates, each kept as two objects (bytes + reason): counted once
    assert len(list(deployment.state.list("quarantine/"))) == 4
    assert status["quarantined"] == 2 == dashboard.quarantined_updates(deployment)
    # bytes that are gone (never read, or removed by hand): the row says none was kept
    gone = q.items[0]
    deployment.state.delete(gone.quarantine_key)
    again = {r.key: r for r in dashboard.quarantine(deployment, RUN_QUARANTINE).items}
    assert again[gone.key].quarantine_key is None and again[gone.key].quarantined
    assert again[q.items[1].key].quarantine_key == q.items[1].quarantine_key
    assert dashboard.quarantined_updates(deployment) == 2  # still two updates
    assert status["versions"][3]["rolled_back"] and status["versions"][4]["rollback_of"]
    assert status["recent_rounds"][0]["run_id"] == RUN_ROLLBACK
    assert status["recent_rounds"][0]["rolled_back"] and len(status["recent_rounds"]) == 4

    # JSON-ready and the plot over the same rows
    doc = versions.as_dict()
    assert doc["items"][0]["is_rollback"] is True and doc["total"] == 5
    assert page.as_dict()["items"][2]["rejected_total"] == 2
    svg = render_plot_svg(versions.items, [candidate])
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    classes = [g.get("class") for g in root.iter(f"{SVG}g")]
    assert classes.count("point auc") == 4 and classes.count("point ap") == 4
    assert classes.count("point unscored") == 1  # v4, rolled back
    assert classes.count("rollback") == 1 and classes.count("rejected auc") == 1
    assert len(root.findall(f".//{SVG}polyline[@class='auc-line']")) == 1  # v1-v3; v5 alone


def test_plot_escapes_text_and_handles_no_data():
    evil = "<script>alert(1)</script>&"
    rows = [
        VersionRow(version=1, auc=0.8, ap=0.5),
        VersionRow(
            version=2, auc=0.7, ap=0.4, rollback_of=1, parent_version=1, rollback_reason=evil
        ),
        VersionRow(version=3, error="VerificationError: bad"),  # not plotted
    ]
    refused = [RejectedCandidate(evil, 1, 0.6, None, 0.8, evil, None)]
    svg = render_plot_svg(rows, refused, title=evil)
    assert "<script" not in svg and "&lt;script&gt;" in svg
    root = ET.fromstring(svg)  # well-formed XML despite the text
    titles = [t.text for t in root.iter(f"{SVG}title")]
    assert any(evil in (t or "") for t in titles)
    assert "\u21a9 v1" in svg

    empty = render_plot_svg([], [])
    assert "no published metrics yet" in empty
    ET.fromstring(empty)


def test_a_tampered_version_is_shown_as_unverified(deployment):
    """The versions table shows signed metadata only: a package file changed in the
    bucket never turns into new numbers. One tampered copy is read around (the other
    matches the signed hash); with both tampered the row is an error."""
    from fedlib.trust.package import package_prefix

    before = dashboard.version_rows(deployment)[0]
    assert before.error is None and before.auc is not None
    registry = deployment.registry()
    info = registry.channel.targets().targets["v00000001/metadata.json"]
    for key in (package_prefix(1) + "metadata.json", registry.channel.layout.target_key(info)):
        doc = json.loads(deployment.models.get(key))
        doc["metrics"]["auc"] = 0.999
        deployment.models.put(key, json.dumps(doc).encode())
        dashboard._version_cache.clear()  # not the cache: a fresh read of the bucket
        [row] = dashboard.version_rows(deployment)
        assert row.auc != 0.999
    assert row.version == 1 and row.auc is None and "Verification" in (row.error or "")
    assert dashboard.models_integrity(deployment).total >= 1  # the archive copy's size
    svg = render_plot_svg([row])
    assert "no published metrics yet" in svg


def test_dashboard_reads_with_public_keys_only(deployment, tmp_path):
    """The web process gets the public half of the keys folder and nothing else: every
    page still verifies the packages it shows, and nothing can be signed from there."""
    import shutil

    from fedlib.server.deployment import PUBLIC_DIR, Deployment
    from fedlib.trust.channel_layout import ChannelError

    public_only = tmp_path / "web-keys"
    shutil.copytree(deployment.keys_dir / PUBLIC_DIR, public_only / PUBLIC_DIR)
    pems = list(public_only.rglob("*.pem"))
    assert pems and all(p.name.endswith(".pub.pem") for p in pems)
    web = Deployment(
        deployment.settings.model_copy(update={"keys_dir": public_only}), deployment.s3
    )
    [row] = dashboard.version_rows(web)
    assert row.version == 1 and row.error is None and row.auc is not None
    assert web.registry().read_active().version == 1
    with pytest.raises(ChannelError, match="not found"):
        web.registry(signing=True)

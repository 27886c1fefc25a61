"""The round's typed records: documents written before the records existed still read,
every record round-trips to the same content, and ``decide`` maps each case once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlib.server import records as r
from fedlib.server import state_keys
from fedlib.server.pipeline import decide

FIXTURES = Path(__file__).parent / "fixtures" / "state-v0"
ROUND_FILES = {
    "plan.json": r.RoundPlan,
    "evaluation.json": r.Evaluation,
    "rollback.json": r.RollbackDecision,
    "privacy.json": r.PrivacyRecord,
}


def kind_of(relative: Path) -> type[r.Record]:
    """The record a state key holds, from the key layout (tests/fixtures mirrors it)."""
    top, name = relative.parts[0], relative.name
    if top == "rounds":
        if name.endswith(".keys.json"):
            return r.ShardKeys
        if name.endswith(".verdicts.json"):
            return r.ShardVerdicts
        return ROUND_FILES[name]
    if top == "reports":
        return r.RoundReport
    if top == "intervals":
        return r.IntervalRecord
    if top in ("ledger", "quarantine"):
        return r.LedgerEntry
    if top == "privacy":
        return r.PrivacyCharge
    if top == "holdout":
        return r.HoldoutPointer
    raise AssertionError(f"no record for {relative}")


def fixture_documents() -> list[tuple[str, Path]]:
    found = []
    for deployment in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        for path in sorted(deployment.rglob("*.json")):
            found.append((str(path.relative_to(FIXTURES)), path))
    return found


def same_content(rewritten: object, original: object) -> bool:
    """Equal but for what the records added: ``schema`` and fields the original did not
    have, at their "absent" value (None or False)."""
    if isinstance(rewritten, dict) and isinstance(original, dict):
        for key, value in rewritten.items():
            if key not in original:
                if key != "schema" and value not in (None, False):
                    return False
            elif not same_content(value, original[key]):
                return False
        return set(original) <= set(rewritten)
    if isinstance(rewritten, list) and isinstance(original, list):
        return len(rewritten) == len(original) and all(
            same_content(a, b) for a, b in zip(rewritten, original, strict=True)
        )
    return rewritten == original


def test_the_fixtures_cover_every_stored_record():
    kinds = {
        kind_of(path.relative_to(path.parents[len(path.relative_to(FIXTURES).parts) - 2]))
        for _, path in fixture_documents()
    }
    assert kinds == {
        r.RoundPlan, r.ShardKeys, r.ShardVerdicts, r.Evaluation, r.RollbackDecision,
        r.PrivacyRecord, r.PrivacyCharge, r.RoundReport, r.IntervalRecord, r.LedgerEntry,
        r.HoldoutPointer,
    }  # fmt: skip


@pytest.mark.parametrize(("name", "path"), fixture_documents(), ids=lambda v: str(v))
def test_documents_of_the_first_release_read_and_round_trip(name, path):
    """Written by the code before records (tests/fixtures/state-v0/README.md): each reads
    as its record, and writing it back changes nothing but the added ``schema``."""
    relative = Path(*Path(name).parts[1:])
    record = kind_of(relative).from_json(path.read_bytes(), what=name)
    original = json.loads(path.read_bytes())
    if isinstance(record, r.ShardVerdicts):
        assert isinstance(original, list)  # the first release wrote a bare list
        original = {"verdicts": original}
    rewritten = json.loads(record.to_json())
    if not isinstance(record, r.Metrics):
        assert rewritten["schema"].startswith("dadm."), rewritten
    assert same_content(rewritten, original), (rewritten, original)


def test_records_refuse_unknown_fields_and_wrong_kinds():
    plan = FIXTURES / "plain/rounds/run-published/plan.json"
    doc = json.loads(plan.read_bytes())
    with pytest.raises(r.RecordError, match="Extra inputs"):
        r.RoundPlan.from_doc({**doc, "shards": ["updates/a/b"]})
    with pytest.raises(r.RecordError):
        r.RoundPlan.from_doc({**doc, "schema": "dadm.round-report.v1"})
    with pytest.raises(r.RecordError):
        r.RoundReport.from_json(plan.read_bytes())


def test_every_report_decision_is_a_decision():
    for _, path in fixture_documents():
        if "/reports/" in str(path):
            assert r.RoundReport.from_json(path.read_bytes()).decision in set(r.Decision)


def plan_of(**changes: object) -> r.RoundPlan:
    base = r.RoundPlan.from_json((FIXTURES / "plain/rounds/run-published/plan.json").read_bytes())
    return base.model_copy(update=changes)


def evaluation_of(**changes: object) -> r.Evaluation:
    path = FIXTURES / "plain/rounds/run-published/evaluation.json"
    return r.Evaluation.from_json(path.read_bytes()).model_copy(update=changes)


def test_decide_maps_each_case_once():
    plan, ok = plan_of(), evaluation_of()
    assert decide(plan, ok, dry_run=False) is r.Decision.PUBLISHED
    assert decide(plan, ok, dry_run=True) is r.Decision.DRY_RUN
    assert decide(plan_of(waiting=True), None, dry_run=False) is r.Decision.WAITING
    assert decide(plan, evaluation_of(publish=False), dry_run=False) is r.Decision.REJECTED
    assert decide(plan, evaluation_of(publish=False), dry_run=True) is r.Decision.REJECTED
    nothing = evaluation_of(candidate=None, publish=False)
    assert decide(plan, nothing, dry_run=False) is r.Decision.NOTHING_ACCEPTED
    privacy = r.PrivacyRecord.from_json((FIXTURES / "dp/rounds/run-dp/privacy.json").read_bytes())
    refused = evaluation_of(
        candidate=None, publish=False, privacy=privacy.model_copy(update={"refused": True})
    )
    assert decide(plan, refused, dry_run=False) is r.Decision.PRIVACY_BUDGET
    replay = plan_of(replay_of="run-1")
    same = evaluation_of(publish=False, replay=r.ReplayCheck(of="run-1", matches=True))
    other = evaluation_of(publish=False, replay=r.ReplayCheck(of="run-1", matches=False))
    assert decide(replay, same, dry_run=False) is r.Decision.REPLAY_MATCH
    assert decide(replay, other, dry_run=False) is r.Decision.REPLAY_MISMATCH
    with pytest.raises(ValueError, match="no evaluation"):
        decide(plan, None, dry_run=False)


def test_state_keys_never_carry_unchecked_device_text():
    hostile = "updates/dev-1/" + "x" * 240 + "/../../ledger/evil"
    assert state_keys.ledger_entry(hostile).startswith("ledger/dev-1/_name/")
    assert len(state_keys.ledger_entry(hostile)) < 100
    assert state_keys.quarantine_bytes(hostile, "ab" * 32).startswith("quarantine/dev-1/_name/")
    assert state_keys.inbox_key_of_ledger_entry(state_keys.ledger_entry(hostile)) is None
    unowned = "updates/Dev_1/" + "x" * 240
    assert state_keys.ledger_entry(unowned).startswith("ledger/_other/")
    assert state_keys.quarantine_bytes(unowned, "ab" * 32).startswith("quarantine/_other/")
    good = "updates/dev-1/01a2461a-b968-73d5-b454-39b419f4167d"
    assert state_keys.inbox_key_of_ledger_entry(state_keys.ledger_entry(good)) == good
    run = state_keys.RunKeys("scheduled__2026-11-27T08:00:00+00:00")
    assert run.plan.count("/") == 2 and ":" not in run.plan and "+" not in run.plan
    assert state_keys.parse_privacy_charge(state_keys.privacy_charge("r-1", (1.5, 2.0))) == (
        "r-1",
        [1.5, 2.0],
    )

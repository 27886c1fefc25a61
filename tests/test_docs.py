"""README.md and RELIABILITY.md show the committed results, and nothing else, in their
generated blocks (issue 17, item 4): ``bench.report`` renders every block from
``bench/results/*.json``; these tests render into memory and compare."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest

from bench import report
from bench.report import Block, Figure, ReportError

ROOT = Path(__file__).resolve().parents[1]


def rendered() -> dict[str, tuple[str, list[Block]]]:
    return report.render_all(ROOT, ROOT / "bench" / "results")


@pytest.mark.parametrize("document", report.DOCUMENTS)
def test_committed_documents_equal_their_rendering(document):
    committed = (ROOT / document).read_text()
    text, blocks = rendered()[document]
    assert blocks, f"{document} has no generated block"
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            text.splitlines(keepends=True),
            document,
            "rendered",
        )
    )
    assert text == committed, f"{document} drifted from bench/results: run `make docs`\n{diff}"


def test_every_number_in_a_block_comes_from_the_json_it_names():
    checked = 0
    for _, blocks in rendered().values():
        for block in blocks:
            assert report.unsourced(block) == [], (block.document, block.name)
            for figure in block.figures:
                assert figure.source in block.sources, (block.name, figure)
                # read again, apart from the renderer's Source objects
                data = json.loads((ROOT / "bench" / "results" / figure.source).read_text())
                value = report.evaluate(figure.source, data, figure.expr)
                assert report.fmt(value, figure.spec, figure.scale) == figure.text, figure
                checked += 1
    assert checked > 100


def test_a_number_typed_into_a_block_is_caught():
    text, blocks = rendered()["README.md"]
    block = next(b for b in blocks if b.name == "performance")
    typed = Block(
        block.document, block.name, block.sources, block.text + " 1,234 us", block.figures
    )
    assert report.unsourced(typed) == ["1,234"]
    # and the committed document with one figure edited is not its rendering
    figure = next(f for f in block.figures if f.expr == ("value", "pipeline_updates_per_s"))
    start = text.index("<!-- bench:performance")
    edited = text[:start] + text[start:].replace(figure.text, "9,999", 1)
    again, _ = report.render_document("README.md", edited, ROOT / "bench" / "results")
    assert again == text != edited


def test_every_table_with_a_committed_result_is_shown():
    shown = {b.name for _, blocks in rendered().values() for b in blocks}
    results = ROOT / "bench" / "results"
    for name, table in report.TABLES.items():
        if all((results / s).is_file() for s in report.table_sources(table, results)):
            assert name in shown, f"bench.report table {name!r} is in no document"


def test_a_block_without_its_result_file_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("<!-- bench:dp -->\n<!-- /bench:dp -->\n")
    with pytest.raises(ReportError, match=r"no committed result dp\.json"):
        report.render_document("README.md", (tmp_path / "README.md").read_text(), tmp_path)
    with pytest.raises(ReportError, match="names no table"):
        report.render_document("README.md", "<!-- bench:nope -->\n<!-- /bench:nope -->", tmp_path)


def test_an_unmet_goal_needs_a_reason(tmp_path):
    doc = "<!-- bench:goals -->\n<!-- /bench:goals -->\n"
    (tmp_path / "new.json").write_text(
        json.dumps({"speed": 0.5, "goals": {"speed": 1.0}, "goals_met": {"speed": False}})
    )
    with pytest.raises(ReportError, match="'speed' is not met and has no reason"):
        report.render_document("README.md", doc, tmp_path)
    (tmp_path / "new.json").write_text(
        json.dumps({"speed": 1.5, "goals": {"speed": 1.0}, "goals_met": {"speed": True}})
    )
    text, (block,) = report.render_document("README.md", doc, tmp_path)
    assert "| `speed` (`new.json`) | >= 1 | 1.5 | met |" in text
    assert report.unsourced(block) == []


def test_the_goals_not_met_stand_with_their_reasons():
    _, blocks = rendered()["README.md"]
    goals = next(b for b in blocks if b.name == "goals")
    # dense aggregation at 2x Flower's aggregate_inplace: retired, where the figure is shown
    assert "**retired**" in goals.text
    perf = next(b for b in blocks if b.name == "performance")
    assert "retired" in perf.text
    poisoning = next(b for _, bs in rendered().values() for b in bs if b.name == "poisoning")
    row = next(line for line in poisoning.text.splitlines() if "`sign_flip` attack" in line)
    assert "**not met**" in row and "honest-only" in row and "all-honest" in row


def test_the_battery_size_in_reliability_is_the_battery():
    from tests.security.test_battery import BATTERY

    text = (ROOT / "RELIABILITY.md").read_text()
    (count,) = re.findall(r"\| (\d+) malformed or malicious update kinds", text)
    assert int(count) == len(BATTERY)


def test_figures_are_recorded_with_their_source():
    source = report.Source("x.json", {"a": {"b": 0.12345}, "c": 2.0, "k.0.1": 3})
    assert source.num("a.b", ".2f") == "0.12"
    assert source.diff("a.b", "c") == "-1.877"
    assert source.num("k.0.1", ".0f") == "3"
    assert source.figures[0] == Figure("x.json", ("value", "a.b"), ".2f", 1.0, "0.12")

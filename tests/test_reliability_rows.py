"""RELIABILITY.md's rows name tests that exist, and say truthfully how their round runs.

Why: rows named tests that had been replaced (a simulated crash, a hand-written torn
file) and the header said "Airflow via dag.test()" for rows that never start Airflow.
Each row of a ``| what | outcome | test | runs through |`` table names its tests; every
``tests/FILE.py::name`` must exist, and the last column must match what those tests do:
``fl-admin round`` only if one of them runs the pipeline (``run_round``, the
``fl-admin round`` entry point, or the pipeline's steps), Airflow ``dag.test`` only if
one runs a DAG, Airflow LocalExecutor only if one starts a scheduler.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| what | outcome | test | runs through |"
# what a test's source (with the module-level helpers it calls) shows for each way
KINDS = {
    "`fl-admin round`": re.compile(
        r"run_round\(|\"round\"|pipeline\.(plan|process_shard|finalize)\(|rr\.finalize_round\("
    ),
    # (the metadata-DB test runs dag.test in a child process it configures by airflow_env)
    "Airflow `dag.test`": re.compile(r"run_dag\(|\.test\(|airflow_env\("),
    "Airflow LocalExecutor": re.compile(r"start_scheduler\("),
}
OTHER = ("no round", "the plan", "the export: ", "the shard pipeline in process", "the round")


def rows() -> list[tuple[int, str, str, str]]:
    """(line number, what, test cell, runs-through cell) of every row of those tables."""
    out, inside = [], False
    for number, line in enumerate((ROOT / "RELIABILITY.md").read_text().splitlines(), 1):
        if line == HEADER:
            inside = True
            continue
        if not line.startswith("|"):
            inside = False
        if inside and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert len(cells) == 4, f"RELIABILITY.md:{number}: {len(cells)} cells"
            out.append((number, cells[0], cells[2], cells[3]))
    return out


ROWS = rows()


@cache
def module(path: str) -> tuple[str, dict[str, ast.FunctionDef]]:
    text = (ROOT / path).read_text()
    tree = ast.parse(text)
    return text, {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def source_of(ref: str) -> str:
    """A test (with the module-level helpers it calls), or a whole test module."""
    path, _, name = ref.partition("::")
    assert (ROOT / path).is_file(), f"{ref}: no such file"
    text, functions = module(path)
    if not name:
        return text
    assert name in functions, f"{ref}: no such test"
    node = functions[name]
    called = {
        n.func.id
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    parts = [node, *(functions[c] for c in sorted(called) if c in functions and c != name)]
    return "\n".join(ast.get_source_segment(text, part) or "" for part in parts)


def refs(cell: str) -> list[str]:
    """``tests/a.py::x``, ``::y`` (same file as the one before), ``tests/b.py``."""
    out, current = [], None
    for code in re.findall(r"`([^`]+)`", cell):
        if code.startswith("tests/"):
            current = code.split("::")[0]
            out.append(code)
        elif code.startswith("::") and current:
            out.append(current + code)
    return out


def test_every_reliability_table_with_tests_says_how_its_rows_run():
    text = (ROOT / "RELIABILITY.md").read_text()
    assert "| what | outcome | test |\n" not in text
    assert len(ROWS) >= 60


@pytest.mark.parametrize(("number", "what", "tests", "via"), ROWS, ids=[str(r[0]) for r in ROWS])
def test_each_row_names_real_tests_that_run_the_way_it_says(number, what, tests, via):
    sources = [source_of(ref) for ref in refs(tests)]
    parts = [p.strip() for p in via.split(";")]
    for part in parts:
        if part in KINDS and sources:  # (a row without tests: a committed measurement)
            assert any(KINDS[part].search(s) for s in sources), (
                f"RELIABILITY.md:{number} says {part}, none of {refs(tests)} does"
            )
        else:
            assert part.startswith(OTHER) or part.endswith(tuple(KINDS)), (number, part)
    if "no round" in parts[0] and refs(tests):  # then none of its own tests runs a DAG
        assert not any(KINDS["Airflow `dag.test`"].search(s) for s in sources[:1]), number

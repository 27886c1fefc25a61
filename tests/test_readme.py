"""Every ``fl-admin`` / ``fl-client`` command the README shows parses with the real CLI
and is run by a test or by the demo, so the README cannot drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from client.cli import build_parser as client_parser
from fedlib.ops.admin import build_parser as admin_parser

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"fl-admin": admin_parser, "fl-client": client_parser}
CALLERS = {"fl-admin": r"(?:admin_main|\*admin)", "fl-client": r"(?:client_main|\*client)"}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(program, argv) of each command in code blocks and inline code of the README."""
    text = (ROOT / "README.md").read_text()
    candidates = re.findall(r"^\s*((?:fl-admin|fl-client) [^\n#`]+)", text, re.M)
    candidates += re.findall(r"`((?:fl-admin|fl-client) [^`]+)`", text)
    out = []
    for line in candidates:
        line = re.sub(r"\[([^\]]*)\]", r"\1", line.strip())  # "[--json]": show the option
        program, *argv = shlex.split(line)
        out.append((program, argv))
    return out


COMMANDS = readme_commands()


def test_the_readme_shows_the_operator_commands():
    subcommands = {(p, argv[0]) for p, argv in COMMANDS}
    for sub in ("init", "enroll", "revoke", "holdout", "status", "round", "config"):
        assert ("fl-admin", sub) in subcommands
    for sub in ("keygen", "run", "status", "verify-bundle", "install-bundle"):
        assert ("fl-client", sub) in subcommands


@pytest.mark.parametrize(("program", "argv"), COMMANDS, ids=[" ".join(a) for _, a in COMMANDS])
def test_readme_command_parses_and_is_exercised(program, argv):
    if len(argv) > 1:  # a whole command, not a mention of a subcommand in the text
        PARSERS[program]().parse_args(argv)  # exits (fails the test) on an unknown option
    sources = "\n".join(
        p.read_text() for p in [*ROOT.glob("tests/**/*.py"), ROOT / "scripts/demo.py"]
    )
    caller = CALLERS[program] + r"\(?\s*,?\s*\[?\s*\"" + re.escape(argv[0]) + '"'
    assert re.search(caller, sources), f"no test or demo step runs `{program} {argv[0]}`"

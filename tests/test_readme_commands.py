"""Every command the README prints is in :data:`TABLE`, which names what runs it.

Why: a regex over the test sources once said "every README command is exercised" while
``retire-server-key --force``, ``rotate-channel-key --root-keys 3``, ``--role snapshot``
and ``fl-admin round --dry-run`` never ran. Here each README command is a row; the test
fails when the README prints a command the table lacks, or the table names one the
README no longer prints. A row names either

- a test that runs it (``tests/FILE.py::test_name``): for ``fl-admin``/``fl-client``
  the test (or a helper of its module it calls) must call the real CLI entry point
  (``main(argv)`` or the installed script) with the subcommand and every option the
  README shows; for other commands, ``EVIDENCE`` names what its source must contain;
- ``.ci/run``: CI's entry point runs it (checked against ``.ci/run`` and the Makefile);
- ``NOT RUN: why``: honestly not run by any test or by CI (long services, Docker, an
  install from PyPI); these are listed in ``NOT_RUN`` so a new one cannot slip in.

Each whole ``fl-admin``/``fl-client`` command also parses with the real argument parser.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from client.cli import build_parser as client_parser
from fedlib.ops.admin import build_parser as admin_parser

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"fl-admin": admin_parser, "fl-client": client_parser}
CLI_CALLERS = {
    "fl-admin": {"admin_main", "fl_admin"},
    "fl-client": {"client_main", "fl_client_run"},
}
# What starts a command line in a README code block (prose and diagrams are skipped).
STARTS = (
    "fl-admin ",
    "fl-client ",
    "make ",
    "python ",
    "pip ",
    "airflow ",
    "docker ",
    ".venv/bin/",
    "set -a",
    "cp ",
    "mkdir ",
    "sudo ",
    "export ",
)
# A command in inline code (``like this``) in the prose.
INLINE = re.compile(r"(fl-admin|fl-client|make|python -m|pip install|docker compose|airflow) \S")

ADMIN = "tests/test_admin.py::"
ROTATION = "tests/test_rotation.py::"
ROTATE_PACKAGE_AND_CHANNEL = ROTATION + "test_package_and_channel_key_rotation_under_uploads"
ROTATE_SERVER = ROTATION + "test_server_key_rotation_keeps_old_updates_and_refuses_a_downgrade"
ROTATE_DEVICE = ROTATION + "test_device_key_rotation_keeps_spooled_updates_until_revoked"
BUNDLES = "tests/test_airgap_flow.py::test_operator_finds_and_fetches_bundles_through_fl_admin"
OFFLINE = "tests/test_airgap_flow.py::test_export_verify_install_offline"
ROLLBACK = "tests/test_rollback.py::test_fl_admin_rollback_pins_like_the_dag_and_status_shows_it"
CLIENT_RUN = (
    "tests/test_client.py::test_fl_client_killed_mid_spool_write_recovers_and_the_round_publishes"
)
HOLDOUT = (
    "tests/test_evalsplit.py::"
    "test_fl_admin_holdout_reports_the_parts_and_warns_when_anomalies_are_few"
)
DOCS = "tests/test_readme_commands.py::test_make_docs_runs_bench_report_which_changes_nothing"
BACKFILL = (
    "tests/test_backfill_scheduler.py::"
    "test_readme_backfill_takes_each_interval_in_order_then_replays_byte_for_byte"
)
GAP = 'airflow backfill create --dag-id fl_round --from-date "$FROM" --to-date "$TO" '
COMPOSE = "NOT RUN: no Docker daemon here; tests/test_compose.py validates docker-compose.yml"

LOGS_E2E = (
    "tests/test_logs_e2e.py::test_a_device_with_only_log_paths_trains_uploads_scores_and_explains"
)
VOCAB_E2E = (
    "tests/test_logs_e2e.py::"
    "test_a_new_vocabulary_is_a_new_version_and_devices_recount_their_windows"
)
TABLE: dict[str, str] = {
    # -- operator: fl-admin
    "fl-admin init": ADMIN + "test_round_through_cli",
    "fl-admin init --holdout holdout.npz": ADMIN + "test_round_through_cli",
    "fl-admin enroll": ADMIN + "test_init_enroll_status_revoke",
    "fl-admin enroll dev-7 --public-key dev-7.pub.pem --out dev-7/client.json --log "
    "'/var/log/syslog*' --log-format syslog": LOGS_E2E,
    "fl-admin templates learn LOGS... --out vocabulary.json": LOGS_E2E,
    "fl-admin templates learn sample/*.log --format syslog --out vocabulary.json": LOGS_E2E,
    "fl-admin templates holdout labeled/*.log --vocabulary vocabulary.json --labels "
    "anomalies.csv --out holdout.npz": LOGS_E2E,
    "fl-admin init --holdout holdout.npz --vocabulary vocabulary.json": LOGS_E2E,
    "fl-admin templates learn sample/*.log --previous vocabulary.json --out "
    "vocabulary-2.json": VOCAB_E2E,
    "fl-admin templates holdout labeled/*.log --vocabulary vocabulary-2.json --labels "
    "anomalies.csv --out holdout-2.npz": VOCAB_E2E,
    "fl-admin templates publish vocabulary-2.json --holdout holdout-2.npz": VOCAB_E2E,
    "fl-admin templates holdout labeled/*.log --vocabulary vocabulary.json --labels "
    "anomalies.csv --out holdout.npz --timezone Europe/Berlin": (
        "tests/test_logs_e2e.py::test_the_holdout_reads_stamps_in_the_zone_it_is_told"
    ),
    "fl-admin enroll dev-7 --public-key dev-7.pub.pem --out dev-7/client.json --log "
    "'/var/log/syslog*' --log-timezone Europe/Berlin": (
        "tests/test_logs_e2e.py::test_enroll_writes_the_zone_of_a_log_source"
    ),
    "fl-client score --config client.json": LOGS_E2E,
    "fl-admin enroll dev-7 --public-key dev-7.pub.pem --out dev-7/client.json": ADMIN
    + "test_init_enroll_status_revoke",
    "fl-admin enroll dev-7 --add-key --public-key new.pub.pem --out dev-7/client.json": (
        "tests/test_enroll_keys.py::test_enroll_refuses_a_second_key_unless_added_for_rotation"
    ),
    "fl-admin revoke dev-7": ADMIN + "test_init_enroll_status_revoke",
    "fl-admin revoke dev-7 --key-id OLD_ID": ROTATE_DEVICE,
    "fl-admin holdout": HOLDOUT,
    "fl-admin holdout [new-holdout.npz] [--json]": HOLDOUT,
    "fl-admin status": ADMIN + "test_init_enroll_status_revoke",
    "fl-admin status [--json]": ADMIN + "test_init_enroll_status_revoke",
    "fl-admin round": ADMIN + "test_round_through_cli",
    "fl-admin round [--dry-run]": ADMIN + "test_round_through_cli",
    'fl-admin rollback --to-version 3 --reason "v5 misses an attack"': ROLLBACK,
    "fl-admin rollback --to-version 3 --reason TEXT": ROLLBACK,
    "fl-admin config --example": ADMIN + "test_holdout_and_config_through_cli",
    "fl-admin config [--example]": ADMIN + "test_holdout_and_config_through_cli",
    "fl-admin keys": ADMIN + "test_exit_status_done_refused_failed_usage",
    "fl-admin keys [--json]": ADMIN + "test_exit_status_done_refused_failed_usage",
    "fl-admin bundles list": BUNDLES,
    "fl-admin bundles list [--json]": BUNDLES,
    "fl-admin bundles get KEY --out bundle.tar.gz": BUNDLES,
    "fl-admin credentials policy dev-7": "tests/test_credentials.py::test_policy_through_fl_admin",
    "fl-admin credentials server-policy": "tests/test_credentials.py::test_policy_through_fl_admin",
    "fl-admin privacy init-secret": "tests/test_privacy.py::test_init_secret_through_fl_admin",
    "fl-admin privacy init-secret /run/secrets/dadm-fl": (
        "tests/test_privacy.py::test_init_secret_through_fl_admin"
    ),
    "fl-admin rotate-server-key --suite mlkem768-x25519": ROTATE_SERVER,
    "fl-admin retire-server-key OLD_ID": ROTATE_SERVER,
    "fl-admin retire-server-key OLD_ID --force": ROTATE_SERVER,
    "fl-admin rotate-package-key": ROTATE_PACKAGE_AND_CHANNEL,
    "fl-admin retire-package-key OLD_ID": ROTATE_PACKAGE_AND_CHANNEL,
    "fl-admin rotate-channel-key --role targets": ROTATE_PACKAGE_AND_CHANNEL,
    "fl-admin rotate-channel-key --role snapshot": ROTATE_PACKAGE_AND_CHANNEL,
    "fl-admin rotate-channel-key --role timestamp": ROTATE_PACKAGE_AND_CHANNEL,
    "fl-admin rotate-channel-key --role root --root-keys 3": ROTATE_PACKAGE_AND_CHANNEL,
    "fl-admin add-device-key --client-id dev-7 --public-key client_key.next.pub.pem": (
        ROTATE_DEVICE
    ),
    # -- device: fl-client
    "fl-client keygen --out state/client_key.pem": ADMIN + "test_init_enroll_status_revoke",
    "fl-client run": CLIENT_RUN,
    "fl-client run --config client.json": CLIENT_RUN,
    "fl-client status": ADMIN + "test_init_enroll_status_revoke",
    "fl-client status --config client.json [--json]": ADMIN + "test_init_enroll_status_revoke",
    "fl-client score windows.npy --config client.json": (
        "tests/test_personalization.py::test_device_calibrates_keeps_it_local_and_scores_with_it"
    ),
    "fl-client verify-bundle BUNDLE --config client.json": OFFLINE,
    "fl-client install-bundle BUNDLE --config client.json": OFFLINE,
    "fl-client rotate-key --config client.json": ROTATE_DEVICE,
    "fl-client rotate-key --config client.json --activate": ROTATE_DEVICE,
    # -- everything else
    "set -a; . .state/demo/operator.env; set +a; .venv/bin/fl-admin status": (
        "tests/test_demo.py::test_the_printed_operator_command_runs_fl_admin_status"
    ),
    'export AIRFLOW_CONN_FL_S3=\'{"conn_type": "aws", "login": "KEY", "password": '
    '"SECRET", "extra": {"endpoint_url": "http://127.0.0.1:8333", "region_name": '
    '"us-east-1"}}\'': (
        "tests/test_readme_commands.py::test_the_printed_connection_export_is_what_the_dags_read"
    ),
    "airflow api-server": (
        "tests/test_plugin_api.py::test_json_api_with_a_token_matches_the_reports"
    ),
    "python -m bench.dp --json": "tests/test_bench_small.py::test_dp_small",
    "python -m bench.fleet --json": "tests/test_bench_fleet.py::test_fleet_small",
    "python -m bench.logquality --json": (
        "tests/test_bench_logquality.py::test_a_tiny_run_reports_both_paths_side_by_side"
    ),
    GAP + "--max-active-runs 1": BACKFILL,
    GAP + "--max-active-runs 1 --reprocess-behavior completed": BACKFILL,
    "airflow dags unpause fl_round": BACKFILL,
    "python -m bench.report": DOCS,
    "make docs": DOCS,
    "make test": ".ci/run",
    "make lint": ".ci/run",
    "make browser": ".ci/run",
    "make demo": "NOT RUN: starts SeaweedFS, airflow standalone (fixed ports, .state/demo) and "
    "five devices for minutes; tests/test_demo.py runs the operator command it prints",
    "make demo-stop": "NOT RUN: stops what make demo started",
    "airflow standalone": "NOT RUN: what make demo starts (tests start api-server, scheduler "
    "and dag-processor one by one: tests/security/test_faults.py)",
    "make bench": "NOT RUN: the performance suite (about 35 minutes, results committed in "
    "bench/results/); tests/test_bench_small.py runs each module small",
    "make bench-quality": "NOT RUN: the quality suite (about 70 minutes, results committed "
    "in bench/results/); tests/test_bench_small.py runs each module small",
    "pip install .[client]": "NOT RUN: an install from PyPI (CI's make test installs .venv)",
    "cp .env.example .env": COMPOSE,
    "mkdir -p secrets/dadm-fl deploy/holdout": COMPOSE,
    "sudo chown 50000 secrets/dadm-fl": COMPOSE,
    "docker compose build && docker compose up -d": COMPOSE,
    "docker compose --profile celery up -d": COMPOSE,
}
NOT_RUN = {
    "make demo",
    "make demo-stop",
    "airflow standalone",
    "make bench",
    "make bench-quality",
    "pip install .[client]",
    "cp .env.example .env",
    "mkdir -p secrets/dadm-fl deploy/holdout",
    "sudo chown 50000 secrets/dadm-fl",
    "docker compose build && docker compose up -d",
    "docker compose --profile celery up -d",
}
# For rows that are not fl-admin/fl-client: a string the named test's source contains.
EVIDENCE = {
    "set -a; . .state/demo/operator.env; set +a; .venv/bin/fl-admin status": "operator_command",
    "airflow api-server": "dashboard_server",
    "python -m bench.dp --json": "dp_main",
    "python -m bench.fleet --json": "fleet_main",
    "python -m bench.logquality --json": "logquality.main",
    "python -m bench.report": '"-m", "bench.report"',
    GAP + "--max-active-runs 1": "readme_backfill_commands()",
    GAP + "--max-active-runs 1 --reprocess-behavior completed": "readme_backfill_commands()",
    "airflow dags unpause fl_round": "readme_backfill_commands()",
    "make docs": "$(BIN)/python -m bench.report",
}


def readme_commands(text: str) -> list[str]:
    """Each command line of the README's code blocks (comments cut, a quoted value that
    continues on the next line joined) and each command in inline code, as printed."""
    out: set[str] = set()
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            command = re.split(r"\s+# ", lines[i])[0].strip()
            if command.startswith(STARTS):
                while command.count("'") % 2 and i + 1 < len(lines):
                    i += 1
                    command += " " + lines[i].strip()
                out.add(re.sub(r"\s+", " ", command))
            i += 1
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    out.update(span.strip() for span in re.findall(r"`([^`\n]+)`", prose) if INLINE.match(span))
    return sorted(out)


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_the_table_names_exactly_the_readme_commands():
    missing = sorted(set(COMMANDS) - set(TABLE))
    stale = sorted(set(TABLE) - set(COMMANDS))
    assert not missing, f"README commands with no row in TABLE: {missing}"
    assert not stale, f"TABLE rows the README no longer prints: {stale}"
    assert {c for c, runner in TABLE.items() if runner.startswith("NOT RUN")} == NOT_RUN


def test_the_readme_shows_the_operator_and_device_commands():
    subcommands = {tuple(c.split()[:2]) for c in COMMANDS if c.startswith("fl-")}
    for sub in ("init", "enroll", "revoke", "holdout", "status", "round", "config", "rollback"):
        assert ("fl-admin", sub) in subcommands
    for sub in ("keygen", "run", "status", "verify-bundle", "install-bundle"):
        assert ("fl-client", sub) in subcommands


@cache
def module_tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text())


def runner_source(node_id: str) -> tuple[set[str], set[str], str]:
    """(string constants, called names, source) of a test and of the module-level helpers
    it calls (one level)."""
    path, name = node_id.split("::")
    assert (ROOT / path).is_file(), f"{node_id}: no such file"
    tree = module_tree(path)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert name in functions, f"{node_id}: no such test"
    nodes = [functions[name]]
    called = {
        n.func.id
        for n in ast.walk(nodes[0])
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    nodes += [functions[c] for c in sorted(called) if c in functions and c != name]
    strings: set[str] = set()
    calls: set[str] = set()
    for fn in nodes:
        for n in ast.walk(fn):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                strings.add(n.value)
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
                calls.add(n.func.id)
    source = "\n".join(ast.get_source_segment((ROOT / path).read_text(), fn) or "" for fn in nodes)
    return strings, calls, source


@pytest.mark.parametrize("command", sorted(TABLE))
def test_each_row_is_run_where_the_table_says(command):
    runner = TABLE[command]
    if runner.startswith("NOT RUN: "):
        assert len(runner) > len("NOT RUN: ") + 10, "say why it is not run"
        return
    if runner == ".ci/run":
        ci = (ROOT / ".ci/run").read_text()
        assert re.search(r"^make test$", ci, re.M), "CI no longer runs make test"
        target = command.split()[1]
        deps = re.search(r"^test:(.*)$", (ROOT / "Makefile").read_text(), re.M)
        assert target == "test" or (deps and target in deps.group(1).split()), command
        return
    strings, calls, source = runner_source(runner)
    program = command.split()[0]
    if program not in PARSERS:
        assert EVIDENCE.get(command, "test_") in source, (command, runner)
        return
    argv = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", command))[1:]
    if len(argv) > 1:  # a whole command: it parses with the real CLI
        PARSERS[program]().parse_args(argv)
    assert calls & CLI_CALLERS[program], f"{runner} does not call the {program} entry point"
    words = [argv[0]] + ([argv[1]] if argv[0] in {"bundles", "credentials", "privacy"} else [])
    options = [a for a in argv if a.startswith("--")]
    if command.endswith("--root-keys 3"):
        options.append("3")  # the value is the point of this row
    if "--suite" in argv or "--role" in argv:  # the named suite or role itself
        options.append(argv[argv.index("--suite" if "--suite" in argv else "--role") + 1])
    absent = [w for w in [*words, *options] if w not in strings]
    assert not absent, f"{runner} never passes {absent} to {program}"


def test_the_printed_connection_export_is_what_the_dags_read(tmp_path):
    """The README's ``export AIRFLOW_CONN_FL_S3=...`` line, run by /bin/sh, sets JSON with
    the fields of the connection the deployment writes for Airflow."""
    from fedlib.storage.store import S3Config

    (line,) = [c for c in COMMANDS if c.startswith("export AIRFLOW_CONN_FL_S3=")]
    done = subprocess.run(
        ["/bin/sh", "-c", f'{line}; printf %s "$AIRFLOW_CONN_FL_S3"'],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        check=True,
    )
    printed = json.loads(done.stdout)
    ours = S3Config(
        endpoint_url="http://127.0.0.1:8333", access_key="KEY", secret_key="SECRET"
    ).airflow_connection()
    assert printed == ours


def test_make_docs_runs_bench_report_which_changes_nothing(tmp_path):
    """``make docs`` is ``python -m bench.report``; run in a copy of the documents and the
    committed results (it rewrites files in place), it leaves every document as committed."""
    recipe = re.search(r"^docs:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe and recipe.group(1).strip() == "$(BIN)/python -m bench.report"
    documents = ["README.md", "RELIABILITY.md", "docs/scale-out.md"]
    for name in [*documents, "bench/__init__.py", "bench/report.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results")
    done = subprocess.run(
        [sys.executable, "-m", "bench.report"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for name in documents:
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), name

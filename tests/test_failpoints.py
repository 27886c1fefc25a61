"""Failpoints kill their own process with SIGKILL, only when armed, once per marker dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedlib import failpoints
from fedlib.files import TMP_PREFIX

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with only these failpoint variables set."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DADM_FAILPOINTS")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
    )


REACH = (
    "from fedlib import failpoints\n"
    "print('before', flush=True)\n"
    "failpoints.failpoint(failpoints.SHARD_AFTER_PARTIAL)\n"
    "print('after', flush=True)\n"
)


def test_an_unarmed_point_does_nothing():
    done = python(REACH, DADM_FAILPOINTS="rollback.after_pin")
    assert done.returncode == 0 and done.stdout.split() == ["before", "after"]


def test_an_armed_point_kills_the_process_with_sigkill():
    done = python(REACH, DADM_FAILPOINTS=" spool.torn_write , shard.after_partial ")
    assert done.returncode == -signal.SIGKILL and done.stdout.split() == ["before"]


def test_with_a_marker_dir_a_point_fires_once(tmp_path):
    armed = {"DADM_FAILPOINTS": "shard.after_partial", "DADM_FAILPOINTS_ONCE_DIR": str(tmp_path)}
    first, second = python(REACH, **armed), python(REACH, **armed)
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0 and second.stdout.split() == ["before", "after"]
    assert (tmp_path / "shard.after_partial").read_text() != ""  # the pid that died


def test_an_unknown_name_is_an_error_not_a_silent_no_op():
    done = python(REACH, DADM_FAILPOINTS="shard.after_partal")
    assert done.returncode == 1 and "unknown failpoints ['shard.after_partal']" in done.stderr
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.failpoint("no.such.point")


def test_a_torn_atomic_write_leaves_half_the_bytes_in_a_temp_file_and_no_target(tmp_path):
    code = (
        "from fedlib import failpoints\n"
        "from fedlib.files import atomic_write\n"
        f"atomic_write({str(tmp_path / 'x.env')!r}, bytes(range(200)) * 5,"
        " torn_point=failpoints.SPOOL_TORN_WRITE)\n"
    )
    assert python(code, DADM_FAILPOINTS="spool.torn_write").returncode == -signal.SIGKILL
    (torn,) = tmp_path.iterdir()
    assert torn.name.startswith(TMP_PREFIX) and torn.read_bytes() == (bytes(range(200)) * 5)[:500]
    # the same write, unarmed (or already fired): the whole file, no temp left
    assert python(code).returncode == 0
    assert (tmp_path / "x.env").read_bytes() == bytes(range(200)) * 5

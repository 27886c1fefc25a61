"""The operator's command line after ``make demo``: the env file the demo writes and the
exact ``set -a; . ...operator.env; set +a; .venv/bin/fl-admin status`` line it prints,
run by a real shell from the repository root against a real SeaweedFS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from scripts import demo

ROOT = Path(__file__).resolve().parents[1]


def shell(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``line`` in /bin/sh as an operator's fresh shell would run it: none of the test's
    FL_*/AWS_* variables, no AWS files or instance metadata to fall back on."""
    env = demo.bare_env()
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
    )
    return subprocess.run(
        ["/bin/sh", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_printed_operator_command_runs_fl_admin_status(
    seaweed_factory: Any, small_dataset: Path, tmp_path: Path
) -> None:
    from bench.make_dataset import load_dataset

    server = seaweed_factory()  # the demo's default bucket names: a server of its own
    home = tmp_path / "demo"
    home.mkdir()
    config = demo.write_server_config(home, server.endpoint_url)
    creds = server.admin_credentials
    env_file = demo.write_operator_env(home, config, creds.access_key, creds.secret_key)
    assert env_file.stat().st_mode & 0o777 == 0o600  # it holds the S3 secret
    assert creds.secret_key in env_file.read_text()

    data = load_dataset(small_dataset)
    holdout = tmp_path / "holdout.npz"
    np.savez(holdout, holdout_X=data.holdout_X, holdout_y=data.holdout_y)
    init = shell(demo.operator_command(home, "init", "--holdout", str(holdout)), ROOT)
    assert init.returncode == 0, init.stderr

    line = demo.operator_command(home, "status")
    fl_admin = demo.shown(Path(sys.executable).parent / "fl-admin")  # .venv/bin/fl-admin here
    assert line.startswith("set -a; . ") and line.endswith(f"; set +a; {fl_admin} status")
    status = shell(line, ROOT)
    assert status.returncode == 0, status.stderr
    assert "active version:  1" in status.stdout and "quarantined:     0" in status.stdout

    # the same command without the env file: exit 1, and the reason names what to set
    installed = Path(sys.executable).parent / "fl-admin"
    bare = shell(f"{installed} status", tmp_path)
    assert bare.returncode == 1
    [reason] = bare.stderr.splitlines()
    assert reason.startswith("fl-admin: no S3 credentials for AWS S3")
    for name in ("FL_S3_ACCESS_KEY", "FL_S3_SECRET_KEY", "FL_SERVER_CONFIG", "s3_endpoint_url"):
        assert name in reason
    # settings found, keys missing: it names the endpoint and only what is missing
    half = shell(f"FL_SERVER_CONFIG={config} FL_S3_ACCESS_KEY=x {installed} status", tmp_path)
    assert half.returncode == 1
    assert f"no S3 credentials for {server.endpoint_url}: set FL_S3_SECRET_KEY " in half.stderr
    assert f"settings from {config}" in half.stderr

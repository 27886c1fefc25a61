"""The embedded demo (``make demo``): a whole federated round on this machine.

Starts a local S3 server (SeaweedFS, 127.0.0.1), initialises a deployment with
``fl-admin init``, enrolls simulated devices fed from the synthetic fleet, runs each
device's real ``fl-client run`` cycle, runs a round, lets the devices pull the result,
and prints the outcome and the operator's ``fl-admin`` command line (its environment,
settings file and S3 keys, is ``.state/demo/operator.env``, mode 0600). Everything lives
under ``.state/demo``; ``make demo-stop``
(``python -m scripts.demo stop``) ends exactly what this started.

The round runs in Airflow: ``airflow standalone`` (SQLite, LocalExecutor) starts in the
background with this repository's ``dags/`` and ``plugins/``, and the demo triggers
``fl_round`` through Airflow's REST API and waits for it. The demo's DAG has no
schedule (``schedule = "none"``) so the run you see is the one it triggered; a real
deployment keeps the default 15-minute schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedlib.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"\033[1m==> {message}\033[0m", flush=True)


def run(cmd: list[str], env: dict[str, str], *, quiet: bool = False) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"demo: command failed ({proc.returncode}): {' '.join(cmd)}")
    if not quiet and proc.stdout.strip():
        print("    " + proc.stdout.strip().replace("\n", "\n    "), flush=True)
    return proc.stdout


def start(args: argparse.Namespace) -> int:
    from bench.make_dataset import load_dataset, make_dataset, save_dataset

    started = time.monotonic()
    home = Path(args.dir).resolve()
    stop(args)  # a demo always starts from scratch
    if home.exists():
        import shutil

        shutil.rmtree(home)
    home.mkdir(parents=True)

    say(f"synthetic fleet: {args.clients} devices, 40 log templates")
    dataset_path = home / "fleet.npz"
    save_dataset(make_dataset(clients=max(args.clients, 2), seed=args.seed), dataset_path)
    data = load_dataset(dataset_path)
    holdout_path = home / "holdout.npz"
    np.savez(
        holdout_path,
        holdout_X=data.holdout_X,
        holdout_y=data.holdout_y,
        feature_names=np.asarray(data.feature_names, dtype=str),
    )

    say("starting the local S3 server (SeaweedFS on 127.0.0.1)")
    out = run(
        [str(BIN / "python"), "-m", "scripts.seaweed", "start", "--dir", str(home / "s3")],
        dict(os.environ),
        quiet=True,
    )
    server = json.loads((home / "s3" / "server.json").read_text())
    print(f"    {out.strip()}")

    config = write_server_config(home, server["endpoint_url"])
    write_operator_env(home, config, server["access_key"], server["secret_key"])
    env = dict(os.environ)
    env.update(
        FL_SERVER_CONFIG=str(config),
        FL_S3_ACCESS_KEY=server["access_key"],
        FL_S3_SECRET_KEY=server["secret_key"],
    )
    admin = [str(BIN / "fl-admin")]
    client = [str(BIN / "fl-client")]

    say("fl-admin init: server keys, buckets, holdout, model version 1")
    run([*admin, "init", "--holdout", str(holdout_path)], env)

    devices = []
    for cid in data.client_ids[: args.clients]:
        device = home / "devices" / cid
        (device / "features").mkdir(parents=True, exist_ok=True)
        np.save(device / "features" / "windows.npy", data.clients[cid])
        run([*client, "keygen", "--out", str(device / "state" / "client_key.pem")], env, quiet=True)
        run(
            [
                *admin,
                "enroll",
                cid,
                "--public-key",
                str(device / "state" / "client_key.pub.pem"),
                "--out",
                str(device / "client.json"),
            ],
            env,
        )
        devices.append(device)

    say(f"{len(devices)} devices run their cron cycle: pull, verify, train, seal, upload")
    for device in devices:
        run([*client, "run", "--config", str(device / "client.json")], env)

    say("starting Airflow (airflow standalone) in the background")
    airflow = start_airflow(home, env, server)
    say("triggering fl_round through the REST API: verify, decrypt, aggregate, evaluate, publish")
    run_id = airflow.trigger("fl_round")
    state = airflow.wait("fl_round", run_id, timeout=600)
    if state != "success":
        raise SystemExit(f"demo: fl_round run {run_id} ended {state}; see {airflow.url}")
    report = json.loads(
        run(
            [str(BIN / "python"), "-m", "scripts.demo", "report", "--run-id", run_id],
            env,
            quiet=True,
        )
    )

    say("devices pull the new model")
    for device in devices:
        run([*client, "run", "--config", str(device / "client.json")], env)

    # the operator's own command, exactly as printed below, in an environment without
    # the demo's variables: it must work from the repository root after the demo
    status = json.loads(
        run(["/bin/sh", "-c", operator_command(home, "status", "--json")], bare_env(), quiet=True)
    )
    say("outcome")
    before = report["active_metrics"].get("auc")
    after = report["candidate_metrics"].get("auc")
    print(f"    decision:          {report['decision']} ({report['message']})")
    print(
        f"    updates:           {report['accepted']} accepted, "
        f"{sum(report['rejected'].values())} rejected {report['rejected']}"
    )
    if before is not None and after is not None:
        print(
            f"    holdout AUC:       version {report['base_version']} {before:.3f} -> "
            f"candidate {after:.3f}"
        )
    print(
        f"    versions:          {[v['version'] for v in status['versions']]}, "
        f"active {status['active_version']}"
    )
    print(f"    S3 endpoint:       {server['endpoint_url']} (state in {home})")
    print(f"    Airflow UI:        {airflow.url}  (login admin / {airflow.password})")
    print(f"    Rounds dashboard:  {airflow.url}/dadm-fl/rounds  ('FL rounds' in the UI menu)")
    print(f"    Operator CLI:      {operator_command(home, 'status')}")
    print(f"    took {time.monotonic() - started:.1f}s; stop with: make demo-stop")
    return 0 if report["decision"] in ("published", "rejected") else 1


OPERATOR_ENV = "operator.env"


def write_server_config(home: Path, endpoint_url: str) -> Path:
    """The demo's fl-server.toml: its keys folder, the local S3 endpoint, a manual round."""
    config = home / "fl-server.toml"
    config.write_text(
        "\n".join(
            [
                f'keys_dir = "{home / "keys"}"',
                f's3_endpoint_url = "{endpoint_url}"',
                "min_clients = 2",
                'schedule = "none"',
                "",
            ]
        )
    )
    return config


def write_operator_env(home: Path, config: Path, access_key: str, secret_key: str) -> Path:
    """What an operator's shell needs for ``fl-admin`` against the demo: the settings file
    and the S3 keys (FL_S3_*). It holds a secret, so mode 0600 from the first byte."""
    path = home / OPERATOR_ENV
    values = {
        "FL_SERVER_CONFIG": str(config),
        "FL_S3_ACCESS_KEY": access_key,
        "FL_S3_SECRET_KEY": secret_key,
    }
    lines = [f"# fl-admin against the demo: {operator_command(home, 'status')}"]
    lines += [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    atomic_write(path, ("\n".join(lines) + "\n").encode(), mode=0o600)
    return path


def shown(path: Path) -> str:
    """A path as typed from the repository root: relative inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def operator_command(home: Path, *args: str) -> str:
    """The shell line that runs ``fl-admin`` against the demo from the repository root,
    e.g. ``set -a; . .state/demo/operator.env; set +a; .venv/bin/fl-admin status``."""
    env_file = shown(home / OPERATOR_ENV)
    fl_admin = shown(BIN / "fl-admin")
    command = " ".join(shlex.quote(part) for part in (fl_admin, *args))
    return f"set -a; . {shlex.quote(env_file)}; set +a; {command}"


def bare_env() -> dict[str, str]:
    """This process's environment without fedlib's or AWS's variables: a fresh shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "AWS_"))}


class Airflow:
    """A running ``airflow standalone`` and a REST client for it (JWT from /auth/token)."""

    def __init__(self, url: str, password: str) -> None:
        self.url = url
        self.password = password
        self._token: str | None = None

    def _headers(self) -> dict[str, str]:
        import requests

        if self._token is None:
            resp = requests.post(
                f"{self.url}/auth/token",
                json={"username": "admin", "password": self.password},
                timeout=10,
            )
            resp.raise_for_status()
            self._token = resp.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def api(self, method: str, path: str, **kwargs):
        import requests

        resp = requests.request(
            method, f"{self.url}/api/v2{path}", headers=self._headers(), timeout=30, **kwargs
        )
        resp.raise_for_status()
        return resp.json()

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        deadline = time.monotonic() + 120
        while True:  # the DAG processor needs a moment to parse the file
            try:
                self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        run = self.api(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}}
        )
        return run["dag_run_id"]

    def wait(self, dag_id: str, run_id: str, *, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state != last:
                print(f"    {dag_id} {run_id}: {state}", flush=True)
                last = state
            if state in ("success", "failed"):
                return state
            time.sleep(2)
        return "timeout"


def free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def start_airflow(home: Path, env: dict[str, str], server: dict) -> Airflow:
    import requests

    from fedlib.storage.store import S3Config

    airflow_home = home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    port = free_port(8080)
    conn = S3Config(
        server["endpoint_url"], access_key=server["access_key"], secret_key=server["secret_key"]
    ).airflow_connection()
    af_env = dict(env)
    af_env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW_CONN_FL_S3=json.dumps(conn),
    )
    log = (airflow_home / "standalone.log").open("ab")
    proc = subprocess.Popen(
        [str(BIN / "airflow"), "standalone"],
        env=af_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=airflow_home,
    )
    (home / "airflow.pid").write_text(str(proc.pid))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: airflow standalone exited; see {airflow_home}/standalone.log")
        try:
            health = requests.get(f"{url}/api/v2/monitor/health", timeout=2).json()
            if all(v.get("status") == "healthy" for k, v in health.items() if k != "triggerer"):
                break
        except (requests.RequestException, ValueError):
            pass
        time.sleep(2)
    else:
        raise SystemExit(f"demo: Airflow did not become healthy; see {airflow_home}")
    secret = airflow_home / "simple_auth_manager_passwords.json.generated"
    password = json.loads(secret.read_text())["admin"]
    print(f"    Airflow API server at {url} (pid {proc.pid})")
    return Airflow(url, password)


def report(args: argparse.Namespace) -> int:
    """Print a round's report from the state bucket (runs with the demo's environment)."""
    from fedlib.server.deployment import Deployment
    from fedlib.server.settings import ServerSettings
    from fedlib.server.state_keys import RunKeys

    deployment = Deployment(ServerSettings.load())
    print(deployment.state.get(RunKeys(args.run_id).report).decode())
    return 0


def stop(args: argparse.Namespace) -> int:
    """End exactly what start began: the Airflow process group and the S3 server."""
    import signal

    home = Path(args.dir).resolve()
    pid_file = home / "airflow.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                time.sleep(0.2)
                os.killpg(pid, 0)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid_file.unlink()
        print(f"demo: stopped Airflow (process group {pid})")
    if (home / "s3" / "server.json").exists():
        subprocess.run(
            [str(BIN / "python"), "-m", "scripts.seaweed", "stop", "--dir", str(home / "s3")],
            check=False,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "report"])
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--dir", default=str(ROOT / ".state" / "demo"))
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return {"start": start, "stop": stop, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

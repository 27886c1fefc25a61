"""Scale-out: one real ``fl_round`` over N queued updates with 1 and with 2 task workers.

    python -m bench.scaleout --updates 10000 --json [--clients N] [--shard-size 1000]
        [--executor local|celery] [--repeat N]

Why: issue 6 asks whether a round scales by adding workers. The round's heavy phase is
``process_shard`` (verify, decrypt, validate, sum), mapped over shards; everything else
is serial. This measures that phase on the real stack: a SeaweedFS server, a deployment
initialised like the demo (``fl-admin init``: keys, buckets, holdout, model version 1),
``--clients`` enrolled Ed25519 identities, and Airflow's LocalExecutor running the
repository's ``dags/``. Updates are crafted like ``tests/security/test_load.py`` (random
top-k deltas, sealed to the server key, signed, 16 upload threads).

How the worker count is set: ``[core] parallelism`` is what bounds LocalExecutor in
Airflow 3.3 (``BaseExecutor`` takes it as its slot count, ``LocalExecutor.start`` forks
that many worker processes, and the scheduler queues no more task instances than
that). The API server and the DAG processor stay up; only the scheduler restarts, with
``AIRFLOW__CORE__PARALLELISM`` 1 and then 2 (the DAG's own cap,
``max_active_tis_per_dagrun=8``, is above both). ``[workers] min_heartbeat_interval``
is 1 s (``--heartbeat``; Airflow's default 5 s): the task supervisor was seen to notice a
finished task only at its next wakeup, leaving idle gaps between serial tasks that a
second worker hides, which inflated the speedup.

Same contents for both runs: before each run the inbox is filled with ``--updates``
freshly crafted updates (same size, same clients; a round consumes its inbox), and each
run's report (``reports/<run>.json`` in the state bucket) and the ledger must account
for every one of them. Timings come from the task instances' start/end dates over the
REST API: shard phase = first ``process_shard`` start to last end; whole run = the DAG
run's start to end; ``speedup`` = 1-worker shard phase / 2-worker shard phase. On a
2-core machine SeaweedFS, the scheduler, the API server and the task processes share the
cores, so expect a modest speedup (``shard_phase_cpu_busy`` shows how busy the whole
machine was).

``--repeat N`` runs each worker count N times, interleaved (1, 2, 1, 2...), each with a
fresh inbox; the top-level figures and ``median`` are medians over those runs, ``runs``
keeps every run.

``--executor celery``: the same measurement on CeleryExecutor (PostgreSQL for metadata
and results, Redis as broker, ``make redis``): one ``airflow celery worker`` process per
worker (concurrency 1), each with its own AIRFLOW_HOME, working and temporary directory,
copy of ``dags/`` and copy of the keys; the API server, DAG processor and scheduler hold
no keys. Workers are started afresh for each measurement; ``shards_per_host`` says which
worker ran how many shards.

All state lives in a temp dir (``--dir`` to keep it; kept on error, for the logs);
every process started here is stopped at the end, also on error. Progress goes to
stderr, one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.crafted import enroll_fleet, upload_crafted

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAG_ID = "fl_round"


_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"scaleout [{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ processes


class Group:
    """A background command in its own process group (so stopping it ends its children)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        from scripts.seaweed import _die_with_parent

        self.name = name
        self.log = log
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=log.parent,
                preexec_fn=_die_with_parent,  # a killed benchmark leaks no Airflow
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group, if any
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def worker_name() -> str:
    """``[core] hostname_callable`` of the Celery workers started here: workers on one
    machine share its hostname, so each names itself (``DADM_WORKER_NAME``) and the task
    instances say which worker ran them."""
    return os.environ.get("DADM_WORKER_NAME") or socket.getfqdn()


class Redis:
    """A throwaway ``redis-server`` on 127.0.0.1 (the Celery broker), nothing on disk."""

    def __init__(self, home: Path) -> None:
        from scripts.postgres import free_port

        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.port = free_port()
        self.group: Group | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make redis)")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(self.home), "--protected-mode", "yes"]
        self.group = Group("redis", cmd, dict(os.environ), self.home / "redis.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.group.alive():
                raise RuntimeError(f"redis-server exited; see {self.group.log}")
            with contextlib.suppress(OSError), _connect(self.port) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.group is not None:
            self.group.stop()
            self.group = None


def worker_name_host() -> str:
    """The ``%h`` Celery puts in a worker's name: this machine's hostname."""
    return socket.gethostname()


def _connect(port: int) -> Any:
    return socket.create_connection(("127.0.0.1", port), timeout=2)


def celery_env(postgres: Any, redis: Redis) -> dict[str, str]:
    """CeleryExecutor settings: metadata and task results in PostgreSQL, Redis brokers;
    each worker takes one task at a time (so two workers split the shards)."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url("airflow", "postgresql+psycopg2"),
        "AIRFLOW__CELERY__BROKER_URL": redis.url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres.url("airflow", "postgresql+psycopg2"),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
    }


def private_copy(config: Path, folder: Path, *, keys: bool) -> Path:
    """A machine's own ``fl-server.toml`` in ``folder``: its ``keys_dir`` is a private
    copy of the deployment's keys (``keys``: what a worker's secrets mount holds), or a
    folder that does not exist (the scheduler, DAG processor and API server hold none)."""
    import tomllib

    settings = tomllib.loads(config.read_text())
    own_keys = folder / ("keys" if keys else "no-keys-here")
    if keys:
        shutil.copytree(settings["keys_dir"], own_keys)
        own_keys.chmod(0o700)
    lines = [
        line
        for line in config.read_text().splitlines()
        if not line.replace(" ", "").startswith("keys_dir=")
    ]
    own = folder / "fl-server.toml"
    own.write_text("\n".join([f'keys_dir = "{own_keys}"', *lines]) + "\n")
    return own


class Airflow:
    """API server + DAG processor for the whole benchmark; one scheduler per measured run;
    with ``executor_env`` from :func:`celery_env`, Celery workers (:meth:`start_worker`)."""

    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        conn: dict[str, Any],
        *,
        heartbeat_s: int,
        executor_env: dict[str, str] | None = None,
    ) -> None:
        from scripts.demo import free_port

        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        port = free_port(8080)
        self.url = f"http://127.0.0.1:{port}"
        # Only this benchmark's Airflow settings: none inherited (e.g. a test session's
        # AIRFLOW_HOME or UNIT_TEST_MODE), so both runs and every machine see the same.
        self.env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            AIRFLOW_HOME=str(home),
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
            AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.url}/execution/",
            AIRFLOW__API__PORT=str(port),
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__BASE_URL=self.url,
            # Separate components must agree on the JWT secret (standalone shares one).
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
            AIRFLOW__API__SECRET_KEY=secrets.token_urlsafe(32),
            AIRFLOW_CONN_FL_S3=json.dumps(conn),
            # The task supervisor wakes every min_heartbeat_interval (default 5 s) and was
            # seen to notice a finished task only then: idle gaps between serial tasks
            # that a second worker hides, inflating the speedup. See --heartbeat.
            AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL=str(heartbeat_s),
        )
        self.env.update(executor_env or {})
        self.groups: list[Group] = []
        self.workers: list[Group] = []
        self.scheduler: Group | None = None
        self.client: Any = None

    def start(self, *, unpause: bool = True) -> None:
        """Migrate the metadata DB, start the API server and DAG processor, wait until the
        DAG is parsed; ``unpause``: then unpause it (else it stays as it was created)."""
        from scripts.demo import Airflow as RestClient

        proc = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=self.home,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{proc.stdout}{proc.stderr}")
        for name in ("api-server", "dag-processor"):
            self.groups.append(self._spawn(name, self.env))
        self._wait(lambda: self._health() is not None, "the API server", 180)
        secret = self.home / "simple_auth_manager_passwords.json.generated"
        self._wait(secret.exists, "the generated admin password", 30)
        self.client = RestClient(self.url, json.loads(secret.read_text())["admin"])
        self._wait(lambda: self._dag_parsed(unpause), f"the DAG processor to parse {DAG_ID}", 180)

    def _spawn(self, name: str, env: dict[str, str]) -> Group:
        return Group(name, [str(BIN / "airflow"), name], env, self.home / f"{name}.log")

    def _wait(self, ready: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [g.name for g in self.groups if not g.alive()]
            if dead:
                raise RuntimeError(f"airflow {dead} exited; logs in {self.home}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(1)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.home}")

    def _health(self) -> dict[str, Any] | None:
        import requests

        resp = requests.get(f"{self.url}/api/v2/monitor/health", timeout=3)
        health = resp.json()
        return health if health["metadatabase"]["status"] == "healthy" else None

    def _dag_parsed(self, unpause: bool) -> bool:
        dag = self.client.api("GET", f"/dags/{DAG_ID}")
        if unpause and dag.get("is_paused"):
            self.client.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
        return True

    def start_worker(self, name: str, fl_config: Path) -> Group:
        """``airflow celery worker`` as its own machine would run it: its own
        AIRFLOW_HOME, working directory, temporary directory, copy of the DAG files (what
        an image ships) and copy of the keys; it shares only S3, PostgreSQL and Redis with
        the rest. Waits until the worker answers Celery's ping."""
        base = self.home.parent / name
        if base.exists():  # a worker of an earlier measurement: a fresh machine
            shutil.rmtree(base)
        base.mkdir(parents=True)
        (base / "tmp").mkdir()
        dags = shutil.copytree(ROOT / "dags", base / "dags")
        env = dict(
            self.env,
            AIRFLOW_HOME=str(base / "airflow-home"),
            AIRFLOW__CORE__DAGS_FOLDER=str(dags),
            AIRFLOW__CORE__PLUGINS_FOLDER=str(base / "plugins"),
            AIRFLOW__CORE__HOSTNAME_CALLABLE="bench.scaleout.worker_name",
            DADM_WORKER_NAME=name,
            FL_SERVER_CONFIG=str(private_copy(fl_config, base, keys=True)),
            TMPDIR=str(base / "tmp"),
            PYTHONPATH=str(ROOT),  # bench.scaleout.worker_name; fedlib is installed
        )
        cmd = [str(BIN / "airflow"), "celery", "worker", "--concurrency", "1"]
        cmd += ["--celery-hostname", f"{name}@%h"]
        group = Group(name, cmd, env, base / "worker.log")
        self.groups.append(group)
        self.workers.append(group)

        def answers() -> bool:
            ping = [str(BIN / "celery"), "--app"]
            ping += ["airflow.providers.celery.executors.celery_executor.app", "inspect"]
            ping += ["ping", "-d", f"{name}@{worker_name_host()}", "--timeout", "2"]
            done = subprocess.run(ping, env=env, capture_output=True, text=True, cwd=base)
            return done.returncode == 0

        self._wait(answers, f"Celery worker {name}", 120)
        return group

    def start_scheduler(self, parallelism: int, **env_overrides: str) -> None:
        """A fresh scheduler whose LocalExecutor forks ``parallelism`` workers (or whose
        CeleryExecutor queues at most that many tasks); ``env_overrides`` on top."""
        self.stop_scheduler()
        began = datetime.now().astimezone()
        env = dict(self.env, AIRFLOW__CORE__PARALLELISM=str(parallelism), **env_overrides)
        self.scheduler = self._spawn("scheduler", env)
        self.groups.append(self.scheduler)

        def beating() -> bool:
            beat = (self._health() or {}).get("scheduler", {}).get("latest_scheduler_heartbeat")
            return bool(beat) and datetime.fromisoformat(beat) > began

        self._wait(beating, f"a scheduler with parallelism {parallelism}", 120)

    def stop_workers(self) -> None:
        for group in self.workers:
            group.stop()
            self.groups.remove(group)
        self.workers.clear()

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.groups.remove(self.scheduler)
            self.scheduler = None

    def run_dag(
        self, conf: dict[str, Any], timeout: float
    ) -> tuple[str, dict, list[dict], list[tuple[float, int, int]]]:
        """Trigger, wait; (state, the DAG run, its task instances, CPU samples)."""
        samples = [cpu_sample()]
        run = self.client.api(
            "POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}
        )
        run_id = run["dag_run_id"]
        deadline = time.monotonic() + timeout
        while True:
            run = self.client.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed") or time.monotonic() > deadline:
                break
            if self.scheduler is not None and not self.scheduler.alive():
                raise RuntimeError(f"the scheduler exited; see {self.scheduler.log}")
            time.sleep(1)
            samples.append(cpu_sample())
        tis: list[dict] = []
        while True:
            page = self.client.api(
                "GET",
                f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": len(tis)},
            )
            tis += page["task_instances"]
            if not page["task_instances"] or len(tis) >= page["total_entries"]:
                break
        state = run["state"] if run["state"] in ("success", "failed") else "timeout"
        return state, run, tis, samples

    def stop(self) -> None:
        for group in reversed(self.groups):
            group.stop()
        self.groups.clear()
        self.workers.clear()
        self.scheduler = None


# ------------------------------------------------------------------------------ deployment


def init_deployment(home: Path, server: Any, shard_size: int, max_batch: int) -> Any:
    """``fl-admin init`` as the demo runs it; returns the deployment and its environment."""
    from bench.make_dataset import make_dataset
    from fedlib.server.deployment import Deployment
    from fedlib.server.settings import ServerSettings

    data = make_dataset(clients=2, windows_per_client=50, seed=0)
    holdout = home / "holdout.npz"
    np.savez(
        holdout,
        holdout_X=data["holdout_X"],
        holdout_y=data["holdout_y"],
        feature_names=data["feature_names"],
    )
    config = home / "fl-server.toml"
    config.write_text(
        "\n".join(
            [
                f'keys_dir = "{home / "keys"}"',
                f's3_endpoint_url = "{server.endpoint_url}"',
                "min_clients = 2",
                'schedule = "none"',
                f"shard_size = {shard_size}",
                f"max_batch = {max_batch}",
                "",
            ]
        )
    )
    creds = server.admin_credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    env.update(
        FL_SERVER_CONFIG=str(config),
        FL_S3_ACCESS_KEY=creds.access_key,
        FL_S3_SECRET_KEY=creds.secret_key,
    )
    proc = subprocess.run(
        [str(BIN / "fl-admin"), "init", "--holdout", str(holdout)],
        env=env,
        capture_output=True,
        text=True,
        cwd=home,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fl-admin init failed:\n{proc.stdout}{proc.stderr}")
    return Deployment(ServerSettings.load(config), server.s3_config()), env


def ledger_keys(deployment: Any) -> set[str]:
    """Inbox keys that have a ledger verdict (one object per key, write-once)."""
    from fedlib.server import state_keys

    return {
        state_keys.inbox_key_of_ledger_entry(info.key)
        for info in deployment.state.list(state_keys.LEDGER)
    }


# ------------------------------------------------------------------------------ measurement


def cpu_sample() -> tuple[float, int, int]:
    """(wall time, busy jiffies, all jiffies) of the whole machine, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return time.time(), 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return time.time(), sum(fields) - idle, sum(fields)


def cpu_busy(samples: list[tuple[float, int, int]], start: float, end: float) -> float | None:
    """Share of all cores busy (any process, ours or not) between two wall times."""
    inside = [s for s in samples if start - 1 <= s[0] <= end + 1]
    if len(inside) < 2 or inside[-1][2] == inside[0][2]:
        return None
    return round((inside[-1][1] - inside[0][1]) / (inside[-1][2] - inside[0][2]), 3)


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def measure(
    airflow: Airflow,
    deployment: Any,
    clients: list[tuple[str, Any]],
    *,
    workers: int,
    updates: int,
    seed: int,
    timeout: float,
    start: Any,
) -> dict[str, Any]:
    """Fill the inbox, run ``fl_round`` with ``workers`` task processes, check the books."""
    from fedlib.server.state_keys import RunKeys

    before = ledger_keys(deployment)
    t0 = time.perf_counter()
    keys = [key for key, _ in upload_crafted(deployment, clients, updates, seed=seed)]
    upload_s = time.perf_counter() - t0
    queued = [info.key for info in deployment.inbox.list("updates/")]
    if sorted(queued) != sorted(keys):
        raise RuntimeError(f"inbox holds {len(queued)} objects, expected the {updates} uploaded")
    say(f"{workers} worker(s): {updates} updates queued in {upload_s:.1f}s; starting them")
    start(workers)
    say(f"{workers} worker(s): triggering {DAG_ID}")
    state, run, tis, samples = airflow.run_dag({"max_updates": updates}, timeout)
    airflow.stop_scheduler()
    airflow.stop_workers()
    if state != "success":
        failed = sorted({t["task_id"] for t in tis if t["state"] not in ("success", "skipped")})
        raise RuntimeError(f"{DAG_ID} run {run['dag_run_id']} ended {state}; tasks {failed}")
    run_id = run["dag_run_id"]
    report = json.loads(deployment.state.get(RunKeys(run_id).report))
    judged = ledger_keys(deployment) - before
    left = [info.key for info in deployment.inbox.list("updates/")]
    shards = [t for t in tis if t["task_id"] == "process_shard"]
    starts = [_ts(t["start_date"]) for t in shards]
    ends = [_ts(t["end_date"]) for t in shards]
    durations = sorted(e - s for s, e in zip(starts, ends, strict=True))
    phase = max(ends) - min(starts)
    # Task instances of this run running at once, sampled at every shard start/end: the
    # proof that the executor really ran `workers` shards side by side.
    spans = [(_ts(t["start_date"]), _ts(t["end_date"])) for t in tis if t["start_date"]]
    overlap = max(sum(1 for s, e in spans if s <= m < e) for m in starts)
    rejected = sum(report["rejected"].values())
    # The round-wide (unmapped) tasks, each run once: what no number of workers shortens.
    serial = {
        t["task_id"]: round(_ts(t["end_date"]) - _ts(t["start_date"]), 2)
        for t in tis
        if t.get("map_index", -1) == -1 and t["start_date"] and t["end_date"]
    }
    recorders = [t for t in tis if t["task_id"] == "record_shard" and t["start_date"]]
    record_phase = (
        max(_ts(t["end_date"]) for t in recorders) - min(_ts(t["start_date"]) for t in recorders)
        if recorders
        else 0.0
    )
    hosts = sorted({str(t.get("hostname")) for t in shards})
    per_host = {h: sum(1 for t in shards if str(t.get("hostname")) == h) for h in hosts}
    result = {
        "workers": workers,
        "run_id": run_id,
        "upload_s": round(upload_s, 2),
        "shards": len(shards),
        "shard_phase_s": round(phase, 2),
        "whole_run_s": round(_ts(run["end_date"]) - _ts(run["start_date"]), 2),
        "shard_task_s_sum": round(sum(durations), 2),
        "shard_task_s_median": round(durations[len(durations) // 2], 2),
        "shard_task_s_max": round(durations[-1], 2),
        "max_concurrent_tasks": overlap,
        "shard_phase_updates_per_s": round(updates / phase, 1),
        "shards_per_host": per_host,
        "serial_task_s": round(sum(serial.values()), 2),
        "serial_tasks_s": serial,
        "record_phase_s": round(record_phase, 2),
        "shard_phase_cpu_busy": cpu_busy(samples, min(starts), max(ends)),
        "decision": report["decision"],
        "accepted": report["accepted"],
        "rejected": rejected,
        "ledger_verdicts": len(judged),
        "inbox_left": len(left),
        "all_accounted": (
            report["accepted"] + rejected == updates and judged == set(keys) and not left
        ),
    }
    say(f"{workers} worker(s): {json.dumps(result)}")
    return result


MEDIAN_KEYS = (
    "shard_phase_s",
    "whole_run_s",
    "shard_task_s_median",
    "shard_phase_cpu_busy",
    "serial_task_s",
    "record_phase_s",
)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each timing over repeated runs with the same worker count (and of
    each round-wide task on its own): one run is at the mercy of this shared machine."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(float(np.median(values)), 3) if values else None
    out["serial_task_s_range"] = [
        min(r["serial_task_s"] for r in runs),
        max(r["serial_task_s"] for r in runs),
    ]
    tasks = sorted({t for r in runs for t in r["serial_tasks_s"]})
    out["serial_tasks_s"] = {
        t: round(float(np.median([r["serial_tasks_s"][t] for r in runs])), 2)
        for t in tasks
        if all(t in r["serial_tasks_s"] for r in runs)
    }
    return out


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    from scripts.seaweed import SeaweedServer

    started = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with contextlib.ExitStack() as stack:
        say(f"state in {home}; starting SeaweedFS")
        server = SeaweedServer(home / "s3", die_with_parent=True).start()
        stack.callback(server.stop)
        deployment, env = init_deployment(home, server, args.shard_size, max(args.updates, 10_000))
        clients = enroll_fleet(deployment, args.clients, "scale")
        model_params = deployment.registry().read_active().metadata.num_params
        say(f"deployment initialised, {len(clients)} clients enrolled; starting Airflow")
        conn = deployment.s3.airflow_connection()
        with_keys = Path(env["FL_SERVER_CONFIG"])
        executor_env = None
        if args.executor == "celery":
            from scripts.postgres import start_postgres

            pg_base = Path(tempfile.mkdtemp(prefix="scaleout-pg-"))  # reachable by nobody
            stack.callback(shutil.rmtree, pg_base, True)
            postgres = start_postgres(pg_base)
            stack.callback(postgres.stop, "immediate")
            redis = Redis(home / "redis").start()
            stack.callback(redis.stop)
            executor_env = celery_env(postgres, redis)
            (home / "central").mkdir()  # the control plane holds no keys
            env["FL_SERVER_CONFIG"] = str(private_copy(with_keys, home / "central", keys=False))
        airflow = Airflow(
            home / "airflow", env, conn, heartbeat_s=args.heartbeat, executor_env=executor_env
        )
        stack.callback(airflow.stop)
        airflow.start()

        def start(workers: int) -> None:
            if args.executor == "local":
                airflow.start_scheduler(workers)
                return
            for i in range(workers):
                airflow.start_worker(f"worker-{i + 1}", with_keys)
            airflow.start_scheduler(2 * workers)

        # 1 then 2 workers, ``--repeat`` times, interleaved: a slow minute on this shared
        # machine then lands on both worker counts rather than on one.
        plan = [workers for _ in range(args.repeat) for workers in (1, 2)]
        runs = [
            measure(
                airflow,
                deployment,
                clients,
                workers=workers,
                updates=args.updates,
                seed=i * 10_000_000,
                timeout=args.timeout,
                start=start,
            )
            for i, workers in enumerate(plan)
        ]
    median = {str(w): medians([r for r in runs if r["workers"] == w]) for w in (1, 2)}
    one, two = median["1"], median["2"]
    return {
        "updates": args.updates,
        "clients": args.clients,
        "shard_size": args.shard_size,
        "shards": runs[0]["shards"],
        "model_params": model_params,
        "workers_1_shard_phase_s": one["shard_phase_s"],
        "workers_2_shard_phase_s": two["shard_phase_s"],
        "speedup": round(one["shard_phase_s"] / two["shard_phase_s"], 3),
        "updates_per_s_per_worker": round(args.updates / one["shard_phase_s"], 1),
        "updates_per_s_per_worker_at_2": round(args.updates / two["shard_phase_s"] / 2, 1),
        "workers_1_whole_run_s": one["whole_run_s"],
        "workers_2_whole_run_s": two["whole_run_s"],
        "whole_run_speedup": round(one["whole_run_s"] / two["whole_run_s"], 3),
        "all_accounted": all(r["all_accounted"] for r in runs),
        "repeat": args.repeat,
        "median": median,
        "runs": runs,
        "machine": {
            "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": (
                "one machine: SeaweedFS, the Airflow scheduler, API server and DAG "
                "processor and the task processes share these cores (and so does anything "
                "else running here: see loadavg and shard_phase_cpu_busy, whole machine)"
            ),
        },
        "executor": (
            "LocalExecutor, [core] parallelism = workers"
            if args.executor == "local"
            else "CeleryExecutor: PostgreSQL, Redis, one airflow celery worker (concurrency 1, "
            "own AIRFLOW_HOME, dags copy and keys) per worker"
        ),
        "min_heartbeat_interval_s": args.heartbeat,
        "total_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="enrolled devices (default: one per update; a device has one vote a round)",
    )
    parser.add_argument("--shard-size", type=int, default=1_000)
    parser.add_argument(
        "--executor",
        choices=["local", "celery"],
        default="local",
        help="LocalExecutor (parallelism = workers) or CeleryExecutor (one worker process each)",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=1,
        help="[workers] min_heartbeat_interval, seconds (Airflow's default: 5)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per worker count (interleaved 1, 2, 1, 2...); figures are medians",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per DAG run, seconds")
    parser.add_argument("--dir", default=None, help="keep all state here (default: temp dir)")
    parser.add_argument("--json", action="store_true", help="print the JSON object on one line")
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = args.updates
    if args.updates < 2 or args.clients < 2 or args.shard_size < 1 or args.repeat < 1:
        parser.error("need --updates >= 2, --clients >= 2, --shard-size >= 1, --repeat >= 1")
    shards = -(-args.updates // args.shard_size)
    if shards > 1024:  # [core] max_map_length
        parser.error(f"{shards} shards exceed Airflow's max_map_length (1024)")
    if shards < 2:
        parser.error("need at least 2 shards for two workers to share")
    sys.path.insert(0, str(ROOT))

    def interrupted(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwind: the finally/ExitStack stops everything

    signal.signal(signal.SIGTERM, interrupted)
    if args.dir and Path(args.dir).exists() and any(Path(args.dir).iterdir()):
        parser.error(f"--dir {args.dir} is not empty (each benchmark starts from scratch)")
    home = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="scaleout-"))
    home.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, home)
    except BaseException:
        say(f"failed; state and logs kept in {home}")
        raise
    if not args.dir:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if result["all_accounted"] else 1


if __name__ == "__main__":
    sys.exit(main())

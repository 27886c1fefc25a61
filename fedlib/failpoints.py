"""Failpoints: a real process death at a named point in the code, for fault tests.

Why: a crash simulated by hand (a file deleted, a torn file written by the test) proves
what the test author imagined, not what a killed process leaves. As etcd's gofail and
TiKV's fail-rs do, each point here is a line in the real code path; when the environment
variable ``DADM_FAILPOINTS`` (comma-separated names) arms it, reaching it kills the
process with SIGKILL: no ``finally``, no ``atexit``, no flush, exactly what the kernel
leaves after ``kill -9`` or the OOM killer.

Operators never set it. With ``DADM_FAILPOINTS_ONCE_DIR`` set, an armed point fires once
per directory (an exclusive marker file named after the point), so a retry that runs in a
new process with the same environment (Airflow's task retry) runs past it.

Unset, a point costs one lookup in an empty frozenset: the variable is read once per
process (again in a forked child, whose environment may differ).
"""

from __future__ import annotations

import os
import signal

ENV = "DADM_FAILPOINTS"
ONCE_DIR_ENV = "DADM_FAILPOINTS_ONCE_DIR"

# Every point, and where it is: an unknown name in the variable is an error, not a no-op.
SHARD_AFTER_PARTIAL = "shard.after_partial"  # process_shard: partial stored, no verdicts
SPOOL_TORN_WRITE = "spool.torn_write"  # Spool.add: half the envelope in the temp file
ROLLBACK_AFTER_PIN = "rollback.after_pin"  # manual rollback: pin written, not published
POINTS = frozenset({SHARD_AFTER_PARTIAL, SPOOL_TORN_WRITE, ROLLBACK_AFTER_PIN})

_armed: frozenset[str] | None = None


def _forget() -> None:
    global _armed
    _armed = None


os.register_at_fork(after_in_child=_forget)


def armed() -> frozenset[str]:
    """The points this process's environment arms (read once)."""
    global _armed
    if _armed is None:
        names = frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
        unknown = sorted(names - POINTS)
        if unknown:
            raise ValueError(f"{ENV} names unknown failpoints {unknown}; known: {sorted(POINTS)}")
        _armed = names
    return _armed


def is_armed(name: str) -> bool:
    """Whether reaching ``name`` would kill this process (callers that must prepare a
    torn state first, e.g. write half a file, ask before doing so)."""
    if name not in POINTS:
        raise ValueError(f"unknown failpoint {name!r}")
    return name in armed()


def failpoint(name: str) -> None:
    """Die here with SIGKILL if ``name`` is armed (once per marker dir, if one is set)."""
    if not is_armed(name):
        return
    once_dir = os.environ.get(ONCE_DIR_ENV)
    if once_dir:
        try:
            fd = os.open(os.path.join(once_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # already fired once: this is the retry
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)

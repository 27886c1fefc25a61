"""A benchmark process's own memory: current and peak RSS from /proc/self/status.

Why not ``ru_maxrss`` of a child: Linux carries the parent's high-water mark into a
forked-and-exec'd child, so each measured process reads its own ``VmHWM``.
"""

from __future__ import annotations

import resource
import sys


def proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MiB (None without /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss where /proc is missing)."""
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def current_rss_mb() -> float:
    rss = proc_status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()

"""Synthetic raw logs for a fleet: syslog lines per device, with labeled anomalous windows.

    python -m bench.make_logs --out DIR [--devices 6] [--windows 288] [--seed 0]

Why: the count path (``bench.make_dataset``) starts from per-window feature vectors; a
device that reads its own logs starts from lines. This writes what a small fleet's
``/var/log/syslog`` would hold: each device has its own mix and rate of a dozen benign
event kinds (sshd logins, cron sessions, systemd, DHCP, kernel link changes, an
application's HTTP requests, ...), every variable part varied (users, IPs, ports, pids,
paths, durations), and anomalous windows that add one of several attack or failure
patterns (an SSH brute force, OOM kills, segfaults, disk errors, a burst of lines no
template knows). Labels are per window; ``labels.csv`` lists the anomalous periods as
``fl-admin templates holdout --labels`` reads them.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

START = datetime(2026, 11, 2, 0, 0, 0, tzinfo=UTC).timestamp()
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "deploy", "backup")
PATHS = ("/api/v1/items", "/api/v1/orders", "/healthz", "/static/app.js", "/login")


def _ip(rng: np.random.Generator, net: int = 10) -> str:
    return f"{net}.{rng.integers(0, 256)}.{rng.integers(0, 256)}.{rng.integers(1, 255)}"


def _pid(rng: np.random.Generator) -> int:
    return int(rng.integers(300, 65_000))


Line = Callable[[np.random.Generator], str]

#: Benign event kinds: (name, line maker). The app tag (before ':') is part of a line.
BENIGN: tuple[tuple[str, Line], ...] = (
    (
        "ssh_accept",
        lambda r: (
            f"sshd[{_pid(r)}]: Accepted publickey for {r.choice(USERS)} from "
            f"{_ip(r)} port {r.integers(1024, 65535)} ssh2"
        ),
    ),
    (
        "ssh_close",
        lambda r: f"sshd[{_pid(r)}]: Connection closed by {_ip(r)} port {r.integers(1024, 65535)}",
    ),
    (
        "cron_open",
        lambda r: (
            f"CRON[{_pid(r)}]: pam_unix(cron:session): session opened for user "
            f"{r.choice(('root', 'www-data'))}(uid=0) by (uid=0)"
        ),
    ),
    (
        "cron_cmd",
        lambda r: f"CRON[{_pid(r)}]: ({r.choice(('root', 'www-data'))}) CMD (/usr/lib/sa/sa1 1 1)",
    ),
    (
        "systemd_session",
        lambda r: f"systemd[1]: Started Session {r.integers(1, 99999)} of User {r.choice(USERS)}.",
    ),
    (
        "dhcp",
        lambda r: f"dhclient[{_pid(r)}]: DHCPACK of {_ip(r, 192)} from {_ip(r, 192)}",
    ),
    (
        "http_ok",
        lambda r: (
            f"app[{_pid(r)}]: GET {r.choice(PATHS)}/{r.integers(1, 5000)} 200 "
            f"{r.uniform(1, 80):.1f}ms"
        ),
    ),
    (
        "http_post",
        lambda r: f"app[{_pid(r)}]: POST {r.choice(PATHS)} 201 {r.uniform(5, 200):.1f}ms",
    ),
    (
        "kernel_link",
        lambda r: (
            f"kernel: [{r.uniform(1, 9e5):.6f}] e1000e: eth0 NIC Link is Up 1000 Mbps Full Duplex"
        ),
    ),
    (
        "sudo",
        lambda r: (
            f"sudo: {r.choice(USERS)} : TTY=pts/{r.integers(0, 9)} ; PWD=/home/"
            f"{r.choice(USERS)} ; USER=root ; COMMAND=/usr/bin/systemctl status nginx"
        ),
    ),
    (
        "ntp",
        lambda r: f"chronyd[{_pid(r)}]: Selected source {_ip(r, 172)}",
    ),
)

#: Anomaly patterns: (name, line maker, lines added per anomalous window).
ANOMALIES: tuple[tuple[str, Line, int], ...] = (
    (
        "ssh_bruteforce",
        lambda r: (
            f"sshd[{_pid(r)}]: Failed password for invalid user "
            f"{r.choice(('admin', 'test', 'oracle', 'ubuntu', 'pi'))} from {_ip(r, 203)} port "
            f"{r.integers(1024, 65535)} ssh2"
        ),
        40,
    ),
    (
        "oom",
        lambda r: (
            f"kernel: [{r.uniform(1, 9e5):.6f}] Out of memory: Killed process "
            f"{_pid(r)} (java) total-vm:{r.integers(10**6, 10**7)}kB"
        ),
        6,
    ),
    (
        "segfault",
        lambda r: (
            f"kernel: [{r.uniform(1, 9e5):.6f}] app[{_pid(r)}]: segfault at "
            f"{r.integers(0, 2**32):x} ip {r.integers(2**40, 2**44):016x} sp "
            f"{r.integers(2**40, 2**44):016x} error 4"
        ),
        8,
    ),
    (
        "disk_error",
        lambda r: (
            f"kernel: [{r.uniform(1, 9e5):.6f}] blk_update_request: I/O error, dev sda, "
            f"sector {r.integers(10**5, 10**9)}"
        ),
        12,
    ),
    (
        "http_errors",
        lambda r: (
            f"app[{_pid(r)}]: GET {r.choice(PATHS)}/{r.integers(1, 5000)} 500 "
            f"{r.uniform(500, 9000):.1f}ms"
        ),
        30,
    ),
)


@dataclass(frozen=True)
class DeviceLogs:
    """One device's lines (time, text without the syslog header) and window labels."""

    lines: list[tuple[float, str]]
    labels: np.ndarray  # per window: 1 anomalous
    kinds: list[str]  # per window: the anomaly's name, "" if benign
    line_kinds: list[str]  # per line: the event kind that made it (ground truth)


def device_logs(
    device: int,
    *,
    windows: int,
    window_seconds: int = 300,
    anomaly_rate: float = 0.0,
    seed: int = 0,
    start: float = START,
) -> DeviceLogs:
    """``windows`` windows of one device: benign events at the device's own rates
    (a daily cycle), and with probability ``anomaly_rate`` a window that also holds
    one anomaly pattern."""
    rng = np.random.default_rng([seed, device])
    rates = rng.gamma(2.0, 1.5, size=len(BENIGN)) * rng.uniform(0.5, 2.0)  # per window
    made: list[tuple[float, str, str]] = []
    labels = np.zeros(windows, dtype=np.int64)
    kinds = [""] * windows
    for w in range(windows):
        t0 = start + w * window_seconds
        day = 1.0 + 0.5 * math.sin(2 * math.pi * (t0 % 86_400) / 86_400)
        for (kind, make), rate in zip(BENIGN, rates, strict=True):
            for _ in range(rng.poisson(rate * day)):
                made.append((t0 + rng.uniform(0, window_seconds), make(rng), kind))
        if rng.random() < anomaly_rate:
            name, make, count = ANOMALIES[int(rng.integers(len(ANOMALIES)))]
            labels[w], kinds[w] = 1, name
            for _ in range(max(1, rng.poisson(count))):
                made.append((t0 + rng.uniform(0, window_seconds), make(rng), name))
    made.sort(key=lambda item: item[0])
    return DeviceLogs([(t, text) for t, text, _ in made], labels, kinds, [k for *_, k in made])


#: Every event kind, benign then anomalous: the count path's feature columns.
EVENT_KINDS: tuple[str, ...] = tuple(n for n, _ in BENIGN) + tuple(n for n, *_ in ANOMALIES)


def kind_counts(
    logs: DeviceLogs, *, windows: int, window_seconds: int = 300, start: float = START
) -> np.ndarray:
    """The count path: per window, how many lines of each event kind the generator made
    (what a parser that never errs would count), then the same window statistics the
    log path computes (lines per second, distinct kinds, unknown share: 0)."""
    column = {k: i for i, k in enumerate(EVENT_KINDS)}
    counts = np.zeros((windows, len(EVENT_KINDS)), dtype=np.float64)
    for (when, _), kind in zip(logs.lines, logs.line_kinds, strict=True):
        counts[int((when - start) // window_seconds), column[kind]] += 1
    lines = counts.sum(axis=1)
    stats = np.column_stack(
        [lines / window_seconds, np.count_nonzero(counts, axis=1), np.zeros(windows)]
    )
    return np.hstack([counts, np.zeros((windows, 1)), stats])


def syslog_text(lines: list[tuple[float, str]], host: str = "host") -> str:
    """RFC 3164 lines (``Nov  2 00:00:01 host app[pid]: ...``), one per entry."""
    out = []
    for when, text in lines:
        stamp = datetime.fromtimestamp(when, UTC).strftime("%b %e %H:%M:%S")
        out.append(f"{stamp} {host} {text}\n")
    return "".join(out)


def anomalous_periods(
    labels: np.ndarray, kinds: list[str], *, window_seconds: int = 300, start: float = START
) -> list[tuple[float, float, str]]:
    return [
        (start + w * window_seconds, start + (w + 1) * window_seconds, kinds[w])
        for w in np.flatnonzero(labels)
    ]


def write_labels(path: Path, periods: list[tuple[float, float, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["start", "end", "class"])
        for a, b, kind in periods:
            writer.writerow(
                [
                    datetime.fromtimestamp(a, UTC).isoformat(),
                    datetime.fromtimestamp(b, UTC).isoformat(),
                    kind,
                ]
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--windows", type=int, default=288)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for device in range(args.devices):
        logs = device_logs(device, windows=args.windows, seed=args.seed)
        (args.out / f"device-{device:02d}.log").write_text(syslog_text(logs.lines))
    holdout = device_logs(10_000, windows=args.windows, anomaly_rate=0.15, seed=args.seed)
    (args.out / "holdout.log").write_text(syslog_text(holdout.lines))
    write_labels(args.out / "labels.csv", anomalous_periods(holdout.labels, holdout.kinds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The local spool: sealed updates wait here until the inbox has them, exactly once.

Files are written to a temporary name, fsynced and renamed, so a crash mid-write
leaves either no update or a whole one (temporaries are swept on the next run).
Names are update ids (UUIDv7), so sorting them uploads oldest first. An upload is a
write-once PUT under the update's own key: if the object already exists, an earlier
attempt got through and only its acknowledgement was lost, so the file is marked sent.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fedlib import failpoints
from fedlib.errors import ObjectExists, StoreError
from fedlib.files import TMP_PREFIX, atomic_write
from fedlib.storage.store import ObjectStore
from fedlib.wire import protocol

SUFFIX = ".env"


@dataclass(frozen=True)
class UploadReport:
    uploaded: list[str]
    already_present: list[str]
    waiting: list[str]
    error: str | None = None


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.sent_log = self.root / "sent.jsonl"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_temporaries()

    def _sweep_temporaries(self) -> None:
        for tmp in self.pending_dir.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)

    def add(self, update_id: str, envelope: bytes) -> Path:
        """Store an envelope durably under its update id."""
        target = self.pending_dir / f"{update_id}{SUFFIX}"
        atomic_write(target, envelope, torn_point=failpoints.SPOOL_TORN_WRITE)
        return target

    def pending(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.pending_dir.glob(f"*{SUFFIX}"))

    def upload(self, inbox: ObjectStore, client_id: str) -> UploadReport:
        """Upload pending envelopes oldest first; stop at the first store failure."""
        uploaded: list[str] = []
        present: list[str] = []
        waiting = self.pending()
        while waiting:
            update_id = waiting[0]
            path = self.pending_dir / f"{update_id}{SUFFIX}"
            data = path.read_bytes()
            try:
                inbox.put(protocol.inbox_key(client_id, update_id), data, if_absent=True)
                uploaded.append(update_id)
            except ObjectExists:
                present.append(update_id)
            except StoreError as exc:
                return UploadReport(uploaded, present, waiting, error=str(exc))
            self._mark_sent(update_id, len(data))
            path.unlink()
            waiting.pop(0)
        return UploadReport(uploaded, present, [])

    def _mark_sent(self, update_id: str, size: int) -> None:
        line = json.dumps({"update_id": update_id, "size": size, "sent_at_ms": _now_ms()})
        with self.sent_log.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def sent(self) -> list[str]:
        if not self.sent_log.exists():
            return []
        ids = []
        for line in self.sent_log.read_text().splitlines():
            try:
                ids.append(json.loads(line)["update_id"])
            except (ValueError, KeyError):
                continue  # a torn last line after a crash
        return ids


def _now_ms() -> int:
    return int(time.time() * 1000)

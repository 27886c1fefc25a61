"""The ledger: one write-once verdict per inbox object, and the quarantine.

Invariant: every object that enters the inbox ends up either aggregated exactly once
or quarantined with a reason, and the ledger says which. A verdict is written (once,
conditional create) before its inbox object is deleted; a quarantined object keeps its
original bytes next to the reason. An object re-uploaded under a key that already has
a verdict is a replay: it is quarantined as such and never counted again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fedlib.errors import ObjectExists
from fedlib.server.records import Verdict
from fedlib.storage.store import NoSuchKey, ObjectStore
from fedlib.wire import protocol

LEDGER_PREFIX = "ledger/"
QUARANTINE_PREFIX = "quarantine/"


def _safe(key: str) -> str:
    """A ledger name for any inbox key (inbox keys are already safe; others are hashed)."""
    try:
        client_id, update_id = protocol.parse_inbox_key(key)
    except Exception:
        return "_other/" + hashlib.sha256(key.encode()).hexdigest()
    return f"{client_id}/{update_id}"


class Ledger:
    def __init__(self, state: ObjectStore) -> None:
        self.state = state

    def verdict_key(self, inbox_key: str) -> str:
        return f"{LEDGER_PREFIX}{_safe(inbox_key)}.json"

    def has_verdict(self, inbox_key: str) -> bool:
        return self.state.exists(self.verdict_key(inbox_key))

    def processed_keys(self, client_id: str | None = None) -> set[str]:
        """Inbox keys that already have a verdict (of one client, or of everyone)."""
        keys = set()
        prefix = LEDGER_PREFIX + (f"{client_id}/" if client_id else "")
        for info in self.state.list(prefix):
            name = info.key[len(LEDGER_PREFIX) : -len(".json")]
            if not name.startswith("_other/") and info.key.endswith(".json"):
                keys.add("updates/" + name)
        return keys

    def quarantine_key(self, verdict: Verdict) -> str:
        """Where a rejected object's judged bytes live (content-addressed, write-once)."""
        return f"{QUARANTINE_PREFIX}{_safe(verdict.key)}/{(verdict.sha256 or 'unread')[:16]}"

    def keep_rejected_bytes(self, verdict: Verdict, blob: bytes) -> None:
        """Store the bytes that were judged, at judgment time (retries rewrite the same)."""
        self._put_once(self.quarantine_key(verdict) + ".bin", blob)

    def record(self, verdict: Verdict, *, run_id: str) -> bool:
        """Write the verdict once (and a rejected one's reason beside its bytes).

        Returns False when a verdict already existed (a retried task): the first one
        stands, so nothing is counted twice.
        """
        doc = protocol.canonical_json({**verdict.as_dict(), "run_id": run_id})
        if not verdict.accepted:
            self._put_once(self.quarantine_key(verdict) + ".reason.json", doc)
        return self._put_once(self.verdict_key(verdict.key), doc)

    def read(self, inbox_key: str) -> dict[str, object] | None:
        try:
            data = self.state.get(self.verdict_key(inbox_key))
        except NoSuchKey:
            return None
        return protocol.parse_json_limited(data, 1 << 20, "verdict")

    def verdicts(self) -> Iterable[dict[str, object]]:
        for info in self.state.list(LEDGER_PREFIX):
            yield protocol.parse_json_limited(self.state.get(info.key), 1 << 20, "verdict")

    def _put_once(self, key: str, data: bytes) -> bool:
        try:
            self.state.put(key, data, if_absent=True)
        except ObjectExists:
            return False
        return True

"""The ledger: one write-once verdict per inbox object, and the quarantine.

Invariant: every object that enters the inbox ends up either aggregated exactly once
or quarantined with a reason, and the ledger says which. A verdict is written (once,
conditional create) before its inbox object is deleted; a quarantined object keeps its
original bytes next to the reason. An object re-uploaded under a key that already has
a verdict is a replay: it is quarantined as such and never counted again.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedlib.errors import ObjectExists
from fedlib.server import state_keys
from fedlib.server.records import LedgerEntry, QuarantineStub, Verdict, VerdictAttempts
from fedlib.storage.store import NoSuchKey, ObjectStore


class Ledger:
    def __init__(self, state: ObjectStore) -> None:
        self.state = state

    def verdict_key(self, inbox_key: str) -> str:
        return state_keys.ledger_entry(inbox_key)

    def has_verdict(self, inbox_key: str, fallback: set[str] | None = None) -> bool:
        """Whether ``inbox_key`` was judged: its own entry, or (``fallback``: the digests
        from :meth:`fallback_digests`) an entry under the digest of its name, where a
        verdict goes when its own key could not be written."""
        if fallback is not None and state_keys.key_digest(inbox_key) in fallback:
            return True
        return self.state.exists(self.verdict_key(inbox_key))

    def fallback_digests(self) -> set[str]:
        """Key digests of the verdicts written under ``ledger/_unrecordable/``: one listing
        (entries appear only when the state store refused a write, so it stays short)."""
        return {
            digest
            for info in self.state.list(state_keys.LEDGER + state_keys.UNRECORDABLE)
            if (digest := state_keys.fallback_digest(info.key)) is not None
        }

    def processed_keys(self, client_id: str | None = None) -> set[str]:
        """Inbox keys that already have a verdict (of one client, or of everyone)."""
        keys = set()
        for info in self.state.list(state_keys.ledger_client_prefix(client_id)):
            inbox_key = state_keys.inbox_key_of_ledger_entry(info.key)
            if inbox_key is not None:
                keys.add(inbox_key)
        return keys

    def quarantine_key(self, verdict: Verdict) -> str:
        """Where a rejected object's judged bytes live (content-addressed, write-once)."""
        return state_keys.quarantine_base(verdict.key, verdict.sha256)

    def keep_rejected_bytes(self, verdict: Verdict, blob: bytes) -> None:
        """Store the bytes that were judged, at judgment time (retries rewrite the same)."""
        self._put_once(state_keys.quarantine_bytes(verdict.key, verdict.sha256), blob)

    def keep_stub(self, verdict: Verdict, stub: QuarantineStub) -> None:
        """Keep a bounded stand-in for bytes not kept whole (see :class:`QuarantineStub`)."""
        self._put_once(state_keys.quarantine_stub(verdict.key, verdict.sha256), stub.to_json())

    def bump_attempts(self, inbox_key: str, error: str) -> int:
        """Count one more failed write of ``inbox_key``'s verdict; the new count.

        Read-modify-write: finalize is the only writer, one run at a time."""
        key = state_keys.verdict_attempts(inbox_key)
        try:
            data = self.state.get(key, max_bytes=1 << 16)
        except NoSuchKey:
            attempts = 0
        else:
            attempts = VerdictAttempts.from_json(data, what=key).attempts
        record = VerdictAttempts(
            key_sha256=state_keys.key_digest(inbox_key), attempts=attempts + 1, last_error=error
        )
        self.state.put(key, record.to_json())
        return record.attempts

    def record_unrecordable(
        self, verdict: Verdict, *, run_id: str, detail: str, stub: QuarantineStub
    ) -> bool:
        """The ``unrecordable`` verdict of an object whose own verdict could not be
        written: under a key derived from the digest of its name, with a bounded stub."""
        entry = LedgerEntry(
            key=verdict.key,
            sha256=verdict.sha256,
            size=verdict.size,
            accepted=False,
            reason="unrecordable",
            detail=detail[:500],
            etag=verdict.etag,
            run_id=run_id,
        )
        self._put_once(state_keys.quarantine_unrecordable(verdict.key), stub.to_json())
        return self._put_once(state_keys.ledger_fallback(verdict.key), entry.to_json())

    def record_fallback(self, verdict: Verdict, *, run_id: str) -> bool:
        """An accepted verdict whose own key cannot be written, under the digest key."""
        entry = LedgerEntry(**verdict.model_dump(), run_id=run_id)
        return self._put_once(state_keys.ledger_fallback(verdict.key), entry.to_json())

    def record(self, verdict: Verdict, *, run_id: str) -> bool:
        """Write the verdict once (and a rejected one's reason beside its bytes).

        Returns False when a verdict already existed (a retried task): the first one
        stands, so nothing is counted twice.
        """
        entry = LedgerEntry(**verdict.model_dump(), run_id=run_id)
        doc = entry.to_json()
        if not verdict.accepted:
            self._put_once(state_keys.quarantine_reason(verdict.key, verdict.sha256), doc)
        return self._put_once(self.verdict_key(verdict.key), doc)

    def read(self, inbox_key: str) -> LedgerEntry | None:
        """The verdict of ``inbox_key``: its own entry, else the one written under the
        digest of its name (:meth:`record_fallback`, :meth:`record_unrecordable`)."""
        for key in (self.verdict_key(inbox_key), state_keys.ledger_fallback(inbox_key)):
            try:
                data = self.state.get(key, max_bytes=1 << 20)
            except NoSuchKey:
                continue
            return LedgerEntry.from_json(data, what=key)
        return None

    def verdicts(self) -> Iterable[LedgerEntry]:
        for info in self.state.list(state_keys.LEDGER):
            yield LedgerEntry.from_json(self.state.get(info.key, max_bytes=1 << 20), what=info.key)

    def _put_once(self, key: str, data: bytes) -> bool:
        try:
            self.state.put(key, data, if_absent=True)
        except ObjectExists:
            return False
        return True

"""Every key of the state bucket, built and parsed here and nowhere else.

The state bucket is the server's memory: rounds' working files, the ledger, the
quarantine, archived inputs, reports, the optimizer state, DP charges, the fleet and
the holdout. Keys that hold a device-controlled part (an inbox key) are derived through
:func:`fedlib.wire.protocol.parse_inbox_key`; anything that does not parse is replaced by
a digest, so no state key is ever built from unchecked device input. Run ids and
interval keys come from Airflow and are made safe as one key segment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fedlib.errors import RejectedUpdate
from fedlib.wire import protocol

ROUNDS = "rounds/"
REPORTS = "reports/"
ARCHIVE = "archive/"
OPTIMIZER = "optimizer/"
INTERVALS = "intervals/"
#: One object per round whose DP aggregate was computed; the key carries the round's
#: noise multipliers, so the cumulative epsilon is one listing (no read per round).
PRIVACY_SPENT = "privacy/spent/"
LEDGER = "ledger/"
QUARANTINE = "quarantine/"
FLEET = "fleet/fleet.json"
HOLDOUT = "holdout/"
HOLDOUT_POINTER = "holdout/current.json"
#: The key of the holdout's calibration/evaluation split (written once).
HOLDOUT_SPLIT_KEY = "holdout/split-key.json"
ROLLBACKS = "rollbacks/"
#: The operator's newest rollback while it pins the active version (absent: no pin).
ROLLBACK_PIN = "rollbacks/pin.json"
#: Ledger names of inbox keys outside the ``updates/<client>/<update id>`` grammar whose
#: second segment is no client id either.
OTHER = "_other/"
#: Under a device's own ledger/quarantine prefix: its objects whose name does not parse.
NAME = "_name/"
#: Verdicts that could not be written under their own key after the allowed attempts.
UNRECORDABLE = "_unrecordable/"
#: Per inbox object (by digest of its key): how often its verdict failed to be written.
VERDICT_ATTEMPTS = "verdict-attempts/"
#: Where the quarantine retention sweep resumes.
QUARANTINE_SWEEP = "sweeps/quarantine.json"

_JSON = ".json"
_REASON = ".reason.json"
_BYTES = ".bin"
_STUB = ".stub.json"


def safe_segment(value: str) -> str:
    """A run id (``scheduled__2026-01-01T00:00:00+00:00``) or interval key made safe as
    one key segment; changed names get a digest suffix so two never collide."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in value)
    if cleaned == value:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


# -- a round's working files ----------------------------------------------------------------


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run's working files under ``rounds/<run>/``."""

    run_id: str

    @property
    def prefix(self) -> str:
        return f"{ROUNDS}{safe_segment(self.run_id)}/"

    @property
    def plan(self) -> str:
        return self.prefix + "plan.json"

    @property
    def rollback(self) -> str:
        return self.prefix + "rollback.json"

    @property
    def privacy(self) -> str:
        return self.prefix + "privacy.json"

    @property
    def evaluation(self) -> str:
        return self.prefix + "evaluation.json"

    @property
    def aggregate(self) -> str:
        return self.prefix + "aggregate.bin"

    @property
    def weights(self) -> str:
        """The reduce step's final per-device weights (``records.RoundWeights``)."""
        return self.prefix + "weights.json"

    @property
    def weights_summary(self) -> str:
        """What the round report takes of the weights (``records.RoundWeightsSummary``)."""
        return self.prefix + "weights-summary.json"

    def candidate(self, name: str) -> str:
        """A candidate package file (``model.onnx``, ``weights.bin``, ``metadata.json``)
        or ``momentum.bin``, the server optimizer's buffer that goes with it."""
        return f"{self.prefix}candidate/{name}"

    def shard_keys(self, index: int) -> str:
        return f"{self.prefix}shards/{index:05d}.keys.json"

    def shard_verdicts(self, index: int) -> str:
        return f"{self.prefix}shards/{index:05d}.verdicts.json"

    def shard_weights(self, index: int) -> str:
        """What reduce needs of the shard's accepted updates (``records.ShardWeights``)."""
        return f"{self.prefix}shards/{index:05d}.weights.json"

    def shard_recorded(self, index: int) -> str:
        """What ``record_shard`` did with the shard's verdicts (``records.ShardRecorded``)."""
        return f"{self.prefix}shards/{index:05d}.recorded.json"

    def shard_partial(self, index: int) -> str:
        return f"{self.prefix}shards/{index:05d}.partial"

    def archive(self, index: int) -> str:
        """Where a shard keeps the bytes it accepted: one object per shard, not per update."""
        return f"{ARCHIVE}{safe_segment(self.run_id)}/{index:05d}.pack"

    @property
    def report(self) -> str:
        return f"{REPORTS}{safe_segment(self.run_id)}.json"


def report_run_name(key: str) -> str | None:
    """The safe run name of a ``reports/<run>.json`` key (None: not a report)."""
    if key.startswith(REPORTS) and key.endswith(_JSON) and key.count("/") == 1:
        return key[len(REPORTS) : -len(_JSON)]
    return None


def interval(interval_key: str) -> str:
    return f"{INTERVALS}{safe_segment(interval_key)}.json"


def optimizer(version: int) -> str:
    """The server optimizer's buffer (FedAvgM momentum) that produced ``version``."""
    return f"{OPTIMIZER}v{version:08d}.bin"


# -- differential privacy charges -----------------------------------------------------------


def privacy_charge(run_id: str, multipliers: tuple[float, ...]) -> str:
    combo = "_".join(repr(m) for m in multipliers)  # repr: the float round-trips exactly
    return f"{PRIVACY_SPENT}{combo}/{safe_segment(run_id)}.json"


def parse_privacy_charge(key: str) -> tuple[str, list[float]] | None:
    """(safe run name, multipliers) of a charge key; None for anything else."""
    parts = key[len(PRIVACY_SPENT) :].split("/") if key.startswith(PRIVACY_SPENT) else []
    if len(parts) != 2 or not parts[1].endswith(_JSON):
        return None
    try:
        multipliers = [float(m) for m in parts[0].split("_")]
    except ValueError:
        return None
    return parts[1][: -len(_JSON)], multipliers


# -- ledger and quarantine ------------------------------------------------------------------


def key_digest(inbox_key: str) -> str:
    """SHA-256 of an inbox key: the bounded name of any key (S3 keys are any UTF-8)."""
    return hashlib.sha256(inbox_key.encode("utf-8", "surrogateescape")).hexdigest()


def inbox_owner(inbox_key: str) -> str | None:
    """The device whose prefix holds ``inbox_key`` (``updates/<client id>/...``), if any."""
    parts = inbox_key.split("/", 2)
    if len(parts) == 3 and parts[0] == "updates" and protocol.is_client_id(parts[1]):
        return parts[1]
    return None


def ledger_name(inbox_key: str) -> str:
    """The ledger's name for an inbox key: ``<client>/<update id>`` when the key follows
    the inbox grammar, else ``<client>/_name/<sha256 of the key>`` under its device's
    prefix, else ``_other/<sha256>`` (bounded, never device text)."""
    try:
        client_id, update_id = protocol.parse_inbox_key(inbox_key)
    except RejectedUpdate:
        owner = inbox_owner(inbox_key)
        digest = key_digest(inbox_key)
        return f"{owner}/{NAME}{digest}" if owner else OTHER + digest
    return f"{client_id}/{update_id}"


def ledger_entry(inbox_key: str) -> str:
    return f"{LEDGER}{ledger_name(inbox_key)}{_JSON}"


def ledger_fallback(inbox_key: str) -> str:
    """Where an object's ``unrecordable`` verdict goes when its own key cannot be written."""
    return f"{LEDGER}{UNRECORDABLE}{key_digest(inbox_key)}{_JSON}"


def fallback_digest(key: str) -> str | None:
    """The key digest a :func:`ledger_fallback` entry is named by (None for other keys)."""
    prefix = LEDGER + UNRECORDABLE
    if not key.startswith(prefix) or not key.endswith(_JSON):
        return None
    return key[len(prefix) : -len(_JSON)]


def verdict_attempts(inbox_key: str) -> str:
    return f"{VERDICT_ATTEMPTS}{key_digest(inbox_key)}{_JSON}"


def ledger_client_prefix(client_id: str | None = None) -> str:
    return LEDGER + (f"{client_id}/" if client_id else "")


def inbox_key_of_ledger_entry(key: str) -> str | None:
    """The inbox key a ledger entry is about (None for digest-named entries and non-entries)."""
    if not key.startswith(LEDGER) or not key.endswith(_JSON):
        return None
    name = key[len(LEDGER) : -len(_JSON)]
    if name.startswith((OTHER, UNRECORDABLE)):
        return None
    inbox = "updates/" + name
    try:
        protocol.parse_inbox_key(inbox)
    except RejectedUpdate:
        return None
    return inbox


def quarantine_owner_prefix(inbox_key: str) -> str:
    """The quarantine prefix a device's quota counts (``_other/`` for unowned keys)."""
    owner = inbox_owner(inbox_key)
    return f"{QUARANTINE}{owner}/" if owner else QUARANTINE + OTHER


def quarantine_base(inbox_key: str, sha256: str | None) -> str:
    """Where a rejected object's judged bytes and reason live (content-addressed)."""
    return f"{QUARANTINE}{ledger_name(inbox_key)}/{(sha256 or 'unread')[:16]}"


def quarantine_bytes(inbox_key: str, sha256: str | None) -> str:
    return quarantine_base(inbox_key, sha256) + _BYTES


def quarantine_reason(inbox_key: str, sha256: str | None) -> str:
    return quarantine_base(inbox_key, sha256) + _REASON


def quarantine_stub(inbox_key: str, sha256: str | None) -> str:
    """A bounded stand-in for bytes not kept whole (oversized, or over the device's quota)."""
    return quarantine_base(inbox_key, sha256) + _STUB


def quarantine_unrecordable(inbox_key: str) -> str:
    return f"{QUARANTINE}{UNRECORDABLE}{key_digest(inbox_key)}{_STUB}"


def is_quarantine_reason(key: str) -> bool:
    """One quarantined update = one reason document (its bytes may or may not be kept)."""
    return key.startswith(QUARANTINE) and key.endswith(_REASON)


def quarantine_bytes_of_reason(key: str) -> str:
    return key[: -len(_REASON)] + _BYTES


# -- fleet and holdout ------------------------------------------------------------------------


def holdout_data(version: int) -> str:
    return f"{HOLDOUT}v{version:06d}.npz"


def holdout_pointer(version: int) -> str:
    return f"{HOLDOUT}v{version:06d}.json"


# -- rollbacks --------------------------------------------------------------------------------


def rollback_action(version: int) -> str:
    """Who made rollback version ``version``, from which run, and why."""
    return f"{ROLLBACKS}v{version:08d}.json"

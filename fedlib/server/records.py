"""Typed records of a round: every document that crosses a task boundary or lives in the
state bucket, and the round's :class:`Decision`.

Each stored record carries a ``schema`` string with a format version
(``dadm.<record>.v1``). Documents written before the field existed have none: they read
as version 1, which is what they are (``tests/fixtures/state-v0`` holds real ones, and a
test reads every one of them). A record refuses fields it does not know, so a typo or a
document of another kind is an error, not a silent default. One function writes the
bytes (:meth:`Record.to_json`: canonical JSON, so a retried task rewrites identical
bytes) and one reads them (:meth:`Record.from_json`: size-limited, strict JSON).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from fedlib.wire import protocol
from fedlib.wire.protocol import PrivacySpent

#: Largest state document a reader accepts (a shard's verdicts are the largest).
MAX_RECORD_BYTES = 256 << 20


class RecordError(ValueError):
    """A stored document that is not the record it should be."""


class Decision(enum.StrEnum):
    """How a round ended: one value per outcome, decided by ``pipeline.decide`` only."""

    PUBLISHED = "published"  #: the candidate passed the gate and was published
    REJECTED = "rejected"  #: the gate refused the candidate
    WAITING = "waiting"  #: fewer than ``min_clients`` devices had pending updates
    NOTHING_ACCEPTED = "nothing_accepted"  #: no update passed validation
    DRY_RUN = "dry_run"  #: evaluated and reported; nothing published or consumed
    PRIVACY_BUDGET = "privacy_budget"  #: the DP budget refused the round
    REPLAY_MATCH = "replay_match"  #: a re-run interval recomputed the same candidate
    REPLAY_MISMATCH = "replay_mismatch"  #: ... and a different one (a bug or tampering)
    #: Written by the DAG before one function decided rounds (a publish the gate allowed
    #: that did not happen); read in old reports, never decided now.
    NOT_PUBLISHED = "not_published"


class Record(BaseModel):
    """Base of the stored records: frozen, unknown fields refused, canonical bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> bytes:
        return protocol.canonical_json(self.to_doc())

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_doc(cls, doc: Any, *, what: str | None = None) -> Self:
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise RecordError(f"{what or cls.__name__}: {where}: {err.get('msg')}") from None

    @classmethod
    def from_json(cls, data: bytes, *, what: str | None = None) -> Self:
        doc = protocol.parse_json_limited(data, MAX_RECORD_BYTES, what or cls.__name__)
        return cls.from_doc(doc, what=what)


def _schema(name: str) -> Any:
    """The ``schema`` field of a record (absent in documents older than the field)."""
    return Field(default=name, alias="schema")


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Metrics(Record):
    """Holdout metrics of one model: ROC-AUC, average precision, and TPR/FPR at the
    model's own threshold (``n`` rows, ``n_anomalies`` of them anomalies)."""

    auc: float
    ap: float
    tpr: float
    fpr: float
    n: float
    n_anomalies: float
    #: Flagged share of each anomaly class the holdout names (None: it names none).
    class_detection: dict[str, float] | None = None
    #: Which rows: the holdout's ``evaluation`` part (published figures) or its
    #: ``calibration`` part (what the gate compares); None: the whole holdout (documents
    #: written before the split).
    part: Literal["calibration", "evaluation"] | None = None
    #: The AUC's 95% bootstrap interval on those rows (None: not computed).
    auc_low: float | None = None
    auc_high: float | None = None

    @model_serializer(mode="wrap")
    def _without_absent_classes(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Metrics without classes, part or interval serialize as they did before them."""
        doc = handler(self)
        if isinstance(doc, dict):
            for name in ("class_detection", "part", "auc_low", "auc_high"):
                if doc.get(name) is None:
                    doc.pop(name, None)
        return doc

    def scalars(self) -> dict[str, float]:
        """The numbers a package's metadata carries (no classes, no part name)."""
        return {
            k: float(v)
            for k, v in self.model_dump(exclude={"class_detection", "part"}).items()
            if v is not None
        }


class HoldoutPointer(Record):
    """Which holdout a version number means (``holdout/current.json``, ``holdout/vN.json``):
    the data object and the digest it must have."""

    schema_: Literal["dadm.holdout-pointer.v1"] = _schema("dadm.holdout-pointer.v1")
    version: int
    key: str
    sha256: Sha256


class HoldoutSplitKey(Record):
    """The deployment's key of the holdout's calibration/evaluation split
    (``holdout/split-key.json``, written once): rows are assigned by HMAC under it, so
    whoever supplies rows cannot pick their part, and every holdout version splits its
    old rows as before."""

    schema_: Literal["dadm.holdout-split-key.v1"] = _schema("dadm.holdout-split-key.v1")
    key: str = Field(pattern=r"^[0-9a-f]{64}$")


class IntegrityWarning(Record):
    """One object in the models bucket that no verified channel metadata vouches for."""

    key: str = Field(max_length=1024)
    reason: str


class ModelsIntegrity(Record):
    """What a bounded scan of the models bucket found that the signed channel does not
    name (junk, a renumbered copy of a package, a tampered archive file). Such objects
    are ignored by every read; this record is how an operator learns they are there."""

    schema_: Literal["dadm.models-integrity.v1"] = _schema("dadm.models-integrity.v1")
    scanned: int
    #: True when the scan stopped at its bound before the end of the bucket.
    truncated: bool = False
    #: The first warnings found (at most the scan's ``limit``); ``total`` counts them all.
    warnings: list[IntegrityWarning] = Field(default_factory=list)
    total: int = 0


# -- plan -------------------------------------------------------------------------------------


class RoundPlan(Record):
    """A round's batch (``rounds/<run>/plan.json``). Its keys live in one file per shard
    (:class:`ShardKeys`), so a plan stays small whatever the batch size."""

    schema_: Literal["dadm.round-plan.v1"] = _schema("dadm.round-plan.v1")
    run_id: str
    base_version: int
    shard_count: int
    updates: int
    #: Objects the plan found already judged: written by plans before the shards looked
    #: verdicts up themselves (a plan no longer makes a request per object); now 0.
    replay_count: int = 0
    client_count: int
    waiting: bool
    message: str
    created_at_ms: int
    interval_key: str | None = None
    interval_end_ms: int | None = None
    holdout_version: int | None = None
    replay_of: str | None = None
    candidate_version: int | None = None
    #: Inbox objects left for later rounds, by reason: ``max_batch`` (over the batch),
    #: ``after_interval`` (received after the interval's end), ``waiting`` (well-formed
    #: updates of a waiting round). Counted among the objects the plan listed.
    deferred: dict[str, int] | None = None
    #: Devices (and the junk group) with more inbox objects than the plan could list
    #: (``max_objects_per_device``): the rest stays for later rounds.
    capped_groups: int | None = None
    #: The capped devices by id, first :data:`CAPPED_DEVICES_LISTED` in name order.
    capped_devices: list[str] | None = None
    #: Whether the shards search the inbox for names the data path cannot address (each
    #: its :attr:`ShardKeys.search_range`); False: ``finalize`` searches it whole.
    shards_search_names: bool = False

    @property
    def shard_run(self) -> str:
        """The run whose shard files hold the keys (a replay reuses the original's)."""
        return self.replay_of or self.run_id


class InboxRange(Record):
    """Part of the inbox in the store's listing order: the keys after ``after`` (None:
    from the start) through ``through`` (None: to the end). The plan cuts the inbox at
    keys its shards own, so each range ends at a key that still exists while its shard
    searches it; a search also stops after a bounded number of keys."""

    after: str | None
    through: str | None


class ShardKeys(Record):
    """The inbox keys of one shard."""

    schema_: Literal["dadm.shard-keys.v1"] = _schema("dadm.shard-keys.v1")
    keys: list[str]
    #: Keys the plan found already judged (plans before the shards looked verdicts up
    #: themselves; empty now): a replay of such a plan skips them as the original did.
    replays: list[str] = []
    #: When the store received each key (ms, parallel to ``keys``; absent in older
    #: documents): which of a device's updates is its newest, from the server's clock.
    received_ms: list[int] | None = None
    #: The range of the inbox, in listing order, this shard searches for names the data
    #: path cannot address (:class:`InboxRange`); None: none (the plan's ranges
    #: cover the inbox together, one shard each).
    search_range: InboxRange | None = None


# -- verdicts -----------------------------------------------------------------------------------


class Verdict(Record):
    """What happened to one inbox object; the ledger stores one per object, once."""

    #: The inbox key as the store holds it (S3 keys are at most 1,024 bytes); only ever
    #: data here: state keys are derived from it through :mod:`fedlib.server.state_keys`.
    key: Annotated[str, Field(max_length=1024)]
    sha256: str
    size: int
    accepted: bool
    reason: str | None = None
    detail: str | None = None
    client_id: str | None = None
    update_id: str | None = None
    base_version: int | None = None
    num_samples: int | None = None
    weight_units: int | None = None
    norm: float | None = None
    etag: str | None = None  # of the object version that was judged
    #: DP adaptive clipping: the device's bit "norm <= C before clipping" (None: absent).
    unclipped: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stored form: fields that are set (verdicts are many; absent means None)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_doc(self) -> dict[str, Any]:
        return self.as_dict()


class LedgerEntry(Verdict):
    """A verdict as the ledger keeps it (``ledger/...json``): with the run that wrote it."""

    schema_: Literal["dadm.verdict.v1"] = _schema("dadm.verdict.v1")
    run_id: str


class ShardVerdicts(Record):
    """A shard's verdicts (``rounds/<run>/shards/NNNNN.verdicts.json``), sorted by key.

    Written before the change as a bare JSON list: :meth:`from_doc` reads that too."""

    schema_: Literal["dadm.shard-verdicts.v1"] = _schema("dadm.shard-verdicts.v1")
    verdicts: list[Verdict]

    @classmethod
    def from_doc(cls, doc: Any, *, what: str | None = None) -> Self:
        if isinstance(doc, list):  # format of the first release
            doc = {"verdicts": doc}
        return super().from_doc(doc, what=what)

    def to_doc(self) -> dict[str, Any]:
        return {"schema": self.schema_, "verdicts": [v.as_dict() for v in self.verdicts]}


class ShardWeights(Record):
    """What the weight policy needs of a shard's accepted updates
    (``rounds/<run>/shards/NNNNN.weights.json``), one column a field, in the order of the
    shard's verdicts: the reduce step reads these (five numbers an update) rather than
    parsing every verdict of the round."""

    schema_: Literal["dadm.shard-weights.v1"] = _schema("dadm.shard-weights.v1")
    keys: list[str]
    client_ids: list[str]
    num_samples: list[int]
    staleness: list[int]
    units: list[int]

    @model_validator(mode="after")
    def _columns_align(self) -> Self:
        lengths = {len(self.keys), len(self.client_ids), len(self.num_samples)}
        lengths |= {len(self.staleness), len(self.units)}
        if len(lengths) != 1:
            raise ValueError(f"shard weights columns of unequal lengths {sorted(lengths)}")
        return self


class QuarantineStub(Record):
    """What quarantine keeps of bytes it does not keep whole (``quarantine/...stub.json``):
    the first bytes, the full SHA-256 and the size. ``kept_because`` says why: the object
    was over the envelope limit (never read whole), its device's quota was reached, its
    verdict could not be written, or its name cannot be addressed on the data path."""

    schema_: Literal["dadm.quarantine-stub.v1"] = _schema("dadm.quarantine-stub.v1")
    key_sha256: Sha256
    #: None: the object was over ``quarantine_hash_max_bytes`` and only its prefix was read.
    sha256: Sha256 | None
    size: Annotated[int, Field(ge=0)]
    prefix_hex: Annotated[str, Field(max_length=2 * 65536)]
    kept_because: Literal["oversized", "quarantine_quota", "unrecordable", "unaddressable"]
    etag: str = ""  # of the object version the digest was taken of


class VerdictAttempts(Record):
    """How many rounds failed to write one inbox object's verdict (keyed by its digest)."""

    schema_: Literal["dadm.verdict-attempts.v1"] = _schema("dadm.verdict-attempts.v1")
    key_sha256: Sha256
    attempts: Annotated[int, Field(ge=0)]
    last_error: Annotated[str, Field(max_length=500)] = ""


class QuarantineSweep(Record):
    """Where the quarantine retention sweep stopped (it scans a bounded slice per round)."""

    schema_: Literal["dadm.quarantine-sweep.v1"] = _schema("dadm.quarantine-sweep.v1")
    after: str | None = None


class UnrecordedVerdicts(Record):
    """The report's list of verdicts a round could not write (their objects stay in the
    inbox for the next round): how many, and a bounded sample of their key digests."""

    count: int = 0
    sample: Annotated[list[Sha256], Field(max_length=20)] = Field(default_factory=list)
    #: Of those, how many were written under the digest fallback key instead (and their
    #: objects deleted): accepted ones at once, rejected ones as ``unrecordable`` once
    #: they reached the attempt limit.
    unrecordable: int = 0


class ShardRecorded(Record):
    """What a shard's ``record_shard`` task did with its verdicts (state bucket, one per
    shard): the counts the report sums, and the verdicts it could not write. With
    ``consumed`` False (a dry run, a replay) nothing was written or deleted."""

    schema_: Literal["dadm.shard-recorded.v1"] = _schema("dadm.shard-recorded.v1")
    index: int
    consumed: bool
    accepted: int
    rejected: dict[str, int]
    unrecorded: UnrecordedVerdicts = Field(default_factory=UnrecordedVerdicts)


# -- step results (XCom) --------------------------------------------------------------------


class ShardResult(Record):
    """What a shard task returns (XCom): where its partial sum is and what it judged."""

    index: int
    partial_key: str
    partial_digest: Sha256
    accepted: int
    rejected: dict[str, int]


class AggregateResult(Record):
    """The reduced aggregate of a round: how many updates it sums, and its digest."""

    count: int
    digest: Sha256


class DeviceShare(Record):
    """One device's part of a round's weight (the reduce step's final weights)."""

    client_id: str
    accepted: int
    weight_share: float
    #: A self-reported sample count was clipped to the round's count cap.
    clipped: bool = False
    #: Its share was cut to ``max_device_weight_share`` (or to equal weights).
    capped: bool = False


class RoundWeights(Record):
    """The final weights of a round's devices (``rounds/<run>/weights.json``): one entry
    per device with an accepted update (so at most the fleet's size), by client id."""

    schema_: Literal["dadm.round-weights.v1"] = _schema("dadm.round-weights.v1")
    devices: list[DeviceShare]
    count_cap: int | None = None
    max_device_share: float
    equal_weights: bool = False
    #: Accepted updates whose weight the reduce step changed (each re-read once).
    reweighted: int = 0

    @property
    def largest(self) -> DeviceShare | None:
        """The device with the largest share (client id breaks ties): the summary's."""
        return max(self.devices, key=lambda d: (d.weight_share, d.client_id), default=None)


#: Devices a round report lists, largest weight shares first (the whole list is the
#: round's :class:`RoundWeights`): a report and the step that writes it stay the same
#: size whether 10 or 100,000 devices took part.
REPORT_DEVICES_LISTED = 100


class RoundWeightsSummary(Record):
    """What a round report says of the weights (``rounds/<run>/weights-summary.json``),
    written by the reduce step beside the full :class:`RoundWeights`."""

    schema_: Literal["dadm.round-weights-summary.v1"] = _schema("dadm.round-weights-summary.v1")
    device_count: int
    #: The :data:`REPORT_DEVICES_LISTED` largest shares, largest first (ties: larger
    #: client id first, as :attr:`RoundWeights.largest`).
    top: list[DeviceShare]

    @classmethod
    def of(cls, devices: list[DeviceShare]) -> RoundWeightsSummary:
        ranked = sorted(devices, key=lambda d: (d.weight_share, d.client_id), reverse=True)
        return cls(device_count=len(devices), top=ranked[:REPORT_DEVICES_LISTED])


class CandidateResult(Record):
    """A built (not yet published) candidate: its version and content digest."""

    version: int
    digest: Sha256


# -- rollback, privacy, evaluation ----------------------------------------------------------


class RollbackAction(Record):
    """Who made a rollback version, from which run, and why (``rollbacks/vNNNNNNNN.json``).

    An operator's rollback is also the *pin* (``rollbacks/pin.json``): automatic rollback
    leaves the channel on it until a round publishes a candidate that passed the gate or
    the operator acts again. The signed package says what a version carries; this says
    who asked for it, which the package cannot (the DAG run is known only to the server).
    """

    schema_: Literal["dadm.rollback.v1"] = _schema("dadm.rollback.v1")
    version: int  #: the rollback version published (the active one after it)
    rollback_of: int  #: the known-good version whose model it carries
    parent_version: int  #: what was active before
    reason: str
    automatic: bool
    by: str  #: the operator (Airflow user, OS user of fl-admin) or "automatic"
    source: str  #: the DAG whose run made it (``fl_rollback``, ``fl_round``) or "fl-admin"
    run_id: str | None = None  #: that DAG run (None for fl-admin)
    created_at_ms: int

    @property
    def package_reason(self) -> str:
        """The ``rollback_reason`` its package carries in its signed metadata."""
        return f"{'automatic' if self.automatic else 'manual'}: {self.reason}"

    def describe(self) -> str:
        """One line for the check's reason, the summary, ``fl-admin status`` and the UI."""
        how = "automatic rollback" if self.automatic else "operator rollback"
        run = f" run {self.run_id}" if self.run_id else ""
        return (
            f"{how} to v{self.rollback_of} (active v{self.version}, by {self.by} via "
            f"{self.source}{run}: {self.reason})"
        )


class RollbackDecision(Record):
    """The automatic rollback check at the start of a round (``rounds/<run>/rollback.json``)."""

    schema_: Literal["dadm.rollback-check.v1"] = _schema("dadm.rollback-check.v1")
    active_version: int
    active_auc: float
    best_version: int
    best_auc: float
    rollback: bool
    reason: str
    published_version: int | None = None
    #: True when the check ran without publishing (a dry run): a rollback it calls for
    #: was reported, not made.
    dry_run: bool = False
    #: The operator rollback that pins the active version: the check moved nothing
    #: (``reason`` says "pinned by operator rollback to vN" and what would have been due).
    pinned: RollbackAction | None = None


class PrivacyRecord(Record):
    """What a round's DP step decided (``rounds/<run>/privacy.json``)."""

    schema_: Literal["dadm.round-privacy.v1"] = _schema("dadm.round-privacy.v1")
    mode: Literal["central", "local"]
    round_id: str
    clip_norm: float
    multipliers: list[float]
    count: int
    spent: PrivacySpent
    epsilon_before: float
    refused: bool = False
    reason: str | None = None
    next_clip_norm: float | None = None
    replay_of: str | None = None


class PrivacyCharge(Record):
    """One DP round charged against the budget (``privacy/spent/<multipliers>/<run>.json``)."""

    schema_: Literal["dadm.privacy-charge.v1"] = _schema("dadm.privacy-charge.v1")
    run_id: str
    multipliers: list[float]
    mode: Literal["central", "local"]


class ReplayCheck(Record):
    """A re-run interval's comparison of its recomputed candidate with the original."""

    of: str
    matches: bool
    candidate_digest: str | None = None
    original_digest: str | None = None
    published_version: int | None = None


class Evaluation(Record):
    """Candidate and active model on the round's holdout, and the gate's verdict
    (``rounds/<run>/evaluation.json``)."""

    schema_: Literal["dadm.round-evaluation.v1"] = _schema("dadm.round-evaluation.v1")
    #: The published figures: the holdout's evaluation part (``part``; the whole holdout
    #: in documents written before the split).
    active: Metrics
    candidate: Metrics | None = None
    #: What the gate compared: the same models on the calibration part (None: documents
    #: written before the split, whose gate saw ``active``/``candidate``).
    calibration_active: Metrics | None = None
    calibration_candidate: Metrics | None = None
    holdout_version: int | None = None
    publish: bool
    reason: str
    privacy: PrivacyRecord | None = None
    replay: ReplayCheck | None = None


class IntervalRecord(Record):
    """What the round of a data interval produced (``intervals/<interval>.json``)."""

    schema_: Literal["dadm.interval.v1"] = _schema("dadm.interval.v1")
    run_id: str
    decision: Decision
    candidate_digest: str | None = None
    candidate_version: int | None = None
    published_version: int | None = None


class PrivacySummary(Record):
    """The report's view of a round's DP step: cumulative (epsilon, delta) and C."""

    mode: Literal["central", "local"] | None = None
    epsilon: float | None = None
    delta: float | None = None
    rounds: int | None = None
    budget_epsilon: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    next_clip_norm: float | None = None
    epsilon_before: float | None = None
    refused: bool = False

    @classmethod
    def of(cls, record: PrivacyRecord | None) -> PrivacySummary | None:
        if record is None:
            return None
        spent = record.spent
        return cls(
            mode=record.mode,
            epsilon=spent.epsilon,
            delta=spent.delta,
            rounds=spent.rounds,
            budget_epsilon=spent.budget_epsilon,
            noise_multiplier=spent.noise_multiplier,
            clip_norm=record.clip_norm,
            next_clip_norm=record.next_clip_norm,
            epsilon_before=record.epsilon_before,
            refused=record.refused,
        )


# -- the report ---------------------------------------------------------------------------------


#: How many capped devices a plan and a report name (the count is in ``capped_groups``).
CAPPED_DEVICES_LISTED = 20


class RoundReport(Record):
    """A finished round (``reports/<run>.json``): what the rounds page, ``fl-admin status``
    and the task log's summary show."""

    schema_: Literal["dadm.round-report.v1"] = _schema("dadm.round-report.v1")
    run_id: str
    base_version: int
    decision: Decision
    message: str = ""
    published_version: int | None = None
    accepted: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    candidate_metrics: Metrics | None = None
    active_metrics: Metrics | None = None
    candidate_digest: str | None = None
    aggregate_digest: str | None = None
    holdout_version: int | None = None
    rollback: RollbackDecision | None = None
    replay: ReplayCheck | None = None
    #: Differential privacy: cumulative epsilon/delta after this round (None: DP off).
    privacy: PrivacySummary | None = None
    #: Inbox objects the plan left for later rounds, by reason (:class:`RoundPlan`).
    deferred: dict[str, int] | None = None
    #: Devices that had more inbox objects than ``max_objects_per_device`` (the rest
    #: stays for later rounds), first :data:`CAPPED_DEVICES_LISTED` by id.
    capped_devices: list[str] | None = None
    #: Devices' accepted counts and weight shares, the :data:`REPORT_DEVICES_LISTED`
    #: largest first (None: reports before them); all of them: ``rounds/<run>/weights.json``.
    devices: list[DeviceShare] | None = None
    #: How many devices had an accepted update (None: reports that listed them all).
    device_count: int | None = None
    largest_weight_share: float | None = None
    largest_share_client: str | None = None
    #: Verdicts this round could not write (None: every verdict was written).
    unrecorded: UnrecordedVerdicts | None = None
    #: Quarantine objects past ``quarantine_retention_days`` this round deleted.
    quarantine_expired: int = 0

    def as_dict(self) -> dict[str, Any]:
        return self.to_doc()

    def summary(self) -> str:
        """A short readable block for task logs and the CLI."""
        lines = [
            f"round {self.run_id}: {self.decision.value} — {self.message}",
            f"  updates: {self.accepted} accepted, {sum(self.rejected.values())} rejected"
            + (f" {self.rejected}" if self.rejected else ""),
        ]
        if self.deferred:
            lines.append(f"  left in the inbox for later rounds: {self.deferred}")
        if self.capped_devices:
            lines.append(
                "  over the per-device cap (the rest waits): " + ", ".join(self.capped_devices)
            )
        if self.largest_weight_share is not None:
            lines.append(
                f"  devices: {self.device_count or len(self.devices or ())}, largest weight share "
                f"{self.largest_weight_share:.1%} ({self.largest_share_client})"
            )
        if self.active_metrics:
            active = self.active_metrics
            rows = "evaluation rows" if active.part == "evaluation" else "holdout"
            line = (
                f"  {rows} AUC / AP: active v{self.base_version} "
                f"{active.auc:.4f}{_interval(active)} / {active.ap:.4f}"
            )
            if self.candidate_metrics:
                candidate = self.candidate_metrics
                line += (
                    f", candidate {candidate.auc:.4f}{_interval(candidate)} / {candidate.ap:.4f}"
                )
            lines.append(line)
        if self.published_version:
            lines.append(f"  published version {self.published_version}")
        if self.privacy:
            dp = self.privacy
            line = (
                f"  privacy ({dp.mode} DP): epsilon {_num(dp.epsilon, '.4g')}"
                f" at delta {_num(dp.delta, 'g')} after {dp.rounds} rounds"
                + (f", budget {dp.budget_epsilon:g}" if dp.budget_epsilon is not None else "")
            )
            if dp.refused:
                line += " — REFUSED: over the budget, nothing published"
            lines.append(line)
        rollback = self.rollback
        if rollback and rollback.pinned is not None:
            lines.append(f"  PINNED: {rollback.reason}")
        if rollback and rollback.rollback:
            if rollback.published_version is not None:
                lines.append(
                    f"  ROLLBACK: {rollback.reason} -> published "
                    f"v{rollback.published_version} (= v{rollback.best_version})"
                )
            else:
                lines.append(f"  ROLLBACK due (not published: dry run): {rollback.reason}")
        return "\n".join(lines)


def _interval(metrics: Metrics) -> str:
    """The AUC's bootstrap interval as `` [low, high]`` ("" when not recorded)."""
    if metrics.auc_low is None or metrics.auc_high is None:
        return ""
    return f" [{metrics.auc_low:.3f}, {metrics.auc_high:.3f}]"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)

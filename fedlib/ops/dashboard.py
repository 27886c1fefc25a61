"""A read-only view of one deployment for operators: rounds, versions, quarantine, a plot.

Everything here is read from what the rounds already write (round reports and plans in
the state bucket, signed packages in the models bucket, the ledger's quarantine), so the
dashboard cannot disagree with the system it shows, and it writes nothing. Pages are
bounded: the newest ``limit`` items after ``offset``, so a long-lived deployment costs a
listing (metadata only) plus a few reads per row, not a read per round ever run.

Used by the Airflow plugin (``plugins/fl_dashboard.py``) and ``fl-admin status``; no
Airflow import here. :func:`render_plot_svg` draws AUC and AP across versions as a
self-contained SVG string (no script, no external asset, every text escaped).
"""

from __future__ import annotations

import dataclasses
import html
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tuf.api.metadata import Targets

from fedlib.errors import RejectedUpdate
from fedlib.server import state_keys
from fedlib.server.deployment import Deployment
from fedlib.server.ledger import Ledger
from fedlib.server.records import (
    ModelsIntegrity,
    RecordError,
    RollbackDecision,
    RoundPlan,
    RoundReport,
    ShardVerdicts,
    Verdict,
)
from fedlib.server.registry import ModelRegistry
from fedlib.server.rollback import rollback_action
from fedlib.server.state_keys import RunKeys
from fedlib.storage.store import NoSuchKey, ObjectInfo
from fedlib.trust.channel_layout import manifest_path
from fedlib.trust.channel_repository import published_versions
from fedlib.wire import protocol

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: Parallel S3 reads for one page (hides the store's latency; each read is small).
READ_CONCURRENCY = 8
#: Verified version rows kept per process: packages are write-once, so a version that
#: verified once stays what it was (a changed object would fail verification anyway).
VERSION_CACHE_SIZE = 4096
MAX_JSON_BYTES = 16 << 20

T = TypeVar("T")


# -- rows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a newest-first list: ``items`` after ``offset``; ``total`` in all."""

    items: list[T]
    total: int
    offset: int
    limit: int

    @property
    def has_newer(self) -> bool:
        return self.offset > 0

    @property
    def has_older(self) -> bool:
        return self.offset + len(self.items) < self.total

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": [to_jsonable(item) for item in self.items],
            "total": self.total,
            "offset": self.offset,
            "limit": self.limit,
        }


@dataclass(frozen=True)
class RollbackInfo:
    """What the round's first step (automatic rollback check) decided."""

    rolled_back: bool
    reason: str
    active_version: int | None = None
    active_auc: float | None = None
    best_version: int | None = None
    best_auc: float | None = None
    published_version: int | None = None
    #: An operator's rollback pinned the active version: the check moved nothing.
    pinned: bool = False

    @classmethod
    def of(cls, decision: RollbackDecision | None) -> RollbackInfo | None:
        if decision is None:
            return None
        return cls(
            rolled_back=decision.rollback,
            reason=decision.reason,
            active_version=decision.active_version,
            active_auc=_float_or_none(decision.active_auc),
            best_version=decision.best_version,
            best_auc=_float_or_none(decision.best_auc),
            published_version=decision.published_version,
            pinned=decision.pinned is not None,
        )


@dataclass(frozen=True)
class DeviceShareRow:
    """One device's accepted updates and share of a round's weight (from its report)."""

    client_id: str
    accepted: int
    weight_share: float
    clipped: bool = False  # a self-reported sample count was clipped to the round's cap
    capped: bool = False  # its share was cut to the cap (or to equal weights)


@dataclass(frozen=True)
class RoundRow:
    """One round (one ``fl_round`` run) as its report tells it."""

    run_id: str
    decision: str
    message: str
    base_version: int | None
    accepted: int
    rejected: dict[str, int]
    candidate_metrics: dict[str, float] | None
    active_metrics: dict[str, float] | None
    published_version: int | None
    rollback: RollbackInfo | None
    created_at_ms: int | None  # the round's fixed time (plan): logical date or trigger time
    finished_at_ms: int  # when the report was written (the store's clock)
    holdout_version: int | None = None
    replay_of: str | None = None
    #: Differential privacy after this round: cumulative (epsilon, delta), None when off.
    privacy_epsilon: float | None = None
    privacy_delta: float | None = None
    privacy_budget: float | None = None
    privacy_refused: bool = False
    #: Each device's accepted count and weight share; empty in reports before them.
    devices: tuple[DeviceShareRow, ...] = ()  # the largest shares (a report lists 100)
    device_count: int = 0  # every device with an accepted update
    largest_weight_share: float | None = None
    largest_share_client: str | None = None
    #: Which holdout rows the metrics are on: "evaluation" (None: reports before the split,
    #: whole holdout).
    metrics_part: str | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass(frozen=True)
class VersionRow:
    """One published version from its signed metadata; ``error`` if it did not verify."""

    version: int
    auc: float | None = None
    ap: float | None = None
    #: The AUC's 95% bootstrap interval on the evaluation rows (None: not recorded).
    auc_low: float | None = None
    auc_high: float | None = None
    parent_version: int | None = None
    rollback_of: int | None = None
    rollback_reason: str | None = None
    #: Who made a rollback version, via which DAG (or fl-admin) and run (its record).
    rollback_by: str | None = None
    rollback_source: str | None = None
    rollback_run_id: str | None = None
    round_id: str | None = None
    created_at_ms: int | None = None
    model_kind: str | None = None
    #: Cumulative DP epsilon / delta recorded in the signed metadata (None: DP off).
    privacy_epsilon: float | None = None
    privacy_delta: float | None = None
    active: bool = False
    rolled_back: bool = False  # a later rollback moved the channel away from this version
    error: str | None = None

    @property
    def is_rollback(self) -> bool:
        return self.rollback_of is not None


@dataclass(frozen=True)
class RejectedCandidate:
    """A round whose candidate the gate refused: what it scored next to the active model."""

    run_id: str
    base_version: int | None
    candidate_auc: float | None
    candidate_ap: float | None
    active_auc: float | None
    message: str
    created_at_ms: int | None


@dataclass(frozen=True)
class QuarantineRow:
    """One update a round refused, with where (and since when) the ledger keeps it."""

    key: str
    client_id: str | None
    reason: str | None
    detail: str | None
    size: int
    sha256: str
    #: The object holding the judged bytes (``quarantine/.../<sha16>.bin``); None when no
    #: bytes were kept (the object was never read, or the copy is gone).
    quarantine_key: str | None
    quarantined: bool  # the ledger's reason file exists (a dry or replayed run writes none)
    time_ms: int | None  # when the ledger recorded it (the store's clock)
    update_id: str | None = None


def to_jsonable(item: Any) -> Any:
    """Dataclass rows (with their derived flags) as plain JSON values."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        doc = {f.name: to_jsonable(getattr(item, f.name)) for f in dataclasses.fields(item)}
        for name in ("rejected_total", "is_rollback"):
            if hasattr(type(item), name):
                doc[name] = getattr(item, name)
        return doc
    if isinstance(item, dict):
        return {str(k): to_jsonable(v) for k, v in item.items()}
    if isinstance(item, list | tuple):
        return [to_jsonable(v) for v in item]
    return item


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metrics(metrics: Any) -> dict[str, float] | None:
    if metrics is None:
        return None
    doc = metrics.model_dump()
    return {str(k): float(v) for k, v in doc.items() if _float_or_none(v) is not None}


def clamp_page(limit: int | None, offset: int | None) -> tuple[int, int]:
    """Bounded paging parameters: 1 <= limit <= MAX_LIMIT, offset >= 0."""
    limit = DEFAULT_LIMIT if limit is None else max(1, min(int(limit), MAX_LIMIT))
    return limit, max(0, int(offset or 0))


def _parallel(fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(READ_CONCURRENCY, len(items))) as pool:
        return list(pool.map(fn, items))


# -- rounds -----------------------------------------------------------------------------------


def report_objects(deployment: Deployment) -> list[ObjectInfo]:
    """Every round report, newest first (by when it was written; run id breaks ties)."""
    infos = [
        i
        for i in deployment.state.list(state_keys.REPORTS)
        if state_keys.report_run_name(i.key) is not None
    ]
    infos.sort(key=lambda i: (i.last_modified_ms, i.key), reverse=True)
    return infos


def _round_row(deployment: Deployment, info: ObjectInfo) -> RoundRow | None:
    name = state_keys.report_run_name(info.key) or info.key
    try:
        data = deployment.state.get(info.key, max_bytes=MAX_JSON_BYTES)
    except NoSuchKey:  # deleted between listing and reading
        return None
    try:
        report = RoundReport.from_json(data, what=info.key)
    except RecordError as exc:  # shown, not hidden
        return RoundRow(
            run_id=name,
            decision="unreadable",
            message=str(exc),
            base_version=None,
            accepted=0,
            rejected={},
            candidate_metrics=None,
            active_metrics=None,
            published_version=None,
            rollback=None,
            created_at_ms=None,
            finished_at_ms=info.last_modified_ms,
        )
    plan: RoundPlan | None
    try:
        plan = RoundPlan.from_json(deployment.state.get(RunKeys(report.run_id).plan))
    except (NoSuchKey, RecordError):
        plan = None
    privacy = report.privacy
    return RoundRow(
        run_id=report.run_id,
        decision=report.decision.value,
        message=report.message,
        base_version=report.base_version,
        accepted=report.accepted,
        rejected=dict(sorted(report.rejected.items())),
        candidate_metrics=_metrics(report.candidate_metrics),
        active_metrics=_metrics(report.active_metrics),
        published_version=report.published_version,
        rollback=RollbackInfo.of(report.rollback),
        created_at_ms=plan.created_at_ms if plan else None,
        finished_at_ms=info.last_modified_ms,
        holdout_version=report.holdout_version,
        replay_of=plan.replay_of if plan else None,
        privacy_epsilon=_float_or_none(privacy.epsilon) if privacy else None,
        privacy_delta=_float_or_none(privacy.delta) if privacy else None,
        privacy_budget=_float_or_none(privacy.budget_epsilon) if privacy else None,
        privacy_refused=privacy.refused if privacy else False,
        devices=tuple(
            DeviceShareRow(
                client_id=d.client_id,
                accepted=d.accepted,
                weight_share=d.weight_share,
                clipped=d.clipped,
                capped=d.capped,
            )
            for d in report.devices or ()
        ),
        device_count=report.device_count or len(report.devices or ()),
        largest_weight_share=_float_or_none(report.largest_weight_share),
        largest_share_client=report.largest_share_client,
        metrics_part=(report.active_metrics.part if report.active_metrics else None),
    )


def rounds(
    deployment: Deployment, *, limit: int | None = DEFAULT_LIMIT, offset: int | None = 0
) -> Page[RoundRow]:
    """The newest rounds (a page of them), each from its report and plan."""
    limit, offset = clamp_page(limit, offset)
    infos = report_objects(deployment)
    window = infos[offset : offset + limit]
    rows = [r for r in _parallel(lambda i: _round_row(deployment, i), window) if r is not None]
    # S3 times are whole seconds: within a page, the round's own time orders a tie
    rows.sort(key=lambda r: (r.finished_at_ms, r.created_at_ms or 0, r.run_id), reverse=True)
    return Page(rows, len(infos), offset, limit)


def round_detail(deployment: Deployment, run_id: str) -> RoundRow | None:
    """One round by its Airflow run id (None: no report, e.g. still running or waiting)."""
    key = RunKeys(run_id).report
    for info in deployment.state.list(key, limit=1):
        if info.key == key:
            return _round_row(deployment, info)
    return None


def rejected_candidates(
    deployment: Deployment, *, scan: int = DEFAULT_LIMIT
) -> list[RejectedCandidate]:
    """Candidates the gate refused among the newest ``scan`` rounds, newest first."""
    return rejected_in(rounds(deployment, limit=scan).items)


def rejected_in(rows: Iterable[RoundRow]) -> list[RejectedCandidate]:
    """The rounds among ``rows`` whose candidate the gate refused (no further reads)."""
    found = []
    for row in rows:
        if row.decision != "rejected" or not row.candidate_metrics:
            continue
        found.append(
            RejectedCandidate(
                run_id=row.run_id,
                base_version=row.base_version,
                candidate_auc=row.candidate_metrics.get("auc"),
                candidate_ap=row.candidate_metrics.get("ap"),
                active_auc=(row.active_metrics or {}).get("auc"),
                message=row.message,
                created_at_ms=row.created_at_ms,
            )
        )
    return found


# -- versions ----------------------------------------------------------------------------------

_version_cache: OrderedDict[tuple[str, str, int, str], VersionRow] = OrderedDict()
_version_lock = threading.Lock()


def _package_digests(registry: ModelRegistry) -> tuple[dict[int, str], Targets]:
    """Every published version -> its signed manifest's SHA-256 (the version's content as
    the channel vouches for it), from the verified targets metadata: never a bucket
    listing, so an object no signed metadata names is not a version here."""
    targets = registry.channel.targets()
    digests = {}
    for version in published_versions(targets):
        info = targets.targets[manifest_path(version)]
        digests[version] = str(info.hashes.get("sha256", ""))
    return digests, targets


def _read_version_row(
    deployment: Deployment, registry: ModelRegistry, version: int, etag: str, targets: Targets
) -> VersionRow:
    """The version's signed metadata (verified); cached per process by signed digest."""
    cache_key = (str(deployment.s3.endpoint_url), deployment.settings.models_bucket, version, etag)
    with _version_lock:
        cached = _version_cache.get(cache_key)
    if cached is not None:
        return cached
    try:
        meta = registry.read_version(version, targets).metadata
    except Exception as exc:  # a version that does not verify is shown, not hidden
        return VersionRow(version=version, error=f"{type(exc).__name__}: {exc}")
    row = VersionRow(
        version=version,
        auc=_float_or_none(meta.metrics.get("auc")),
        ap=_float_or_none(meta.metrics.get("ap")),
        auc_low=_float_or_none(meta.metrics.get("auc_low")),
        auc_high=_float_or_none(meta.metrics.get("auc_high")),
        parent_version=meta.parent_version,
        rollback_of=meta.rollback_of,
        rollback_reason=meta.rollback_reason,
        round_id=meta.round_id,
        created_at_ms=meta.created_at_ms,
        model_kind=meta.model_kind,
        privacy_epsilon=meta.privacy.epsilon if meta.privacy else None,
        privacy_delta=meta.privacy.delta if meta.privacy else None,
    )
    if etag:
        with _version_lock:
            _version_cache[cache_key] = row
            while len(_version_cache) > VERSION_CACHE_SIZE:
                _version_cache.popitem(last=False)
    return row


def _version_page(deployment: Deployment, count: int | None) -> tuple[list[VersionRow], int]:
    registry = deployment.registry()
    etags, targets = _package_digests(registry)
    numbers = sorted(etags, reverse=True)[:count]
    active = registry.active_version()
    rows = _parallel(
        lambda v: _read_version_row(deployment, registry, v, etags[v], targets), numbers
    )
    bad = {r.parent_version for r in rows if r.is_rollback and r.parent_version is not None}
    rows = [
        dataclasses.replace(r, active=r.version == active, rolled_back=r.version in bad)
        for r in rows
    ]
    return _parallel(lambda r: _with_rollback_action(deployment, r), rows), len(etags)


def _with_rollback_action(deployment: Deployment, row: VersionRow) -> VersionRow:
    """A rollback row with who made it and the run (read each time: not in the signed
    package, so not in the per-version cache)."""
    if not row.is_rollback or row.error:
        return row
    action = rollback_action(deployment, row)
    if action is None:
        return row
    return dataclasses.replace(
        row, rollback_by=action.by, rollback_source=action.source, rollback_run_id=action.run_id
    )


def models_integrity(deployment: Deployment) -> ModelsIntegrity:
    """Objects in the models bucket the signed channel does not name (bounded scan):
    ignored by every read, shown to the operator on the rounds page and in status."""
    return deployment.registry().integrity()


def version_rows(deployment: Deployment, count: int | None = None) -> list[VersionRow]:
    """The newest ``count`` versions (all when None), newest first, with flags set.

    Each row is the package's verified metadata (signature checked, as devices do). A
    version that does not verify is a row with ``error`` set. ``rolled_back`` marks a
    version some rollback moved away from (the rollback's ``parent_version``, as
    :func:`fedlib.server.rollback.known_good` reads it); rollbacks are newer than what they
    replace, so the newest ``count`` rows carry every such mark.
    """
    return _version_page(deployment, count)[0]


def versions(
    deployment: Deployment, *, limit: int | None = DEFAULT_LIMIT, offset: int | None = 0
) -> Page[VersionRow]:
    """A page of versions, newest first."""
    limit, offset = clamp_page(limit, offset)
    rows, total = _version_page(deployment, offset + limit)
    return Page(rows[offset:], total, offset, limit)


# -- quarantine ----------------------------------------------------------------------------------


def _run_verdicts(deployment: Deployment, run_id: str) -> list[Verdict] | None:
    """The verdicts a run's shards wrote (its own index of what it judged)."""
    keys = RunKeys(run_id)
    try:
        plan = RoundPlan.from_json(deployment.state.get(keys.plan), what=keys.plan)
    except NoSuchKey:
        return None
    verdicts: list[Verdict] = []
    for index in range(plan.shard_count):
        key = keys.shard_verdicts(index)
        try:
            data = deployment.state.get(key, max_bytes=MAX_JSON_BYTES)
        except NoSuchKey:  # a shard that never finished
            continue
        verdicts.extend(ShardVerdicts.from_json(data, what=key).verdicts)
    return verdicts


def _quarantine_row(ledger: Ledger, verdict: Verdict) -> QuarantineRow:
    kept = state_keys.quarantine_bytes(verdict.key, verdict.sha256)
    reason = state_keys.quarantine_reason(verdict.key, verdict.sha256)
    times = {
        info.key: info.last_modified_ms
        for info in ledger.state.list(
            state_keys.quarantine_base(verdict.key, verdict.sha256), limit=4
        )
    }
    return QuarantineRow(
        key=verdict.key,
        client_id=verdict.client_id or _client_of(verdict.key),
        reason=verdict.reason,
        detail=verdict.detail,
        size=verdict.size,
        sha256=verdict.sha256,
        quarantine_key=kept if kept in times else None,
        quarantined=reason in times,
        time_ms=times.get(reason) or times.get(kept),
        update_id=verdict.update_id,
    )


def _client_of(key: str) -> str | None:
    try:
        return protocol.parse_inbox_key(key)[0]
    except RejectedUpdate:
        return None


def quarantine(
    deployment: Deployment,
    run_id: str,
    *,
    limit: int | None = DEFAULT_LIMIT,
    offset: int | None = 0,
) -> Page[QuarantineRow] | None:
    """The updates a round refused (ordered by key), with their ledger quarantine entries.

    None when the run has no plan (unknown run id).
    """
    limit, offset = clamp_page(limit, offset)
    verdicts = _run_verdicts(deployment, run_id)
    if verdicts is None:
        return None
    refused = sorted((v for v in verdicts if not v.accepted), key=lambda v: v.key)
    ledger = Ledger(deployment.state)
    window = refused[offset : offset + limit]
    return Page(
        _parallel(lambda d: _quarantine_row(ledger, d), window), len(refused), offset, limit
    )


def quarantined_updates(deployment: Deployment) -> int:
    """Updates the ledger has quarantined: one reason file each (the kept bytes beside it
    are the same update, not another one). One listing of ``quarantine/``."""
    listing = deployment.state.list(state_keys.QUARANTINE)
    return sum(1 for info in listing if state_keys.is_quarantine_reason(info.key))


# -- the plot -------------------------------------------------------------------------------------

AUC_COLOR = "#1f6fb4"
AP_COLOR = "#2a9d4b"
ROLLBACK_COLOR = "#e07b00"
REJECTED_COLOR = "#c62828"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def _ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    span = hi - lo
    step = next(
        (s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5) if span / s <= most), span or 1.0
    )
    first = math.ceil(lo / step - 1e-9) * step
    count = math.floor((hi - first) / step + 1e-9) + 1
    return [round(first + i * step, 6) for i in range(max(count, 0))]


def render_plot_svg(
    rows: Iterable[VersionRow],
    rejected: Iterable[RejectedCandidate] = (),
    *,
    width: int = 760,
    height: int = 320,
    title: str = "Holdout AUC and AP by model version",
) -> str:
    """AUC and AP of each version on its holdout when published, as an SVG document.

    Rollback versions get an orange diamond and a dashed marker line labelled with the
    version they restore; versions rolled back away from get a red ring; candidates the
    gate rejected are red crosses half a version after the version they were compared to.
    Every point has a ``<title>`` (a tooltip in browsers). Pure string building.
    """
    points = sorted((r for r in rows if r.error is None), key=lambda r: r.version)
    refused = [c for c in rejected if c.base_version is not None]
    values = [v for r in points for v in (r.auc, r.ap) if v is not None]
    values += [v for c in refused for v in (c.candidate_auc, c.candidate_ap) if v is not None]
    left, right, top, bottom = 56, 16, 56, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" '
        'class="fl-plot" font-family="sans-serif" font-size="11">',
        f"<title>{_esc(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{_esc(title)}</text>',
    ]
    if not values:
        out.append(
            f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" '
            'fill="#666">no published metrics yet</text></svg>'
        )
        return "".join(out)

    xs = [float(r.version) for r in points] + [c.base_version + 0.5 for c in refused]  # type: ignore[operator]
    x_lo, x_hi = min(xs) - 0.5, max(xs) + 0.5
    y_lo = max(0.0, math.floor((min(values) - 0.02) * 20) / 20)
    y_hi = min(1.0, math.ceil((max(values) + 0.02) * 20) / 20)
    if y_hi - y_lo < 0.05:
        y_lo, y_hi = max(0.0, y_hi - 0.05), max(y_hi, 0.05)

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * plot_h

    # axes, grid, ticks
    for tick in _ticks(y_lo, y_hi):
        y = py(tick)
        out.append(
            f'<line x1="{left}" y1="{_fmt(y)}" x2="{left + plot_w}" y2="{_fmt(y)}" '
            'stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{_fmt(y + 4)}" text-anchor="end">{tick:.2f}</text>'
        )
    versions_x = sorted({r.version for r in points})
    every = max(1, math.ceil(len(versions_x) / 20))
    for i, v in enumerate(versions_x):
        if i % every == 0 or i == len(versions_x) - 1:
            out.append(
                f'<text x="{_fmt(px(v))}" y="{top + plot_h + 16}" text-anchor="middle">v{v}</text>'
            )
    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>'
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">'
        "model version</text>"
    )

    # rollbacks: a dashed line at the version, labelled with what it restores
    for r in points:
        if r.is_rollback:
            x = _fmt(px(r.version))
            tip = f"v{r.version}: rollback to the model of v{r.rollback_of}"
            if r.rollback_reason:
                tip += f" ({r.rollback_reason})"
            out.append(
                f'<g class="rollback"><title>{_esc(tip)}</title>'
                f'<line x1="{x}" y1="{top}" x2="{x}" y2="{top + plot_h}" '
                f'stroke="{ROLLBACK_COLOR}" stroke-dasharray="4 3"/>'
                f'<text x="{x}" y="{top - 4}" text-anchor="middle" fill="{ROLLBACK_COLOR}">'
                f"\u21a9 v{r.rollback_of}</text></g>"
            )

    # metric lines
    for name, color, dash in (("auc", AUC_COLOR, ""), ("ap", AP_COLOR, ' stroke-dasharray="6 3"')):
        pts = [(r, getattr(r, name)) for r in points if getattr(r, name) is not None]
        segments: list[list[str]] = [[]]
        for r in points:  # a version without the metric breaks the line
            value = getattr(r, name)
            if value is None:
                segments.append([])
            else:
                segments[-1].append(f"{_fmt(px(r.version))},{_fmt(py(value))}")
        for segment in segments:
            if len(segment) > 1:
                out.append(
                    f'<polyline class="{name}-line" points="{" ".join(segment)}" fill="none" '
                    f'stroke="{color}" stroke-width="2"{dash}/>'
                )
        for r, v in pts:
            sx, sy = _fmt(px(r.version)), _fmt(py(v))
            tip = f"v{r.version} {name.upper()} {v:.4f}"
            if r.is_rollback:
                tip += f" (rollback of v{r.rollback_of})"
            if r.rolled_back:
                tip += " (rolled back)"
            if r.is_rollback:
                shape = (
                    f'<path d="M{sx},{_fmt(py(v) - 6)} l6,6 l-6,6 l-6,-6 z" '
                    f'fill="{ROLLBACK_COLOR}" stroke="{color}"/>'
                )
            else:
                shape = f'<circle cx="{sx}" cy="{sy}" r="3.5" fill="{color}"/>'
            if r.rolled_back:
                shape += (
                    f'<circle cx="{sx}" cy="{sy}" r="7" fill="none" stroke="{REJECTED_COLOR}" '
                    'stroke-width="1.5"/>'
                )
            out.append(f'<g class="point {name}"><title>{_esc(tip)}</title>{shape}</g>')

    # versions without metrics (published without the gate): a mark on the axis
    for r in points:
        if r.auc is None and r.ap is None:
            sx, sy = _fmt(px(r.version)), _fmt(top + plot_h - 7)
            tip = f"v{r.version}: no holdout metrics recorded" + (
                " (rolled back)" if r.rolled_back else ""
            )
            ring = REJECTED_COLOR if r.rolled_back else "#888888"
            out.append(
                f'<g class="point unscored"><title>{_esc(tip)}</title>'
                f'<circle cx="{sx}" cy="{sy}" r="5" fill="#ffffff" stroke="{ring}" '
                'stroke-width="1.5"/></g>'
            )

    # rejected candidates: crosses between the version they were compared to and the next
    for c in refused:
        cx = px(c.base_version + 0.5)  # type: ignore[operator]
        for name, value, size in (("auc", c.candidate_auc, 5), ("ap", c.candidate_ap, 3.5)):
            if value is None:
                continue
            y = py(value)
            tip = (
                f"rejected candidate of {c.run_id} (base v{c.base_version}): "
                f"{name.upper()} {value:.4f}"
            )
            if c.message:
                tip += f" — {c.message}"
            out.append(
                f'<g class="rejected {name}"><title>{_esc(tip)}</title>'
                f'<path d="M{_fmt(cx - size)},{_fmt(y - size)} l{2 * size},{2 * size} '
                f'M{_fmt(cx - size)},{_fmt(y + size)} l{2 * size},{-2 * size}" '
                f'stroke="{REJECTED_COLOR}" stroke-width="2"/></g>'
            )

    # legend
    legend = [
        (f'<line x1="0" y1="-4" x2="18" y2="-4" stroke="{AUC_COLOR}" stroke-width="2"/>', "AUC"),
        (
            f'<line x1="0" y1="-4" x2="18" y2="-4" stroke="{AP_COLOR}" stroke-width="2" '
            'stroke-dasharray="6 3"/>',
            "AP",
        ),
        (f'<path d="M9,-10 l6,6 l-6,6 l-6,-6 z" fill="{ROLLBACK_COLOR}"/>', "rollback"),
        (
            f'<circle cx="9" cy="-4" r="6" fill="none" stroke="{REJECTED_COLOR}" '
            'stroke-width="1.5"/>',
            "rolled back",
        ),
        (
            f'<path d="M4,-9 l10,10 M4,1 l10,-10" stroke="{REJECTED_COLOR}" stroke-width="2"/>',
            "rejected candidate",
        ),
    ]
    out.append(f'<g class="legend" transform="translate({left},{top - 22})">')
    offset = 0
    for mark, label in legend:
        out.append(
            f'<g transform="translate({offset},0)">{mark}'
            f'<text x="22" y="0">{_esc(label)}</text></g>'
        )
        offset += 30 + 7 * len(label)
    out.append("</g></svg>")
    return "".join(out)

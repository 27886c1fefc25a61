"""One round's server-side steps as plain functions: open, validate, aggregate, build.

The round pipeline (:mod:`fedlib.server.round_runner`) calls them per shard; the
benchmarks call them directly, so what is measured is what runs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlib.crypto import sealing
from fedlib.errors import RejectedUpdate
from fedlib.models.model import AnomalyModel, FeatureSchema, load_model
from fedlib.models.package import ModelPackage
from fedlib.server import privacy, robust
from fedlib.server.aggregation import (
    WEIGHT_FRACTION_BITS,
    AggregationConfig,
    Aggregator,
    admit,
    dp_project,
    server_step,
    single_threaded_blas,
    staleness_weight,
)
from fedlib.server.records import Verdict
from fedlib.server.strategy import new_aggregator
from fedlib.wire import compression, protocol
from fedlib.wire.protocol import PackageMetadata, TrainingConfig

MIN_WEIGHT = 2.0**-WEIGHT_FRACTION_BITS  # the smallest weight the exact sum can represent


@dataclass(frozen=True)
class RoundInputs:
    """What a round's validation depends on (besides the updates themselves)."""

    fleet: sealing.ClientLookup
    server_keys: sealing.ServerKeyring
    base: ModelPackage
    known_versions: frozenset[int]
    #: Published versions within the staleness bound whose features are not the base's
    #: (a template vocabulary change between them): updates trained on them are refused.
    other_features: frozenset[int] = frozenset()
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    max_envelope_bytes: int = protocol.MAX_ENVELOPE_BYTES
    #: FLTrust's reference delta (``aggregation.robust == "fltrust"``), else None.
    reference: np.ndarray | None = None
    #: Header suite strings the server opens (None: every known suite).
    accepted_suites: frozenset[str] | None = None


@dataclass(frozen=True)
class AcceptedUpdate:
    header: protocol.UpdateHeader
    meta: protocol.UpdateMeta
    delta: compression.DecodedDelta
    weight: float
    staleness: int


def open_and_validate(key: str, blob: bytes, inputs: RoundInputs) -> AcceptedUpdate:
    """Everything short of aggregation; raises RejectedUpdate with a reason code."""
    key_client, key_update = protocol.parse_inbox_key(key)
    opened = sealing.open_update(
        blob,
        inputs.fleet,
        inputs.server_keys,
        max_bytes=inputs.max_envelope_bytes,
        accepted_suites=inputs.accepted_suites,
    )
    header = opened.header
    if header.client_id != key_client or header.update_id != key_update:
        raise RejectedUpdate(
            "bad_signature",
            f"object key {key} does not match the signed header "
            f"({header.client_id}/{header.update_id})",
        )
    meta, delta_blob = protocol.decode_payload(opened.payload)
    base = inputs.base.metadata
    if header.base_version not in inputs.known_versions:
        raise RejectedUpdate(
            "unknown_base_version", f"base version {header.base_version} was never published"
        )
    if header.base_version in inputs.other_features:
        raise RejectedUpdate(
            "feature_mismatch",
            f"trained on version {header.base_version}, whose features are not those of "
            f"version {base.version} (a new template vocabulary): the device re-counts "
            "its windows with the new one and trains again",
        )
    staleness = base.version - header.base_version
    if meta.model_kind != base.model_kind or meta.num_params != base.num_params:
        raise RejectedUpdate(
            "shape_mismatch",
            f"update is {meta.model_kind}/{meta.num_params}, "
            f"model is {base.model_kind}/{base.num_params}",
        )
    delta = compression.decode(delta_blob, expected_dim=base.num_params)  # finite values
    weight = staleness_weight(meta.num_samples, staleness, inputs.aggregation)
    return AcceptedUpdate(header=header, meta=meta, delta=delta, weight=weight, staleness=staleness)


def summed_delta(
    update: AcceptedUpdate, inputs: RoundInputs
) -> tuple[compression.DecodedDelta, float]:
    """What enters the sum for an accepted update, and with which weight: central DP's
    projection (weight 1), FLTrust's cap and trust factor. One function, used by the
    shards and by the reduce step's reweighting, so both see the same delta."""
    delta, weight = update.delta, update.weight
    if inputs.aggregation.dp_mode != "off":  # a plain sum of bounded deltas
        delta, weight = dp_project(delta, inputs.aggregation), 1.0
    if inputs.aggregation.robust == "fltrust":
        if inputs.reference is None:
            raise ValueError("fltrust aggregation needs RoundInputs.reference")
        delta, trust = robust.trusted(delta, inputs.reference)
        weight *= trust
        if weight < MIN_WEIGHT:
            raise RejectedUpdate("distrusted", f"trust {trust:.2g} leaves no weight")
    return delta, weight


def aggregate_objects(
    objects: Iterable[tuple[str, bytes]],
    inputs: RoundInputs,
    *,
    seen_update_ids: set[tuple[str, str]] | None = None,
    received_ms: Mapping[str, int] | None = None,
    on_verdict: Callable[[Verdict], object] | None = None,
) -> tuple[Aggregator, list[Verdict]]:
    """Open, validate and add a stream of (key, blob); one verdict per object, never raises.

    One device, one vote: of a device's valid updates in the stream only the one the
    store received last (``received_ms``, from the listing; stream order breaks ties)
    is added; the others get ``superseded`` naming the kept one. A device's keys are
    contiguous in a shard (the plan groups them), so only one decoded update per device
    waits at a time; a device that shows up again later in the stream gets no second vote.
    ``seen_update_ids`` holds (client id, update id) pairs already processed (replays);
    it is updated in place. ``on_verdict`` sees each verdict as soon as it is final.
    """
    seen = seen_update_ids if seen_update_ids is not None else set()
    arrivals = received_ms or {}
    agg = new_aggregator(inputs.base.metadata.num_params, inputs.aggregation)
    verdicts: list[Verdict] = []
    voted: dict[str, str] = {}  # client id -> the key of its vote in this stream
    group: _DeviceVotes | None = None

    def emit(verdict: Verdict) -> None:
        verdicts.append(verdict)
        if on_verdict is not None:
            on_verdict(verdict)

    def close(votes: _DeviceVotes | None) -> None:
        if votes is None or votes.kept is None:
            return
        kept = votes.kept
        units = agg.add(kept.delta, kept.weight)  # admitted already: cannot refuse now
        voted[votes.client_id] = kept.key
        update = kept.update
        emit(
            Verdict(
                **kept.common,
                accepted=True,
                client_id=update.header.client_id,
                update_id=update.header.update_id,
                base_version=update.header.base_version,
                num_samples=update.meta.num_samples,
                weight_units=units,
                norm=update.delta.l2_norm(),
                unclipped=_unclipped_bit(update.meta, inputs.aggregation),
            )
        )
        for common in votes.superseded:
            emit(_superseded(common, votes.client_id, kept.key))

    with single_threaded_blas():  # a norm per update: one BLAS call each
        for position, (key, blob) in enumerate(objects):
            digest = hashlib.sha256(blob).hexdigest()
            common: dict[str, Any] = {"key": key, "sha256": digest, "size": len(blob)}
            try:
                key_client, _ = protocol.parse_inbox_key(key)
            except RejectedUpdate as exc:
                emit(Verdict(**common, accepted=False, reason=exc.reason, detail=exc.detail))
                continue
            if group is None or group.client_id != key_client:
                close(group)
                group = _DeviceVotes(key_client)
            try:
                update = open_and_validate(key, blob, inputs)
                pair = (update.header.client_id, update.header.update_id)
                if pair in seen:
                    raise RejectedUpdate("replay", f"update {pair[1]} was already processed")
                delta, weight = summed_delta(update, inputs)
                admit(delta, weight, inputs.base.metadata.num_params, inputs.aggregation)
            except RejectedUpdate as exc:
                emit(Verdict(**common, accepted=False, reason=exc.reason, detail=exc.detail))
                continue
            seen.add(pair)
            if key_client in voted:  # the device's group already closed in this stream
                emit(_superseded(common, key_client, voted[key_client]))
                continue
            candidate = _Vote(key, (arrivals.get(key, -1), position), common, update, delta, weight)
            group.offer(candidate)
        close(group)
    return agg, verdicts


@dataclass
class _Vote:
    """A device's valid update waiting to be its vote: one decoded delta per device."""

    key: str
    order: tuple[int, int]  # (server receipt time, stream position): the larger is newer
    common: dict[str, Any]
    update: AcceptedUpdate
    delta: compression.DecodedDelta
    weight: float


@dataclass
class _DeviceVotes:
    """One device's valid updates in a shard: the newest kept, the others superseded."""

    client_id: str
    kept: _Vote | None = None
    superseded: list[dict[str, Any]] = field(default_factory=list)

    def offer(self, vote: _Vote) -> None:
        if self.kept is None or vote.order > self.kept.order:
            if self.kept is not None:
                self.superseded.append(self.kept.common)
            self.kept = vote
        else:
            self.superseded.append(vote.common)


def _superseded(common: dict[str, Any], client_id: str, kept_key: str) -> Verdict:
    return Verdict(
        **common,
        accepted=False,
        reason="superseded",
        detail=f"one vote per device per round: {client_id}'s newest valid update {kept_key} "
        "was kept",
    )


def _unclipped_bit(meta: protocol.UpdateMeta, config: AggregationConfig) -> bool | None:
    """The adaptive-clipping bit a device reported (central DP only; absent = None)."""
    if config.dp_mode != "central" or protocol.UNCLIPPED_METRIC not in meta.metrics:
        return None
    return meta.metrics[protocol.UNCLIPPED_METRIC] >= 0.5


@dataclass(frozen=True)
class DpRound:
    """Differential privacy of one round's candidate (:func:`fedlib.server.privacy.release_round`):
    the config, the round's clip norm C, the (unclipped, reported) bit counts, the
    round's noise generator and the cumulative spend after it (``PrivacySpent`` fields)."""

    config: privacy.PrivacyConfig
    clip_norm: float
    unclipped: tuple[int, int]
    rng: np.random.Generator
    spent: dict[str, object]


def unclipped_counts(verdicts: Iterable[Verdict]) -> tuple[int, int]:
    """(bits that are 1, bits reported) over accepted verdicts: the clipped-count query."""
    ones = reported = 0
    for verdict in verdicts:
        if verdict.accepted and verdict.unclipped is not None:
            reported += 1
            ones += bool(verdict.unclipped)
    return ones, reported


def model_from_package(package: ModelPackage) -> AnomalyModel:
    meta = package.metadata
    return load_model(
        meta.model_kind,
        FeatureSchema.from_dict(meta.feature_schema),
        meta.model_spec,
        package.weights,
        meta.threshold,
    )


def build_candidate(
    base: ModelPackage,
    agg: Aggregator,
    *,
    version: int,
    calibration_rows: np.ndarray,
    threshold_quantile: float = 0.99,
    round_id: str | None = None,
    training: TrainingConfig | None = None,
    created_at_ms: int | None = None,
    momentum: np.ndarray | None = None,
    dp: DpRound | None = None,
) -> tuple[ModelPackage, np.ndarray | None]:
    """Apply the aggregate to the base model, calibrate its threshold, export ONNX.

    Returns the candidate and the server optimizer's new momentum buffer (or None).
    With ``dp``, the DP noise is added here, once, to the exact aggregate of every
    shard (never per shard), the candidate tells devices the next clip norm and its
    metadata records the cumulative (epsilon, delta).
    """
    model = model_from_package(base)
    training = training or base.metadata.training
    spent = None
    config = getattr(agg, "config", None)
    if dp is None and model.sufficient_statistics and isinstance(config, AggregationConfig):
        params = stepwise_statistics(model, base.weights, agg.mean_delta(), config.server_lr)
        new_momentum = None
    elif dp is None:
        params, new_momentum = agg.step(base.weights, momentum)
    else:
        release = privacy.release_round(
            dp.config, agg.mean_delta(), agg.count, dp.clip_norm, dp.unclipped, dp.rng
        )
        if not isinstance(config, AggregationConfig):
            raise ValueError("differential privacy needs the streaming (plain sum) aggregator")
        params, new_momentum = server_step(release.noisy_mean, base.weights, momentum, config)
        training = training.model_copy(update={"clip_norm": release.next_clip_norm})
        spent = protocol.PrivacySpent.model_validate(dp.spent)
    model.set_params(params)
    model.calibrate_threshold(calibration_rows, quantile=threshold_quantile)
    candidate = package_model(
        model,
        version=version,
        training=training,
        parent_version=base.version,
        round_id=round_id,
        created_at_ms=created_at_ms,
        privacy=spent,
    )
    return candidate, new_momentum


def stepwise_statistics(
    model: AnomalyModel, base_params: np.ndarray, mean_delta: np.ndarray, step: float
) -> np.ndarray:
    """Sufficient-statistics kinds: the round's pooled statistics (``base_params``, the
    installed ones, plus the mean delta) when ``step`` is 1, else a ``step`` of the way to them from
    :meth:`~fedlib.models.model.AnomalyModel.statistics_reference`.

    ``step`` < 1 is stepwise EM (Cappe & Moulines 2009; Liang & Klein 2009): when a
    round hears from part of the fleet only, its pooled E-step describes those devices'
    rows, and taking it whole (step 1) would refit the mixture to them and forget the
    rest; a step near the round's share of the fleet keeps an exponentially weighted
    memory of earlier rounds' statistics instead, in O(params) server state."""
    pooled = np.asarray(base_params, dtype=np.float64) + mean_delta
    if step == 1.0:
        return pooled
    reference = model.statistics_reference()
    return reference + step * (pooled - reference)


def package_model(
    model: AnomalyModel,
    *,
    version: int,
    training: TrainingConfig,
    parent_version: int | None = None,
    rollback_of: int | None = None,
    round_id: str | None = None,
    metrics: dict[str, float] | None = None,
    created_at_ms: int | None = None,
    privacy: protocol.PrivacySpent | None = None,
) -> ModelPackage:
    weights = model.params()
    metadata = PackageMetadata(
        version=version,
        model_kind=model.kind,
        model_spec=model.spec,
        feature_schema=model.schema.to_dict(),
        threshold=model.threshold,
        num_params=int(weights.size),
        training=training,
        metrics=metrics or {},
        parent_version=parent_version,
        rollback_of=rollback_of,
        round_id=round_id,
        created_at_ms=created_at_ms if created_at_ms is not None else int(time.time() * 1000),
        privacy=privacy,
    )
    return ModelPackage(metadata=metadata, onnx_bytes=model.to_onnx(), weights=weights)

"""``fl-admin templates learn``: mine the fleet's template vocabulary from sample logs.

Drain (He et al., ICWS 2017; the ``drain3`` implementation) clusters masked messages
into templates. The operator runs it over logs they already have (never the devices'),
reviews the file it writes, and publishes it with a model. Messages are masked with
:func:`fedlib.models.logfeatures.mask` before Drain sees them, so the patterns hold the
same typed tokens a device's masked lines do; Drain's own wildcard is ``<*>``.

A new vocabulary learned against a previous one keeps the previous ids for the
patterns that survive (a vocabulary change is a model change: surviving columns keep
their meaning), and numbers new patterns after its largest id.
"""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path

import numpy as np

from fedlib.models.evaluation import evaluate_onnx
from fedlib.models.logfeatures import (
    MASK_NAMES,
    Entry,
    JournalExportParser,
    TemplateMatcher,
    line_parser,
    mask,
    masked_windows,
    parse_iso_time,
    window_features,
)
from fedlib.models.model import FeatureSchema, carried_schema
from fedlib.models.package import ModelPackage
from fedlib.server.deployment import Deployment, Holdout
from fedlib.server.rounds import model_from_package, package_model
from fedlib.wire.vocabulary import WILDCARD, Template, TemplateVocabulary

FORMATS = ("syslog", "journald", "jsonl", "regex")


def read_sample(
    path: Path, log_format: str, *, regex: str | None = None, zone: tzinfo = UTC
) -> Iterator[Entry]:
    """The entries of one sample file (``.gz`` read as gzip); lines that are not an
    entry of the format (continuations, garbage) are left out. Stamps without a year or
    zone are read as a device reads them: in ``zone``, in the year the file was last
    written (a year earlier for a stamp more than a day after that)."""
    mtime = path.stat().st_mtime
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        if log_format == "journald":
            parser = JournalExportParser()
            while chunk := fh.read(1 << 20):
                yield from (e for e in parser.feed(chunk) if e is not None)
            yield from (e for e in parser.feed(b"\n\n") if e is not None)
            return
        parse = line_parser(log_format, mtime=mtime, zone=zone, regex=regex)
        for raw in fh:
            entry = parse(raw.decode("utf-8", "replace").rstrip("\r\n"))
            if entry is not None:
                yield entry


#: A wildcard position of a mined template with at most this many distinct values in
#: the sample is a category (``up``/``down``, ``GET``/``POST``, ``<2xx>``/``<5xx>``),
#: not a parameter: each frequent value gets a template of its own.
MAX_CATEGORY_VALUES = 6


def learn(
    messages: Iterable[str],
    *,
    version: int,
    previous: TemplateVocabulary | None = None,
    similarity: float = 0.4,
    depth: int = 4,
    min_count: int = 1,
    max_templates: int = 1024,
) -> TemplateVocabulary:
    """The vocabulary mined from ``messages`` (masked here): the ``max_templates`` most
    frequent templates seen at least ``min_count`` times.

    Drain clusters messages by similarity, so with its default threshold two messages
    that differ in one short token become one template with ``<*>`` there, even when
    that token is what matters (``... link up`` / ``... link down``, an HTTP status
    class). A second pass over the sample splits such positions: where a template's
    wildcard took at most :data:`MAX_CATEGORY_VALUES` distinct values, each combination
    of values seen ``min_count`` times becomes a template of its own (the wildcard
    template stays for values never seen; devices try literals first)."""
    from drain3.drain import Drain  # the operator's tool only: not loaded by rounds

    drain = Drain(depth=depth, sim_th=similarity, max_children=100, param_str=WILDCARD)
    seen: Counter[str] = Counter()
    for message in messages:
        masked = mask(message)
        if masked:
            drain.add_log_message(masked)
            seen[masked] += 1
    mined = {" ".join(c.log_template_tokens): c.size for c in drain.clusters}
    counts = _split_categories(mined, seen)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = {p: n for p, n in ranked if n >= min_count}
    kept = dict(list(kept.items())[:max_templates])
    if not kept:
        raise ValueError("no templates: the sample holds no log entries")
    old_ids = {t.pattern: t.id for t in previous.templates} if previous else {}
    next_id = max(old_ids.values(), default=0) + 1
    templates = []
    for pattern, count in kept.items():
        template_id = old_ids.get(pattern)
        if template_id is None:
            template_id, next_id = next_id, next_id + 1
        templates.append(Template(id=template_id, pattern=pattern, count=count))
    return TemplateVocabulary(
        version=version, masks=list(MASK_NAMES), templates=sorted(templates, key=lambda t: t.id)
    )


def _split_categories(mined: dict[str, int], seen: Counter[str]) -> dict[str, int]:
    """Template -> sample lines it covers, the mined templates' categorical wildcard
    positions split into one template per value combination (see :func:`learn`)."""
    vocabulary = TemplateVocabulary(
        version=1,
        masks=list(MASK_NAMES),
        templates=[Template(id=i + 1, pattern=p) for i, p in enumerate(sorted(mined))],
    )
    matcher = TemplateMatcher(vocabulary)
    patterns = {t.id: t.tokens for t in vocabulary.templates}
    combos: dict[int, Counter[tuple[str, ...]]] = {}
    values: dict[int, list[set[str] | None]] = {}
    for message, count in seen.items():
        template = matcher.match(message)
        if template is None:
            continue
        tokens = message.split()
        wild = [i for i, t in enumerate(patterns[template]) if t == WILDCARD]
        if not wild:
            continue
        slots = values.setdefault(template, [set() for _ in wild])
        for k, i in enumerate(wild):
            slot = slots[k]
            if slot is not None:
                slot.add(tokens[i])
                if len(slot) > MAX_CATEGORY_VALUES:
                    slots[k] = None  # a parameter
        combos.setdefault(template, Counter())[tuple(tokens[i] for i in wild)] += count
    out: dict[str, int] = {}
    for template, shape in patterns.items():
        pattern = " ".join(shape)
        found = values.get(template)
        if not found or all(slot is None for slot in found):
            out[pattern] = mined[pattern]
            continue
        wild = [i for i, t in enumerate(shape) if t == WILDCARD]
        split: Counter[tuple[str, ...]] = Counter()
        for combo, count in combos[template].items():
            key = tuple(v if found[k] is not None else WILDCARD for k, v in enumerate(combo))
            split[key] += count
        out[pattern] = mined[pattern]  # the general one, for values not in the sample
        for key, count in split.items():
            filled = list(shape)
            for k, i in enumerate(wild):
                filled[i] = key[k]
            specific = " ".join(filled)
            if specific != pattern:
                out[specific] = out.get(specific, 0) + count
    return out


def read_periods(path: Path, zone: tzinfo = UTC) -> list[tuple[float, float, str]]:
    """Anomalous periods from a CSV ``start,end[,class]`` (ISO 8601, in ``zone`` without
    an offset, or epoch seconds; a header row is skipped)."""
    periods = []
    with path.open(newline="") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            if not row or row[0].strip().lower() == "start":
                continue
            start, end = (_time(v, path, number, zone) for v in row[:2])
            if end <= start:
                raise ValueError(f"{path}:{number}: the period ends before it starts")
            periods.append((start, end, row[2].strip() if len(row) > 2 else ""))
    return periods


def _time(value: str, path: Path, number: int, zone: tzinfo) -> float:
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    when = parse_iso_time(text, zone)
    if when is None:
        raise ValueError(f"{path}:{number}: {text!r} is not an ISO 8601 time")
    return when


def count_holdout(
    paths: list[Path],
    vocabulary: TemplateVocabulary,
    *,
    log_format: str,
    regex: str | None,
    window_seconds: int,
    anomalous: list[tuple[float, float, str]],
    zone: tzinfo = UTC,
) -> Holdout:
    """Labeled windows for the server's holdout, counted as devices count them
    (:func:`fedlib.models.logfeatures.window_features`), each file on its own (one
    host's log: windows of two hosts are never added together). A window that overlaps
    an anomalous period is anomalous (its class: the period's)."""
    matcher = TemplateMatcher(vocabulary)
    rows, labels, classes = [], [], []
    for path in paths:
        windows = masked_windows(
            read_sample(path, log_format, regex=regex, zone=zone), window_seconds=window_seconds
        )
        for start in sorted(windows):
            lines, messages = windows[start]
            rows.append(
                window_features(
                    messages, lines=lines, window_seconds=window_seconds, matcher=matcher
                )
            )
            hit = [c for a, b, c in anomalous if a < start + window_seconds and b > start]
            labels.append(1 if hit else 0)
            classes.append(hit[0] if hit else "")
    if not rows:
        raise ValueError("no log entries with a time in these files")
    return Holdout(
        features=np.asarray(rows, dtype=np.float64),
        labels=np.asarray(labels, dtype=np.int64),
        feature_names=vocabulary.feature_names(),
        classes=np.asarray(classes, dtype=str) if any(classes) else None,
    )


@dataclass(frozen=True)
class VocabularyChange:
    """What ``fl-admin templates publish`` did: the version it published (None when the
    vocabulary was active already), the holdout version rounds now evaluate on, and how
    many of the new feature columns carried their parameters over."""

    package: ModelPackage | None
    previous_version: int
    holdout_version: int
    carried: int
    new: int
    dropped: int

    def summary(self) -> str:
        if self.package is None:
            return (
                f"this vocabulary is already active (v{self.previous_version}); holdout "
                f"version {self.holdout_version} is current"
            )
        meta = self.package.metadata
        vocabulary = FeatureSchema.from_dict(meta.feature_schema).vocabulary
        return (
            f"published version {meta.version} (vocabulary "
            f"{vocabulary.version if vocabulary else '?'}, from v{self.previous_version}): "
            f"{self.carried} feature columns carried their parameters, {self.new} new, "
            f"{self.dropped} dropped; AUC {meta.metrics['auc']:.3f} on holdout version "
            f"{self.holdout_version}'s evaluation rows. Devices re-count their retained "
            "windows with it at their next run; updates trained on older versions are "
            "refused (feature_mismatch)"
        )


def _same_rows(a: Holdout, b: Holdout) -> bool:
    if a.classes is None or b.classes is None:
        classes = a.classes is None and b.classes is None
    else:
        classes = np.array_equal(a.classes, b.classes)
    return (
        a.feature_names == b.feature_names
        and np.array_equal(a.features, b.features)
        and np.array_equal(a.labels, b.labels)
        and classes
    )


def publish_vocabulary(
    deployment: Deployment, vocabulary: TemplateVocabulary, holdout: Holdout
) -> VocabularyChange:
    """A new template vocabulary as the next model version (a vocabulary change is a
    model change): the active model on the new columns (:meth:`AnomalyModel.remapped`;
    the columns that count what they counted before keep their parameters), its
    threshold calibrated and its figures measured on ``holdout``, counted with this
    vocabulary, which becomes the holdout rounds evaluate on.

    The holdout is stored first, so a crash leaves a state a rerun completes: the rerun
    stores nothing twice and publishes the version (or finds it active)."""
    if holdout.feature_names != vocabulary.feature_names():
        raise ValueError(
            f"the holdout's features are not those of vocabulary {vocabulary.version}: "
            "count it with `fl-admin templates holdout` and this vocabulary"
        )
    registry = deployment.registry(signing=True)
    active = registry.read_active()
    old = FeatureSchema.from_dict(active.metadata.feature_schema)
    already = old.vocabulary is not None and old.vocabulary.digest() == vocabulary.digest()
    if not already and old.vocabulary is not None and vocabulary.version <= old.vocabulary.version:
        raise ValueError(  # before anything is stored
            f"vocabulary {vocabulary.version} is not newer than the active model's "
            f"{old.vocabulary.version} (`fl-admin templates learn --previous` numbers it)"
        )
    if deployment.holdout_version() is None or not _same_rows(deployment.load_holdout(), holdout):
        deployment.save_holdout(holdout)
    parts = deployment.holdout_parts()
    if already:
        return VocabularyChange(None, active.version, parts.evaluation.version or 0, 0, 0, 0)
    settings = deployment.settings
    benign = parts.calibration.benign()
    schema, source = carried_schema(old, vocabulary, benign)
    model = model_from_package(active).remapped(schema, source)
    model.calibrate_threshold(benign, quantile=settings.threshold_quantile)
    version = registry.next_version()

    def package(metrics: dict[str, float] | None) -> ModelPackage:
        return package_model(
            model,
            version=version,
            training=active.metadata.training,
            parent_version=active.version,
            metrics=metrics,
            privacy=active.metadata.privacy,  # the same lineage of parameters
        )

    ev = parts.evaluation
    metrics = evaluate_onnx(package(None).onnx_bytes, ev.features, ev.labels, interval=True)
    published = package(metrics.as_dict())
    registry.publish(published)
    carried = sum(j is not None for j in source)
    return VocabularyChange(
        published,
        active.version,
        ev.version or 0,
        carried=carried,
        new=schema.dim - carried,
        dropped=old.dim - carried,
    )

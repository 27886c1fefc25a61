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
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from fedlib.models.logfeatures import (
    MASK_NAMES,
    Entry,
    JournalExportParser,
    RegexFormat,
    TemplateMatcher,
    mask,
    masked_windows,
    parse_iso_time,
    parse_json_line,
    parse_syslog,
    window_features,
)
from fedlib.server.deployment import Holdout
from fedlib.wire.vocabulary import WILDCARD, Template, TemplateVocabulary

FORMATS = ("syslog", "journald", "jsonl", "regex")


def read_sample(
    path: Path, log_format: str, *, regex: str | None = None, year: int = 2026
) -> Iterator[Entry]:
    """The entries of one sample file (``.gz`` read as gzip); lines that are not an
    entry of the format (continuations, garbage) are left out."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        if log_format == "journald":
            parser = JournalExportParser()
            while chunk := fh.read(1 << 20):
                yield from (e for e in parser.feed(chunk) if e is not None)
            yield from (e for e in parser.feed(b"\n\n") if e is not None)
            return
        pattern = RegexFormat(regex) if log_format == "regex" and regex else None
        if log_format == "regex" and pattern is None:
            raise ValueError("--format regex needs --regex")
        for raw in fh:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if log_format == "syslog":
                entry = parse_syslog(line, year=year)
            elif log_format == "jsonl":
                entry = parse_json_line(line)
            elif pattern is not None:
                entry = pattern.parse(line)
            else:
                raise ValueError(f"unknown log format {log_format!r}; expected {FORMATS}")
            if entry is not None:
                yield entry


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
    """The vocabulary Drain mines from ``messages`` (masked here): the ``max_templates``
    most frequent templates seen at least ``min_count`` times."""
    from drain3.drain import Drain  # the operator's tool only: not loaded by rounds

    drain = Drain(depth=depth, sim_th=similarity, max_children=100, param_str=WILDCARD)
    for message in messages:
        masked = mask(message)
        if masked:
            drain.add_log_message(masked)
    clusters = sorted(drain.clusters, key=lambda c: (-c.size, c.get_template()))
    kept: dict[str, int] = {}
    for cluster in clusters:
        pattern = " ".join(cluster.log_template_tokens)
        if cluster.size >= min_count and pattern not in kept and len(kept) < max_templates:
            kept[pattern] = cluster.size
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


def read_periods(path: Path) -> list[tuple[float, float, str]]:
    """Anomalous periods from a CSV ``start,end[,class]`` (ISO 8601 or epoch seconds; a
    header row is skipped)."""
    periods = []
    with path.open(newline="") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            if not row or row[0].strip().lower() == "start":
                continue
            start, end = (_time(v, path, number) for v in row[:2])
            if end <= start:
                raise ValueError(f"{path}:{number}: the period ends before it starts")
            periods.append((start, end, row[2].strip() if len(row) > 2 else ""))
    return periods


def _time(value: str, path: Path, number: int) -> float:
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    when = parse_iso_time(text)
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
) -> Holdout:
    """Labeled windows for the server's holdout, counted as devices count them
    (:func:`fedlib.models.logfeatures.window_features`), each file on its own (one
    host's log: windows of two hosts are never added together). A window that overlaps
    an anomalous period is anomalous (its class: the period's)."""
    matcher = TemplateMatcher(vocabulary)
    rows, labels, classes = [], [], []
    for path in paths:
        windows = masked_windows(
            read_sample(path, log_format, regex=regex), window_seconds=window_seconds
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

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

import gzip
from collections.abc import Iterable, Iterator
from pathlib import Path

from drain3.drain import Drain

from fedlib.models.logfeatures import (
    MASK_NAMES,
    Entry,
    JournalExportParser,
    RegexFormat,
    mask,
    parse_json_line,
    parse_syslog,
)
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

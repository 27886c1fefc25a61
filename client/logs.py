"""The device reads the logs it guards: incrementally, each line once, into time windows.

``client.json`` names log sources (a path or glob and a format). Every run reads what
was appended since the last one and keeps, per time window, how many times each
*masked* message occurred (:func:`fedlib.models.logfeatures.mask`: no IP, number, id,
path or user name survives masking). The features a model trains on are computed from
these windows with the installed package's vocabulary at the time they are needed, so a
new vocabulary re-counts every retained window and a device never mixes counts made
with two vocabularies. Raw lines are never stored; nothing here leaves the device.

Files are known by a fingerprint of their first line (as Filebeat and Fluent Bit do),
not by name or inode: when ``syslog`` is rotated to ``syslog.1`` and later compressed to
``syslog.2.gz``, the reader recognises the file it was reading and goes on from its
offset (in the uncompressed bytes), so rotation, compression and renames neither skip
nor repeat a line. A file shorter than the offset it was read to was truncated
(``copytruncate``): it is read again from the start. Only complete lines are counted
(the last line of a live file waits for its newline); a line over ``max_line_bytes``
is skipped, counted in ``skipped_long``. Undecodable bytes become U+FFFD. A line that
does not start an entry of the format (a stack trace's continuation, garbage) is
counted in ``continuation`` and belongs to the entry before it.

The cursors and the windows are one state file written atomically after each read, so
a run killed mid-read counts nothing of what it read, and the next run reads it again.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, BinaryIO, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlib.files import atomic_write
from fedlib.models.logfeatures import (
    MAX_MASKED_CHARS,
    Entry,
    JournalExportParser,
    RegexFormat,
    TemplateMatcher,
    line_parser,
    log_zone,
    mask,
    window_features,
    window_start,
)

log = logging.getLogger(__name__)

LOG_STATE_SCHEMA: Final = "dadm.device-log-state.v1"
FINGERPRINT_BYTES = 1024


class LogSource(BaseModel):
    """One log source of ``client.json``: files (a glob) in one format."""

    model_config = ConfigDict(extra="forbid")

    path: str  # a path or glob; relative to client.json's folder
    format: Literal["syslog", "journald", "jsonl", "regex"] = "syslog"
    regex: str | None = None  # format "regex": named groups "message" and (optional) "time"
    time_format: str | None = None  # strptime format of the regex's "time" (else ISO 8601)
    #: The IANA zone (``Europe/Berlin``) of stamps that carry no offset (RFC 3164 syslog,
    #: ISO 8601 or ``time_format`` without one); None: UTC.
    timezone: str | None = None

    @model_validator(mode="after")
    def _regex_given(self) -> LogSource:
        self.zone()  # a zone this machine knows
        if self.format == "regex":
            if not self.regex:
                raise ValueError('format "regex" needs "regex"')
            RegexFormat(self.regex, self.time_format)  # compiles, has "message"
        return self

    def zone(self) -> tzinfo:
        return log_zone(self.timezone)


class LogSettings(BaseModel):
    """How log sources become windows."""

    model_config = ConfigDict(extra="forbid")

    window_seconds: Annotated[int, Field(ge=10, le=86_400)] = 300
    retention_days: Annotated[float, Field(gt=0, le=366)] = 7.0
    max_line_bytes: Annotated[int, Field(ge=256, le=16 * 1024 * 1024)] = 64 * 1024
    #: Distinct masked messages kept per window; further ones count as unknown.
    max_messages_per_window: Annotated[int, Field(ge=16, le=1_000_000)] = 4096


class FileCursor(BaseModel):
    """Where reading stopped in one file (by fingerprint of its first line)."""

    model_config = ConfigDict(extra="forbid")

    path: str  # where it was last seen (information only)
    offset: int  # bytes of the uncompressed content consumed (complete lines only)
    last_time: float | None = None  # time of the last entry (for entries without one)
    size: int = 0  # compressed files: the size at which it was read to its end
    done: bool = False  # a compressed file read to its end: never grows again
    #: When a listing of the sources last named the file (epoch seconds): a cursor no
    #: listing names for ``retention_days`` is dropped (rotated away for good).
    seen_at: float | None = None


class Window(BaseModel):
    """One time window: each masked message's count, lines over the cap, all lines."""

    model_config = ConfigDict(extra="forbid")

    start: float
    lines: int = 0
    overflow: int = 0  # lines whose masked message was not kept (cap): unknown
    messages: dict[str, int] = Field(default_factory=dict)


class LogStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: int = 0
    continuation: int = 0
    skipped_long: int = 0
    skipped_no_time: int = 0
    skipped_invalid: int = 0
    truncated_files: int = 0


class LogState(BaseModel):
    """The device's log state: one document, written atomically."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["dadm.device-log-state.v1"] = Field(default=LOG_STATE_SCHEMA, alias="schema")
    window_seconds: int
    cursors: dict[str, FileCursor] = Field(default_factory=dict)
    windows: dict[str, Window] = Field(default_factory=dict)  # key: str(int(start))
    stats: LogStats = Field(default_factory=LogStats)

    @classmethod
    def load(cls, path: Path, window_seconds: int) -> LogState:
        if not path.exists():
            return cls(window_seconds=window_seconds)
        state = cls.model_validate_json(path.read_bytes())
        if state.window_seconds != window_seconds:  # windows of another length: recount
            log.warning("window length changed: log windows are counted again")
            return cls(window_seconds=window_seconds)
        return state

    def save(self, path: Path) -> None:
        atomic_write(path, self.model_dump_json(by_alias=True).encode())

    def ordered_windows(self) -> list[Window]:
        return sorted(self.windows.values(), key=lambda w: w.start)


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / "logs" / "windows.json"


def source_files(source: LogSource, base: Path) -> list[Path]:
    """The files a source names now, in name order (directories and unreadable left out)."""
    pattern = source.path if os.path.isabs(source.path) else str(base / source.path)
    return sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())


def fingerprint(path: Path) -> str | None:
    """SHA-256 of the first line (at most :data:`FINGERPRINT_BYTES` bytes, uncompressed);
    None while the file holds no complete line of that length yet."""
    try:
        with _open(path) as fh:
            head = fh.readline(FINGERPRINT_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        log.warning("%s: cannot read (%s)", path, exc)
        return None
    if not head.endswith(b"\n") and len(head) < FINGERPRINT_BYTES:
        return None
    return hashlib.sha256(head).hexdigest()


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


class LogReader:
    """Reads the configured sources into :class:`LogState` (see the module docstring)."""

    def __init__(
        self, sources: list[LogSource], settings: LogSettings, *, base: Path, state: LogState
    ) -> None:
        self.sources = sources
        self.settings = settings
        self.base = base
        self.state = state
        self._seen: set[str] = set()  # fingerprints of the files this read listed

    def read(self, *, now: float | None = None) -> int:
        """Read every source's new lines; the number of entries counted."""
        now = time.time() if now is None else now
        counted = 0
        self._seen.clear()
        for source in self.sources:
            for path in source_files(source, self.base):
                counted += self._read_file(source, path)
        self._expire(now)
        self._forget_files(now)
        return counted

    def _forget_files(self, now: float) -> None:
        """Drop the cursors of files no listing has named for ``retention_days`` (a
        rotated file deleted by logrotate): without this the state grows by a cursor per
        rotation forever. Whatever such a file could still hold is older than every
        window kept, so reading it again could count nothing that is kept."""
        cutoff = now - self.settings.retention_days * 86_400
        for key, cursor in list(self.state.cursors.items()):
            if key in self._seen or cursor.seen_at is None:  # None: a state from before
                cursor.seen_at = now
            elif cursor.seen_at < cutoff:
                del self.state.cursors[key]

    def _read_file(self, source: LogSource, path: Path) -> int:
        key = fingerprint(path)
        if key is None:
            return 0
        self._seen.add(key)
        compressed = path.suffix == ".gz"
        try:
            stat = path.stat()
        except OSError:  # gone since the listing: the next run looks again
            return 0
        size, mtime = stat.st_size, stat.st_mtime
        cursor = self.state.cursors.get(key)
        if cursor is not None and cursor.done and cursor.size == size:
            return 0
        if cursor is None:
            cursor = FileCursor(path=str(path), offset=0)
        elif not compressed and size < cursor.offset:  # copytruncate: read it again
            self.state.stats.truncated_files += 1
            cursor = FileCursor(path=str(path), offset=0)
        elif not compressed and size == cursor.offset:
            cursor.path = str(path)
            return 0
        tally = ReadTally(cursor.offset, cursor.last_time)
        try:
            with _open(path) as fh:
                if compressed:
                    _skip(fh, cursor.offset)
                else:
                    fh.seek(cursor.offset)
                if source.format == "journald":
                    self._count(self._journal(fh, tally, final=compressed), tally)
                else:
                    parse, invalid = self._line_format(source, mtime)
                    blocks = line_blocks(
                        fh, tally, limit=self.settings.max_line_bytes, final=compressed
                    )
                    for lines in blocks:
                        self._count_lines(lines, parse, invalid, tally)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            log.warning("%s: read stopped (%s); what was read before counts", path, exc)
        finally:  # what was counted and where it ends, together
            self._apply(tally, cursor)
        cursor.path = str(path)
        if compressed:
            cursor.done, cursor.size = True, size
        self.state.cursors[key] = cursor
        return tally.entries

    def _line_format(
        self, source: LogSource, mtime: float
    ) -> tuple[Callable[[str], Entry | None], bool]:
        """The source's line parser, and whether a line it refuses is invalid (JSON
        lines) rather than the continuation of the entry before it."""
        parse = line_parser(
            source.format,
            mtime=mtime,
            zone=source.zone(),
            regex=source.regex,
            time_format=source.time_format,
        )
        return parse, source.format == "jsonl"

    def _count_lines(
        self,
        lines: list[str],
        parse: Callable[[str], Entry | None],
        invalid: bool,
        tally: ReadTally,
    ) -> None:
        """Parse a block of lines and count its entries."""
        entries = []
        for line in lines:
            line = line.rstrip("\r")
            if not line or line.isspace():
                continue
            entry = parse(line)
            if entry is not None:
                entries.append(entry)
            elif invalid:
                tally.skipped_invalid += 1
            else:
                tally.continuation += 1
        self._count(entries, tally)

    def _journal(self, fh: BinaryIO, tally: ReadTally, *, final: bool) -> Iterator[Entry]:
        parser = JournalExportParser(max_field=self.settings.max_line_bytes)
        start = tally.offset
        while chunk := fh.read(1 << 20):
            for entry in parser.feed(chunk):
                tally.offset = start + parser.record_end
                if entry is None:
                    tally.skipped_invalid += 1
                else:
                    yield entry
        if final:
            for entry in parser.feed(b"\n\n"):
                if entry is not None:
                    yield entry
        tally.skipped_long += parser.skipped_fields

    def _count(self, entries: Iterable[Entry], tally: ReadTally) -> None:
        """Count each entry's masked message in its time window (an entry without a time
        belongs where the one before it does). A device's hot path (a busy host writes
        ten million lines a day): one loop, the current window kept at hand."""
        seconds = self.state.window_seconds
        cap = self.settings.max_messages_per_window
        windows, lines_in, overflow = tally.windows, tally.lines, tally.overflow
        start, messages = -1, {}
        for entry in entries:
            when = entry.time if entry.time is not None else tally.last_time
            if when is None:
                tally.skipped_no_time += 1
                continue
            tally.last_time = when
            this = window_start(when, seconds)
            if this != start:
                start = this
                window = windows.get(start)
                if window is None:
                    window = self._window(start, tally)
                messages = window.messages
            lines_in[start] += 1
            tally.entries += 1
            masked = mask(entry.message)[:MAX_MASKED_CHARS]
            if masked in messages:
                messages[masked] += 1
            elif len(messages) < cap:
                messages[masked] = 1
            else:
                overflow[start] += 1

    def _window(self, start: int, tally: ReadTally) -> Window:
        """The window starting at ``start``, made part of this read's tally."""
        window = self.state.windows.get(str(start))
        if window is None:
            window = self.state.windows[str(start)] = Window(start=start)
        tally.windows[start] = window
        tally.lines[start] = tally.overflow[start] = 0
        return window

    def _apply(self, tally: ReadTally, cursor: FileCursor) -> None:
        cursor.offset, cursor.last_time = tally.offset, tally.last_time
        for start, window in tally.windows.items():
            window.lines += tally.lines[start]
            window.overflow += tally.overflow[start]
        stats = self.state.stats
        stats.entries += tally.entries
        stats.continuation += tally.continuation
        stats.skipped_long += tally.skipped_long
        stats.skipped_invalid += tally.skipped_invalid
        stats.skipped_no_time += tally.skipped_no_time

    def _expire(self, now: float) -> None:
        cutoff = now - self.settings.retention_days * 86_400
        for key in [k for k, w in self.state.windows.items() if w.start < cutoff]:
            del self.state.windows[key]


#: Bytes a read takes from a file at a time (with at most one partial line carried).
#: Small enough that a compressed file cut short loses little: the lines of the read
#: that meets the cut are not counted (the read fails as a whole).
BLOCK_BYTES = 1 << 16


def line_blocks(
    fh: BinaryIO, tally: ReadTally, *, limit: int, final: bool, block: int = BLOCK_BYTES
) -> Iterator[list[str]]:
    """The complete lines from ``fh``'s position on, decoded (U+FFFD for undecodable
    bytes), without their newline, a block at a time; ``tally.offset`` advances over the
    bytes of each block before it is yielded. A line of ``limit`` bytes or more with its
    newline is skipped (``tally.skipped_long``); a last line without a newline waits for
    the next read unless the file is ``final`` (compressed: it never grows). A line too
    long to carry is dropped through its newline without being held in memory; if its
    newline is not written yet, the read stops before it (it is read again next run)."""
    pending = b""  # the start of a line whose newline is not read yet (at most limit)
    dropping = 0  # bytes of a too-long line dropped so far (0: not in one)
    while chunk := fh.read(block):
        if dropping:
            newline = chunk.find(b"\n")
            if newline < 0:
                dropping += len(chunk)
                continue
            tally.offset += dropping + newline + 1
            tally.skipped_long += 1
            dropping, chunk = 0, chunk[newline + 1 :]
        data = pending + chunk if pending else chunk
        end = data.rfind(b"\n") + 1
        body, pending = data[:end], data[end:]
        if body:
            tally.offset += len(body)
            parts = body.split(b"\n")
            parts.pop()  # after the last newline: nothing
            if max(map(len, parts)) < limit:  # the common case: decode the block at once
                yield body[:-1].decode("utf-8", "replace").split("\n")
            else:
                tally.skipped_long += sum(len(p) >= limit for p in parts)
                yield [p.decode("utf-8", "replace") for p in parts if len(p) < limit]
        if len(pending) > limit:
            dropping, pending = len(pending), b""
    if dropping:
        if final:
            tally.offset += dropping
            tally.skipped_long += 1
        return
    if pending and final:  # (never over the limit: see above)
        tally.offset += len(pending)
        yield [pending.decode("utf-8", "replace")]


def _skip(fh: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = fh.read(min(count, 1 << 20))
        if not chunk:
            return
        count -= len(chunk)


class ReadTally:
    """One file's read in progress, in plain attributes (a line costs no model
    validation); :meth:`LogReader._apply` moves it into the state in one step."""

    __slots__ = (
        "continuation",
        "entries",
        "last_time",
        "lines",
        "offset",
        "overflow",
        "skipped_invalid",
        "skipped_long",
        "skipped_no_time",
        "windows",
    )

    def __init__(self, offset: int, last_time: float | None) -> None:
        self.offset, self.last_time = offset, last_time
        self.entries = self.continuation = self.skipped_long = 0
        self.skipped_invalid = self.skipped_no_time = 0
        self.windows: dict[int, Window] = {}
        self.lines: dict[int, int] = {}
        self.overflow: dict[int, int] = {}


def ingest(
    sources: list[LogSource], settings: LogSettings, *, base: Path, state_dir: Path
) -> LogState:
    """Read the sources' new lines into the device's log state (saved atomically)."""
    path = state_path(state_dir)
    state = LogState.load(path, settings.window_seconds)
    LogReader(sources, settings, base=base, state=state).read()
    state.save(path)
    return state


def closed_windows(state: LogState, *, now: float) -> list[Window]:
    """The windows that ended by ``now``, oldest first (a window still filling waits)."""
    seconds = state.window_seconds
    return [w for w in state.ordered_windows() if w.start + seconds <= now]


def window_rows(
    windows: list[Window], matcher: TemplateMatcher, window_seconds: float
) -> np.ndarray:
    """Feature rows of ``windows`` under the matcher's vocabulary (one per window)."""
    width = len(matcher.vocabulary.feature_names())
    if not windows:
        return np.zeros((0, width), dtype=np.float64)
    return np.stack(
        [
            window_features(
                w.messages, lines=w.lines, window_seconds=window_seconds, matcher=matcher
            )
            for w in windows
        ]
    )

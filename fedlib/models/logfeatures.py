"""From log entries to the model's features: masking, template matching, window counts.

The operator's miner (``fl-admin templates learn``) and every device use these same
functions, so a line maps to the same feature everywhere:

1. a *format* splits an entry into its time and its message (:func:`parse_syslog`,
   :func:`parse_json_line`, :class:`RegexFormat`; journald's export format is parsed
   by :class:`JournalExportParser`, entries not lines);
2. :func:`mask` replaces the variable parts of the message (UUIDs, MAC and IP
   addresses, paths, user names, hex ids, numbers) with typed tokens, in the order of
   :data:`MASKS`;
3. :class:`TemplateMatcher` finds the template of the masked message in the
   vocabulary (:mod:`fedlib.wire.vocabulary`), or none (``unknown``);
4. per time window, each masked message's count (:func:`masked_windows` here, the
   device's :mod:`client.logs` incrementally); :func:`window_features` turns a window
   into a row in the order of :meth:`TemplateVocabulary.feature_names`.

Nothing here reads files or keeps state across runs: that is the device's
(:mod:`client.logs`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import partial
from typing import Final, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from fedlib.wire.vocabulary import WILDCARD, WINDOW_STATS, TemplateVocabulary

_H = "[0-9a-fA-F]"
#: The masking rules, applied in this order to each whitespace-separated token (no rule
#: matches across a space): (name, regex, replacement).
MASKS: Final[tuple[tuple[str, str, str], ...]] = (
    ("uuid", rf"\b{_H}{{8}}-{_H}{{4}}-{_H}{{4}}-{_H}{{4}}-{_H}{{12}}\b", "<UUID>"),
    ("mac", rf"\b(?:{_H}{{2}}[:-]){{5}}{_H}{{2}}\b", "<MAC>"),
    (
        "ipv6",
        rf"(?<![\w:])(?:(?:{_H}{{1,4}}:){{7}}{_H}{{1,4}}"
        rf"|(?:{_H}{{1,4}}:)*{_H}{{0,4}}::(?:{_H}{{1,4}}:)*{_H}{{0,4}})(?![\w:])",
        "<IP>",
    ),
    ("ipv4", r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?![\d.])", "<IP>"),
    ("path", r"(?<![\w./<>])(?:/[\w.\-@%+~]+)+/?", "<PATH>"),
    ("hex", rf"\b0x{_H}+\b|\b(?={_H}*\d)(?={_H}*[a-fA-F]){_H}{{8,}}\b", "<HEX>"),
    # a number, with a short unit stuck to it (12.5ms, 10GB); not inside a word (ssh2)
    ("num", r"(?<![\w<.])[-+]?\d+(?:\.\d+)*(?:[a-zA-Z%]{1,3}\b)?(?![\w>])", "<NUM>"),
    # then, by position among the tokens (:func:`_mask_users`): the name after
    # "user"/"User", in "for NAME from", after sudo's tag, and in ruser=/logname=/user=/
    # USER=/acct= values
    ("user", r"[\w.\-@$]+", "<USER>"),
    # and an HTTP status right after the request's path or protocol keeps its class
    # (``GET /x 503`` -> ``GET <PATH> <5xx>``): which class it is means something, the
    # number within it less so, and a plain <NUM> would make errors look like successes
    ("http_status", r"[1-5][0-9][0-9]", "<Nxx>"),
)
MASK_NAMES: Final = [name for name, *_ in MASKS]
_POSITIONAL: Final = frozenset({"user", "http_status"})
_TOKEN_RULES: Final = [
    (re.compile(rx), token) for name, rx, token in MASKS if name not in _POSITIONAL
]
_STATUS: Final = re.compile(r"[1-5][0-9][0-9]")
_AFTER_REQUEST: Final = re.compile(r'^/|HTTP/\d(?:\.\d)?"?$')
_USER: Final = re.compile(r"[\w.\-@$]+")
_USER_KEYS: Final = ("ruser=", "logname=", "user=", "USER=", "acct=")
_FOR_NOT_A_NAME: Final = frozenset({"user", "invalid", "User"})
_MEMO_LIMIT: Final = 262_144
#: A masked message longer than this is cut here (it then matches no template: none is
#: that long), so one absurd line costs its window a bounded key.
MAX_MASKED_CHARS: Final = 2048
_token_memo: dict[str, str] = {}
#: A message's shape: ASCII digits but ``0`` made ``1`` (see :func:`mask`).
_DIGIT_SHAPE: Final = bytes.maketrans(b"0123456789", b"0111111111")
_ASCII_DIGIT: Final = re.compile(r"[0-9]")
_SHAPE_MEMO_LIMIT: Final = 65_536
_shape_memo: dict[bytes, tuple[str, tuple[tuple[int, str], ...]]] = {}


#: Whole tokens whose masking is known without the rules (the rules give the same:
#: ``tests/test_logs.py`` holds them to it): most tokens the memo has not seen are a
#: number or an address, each seen once.
_WHOLE_IPV4: Final = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?")


def _mask_token(token: str) -> str:
    if token.isascii():
        if token.isdigit():
            return "<NUM>"
        if _WHOLE_IPV4.fullmatch(token):
            return "<IP>"
    return _mask_token_by_rules(token)


def _mask_token_by_rules(token: str) -> str:
    for regex, replacement in _TOKEN_RULES:
        token = regex.sub(replacement, token)
    return token


def _masked_token(token: str) -> str:
    """A memo miss: mask ``token`` and remember it (the memo is bounded)."""
    if len(_token_memo) >= _MEMO_LIMIT:
        _token_memo.clear()
    masked = _token_memo[token] = _mask_token(token)
    return masked


def mask(message: str) -> str:
    """``message`` with its variable parts replaced by typed tokens (:data:`MASKS`),
    whitespace collapsed to single spaces.

    Lines of one kind differ mostly in their digits (ports, addresses, counters), so
    whole messages are memoised by their *shape*: every ASCII digit but ``0`` made a
    ``1``. The rules tell digits apart only through classes that hold all of them
    (``\\d``, ``[0-9]``, ``\\w``, hex), through the ``0`` of ``0x``, and through an
    HTTP status's first digit. So two messages of one shape match the rules at the same
    places, and their masked tokens are the same except a masked token that keeps digits
    (``ssh2``) or a token where a status could stand (``503`` or ``603``): the memo
    checks those against the message's own tokens. The memo is bounded;
    :func:`mask_by_tokens` is the same without it (``tests/test_logs.py`` holds them
    to each other)."""
    shape = message.encode("utf-8", "surrogatepass").translate(_DIGIT_SHAPE)
    known = _shape_memo.get(shape)
    if known is not None:
        if not known[1]:
            return known[0]
        tokens = message.split()
        for at, token in known[1]:
            if tokens[at] != token:
                break
        else:
            return known[0]
    tokens, out, status_places = _masked_tokens(message)
    masked = " ".join(out)
    if len(_shape_memo) >= _SHAPE_MEMO_LIMIT:
        _shape_memo.clear()
    checked: tuple[tuple[int, str], ...] = ()
    if status_places or _ASCII_DIGIT.search(masked):
        checked = tuple(
            (at, tokens[at])
            for at, token in enumerate(out)
            if at in status_places or _ASCII_DIGIT.search(token)
        )
    _shape_memo[shape] = (masked, checked)
    return masked


def mask_by_tokens(message: str) -> str:
    """:func:`mask` without its memo of message shapes (what the memo must agree with)."""
    return " ".join(_masked_tokens(message)[1])


def _masked_tokens(message: str) -> tuple[list[str], list[str], list[int]]:
    """The message's tokens, each one masked (the token memo, then the rules that look
    at a token's neighbours), and the places where an HTTP status could stand."""
    tokens = message.split()
    known = _token_memo.get
    # a masked token is never empty, so ``or`` falls through exactly on a miss
    out = [known(token) or _masked_token(token) for token in tokens]
    assignments = "=" in message
    if assignments or "ser" in message or "for" in message or message.startswith("sudo:"):
        _mask_users(tokens, out, assignments)  # (most lines can name no user: no walk)
    return tokens, out, _mask_status(tokens, out) if "/" in message else []


def _mask_status(tokens: list[str], out: list[str]) -> list[int]:
    """An HTTP status right after a request's path or protocol keeps its class; the
    places where one could stand (three characters there), status or not."""
    places = []
    for i in range(1, len(tokens)):
        token = tokens[i]
        if len(token) == 3 and _AFTER_REQUEST.search(tokens[i - 1]):
            places.append(i)
            if _STATUS.fullmatch(token):
                out[i] = f"<{token[0]}xx>"
    return places


def _mask_users(tokens: list[str], out: list[str], assignments: bool) -> None:
    """User names by position; each token takes the first rule that fits: after
    ``user``/``User``; between ``for`` and ``from`` (unless ``user``, ``invalid`` or
    ``User``); sudo's ``sudo: NAME :``; else a ``ruser=``/``logname=``/``user=``/
    ``USER=``/``acct=`` value. Each rule first finds its places with list scans (C),
    so a line pays a Python loop only for rules that can apply."""
    last = len(tokens) - 1
    placed: set[int] = set()
    if "user" in tokens or "User" in tokens:
        for i in range(1, last + 1):
            if tokens[i - 1] in ("user", "User"):
                out[i] = _USER.sub("<USER>", out[i], count=1)
                placed.add(i)
    if "for" in tokens and "from" in tokens:
        for i in range(1, last):
            if tokens[i - 1] == "for" and tokens[i + 1] == "from":
                if tokens[i] not in _FOR_NOT_A_NAME:
                    out[i] = _USER.sub("<USER>", out[i], count=1)
                placed.add(i)
    if last >= 2 and tokens[0] == "sudo:" and tokens[2] == ":":
        out[1] = "<USER>"
        placed.add(1)
    if assignments:
        for i, token in enumerate(tokens):
            if "=" in token and i not in placed:
                for key in _USER_KEYS:
                    if token.startswith(key) and len(token) > len(key):
                        out[i] = key + _USER.sub("<USER>", token[len(key) :], count=1)
                        break


# ---------------------------------------------------------------------------- matching


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    wildcard: _Node | None = None
    template: int | None = None


class TemplateMatcher:
    """A masked message's template id, or None. Literal tokens are tried before ``<*>``
    at each position (depth first), so of two templates that both match, the one with a
    literal where the other has ``<*>`` earliest wins: the same answer on every device.
    A bounded memo of recent messages makes repeated messages one dict lookup."""

    def __init__(self, vocabulary: TemplateVocabulary, *, memo_size: int = 65_536) -> None:
        if vocabulary.masks != MASK_NAMES:
            raise ValueError(
                f"vocabulary {vocabulary.version} was mined with masks {vocabulary.masks}; "
                f"this software masks {MASK_NAMES}"
            )
        self.vocabulary = vocabulary
        self._roots: dict[int, _Node] = {}
        for template in vocabulary.templates:
            node = self._roots.setdefault(len(template.tokens), _Node())
            for token in template.tokens:
                if token == WILDCARD:
                    node.wildcard = node.wildcard or _Node()
                    node = node.wildcard
                else:
                    node = node.literal.setdefault(token, _Node())
            if node.template is None:
                node.template = template.id
        self._memo: dict[str, int | None] = {}
        self._memo_size = memo_size
        #: Template ids in feature order (the columns before ``unknown``).
        self.template_ids = sorted(t.id for t in vocabulary.templates)

    def match(self, masked: str) -> int | None:
        try:
            return self._memo[masked]
        except KeyError:
            pass
        tokens = masked.split()
        root = self._roots.get(len(tokens))
        found = None if root is None else _search(root, tokens, 0)
        if len(self._memo) >= self._memo_size:
            self._memo.clear()
        self._memo[masked] = found
        return found


def _search(node: _Node, tokens: list[str], at: int) -> int | None:
    if at == len(tokens):
        return node.template
    child = node.literal.get(tokens[at])
    if child is not None:
        found = _search(child, tokens, at + 1)
        if found is not None:
            return found
    if node.wildcard is not None:
        return _search(node.wildcard, tokens, at + 1)
    return None


# ----------------------------------------------------------------------------- formats


class Entry(NamedTuple):
    """One log entry: when (epoch seconds, None if the entry carried no time we could
    read) and what (the message the templates are matched against). A named tuple: a
    device makes one per line, and a tuple is made several times faster than a frozen
    dataclass."""

    time: float | None
    message: str


_MONTHS: Final = {
    m: i + 1
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    )
}
#: RFC 3164 (``Dec  6 20:48:19 host app[pid]: msg``) and RFC 5424 / ISO 8601 stamps
#: (``2026-12-06T20:48:19.123+00:00 host app[pid]: msg``); the app tag is kept in the
#: message (``app: msg``), its pid is not.
_SYSLOG: Final = re.compile(
    r"(?:<\d{1,3}>\d? ?)?"
    r"(?:(?P<bsd>(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d))"
    r"|(?P<iso>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?))"
    r" (?P<host>\S+) (?P<app>[^\s:\[]{1,64})(?:\[\d+\])?:? ?(?P<msg>.*)",
    re.DOTALL,
)


def parse_iso_time(text: str, zone: tzinfo = UTC) -> float | None:
    """An ISO 8601 time as epoch seconds (no offset in it: in ``zone``); None if it is
    not one."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone)
    return when.timestamp()


_bsd_days: dict[tuple[str, int], float | None] = {}
#: Whole stamps already read, for one year and zone at a time (a busy host writes many
#: lines a second, so most stamps repeat): ``_bsd_stamps[0]`` is that year and zone.
_bsd_stamps: tuple[tuple[int, tzinfo], dict[str, float | None]] = ((0, UTC), {})


def _bsd_time(stamp: str, year: int, zone: tzinfo = UTC) -> float | None:
    """``Dec  6 20:48:19`` (``Mon dd hh:mm:ss``, day space-padded) in ``year`` and
    ``zone``; None if it is no such time. Stamps and days' starts are memoised."""
    global _bsd_stamps
    which, stamps = _bsd_stamps
    if which != (year, zone) or len(stamps) >= _MEMO_LIMIT:
        _bsd_stamps = ((year, zone), {})
        which, stamps = _bsd_stamps
    try:
        return stamps[stamp]
    except KeyError:
        when = stamps[stamp] = _read_bsd_time(stamp, year, zone)
        return when


def _read_bsd_time(stamp: str, year: int, zone: tzinfo) -> float | None:
    """:func:`_bsd_time` without the stamp memo: the clock is read by position; in UTC
    the day's start is memoised, elsewhere the zone decides each time (summer time)."""
    clock = stamp[7:]
    if len(clock) != 8 or clock[2] != ":" or clock[5] != ":":
        return None
    hh, mm, ss = clock[0:2], clock[3:5], clock[6:8]
    if not (hh.isdecimal() and mm.isdecimal() and ss.isdecimal()):
        return None
    h, m, sec = int(hh), int(mm), int(ss)
    if h > 23 or m > 59 or sec > 59:
        return None
    if zone is not UTC:
        mon, text = _MONTHS.get(stamp[:3]), stamp[4:6].strip()
        if mon is None or stamp[3] != " " or not text.isdecimal():
            return None
        try:
            return datetime(year, mon, int(text), h, m, sec, tzinfo=zone).timestamp()
        except ValueError:  # 31 February
            return None
    key = (stamp[:6], year)
    day = _bsd_days.get(key, -1.0)
    if day == -1.0:
        mon = _MONTHS.get(stamp[:3])
        text = stamp[4:6].strip()
        day = None
        if mon is not None and stamp[3] == " " and text.isdecimal():
            try:
                day = datetime(year, mon, int(text), tzinfo=UTC).timestamp()
            except ValueError:  # 31 February
                day = None
        if len(_bsd_days) >= _MEMO_LIMIT:
            _bsd_days.clear()
        _bsd_days[key] = day
    return None if day is None else day + h * 3600 + m * 60 + sec


#: The fast path's header: a stamp (checked by :func:`_read_bsd_time`), a host and an app
#: tag as the regex reads them, an optional numeric ``[pid]``, then ``": "``.
_BSD_HEAD: Final = re.compile(
    r"((?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) .. ..:..:..)"
    r" \S+ ([^\s:\[]{1,64})(\[\d+\])?: ",
    re.DOTALL,
)


def parse_syslog(line: str, *, year: int, zone: tzinfo = UTC) -> Entry | None:
    """A syslog line; None when it does not start with a syslog header (a continuation
    of the previous entry). RFC 3164 stamps carry no year or zone: ``year``, ``zone``
    (as does an ISO 8601 stamp without an offset). The reference for
    :func:`syslog_parser`, which reads the lines of a file."""
    return _parse_syslog_regex(line, year, zone)


def syslog_parser(*, mtime: float, zone: tzinfo = UTC) -> Callable[[str], Entry | None]:
    """:func:`parse_syslog` for the lines of a file last written at ``mtime``: in the
    year of ``mtime`` (in ``zone``), a year earlier for a stamp more than a day after
    ``mtime`` (:func:`year_before`). The common RFC 3164 shape (``Mon dd hh:mm:ss host
    tag[pid]: msg``) is read with one regex of plain groups and a memo of the file's
    stamps (a busy host writes many lines a second); the full regex reads the rest."""
    year = datetime.fromtimestamp(mtime, zone).year
    late = mtime + 86_400
    stamps: dict[str, float | None] = {}
    head = _BSD_HEAD.match

    def parse(line: str) -> Entry | None:
        match = head(line)
        if match is not None:
            stamp, app, pid = match.groups()
            when = stamps.get(stamp)
            if when is None and stamp not in stamps:
                if len(stamps) >= _MEMO_LIMIT:
                    stamps.clear()
                when = stamps[stamp] = _read_bsd_time(stamp, year, zone)
            if when is not None:
                if pid is None:  # "app: message" as it stands in the line
                    entry = Entry(when, line[match.start(2) :])
                else:
                    entry = Entry(when, f"{app}: {line[match.end() :]}")
                return entry if when <= late else year_before(entry, zone)
        read = _parse_syslog_regex(line, year, zone)
        if read is not None and read.time is not None and read.time > late:
            return year_before(read, zone)
        return read

    return parse


def line_parser(
    log_format: str,
    *,
    mtime: float,
    zone: tzinfo = UTC,
    regex: str | None = None,
    time_format: str | None = None,
) -> Callable[[str], Entry | None]:
    """The parser of one file's lines in ``log_format`` (``syslog``, ``jsonl`` or
    ``regex``; journald's export format is :class:`JournalExportParser`), as the device
    and the operator's holdout counter both read them."""
    if log_format == "syslog":
        return syslog_parser(mtime=mtime, zone=zone)
    if log_format == "jsonl":
        return partial(parse_json_line, zone=zone)
    if log_format == "regex":
        if not regex:
            raise ValueError('log format "regex" needs a regex')
        return RegexFormat(regex, time_format, zone).parse
    raise ValueError(f"unknown line format {log_format!r}: syslog, jsonl or regex")


def _parse_syslog_regex(line: str, year: int, zone: tzinfo = UTC) -> Entry | None:
    match = _SYSLOG.match(line)
    if match is None:
        return None
    if match.group("bsd"):
        stamp = f"{match.group('mon')} {match.group('day'):>2} {match.group('hms')}"
        when: float | None = _bsd_time(stamp, year, zone)
        if when is None:
            return None
    else:
        when = parse_iso_time(match.group("iso"), zone)
    return Entry(when, f"{match.group('app')}: {match.group('msg')}")


def log_zone(name: str | None) -> tzinfo:
    """The zone named ``name`` (IANA, ``Europe/Berlin``); UTC for None. ValueError for a
    name this machine's zone database does not hold."""
    if name is None or name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name: Europe/Berlin)") from None


def year_before(entry: Entry, zone: tzinfo = UTC) -> Entry:
    """``entry`` a year earlier. An RFC 3164 stamp has no year: it is read in the year the
    file was last written, which puts December's lines of a file last written in January
    after the file's last write; a reader that sees that calls this (they are from the
    year before)."""
    if entry.time is None:
        return entry
    stamp = datetime.fromtimestamp(entry.time, zone)
    try:
        return Entry(stamp.replace(year=stamp.year - 1).timestamp(), entry.message)
    except ValueError:  # 29 February
        return entry


JSON_TIME_KEYS: Final = ("time", "timestamp", "ts", "@timestamp", "date")
JSON_MESSAGE_KEYS: Final = ("message", "msg", "MESSAGE", "log")


def parse_json_line(line: str, zone: tzinfo = UTC) -> Entry | None:
    """A JSON-lines entry: the time from the first of :data:`JSON_TIME_KEYS` (ISO 8601,
    in ``zone`` when it has no offset, or epoch seconds/milliseconds), the message from
    :data:`JSON_MESSAGE_KEYS`, prefixed with ``level`` and ``logger``/``app`` when
    present. None if not a JSON object."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    when = None
    for key in JSON_TIME_KEYS:
        if key in doc:
            when = _json_time(doc[key], zone)
            break
    message = next((doc[k] for k in JSON_MESSAGE_KEYS if isinstance(doc.get(k), str)), None)
    if message is None:
        return None
    prefix = [str(doc[k]) for k in ("level", "logger", "app") if isinstance(doc.get(k), str)]
    return Entry(when, " ".join([*prefix, message]))


def _json_time(value: object, zone: tzinfo) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return value / 1000.0 if value > 1e11 else float(value)  # ms or s since the epoch
    if isinstance(value, str):
        return parse_iso_time(value, zone)
    return None


class RegexFormat:
    """A format given as a regex with named groups ``message`` and (optionally) ``time``
    (ISO 8601, or ``time_format`` for :meth:`datetime.strptime`; in ``zone`` unless it
    has an offset)."""

    def __init__(self, pattern: str, time_format: str | None = None, zone: tzinfo = UTC) -> None:
        self.regex = re.compile(pattern)
        if "message" not in self.regex.groupindex:
            raise ValueError("a log format regex needs a named group 'message'")
        self.time_format = time_format
        self.zone = zone

    def parse(self, line: str) -> Entry | None:
        match = self.regex.match(line)
        if match is None:
            return None
        when = None
        if "time" in self.regex.groupindex and match.group("time"):
            text = match.group("time")
            if self.time_format:
                try:
                    stamp = datetime.strptime(text, self.time_format)
                except ValueError:
                    stamp = None
                if stamp is not None:
                    when = (stamp if stamp.tzinfo else stamp.replace(tzinfo=self.zone)).timestamp()
            else:
                when = parse_iso_time(text, self.zone)
        return Entry(when, match.group("message"))


class JournalExportParser:
    """``journalctl -o export``: entries of ``FIELD=value`` lines ended by an empty line;
    a field whose value is not plain text is ``FIELD\\n``, a little-endian u64 length,
    the bytes and ``\\n``. Fed bytes in any chunks; yields an entry per complete record
    (``MESSAGE`` with ``SYSLOG_IDENTIFIER`` as its app, ``__REALTIME_TIMESTAMP`` in µs).
    A field over ``max_field`` bytes is dropped (counted in :attr:`skipped_fields`).
    :attr:`record_end` is how many bytes fed so far end at a record's end: where a
    reader that stops now goes on from."""

    def __init__(self, *, max_field: int = 65_536) -> None:
        self.max_field = max_field
        self.buffer = b""
        self.fields: dict[str, bytes] = {}
        self.skipped_fields = 0
        self.record_end = 0
        self._consumed = 0  # bytes fed and no longer in the buffer
        self._skip = 0  # bytes of an oversized binary field still to drop

    def _drop(self, count: int) -> None:
        self.buffer = self.buffer[count:]
        self._consumed += count

    def feed(self, data: bytes) -> Iterator[Entry | None]:
        """Entries completed by ``data`` (None for a record with no MESSAGE)."""
        self.buffer += data
        while True:
            if self._skip:
                dropped = min(self._skip, len(self.buffer))
                self._drop(dropped)
                self._skip -= dropped
                if self._skip:
                    return
            newline = self.buffer.find(b"\n")
            if newline < 0:
                if len(self.buffer) > self.max_field + 64:  # a line too long to keep
                    self._drop(len(self.buffer))
                    self.skipped_fields += 1
                return
            line = self.buffer[:newline]
            if not line:  # end of record
                self._drop(1)
                self.record_end = self._consumed
                if self.fields:
                    yield self._entry()
                self.fields = {}
                continue
            name, eq, value = line.partition(b"=")
            if eq:
                self._drop(newline + 1)
                self._keep(name, value)
                continue
            # binary field: name \n u64le length, data, \n
            if len(self.buffer) < newline + 9:
                return
            size = int.from_bytes(self.buffer[newline + 1 : newline + 9], "little")
            end = newline + 9 + size + 1
            if size > self.max_field:
                self.skipped_fields += 1
                self._drop(newline + 9)
                self._skip = size + 1
                continue
            if len(self.buffer) < end:
                return
            self._keep(name, self.buffer[newline + 9 : end - 1])
            self._drop(end)

    def _keep(self, name: bytes, value: bytes) -> None:
        if len(value) > self.max_field:
            self.skipped_fields += 1
            return
        if name in (b"MESSAGE", b"__REALTIME_TIMESTAMP", b"SYSLOG_IDENTIFIER", b"_COMM"):
            self.fields[name.decode("ascii")] = value

    def _entry(self) -> Entry | None:
        message = self.fields.get("MESSAGE")
        if message is None:
            return None
        when = None
        stamp = self.fields.get("__REALTIME_TIMESTAMP", b"")
        if stamp.isdigit():
            when = int(stamp) / 1e6
        app = self.fields.get("SYSLOG_IDENTIFIER") or self.fields.get("_COMM") or b""
        text = message.decode("utf-8", "replace")
        return Entry(when, f"{app.decode('utf-8', 'replace')}: {text}" if app else text)


# ----------------------------------------------------------------------------- windows


def window_start(when: float, seconds: int) -> int:
    """The start of the window of ``seconds`` that holds ``when`` (epoch seconds): the
    device and the server's holdout counter both cut windows here."""
    return int(when - when % seconds)


def window_features(
    messages: Mapping[str, int],
    *,
    lines: int,
    window_seconds: float,
    matcher: TemplateMatcher,
) -> np.ndarray:
    """One window's feature row (:meth:`TemplateVocabulary.feature_names`) from its
    masked messages' counts: each template's count, unknown lines (no template, or not
    kept: ``lines`` minus the kept messages' total), lines per second, distinct
    templates, unknown share. The one function both the device and the server's
    holdout counting use."""
    ids = matcher.template_ids
    column = {template_id: i for i, template_id in enumerate(ids)}
    row = np.zeros(len(ids) + 1 + len(WINDOW_STATS), dtype=np.float64)
    for message, count in messages.items():
        template = matcher.match(message)
        if template is not None:
            row[column[template]] += count
    unknown = lines - float(row[: len(ids)].sum())
    distinct = float(np.count_nonzero(row[: len(ids)]))
    stats = {
        "line_rate": lines / window_seconds,
        "distinct_templates": distinct,
        "unknown_share": unknown / lines if lines else 0.0,
    }
    row[len(ids)] = unknown
    row[len(ids) + 1 :] = [stats[name] for name in WINDOW_STATS]
    return row


def masked_windows(
    entries: Iterable[Entry], *, window_seconds: int
) -> dict[int, tuple[int, dict[str, int]]]:
    """``{window start: (lines, {masked message: count})}`` of ``entries`` (an entry
    without a time takes the previous entry's; one before any time is left out)."""
    windows: dict[int, tuple[int, dict[str, int]]] = {}
    last: float | None = None
    for entry in entries:
        when = entry.time if entry.time is not None else last
        if when is None:
            continue
        last = when
        start = window_start(when, window_seconds)
        lines, messages = windows.get(start, (0, {}))
        masked = mask(entry.message)[:MAX_MASKED_CHARS]
        messages[masked] = messages.get(masked, 0) + 1
        windows[start] = (lines + 1, messages)
    return windows

"""The device's log reader on files in real formats: every entry counted exactly once
across appends, rotation, compression, truncation, torn last lines and kills; garbage,
invalid UTF-8 and absurdly long lines skipped with a count, never a crash."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from client.logs import (
    LogReader,
    LogSettings,
    LogSource,
    LogState,
    ReadTally,
    fingerprint,
    ingest,
    line_blocks,
    state_path,
)
from fedlib.models.logfeatures import (
    JournalExportParser,
    TemplateMatcher,
    mask,
    parse_json_line,
    parse_syslog,
)
from fedlib.ops.templates import learn

T0 = datetime(2026, 3, 14, 9, 0, 0, tzinfo=UTC).timestamp()
SETTINGS = LogSettings(window_seconds=300, retention_days=366)


def syslog_line(i: int, *, rng: random.Random) -> str:
    """An RFC 3164 line ``i`` seconds after T0, of one of a few sshd/cron/kernel kinds."""
    stamp = datetime.fromtimestamp(T0 + i, UTC).strftime("%b %e %H:%M:%S")
    kind = i % 4
    if kind == 0:
        ip = f"10.0.{rng.randrange(256)}.{rng.randrange(256)}"
        msg = f"sshd[{rng.randrange(99999)}]: Accepted password for u{i % 7} from {ip} port 22 ssh2"
    elif kind == 1:
        msg = "CRON[77]: pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)"
    elif kind == 2:
        msg = f"kernel: [{rng.random() * 1e4:.6f}] eth0: link up, {rng.choice([100, 1000])}Mbps"
    else:
        msg = f"systemd[1]: Started Session {i} of User u{i % 5}."
    return f"{stamp} host {msg}\n"


def write(path: Path, lines: list[str], *, mode: str = "a") -> None:
    with path.open(mode + "b") as fh:
        fh.write("".join(lines).encode())
    os.utime(path, (T0 + 10 * 86_400, T0 + 10 * 86_400))  # written in the same year


def counted(state: LogState) -> int:
    return sum(w.lines for w in state.windows.values())


def run(tmp_path: Path, source: LogSource, settings: LogSettings = SETTINGS) -> LogState:
    return ingest([source], settings, base=tmp_path, state_dir=tmp_path / "state")


@pytest.fixture
def rng() -> random.Random:
    return random.Random(19)


def test_appends_rotation_compression_and_truncation_count_each_line_once(tmp_path, rng):
    logs = tmp_path / "log"
    logs.mkdir()
    live = logs / "syslog"
    source = LogSource(path="log/syslog*", format="syslog")
    lines = [syslog_line(i, rng=rng) for i in range(2000)]

    write(live, lines[:500])
    assert counted(run(tmp_path, source)) == 500
    write(live, lines[500:800])  # appended
    assert counted(run(tmp_path, source)) == 800
    assert counted(run(tmp_path, source)) == 800  # nothing new: nothing counted

    # logrotate: syslog -> syslog.1, a new syslog; lines land in both before the next run
    write(live, lines[800:900])
    live.rename(logs / "syslog.1")
    write(live, lines[900:1000], mode="w")
    assert counted(run(tmp_path, source)) == 1000

    # the next rotation compresses syslog.1 into syslog.2.gz (a new file: same content)
    with gzip.open(logs / "syslog.2.gz", "wb") as gz:
        gz.write((logs / "syslog.1").read_bytes())
    (logs / "syslog.1").unlink()
    write(live, lines[1000:1100])
    live.rename(logs / "syslog.1")
    write(live, lines[1100:1200], mode="w")
    assert counted(run(tmp_path, source)) == 1200

    # copytruncate: the live file copied away, then cut to zero and written again
    (logs / "syslog.3").write_bytes(live.read_bytes())
    write(live, lines[1200:1300], mode="w")
    state = run(tmp_path, source)
    assert counted(state) == 1300
    assert state.stats.entries == 1300 and state.stats.continuation == 0

    # windows hold what was written in them, by the lines' own times
    expected: dict[int, int] = {}
    for i in range(1300):
        start = int((T0 + i) // 300 * 300)
        expected[start] = expected.get(start, 0) + 1
    assert {int(w.start): w.lines for w in state.windows.values()} == expected


def test_a_line_still_being_written_waits_for_its_newline(tmp_path, rng):
    live = tmp_path / "app.log"
    source = LogSource(path="app.log", format="syslog")
    whole = syslog_line(1, rng=rng)
    write(live, [syslog_line(0, rng=rng), whole[:20]])
    assert counted(run(tmp_path, source)) == 1
    write(live, [whole[20:]])
    state = run(tmp_path, source)
    assert counted(state) == 2
    (msg,) = [m for w in state.windows.values() for m in w.messages if m.startswith("CRON")]
    assert (
        msg
        == "CRON: pam_unix(cron:session): session opened for user <USER>(uid=<NUM>) by (uid=<NUM>)"
    )


def test_garbage_multiline_invalid_utf8_and_absurd_lines_are_counted_or_skipped(tmp_path, rng):
    live = tmp_path / "syslog"
    source = LogSource(path="syslog", format="syslog")
    settings = LogSettings(window_seconds=300, retention_days=366, max_line_bytes=4096)
    body = [syslog_line(0, rng=rng)]
    body += ["java.lang.IllegalStateException: boom\n", "\tat a.b.C.run(C.java:42)\n"]
    body += [syslog_line(1, rng=rng)]
    write(live, body)
    with live.open("ab") as fh:
        stamp = datetime.fromtimestamp(T0 + 2, UTC).strftime("%b %e %H:%M:%S")
        fh.write(f"{stamp} host app: caf\xe9 ".encode("latin-1") + b"\xff\xfe bytes\n")
        fh.write(b"x" * (10 * 1024 * 1024) + b"\n")  # 10 MiB in one line
        fh.write(b"\x00\x01\x02 binary noise without a header\n")
    write(live, [syslog_line(3, rng=rng)])
    state = run(tmp_path, source, settings)
    assert counted(state) == 4  # four entries
    assert state.stats.continuation == 3  # two stack-trace lines, one of noise
    assert state.stats.skipped_long == 1
    messages = [m for w in state.windows.values() for m in w.messages]
    assert any("\ufffd" in m for m in messages)  # undecodable bytes kept as U+FFFD
    assert counted(run(tmp_path, source, settings)) == 4  # and nothing twice


def test_a_run_killed_mid_read_counts_nothing_of_it(tmp_path, rng):
    """The cursors and windows are one atomically replaced file: a reader that dies
    before saving leaves the previous state, and the next run reads those lines again."""
    live = tmp_path / "syslog"
    source = LogSource(path="syslog", format="syslog")
    write(live, [syslog_line(i, rng=rng) for i in range(100)])
    assert counted(run(tmp_path, source)) == 100
    before = state_path(tmp_path / "state").read_bytes()
    write(live, [syslog_line(i, rng=rng) for i in range(100, 150)])
    pid = os.fork()
    if pid == 0:  # the child reads, then is killed before it saves
        from client.logs import LogReader

        state = LogState.load(state_path(tmp_path / "state"), 300)
        LogReader([source], SETTINGS, base=tmp_path, state=state).read()
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    assert state_path(tmp_path / "state").read_bytes() == before
    assert counted(run(tmp_path, source)) == 150


def journal_record(when_us: int, message: bytes, *, binary: bool = False) -> bytes:
    fields = [f"__REALTIME_TIMESTAMP={when_us}".encode(), b"SYSLOG_IDENTIFIER=sshd", b"_PID=9"]
    if binary:  # journald's export of a value that is not plain text
        fields.append(b"MESSAGE\n" + struct.pack("<Q", len(message)) + message)
    else:
        fields.append(b"MESSAGE=" + message)
    return b"\n".join(fields) + b"\n\n"


def test_journald_export_with_binary_multiline_fields(tmp_path):
    path = tmp_path / "journal.export"
    records = [
        journal_record(
            int((T0 + i) * 1e6), f"Accepted password for u{i} from 10.0.0.{i} port 22".encode()
        )
        for i in range(50)
    ]
    records.append(journal_record(int((T0 + 60) * 1e6), b"line one\nline two \xff", binary=True))
    data = b"".join(records)
    path.write_bytes(data[: len(data) // 2])  # half a stream: whole records only count
    source = LogSource(path="journal.export", format="journald")
    first = counted(run(tmp_path, source))
    assert 0 < first < 51
    path.write_bytes(data)
    state = run(tmp_path, source)
    assert counted(state) == 51
    messages = {m for w in state.windows.values() for m in w.messages}
    assert "sshd: Accepted password for <USER> from <IP> port <NUM>" in messages
    assert any(m.startswith("sshd: line one line two") for m in messages)

    parser = JournalExportParser()  # fed a byte at a time: the same entries
    one_by_one = [e for b in range(len(data)) for e in parser.feed(data[b : b + 1])]
    assert len(one_by_one) == 51 and parser.record_end == len(data)


def test_json_lines_and_a_regex_format(tmp_path):
    lines = [
        json.dumps(
            {
                "ts": f"2026-03-14T09:00:0{i % 10}Z",
                "level": "info",
                "msg": f"GET /items/{i} 200",
            }
        )
        for i in range(30)
    ]
    lines += ["not json at all", json.dumps([1, 2]), json.dumps({"ts": T0, "no": "message"})]
    (tmp_path / "app.jsonl").write_text("\n".join(lines) + "\n")
    state = run(tmp_path, LogSource(path="app.jsonl", format="jsonl"))
    assert counted(state) == 30 and state.stats.skipped_invalid == 3
    assert {m for w in state.windows.values() for m in w.messages} == {"info GET <PATH> <2xx>"}

    (tmp_path / "nginx.log").write_text(
        "".join(
            f"14/Mar/2026:09:00:{i:02d} +0000 | upstream timed out after {i}ms\n" for i in range(20)
        )
    )
    regex = LogSource(
        path="nginx.log",
        format="regex",
        regex=r"(?P<time>\S+ \S+) \| (?P<message>.*)",
        time_format="%d/%b/%Y:%H:%M:%S %z",
    )
    state = ingest([regex], SETTINGS, base=tmp_path, state_dir=tmp_path / "state-regex")
    assert counted(state) == 20
    assert min(w.start for w in state.windows.values()) == T0 // 300 * 300


def test_retention_drops_old_windows(tmp_path, rng):
    live = tmp_path / "syslog"
    write(live, [syslog_line(i * 600, rng=rng) for i in range(10)])  # ten windows, 10 min apart
    settings = LogSettings(window_seconds=300, retention_days=1)
    state = ingest([LogSource(path="syslog")], settings, base=tmp_path, state_dir=tmp_path / "s")
    assert state.windows == {}  # all older than a day (they are from T0, in March)


def test_fingerprint_waits_for_a_whole_first_line(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"no newline yet")
    assert fingerprint(path) is None
    path.write_bytes(b"first line\nsecond")
    assert fingerprint(path) is not None


def test_syslog_and_json_parsers():
    entry = parse_syslog("Mar 14 09:00:05 host sshd[42]: hello world", year=2026)
    assert entry is not None and entry.time == T0 + 5 and entry.message == "sshd: hello world"
    iso = parse_syslog("2026-03-14T10:00:05.5+01:00 host app: hi", year=1999)
    assert iso is not None and iso.time == T0 + 5.5
    assert parse_syslog("\tat a.b.C(C.java:1)", year=2026) is None
    assert parse_json_line('{"time": 1773478805000, "message": "x"}').time == T0 + 5  # ms


def test_mining_and_matching_agree_on_masked_messages(rng):
    messages = [syslog_line(i, rng=rng).split(" host ", 1)[1].strip() for i in range(400)]
    entries = [parse_syslog(f"Mar 14 09:00:00 host {m}", year=2026) for m in messages]
    vocabulary = learn([e.message for e in entries], version=1)
    matcher = TemplateMatcher(vocabulary)
    assert all(matcher.match(mask(e.message)) is not None for e in entries)
    assert matcher.match(mask("sshd: something never seen before at all")) is None
    names = vocabulary.feature_names()
    assert names[-4:] == ["unknown", "line_rate", "distinct_templates", "unknown_share"]
    assert len(names) == len(vocabulary.templates) + 4


def test_a_file_truncated_in_place_is_read_again_from_its_start(tmp_path, rng):
    """Same first line (so the same fingerprint) but shorter than where reading stopped:
    truncated and written again, every line of the new content counts."""
    live = tmp_path / "syslog"
    lines = [syslog_line(i, rng=rng) for i in range(12)]
    write(live, lines[:10])
    assert counted(run(tmp_path, LogSource(path="syslog"))) == 10
    write(live, [lines[0], lines[10], lines[11]], mode="w")
    state = run(tmp_path, LogSource(path="syslog"))
    assert counted(state) == 13 and state.stats.truncated_files == 1


@settings(max_examples=400, deadline=None)
@given(
    day=st.integers(1, 28),
    clock=st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59)),
    host=st.one_of(
        st.from_regex(r"[a-z0-9.\-]{1,12}", fullmatch=True),
        st.text(min_size=1, max_size=8).filter(lambda t: " " not in t),
    ),
    tag=st.one_of(
        st.from_regex(r"[A-Za-z0-9_\-]{1,8}\[[0-9]{1,6}\]", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9_\-./()]{1,10}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9_\-]{1,8}\[[0-9a-z]{0,5}\]", fullmatch=True),
        st.text(min_size=0, max_size=12),
    ),
    sep=st.sampled_from([": ", ":", " ", ":  ", "::"]),
    message=st.text(max_size=40),
)
def test_the_fast_syslog_path_reads_lines_as_the_regex_does(day, clock, host, tag, sep, message):
    """A file's syslog parser reads common RFC 3164 lines with plain groups and a memo of
    stamps, the rest with the full regex: it answers what the full regex answers, with
    the year of the file's last write (a year earlier for a stamp more than a day after
    it)."""
    from fedlib.models.logfeatures import syslog_parser, year_before

    line = f"Mar {day:2d} {clock[0]:02d}:{clock[1]:02d}:{clock[2]:02d} {host} {tag}{sep}{message}"
    written = datetime(2026, 3, 14, 12, tzinfo=UTC).timestamp()  # later days: the year before
    expected = parse_syslog(line, year=2026)
    if expected is not None and expected.time is not None and expected.time > written + 86_400:
        expected = year_before(expected)
    parse = syslog_parser(mtime=written)
    assert parse(line) == expected, line
    assert parse(line) == expected, line  # and again, from the memo of stamps


def test_masking_keeps_what_a_token_means_and_drops_what_varies():
    cases = {
        "sshd: Accepted password for alice from 10.0.0.12 port 52234 ssh2": (
            "sshd: Accepted password for <USER> from <IP> port <NUM> ssh2"
        ),
        "sshd: Failed password for invalid user admin from 2001:db8::1 port 22 ssh2": (
            "sshd: Failed password for invalid user <USER> from <IP> port <NUM> ssh2"
        ),
        "sudo: alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; COMMAND=/usr/bin/apt": (
            "sudo: <USER> : TTY=pts/<NUM> ; PWD=<PATH> ; USER=<USER> ; COMMAND=<PATH>"
        ),
        "app: GET /api/v1/items/42 503 12.5ms": "app: GET <PATH> <5xx> <NUM>",
        'nginx: 10.1.2.3 - - "GET /x HTTP/1.1" 404 1234': (
            'nginx: <IP> - - "GET <PATH> HTTP/<NUM>" <4xx> <NUM>'
        ),
        "app: retry 3 of 500 in 3f2a9c1e-1b2c-4d5e-8f90-0123456789ab": (
            "app: retry <NUM> of <NUM> in <UUID>"
        ),
        "kernel: eth0 up at 00:1a:2b:3c:4d:5e, worker 0x7f3a2b1c": (
            "kernel: eth0 up at <MAC>, worker <HEX>"
        ),
    }
    for line, masked in cases.items():
        assert mask(line) == masked, line


@settings(max_examples=300, deadline=None)
@given(
    head=st.sampled_from(["Mar 14 ", "Mar  1 ", "Feb 30 ", "Mar 1a ", "Xyz 14 ", ""]),
    rest=st.text(max_size=60),
)
def test_the_syslog_parser_never_raises_on_garbage(head, rest):
    """Any text after (or instead of) a header: an entry or None, never an exception."""
    for line in (head + rest, head + "09:00:05 h a: " + rest, head + "9x:00:05 h a: " + rest):
        entry = parse_syslog(line, year=2026)
        assert entry is None or isinstance(entry.message, str)


def test_a_wildcard_with_few_values_is_split_into_one_template_per_value():
    """Drain merges ``link up`` and ``link down`` (one token of five differs); a position
    with a handful of values is a category, so each value seen gets its own template,
    while a position with many values (a counter, an id) stays a wildcard."""
    rng = random.Random(3)
    messages = []
    for i in range(400):
        messages.append(f"kernel: eth0 link {rng.choice(['up', 'down'])} now")
        messages.append(f"app: GET /items/{i} {rng.choice([200, 503])} {rng.random():.2f}ms")
        messages.append(f"worker: job j{rng.randrange(10**6)} done")
    vocabulary = learn(messages, version=1, min_count=2)
    patterns = {t.pattern for t in vocabulary.templates}
    assert {"kernel: eth0 link up now", "kernel: eth0 link down now"} <= patterns
    assert {"app: GET <PATH> <2xx> <NUM>", "app: GET <PATH> <5xx> <NUM>"} <= patterns
    assert "worker: job <*> done" in patterns
    assert not any(p.startswith("worker: job j") for p in patterns)
    matcher = TemplateMatcher(vocabulary)
    ids = {t.pattern: t.id for t in vocabulary.templates}
    assert matcher.match(mask("kernel: eth0 link down now")) == ids["kernel: eth0 link down now"]


@settings(max_examples=400, deadline=None)
@given(
    token=st.one_of(
        st.from_regex(r"[0-9]{1,12}", fullmatch=True),
        st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){2,4}(:[0-9]{0,6})?", fullmatch=True),
        st.from_regex(r"[0-9a-f:.\-/x]{1,20}", fullmatch=True),
        st.text(min_size=1, max_size=16).filter(lambda t: not any(c.isspace() for c in t)),
    )
)
def test_the_token_shortcuts_mask_as_the_rules_do(token):
    from fedlib.models import logfeatures

    assert logfeatures._mask_token(token) == logfeatures._mask_token_by_rules(token)


def _users_by_the_rules(tokens: list[str], out: list[str]) -> None:
    """The user-name rules of MASKS as its comment states them, one token at a time."""
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if i and tokens[i - 1] in ("user", "User"):
            out[i] = USER_RE.sub("<USER>", out[i], count=1)
        elif i and i < last and tokens[i - 1] == "for" and tokens[i + 1] == "from":
            if token not in ("user", "invalid", "User"):
                out[i] = USER_RE.sub("<USER>", out[i], count=1)
        elif i == 1 and last >= 2 and tokens[0] == "sudo:" and tokens[2] == ":":
            out[i] = "<USER>"
        elif "=" in token:
            for key in ("ruser=", "logname=", "user=", "USER=", "acct="):
                if token.startswith(key) and len(token) > len(key):
                    out[i] = key + USER_RE.sub("<USER>", token[len(key) :], count=1)
                    break


USER_RE = __import__("re").compile(r"[\w.\-@$]+")


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(
        st.one_of(
            st.sampled_from(["user", "User", "for", "from", "invalid", "sudo:", ":", "x"]),
            st.sampled_from(["ruser=", "user=bob", "USER=root", "acct=a.b", "logname=", "a=b"]),
            st.from_regex(r"[a-z0-9.@$=\-]{1,8}", fullmatch=True),
        ),
        min_size=1,
        max_size=10,
    )
)
@example(tokens=["sudo:", "user=bob", ":", "x"])  # the first rule that fits, only
@example(tokens=["x", "for", "user=a", "from", "y"])
@example(tokens=["user", "USER=root"])
def test_the_user_rules_apply_as_stated(tokens):
    from fedlib.models import logfeatures

    expected = [logfeatures._mask_token(t) for t in tokens]
    _users_by_the_rules(tokens, expected)
    got = [logfeatures._mask_token(t) for t in tokens]
    logfeatures._mask_users(tokens, got, any("=" in t for t in tokens))
    assert got == expected


def _lines_one_by_one(data: bytes, limit: int, final: bool) -> tuple[list[str], int, int]:
    """What :func:`line_blocks` reads, one ``readline`` at a time: (lines, bytes consumed,
    lines skipped as too long)."""
    fh, lines, offset, skipped = io.BytesIO(data), [], 0, 0
    while raw := fh.readline(limit + 1):
        if len(raw) > limit:
            consumed = len(raw)
            while not raw.endswith(b"\n"):
                raw = fh.readline(limit + 1)
                if not raw:
                    if not final:
                        return lines, offset, skipped
                    break
                consumed += len(raw)
            offset, skipped = offset + consumed, skipped + 1
            continue
        if raw[-1:] != b"\n" and not final:
            break
        offset += len(raw)
        lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
    return lines, offset, skipped


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.binary(max_size=24),
            st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\xff\xfe", "é€".encode(), b"x" * 40]),
        ),
        max_size=12,
    ),
    limit=st.integers(4, 24),
    block=st.integers(1, 16),
    final=st.booleans(),
)
def test_block_reads_count_each_line_as_reading_it_alone_would(pieces, limit, block, final):
    """The device reads a file in blocks: the same lines, the same bytes consumed and
    the same long lines skipped as a read line by line, wherever the blocks cut."""
    data = b"".join(pieces)
    tally = ReadTally(0, None)
    blocks = line_blocks(io.BytesIO(data), tally, limit=limit, final=final, block=block)
    lines = [line.rstrip("\r") for lines in blocks for line in lines]
    assert (lines, tally.offset, tally.skipped_long) == _lines_one_by_one(data, limit, final)


_SHAPE_TOKENS = st.one_of(
    st.sampled_from(
        [
            "GET",
            "/api/v2",
            "HTTP/1.1",
            'HTTP/2"',
            "user",
            "User",
            "for",
            "from",
            "invalid",
            "sudo:",
            ":",
            "ssh2",
            "eth0",
            "e1000e:",
            "port",
            "user=bob7",
            "uid=0",
            "0x1f",
            "7x1f",
            "0x",
            "<NUM>",
            "[5]",
            "503",
            "200",
            "603",
            "099",
        ]
    ),
    st.from_regex(r"[0-9]{1,6}", fullmatch=True),
    st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){3}(:[0-9]{1,5})?", fullmatch=True),
    st.from_regex(r"[0-9a-fxAF:.\-/=@]{1,14}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", fullmatch=True),
    st.text(min_size=1, max_size=6).filter(lambda t: not any(c.isspace() for c in t)),
)


@settings(max_examples=500, deadline=None)
@given(tokens=st.lists(_SHAPE_TOKENS, min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1))
@example(tokens=["0x1f"], seed=0)  # "0x" is hex, "7x" is not: 0 is a shape of its own
@example(tokens=["GET", "/a", "603"], seed=1)  # 603 is no status, 503 is
def test_messages_of_one_shape_mask_as_each_would_alone(tokens, seed):
    """The memo of message shapes answers for a message what masking it token by token
    does, after messages that differ from it only in their digits were masked (its
    non-zero digits changed: its shape; any digit changed)."""
    from fedlib.models import logfeatures

    message = " ".join(tokens)
    rng = random.Random(seed)
    twin = "".join(rng.choice("123456789") if c in "123456789" else c for c in message)
    other = "".join(rng.choice("0123456789") if c in "0123456789" else c for c in message)
    logfeatures._shape_memo.clear()
    for text in (message, twin, other, message):
        assert logfeatures.mask(text) == logfeatures.mask_by_tokens(text), (message, text)


def test_a_rotated_file_gone_for_the_retention_is_forgotten(tmp_path, rng):
    """logrotate deletes the oldest rotation: its cursor goes once no listing has named
    it for ``retention_days``, while a file still listed keeps its cursor however old."""
    settings = LogSettings(window_seconds=300, retention_days=2)
    live, old = tmp_path / "syslog", tmp_path / "syslog.1"
    write(live, [syslog_line(i, rng=rng) for i in range(5)])
    write(old, [syslog_line(1000 + i, rng=rng) for i in range(5)])
    state = LogState(window_seconds=300)

    def read(now: float) -> None:
        LogReader([LogSource(path="syslog*")], settings, base=tmp_path, state=state).read(now=now)

    read(T0)
    assert len(state.cursors) == 2
    kept = fingerprint(live)
    old.unlink()
    read(T0 + 86_400)  # one day later: still remembered
    assert len(state.cursors) == 2 and kept in state.cursors
    read(T0 + 3 * 86_400)  # two days after the last listing that named it: forgotten
    assert set(state.cursors) == {kept}
    read(T0 + 400 * 86_400)  # the live file stays known, however long
    assert set(state.cursors) == {kept}
    assert state.cursors[kept].seen_at == T0 + 400 * 86_400


def test_stamps_without_an_offset_are_read_in_the_source_zone(tmp_path):
    """RFC 3164 and offset-free ISO stamps in the source's zone, summer time included;
    the server's holdout counter reads the same file to the same windows."""
    from zoneinfo import ZoneInfo

    from fedlib.ops.templates import read_sample

    berlin = ZoneInfo("Europe/Berlin")
    winter = datetime(2026, 1, 15, 12, 2, 3, tzinfo=berlin)  # UTC+1
    summer = datetime(2026, 7, 15, 12, 7, 3, tzinfo=berlin)  # UTC+2
    lines = [
        f"{w:%b} {w.day:>2} {w:%H:%M:%S} host sshd[1]: Accepted publickey for bob\n"
        for w in (winter, summer)
    ]
    write(tmp_path / "syslog", lines)
    (tmp_path / "app.jsonl").write_text(
        json.dumps({"time": summer.replace(tzinfo=None).isoformat(), "msg": "started"}) + "\n"
    )
    os.utime(tmp_path / "syslog", (T0 + 200 * 86_400, T0 + 200 * 86_400))  # in 2026
    sources = [
        LogSource(path="syslog", timezone="Europe/Berlin"),
        LogSource(path="app.jsonl", format="jsonl", timezone="Europe/Berlin"),
    ]
    state = LogState(window_seconds=300)
    LogReader(sources, SETTINGS, base=tmp_path, state=state).read(now=T0 + 200 * 86_400)
    starts = sorted(w.start for w in state.windows.values())
    expected = sorted({winter.timestamp() // 300 * 300, summer.timestamp() // 300 * 300})
    assert starts == expected
    assert sum(w.lines for w in state.windows.values()) == 3
    # the same file read as UTC lands an hour (winter) and two (summer) later
    utc = [e.time for e in read_sample(tmp_path / "syslog", "syslog")]
    zoned = [e.time for e in read_sample(tmp_path / "syslog", "syslog", zone=berlin)]
    assert zoned == [winter.timestamp(), summer.timestamp()]
    assert [u - z for u, z in zip(utc, zoned, strict=True)] == [3600.0, 7200.0]
    with pytest.raises(ValueError, match="time zone"):
        LogSource(path="syslog", timezone="Mars/Olympus")

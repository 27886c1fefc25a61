"""The object-store seam against a real SeaweedFS server and a real directory.

Behaviour shared by both backends is parametrized over them, so code written against
:class:`~fedlib.storage.store.ObjectStore` works the same on a device and on the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from fedlib.errors import ObjectExists, StoreError
from fedlib.storage.store import (
    ListingSpan,
    LocalStore,
    NoSuchKey,
    ObjectInfo,
    ObjectStore,
    ObjectTooLarge,
    S3Config,
    S3Store,
    open_store,
)
from scripts.seaweed import Credentials, SeaweedServer


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def other_bucket(store: ObjectStore) -> ObjectStore:
    """Another bucket on the same server as ``store`` (a sibling directory locally)."""
    name = f"other-{uuid.uuid4().hex[:12]}"
    other: ObjectStore
    if isinstance(store, S3Store):
        other = S3Store(name, store.config)
    else:
        assert isinstance(store, LocalStore)
        other = LocalStore(store.root.parent / name)
    other.ensure_bucket()
    return other


def keys(infos: object) -> list[str]:
    return [info.key for info in infos]  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- both backends


def test_put_get_exists_roundtrip(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    assert not store.exists("updates/client-1/u1")
    payload = bytes(range(256)) * 40
    store.put("updates/client-1/u1", payload)
    assert store.exists("updates/client-1/u1")
    assert store.get("updates/client-1/u1") == payload
    store.put("empty", b"")
    assert store.get("empty") == b""
    store.put("updates/client-1/u1", b"overwritten")  # plain put overwrites
    assert store.get("updates/client-1/u1") == b"overwritten"


def test_missing_key_is_nosuchkey(store: ObjectStore) -> None:
    with pytest.raises(NoSuchKey) as info:
        store.get("nope/missing")
    assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
    assert "nope/missing" in str(info.value) and not str(info.value).startswith("'")
    assert not store.exists("nope/missing")


def test_if_absent_is_write_once(store: ObjectStore) -> None:
    store.put("ledger/round-1", b"first", if_absent=True)
    with pytest.raises(ObjectExists):
        store.put("ledger/round-1", b"second", if_absent=True)
    assert store.get("ledger/round-1") == b"first"
    store.delete("ledger/round-1")
    store.put("ledger/round-1", b"third", if_absent=True)
    assert store.get("ledger/round-1") == b"third"


def test_if_absent_race_has_exactly_one_winner(store: ObjectStore) -> None:
    winners: list[int] = []
    losers: list[int] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.put("ledger/race", f"writer-{i}".encode(), if_absent=True)
            winners.append(i)
        except ObjectExists:
            losers.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    assert store.get("ledger/race") == f"writer-{winners[0]}".encode()


def test_max_bytes_refuses_oversized(store: ObjectStore) -> None:
    store.put("big", b"x" * 1000)
    assert store.get("big", max_bytes=1000) == b"x" * 1000
    # a huge limit (TUF passes whatever length signed metadata declares) allocates nothing
    assert store.get("big", max_bytes=1 << 60) == b"x" * 1000
    with pytest.raises(ObjectTooLarge, match="oversized") as info:
        store.get("big", max_bytes=999)
    assert isinstance(info.value, StoreError)
    assert info.value.size == 1000 and info.value.max_bytes == 999
    with pytest.raises(NoSuchKey):
        store.get("small-missing", max_bytes=10)
    # Refusals must not leak connections or handles: the store keeps working.
    for _ in range(40):
        with pytest.raises(ObjectTooLarge):
            store.get("big", max_bytes=1)
    assert store.get("big") == b"x" * 1000


KEYS = [
    "ledger/0001",
    "models/v1/weights",
    "updates/client-1/0001",
    "updates/client-1/0002",
    "updates/client-1/0003",
    "updates/client-2/0001",
    "updates/client-2/0002",
]


def test_list_order_prefix_start_after_limit(store: ObjectStore) -> None:
    for i, key in enumerate(reversed(KEYS)):
        store.put(key, b"v" * (i + 1))
    listed = list(store.list())
    assert keys(listed) == sorted(KEYS)
    assert all(isinstance(i, ObjectInfo) and i.etag for i in listed)
    assert {i.key: i.size for i in listed}["ledger/0001"] == len(KEYS)

    assert keys(store.list("updates/client-1/")) == KEYS[2:5]
    assert keys(store.list("updates/cl")) == KEYS[2:]  # prefixes need not end at "/"
    assert keys(store.list("nothing/")) == []
    assert keys(store.list("updates/", start_after="updates/client-1/0003")) == KEYS[5:]
    assert keys(store.list(start_after="updates/client-1/0001")) == KEYS[3:]
    assert keys(store.list("updates/", limit=2)) == KEYS[2:4]
    assert keys(store.list(limit=0)) == []


def test_list_spans_server_pages(store: ObjectStore) -> None:
    # S3 servers answer at most 1,000 keys a page: the listing must carry on across pages.
    names = [f"updates/client-1/{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.put(key, b"1"), names))
    assert keys(store.list("updates/")) == names
    assert keys(store.list("updates/", start_after=names[998], limit=4)) == names[999:1003]
    assert keys(store.list("updates/client-1/001")) == names[100:200]
    assert keys(store.list(names[1004], limit=1)) == [names[1004]]


def test_list_prefixes_that_stop_mid_segment(store: ObjectStore) -> None:
    # A prefix is any string: a whole key, part of a segment, a character before "/".
    tricky = ["a/b", "a-c", "a.d", "ab/c", "b", "q/0/x", "q/00", "q/1", "q/10/x", "q/2"]
    for key in tricky:
        store.put(key, key.encode())
    for prefix in [
        "",
        "a",
        "a/",
        "a-",
        "a.",
        "ab",
        "b",
        "q/",
        "q/0",
        "q/1",
        "q/10",
        "q/2",
        "z",
        "q/3",
    ]:
        want = sorted(k for k in tricky if k.startswith(prefix))
        assert sorted(keys(store.list(prefix))) == want, prefix
        assert keys(store.list(prefix, limit=1)) == keys(store.list(prefix))[:1], prefix
    assert keys(store.list("q/1", start_after="q/1")) == ["q/10/x"]


def test_exists_and_get_with_etag_agree_with_list(store: ObjectStore) -> None:
    store.put("models/v1", b"weights")
    blob, etag = store.get_with_etag("models/v1")
    assert blob == b"weights" and etag
    (info,) = store.list("models/v1")
    assert (info.size, info.etag) == (7, etag) and info.last_modified_ms > 0
    store.put("models/v1", b"other weights")
    assert store.get_with_etag("models/v1")[1] != etag
    assert store.exists("models/v1") and not store.exists("models/v")


def test_delete(store: ObjectStore) -> None:
    store.put("a/b/c", b"1")
    store.put("a/b/d", b"2")
    store.delete("a/b/c")
    assert not store.exists("a/b/c")
    assert keys(store.list("a/")) == ["a/b/d"]
    store.delete("a/b/c")  # deleting a missing key is fine, as in S3
    store.delete("never/there")


def test_copy(store: ObjectStore) -> None:
    store.put("models/candidate", b"weights")
    store.copy("models/candidate", "models/v2")
    assert store.get("models/v2") == b"weights"
    assert store.get("models/candidate") == b"weights"
    store.put("models/v3", b"old")
    store.copy("models/candidate", "models/v3")
    assert store.get("models/v3") == b"weights"
    with pytest.raises(NoSuchKey):
        store.copy("models/missing", "models/v4")
    assert not store.exists("models/v4")


def test_copy_from_another_bucket(store: ObjectStore, other_bucket: ObjectStore) -> None:
    blob = os.urandom(3 * 1024 * 1024)
    other_bucket.put("updates/client-1/big", blob)
    store.copy("updates/client-1/big", "quarantine/big.bin", src_bucket=other_bucket.bucket)  # type: ignore[attr-defined]
    assert store.get("quarantine/big.bin") == blob
    assert other_bucket.get("updates/client-1/big") == blob  # a copy: the source stays
    with pytest.raises(NoSuchKey) as info:
        store.copy("updates/missing", "quarantine/m.bin", src_bucket=other_bucket.bucket)  # type: ignore[attr-defined]
    assert info.value.key == "updates/missing"
    assert not store.exists("quarantine/m.bin")
    with pytest.raises(StoreError, match="no such bucket"):
        store.copy(
            "updates/client-1/big", "quarantine/x.bin", src_bucket="nobucket-" + os.urandom(4).hex()
        )
    assert not store.exists("quarantine/x.bin")


def test_ensure_bucket_is_idempotent_everywhere(store: ObjectStore) -> None:
    store.put("k", b"v")
    store.ensure_bucket()
    store.ensure_bucket()
    assert store.get("k") == b"v"


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "a/../b", "..", "../x", "a//b", "a/", "./a", "a\x00b", "a\tb", "a\x7fb"],
)
def test_unsafe_keys_are_refused_alike(store: ObjectStore, key: str) -> None:
    ops: list[Callable[[], object]] = [
        lambda: store.put(key, b"x"),
        lambda: store.put(key, b"x", if_absent=True),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.copy("ok", key),
        lambda: store.copy(key, "ok"),
    ]
    for op in ops:
        with pytest.raises(ValueError):
            op()
    assert keys(store.list()) == []


# ----------------------------------------------------------------------------- S3 only


def test_ensure_bucket_is_idempotent(s3_bucket: S3Store) -> None:
    s3_bucket.ensure_bucket()
    s3_bucket.put("k", b"v")
    s3_bucket.ensure_bucket()
    assert s3_bucket.get("k") == b"v"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_fast_with_clear_error() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = S3Config(
        endpoint_url=endpoint,
        access_key="k",
        secret_key="s",
        max_attempts=2,
        connect_timeout=0.5,
        read_timeout=0.5,
    )
    store = S3Store("fl-inbox", cfg)
    ops: list[Callable[[], object]] = [
        lambda: store.put("k", b"v"),
        lambda: store.get("k"),
        lambda: store.exists("k"),
        lambda: list(store.list()),
        lambda: store.delete("k"),
        lambda: store.copy("k", "j"),
        store.ensure_bucket,
    ]
    began = time.monotonic()
    for op in ops:
        with pytest.raises(StoreError) as info:
            op()
        assert endpoint in str(info.value) and "cannot reach" in str(info.value)
        assert not isinstance(info.value, NoSuchKey)
    assert time.monotonic() - began < 15


def test_wrong_credentials_are_access_denied(s3_bucket: S3Store, s3_config: S3Config) -> None:
    s3_bucket.put("k", b"v")
    bad = S3Store(
        s3_bucket.bucket,
        S3Config(s3_config.endpoint_url, access_key=s3_config.access_key, secret_key="wrong"),
    )
    for op in (lambda: bad.get("k"), lambda: bad.put("k2", b"v"), lambda: list(bad.list())):
        with pytest.raises(StoreError, match="access denied"):
            op()


def test_keys_object_store_cannot_name_do_not_stop_a_listing(
    s3_bucket: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    # A device may name its upload anything under its own prefix; object_store fails a
    # whole listing page on a control character. The listing must go on past it.
    control = s3_bucket.config.client()
    names = [f"updates/client-1/{i:04d}" for i in range(6)]
    for key in names[:3]:
        s3_bucket.put(key, b"ok")
    control.put_object(Bucket=s3_bucket.bucket, Key="updates/client-1/0003\tevil", Body=b"x")
    for key in names[3:]:
        s3_bucket.put(key, b"ok")
    with caplog.at_level("WARNING", logger="fedlib.storage.store"):
        assert keys(s3_bucket.list("updates/")) == names
        assert keys(s3_bucket.list("updates/", limit=4)) == names[:4]
        assert keys(s3_bucket.list("updates/", start_after=names[4])) == names[5:]
    assert "0003\\tevil" in caplog.text
    with pytest.raises(ValueError):
        s3_bucket.get("updates/client-1/0003\tevil")


def test_s3_config_maps_to_obstore() -> None:
    cfg = S3Config(
        "http://127.0.0.1:9", access_key="k", secret_key="s", max_attempts=3, read_timeout=7.0
    )
    options = cfg.obstore_options()
    assert options["endpoint"] == "http://127.0.0.1:9" and options["client_options"]["allow_http"]
    assert options["retry_config"]["max_retries"] == 2
    assert options["client_options"]["read_timeout"].total_seconds() == 7.0
    assert (options["access_key_id"], options["secret_access_key"]) == ("k", "s")
    tls = S3Config("https://minio.example:9000").obstore_options()
    assert not tls["client_options"]["allow_http"] and "access_key_id" not in tls
    assert "endpoint" not in S3Config(None).obstore_options()  # AWS itself


def test_s3_config_from_env() -> None:
    env = {
        "FL_S3_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "aws-key",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "FL_S3_SECRET_KEY": "fl-secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "FL_S3_MAX_ATTEMPTS": "2",
    }
    cfg = S3Config.from_env(environ=env)
    assert cfg.endpoint_url == "http://127.0.0.1:9"
    assert (cfg.access_key, cfg.secret_key) == ("aws-key", "fl-secret")
    assert cfg.region == "eu-west-1" and cfg.max_attempts == 2
    assert "fl-secret" not in repr(cfg)
    assert S3Config.from_env(environ={}) == S3Config(endpoint_url=None)
    client = cfg.client()
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 2}


def test_open_store(tmp_path: Path, s3_config: S3Config) -> None:
    s3 = open_store("s3://fl-inbox", s3_config)
    assert isinstance(s3, S3Store) and s3.bucket == "fl-inbox"
    local = open_store(f"file://{tmp_path}/a")
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "a").resolve()
    plain = open_store(str(tmp_path / "b"))
    assert isinstance(plain, LocalStore) and plain.root == (tmp_path / "b").resolve()
    for bad in ("s3://", "s3://bucket/prefix", "ftp://host/x", "file://otherhost/x"):
        with pytest.raises(ValueError):
            open_store(bad, s3_config)


# ------------------------------------------------------ S3: own server (grants, restart)

INBOX, MODELS = "fl-inbox", "fl-models"
CLIENT_1 = Credentials("client-1-key", "client-1-secret")
READER = Credentials("reader-key", "reader-secret")


@pytest.fixture(scope="module")
def private_server(seaweed_factory: Callable[..., SeaweedServer]) -> SeaweedServer:
    """A server of our own: least-privilege identities, and safe to restart."""
    identities = [
        {
            "name": "client-1",
            "credentials": [{"accessKey": CLIENT_1.access_key, "secretKey": CLIENT_1.secret_key}],
            "actions": [f"Write:{INBOX}/updates/client-1/*"],
        },
        {
            "name": "reader",
            "credentials": [{"accessKey": READER.access_key, "secretKey": READER.secret_key}],
            "actions": [f"Read:{MODELS}", f"List:{MODELS}"],
        },
    ]
    server = seaweed_factory(identities)
    for bucket in (INBOX, MODELS):
        S3Store(bucket, server.s3_config()).ensure_bucket()
    return server


def test_least_privilege_grants(private_server: SeaweedServer) -> None:
    admin = S3Store(INBOX, private_server.s3_config())
    admin.put("updates/client-2/u1", b"theirs")
    admin.put("updates/client-1/seed", b"mine")
    S3Store(MODELS, private_server.s3_config()).put("v1/model", b"weights")

    client = S3Store(INBOX, private_server.s3_config(CLIENT_1, max_attempts=1))
    client.put("updates/client-1/u1", b"update", if_absent=True)
    with pytest.raises(ObjectExists):  # write-once still enforced for the client itself
        client.put("updates/client-1/u1", b"again", if_absent=True)
    denied: list[Callable[[], object]] = [
        lambda: client.put("updates/client-2/u2", b"forged"),
        lambda: client.put("updates/client-2/u1", b"overwrite", if_absent=True),
        lambda: client.put("ledger/x", b"forged"),
        lambda: client.get("updates/client-1/u1"),
        lambda: client.get("updates/client-2/u1"),
        lambda: client.exists("updates/client-2/u1"),
        lambda: list(client.list("updates/")),
        lambda: list(client.list("updates/client-1/")),
        lambda: S3Store(MODELS, client.config).put("v9/model", b"evil"),
    ]
    for op in denied:
        with pytest.raises(StoreError, match="access denied") as info:
            op()
        assert not isinstance(info.value, ObjectExists | NoSuchKey)
    assert admin.get("updates/client-1/u1") == b"update"
    assert admin.get("updates/client-2/u1") == b"theirs"

    reader = S3Store(MODELS, private_server.s3_config(READER, max_attempts=1))
    assert reader.get("v1/model") == b"weights"
    assert keys(reader.list()) == ["v1/model"]
    with pytest.raises(StoreError, match="access denied"):
        reader.put("v2/model", b"evil")
    with pytest.raises(StoreError, match="access denied"):
        S3Store(INBOX, reader.config).get("updates/client-2/u1")


def test_data_survives_restart(private_server: SeaweedServer) -> None:
    store = S3Store(INBOX, private_server.s3_config())
    blobs = {f"restart/{i:03d}": os.urandom(100 + 997 * i) for i in range(12)}
    for key, blob in blobs.items():
        store.put(key, blob, if_absent=True)
    endpoint, pid = private_server.endpoint_url, private_server.pid

    private_server.restart()

    assert private_server.endpoint_url == endpoint and private_server.pid != pid
    assert {k: store.get(k) for k in blobs} == blobs  # same client object, same endpoint
    assert keys(store.list("restart/")) == sorted(blobs)
    with pytest.raises(ObjectExists):
        store.put("restart/000", b"replaced", if_absent=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "scripts.seaweed", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.s3
def test_seaweed_cli_start_status_stop(tmp_path: Path) -> None:
    data = tmp_path / "demo-s3"
    try:
        started = _cli("start", "--dir", str(data))
        assert started.returncode == 0, started.stderr
        state = json.loads((data / "server.json").read_text())
        assert json.loads(started.stdout)["endpoint_url"] == state["endpoint_url"]
        assert "secret" not in started.stdout  # the admin secret stays in the 0600 file
        assert (data / "server.json").stat().st_mode & 0o077 == 0
        # The CLI has exited; the server keeps serving with the recorded credentials.
        creds = S3Config(
            state["endpoint_url"], access_key=state["access_key"], secret_key=state["secret_key"]
        )
        store = S3Store("demo", creds)
        store.ensure_bucket()
        store.put("k", b"v")
        assert _cli("start", "--dir", str(data)).returncode == 0  # idempotent
        assert _cli("status", "--dir", str(data)).returncode == 0
    finally:
        stopped = _cli("stop", "--dir", str(data))
    assert stopped.returncode == 0, stopped.stderr
    assert _cli("status", "--dir", str(data)).returncode == 3
    with pytest.raises(StoreError, match="cannot reach"):
        S3Store("demo", replace(creds, max_attempts=1)).get("k")


# ----------------------------------------------------------------------------- local only

BAD_KEYS = ["", "/etc/passwd", "a/../b", "..", "../x", "a//b", "a/", "./a", "a\\b", "a\x00b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_local_rejects_unsafe_keys(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "store")
    for op in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.copy("ok", key),
    ):
        with pytest.raises(ValueError):
            op()
    assert list(tmp_path.rglob("*")) == [tmp_path / "store"]


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".fl-tmp-")]


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    store.put("a/k", b"old")
    for i in range(20):
        store.put(f"a/k{i}", b"v")
        with pytest.raises(ObjectExists):
            store.put(f"a/k{i}", b"w", if_absent=True)
    assert _temp_files(root) == []

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)  # a crash/disk-full mid-write
    with pytest.raises(StoreError, match="No space left"):
        store.put("a/k", b"new-but-torn")
    with pytest.raises(StoreError):
        store.put("a/fresh", b"new", if_absent=True)
    monkeypatch.undo()
    assert store.get("a/k") == b"old"
    assert not store.exists("a/fresh")
    assert _temp_files(root) == []
    assert ".fl-tmp-" not in "".join(keys(store.list()))


def test_local_list_is_bytewise_lexicographic(tmp_path: Path) -> None:
    # "." and "-" sort before "/": a naive directory walk would put "v1/x" first.
    store = LocalStore(tmp_path)
    tricky = ["v1/x", "v1.json", "v1-old/y", "v10", "v1/a/b", "W", "é"]
    for key in tricky:
        store.put(key, b"1")
    assert keys(store.list()) == sorted(tricky)
    assert keys(store.list("v1")) == sorted(k for k in tricky if k.startswith("v1"))
    assert keys(store.list(start_after="v1.json")) == ["v1/a/b", "v1/x", "v10", "é"]
    assert keys(store.list("v1/", start_after="v1/a/b")) == ["v1/x"]


def test_local_delete_prunes_dirs_and_prefix_conflicts(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put("a/b/c", b"1")
    with pytest.raises(StoreError):  # "a" is a prefix here; S3 would allow it, a dir cannot
        store.put("a", b"2")
    with pytest.raises(StoreError):
        store.put("a/b", b"2", if_absent=True)
    assert not store.exists("a/b")
    store.delete("a/b/c")
    assert list((tmp_path / "s").iterdir()) == []
    store.put("a", b"now fine")
    assert store.get("a") == b"now fine"


def test_a_process_forked_after_requests_gets_an_error_not_a_hang(s3_bucket: S3Store) -> None:
    # obstore's runtime does not survive fork(): without the guard the child would hang.
    s3_bucket.put("k", b"v")  # the runtime has started in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what happened through the pipe, then exits at once
        signal.alarm(20)  # a hang (the bug this guards against) kills the child instead
        outcome = b"other error"
        try:
            s3_bucket.get("k")
            outcome = b"no error"
        except StoreError as exc:
            outcome = b"StoreError: " + str(exc).encode()
        finally:
            os.write(write, outcome)
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as fh:
        outcome = fh.read().decode()
    assert status == 0 and outcome.startswith("StoreError: get s3://"), outcome
    assert "fork" in outcome
    assert s3_bucket.get("k") == b"v"  # the parent is unaffected


def test_digest_streams_size_sha256_and_prefix(store: ObjectStore) -> None:
    """What quarantine stubs are made of, read in bounded chunks (several here)."""
    import hashlib

    from fedlib.storage.store import DIGEST_CHUNK_BYTES

    payload = bytes(range(256)) * (DIGEST_CHUNK_BYTES // 256 * 2 + 3)
    store.put("big/one", payload)
    digest = store.digest("big/one", prefix_bytes=100)
    assert digest.sha256 == hashlib.sha256(payload).hexdigest()
    assert digest.size == len(payload) and digest.prefix == payload[:100]
    assert digest.etag == next(iter(store.list("big/one"))).etag
    capped = store.digest("big/one", prefix_bytes=100, hash_max=len(payload) - 1)
    assert (capped.sha256, capped.size, capped.prefix) == ("", len(payload), payload[:100])
    exact = store.digest("big/one", hash_max=len(payload))
    assert exact.sha256 == digest.sha256
    store.put("tiny", b"ab")
    assert store.digest("tiny", prefix_bytes=100).prefix == b"ab"
    assert store.digest("tiny").prefix == b""
    with pytest.raises(NoSuchKey):
        store.digest("missing")


def test_unaddressable_keys_are_listed_read_and_deleted_by_their_exact_name(
    s3_bucket: S3Store,
) -> None:
    import hashlib

    control = s3_bucket.config.client()
    # (a key ending in \x01 is not even refused by object_store's listing: it comes back
    # as "d\ufffd", a key that does not exist; list_unaddressable still finds the real one)
    odd = ["updates/c/a\tb", "updates/c/d\x7f"]
    for key in odd:
        control.put_object(Bucket=s3_bucket.bucket, Key=key, Body=key.encode())
    s3_bucket.put("updates/c/fine", b"ok")
    assert sorted(keys(s3_bucket.list_unaddressable("updates/", limit=10))) == sorted(odd)
    assert len(list(s3_bucket.list_unaddressable("updates/", limit=1))) == 1
    digest = s3_bucket.digest_unaddressable(odd[0], prefix_bytes=4)
    assert digest.sha256 == hashlib.sha256(odd[0].encode()).hexdigest()
    assert (digest.size, digest.prefix) == (len(odd[0]), odd[0].encode()[:4])
    for ordinary in ("updates/c/fine", "/etc/passwd", ""):  # the ordinary methods, or none
        with pytest.raises(ValueError):
            s3_bucket.delete_unaddressable(ordinary, etag=digest.etag)
        with pytest.raises(ValueError):
            s3_bucket.digest_unaddressable(ordinary)
    # rewritten since it was judged: the new version stays (the next round judges it)
    control.put_object(Bucket=s3_bucket.bucket, Key=odd[0], Body=b"rewritten")
    assert s3_bucket.delete_unaddressable(odd[0], etag=digest.etag) is False
    assert sorted(keys(s3_bucket.list_unaddressable("updates/", limit=10))) == sorted(odd)
    fresh = s3_bucket.digest_unaddressable(odd[0])
    assert s3_bucket.delete_unaddressable(odd[0], etag=fresh.etag) is True
    assert keys(s3_bucket.list_unaddressable("updates/", limit=10)) == [odd[1]]
    assert s3_bucket.delete_unaddressable(odd[0], etag=fresh.etag) is False  # gone
    assert keys(s3_bucket.list("updates/")) == ["updates/c/fine"]


def test_unaddressable_keys_are_listed_within_a_range(s3_bucket: S3Store) -> None:
    """A range of the listing: after one key (which need not exist any more), through
    another, reading at most so many keys."""
    control = s3_bucket.config.client()
    for key in ("updates/a/x\x01", "updates/b/x\x01", "updates/c/x\x01"):
        control.put_object(Bucket=s3_bucket.bucket, Key=key, Body=b"odd")
    for key in ("updates/a/y", "updates/b/y", "updates/c/y"):
        s3_bucket.put(key, b"ok")

    def within(**bounds: object) -> list[str]:
        span = ListingSpan(**bounds)  # type: ignore[arg-type]
        return keys(s3_bucket.list_unaddressable("updates/", limit=10, span=span))

    assert within(through="updates/a/y") == ["updates/a/x\x01"]
    assert within(after="updates/a/y", through="updates/b/y") == ["updates/b/x\x01"]
    assert within(after="updates/b/y") == ["updates/c/x\x01"]
    s3_bucket.delete("updates/b/y")  # gone: the next range still starts after it
    assert within(after="updates/b/y") == ["updates/c/x\x01"]
    assert within(keys=3) == ["updates/a/x\x01", "updates/b/x\x01"]

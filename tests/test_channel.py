"""The TUF model channel against a real SeaweedFS and a plain directory.

Each refusal test first shows the device accepting the honest channel, then applies
one attack by writing into the bucket (what a compromised mirror or bucket credential
can do) and checks the device refuses it with a VerificationError while an unreachable
store stays a StoreError.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient._internal import trusted_metadata_set

from fedlib.errors import StoreError, VerificationError
from fedlib.storage.store import LocalStore, NoSuchKey, ObjectInfo, ObjectStore, S3Config, S3Store
from fedlib.trust.channel_client import ChannelClient, StoreFetcher
from fedlib.trust.channel_layout import (
    ACTIVE_TARGET,
    ChannelError,
    ChannelLayout,
    ChannelVerificationError,
    manifest_path,
    target_path,
)
from fedlib.trust.channel_repository import ChannelKeys, ChannelRepository, generate_signer

V1 = {"model.onnx": b"onnx-v1" * 100, "weights.bin": b"\x01" * 800, "metadata.json": b'{"v":1}'}
V2 = {"model.onnx": b"onnx-v2" * 100, "weights.bin": b"\x02" * 800, "metadata.json": b'{"v":2}'}
MD = "tuf/metadata/"
TG = "tuf/targets/"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def keys(tmp_path: Path) -> ChannelKeys:
    return ChannelKeys.generate(tmp_path / "keys")


@pytest.fixture
def repo(s3_bucket: S3Store, keys: ChannelKeys) -> ChannelRepository:
    repository = ChannelRepository(s3_bucket, keys)
    assert repository.init() is True
    return repository


@pytest.fixture
def device(tmp_path: Path) -> Callable[..., ChannelClient]:
    """Make a device with its own cache dirs, pinned to root v1 of ``repo``."""
    count = iter(range(1000))

    def make(
        repo: ChannelRepository, store: Any = None, root: bytes | None = None
    ) -> ChannelClient:
        home = tmp_path / f"device-{next(count)}"
        return ChannelClient(
            store if store is not None else repo.store,
            home / "metadata",
            home / "targets",
            root if root is not None else repo.root_bytes(1),
        )

    return make


def target_key(repo: ChannelRepository, path: str) -> str:
    """The object key of a listed target (hash-prefixed), from the repository's own view."""
    targets = _current(repo, "targets", Targets)
    return repo.layout.target_key(targets.signed.targets[path])


def _current(repo: ChannelRepository, role: str, kind: type[Any]) -> Metadata[Any]:
    """The role's metadata the bucket currently serves (following timestamp -> snapshot)."""
    ts = Metadata[Timestamp].from_bytes(repo.store.get(MD + "timestamp.json"))
    if role == "timestamp":
        return ts
    snap_v = ts.signed.snapshot_meta.version
    snap = Metadata[Snapshot].from_bytes(repo.store.get(f"{MD}{snap_v}.snapshot.json"))
    if role == "snapshot":
        return snap
    tv = snap.signed.meta["targets.json"].version
    md = Metadata.from_bytes(repo.store.get(f"{MD}{tv}.targets.json"))
    assert isinstance(md.signed, kind)
    return md


def refused(client: ChannelClient, reason: str) -> ChannelVerificationError:
    with pytest.raises(VerificationError) as info:
        client.refresh()
        client.download(client.active_version() or 1)
    assert isinstance(info.value, ChannelVerificationError)
    assert info.value.reason == reason, str(info.value)
    return info.value


def trusted_version(client: ChannelClient, role: str) -> int:
    """The version of ``role`` the device keeps as trusted on disk."""
    return Metadata.from_file(str(client.metadata_dir / f"{role}.json")).signed.version


class SpyStore:
    """Records every bounded get (key, max_bytes, bytes returned or the error)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.gets: list[tuple[str, int | None, int | str]] = []

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        try:
            data = self.inner.get(key, max_bytes=max_bytes)
        except StoreError as exc:
            self.gets.append((key, max_bytes, type(exc).__name__))
            raise
        self.gets.append((key, max_bytes, len(data)))
        return data

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.inner.put(key, data, if_absent=if_absent)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "", **kwargs: Any) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix, **kwargs)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def copy(self, src_key: str, dst_key: str) -> None:
        self.inner.copy(src_key, dst_key)


# ----------------------------------------------------------------------------- happy path


def test_publish_v1_v2_device_downloads_exactly_v2(
    repo: ChannelRepository, device: Callable[..., ChannelClient]
) -> None:
    assert repo.publish(1, V1, {"base": None}) is True
    client = device(repo)
    client.refresh()
    assert client.active_version() == 1
    assert client.download(1) == V1

    assert repo.publish(2, V2, {"rollback_of": 1}) is True
    client.refresh()
    assert client.active_version() == 2
    assert client.download(2) == V2
    assert client.download(1) == V1  # older versions stay listed and verifiable
    info = client.package_info(2)
    assert info == {"version": 2, "rollback_of": 1, "files": sorted(V2)}
    version, files = client.download_active()
    assert (version, files) == (2, V2)

    # The bucket holds TUF's consistent-snapshot layout, nothing hand-rolled.
    keys = {o.key for o in repo.store.list("tuf/")}
    status = repo.status()
    assert status.active_version == 2 and status.versions == (1, 2)
    assert {f"{MD}1.root.json", f"{MD}timestamp.json"} <= keys
    for v in range(1, status.targets_version + 1):
        assert f"{MD}{v}.targets.json" in keys and f"{MD}{v}.snapshot.json" in keys
    assert not any(k.endswith(("/targets.json", "/snapshot.json", "/root.json")) for k in keys)
    for name, data in V2.items():
        assert f"{TG}v00000002/{hashlib.sha256(data).hexdigest()}.{name}" in keys
    ts = Metadata[Timestamp].from_bytes(repo.store.get(MD + "timestamp.json")).signed
    assert ts.version == status.timestamp_version == 3  # init, v1, v2
    assert ts.snapshot_meta.length and ts.snapshot_meta.hashes  # bounded and pinned

    # A fresh device pinned to root v1 gets the same answer from scratch.
    other = device(repo)
    assert other.active_version() == 2
    assert other.download(2) == V2


def test_versions_only_go_up_and_republish_is_idempotent(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    repo = ChannelRepository(store, ChannelKeys.generate(tmp_path / "keys"))
    assert repo.init() is True
    assert repo.init() is False
    repo.publish(1, V1, {"n": 1})
    repo.publish(2, V2)
    before = repo.status()

    assert repo.publish(2, V2) is False  # identical: nothing written
    assert repo.publish(1, V1, {"n": 1}) is False  # identical older version: still a no-op
    assert repo.status() == before
    with pytest.raises(ChannelError, match="other content"):
        repo.publish(2, {**V2, "model.onnx": b"different"})
    with pytest.raises(ChannelError, match="other content"):
        repo.publish(1, V1, {"n": 2})
    repo.publish(5, V1, {"rollback_of": 2})
    with pytest.raises(ChannelError, match="only go up"):
        repo.publish(3, V2)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            repo.publish(6, {bad: b"x"})
    with pytest.raises(ValueError):
        repo.publish(6, V1, {"files": []})
    with pytest.raises(ValueError):
        repo.publish(0, V1)
    assert repo.status().active_version == 5


# ----------------------------------------------------------------------------- refusals


def test_replayed_older_metadata_is_refused_and_v2_stays_trusted(
    repo: ChannelRepository, device: Callable[..., ChannelClient]
) -> None:
    store = repo.store
    repo.publish(1, V1)
    old = {o.key: store.get(o.key) for o in store.list(MD)}  # the whole v1 metadata state
    repo.publish(2, V2)
    current = {o.key: store.get(o.key) for o in store.list(MD)}
    client = device(repo)
    client.refresh()
    assert client.active_version() == 2
    trusted_ts = trusted_version(client, "timestamp")

    for key, data in old.items():  # attacker writes the v1 state back
        store.put(key, data)
    err = refused(client, "rollback")
    assert "replayed older version" in str(err)
    assert trusted_version(client, "timestamp") == trusted_ts  # v2 state kept on disk

    # Old targets bytes served under the new targets' name: the snapshot pins the hash.
    store.put(MD + "timestamp.json", current[MD + "timestamp.json"])
    snap = _current(repo, "snapshot", Snapshot).signed
    tv = snap.meta["targets.json"].version
    real_targets = store.get(f"{MD}{tv}.targets.json")
    store.put(f"{MD}{tv}.targets.json", old[f"{MD}{tv - 1}.targets.json"])
    refused(device(repo), "mismatch")  # a device without a cached targets.json fetches it

    store.put(f"{MD}{tv}.targets.json", real_targets)  # honest state back: device recovers
    client.refresh()
    assert client.active_version() == 2
    assert client.download(2) == V2

    # The repository notices a replayed timestamp.json in its own bucket (it names an
    # older snapshot than exists) and re-issues one above anything devices have seen.
    store.put(MD + "timestamp.json", old[MD + "timestamp.json"])
    repo.publish(3, V1)
    client.refresh()
    assert client.active_version() == 3
    assert trusted_version(client, "timestamp") > trusted_ts


def test_expired_timestamp_is_refused(
    s3_bucket: S3Store,
    keys: ChannelKeys,
    device: Callable[..., ChannelClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (a) The repository stopped re-signing two days ago: its 1-day timestamp expired.
    two_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    frozen = ChannelRepository(s3_bucket, keys, clock=lambda: two_days_ago)
    frozen.init()
    frozen.publish(1, V1)
    client = device(frozen)
    err = refused(client, "expired")
    assert "metadata expired" in str(err) and "timestamp" in str(err)

    live = ChannelRepository(s3_bucket, keys)
    assert live.refresh_timestamp() == ["timestamp"]  # the periodic task heals it
    assert live.refresh_timestamp() == []  # nothing due any more
    client.refresh()
    assert client.active_version() == 1

    # (b) Freeze attack: a mirror keeps serving this valid metadata; two days later
    # (device clock moved forward) the same bytes are refused.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)

    class _Later(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> _Later:  # type: ignore[override]
            return cls.fromtimestamp(later.timestamp(), tz)

    monkeypatch.setattr(
        trusted_metadata_set, "datetime", SimpleNamespace(datetime=_Later, timezone=dt.timezone)
    )
    refused(client, "expired")


def test_replaced_target_bytes_hash_mismatch(
    repo: ChannelRepository, device: Callable[..., ChannelClient]
) -> None:
    repo.publish(1, V1)
    key = target_key(repo, target_path(1, "weights.bin"))
    repo.store.put(key, b"\xff" * len(V1["weights.bin"]))  # same length, other bytes
    client = device(repo)
    client.refresh()
    with pytest.raises(ChannelVerificationError, match="length or hash mismatch") as info:
        client.download(1)
    assert info.value.reason == "mismatch"
    cached = {p.name for p in client.targets_dir.iterdir()}
    assert "v00000001%2Fweights.bin" not in cached  # nothing unverified lands in the cache
    assert "v00000001%2Fmodel.onnx" in cached  # verified siblings do


def test_endless_data_is_cut_off_without_reading_it(
    repo: ChannelRepository, device: Callable[..., ChannelClient]
) -> None:
    repo.publish(1, V1)
    info = _current(repo, "targets", Targets).signed.targets[target_path(1, "model.onnx")]
    key = repo.layout.target_key(info)
    repo.store.put(key, os.urandom(8 * 1024 * 1024))  # 8 MiB where 700 bytes are signed
    spy = SpyStore(repo.store)
    client = device(repo, store=spy)
    with pytest.raises(ChannelVerificationError, match="endless data") as err:
        client.download(1)
    assert err.value.reason == "mismatch"
    # The fetcher asked the store for at most the signed length and got an error, not data.
    assert (key, info.length, "ObjectTooLarge") in spy.gets
    assert all(n != 8 * 1024 * 1024 for _, _, n in spy.gets)

    # Endless metadata too: timestamp.json is capped by ngclient's fixed limit.
    repo.store.put(MD + "timestamp.json", b"{" * (1024 * 1024))
    spy.gets.clear()
    refused(client, "mismatch")
    assert spy.gets[-1] == (MD + "timestamp.json", 16384, "ObjectTooLarge")


@pytest.mark.parametrize("forged_role", ["timestamp", "targets"])
def test_metadata_signed_by_unknown_key_is_refused(
    repo: ChannelRepository, device: Callable[..., ChannelClient], forged_role: str
) -> None:
    repo.publish(1, V1)
    client = device(repo)
    client.refresh()
    store, keys, attacker = repo.store, repo.keys, generate_signer()
    ts = _current(repo, "timestamp", Timestamp)
    if forged_role == "timestamp":
        ts.signed.version += 1
        ts.sign(attacker)
    else:
        # Even with the online snapshot/timestamp keys stolen, targets need the targets key.
        targets = _current(repo, "targets", Targets)
        targets.signed.version += 1
        evil = b"evil model"
        targets.signed.targets[target_path(9, "model.onnx")] = TargetFile.from_data(
            target_path(9, "model.onnx"), evil
        )
        targets.sign(attacker)
        tbytes = targets.to_bytes()
        store.put(f"{MD}{targets.signed.version}.targets.json", tbytes)
        snap = _current(repo, "snapshot", Snapshot)
        snap.signed.version += 1
        snap.signed.meta["targets.json"] = MetaFile.from_data(
            targets.signed.version, tbytes, ["sha256"]
        )
        snap.sign(keys.snapshot)
        sbytes = snap.to_bytes()
        store.put(f"{MD}{snap.signed.version}.snapshot.json", sbytes)
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile.from_data(snap.signed.version, sbytes, ["sha256"])
        ts.sign(keys.timestamp)
    store.put(MD + "timestamp.json", ts.to_bytes())
    err = refused(client, "unsigned")
    assert "unsigned by a trusted key" in str(err) and forged_role in str(err)


def test_files_mixed_from_two_versions_are_refused(
    repo: ChannelRepository, device: Callable[..., ChannelClient]
) -> None:
    repo.publish(1, V1)
    repo.publish(2, V2)
    v1_key = target_key(repo, target_path(1, "weights.bin"))
    v2_key = target_key(repo, target_path(2, "weights.bin"))
    repo.store.copy(v1_key, v2_key)  # v1's weights served under v2's path
    client = device(repo)
    with pytest.raises(ChannelVerificationError, match="length or hash mismatch"):
        client.download(2)
    assert client.download(1) == V1


def test_unlisted_file_cannot_be_downloaded(
    repo: ChannelRepository, device: Callable[..., ChannelClient]
) -> None:
    repo.publish(1, V1)
    evil = b"#!/bin/sh\nrm -rf /\n"
    for key in (
        f"{TG}v00000001/evil.bin",
        f"{TG}v00000001/{hashlib.sha256(evil).hexdigest()}.evil.bin",
    ):
        repo.store.put(key, evil)
    client = device(repo)
    assert client.download(1) == V1  # exactly the signed file list, nothing else
    with pytest.raises(ChannelVerificationError, match="not listed") as err:
        client.fetch_target(target_path(1, "evil.bin"))
    assert err.value.reason == "unlisted"
    with pytest.raises(ChannelVerificationError, match="not in the signed channel"):
        client.download(7)
    # The fetcher itself never leaves the channel's prefixes.
    fetcher = StoreFetcher(repo.store, (MD, TG))
    for url in ("store:///secrets/key.pem", "store:///tuf/metadata/../../x", "http://h/x"):
        with pytest.raises(Exception, match=r"outside|bad channel key|not a channel URL"):
            fetcher.key_for(url)


def test_root_rotation_is_walked_and_forged_roots_are_refused(
    repo: ChannelRepository, device: Callable[..., ChannelClient], keys: ChannelKeys
) -> None:
    repo.publish(1, V1)
    client = device(repo)
    client.refresh()
    assert client.root_version == 1
    old_root_keys = list(keys.root)

    new_root_keys = [generate_signer("ecdsa") for _ in range(3)]
    assert repo.rotate_root(new_root_keys, threshold=2) == 2
    assert {s.public_key.keyid for s in ChannelKeys.load(keys.keys_dir).root} == {  # type: ignore[arg-type]
        s.public_key.keyid for s in new_root_keys
    }
    repo.publish(2, V2)
    client.refresh()
    assert (client.root_version, client.active_version()) == (2, 2)
    fresh = device(repo)  # pinned to 1.root.json, walks 1 -> 2
    assert fresh.download(2) == V2 and fresh.root_version == 2

    root2 = Metadata[Root].from_bytes(repo.root_bytes(2))

    def forge(signers: list[Any]) -> bytes:
        attacker = [generate_signer() for _ in range(3)]
        root = copy.deepcopy(root2.signed)
        root.version = 3
        for keyid in list(root.roles["root"].keyids):
            root.revoke_key(keyid, "root")
        for s in attacker:
            root.add_key(s.public_key, "root")
        md = Metadata(root)
        for s in [*attacker, *signers]:
            md.sign(s, append=True)
        return md.to_bytes()

    # Signed by the attacker's new keys plus one real root key: below the threshold of 2.
    repo.store.put(MD + "3.root.json", forge([new_root_keys[0]]))
    refused(client, "unsigned")
    # Signed by a threshold of the *retired* root keys: they are no longer trusted.
    repo.store.put(MD + "3.root.json", forge(old_root_keys[:2]))
    refused(device(repo), "unsigned")
    assert client.root_version == 2

    # The repository itself refuses to write a root the old threshold did not sign.
    repo.store.delete(MD + "3.root.json")
    short = ChannelRepository(
        repo.store,
        ChannelKeys(new_root_keys[:1], keys.targets, keys.snapshot, keys.timestamp),
    )
    with pytest.raises(ChannelError, match="would not verify"):
        short.rotate_root([generate_signer() for _ in range(3)], threshold=2)
    client.refresh()
    assert client.download(2) == V2


def test_online_key_rotation(
    repo: ChannelRepository, device: Callable[..., ChannelClient], keys: ChannelKeys
) -> None:
    repo.publish(1, V1)
    client = device(repo)
    client.refresh()
    retired = keys.timestamp
    new = repo.rotate_online_key("timestamp")
    assert ChannelKeys.load(keys.keys_dir).timestamp.public_key.keyid == new.public_key.keyid  # type: ignore[arg-type]
    repo.rotate_online_key("targets")
    repo.publish(2, V2)
    client.refresh()
    assert (client.root_version, client.active_version()) == (3, 2)
    assert client.download(2) == V2

    ts = _current(repo, "timestamp", Timestamp)  # the retired key can no longer sign
    ts.signed.version += 1
    ts.sign(retired)
    repo.store.put(MD + "timestamp.json", ts.to_bytes())
    refused(client, "unsigned")
    assert repo.refresh_timestamp(force=True) == ["timestamp"]  # the server heals it
    client.refresh()
    assert client.active_version() == 2

    # A crash after root v4 names the new snapshot key, before the key file is swapped:
    # the staged key is on disk and the next run finishes the rotation by itself.
    def crash(*args: Any) -> None:
        raise RuntimeError("power cut")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChannelKeys, "replace_online", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            repo.rotate_online_key("snapshot")
    assert keys.keys_dir is not None and (keys.keys_dir / "snapshot.next.pem").exists()
    restarted = ChannelRepository(repo.store, ChannelKeys.load(keys.keys_dir))
    restarted.publish(3, V1)
    assert not (keys.keys_dir / "snapshot.next.pem").exists()
    client.refresh()
    assert (client.root_version, client.active_version()) == (4, 3)


# ----------------------------------------------------------------------------- transport


def test_same_client_over_a_local_directory(
    repo: ChannelRepository, device: Callable[..., ChannelClient], tmp_path: Path
) -> None:
    repo.publish(1, V1)
    repo.publish(2, V2)
    mirror = LocalStore(tmp_path / "usb")  # an air-gap copy of the channel prefix
    for obj in repo.store.list("tuf/"):
        mirror.put(obj.key, repo.store.get(obj.key))
    client = device(repo, store=tmp_path / "usb")  # a path: LocalStore underneath
    assert client.active_version() == 2
    assert client.download(2) == V2
    mirror.put(target_key(repo, target_path(2, "model.onnx")), b"tampered")
    with pytest.raises(ChannelVerificationError):
        device(repo, store=mirror).download(2)

    # A repository written straight into a directory, with ECDSA keys and other prefixes.
    layout = ChannelLayout(metadata_prefix="chan/meta/", targets_prefix="chan/files/")
    local = ChannelRepository(
        LocalStore(tmp_path / "dir"),
        ChannelKeys.generate(tmp_path / "ecdsa-keys", scheme="ecdsa"),
        layout=layout,
    )
    local.init()
    local.publish(3, V1)
    c = ChannelClient(
        tmp_path / "dir", tmp_path / "m", tmp_path / "t", local.root_bytes(), layout=layout
    )
    assert c.download_active() == (3, V1)


def test_unreachable_or_empty_store_is_a_store_error(
    repo: ChannelRepository, device: Callable[..., ChannelClient], s3_config: S3Config
) -> None:
    repo.publish(1, V1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = S3Store(
        repo.store.bucket,  # type: ignore[attr-defined]
        S3Config(
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key=s3_config.access_key,
            secret_key=s3_config.secret_key,
            max_attempts=1,
            connect_timeout=0.5,
            read_timeout=0.5,
        ),
    )
    with pytest.raises(StoreError) as info:
        device(repo, store=dead).refresh()
    assert not isinstance(info.value, VerificationError)
    assert "unreachable" in str(info.value)

    empty = S3Store(repo.store.bucket + "-none", s3_config)  # type: ignore[attr-defined]
    empty.ensure_bucket()
    with pytest.raises(NoSuchKey):
        device(repo, store=empty).refresh()


def test_keys_are_private_files_and_round_trip(tmp_path: Path) -> None:
    keys = ChannelKeys.generate(tmp_path / "k", scheme="ecdsa")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    files = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert files[-3:] == ["snapshot.pem", "targets.pem", "timestamp.pem"]
    assert sum(name.startswith("root-") for name in files) == 3
    for path in (tmp_path / "k").glob("*.pem"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = ChannelKeys.load(tmp_path / "k")
    assert loaded.targets.public_key == keys.targets.public_key
    assert loaded.targets.public_key.scheme == "ecdsa-sha2-nistp256"
    assert {s.public_key.keyid for s in loaded.root} == {s.public_key.keyid for s in keys.root}

    # Root keys kept offline: the server still loads and publishes with the online ones.
    repo = ChannelRepository(LocalStore(tmp_path / "b"), keys)
    repo.init()
    for path in (tmp_path / "k").glob("root-*.pem"):
        path.unlink()
    online_only = ChannelKeys.load(tmp_path / "k")
    assert online_only.root == []
    ChannelRepository(LocalStore(tmp_path / "b"), online_only).publish(1, V1)
    with pytest.raises(ChannelError, match="offline"):
        ChannelRepository(LocalStore(tmp_path / "b"), online_only).rotate_online_key("targets")

    (tmp_path / "k" / "targets.pem").chmod(0o644)
    with pytest.raises(ChannelError, match="chmod 600"):
        ChannelKeys.load(tmp_path / "k")
    # Another deployment's keys are refused rather than forking the channel.
    with pytest.raises(ChannelError, match="not trusted by root"):
        ChannelRepository(LocalStore(tmp_path / "b"), ChannelKeys.generate()).publish(2, V2)
    root1 = json.loads(LocalStore(tmp_path / "b").get(f"{MD}1.root.json"))["signed"]
    assert root1["roles"]["root"]["threshold"] == 2 and root1["consistent_snapshot"] is True
    assert ACTIVE_TARGET == "active.json" and manifest_path(1) == "v00000001.json"

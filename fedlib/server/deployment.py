"""One deployment's server-side handles: buckets, keys, fleet, holdout, registry.

Used by ``fl-admin``, the Airflow DAGs and the benchmarks, so all of them agree on
where things live. Private keys come from ``settings.keys_dir`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, x25519

from fedlib.crypto import pq_signing, sealing, signing
from fedlib.crypto.signing import key_id as signing_key_id
from fedlib.files import atomic_write
from fedlib.models.evaluation import split_holdout
from fedlib.server import privacy, state_keys
from fedlib.server.fleet import Fleet
from fedlib.server.records import HoldoutPointer, HoldoutSplitKey
from fedlib.server.registry import ModelRegistry
from fedlib.server.settings import ServerSettings
from fedlib.storage.store import NoSuchKey, ObjectExists, ObjectStore, S3Config, S3Store
from fedlib.trust.channel_repository import ChannelKeys, ChannelRepository


def signing_private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


PACKAGE_KEY_FILE = "package-signing-p256.pem"  # OpenSSF model-signing (ECDSA P-256)
PACKAGE_PQ_KEY_FILE = "package-signing-mldsa65.pem"  # hybrid signatures (ML-DSA-65)
CHANNEL_KEYS_DIR = "channel"  # TUF roles; root keys belong offline in production
SERVER_KEY_GLOB = "server-hpke-*.pem"
SERVER_KEY_CURRENT = "server-hpke-current"  # key id devices are told to seal to
PUBLIC_DIR = "public"  # public halves only: all a read-only process (web UI) needs
PACKAGE_TRUST_GLOB = "package-signing-*.pub.pem"  # in PUBLIC_DIR: keys versions verify with


#: What a holdout's optional anomaly class may be called (it lands in reports and pages).
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Most distinct anomaly classes a holdout may label (each is one check of the gate).
MAX_CLASSES = 64


@dataclass(frozen=True)
class Holdout:
    """The labeled evaluation set the server holds (never sent to devices).

    ``classes`` optionally names each anomalous row's class ("" on benign rows and on
    anomalies of no known class): the gate then also compares detection class by class,
    so a candidate that forgets one pattern is refused even when its AUC holds."""

    features: np.ndarray
    labels: np.ndarray
    feature_names: list[str]
    version: int | None = None
    classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.classes is not None:
            check_classes(self.classes, self.labels)

    def benign(self) -> np.ndarray:
        return self.features[self.labels == 0]

    def rows(self, index: np.ndarray) -> Holdout:
        """The holdout restricted to rows ``index`` (same version and feature names)."""
        return dataclasses.replace(
            self,
            features=self.features[index],
            labels=self.labels[index],
            classes=None if self.classes is None else self.classes[index],
        )

    def split(self, key: bytes, fraction: float) -> HoldoutParts:
        """Its calibration and evaluation parts (the one split: ``split_holdout``)."""
        cal, ev = split_holdout(
            self.features, self.labels, self.classes, key=key, fraction=fraction
        )
        return HoldoutParts(calibration=self.rows(cal), evaluation=self.rows(ev))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {
            "holdout_X": self.features.astype(np.float32),
            "holdout_y": self.labels.astype(np.int8),
            "feature_names": np.asarray(self.feature_names, dtype=str),
        }
        if self.classes is not None:
            arrays["holdout_class"] = np.asarray(self.classes, dtype=str)
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holdout:
        """Read ``holdout_X``/``holdout_y`` (and ``feature_names``); the optional class of
        each row is ``holdout_class`` (names), or ``anomaly_type`` codes with their
        ``anomaly_type_names`` (the layout of ``bench.make_dataset``)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            x = np.asarray(npz["holdout_X"], dtype=np.float32)
            y = np.asarray(npz["holdout_y"]).astype(np.int8)
            names = (
                [str(n) for n in npz["feature_names"]]
                if "feature_names" in npz.files
                else [f"f{i}" for i in range(x.shape[1])]
            )
            classes = _classes_of(npz, y)
        if x.ndim != 2 or y.shape != (x.shape[0],) or not set(np.unique(y)) <= {0, 1}:
            raise ValueError("holdout needs holdout_X (N, d) and holdout_y (N,) in {0, 1}")
        return cls(x, y, names, classes=classes)


@dataclass(frozen=True)
class HoldoutParts:
    """A holdout split in two disjoint parts: ``calibration`` fits (threshold, FLTrust
    reference) and decides (the gate, the rollback check); ``evaluation`` is what every
    published figure is computed on."""

    calibration: Holdout
    evaluation: Holdout


def _classes_of(npz: Any, labels: np.ndarray) -> np.ndarray | None:
    if "holdout_class" in npz.files:
        return np.asarray(npz["holdout_class"]).astype(str)
    if "anomaly_type" not in npz.files or "anomaly_type_names" not in npz.files:
        return None
    codes = np.asarray(npz["anomaly_type"])
    type_names = [str(n) for n in npz["anomaly_type_names"]]
    if codes.shape != labels.shape or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError("anomaly_type needs one integer code per holdout row")
    if codes.size and (codes.min() < 0 or codes.max() >= len(type_names)):
        raise ValueError("anomaly_type has codes without a name in anomaly_type_names")
    named = np.asarray(type_names, dtype=str)[codes]
    return np.where(labels == 1, named, "")


def check_classes(classes: np.ndarray, labels: np.ndarray) -> None:
    """A class per row, none on benign rows, bounded names and count (ValueError)."""
    if classes.shape != labels.shape:
        raise ValueError("holdout_class needs one entry per holdout row")
    if (classes[labels == 0] != "").any():
        raise ValueError("holdout_class names a class on a benign row")
    found = {str(c) for c in np.unique(classes[labels == 1])} - {""}
    if len(found) > MAX_CLASSES:
        raise ValueError(f"holdout_class has {len(found)} classes, limit {MAX_CLASSES}")
    bad = sorted(c for c in found if not CLASS_NAME.match(c))
    if bad:
        raise ValueError(f"holdout class name {bad[0][:80]!r} is not [A-Za-z0-9_.-], 1-64")


class Deployment:
    def __init__(self, settings: ServerSettings, s3: S3Config | None = None) -> None:
        self.settings = settings
        self.s3 = s3 or settings.s3()
        # holdout version -> its parts: versions are write-once and digest-checked and
        # the split key is written once, so a version splits the same for the process
        self._holdout_parts: dict[int, HoldoutParts] = {}

    def store(self, bucket: str) -> ObjectStore:
        return S3Store(bucket, self.s3)

    @cached_property
    def inbox(self) -> ObjectStore:
        return self.store(self.settings.inbox_bucket)

    @cached_property
    def models(self) -> ObjectStore:
        return self.store(self.settings.models_bucket)

    @cached_property
    def state(self) -> ObjectStore:
        return self.store(self.settings.state_bucket)

    def ensure_buckets(self) -> None:
        for bucket in (
            self.settings.inbox_bucket,
            self.settings.models_bucket,
            self.settings.state_bucket,
            self.settings.airgap_bucket,
        ):
            S3Store(bucket, self.s3).ensure_bucket()

    # -- keys -------------------------------------------------------------------------

    @property
    def keys_dir(self) -> Path:
        return Path(self.settings.keys_dir)

    def ensure_keys(self) -> None:
        """Create the package-signing key, the channel keys and a first HPKE key if absent."""
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (self.keys_dir / PACKAGE_KEY_FILE).exists():
            atomic_write(
                self.keys_dir / PACKAGE_KEY_FILE,
                signing_private_pem(signing.generate_signing_key()),
                mode=0o600,
            )
        self._trust_package_key(self.package_signing_key().public_key())
        pq_path = self.keys_dir / PACKAGE_PQ_KEY_FILE
        if self.settings.package_pq_signatures and not pq_path.exists():
            key = pq_signing.generate_key()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            atomic_write(pq_path, pem, mode=0o600)
            self._trust_package_key(key.public_key())
        ChannelKeys.load_or_generate(self.keys_dir / CHANNEL_KEYS_DIR)
        if not list(self.keys_dir.glob(SERVER_KEY_GLOB)):
            self.add_server_key()
        privacy.load_noise_secret(self.keys_dir)  # DP noise seed: made here, the one writer

    # HPKE (update decryption) keys: every file is accepted; one is current.

    def add_server_key(self, suite: str | None = None, *, make_current: bool = True) -> str:
        """A new HPKE key (``settings.hpke_suite`` by default); older keys keep opening
        what was sealed to them until they are retired."""
        key = sealing.generate_encryption_key(suite or self.settings.hpke_suite)
        kid = sealing.key_id(key)
        sealing.write_private_key(self.keys_dir / f"server-hpke-{kid}.pem", key)
        if make_current:
            atomic_write(self.keys_dir / SERVER_KEY_CURRENT, kid.encode() + b"\n", mode=0o600)
        return kid

    def server_keyring(self) -> sealing.ServerKeyring:
        ring = sealing.ServerKeyring()
        for path in sorted(self.keys_dir.glob(SERVER_KEY_GLOB)):
            key = sealing.load_private_pem(path.read_bytes())
            if isinstance(key, x25519.X25519PrivateKey | sealing.HybridPrivateKey):
                ring.add(key)
        if not ring:
            raise FileNotFoundError(f"no server HPKE keys in {self.keys_dir}")
        return ring

    def current_server_key_id(self) -> str:
        """The key new and updated devices seal to (the newest file if none is marked)."""
        marker = self.keys_dir / SERVER_KEY_CURRENT
        if marker.exists():
            kid = marker.read_text().strip()
            if (self.keys_dir / f"server-hpke-{kid}.pem").exists():
                return kid
        paths = sorted(self.keys_dir.glob(SERVER_KEY_GLOB), key=lambda p: p.stat().st_mtime)
        if not paths:
            raise FileNotFoundError(f"no server HPKE keys in {self.keys_dir}")
        return paths[-1].name.removeprefix("server-hpke-").removesuffix(".pem")

    def current_server_public_key(self) -> sealing.EncryptionPublicKey:
        kid = self.current_server_key_id()
        key = self.server_keyring().get(kid)
        if key is None:
            raise FileNotFoundError(f"the current server key {kid} is not in {self.keys_dir}")
        return key.public_key()

    def retire_server_key(self, kid: str) -> None:
        """Delete an HPKE private key: what was sealed to it can no longer be opened."""
        if kid == self.current_server_key_id():
            raise ValueError(f"{kid} is the current server key: rotate first")
        path = self.keys_dir / f"server-hpke-{kid}.pem"
        if not path.exists():
            raise FileNotFoundError(f"no server key {kid} in {self.keys_dir}")
        path.unlink()

    # Package-signing (OpenSSF model-signing) keys: one private, several trusted.

    def package_signing_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(
            (self.keys_dir / PACKAGE_KEY_FILE).read_bytes(), password=None
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{PACKAGE_KEY_FILE} is not an ECDSA key")
        return key

    def package_pq_signing_key(self) -> mldsa.MLDSA65PrivateKey | None:
        """The ML-DSA-65 key of hybrid package signatures (None: not configured)."""
        path = self.keys_dir / PACKAGE_PQ_KEY_FILE
        if not path.exists():
            return None
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, mldsa.MLDSA65PrivateKey):
            raise ValueError(f"{PACKAGE_PQ_KEY_FILE} is not an ML-DSA-65 key")
        return key

    def _trust_package_key(self, public: pq_signing.PackageKey) -> str:
        kid = pq_signing.any_key_id(public)
        public_dir = self.keys_dir / PUBLIC_DIR
        public_dir.mkdir(parents=True, exist_ok=True)
        tag = "mldsa65-" if isinstance(public, mldsa.MLDSA65PublicKey) else ""
        path = public_dir / f"package-signing-{tag}{kid[:16]}.pub.pem"
        if not path.exists():
            atomic_write(path, pq_signing.public_pem(public), mode=0o644)
        return kid

    def trusted_package_keys(
        self, *, include_retired: bool = False
    ) -> dict[str, pq_signing.PackageKey]:
        """Keys devices trust for new installs (ECDSA; ML-DSA-65 with hybrid signatures);
        ``include_retired`` adds the retired ones,
        with which the server still verifies the versions they signed (its history).
        Public files only, no private key read (older deployments without ``public/``:
        the private key's public half)."""
        keys: dict[str, pq_signing.PackageKey] = {}
        public_dir = self.keys_dir / PUBLIC_DIR
        paths = sorted(public_dir.glob(PACKAGE_TRUST_GLOB))
        if include_retired:
            paths += sorted((public_dir / "retired").glob(PACKAGE_TRUST_GLOB))
        for path in paths:
            public = pq_signing.load_public_key(path.read_bytes())
            keys[pq_signing.any_key_id(public)] = public
        if not keys:
            public = self.package_signing_key().public_key()
            keys[signing_key_id(public)] = public
        return keys

    def rotate_package_key(self) -> tuple[str, str]:
        """New package-signing key; the old one stays trusted (old versions verify)
        until :meth:`untrust_package_key`. Returns (old key id, new key id)."""
        old = self.package_signing_key()
        old_kid = self._trust_package_key(old.public_key())
        new = signing.generate_signing_key()
        new_kid = self._trust_package_key(new.public_key())  # trusted before it signs
        atomic_write(self.keys_dir / PACKAGE_KEY_FILE, signing_private_pem(new), mode=0o600)
        return old_kid, new_kid

    def untrust_package_key(self, kid: str) -> None:
        """Devices stop trusting an old package-signing key (never the one that signs
        now); its public half moves to ``public/retired/`` for the server's history."""
        if kid == signing_key_id(self.package_signing_key().public_key()):
            raise ValueError(f"{kid} is the current package-signing key: rotate first")
        matches = [
            p
            for p in (self.keys_dir / PUBLIC_DIR).glob(PACKAGE_TRUST_GLOB)
            if pq_signing.any_key_id(pq_signing.load_public_key(p.read_bytes())) == kid
        ]
        if not matches:
            raise FileNotFoundError(f"package-signing key {kid} is not trusted here")
        retired = self.keys_dir / PUBLIC_DIR / "retired"
        retired.mkdir(exist_ok=True)
        for path in matches:
            os.replace(path, retired / path.name)

    def channel_keys(self) -> ChannelKeys:
        return ChannelKeys.load(self.keys_dir / CHANNEL_KEYS_DIR)

    def registry(self, *, signing: bool = False) -> ModelRegistry:
        """Verified reads with public keys only; publishing only with ``signing=True``."""
        # The server checks its own history with the OpenSSF keys; the ML-DSA signature
        # is for devices (versions from before it was enabled have none).
        classic, _ = pq_signing.split(self.trusted_package_keys(include_retired=True))
        return ModelRegistry(
            self.models,
            classic,
            self.channel_keys() if signing else None,
            signing_key=self.package_signing_key() if signing else None,
            pq_signing_key=self.package_pq_signing_key() if signing else None,
        )

    def channel_repository(self, *, signing: bool = False) -> ChannelRepository:
        """The model channel; read-only (no private key loaded) unless ``signing``."""
        return ChannelRepository(self.models, self.channel_keys() if signing else None)

    def init_channel(self) -> bool:
        return self.channel_repository(signing=True).init()

    def channel_root(self) -> bytes:
        """The current root.json: what an enrolled device pins."""
        return self.channel_repository().root_bytes()

    # -- fleet and holdout ---------------------------------------------------------------

    def load_fleet(self) -> Fleet:
        try:
            return Fleet.from_json(self.state.get(state_keys.FLEET))
        except NoSuchKey:
            return Fleet()

    def save_fleet(self, fleet: Fleet) -> None:
        self.state.put(state_keys.FLEET, fleet.to_json())

    def holdout_version(self) -> int | None:
        try:
            return self._holdout_pointer(None).version
        except NoSuchKey:
            return None

    def _holdout_pointer(self, version: int | None) -> HoldoutPointer:
        key = state_keys.HOLDOUT_POINTER if version is None else state_keys.holdout_pointer(version)
        return HoldoutPointer.from_json(self.state.get(key, max_bytes=4096), what=key)

    def load_holdout(self, version: int | None = None) -> Holdout:
        """A holdout version (default: current), checked against the digest recorded for it."""
        pointer = self._holdout_pointer(version)
        data = self.state.get(pointer.key)
        if hashlib.sha256(data).hexdigest() != pointer.sha256:
            raise ValueError(f"holdout {pointer.key} does not match its recorded digest")
        holdout = Holdout.from_bytes(data)
        return dataclasses.replace(holdout, version=pointer.version)

    def holdout_split_key(self) -> bytes:
        """The split's key (made at the first use, once: the first writer wins)."""
        try:
            data = self.state.get(state_keys.HOLDOUT_SPLIT_KEY, max_bytes=4096)
        except NoSuchKey:
            fresh = HoldoutSplitKey(key=os.urandom(32).hex())
            with contextlib.suppress(ObjectExists):  # another process made it first
                self.state.put(state_keys.HOLDOUT_SPLIT_KEY, fresh.to_json(), if_absent=True)
            data = self.state.get(state_keys.HOLDOUT_SPLIT_KEY, max_bytes=4096)
        record = HoldoutSplitKey.from_json(data, what=state_keys.HOLDOUT_SPLIT_KEY)
        return bytes.fromhex(record.key)

    def holdout_parts(self, version: int | None = None) -> HoldoutParts:
        """A holdout version (default: current) split into calibration and evaluation
        (once per version and process: every shard of a round asks for the same one)."""
        resolved = self._holdout_pointer(version).version
        parts = self._holdout_parts.get(resolved)
        if parts is None:
            parts = self.load_holdout(resolved).split(
                self.holdout_split_key(), self.settings.holdout_calibration_fraction
            )
            self._holdout_parts[resolved] = parts
        return parts

    def save_holdout(self, holdout: Holdout) -> int:
        """Store a new holdout version (write-once) and make it current; returns its number.

        Refuses (ValueError) a holdout whose calibration or evaluation part would lack
        benign or anomalous rows: rounds could neither calibrate nor publish on it."""
        holdout.split(self.holdout_split_key(), self.settings.holdout_calibration_fraction)
        version = (self.holdout_version() or 0) + 1
        data = holdout.to_bytes()
        key = state_keys.holdout_data(version)
        self.state.put(key, data, if_absent=True)
        pointer = HoldoutPointer(version=version, key=key, sha256=hashlib.sha256(data).hexdigest())
        self.state.put(state_keys.holdout_pointer(version), pointer.to_json(), if_absent=True)
        self.state.put(state_keys.HOLDOUT_POINTER, pointer.to_json())
        return version

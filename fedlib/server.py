"""One deployment's server-side handles: buckets, keys, fleet, holdout, registry.

Used by ``fl-admin``, the Airflow DAGs and the benchmarks, so all of them agree on
where things live. Private keys come from ``settings.keys_dir`` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from fedlib import crypto, signing
from fedlib.channel import ChannelKeys, ChannelRepository
from fedlib.fleet import Fleet
from fedlib.registry import ModelRegistry
from fedlib.settings import ServerSettings
from fedlib.signing import key_id as signing_key_id
from fedlib.store import NoSuchKey, ObjectStore, S3Config, S3Store, atomic_write


def signing_private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


FLEET_KEY = "fleet/fleet.json"
HOLDOUT_POINTER = "holdout/current.json"
PACKAGE_KEY_FILE = "package-signing-p256.pem"  # OpenSSF model-signing (ECDSA P-256)
CHANNEL_KEYS_DIR = "channel"  # TUF roles; root keys belong offline in production
SERVER_KEY_GLOB = "server-hpke-*.pem"


@dataclass(frozen=True)
class Holdout:
    """The labeled evaluation set the server holds (never sent to devices)."""

    features: np.ndarray
    labels: np.ndarray
    feature_names: list[str]
    version: int | None = None

    def benign(self) -> np.ndarray:
        return self.features[self.labels == 0]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            holdout_X=self.features.astype(np.float32),
            holdout_y=self.labels.astype(np.int8),
            feature_names=np.asarray(self.feature_names, dtype=str),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holdout:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            x = np.asarray(npz["holdout_X"], dtype=np.float32)
            y = np.asarray(npz["holdout_y"]).astype(np.int8)
            names = (
                [str(n) for n in npz["feature_names"]]
                if "feature_names" in npz.files
                else [f"f{i}" for i in range(x.shape[1])]
            )
        if x.ndim != 2 or y.shape != (x.shape[0],) or not set(np.unique(y)) <= {0, 1}:
            raise ValueError("holdout needs holdout_X (N, d) and holdout_y (N,) in {0, 1}")
        return cls(x, y, names)


class Deployment:
    def __init__(self, settings: ServerSettings, s3: S3Config | None = None) -> None:
        self.settings = settings
        self.s3 = s3 or settings.s3()

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
        ChannelKeys.load_or_generate(self.keys_dir / CHANNEL_KEYS_DIR)
        if not list(self.keys_dir.glob(SERVER_KEY_GLOB)):
            self.add_server_key()

    def add_server_key(self) -> str:
        key = crypto.generate_encryption_key()
        kid = crypto.key_id(key)
        crypto.write_private_key(self.keys_dir / f"server-hpke-{kid}.pem", key)
        return kid

    def package_signing_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(
            (self.keys_dir / PACKAGE_KEY_FILE).read_bytes(), password=None
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{PACKAGE_KEY_FILE} is not an ECDSA key")
        return key

    def channel_keys(self) -> ChannelKeys:
        return ChannelKeys.load(self.keys_dir / CHANNEL_KEYS_DIR)

    def server_keyring(self) -> crypto.ServerKeyring:
        ring = crypto.ServerKeyring()
        for path in sorted(self.keys_dir.glob(SERVER_KEY_GLOB)):
            key = crypto.load_private_pem(path.read_bytes())
            if isinstance(key, x25519.X25519PrivateKey):
                ring.add(key)
        if not ring:
            raise FileNotFoundError(f"no server HPKE keys in {self.keys_dir}")
        return ring

    def current_server_public_key(self) -> x25519.X25519PublicKey:
        """The key new clients seal to: the newest file in the keys folder."""
        paths = sorted(self.keys_dir.glob(SERVER_KEY_GLOB), key=lambda p: p.stat().st_mtime)
        if not paths:
            raise FileNotFoundError(f"no server HPKE keys in {self.keys_dir}")
        key = crypto.load_private_pem(paths[-1].read_bytes())
        assert isinstance(key, x25519.X25519PrivateKey)
        return key.public_key()

    def registry(self, *, signing: bool = False) -> ModelRegistry:
        """Verified reads always; publishing only with ``signing=True``."""
        key = self.package_signing_key()
        public = key.public_key()
        return ModelRegistry(
            self.models,
            {signing_key_id(public): public},
            self.channel_keys(),
            signing_key=key if signing else None,
        )

    def init_channel(self) -> bool:
        return ChannelRepository(self.models, self.channel_keys()).init()

    def channel_root(self) -> bytes:
        """The current root.json: what an enrolled device pins."""
        return ChannelRepository(self.models, self.channel_keys()).root_bytes()

    # -- fleet and holdout ---------------------------------------------------------------

    def load_fleet(self) -> Fleet:
        try:
            return Fleet.from_json(self.state.get(FLEET_KEY))
        except NoSuchKey:
            return Fleet()

    def save_fleet(self, fleet: Fleet) -> None:
        self.state.put(FLEET_KEY, fleet.to_json())

    def holdout_version(self) -> int | None:
        try:
            pointer = json.loads(self.state.get(HOLDOUT_POINTER, max_bytes=4096))
        except NoSuchKey:
            return None
        return int(pointer["version"])

    def load_holdout(self, version: int | None = None) -> Holdout:
        """A holdout version (default: current), checked against the digest recorded for it."""
        pointer = json.loads(self.state.get(HOLDOUT_POINTER, max_bytes=4096))
        if version is not None and version != pointer["version"]:
            pointer = json.loads(self.state.get(f"holdout/v{version:06d}.json", max_bytes=4096))
        data = self.state.get(pointer["key"])
        if hashlib.sha256(data).hexdigest() != pointer["sha256"]:
            raise ValueError(f"holdout {pointer['key']} does not match its recorded digest")
        holdout = Holdout.from_bytes(data)
        return dataclasses.replace(holdout, version=int(pointer["version"]))

    def save_holdout(self, holdout: Holdout) -> int:
        """Store a new holdout version (write-once) and make it current; returns its number."""
        version = (self.holdout_version() or 0) + 1
        data = holdout.to_bytes()
        key = f"holdout/v{version:06d}.npz"
        self.state.put(key, data, if_absent=True)
        pointer = {"version": version, "key": key, "sha256": hashlib.sha256(data).hexdigest()}
        self.state.put(f"holdout/v{version:06d}.json", json.dumps(pointer).encode(), if_absent=True)
        self.state.put(HOLDOUT_POINTER, json.dumps(pointer).encode())
        return version

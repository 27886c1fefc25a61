"""The device's configuration file (written by ``fl-admin enroll``) and its state folder."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from client.calibration import CalibrationConfig
from client.logs import LogSettings, LogSource
from fedlib.crypto import pq_signing, sealing
from fedlib.files import atomic_write
from fedlib.storage.store import S3Config
from fedlib.trust.device_config import DeviceConfig
from fedlib.wire.protocol import ClientId


class S3Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None
    max_attempts: int = Field(default=3, ge=1, le=20)
    connect_timeout: float = Field(default=3.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)

    def to_store_config(self) -> S3Config:
        return S3Config(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key=self.access_key,
            secret_key=self.secret_key,
            max_attempts=self.max_attempts,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )


class PersonalizationSettings(BaseModel):
    """On-device calibration (client.calibration); it never leaves the device."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    false_alarm_rate: float = Field(default=0.01, gt=0.0, lt=0.5)  # of own benign windows
    global_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    outlier_fence: float | None = Field(default=None, gt=0.0)  # for known-dirty histories

    def calibration_config(self) -> CalibrationConfig:
        return CalibrationConfig(
            false_alarm_rate=self.false_alarm_rate,
            global_weight=self.global_weight,
            outlier_fence=self.outlier_fence,
        )


class ClientConfig(BaseModel):
    """Everything one device needs; holds no secret of the server's."""

    model_config = ConfigDict(extra="forbid")

    client_id: ClientId
    inbox_url: str = "s3://fl-inbox"
    models_url: str = "s3://fl-models"
    s3: S3Settings = Field(default_factory=S3Settings)
    server_public_key_pem: str  # the enrolment's; a newer signed device config wins
    require_post_quantum: bool = False  # never seal (or accept a config) without PQ
    package_signing_keys_pem: list[str] = Field(min_length=1)  # OpenSSF signing, P-256
    channel_root_json: str  # the pinned TUF root of the model channel
    #: Feature files (``*.npy``/``*.csv``), or ``log_sources``, or both: with log sources
    #: the device counts its own logs with the installed model's template vocabulary.
    features_dir: Path | None = None
    log_sources: list[LogSource] = Field(default_factory=list)
    logs: LogSettings = Field(default_factory=LogSettings)
    state_dir: Path
    key_path: Path | None = None
    one_update_per_version: bool = True
    personalization: PersonalizationSettings = Field(default_factory=PersonalizationSettings)

    @model_validator(mode="after")
    def _has_data(self) -> ClientConfig:
        if self.features_dir is None and not self.log_sources:
            raise ValueError("name features_dir or log_sources: the device needs local data")
        return self

    @property
    def signing_key_path(self) -> Path:
        return self.key_path or self.state_dir / "client_key.pem"

    def trusted_package_keys(self) -> dict[str, pq_signing.PackageKey]:
        """OpenSSF (ECDSA) keys, and ML-DSA-65 ones when packages must carry both."""
        keys = [pq_signing.load_public_key(pem.encode()) for pem in self.package_signing_keys_pem]
        return {pq_signing.any_key_id(k): k for k in keys}

    def checks_pq_package_signatures(self) -> bool:
        return bool(pq_signing.split(self.trusted_package_keys())[1])

    def server_public_key(self) -> sealing.EncryptionPublicKey:
        return sealing.load_encryption_public_key(self.server_public_key_pem.encode())

    def server_suite(self) -> str:
        return sealing.suite_of(self.server_public_key())

    def with_device_config(self, doc: DeviceConfig) -> ClientConfig:
        """This config with the server key and package keys of a verified device config."""
        return self.model_copy(
            update={
                "server_public_key_pem": doc.server_key.public_key_pem,
                "package_signing_keys_pem": list(doc.package_signing_keys_pem),
                "require_post_quantum": self.require_post_quantum or doc.post_quantum,
            }
        )

    @classmethod
    def load(cls, path: Path) -> ClientConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read client config {path}: {exc}") from None
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"client config {path} is invalid:\n{exc}") from None
        base = path.parent
        updates = {}
        for name in ("features_dir", "state_dir", "key_path"):
            value = getattr(config, name)
            if value is not None and not value.is_absolute():
                updates[name] = (base / value).resolve()
        updates["log_sources"] = [
            s if Path(s.path).is_absolute() else s.model_copy(update={"path": str(base / s.path)})
            for s in config.log_sources
        ]
        return config.model_copy(update=updates)

    def save(self, path: Path) -> None:
        """Atomically, mode 0600 from the first byte: the file holds the device's S3 secret."""
        atomic_write(path, (self.model_dump_json(indent=2) + "\n").encode(), mode=0o600)

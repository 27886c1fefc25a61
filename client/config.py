"""The device's configuration file (written by ``fl-admin enroll``) and its state folder."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedlib import crypto, signing
from fedlib.protocol import ClientId
from fedlib.store import S3Config


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


class ClientConfig(BaseModel):
    """Everything one device needs; holds no secret of the server's."""

    model_config = ConfigDict(extra="forbid")

    client_id: ClientId
    inbox_url: str = "s3://fl-inbox"
    models_url: str = "s3://fl-models"
    s3: S3Settings = Field(default_factory=S3Settings)
    server_public_key_pem: str
    package_signing_keys_pem: list[str] = Field(min_length=1)  # OpenSSF signing, P-256
    channel_root_json: str  # the pinned TUF root of the model channel
    features_dir: Path
    state_dir: Path
    key_path: Path | None = None
    one_update_per_version: bool = True

    @property
    def signing_key_path(self) -> Path:
        return self.key_path or self.state_dir / "client_key.pem"

    def trusted_package_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        keys = [signing.load_public_key(pem.encode()) for pem in self.package_signing_keys_pem]
        return {signing.key_id(k): k for k in keys}

    def server_public_key(self) -> crypto.x25519.X25519PublicKey:
        return crypto.load_encryption_public_key(self.server_public_key_pem.encode())

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
        return config.model_copy(update=updates)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

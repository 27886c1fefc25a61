"""Server configuration in one place: a TOML file, overridable by ``FL_*`` environment variables.

Looked up in order: the ``path`` argument, ``$FL_SERVER_CONFIG``, ``./fl-server.toml``;
missing file = defaults. Every key is documented on :class:`ServerSettings`. Secrets
never live here: server private keys are read from ``keys_dir`` (a secrets mount),
S3 credentials from the environment or the Airflow connection.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # imported where used: DAG files parse this module, keep it light
    from fedlib.aggregation import AggregationConfig
    from fedlib.protocol import TrainingConfig
    from fedlib.store import S3Config


class ServerSettings(BaseModel):
    """All knobs of the server side, with the defaults used by the demo and tests."""

    model_config = ConfigDict(extra="forbid")

    inbox_bucket: str = "fl-inbox"
    models_bucket: str = "fl-models"
    state_bucket: str = "fl-state"
    airgap_bucket: str = "fl-airgap"
    keys_dir: Path = Path("/run/secrets/dadm-fl")
    schedule: str = "*/15 * * * *"
    min_clients: int = Field(default=2, ge=1)
    max_batch: int = Field(default=10_000, ge=1)
    shard_size: int = Field(default=500, ge=1)
    model_kind: str = "autoencoder"
    auc_tolerance: float = Field(default=0.01, ge=0)
    auc_floor: float = Field(default=0.6, ge=0, le=1)
    threshold_quantile: float = Field(default=0.99, gt=0, lt=1)
    staleness_exponent: float = Field(default=0.5, ge=0)
    max_staleness: int = Field(default=8, ge=0)
    norm_bound: float = Field(default=10.0, gt=0)
    server_lr: float = Field(default=1.0, gt=0)
    server_momentum: float = Field(default=0.9, ge=0, lt=1)
    compression: Literal["topk16", "dense16", "dense32", "dense64"] = "topk16"
    topk_fraction: float = Field(default=0.1, gt=0, le=1)
    local_epochs: int = Field(default=1, ge=1)
    credential_issuer: Literal["iam", "none"] = "iam"  # "none": pass device keys by hand
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    @property
    def dag_schedule(self) -> str | None:
        """``schedule`` for Airflow: a cron/preset string, or None for "none" (manual only)."""
        return None if self.schedule.strip().lower() in ("", "none", "manual") else self.schedule

    def aggregation(self) -> AggregationConfig:
        from fedlib.aggregation import AggregationConfig

        return AggregationConfig(
            staleness_exponent=self.staleness_exponent,
            max_staleness=self.max_staleness,
            norm_bound=self.norm_bound,
            server_lr=self.server_lr,
            server_momentum=self.server_momentum,
        )

    def training(self, compression: str | None = None) -> TrainingConfig:
        from fedlib.protocol import TrainingConfig

        return TrainingConfig(
            epochs=self.local_epochs,
            compression=compression or self.compression,  # type: ignore[arg-type]
            topk_fraction=self.topk_fraction,
            clip_norm=self.norm_bound,
        )

    def s3(self) -> S3Config:
        from fedlib.store import S3Config

        env = S3Config.from_env()
        return S3Config(
            endpoint_url=self.s3_endpoint_url or env.endpoint_url,
            region=self.s3_region or env.region,
            access_key=env.access_key,
            secret_key=env.secret_key,
        )

    @classmethod
    def load(cls, path: Path | str | None = None) -> ServerSettings:
        candidate = path or os.environ.get("FL_SERVER_CONFIG") or "fl-server.toml"
        data: dict[str, object] = {}
        if Path(candidate).is_file():
            data = tomllib.loads(Path(candidate).read_text())
        elif path is not None:
            raise FileNotFoundError(f"server config {path} does not exist")
        for name in cls.model_fields:
            env = os.environ.get(f"FL_{name.upper()}")
            if env is not None:
                data[name] = env
        return cls.model_validate(data)

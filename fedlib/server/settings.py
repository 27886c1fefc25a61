"""Server configuration in one place: a TOML file, overridable by ``FL_*`` environment variables.

Looked up in order: the ``path`` argument, ``$FL_SERVER_CONFIG``, ``./fl-server.toml``;
missing file = defaults; then ``FL_<KEY>`` variables, then explicit overrides (the DAGs
pass the Airflow Variable ``fl_settings``, a JSON object, at task run time). Every key
is documented on :class:`ServerSettings`. Secrets never live here: server private keys
are read from ``keys_dir`` (a secrets mount), S3 credentials from the environment or the
Airflow connection.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # imported where used: DAG files parse this module, keep it light
    from fedlib.models.model import Transform
    from fedlib.server.aggregation import AggregationConfig
    from fedlib.server.privacy import PrivacyConfig
    from fedlib.storage.store import S3Config
    from fedlib.wire.protocol import TrainingConfig


HpkeSuiteName = Literal["mlkem768-x25519", "x25519"]
ACCEPTED_SUITES_DEFAULT: tuple[HpkeSuiteName, ...] = ("mlkem768-x25519", "x25519")


class ServerSettings(BaseModel):
    """All knobs of the server side, with the defaults used by the demo and tests."""

    model_config = ConfigDict(extra="forbid")

    inbox_bucket: str = Field("fl-inbox", description="Bucket devices upload updates into.")
    models_bucket: str = Field("fl-models", description="Bucket of signed model packages.")
    state_bucket: str = Field(
        "fl-state", description="Ledger, quarantine, holdout, round files and reports."
    )
    airgap_bucket: str = Field("fl-airgap", description="Exported air-gap bundles.")
    keys_dir: Path = Field(
        Path("/run/secrets/dadm-fl"),
        description="Folder of the server's private keys (HPKE, package signing).",
    )
    schedule: str = Field(
        "*/15 * * * *", description='fl_round schedule (cron or preset; "none" = manual only).'
    )
    min_clients: int = Field(2, ge=1, description="Distinct devices needed to run a round.")
    max_batch: int = Field(10_000, ge=1, description="Most updates one round takes.")
    shard_size: int = Field(500, ge=1, description="Updates per mapped process_shard task.")
    max_objects_per_device: int = Field(
        16, ge=1, description="Most inbox objects one device (or the junk group) gets per round."
    )
    quarantine_quota_bytes: int = Field(
        64 << 20,
        ge=0,
        description="Quarantined bytes kept whole per device; beyond it, stubs (prefix, "
        "SHA-256, size).",
    )
    quarantine_stub_bytes: int = Field(
        4096, ge=0, le=65536, description="Leading bytes a quarantine stub keeps."
    )
    quarantine_hash_max_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Largest unread object a quarantine stub hashes whole (larger: prefix "
        "and size only).",
    )
    quarantine_retention_days: float = Field(
        30, gt=0, description="Quarantine objects older than this are deleted by a round."
    )
    quarantine_expire_per_round: int = Field(
        1000, ge=0, description="Most expired quarantine objects one round deletes."
    )
    verdict_write_attempts: int = Field(
        3,
        ge=1,
        description="Rounds that may fail to write an object's verdict before it gets an "
        "'unrecordable' one under a digest key.",
    )
    model_kind: str = Field(
        "autoencoder",
        description="Model kind of version 1: autoencoder, gmm (Gaussian mixture, federated "
        "EM; see em_step when rounds reach a small part of the fleet), or gaussian. "
        "robust_aggregation and dp_mode need the autoencoder.",
    )
    feature_transform: Literal["auto", "log1p", "identity"] = Field(
        "auto",
        description="Scaling of version 1's features before standardization: log1p for "
        "counts, identity for measurements; auto picks log1p when every benign holdout "
        "value is a non-negative integer.",
    )
    auc_tolerance: float = Field(
        0.01, ge=0, description="Gate: candidate AUC may trail the active model by this much."
    )
    auc_floor: float = Field(0.6, ge=0, le=1, description="Gate: never publish below this AUC.")
    class_detection_tolerance: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Gate, when the holdout names anomaly classes: the candidate may detect "
        "each class's rows by at most this much less than the active model.",
    )
    threshold_quantile: float = Field(
        0.99, gt=0, lt=1, description="Benign-score quantile that becomes the flag threshold."
    )
    holdout_calibration_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of the holdout's rows (per label and class, by a keyed hash of "
        "each row) that calibrate: the threshold, the FLTrust reference and the gate's "
        "comparison. The other rows evaluate: every published figure is computed on them.",
    )
    staleness_exponent: float = Field(
        0.5, ge=0, description="Weight of an update s versions stale: 1/(1+s)**exponent."
    )
    max_staleness: int = Field(8, ge=0, description="Updates staler than this are refused.")
    norm_bound: float = Field(
        10.0, gt=0, description="Max L2 norm of an update (devices clip to it)."
    )
    exact_norm_bound: float = Field(
        1e4, gt=0, description="The same for sufficient-statistics kinds (e.g. gaussian)."
    )
    server_lr: float = Field(1.0, gt=0, description="Server learning rate on the mean delta.")
    server_momentum: float = Field(
        0.9, ge=0, lt=1, description="FedAvgM momentum (0 = plain FedAvg)."
    )
    em_step: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Mixture kinds (gmm): how far a round moves the statistics towards its "
        "pooled E-step (stepwise EM); 1 = a full EM step, right when every round hears from "
        "most of the fleet, lower (about the share of devices a round reaches) otherwise.",
    )
    robust_aggregation: Literal["none", "fltrust", "trimmed_mean", "median"] = Field(
        "none",
        description="Poisoning defense (fedlib/robust.py): fltrust weights each update by "
        "its agreement with a delta trained on the benign calibration rows of the holdout "
        "(streaming); "
        "trimmed_mean/median replace the mean (devices send dense16; reduce holds "
        "4 bytes x updates x params).",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="Update weight the trimmed mean drops at each end."
    )
    max_device_weight_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Largest share of a round's weight one device's updates may carry "
        "(water-filling in the reduce step); with fewer devices than 1/share every device "
        "weighs the same. 1 = no cap.",
    )
    count_cap_factor: float = Field(
        4.0,
        ge=0,
        le=2**20,
        description="Self-reported sample counts are clipped to this times the lower "
        "median of the round's per-device counts (0 = only the fixed 65536 cap).",
    )
    dp_mode: Literal["off", "central", "local"] = Field(
        "off",
        description="Differential privacy (fedlib/privacy.py): central = devices clip, the "
        "server adds Gaussian noise to the sum (trusted server); local = each device "
        "noises its own clipped delta (untrusted server); off.",
    )
    dp_noise_multiplier: float | None = Field(
        None, gt=0, description="DP noise std over the clip norm per round (or dp_target_epsilon)."
    )
    dp_target_epsilon: float | None = Field(
        None, gt=0, description="DP: calibrate the noise so dp_rounds rounds spend this epsilon."
    )
    dp_rounds: int = Field(100, ge=1, description="DP: rounds the target epsilon is planned for.")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="DP delta (well below 1/devices).")
    dp_clip_norm: float = Field(
        1.0, gt=0, description="DP: L2 clip norm C of version 1 (adaptive clipping moves it)."
    )
    dp_adaptive_clipping: bool = Field(
        False, description="DP central: move C toward dp_target_quantile (Andrew et al. 2021)."
    )
    dp_target_quantile: float = Field(
        0.5, gt=0, lt=1, description="DP adaptive clipping: share of updates left unclipped."
    )
    dp_clip_learning_rate: float = Field(
        0.2, ge=0, le=10, description="DP adaptive clipping: geometric step of C per round."
    )
    dp_clipped_count_stddev: float | None = Field(
        None,
        gt=0,
        description="DP adaptive clipping: noise on the clipped count (None: max(m/20, z*1.58)).",
    )
    dp_expected_clients: int = Field(
        100, ge=1, description="DP adaptive clipping: expected devices per round (m)."
    )
    dp_accountant: Literal["rdp", "pld"] = Field("rdp", description="DP privacy accountant.")
    dp_budget_epsilon: float | None = Field(
        None, gt=0, description="DP: publish nothing once cumulative epsilon would exceed this."
    )
    compression: Literal["topk16", "dense16", "dense32", "dense64"] = Field(
        "topk16", description="How devices compress updates (dense16 under robust_aggregation)."
    )
    topk_fraction: float = Field(0.075, gt=0, le=1, description="Share of coordinates top-k keeps.")
    local_epochs: int = Field(1, ge=1, description="Local passes over a device's rows per update.")
    hpke_suite: Literal["mlkem768-x25519", "x25519"] = Field(
        "mlkem768-x25519",
        description="Suite of new server HPKE keys: hybrid post-quantum ML-KEM-768 + X25519 "
        "(default), or classic X25519.",
    )
    accepted_hpke_suites: list[Literal["mlkem768-x25519", "x25519"]] = Field(
        default_factory=lambda: list(ACCEPTED_SUITES_DEFAULT),
        min_length=1,
        description="Suites the server opens; drop x25519 once every device seals hybrid "
        "(refused updates are quarantined as suite_not_accepted).",
    )
    package_pq_signatures: bool = Field(
        False,
        description="Also sign packages with ML-DSA-65 (hybrid with the OpenSSF ECDSA "
        "signature); devices enrolled after this require both.",
    )
    credential_issuer: Literal["iam", "none"] = Field(
        "iam", description='Issue device S3 keys via the IAM API, or "none" (pass them by hand).'
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (None: AWS).")
    s3_region: str = Field("us-east-1", description="S3 region.")

    @property
    def dag_schedule(self) -> str | None:
        """``schedule`` for Airflow: a cron/preset string, or None for "none" (manual only)."""
        return None if self.schedule.strip().lower() in ("", "none", "manual") else self.schedule

    def transform_for(self, benign_rows: Any) -> Transform:
        """The feature transform version 1 uses, resolving ``auto`` from the rows."""
        from fedlib.models.model import choose_transform

        if self.feature_transform == "auto":
            return choose_transform(benign_rows)
        return self.feature_transform

    def aggregation(
        self, model_kind: str | None = None, model_spec: dict[str, Any] | None = None
    ) -> AggregationConfig:
        """Aggregation for a model kind: iterative kinds get FedAvgM with per-step weights
        (FedNova-style, measured to matter on non-IID fleets), sufficient-statistics kinds
        a plain exact mean with their own wide norm bound (never a robust statistic: it
        would no longer be the pooled fit)."""
        from fedlib.models.model import KINDS
        from fedlib.server.aggregation import AggregationConfig

        kind = KINDS[model_kind or self.model_kind]
        exact = kind.sufficient_statistics
        return AggregationConfig(
            staleness_exponent=self.staleness_exponent,
            max_staleness=self.max_staleness,
            norm_bound=self.exact_norm_bound if exact else self.norm_bound,
            server_lr=(1.0 if kind.one_round else self.em_step) if exact else self.server_lr,
            server_momentum=0.0 if exact else self.server_momentum,
            local_batch_size=0 if exact else int((model_spec or {}).get("batch_size", 0)),
            robust="none" if exact else self.robust_aggregation,
            trim_fraction=self.trim_fraction,
            max_device_share=self.max_device_weight_share,
            count_cap_factor=self.count_cap_factor,
            dp_mode="off" if exact else self.dp_mode,
            dp_clip=min(self.dp_clip_norm, self.norm_bound),  # the base's C replaces it
        )

    def training(self, model_kind: str | None = None) -> TrainingConfig:
        """What devices are told to do for a model kind (travels in the signed package)."""
        from fedlib.models.model import KINDS
        from fedlib.wire.protocol import TrainingConfig

        kind = KINDS[model_kind or self.model_kind]
        exact = kind.sufficient_statistics
        compression = self.compression
        if exact:
            compression = kind.preferred_compression  # type: ignore[assignment]
        elif self.robust_aggregation in ("trimmed_mean", "median") and compression == "topk16":
            compression = "dense16"  # a per-coordinate statistic of sparse rows is ~0
        privacy = self.privacy()
        dp = None
        if privacy.enabled and not exact:
            from fedlib.wire.protocol import DpTraining

            dp = DpTraining(
                mode=privacy.mode,
                noise_multiplier=(
                    privacy.total_noise_multiplier if privacy.mode == "local" else 0.0
                ),
                report_unclipped=privacy.adaptive,
                max_updates=privacy.max_device_updates(),
            )
        return TrainingConfig(
            epochs=self.local_epochs,
            compression=compression,
            topk_fraction=self.topk_fraction,
            clip_norm=(
                self.exact_norm_bound
                if exact
                else (min(self.dp_clip_norm, self.norm_bound) if dp else self.norm_bound)
            ),
            dp=dp,
        )

    def privacy(self) -> PrivacyConfig:
        """The deployment's differential-privacy config (mode "off" unless dp_mode says)."""
        from fedlib.server.privacy import PrivacyConfig

        return PrivacyConfig(
            mode=self.dp_mode,
            noise_multiplier=self.dp_noise_multiplier,
            target_epsilon=self.dp_target_epsilon,
            rounds=self.dp_rounds,
            delta=self.dp_delta,
            clip_norm=min(self.dp_clip_norm, self.norm_bound),
            adaptive_clipping=self.dp_adaptive_clipping,
            target_quantile=self.dp_target_quantile,
            clip_learning_rate=self.dp_clip_learning_rate,
            clipped_count_stddev=self.dp_clipped_count_stddev,
            expected_clients=self.dp_expected_clients,
            accountant=self.dp_accountant,
            budget_epsilon=self.dp_budget_epsilon,
            max_clip_norm=self.norm_bound,
        )

    @model_validator(mode="after")
    def _check_robust(self) -> ServerSettings:
        """A robust statistic needs an iterative kind: a sufficient-statistics kind's
        round is exact only as the plain mean, so the setting would be ignored."""
        from fedlib.models.model import KINDS

        kind = KINDS.get(self.model_kind)
        if self.robust_aggregation != "none" and kind is not None and kind.sufficient_statistics:
            raise ValueError(
                f"robust_aggregation = {self.robust_aggregation!r} is for iterative model kinds "
                f'(model_kind = "autoencoder"), not {self.model_kind}'
            )
        return self

    @model_validator(mode="after")
    def _check_privacy(self) -> ServerSettings:
        """DP needs its noise set once, the plain mean (its sensitivity argument is for
        a sum of clipped deltas of weight 1), and an iterative model kind."""
        if self.dp_mode == "off":
            return self
        if (self.dp_noise_multiplier is None) == (self.dp_target_epsilon is None):
            raise ValueError("dp_mode needs exactly one of dp_noise_multiplier, dp_target_epsilon")
        if self.robust_aggregation != "none":
            raise ValueError('dp_mode needs robust_aggregation = "none"')
        from fedlib.models.model import KINDS

        if self.model_kind in KINDS and KINDS[self.model_kind].sufficient_statistics:
            raise ValueError(f"dp_mode is for iterative model kinds, not {self.model_kind}")
        self.privacy()  # its own checks (e.g. adaptive clipping's noise split)
        return self

    def s3(self) -> S3Config:
        from fedlib.storage.store import S3Config

        env = S3Config.from_env()
        return S3Config(
            endpoint_url=self.s3_endpoint_url or env.endpoint_url,
            region=self.s3_region or env.region,
            access_key=env.access_key,
            secret_key=env.secret_key,
        )

    @classmethod
    def example_toml(cls) -> str:
        """A commented fl-server.toml with every key at its default."""
        lines = ["# fl-server.toml: every key with its default (see fedlib/settings.py)", ""]
        for name, field in cls.model_fields.items():
            value = field.get_default(call_default_factory=True)
            lines.append(f"# {field.description}")
            if value is None:
                lines.append(f"# {name} = ")
            elif isinstance(value, list):
                lines.append(f"{name} = {json.dumps(value)}")
            elif isinstance(value, str | Path):
                lines.append(f'{name} = "{value}"')
            else:
                lines.append(f"{name} = {str(value).lower() if isinstance(value, bool) else value}")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(
        cls, path: Path | str | None = None, overrides: dict[str, object] | None = None
    ) -> ServerSettings:
        candidate = path or os.environ.get("FL_SERVER_CONFIG") or "fl-server.toml"
        data: dict[str, object] = {}
        if Path(candidate).is_file():
            data = tomllib.loads(Path(candidate).read_text())
        elif path is not None:
            raise FileNotFoundError(f"server config {path} does not exist")
        for name in cls.model_fields:
            env = os.environ.get(f"FL_{name.upper()}")
            if env is not None:  # a list: comma-separated (FL_ACCEPTED_HPKE_SUITES=a,b)
                is_list = isinstance(
                    cls.model_fields[name].get_default(call_default_factory=True), list
                )
                data[name] = [v.strip() for v in env.split(",") if v.strip()] if is_list else env
        data.update(overrides or {})
        return cls.model_validate(data)

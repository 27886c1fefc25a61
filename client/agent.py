"""One cron cycle of the device agent: pull and verify, train, compress, seal, spool, upload."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.config import ClientConfig
from client.features import load_features
from client.spool import Spool, UploadReport
from fedlib import crypto
from fedlib.channel import ChannelClient
from fedlib.errors import StoreError, VerificationError
from fedlib.model import FeatureSchema
from fedlib.registry import ModelPackage, verify_package_files
from fedlib.store import atomic_write, open_store
from fedlib.training import LocalUpdate, make_update

log = logging.getLogger("fl-client")


@dataclass
class CycleReport:
    client_id: str
    installed_version: int | None = None
    pulled_version: int | None = None
    model_message: str = ""
    trained: bool = False
    update_id: str | None = None
    num_rows: int = 0
    update_bytes: int = 0
    uploaded: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    offline: bool = False
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = True

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class InstalledModels:
    """Verified packages on the device; ``current`` moves atomically after verification."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pointer = self.root / "current.json"

    def current_version(self) -> int | None:
        try:
            return int(json.loads(self.pointer.read_text())["version"])
        except (OSError, ValueError, KeyError):
            return None

    def install(self, files: dict[str, bytes], trusted: Mapping[str, Any]) -> ModelPackage:
        """Verify the files, write them into their own folder, then swap the pointer.

        Used for channel downloads and air-gap bundles alike: nothing is installed that
        does not verify, and a failure leaves the previous model in place.
        """
        package = verify_package_files(files, trusted)
        current = self.current_version()
        if current is not None and package.version < current:
            raise VerificationError(
                f"version {package.version} is older than installed {current}: refused"
            )
        final = self.root / f"v{package.version:08d}"
        if not final.exists():
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
            for name, data in files.items():
                (staging / name).write_bytes(data)
            os.replace(staging, final)
        atomic_write(self.pointer, json.dumps({"version": package.version}).encode())
        for old in self.root.glob(".staging-*"):
            shutil.rmtree(old, ignore_errors=True)
        return package

    def load_current(self, trusted: Mapping[str, Any]) -> ModelPackage:
        """Re-verify the installed files before use: the disk is not trusted either."""
        version = self.current_version()
        if version is None:
            raise FileNotFoundError("no model installed")
        folder = self.root / f"v{version:08d}"
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        return verify_package_files(files, trusted, expected_version=version)


def channel_client(config: ClientConfig) -> ChannelClient:
    """The TUF client: pinned root from the config, verified metadata kept in state."""
    return ChannelClient(
        open_store(config.models_url, config.s3.to_store_config()),
        config.state_dir / "channel" / "metadata",
        config.state_dir / "channel" / "targets",
        config.channel_root_json.encode(),
    )


def pull_model(config: ClientConfig, installed: InstalledModels, report: CycleReport) -> None:
    """Install the active model if it is newer and verifies; otherwise keep what we have."""
    current = installed.current_version()
    try:
        channel = channel_client(config)
        channel.refresh()
        active = channel.active_version()
        if active is None:
            report.model_message = "no model published yet"
            return
        if current is not None and active <= current:
            if active < current:
                report.ok = False
                report.model_message = (
                    f"refused: the channel names version {active}, older than installed {current}"
                )
            else:
                report.model_message = f"version {current} is current"
            return
        installed.install(channel.download(active), config.trusted_package_keys())
        report.pulled_version = active
        report.model_message = f"installed version {active}"
    except StoreError as exc:
        report.offline = True
        report.model_message = f"model store unreachable, keeping version {current}: {exc}"
    except VerificationError as exc:
        report.ok = False
        report.model_message = f"refused the published model, keeping version {current}: {exc}"


def train_update(
    config: ClientConfig,
    package: ModelPackage,
    key: crypto.ed25519.Ed25519PrivateKey,
    report: CycleReport,
) -> tuple[LocalUpdate, ResidualStore] | None:
    """Train from the package's weights on local rows; return the sealed update."""
    meta = package.metadata
    schema = FeatureSchema.from_dict(meta.feature_schema)
    rows = load_features(config.features_dir, list(schema.names), max_rows=meta.training.max_rows)
    report.num_rows = int(rows.shape[0])
    if rows.shape[0] < meta.training.min_rows:
        report.messages.append(
            f"only {rows.shape[0]} feature rows (< {meta.training.min_rows}): not training"
        )
        return None
    residuals = ResidualStore(config.state_dir / "residual")
    update = make_update(
        package,
        rows,
        client_id=config.client_id,
        client_key=key,
        server_public_key=config.server_public_key(),
        residual=residuals.load(meta.model_kind, meta.num_params),
        seed=int.from_bytes(os.urandom(4), "big"),
    )
    report.update_id = update.update_id
    report.update_bytes = len(update.envelope)
    return update, residuals


class ResidualStore:
    """The error-feedback residual: dropped mass carried into the next update."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, kind: str, num_params: int) -> np.ndarray | None:
        data_path, meta_path = self.path.with_suffix(".npy"), self.path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
            if meta != {"kind": kind, "num_params": num_params}:
                return None
            arr = np.load(data_path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return arr if arr.shape == (num_params,) and np.all(np.isfinite(arr)) else None

    def save(self, kind: str, residual: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, residual.astype(np.float64), allow_pickle=False)
        atomic_write(self.path.with_suffix(".npy"), buf.getvalue())
        meta = {"kind": kind, "num_params": int(residual.size)}
        atomic_write(self.path.with_suffix(".json"), json.dumps(meta).encode())


def run_cycle(config: ClientConfig) -> CycleReport:
    """Pull, train once per model version, spool, upload. Offline is not an error."""
    started = time.monotonic()
    report = CycleReport(client_id=config.client_id)
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    key = crypto.load_signing_key(config.signing_key_path)
    installed = InstalledModels(state / "models")
    spool = Spool(state / "spool")

    pull_model(config, installed, report)
    report.installed_version = installed.current_version()

    last = _read_json(state / "last_trained.json")
    if report.installed_version is None:
        report.messages.append("no verified model installed yet: nothing to train")
    elif config.one_update_per_version and last.get("version") == report.installed_version:
        report.messages.append(
            f"already sent an update for version {report.installed_version}: not training"
        )
    else:
        package = installed.load_current(config.trusted_package_keys())
        trained = train_update(config, package, key, report)
        if trained is not None:
            update, residuals = trained
            spool.add(update.update_id, update.envelope)  # durable before the residual moves
            residuals.save(package.metadata.model_kind, update.residual)
            _write_json(state / "last_trained.json", {"version": package.version})
            report.trained = True

    if spool.pending():
        inbox = open_store(config.inbox_url, config.s3.to_store_config())
        upload: UploadReport = spool.upload(inbox, config.client_id)
        report.uploaded, report.already_present = upload.uploaded, upload.already_present
        report.waiting = upload.waiting
        if upload.error:
            report.offline = True
            report.messages.append(
                f"inbox unreachable: {len(upload.waiting)} update(s) wait in the spool "
                f"and go out on a later run ({upload.error})"
            )
    report.seconds = round(time.monotonic() - started, 3)
    _write_json(state / "status.json", report.as_dict())
    return report


def verify_bundle_file(config: ClientConfig, path: Path):  # -> fedlib.airgap.VerifiedBundle
    """Check an air-gap bundle offline against this device's pinned root and key."""
    from fedlib.airgap import verify_bundle

    installed = InstalledModels(config.state_dir / "models").current_version()
    work = config.state_dir / "bundle-work"
    work.mkdir(parents=True, exist_ok=True)
    return verify_bundle(
        Path(path),
        trusted_root=config.channel_root_json.encode(),
        trusted_package_keys=config.trusted_package_keys(),
        installed_version=installed,
        workdir=work,
    )


def install_bundle_file(config: ClientConfig, path: Path) -> ModelPackage:
    """Verify, then install atomically; the previous model stays if anything fails."""
    bundle = verify_bundle_file(config, path)
    installed = InstalledModels(config.state_dir / "models")
    return installed.install(bundle.files, config.trusted_package_keys())


def status(config: ClientConfig) -> dict[str, object]:
    state = config.state_dir
    spool = Spool(state / "spool")
    return {
        "client_id": config.client_id,
        "installed_version": InstalledModels(state / "models").current_version(),
        "pending_updates": spool.pending(),
        "sent_updates": len(spool.sent()),
        "last_run": _read_json(state / "status.json"),
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str).encode())

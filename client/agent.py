"""One cron cycle of the device agent: pull and verify, train, compress, seal, spool, upload."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from client.calibration import CalibrationError, DeviceCalibration, fit_calibration
from client.config import ClientConfig
from client.features import FeatureError, load_feature_file, load_features
from client.logs import LogReader, LogState, closed_windows, state_path, window_rows
from client.spool import Spool, UploadReport
from client.update import LocalUpdate, make_update
from fedlib.crypto import sealing
from fedlib.errors import StoreError, VerificationError
from fedlib.files import atomic_write
from fedlib.models.logfeatures import TemplateMatcher
from fedlib.models.model import FeatureSchema, onnx_score
from fedlib.models.package import ModelPackage
from fedlib.storage.store import open_store
from fedlib.trust.channel_client import ChannelClient
from fedlib.trust.device_config import DEVICE_CONFIG_TARGET, DeviceConfig, refuses_downgrade
from fedlib.trust.package import verify_package_files

log = logging.getLogger("fl-client")

DEVICE_CONFIG_FILE = "device-config.json"  # the newest verified device config, in state_dir


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
    calibration_threshold: float | None = None
    log_entries: int | None = None  # log entries counted this run (None: no log sources)
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
        # (version, trusted key ids) -> the package verified by this object (one cycle)
        self._verified: tuple[tuple[int, frozenset[str]], ModelPackage] | None = None

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
        self._verified = ((package.version, frozenset(trusted)), package)
        return package

    def load_current(self, trusted: Mapping[str, Any]) -> ModelPackage:
        """Re-verify the installed files before use (the disk is not trusted either),
        once per cycle: this object keeps what it verified for the same trusted keys."""
        version = self.current_version()
        if version is None:
            raise FileNotFoundError("no model installed")
        key = (version, frozenset(trusted))
        if self._verified is not None and self._verified[0] == key:
            return self._verified[1]
        folder = self.root / f"v{version:08d}"
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        package = verify_package_files(files, trusted, expected_version=version)
        self._verified = (key, package)
        return package


def channel_client(config: ClientConfig) -> ChannelClient:
    """The TUF client: pinned root from the config, verified metadata kept in state."""
    return ChannelClient(
        open_store(config.models_url, config.s3.to_store_config()),
        config.state_dir / "channel" / "metadata",
        config.state_dir / "channel" / "targets",
        config.channel_root_json.encode(),
    )


def stored_device_config(config: ClientConfig) -> DeviceConfig | None:
    """The newest device config this device verified and kept (None: none yet)."""
    try:
        return DeviceConfig.from_bytes((config.state_dir / DEVICE_CONFIG_FILE).read_bytes())
    except (FileNotFoundError, VerificationError):
        return None


def effective_config(config: ClientConfig) -> ClientConfig:
    """The enrolment config, updated by the newest device config this device verified."""
    stored = stored_device_config(config)
    return config if stored is None else config.with_device_config(stored)


def update_device_config(
    config: ClientConfig, channel: ChannelClient, report: CycleReport
) -> ClientConfig:
    """Take a newer signed device config from the channel (server key, package keys),
    unless it would move this device off post-quantum sealing."""
    stored = stored_device_config(config)
    current = config if stored is None else config.with_device_config(stored)
    data = channel.optional_target(DEVICE_CONFIG_TARGET)
    if data is None:
        return current
    doc = DeviceConfig.from_bytes(data)
    if stored is not None and doc.serial <= stored.serial:
        return current
    why = refuses_downgrade(
        current.server_suite(),
        doc,
        require_pq=current.require_post_quantum,
        pq_packages=current.checks_pq_package_signatures(),
    )
    if why:
        report.ok = False
        report.messages.append(f"refused device config {doc.serial}: {why}")
        return current
    atomic_write(config.state_dir / DEVICE_CONFIG_FILE, data)
    report.messages.append(
        f"device config {doc.serial}: sealing to server key {doc.server_key.key_id} "
        f"({doc.server_key.suite}), {len(doc.package_signing_keys_pem)} package key(s)"
    )
    return config.with_device_config(doc)


def pull_model(
    config: ClientConfig, installed: InstalledModels, report: CycleReport
) -> ClientConfig:
    """Install the active model if it is newer and verifies; otherwise keep what we have.
    Returns the config to use from now on (a newer signed device config applied)."""
    current = installed.current_version()
    enrolled, config = config, effective_config(config)  # what holds if the channel fails
    try:
        channel = channel_client(enrolled)
        channel.refresh()
        config = update_device_config(enrolled, channel, report)
        active = channel.active_version()
        if active is None:
            report.model_message = "no model published yet"
            return config
        if current is not None and active <= current:
            if active < current:
                report.ok = False
                report.model_message = (
                    f"refused: the channel names version {active}, older than installed {current}"
                )
            else:
                report.model_message = f"version {current} is current"
            return config
        installed.install(channel.download(active), config.trusted_package_keys())
        report.pulled_version = active
        report.model_message = f"installed version {active}"
    except StoreError as exc:
        report.offline = True
        report.model_message = f"model store unreachable, keeping version {current}: {exc}"
    except VerificationError as exc:
        report.ok = False
        report.model_message = f"refused the published model, keeping version {current}: {exc}"
    return config


def train_update(
    config: ClientConfig,
    package: ModelPackage,
    key: ed25519.Ed25519PrivateKey,
    report: CycleReport,
    logs: LogState | None = None,
) -> tuple[LocalUpdate, ResidualStore] | None:
    """Train from the package's weights on local rows; return the sealed update.
    ``logs``: the log state this run already read (else it is read here)."""
    meta = package.metadata
    schema = FeatureSchema.from_dict(meta.feature_schema)
    try:
        rows = local_rows(config, schema, max_rows=meta.training.max_rows, logs=logs)
    except FeatureError as exc:
        report.ok = False
        report.messages.append(f"no local rows: {exc}")
        return None
    report.num_rows = int(rows.shape[0])
    if rows.shape[0] < meta.training.min_rows:
        report.messages.append(
            f"only {rows.shape[0]} feature rows (< {meta.training.min_rows}): not training"
        )
        return None
    if config.require_post_quantum and config.server_suite() not in sealing.POST_QUANTUM_SUITES:
        report.ok = False
        report.messages.append(
            "refusing to seal: this device requires post-quantum sealing but holds a "
            "classic X25519 server key"
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


CALIBRATION_FILE = "calibration.json"  # this device's calibration, in state_dir; never uploaded


def features_fingerprint(config: ClientConfig, max_rows: int) -> str:
    """Identity of the local data (feature files' names, sizes, mtimes; the log state's
    bytes): refit only on change."""
    h = hashlib.sha256(str(max_rows).encode())
    if config.features_dir is not None:
        with contextlib.suppress(OSError):
            for p in sorted(Path(config.features_dir).iterdir()):
                if p.suffix in (".npy", ".csv"):
                    st = p.stat()
                    h.update(f"\0{p.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    if config.log_sources:
        with contextlib.suppress(OSError):
            h.update(b"\0logs\0" + state_path(config.state_dir).read_bytes())
    return h.hexdigest()


def log_matcher(schema: FeatureSchema) -> TemplateMatcher:
    """The installed model's vocabulary as a matcher; a model without one cannot count logs."""
    if schema.vocabulary is None:
        raise FeatureError(
            "the installed model has no template vocabulary, so log lines cannot be "
            "counted into its features (the operator publishes one: fl-admin templates)"
        )
    return TemplateMatcher(schema.vocabulary)


def local_rows(
    config: ClientConfig,
    schema: FeatureSchema,
    *,
    max_rows: int,
    now: float | None = None,
    logs: LogState | None = None,
) -> np.ndarray:
    """The newest ``max_rows`` local feature rows: the feature files' rows, then the log
    windows' (closed windows, counted with the installed vocabulary). ``logs``: the log
    state already in memory (a run reads its JSON once), else it is read here."""
    blocks = []
    if config.features_dir is not None:
        blocks.append(load_features(config.features_dir, list(schema.names), max_rows=max_rows))
    if config.log_sources:
        state = logs or LogState.load(state_path(config.state_dir), config.logs.window_seconds)
        windows = closed_windows(state, now=time.time() if now is None else now)
        blocks.append(window_rows(windows[-max_rows:], log_matcher(schema), state.window_seconds))
    return np.concatenate(blocks)[-max_rows:]


def ingest_logs(config: ClientConfig, report: CycleReport) -> LogState | None:
    """Read what the log sources appended since the last run (see :mod:`client.logs`);
    the state, saved, for the rest of the run (None without log sources)."""
    if not config.log_sources:
        return None
    path = state_path(config.state_dir)
    state = LogState.load(path, config.logs.window_seconds)
    reader = LogReader(config.log_sources, config.logs, base=config.state_dir, state=state)
    report.log_entries = reader.read()
    state.save(path)
    return state


def load_calibration(config: ClientConfig) -> DeviceCalibration | None:
    """The stored calibration, or None when there is none (or it does not parse)."""
    try:
        return DeviceCalibration.from_json((config.state_dir / CALIBRATION_FILE).read_bytes())
    except (OSError, CalibrationError):
        return None


def refresh_calibration(
    config: ClientConfig,
    installed: InstalledModels,
    report: CycleReport,
    logs: LogState | None = None,
) -> None:
    """Refit the on-device calibration (client.calibration) of the installed model on
    the local rows when the model, the feature files or the settings changed.

    It stays in ``state_dir``: nothing of it is uploaded. A failure leaves a message and
    never stops the cycle (training and upload go on)."""
    settings = config.personalization
    if not settings.enabled or report.installed_version is None:
        return
    try:
        package = installed.load_current(config.trusted_package_keys())
        digest = hashlib.sha256(package.onnx_bytes).hexdigest()
        wanted = settings.calibration_config()
        max_rows = package.metadata.training.max_rows
        fingerprint = features_fingerprint(config, max_rows)
        old = load_calibration(config)
        key = (digest, fingerprint, wanted)
        if old is not None and (old.model_digest, old.data_fingerprint, old.config) == key:
            report.calibration_threshold = old.threshold
            return
        schema = FeatureSchema.from_dict(package.metadata.feature_schema)
        rows = local_rows(config, schema, max_rows=max_rows, logs=logs)
        calibration = fit_calibration(
            rows,
            onnx_score(package.onnx_bytes, rows)[0],
            schema,
            model_digest=digest,
            model_version=package.version,
            config=wanted,
            data_fingerprint=fingerprint,
        )
    except (CalibrationError, FeatureError, VerificationError) as exc:
        report.messages.append(f"not calibrating: {exc}")
        return
    atomic_write(config.state_dir / CALIBRATION_FILE, calibration.to_json())
    report.calibration_threshold = calibration.threshold
    report.messages.append(
        f"calibrated version {package.version} on {calibration.num_rows} local rows "
        f"(threshold {calibration.threshold:.3f} at {wanted.false_alarm_rate:.2%} false alarms)"
    )


def _finite_list(values: np.ndarray) -> list[float]:
    big = float(np.finfo(np.float64).max)
    return [float(v) for v in np.nan_to_num(values, nan=big, posinf=big, neginf=-big)]


def score_features(config: ClientConfig, path: Path) -> dict[str, object]:
    """Score one feature file with the installed model and this device's calibration.

    ``score``/``flag`` are the personalized ones when the calibration belongs to the
    installed model, else the global model's own (``personalized`` says which)."""
    installed = InstalledModels(config.state_dir / "models")
    package = installed.load_current(config.trusted_package_keys())
    schema = FeatureSchema.from_dict(package.metadata.feature_schema)
    path = Path(path)
    if path.suffix not in (".npy", ".csv") or not path.is_file():
        raise FeatureError(f"{path}: expected an existing .npy or .csv feature file")
    rows = load_feature_file(path, list(schema.names))
    schema.apply(rows)  # finite, non-negative counts, right width: a clear error otherwise
    g, g_flag = onnx_score(package.onnx_bytes, rows)
    out: dict[str, object] = {
        "client_id": config.client_id,
        "model_version": package.version,
        "rows": int(rows.shape[0]),
    }
    score, flag, how = _personalized(config, package, rows, g, g_flag)
    out.update(how)
    out.update(
        flagged=int(flag.sum()),
        score=_finite_list(score),
        flag=[bool(f) for f in flag],
        global_score=_finite_list(g),
        global_flag=[bool(f) for f in g_flag],
    )
    return out


def _scored(
    config: ClientConfig, package: ModelPackage, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """(score, flag, how) of ``rows``: this device's calibration when it belongs to the
    installed model, else the global model's own score and threshold."""
    g, g_flag = onnx_score(package.onnx_bytes, rows)
    return _personalized(config, package, rows, g, g_flag)


def _personalized(
    config: ClientConfig,
    package: ModelPackage,
    rows: np.ndarray,
    g: np.ndarray,
    g_flag: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    calibration = load_calibration(config)
    digest = hashlib.sha256(package.onnx_bytes).hexdigest()
    if calibration is not None and calibration.model_digest == digest:
        score = calibration.score(rows, g)
        return (
            score,
            score > calibration.threshold,
            {
                "personalized": True,
                "threshold": calibration.threshold,
                "false_alarm_rate": calibration.false_alarm_rate,
            },
        )
    why = "no calibration yet"
    if calibration is not None:
        why = f"the calibration belongs to model version {calibration.model_version}"
    return (
        g,
        g_flag,
        {
            "personalized": False,
            "reason": f"{why}: global model only (`fl-client run` calibrates)",
            "threshold": None,
            "false_alarm_rate": None,
        },
    )


#: Templates shown per flagged window by ``fl-client score``.
EXPLAINED_TEMPLATES = 3


def score_logs(
    config: ClientConfig, *, windows: int = 12, now: float | None = None
) -> dict[str, object]:
    """Read the log sources' new lines, then score the newest ``windows`` closed windows
    with the installed model (and this device's calibration). Each flagged window comes
    with the templates that contribute most: the columns furthest from the fleet's
    normal (the model's own standardization, ``(transform(count) - mean) / std``), each
    with its count and one masked line of that window. This stays on the device."""
    state = ingest_logs(config, CycleReport(client_id=config.client_id))
    installed = InstalledModels(config.state_dir / "models")
    package = installed.load_current(config.trusted_package_keys())
    schema = FeatureSchema.from_dict(package.metadata.feature_schema)
    matcher = log_matcher(schema)
    vocabulary = matcher.vocabulary
    patterns = {t.feature: t.pattern for t in vocabulary.templates}
    if state is None:
        raise FeatureError("client.json names no log_sources: nothing to score")
    chosen = closed_windows(state, now=time.time() if now is None else now)[-windows:]
    out: dict[str, object] = {
        "client_id": config.client_id,
        "model_version": package.version,
        "vocabulary_version": vocabulary.version,
        "window_seconds": state.window_seconds,
        "windows": [],
    }
    if not chosen:
        return out
    rows = window_rows(chosen, matcher, state.window_seconds)
    score, flag, how = _scored(config, package, rows)
    out.update(how)
    deviation = schema.apply(rows)
    explained = len(vocabulary.templates) + 1  # template columns and "unknown"
    scored = []
    for i, window in enumerate(chosen):
        item: dict[str, object] = {
            "start": datetime.fromtimestamp(window.start, UTC).isoformat(),
            "end": datetime.fromtimestamp(window.start + state.window_seconds, UTC).isoformat(),
            "lines": window.lines,
            "score": float(score[i]),
            "flagged": bool(flag[i]),
        }
        if flag[i]:
            examples: dict[str, tuple[int, str]] = {}  # feature -> (count, masked line)
            for message, count in window.messages.items():
                template = matcher.match(message)
                feature = "unknown" if template is None else f"tpl_{template}"
                if count > examples.get(feature, (0, ""))[0]:
                    examples[feature] = (count, message)
            top = np.argsort(-np.abs(deviation[i, :explained]), kind="stable")
            item["templates"] = [
                {
                    "feature": schema.names[j],
                    "pattern": patterns.get(schema.names[j]),
                    "count": int(rows[i, j]),
                    "deviation": round(float(deviation[i, j]), 2),
                    "example": examples.get(schema.names[j], (0, None))[1],
                }
                for j in top[:EXPLAINED_TEMPLATES]
            ]
        scored.append(item)
    out["windows"] = scored
    out["flagged"] = int(flag.sum())
    return out


def calibration_status(config: ClientConfig, installed_version: int | None) -> dict | None:
    calibration = load_calibration(config)
    if calibration is None:
        return None
    return {
        "model_version": calibration.model_version,
        "current": calibration.model_version == installed_version,
        "threshold": calibration.threshold,
        "false_alarm_rate": calibration.false_alarm_rate,
        "num_rows": calibration.num_rows,
    }


def run_cycle(config: ClientConfig) -> CycleReport:
    """Pull, train once per model version, spool, upload. Offline is not an error."""
    started = time.monotonic()
    report = CycleReport(client_id=config.client_id)
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    key = sealing.load_signing_key(config.signing_key_path)
    installed = InstalledModels(state / "models")
    spool = Spool(state / "spool")

    logs = ingest_logs(config, report)
    config = pull_model(config, installed, report)
    report.installed_version = installed.current_version()
    refresh_calibration(config, installed, report, logs)

    last = _read_json(state / "last_trained.json")
    if report.installed_version is None:
        report.messages.append("no verified model installed yet: nothing to train")
    elif config.one_update_per_version and last.get("version") == report.installed_version:
        report.messages.append(
            f"already sent an update for version {report.installed_version}: not training"
        )
    else:
        package = installed.load_current(config.trusted_package_keys())
        # Local DP: the device keeps its own count of noised updates and stops at the
        # package's max_updates (its budget), whatever the server does.
        dp = package.metadata.training.dp
        local_dp = dp is not None and dp.mode == "local"
        dp_cap = dp.max_updates if dp is not None and local_dp else None
        dp_sent = int(last.get("local_dp_updates", 0))
        if dp_cap is not None and dp_sent >= dp_cap:
            report.messages.append(f"local DP budget spent ({dp_sent} updates): not training")
            trained = None
        else:
            trained = train_update(config, package, key, report, logs)
        if trained is not None:
            update, residuals = trained
            spool.add(update.update_id, update.envelope)  # durable before the residual moves
            residuals.save(package.metadata.model_kind, update.residual)
            done = {"version": package.version, "local_dp_updates": dp_sent + local_dp}
            _write_json(state / "last_trained.json", done)
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


def verify_bundle_file(config: ClientConfig, path: Path):  # -> fedlib.trust.airgap.VerifiedBundle
    """Check an air-gap bundle offline against this device's pinned root and key."""
    from fedlib.trust.airgap import verify_bundle

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
        "calibration": calibration_status(
            config, InstalledModels(state / "models").current_version()
        ),
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str).encode())

"""``fl-admin``: the operator's command line for one deployment.

    fl-admin init --holdout holdout.npz        # keys, buckets, holdout, model version 1
    fl-admin enroll CLIENT_ID --public-key client_key.pub.pem --out client.json
    fl-admin revoke CLIENT_ID
    fl-admin status [--json]
    fl-admin holdout [FILE] [--json]           # new holdout version; its parts' sizes
    fl-admin rollback --to-version N --reason TEXT   # what the fl_rollback DAG does
    fl-admin keys --export-package-key OUT.pem   # for outside verifiers (model_signing)
    fl-admin bundles list | get KEY --out FILE   # air-gap bundles to carry across
    fl-admin credentials policy CLIENT_ID        # a device's S3 policy JSON (MinIO: by hand)
    fl-admin privacy init-secret [KEYS_DIR]      # the DP noise secret, once

Settings come from ``--config`` / ``$FL_SERVER_CONFIG`` / ``./fl-server.toml`` and
``FL_*`` environment variables (see :mod:`fedlib.server.settings`); S3 keys from
``FL_S3_ACCESS_KEY`` / ``FL_S3_SECRET_KEY``. Exit status: 0 done, 1 refused or failed
(the reason on one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedlib.crypto import pq_signing, sealing, signing
from fedlib.errors import FedError, VerificationError
from fedlib.files import atomic_write
from fedlib.models.evaluation import (
    auc_interval,
    evaluate_onnx,
    precision_warnings,
    score_metrics,
)
from fedlib.models.logfeatures import log_zone
from fedlib.models.model import KINDS, FeatureSchema, create_model, onnx_score
from fedlib.ops import templates
from fedlib.server import rotation
from fedlib.server.credentials import IamCredentialIssuer
from fedlib.server.deployment import Deployment, Holdout
from fedlib.server.records import RollbackAction
from fedlib.server.rounds import package_model
from fedlib.server.settings import ServerSettings
from fedlib.storage.store import S3Config
from fedlib.trust.package import SIGNATURE_FILE
from fedlib.wire.vocabulary import TemplateVocabulary


class SetupError(FedError):
    """fl-admin cannot reach the deployment: a setting or secret it needs is missing."""


def _settings_source(path: str | None) -> str:
    """Where the settings came from, as :meth:`ServerSettings.load` looks them up."""
    if path:
        return f"settings from {path}"
    env = os.environ.get("FL_SERVER_CONFIG")
    if env:
        found = Path(env).is_file()
        return f"settings from {env}" if found else f"FL_SERVER_CONFIG={env} does not exist"
    if Path("fl-server.toml").is_file():
        return "settings from ./fl-server.toml"
    return "no settings file (no --config, FL_SERVER_CONFIG unset, no ./fl-server.toml)"


def _ambient_credentials(s3: S3Config) -> bool:
    """Whether boto3 finds credentials of its own (shared files, a profile, SSO, or an
    instance/container role on AWS). Roles are probed only for AWS itself: they cannot
    sign for another endpoint, and probing them costs a network timeout."""
    import botocore.session
    from botocore.credentials import create_credential_resolver
    from botocore.exceptions import BotoCoreError

    try:
        resolver = create_credential_resolver(botocore.session.get_session())
        if s3.endpoint_url is not None:
            for provider in ("container-role", "iam-role"):
                resolver.remove(provider)
        return resolver.load_credentials() is not None
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names no profile: say so, one line
        raise SetupError(f"S3 credentials: {exc}") from None


def admin_s3_config(settings: ServerSettings, config_path: str | None = None) -> S3Config:
    """The S3 endpoint and keys fl-admin uses, or a :class:`SetupError` naming exactly
    what to set (a bare "no credentials" from deep inside botocore names nothing)."""
    s3 = settings.s3()
    if s3.access_key and s3.secret_key:
        return s3
    if not s3.access_key and not s3.secret_key and _ambient_credentials(s3):
        return s3
    missing = " and ".join(
        name
        for name, value in (
            ("FL_S3_ACCESS_KEY", s3.access_key),
            ("FL_S3_SECRET_KEY", s3.secret_key),
        )
        if not value
    )
    endpoint = s3.endpoint_url or "AWS S3 (s3_endpoint_url is not set)"
    raise SetupError(
        f"no S3 credentials for {endpoint}: set {missing} in the environment (or "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY); the endpoint is s3_endpoint_url in "
        f"the settings file named by FL_SERVER_CONFIG (or FL_S3_ENDPOINT_URL); "
        f"{_settings_source(config_path)}"
    )


def _deployment(args: argparse.Namespace) -> Deployment:
    settings = ServerSettings.load(args.config)
    return Deployment(settings, admin_s3_config(settings, args.config))


def initial_package(
    deployment: Deployment,
    holdout: Holdout,
    *,
    kind: str | None = None,
    seed: int = 0,
    vocabulary: TemplateVocabulary | None = None,
):
    """Version 1: a fresh model whose scaling and threshold come from the benign rows of
    the holdout's calibration part; its published metrics from the evaluation part.

    The holdout is the server's own data, so no device row is needed to start; later
    versions move only through federated updates.
    """
    settings = deployment.settings
    kind = kind or settings.model_kind
    parts = holdout.split(deployment.holdout_split_key(), settings.holdout_calibration_fraction)
    benign = parts.calibration.benign()
    schema = FeatureSchema.from_data(
        holdout.feature_names, benign, settings.transform_for(benign), vocabulary=vocabulary
    )
    model = create_model(kind, schema, seed=seed)
    model.calibrate_threshold(benign, quantile=settings.threshold_quantile)
    training = settings.training(kind)
    draft = package_model(model, version=1, training=training)
    ev = parts.evaluation
    metrics = evaluate_onnx(draft.onnx_bytes, ev.features, ev.labels, interval=True).as_dict()
    return package_model(model, version=1, training=training, metrics=metrics)


def cmd_init(args: argparse.Namespace) -> int:
    holdout = Holdout.from_bytes(Path(args.holdout).read_bytes())  # before any side effect
    vocabulary = None
    if args.vocabulary:
        vocabulary = TemplateVocabulary.from_json(Path(args.vocabulary).read_bytes())
        if holdout.feature_names != vocabulary.feature_names():
            raise ValueError(
                f"the holdout's features are not those of vocabulary {vocabulary.version}: "
                "count it with `fl-admin templates holdout` and this vocabulary"
            )
    deployment = _deployment(args)
    deployment.ensure_keys()
    deployment.ensure_buckets()
    deployment.init_channel()
    if deployment.holdout_version() is None:
        deployment.save_holdout(holdout)
    else:
        print("a holdout exists already; `fl-admin holdout FILE` stores a new version")
        holdout = deployment.load_holdout()
    deployment.save_fleet(deployment.load_fleet())
    registry = deployment.registry(signing=True)
    if registry.active_version() is None:
        package = initial_package(
            deployment, holdout, kind=args.model_kind, seed=args.seed, vocabulary=vocabulary
        )
        registry.publish(package)
        print(
            f"published version 1 ({package.metadata.model_kind}, "
            f"AUC {package.metadata.metrics['auc']:.3f} on the holdout's evaluation rows)"
        )
    else:
        print(f"models already published (active version {registry.active_version()})")
    rotation.publish_device_config(deployment)  # whom devices seal to, whom they trust
    print(f"keys in {deployment.keys_dir}; buckets ready at {deployment.s3.endpoint_url}")
    return 0


def cmd_templates_learn(args: argparse.Namespace) -> int:
    previous = None
    if args.previous:
        previous = TemplateVocabulary.from_json(Path(args.previous).read_bytes())

    def messages() -> Iterator[str]:
        for path in args.logs:
            for entry in templates.read_sample(Path(path), args.format, regex=args.regex):
                yield entry.message

    vocabulary = templates.learn(
        messages(),
        version=previous.version + 1 if previous else 1,
        previous=previous,
        similarity=args.similarity,
        min_count=args.min_count,
        max_templates=args.max_templates,
    )
    doc = vocabulary.model_dump(mode="json", by_alias=True)
    atomic_write(args.out, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())
    kept = sum(t.count for t in vocabulary.templates)
    print(
        f"vocabulary {vocabulary.version}: {len(vocabulary.templates)} templates covering "
        f"{kept} sample lines, written to {args.out} (review it, then "
        "`fl-admin init --vocabulary` it with a holdout counted by `templates holdout`)"
    )
    return 0


def cmd_templates_holdout(args: argparse.Namespace) -> int:
    vocabulary = TemplateVocabulary.from_json(Path(args.vocabulary).read_bytes())
    zone = log_zone(args.timezone)
    periods = templates.read_periods(Path(args.labels), zone)
    holdout = templates.count_holdout(
        [Path(p) for p in args.logs],
        vocabulary,
        log_format=args.format,
        regex=args.regex,
        window_seconds=args.window_seconds,
        anomalous=periods,
        zone=zone,
    )
    atomic_write(args.out, holdout.to_bytes())
    print(
        f"{len(holdout.labels)} windows ({int(holdout.labels.sum())} anomalous) with the "
        f"{len(holdout.feature_names)} features of vocabulary {vocabulary.version}: {args.out}"
    )
    return 0


def cmd_templates_publish(args: argparse.Namespace) -> int:
    vocabulary = TemplateVocabulary.from_json(Path(args.vocabulary).read_bytes())
    holdout = Holdout.from_bytes(Path(args.holdout).read_bytes())  # before any side effect
    change = templates.publish_vocabulary(_deployment(args), vocabulary, holdout)
    if args.json:
        doc: dict[str, Any] = {
            "published_version": change.package.version if change.package else None,
            "previous_version": change.previous_version,
            "vocabulary_version": vocabulary.version,
            "holdout_version": change.holdout_version,
            "carried": change.carried,
            "new": change.new,
            "dropped": change.dropped,
            "metrics": change.package.metadata.metrics if change.package else None,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(change.summary())
    return 0


def client_config_document(
    deployment: Deployment,
    client_id: str,
    *,
    features_dir: str | None,
    state_dir: str,
    access_key: str | None,
    secret_key: str | None,
    log_sources: list[dict[str, str]] | None = None,
) -> dict[str, object]:
    """What a device needs, as written by ``enroll``: no secret of the server's."""
    settings = deployment.settings
    server_key = deployment.current_server_public_key()
    doc: dict[str, object] = {
        "client_id": client_id,
        "inbox_url": f"s3://{settings.inbox_bucket}",
        "models_url": f"s3://{settings.models_bucket}",
        "s3": {
            "endpoint_url": deployment.s3.endpoint_url,
            "region": deployment.s3.region,
            "access_key": access_key,
            "secret_key": secret_key,
        },
        "server_public_key_pem": sealing.public_pem(server_key).decode(),
        # A device enrolled on the hybrid suite never lets a config move it back.
        "require_post_quantum": sealing.suite_of(server_key) in sealing.POST_QUANTUM_SUITES,
        "package_signing_keys_pem": [
            pq_signing.public_pem(key).decode()
            for _, key in sorted(deployment.trusted_package_keys().items())
        ],
        "channel_root_json": deployment.channel_root().decode(),
        "state_dir": state_dir,
    }
    if features_dir is not None:
        doc["features_dir"] = features_dir
    if log_sources:
        doc["log_sources"] = log_sources
    return doc


def write_client_config(path: Path | str, doc: dict[str, object]) -> None:
    """Write a ``client.json`` (it holds the device's S3 secret): atomically and mode
    0600 from the first byte, so no other user can read it even for a moment and a
    crash leaves the old file or the new one."""
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)


def issuer(deployment: Deployment) -> IamCredentialIssuer:
    """Per-device S3 keys through the AWS IAM API (AWS, SeaweedFS; MinIO: by hand)."""
    return IamCredentialIssuer(deployment.s3)


def cmd_enroll(args: argparse.Namespace) -> int:
    deployment = _deployment(args)
    fleet = deployment.load_fleet()
    kid = fleet.enroll(args.client_id, Path(args.public_key).read_bytes(), add_key=args.add_key)
    access_key, secret_key = args.access_key, args.secret_key
    if access_key is None and deployment.settings.credential_issuer == "iam":
        creds = issuer(deployment).issue(
            args.client_id,
            inbox_bucket=deployment.settings.inbox_bucket,
            models_bucket=deployment.settings.models_bucket,
        )
        access_key, secret_key = creds.access_key, creds.secret_key
        print(f"issued least-privilege S3 keys for {args.client_id} ({creds.user_name})")
    deployment.save_fleet(fleet)
    zone = {} if args.log_timezone is None else {"timezone": args.log_timezone}
    if zone:
        log_zone(args.log_timezone)  # refused here, not on the device
    logs = [{"path": path, "format": args.log_format, **zone} for path in args.log or ()]
    doc = client_config_document(
        deployment,
        args.client_id,
        features_dir=None
        if logs and args.features_dir is None
        else args.features_dir or "features",
        state_dir=args.state_dir,
        access_key=access_key,
        secret_key=secret_key,
        log_sources=logs,
    )
    out = Path(args.out)
    write_client_config(out, doc)
    print(f"enrolled {args.client_id} (key {kid}); client config written to {out}")
    return 0


def holdout_document(deployment: Deployment) -> dict[str, Any]:
    """What ``fl-admin holdout`` reports: the current holdout's calibration and evaluation
    parts (rows, anomalies), the active model's AUC and bootstrap interval on the
    evaluation part, and why that part is too small for its figures (``warnings``)."""
    parts = deployment.holdout_parts()
    doc: dict[str, Any] = {
        "version": parts.evaluation.version,
        "calibration_fraction": deployment.settings.holdout_calibration_fraction,
    }
    for name, part in (("calibration", parts.calibration), ("evaluation", parts.evaluation)):
        doc[name] = {"rows": int(part.labels.size), "anomalies": int(part.labels.sum())}
    registry = deployment.registry()
    active = registry.active_version()
    interval = None
    if active is not None:
        ev = parts.evaluation
        scores, flags = onnx_score(registry.read_version(active).onnx_bytes, ev.features)
        low, high = auc_interval(scores, ev.labels)
        interval = (low, high)
        doc["active"] = {
            "version": active,
            "auc": score_metrics(scores, flags, ev.labels).auc,
            "auc_low": low,
            "auc_high": high,
        }
    doc["warnings"] = precision_warnings(doc["evaluation"]["anomalies"], interval)
    return doc


def cmd_holdout(args: argparse.Namespace) -> int:
    deployment = _deployment(args)
    if args.file:
        holdout = Holdout.from_bytes(Path(args.file).read_bytes())
        active = deployment.registry().active_version()
        if active is not None:
            names = deployment.registry().read_metadata(active).feature_schema["names"]
            if holdout.feature_names != names:
                raise ValueError(
                    f"the holdout's features are not those of active v{active}; a holdout "
                    "for a new template vocabulary goes in with `fl-admin templates publish`"
                )
        version = deployment.save_holdout(holdout)
        print(f"holdout version {version} is now current (rounds evaluate on it from now on)")
    doc = holdout_document(deployment)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"holdout version {doc['version']}:")
        for name, use in (
            ("calibration", "threshold, FLTrust reference, gate"),
            ("evaluation", "every published figure"),
        ):
            part = doc[name]
            print(f"  {name:<12} {part['rows']:>7} rows, {part['anomalies']:>6} anomalies ({use})")
        if "active" in doc:
            a = doc["active"]
            print(
                f"  active v{a['version']} on the evaluation part: AUC {a['auc']:.3f} "
                f"(95% bootstrap interval {a['auc_low']:.3f}-{a['auc_high']:.3f})"
            )
    for warning in doc["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    deployment = _deployment(args)
    if args.key_id:  # one key: the end of a device key rotation, the device stays enrolled
        print(rotation.revoke_device_key(deployment, args.client_id, args.key_id).summary())
        return 0
    fleet = deployment.load_fleet()
    revoked = fleet.revoke(args.client_id)
    deployment.save_fleet(fleet)
    if deployment.settings.credential_issuer == "iam":
        issuer(deployment).revoke(args.client_id)
    print(f"revoked {args.client_id}: keys {', '.join(revoked)}")
    return 0


def export_package_key(
    deployment: Deployment, *, key_id: str | None = None, version: int | None = None
) -> tuple[str, ec.EllipticCurvePublicKey, str]:
    """The OpenSSF (ECDSA P-256) package-signing public key an outside verifier needs
    for ``model_signing verify key``: the one that signs new versions, a listed key id,
    or the one that signed ``version`` (found by the key hint in its signature.bin;
    retired keys too). Returns (key id, key, what it is)."""
    keys = {
        kid: key
        for kid, key in deployment.trusted_package_keys(include_retired=True).items()
        if isinstance(key, ec.EllipticCurvePublicKey)
    }
    if version is not None:
        # the signature the channel vouches for, not whatever sits under packages/vN/
        blob = deployment.registry().read_files(version)[SIGNATURE_FILE]
        try:
            hint = json.loads(blob)["verificationMaterial"]["publicKey"]["hint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise VerificationError(f"signature of version {version} names no key: {exc}") from None
        found = [kid for kid, key in keys.items() if signing.key_hint(key) == hint]
        if not found:
            raise VerificationError(
                f"version {version} was signed by a key this deployment does not hold "
                f"(hint {hint}); `fl-admin keys` lists the package keys"
            )
        return found[0], keys[found[0]], f"signed version {version}"
    current = signing.key_id(deployment.package_signing_key().public_key())
    kid = key_id or current
    if kid not in keys:
        raise KeyError(f"no package-signing key {kid}; `fl-admin keys` lists them")
    return kid, keys[kid], "signs new versions" if kid == current else "an older key"


def cmd_keys(args: argparse.Namespace) -> int:
    if args.export_package_key:
        # the current key or a key id needs only keys_dir; a version's signer reads S3
        settings = ServerSettings.load(args.config)
        deployment = (
            _deployment(args) if args.version is not None else Deployment(settings, settings.s3())
        )
        kid, key, what = export_package_key(deployment, key_id=args.key_id, version=args.version)
        out = args.export_package_key
        atomic_write(out, signing.public_key_pem(key), mode=0o644)
        print(f"package-signing key {kid} ({what}) written to {out}; check a package with")
        print(
            f"  model_signing verify key PACKAGE_DIR --signature PACKAGE_DIR/{SIGNATURE_FILE} "
            f"--public_key {out}"
        )
        return 0
    doc = rotation.key_inventory(_deployment(args))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for key in doc["server_keys"]:  # type: ignore[attr-defined]
        mark = " (current)" if key["current"] else ""
        print(f"server HPKE key  {key['key_id']}  {key['suite']}{mark}")
    print(f"accepted suites  {', '.join(doc['accepted_suites'])}")  # type: ignore[arg-type]
    for key in doc["package_signing_keys"]:  # type: ignore[attr-defined]
        mark = " (signs new versions)" if key["current"] else ""
        print(f"package key      {key['key_id']}{mark}")
    print(f"device config    serial {doc['device_config_serial']}")
    print(f"channel root     v{doc['channel']['root_version']}")  # type: ignore[index]
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    """Every rotation: one line saying what moved (and the device config serial)."""
    deployment = _deployment(args)
    if args.command == "rotate-server-key":
        done = rotation.rotate_server_key(deployment, args.suite)
    elif args.command == "retire-server-key":
        done = rotation.retire_server_key(deployment, args.key_id, force=args.force)
    elif args.command == "rotate-package-key":
        done = rotation.rotate_package_key(deployment)
    elif args.command == "retire-package-key":
        done = rotation.retire_package_key(deployment, args.key_id)
    elif args.command == "rotate-channel-key":
        done = rotation.rotate_channel_key(deployment, args.role, root_keys=args.root_keys)
    else:  # add-device-key
        done = rotation.add_device_key(
            deployment, args.client_id, Path(args.public_key).read_bytes()
        )
    print(done.summary())
    return 0


def status_document(deployment: Deployment, *, recent_rounds: int = 5) -> dict[str, Any]:
    """What ``fl-admin status`` prints: the dashboard's version rows and newest rounds."""
    from fedlib.ops import dashboard
    from fedlib.server.rollback import active_pin

    registry = deployment.registry()
    versions = []
    for row in reversed(dashboard.version_rows(deployment)):
        doc: dict[str, object] = {
            "version": row.version,
            "auc": row.auc,
            "auc_low": row.auc_low,
            "auc_high": row.auc_high,
            "ap": row.ap,
            "parent_version": row.parent_version,
            "rollback_of": row.rollback_of,
            "rolled_back": row.rolled_back,
            "round_id": row.round_id,
            "rollback_reason": row.rollback_reason,
            "rollback_by": row.rollback_by,
            "rollback_source": row.rollback_source,
            "rollback_run_id": row.rollback_run_id,
            "published_at": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.created_at_ms / 1000))
                if row.created_at_ms
                else None
            ),
        }
        if row.error:
            doc["error"] = row.error
        versions.append(doc)
    rounds = [
        {
            "run_id": r.run_id,
            "decision": r.decision,
            "accepted": r.accepted,
            "rejected": r.rejected_total,
            "published_version": r.published_version,
            # the evaluation part's AUC and its 95% bootstrap interval (the report's)
            "candidate_auc": (r.candidate_metrics or {}).get("auc"),
            "candidate_auc_low": (r.candidate_metrics or {}).get("auc_low"),
            "candidate_auc_high": (r.candidate_metrics or {}).get("auc_high"),
            "rolled_back": bool(r.rollback and r.rollback.rolled_back),
            "largest_weight_share": r.largest_weight_share,
            "largest_share_client": r.largest_share_client,
        }
        for r in dashboard.rounds(deployment, limit=recent_rounds).items
    ]
    pin = active_pin(deployment)
    pending = sum(1 for _ in deployment.inbox.list("updates/"))
    quarantined = dashboard.quarantined_updates(deployment)
    fleet = deployment.load_fleet()
    return {
        "active_version": registry.active_version(),
        # objects the signed channel does not name: ignored by reads, shown to the operator
        "integrity": dashboard.models_integrity(deployment).to_doc(),
        "pinned": pin.to_doc() if pin else None,
        "holdout_version": deployment.holdout_version(),
        "versions": versions,
        "recent_rounds": rounds,
        "pending_updates": pending,
        "quarantined": quarantined,
        "clients": fleet.client_ids(),
        "revoked_clients": sorted(
            set(fleet.client_ids(include_revoked=True)) - set(fleet.client_ids())
        ),
    }


def cmd_status(args: argparse.Namespace) -> int:
    doc = status_document(_deployment(args))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"active version:  {doc['active_version']}")
    if doc["pinned"]:
        pin = RollbackAction.from_doc(doc["pinned"])
        print(f"pinned:          by {pin.describe()}")
    for v in doc["versions"]:
        auc = "-" if v["auc"] is None else f"{v['auc']:.3f}"
        if v["auc_low"] is not None and v["auc_high"] is not None:
            auc += f" [{v['auc_low']:.3f}, {v['auc_high']:.3f}]"
        extra = f" (rollback of {v['rollback_of']}" if v["rollback_of"] else ""
        if v["rollback_of"]:
            who = f" by {v['rollback_by']} via {v['rollback_source']}" if v["rollback_by"] else ""
            run = f" run {v['rollback_run_id']}" if v["rollback_run_id"] else ""
            extra += f"{who}{run}: {v['rollback_reason']})"
        extra += " (rolled back)" if v["rolled_back"] else ""
        extra += f" ERROR {v['error']}" if v.get("error") else ""
        print(f"  v{v['version']:<4} auc {auc}  {v['published_at']}{extra}")
    for r in doc["recent_rounds"]:
        published = f" -> v{r['published_version']}" if r["published_version"] else ""
        rollback = " (rollback)" if r["rolled_back"] else ""
        share = r.get("largest_weight_share")
        largest = (
            f", largest device share {share:.1%} ({r['largest_share_client']})"
            if share is not None
            else ""
        )
        auc = r.get("candidate_auc")
        scored = ""
        if auc is not None:
            scored = f", candidate AUC {auc:.3f}"
            if r.get("candidate_auc_low") is not None and r.get("candidate_auc_high") is not None:
                scored += f" [{r['candidate_auc_low']:.3f}, {r['candidate_auc_high']:.3f}]"
        print(
            f"  round {r['run_id']}: {r['decision']}{published}{rollback}, "
            f"{r['accepted']} accepted, {r['rejected']} rejected{scored}{largest}"
        )
    integrity = doc["integrity"]
    for warning in integrity["warnings"]:
        print(f"INTEGRITY WARNING models bucket {warning['key']}: {warning['reason']}")
    if integrity["total"] > len(integrity["warnings"]):
        print(f"INTEGRITY WARNING ... {integrity['total'] - len(integrity['warnings'])} more")
    print(f"pending updates: {doc['pending_updates']}")
    print(f"quarantined:     {doc['quarantined']}")
    print(f"clients:         {len(doc['clients'])}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """The operator's rollback without the UI: the function ``fl_rollback`` calls, so the
    same refusals, the same new version and the same pin."""
    from fedlib.server.rollback import manual_rollback

    action = manual_rollback(
        _deployment(args),
        args.to_version,
        args.reason,
        by=args.by or getpass.getuser(),
        source="fl-admin",
    )
    if args.json:
        print(json.dumps(action.to_doc(), indent=2))
    else:
        print(f"published version {action.version}: {action.describe()}")
        print(f"pinned: automatic rollback leaves v{action.version} active until a round")
        print("publishes a candidate that passed the gate, or you roll back again")
    return 0


def cmd_round(args: argparse.Namespace) -> int:
    from fedlib.server.pipeline import run_round

    run_id = args.run_id or time.strftime("manual__%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report = run_round(
        _deployment(args),
        run_id,
        min_clients=args.min_clients,
        max_updates=args.max_updates,
        dry_run=args.dry_run,
        progress=None if args.json else lambda line: print(f"  {line}", flush=True),
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.summary())
    return 0


def cmd_credentials(args: argparse.Namespace) -> int:
    """The IAM policy JSON of a device (or of the server) for stores without an IAM API
    (MinIO: ``mc admin policy create``); buckets default to the deployment's settings."""
    from fedlib.server.credentials import client_policy, server_policy

    settings = ServerSettings.load(args.config)
    if args.credentials_command == "server-policy":
        buckets = args.buckets or [
            settings.inbox_bucket,
            settings.models_bucket,
            settings.state_bucket,
            settings.airgap_bucket,
        ]
        doc = server_policy(buckets)
    else:
        doc = client_policy(
            args.client_id,
            args.inbox_bucket or settings.inbox_bucket,
            args.models_bucket or settings.models_bucket,
        )
    print(json.dumps(doc, indent=2))
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    """Create the DP noise secret once (e.g. from the init container that owns a
    read-only secrets mount); an existing secret is kept, never replaced."""
    from fedlib.server.privacy import NOISE_SECRET_FILE, load_noise_secret

    keys_dir = Path(args.keys_dir or ServerSettings.load(args.config).keys_dir)
    path = keys_dir / NOISE_SECRET_FILE
    existed = path.exists()
    load_noise_secret(keys_dir, create=True)
    print(f"{path}: {'kept' if existed else 'created'}")
    return 0


def cmd_bundles(args: argparse.Namespace) -> int:
    """Air-gap bundles the ``fl_airgap_export`` DAG wrote: list them, or fetch one (checked
    against its export record) into a file to carry across."""
    from fedlib.server import airgap

    deployment = _deployment(args)
    if args.bundles_command == "list":
        entries = airgap.list_bundles(deployment)
        if args.json:
            print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
            return 0
        if not entries:
            where = airgap.bundle_url(deployment, airgap.BUNDLES_PREFIX)
            print(f"no bundles in {where} (trigger the fl_airgap_export DAG)")
            return 0
        for e in entries:
            version = "-" if e.version is None else f"v{e.version}"
            note = f"  expires {e.expires}" if e.expires else ""
            note += f"  ({e.problem})" if e.problem else ""
            print(f"{e.key}  {e.size:>10,} B  {_iso(e.modified_ms)}  {version:>5}{note}")
        return 0
    entry, data = airgap.fetch_bundle(deployment, args.key)
    atomic_write(args.out, data, mode=0o644)
    checked = entry.problem or "matches its export record"
    version = "" if entry.version is None else f", model version {entry.version}"
    print(
        f"{args.out}: {entry.url}, {entry.size:,} bytes{version}, sha256 {entry.sha256} ({checked})"
    )
    print(f"on the device: fl-client verify-bundle {args.out} --config client.json")
    return 0


def _iso(ms: int | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "-"


def cmd_config(args: argparse.Namespace) -> int:
    if args.example:
        print(ServerSettings.example_toml(), end="")
    else:
        print(ServerSettings.load(args.config).model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-admin", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="fl-server.toml (default: $FL_SERVER_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="keys, buckets, holdout and model version 1")
    init.add_argument("--holdout", required=True, help=".npz with holdout_X, holdout_y")
    init.add_argument("--model-kind", default=None, choices=sorted(KINDS))
    init.add_argument("--seed", type=int, default=0)
    init.add_argument(
        "--vocabulary", help="template vocabulary (fl-admin templates learn): devices count logs"
    )
    init.set_defaults(func=cmd_init)

    tpl = sub.add_parser("templates", help="the log template vocabulary devices count with")
    tpl_sub = tpl.add_subparsers(dest="templates_command", required=True)
    learn = tpl_sub.add_parser("learn", help="mine templates from sample logs (Drain)")
    learn.add_argument("logs", nargs="+", help="sample log files (.gz read as gzip)")
    learn.add_argument("--format", default="syslog", choices=templates.FORMATS)
    learn.add_argument("--regex", help="format regex: named groups message and time")
    learn.add_argument("--out", required=True, help="the vocabulary file to review")
    learn.add_argument("--previous", help="the vocabulary this one replaces (keeps its ids)")
    learn.add_argument("--min-count", type=int, default=2, help="drop rarer templates")
    learn.add_argument("--max-templates", type=int, default=1024)
    learn.add_argument("--similarity", type=float, default=0.4, help="Drain's sim_th")
    learn.set_defaults(func=cmd_templates_learn)
    count = tpl_sub.add_parser(
        "holdout", help="count labeled logs into a holdout .npz with a vocabulary's features"
    )
    count.add_argument("logs", nargs="+")
    count.add_argument("--vocabulary", required=True)
    count.add_argument("--format", default="syslog", choices=templates.FORMATS)
    count.add_argument("--regex")
    count.add_argument(
        "--labels", required=True, help="CSV of anomalous periods: start,end[,class] (ISO 8601)"
    )
    count.add_argument("--window-seconds", type=int, default=300)
    count.add_argument("--out", required=True)
    count.add_argument(
        "--timezone",
        default=None,
        help="IANA zone of stamps and label times without an offset (default UTC), as "
        "the devices' log_sources say",
    )
    count.set_defaults(func=cmd_templates_holdout)
    publish = tpl_sub.add_parser(
        "publish",
        help="publish a new vocabulary as the next model version, with a holdout counted "
        "by it (the columns that survive keep their parameters)",
    )
    publish.add_argument("vocabulary", help="the reviewed vocabulary file (templates learn)")
    publish.add_argument(
        "--holdout", required=True, help="labeled windows counted with it (templates holdout)"
    )
    publish.add_argument("--json", action="store_true")
    publish.set_defaults(func=cmd_templates_publish)

    enroll = sub.add_parser("enroll", help="register a device key, write its client config")
    enroll.add_argument("client_id")
    enroll.add_argument("--public-key", required=True)
    enroll.add_argument("--out", required=True)
    enroll.add_argument(
        "--features-dir", default=None, help="feature files (default: features, unless --log)"
    )
    enroll.add_argument(
        "--log", action="append", help="a log file or glob the device reads (repeatable)"
    )
    enroll.add_argument("--log-format", default="syslog", choices=templates.FORMATS)
    enroll.add_argument(
        "--log-timezone", default=None, help="IANA zone of its stamps without an offset"
    )
    enroll.add_argument("--state-dir", default="state")
    enroll.add_argument(
        "--access-key", default=None, help="device S3 key (default: issue one via IAM)"
    )
    enroll.add_argument("--secret-key", default=None)
    enroll.add_argument(
        "--add-key",
        action="store_true",
        help="rotation: add this key next to the device's active one (revoke the old one "
        "later with `revoke CLIENT_ID --key-id`); without it a different key is refused",
    )
    enroll.set_defaults(func=cmd_enroll)

    holdout = sub.add_parser(
        "holdout",
        help="upload a new labeled holdout version (optional) and report its calibration "
        "and evaluation parts; warns when the evaluation part is too small",
    )
    holdout.add_argument(
        "file", nargs="?", default=None, help=".npz with holdout_X, holdout_y[, feature_names]"
    )
    holdout.add_argument("--json", action="store_true")
    holdout.set_defaults(func=cmd_holdout)

    revoke = sub.add_parser("revoke", help="refuse every later update of a device")
    revoke.add_argument("client_id")
    revoke.add_argument(
        "--key-id", default=None, help="revoke only this key (after a device key rotation)"
    )
    revoke.set_defaults(func=cmd_revoke)

    keys = sub.add_parser("keys", help="key ids in use: server HPKE, package, channel")
    keys.add_argument("--json", action="store_true")
    keys.add_argument(
        "--export-package-key",
        metavar="OUT.pem",
        default=None,
        help="write the package-signing public key (for model_signing verify) and exit",
    )
    which = keys.add_mutually_exclusive_group()
    which.add_argument("--key-id", default=None, help="with --export-package-key: this key")
    which.add_argument(
        "--version", type=int, default=None, help="with --export-package-key: its signer"
    )
    keys.set_defaults(func=cmd_keys)
    rotate = sub.add_parser(
        "rotate-server-key", help="new current HPKE key; old ones still open their updates"
    )
    rotate.add_argument("--suite", choices=sorted(sealing.SUITES), default=None)
    rotate.set_defaults(func=cmd_rotate)
    retire = sub.add_parser("retire-server-key", help="delete an old HPKE key")
    retire.add_argument("key_id")
    retire.add_argument(
        "--force", action="store_true", help="even if inbox updates are sealed to it"
    )
    retire.set_defaults(func=cmd_rotate)
    sub.add_parser(
        "rotate-package-key", help="new package-signing key, trusted before it signs"
    ).set_defaults(func=cmd_rotate)
    retire_pkg = sub.add_parser("retire-package-key", help="stop trusting an old package key")
    retire_pkg.add_argument("key_id")
    retire_pkg.set_defaults(func=cmd_rotate)
    channel = sub.add_parser(
        "rotate-channel-key", help="rotate a TUF role's key through the root chain"
    )
    channel.add_argument(
        "--role", required=True, choices=["root", "targets", "snapshot", "timestamp"]
    )
    channel.add_argument("--root-keys", type=int, default=0, help="new root key count")
    channel.set_defaults(func=cmd_rotate)
    add_key = sub.add_parser(
        "add-device-key", help="enroll a device's next signing key next to its current one"
    )
    add_key.add_argument("--client-id", required=True)
    add_key.add_argument("--public-key", required=True)
    add_key.set_defaults(func=cmd_rotate)

    rollback = sub.add_parser(
        "rollback", help="roll back to a known-good version and pin it (as fl_rollback does)"
    )
    rollback.add_argument("--to-version", type=int, required=True, help="a known-good version")
    rollback.add_argument("--reason", required=True, help="why; kept in the signed metadata")
    rollback.add_argument("--by", default=None, help="who (default: your user name)")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(func=cmd_rollback)

    rnd = sub.add_parser("round", help="run one round in this process (no Airflow)")
    rnd.add_argument("--run-id", default=None)
    rnd.add_argument("--min-clients", type=int, default=None)
    rnd.add_argument("--max-updates", type=int, default=None)
    rnd.add_argument("--dry-run", action="store_true")
    rnd.add_argument("--json", action="store_true")
    rnd.set_defaults(func=cmd_round)

    config = sub.add_parser("config", help="print the effective settings (or --example)")
    config.add_argument("--example", action="store_true", help="a commented fl-server.toml")
    config.set_defaults(func=cmd_config)

    status = sub.add_parser("status", help="versions, pending and quarantined updates")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    creds = sub.add_parser("credentials", help="S3 policy JSON for stores without an IAM API")
    creds_sub = creds.add_subparsers(dest="credentials_command", required=True)
    policy = creds_sub.add_parser("policy", help="a device's policy (own inbox prefix, models)")
    policy.add_argument("client_id")
    policy.add_argument("--inbox-bucket", default=None, help="default: inbox_bucket setting")
    policy.add_argument("--models-bucket", default=None, help="default: models_bucket setting")
    server_pol = creds_sub.add_parser("server-policy", help="the server's policy (its buckets)")
    server_pol.add_argument("buckets", nargs="*", help="default: the four bucket settings")
    creds.set_defaults(func=cmd_credentials)

    bundles = sub.add_parser("bundles", help="air-gap bundles in the air-gap bucket")
    bundles_sub = bundles.add_subparsers(dest="bundles_command", required=True)
    bundles_list = bundles_sub.add_parser("list", help="key, size, time and model version")
    bundles_list.add_argument("--json", action="store_true")
    bundles_get = bundles_sub.add_parser("get", help="download one bundle into a file")
    bundles_get.add_argument("key", help="bundles/NAME, NAME or s3://BUCKET/bundles/NAME")
    bundles_get.add_argument("--out", required=True, help="the file to write")
    bundles.set_defaults(func=cmd_bundles)

    privacy = sub.add_parser("privacy", help="differential privacy: the noise secret")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    init_secret = privacy_sub.add_parser(
        "init-secret", help="create keys_dir/dp-noise-secret.bin if absent"
    )
    init_secret.add_argument("keys_dir", nargs="?", default=None, help="default: keys_dir")
    privacy.set_defaults(func=cmd_privacy)
    return parser


#: What the library raises on purpose (a refusal, an unreachable or refusing store, bad
#: input, a missing file): the reason on one line and exit 1. Anything else is a bug and
#: keeps its traceback.
EXPECTED_FAILURES: tuple[type[Exception], ...] = (FedError, ValueError, OSError, KeyError)


def one_line(exc: BaseException) -> str:
    """The reason of an expected failure as one line (pydantic's reports span several)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or repr(exc)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 1 refused or failed, with the reason on stderr; 2 usage
    (argparse exits with 2 by itself), so scripts can tell a typo from a refusal."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "keys" and not args.export_package_key and (args.key_id or args.version):
        parser.error("--key-id and --version go with --export-package-key OUT.pem")
    try:
        return args.func(args)
    except EXPECTED_FAILURES as exc:
        print(f"fl-admin: {one_line(exc)}", file=sys.stderr)
        return 1

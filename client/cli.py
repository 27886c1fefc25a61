"""``fl-client``: the device agent's command line, meant to be run from cron.

fl-client keygen --out state/client_key.pem     # once; send the .pub.pem to the operator
fl-client run --config client.json              # one cycle; exit 0 when merely offline
fl-client status --config client.json [--json]
fl-client rotate-key --config client.json [--activate]   # new signing key, no downtime
fl-client score FILE --config client.json       # JSON: personalized scores and flags
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from client.agent import (
    install_bundle_file,
    run_cycle,
    score_features,
    score_logs,
    status,
    verify_bundle_file,
)
from client.config import ClientConfig
from client.features import FeatureError
from fedlib.crypto import sealing
from fedlib.errors import VerificationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _config(args: argparse.Namespace) -> ClientConfig:
    path = args.config or os.environ.get("FL_CLIENT_CONFIG")
    if not path:
        raise ValueError("no client config: pass --config or set FL_CLIENT_CONFIG")
    return ClientConfig.load(Path(path))


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_USAGE
    key = sealing.generate_signing_key()
    sealing.write_private_key(out, key)
    pub = out.with_name(out.name.removesuffix(".pem") + ".pub.pem")
    pub.write_bytes(sealing.public_pem(key))
    print(f"private key: {out} (keep it on this device)")
    print(f"public key:  {pub} (give it to the operator: fl-admin enroll)")
    print(f"key id:      {sealing.key_id(key)}")
    return EXIT_OK


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Step 1 makes the next key (the operator enrolls it next to the current one); step 2
    (``--activate``) signs with it from now on. Updates already in the spool stay signed
    by the old key, which the server accepts until the operator revokes it."""
    config = _config(args)
    current = config.signing_key_path
    nxt = current.with_name(current.name.removesuffix(".pem") + ".next.pem")
    if not args.activate:
        if nxt.exists():
            print(f"{nxt} exists already; enroll it, then run rotate-key --activate")
            return EXIT_OK
        key = sealing.generate_signing_key()
        sealing.write_private_key(nxt, key)
        pub = nxt.with_name(nxt.name.removesuffix(".pem") + ".pub.pem")
        pub.write_bytes(sealing.public_pem(key))
        print(f"next key {sealing.key_id(key)} in {nxt}; give {pub} to the operator:")
        print(f"  fl-admin add-device-key --client-id {config.client_id} --public-key {pub.name}")
        print("then run: fl-client rotate-key --activate")
        return EXIT_OK
    if not nxt.exists():
        print(f"no next key at {nxt}: run rotate-key first", file=sys.stderr)
        return EXIT_USAGE
    old = sealing.load_signing_key(current)
    old_id = sealing.key_id(old)
    retired = current.with_name(current.name.removesuffix(".pem") + f".retired-{old_id[:16]}.pem")
    os.replace(current, retired)  # kept until the operator revokes it, then delete it
    os.replace(nxt, current)
    print(f"signing with key {sealing.key_id(sealing.load_signing_key(current))} from now on")
    print("once `fl-client status` shows no pending updates, the operator revokes the old one:")
    print(f"  fl-admin revoke {config.client_id} --key-id {old_id}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    report = run_cycle(_config(args))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
        return EXIT_OK if report.ok else EXIT_FAILED
    print(f"[{report.client_id}] model: {report.model_message or 'unchanged'}")
    for message in report.messages:
        print(f"[{report.client_id}] {message}")
    if report.trained:
        print(
            f"[{report.client_id}] trained on {report.num_rows} rows -> update "
            f"{report.update_id} ({report.update_bytes} bytes, sealed and signed)"
        )
    sent = len(report.uploaded) + len(report.already_present)
    print(
        f"[{report.client_id}] uploaded {sent}, waiting {len(report.waiting)}"
        f"{' (offline)' if report.offline else ''}, {report.seconds:.2f}s"
    )
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    info = status(_config(args))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(f"client:            {info['client_id']}")
        print(f"installed version: {info['installed_version']}")
        print(f"pending updates:   {len(info['pending_updates'])}")  # type: ignore[arg-type]
        print(f"sent updates:      {info['sent_updates']}")
        cal = info.get("calibration")
        if isinstance(cal, dict):
            stale = "" if cal["current"] else " (stale: the next run refits it)"
            print(
                f"calibration:       threshold {cal['threshold']:.4f} at "
                f"{cal['false_alarm_rate']:.2%} false alarms, version {cal['model_version']}, "
                f"{cal['num_rows']} local rows{stale}"
            )
        else:
            print("calibration:       none yet")
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        if args.features:
            result = score_features(config, Path(args.features))
        elif config.log_sources:
            result = score_logs(config, windows=args.windows)
        else:
            print("fl-client score: give a feature file (no log_sources in the config)")
            return EXIT_FAILED
    except VerificationError as exc:
        print(f"fl-client: the installed model does not verify: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except FeatureError as exc:
        print(f"fl-client score: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.features or args.json:  # a feature file's scores are JSON, as they always were
        print(json.dumps(result))
    else:
        print(render_log_scores(result))
    return EXIT_OK


def render_log_scores(result: dict) -> str:
    """``fl-client score`` on logs, for a person: flagged windows and why."""
    windows = result["windows"]
    lines = [
        f"model version {result['model_version']} (vocabulary {result['vocabulary_version']}), "
        f"{len(windows)} windows of {result['window_seconds']} s, "
        f"{result.get('flagged', 0)} flagged"
        + ("" if result.get("personalized", True) else f" ({result.get('reason')})")
    ]
    for window in windows:
        if not window["flagged"]:
            continue
        lines.append(
            f"FLAGGED {window['start']} .. {window['end']}  score {window['score']:.3f}  "
            f"{window['lines']} lines"
        )
        for t in window["templates"]:
            direction = "more" if t["deviation"] > 0 else "fewer"
            lines.append(
                f"  {t['feature']} ({direction} than usual, {t['deviation']:+.1f} sd): "
                f"{t['count']}x  {t['pattern'] or 'lines no template matches'}"
            )
            if t["example"]:
                lines.append(f"      e.g. {t['example']}")
    return "\n".join(lines)


def cmd_verify_bundle(args: argparse.Namespace) -> int:
    try:
        bundle = verify_bundle_file(_config(args), Path(args.bundle))
    except VerificationError as exc:
        print(f"fl-client: bundle REFUSED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"bundle OK: model version {bundle.version}, valid until {bundle.expires:%Y-%m-%d %H:%M} "
        f"UTC, signed package ({len(bundle.files)} files)"
    )
    return EXIT_OK


def cmd_install_bundle(args: argparse.Namespace) -> int:
    try:
        package = install_bundle_file(_config(args), Path(args.bundle))
    except VerificationError as exc:
        print(f"fl-client: bundle REFUSED, installed model unchanged: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"installed model version {package.version} from {args.bundle}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-client", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="create this device's Ed25519 signing key")
    keygen.add_argument("--out", default="client_key.pem")
    keygen.add_argument("--force", action="store_true")
    keygen.set_defaults(func=cmd_keygen)

    for name, func, help_text in (
        ("run", cmd_run, "one cycle: pull, train, seal, spool, upload"),
        ("status", cmd_status, "installed model and spool"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="client.json (default: $FL_CLIENT_CONFIG)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
    for name, func, help_text in (
        ("verify-bundle", cmd_verify_bundle, "check an air-gap bundle (offline)"),
        ("install-bundle", cmd_install_bundle, "verify and install an air-gap bundle"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("bundle")
        p.add_argument("--config", help="client.json (default: $FL_CLIENT_CONFIG)")
        p.set_defaults(func=func)
    rotate = sub.add_parser("rotate-key", help="replace this device's signing key")
    rotate.add_argument("--config", help="client.json (default: $FL_CLIENT_CONFIG)")
    rotate.add_argument("--activate", action="store_true", help="switch to the enrolled next key")
    rotate.set_defaults(func=cmd_rotate_key)
    score = sub.add_parser(
        "score",
        help="score a feature file (JSON), or the newest log windows with reasons: "
        "global model + this device's calibration",
    )
    score.add_argument("features", nargs="?", help="a .npy or .csv feature file")
    score.add_argument("--windows", type=int, default=12, help="newest log windows to score")
    score.add_argument("--json", action="store_true", help="machine-readable output (logs)")
    score.add_argument("--config", help="client.json (default: $FL_CLIENT_CONFIG)")
    score.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, FeatureError, FileNotFoundError) as exc:
        print(f"fl-client: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

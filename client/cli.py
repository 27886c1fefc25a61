"""``fl-client``: the device agent's command line, meant to be run from cron.

fl-client keygen --out state/client_key.pem     # once; send the .pub.pem to the operator
fl-client run --config client.json              # one cycle; exit 0 when merely offline
fl-client status --config client.json [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from client.agent import install_bundle_file, run_cycle, status, verify_bundle_file
from client.config import ClientConfig
from client.features import FeatureError
from fedlib import crypto
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
    key = crypto.generate_signing_key()
    crypto.write_private_key(out, key)
    pub = out.with_name(out.name.removesuffix(".pem") + ".pub.pem")
    pub.write_bytes(crypto.public_pem(key))
    print(f"private key: {out} (keep it on this device)")
    print(f"public key:  {pub} (give it to the operator: fl-admin enroll)")
    print(f"key id:      {crypto.key_id(key)}")
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
    return EXIT_OK


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

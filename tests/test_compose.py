"""The production stack is valid Compose and wired the way the project expects.

Docker is not available here, so the file is validated against the Compose
specification (``check-jsonschema --builtin-schema vendor.compose-spec``, schema
vendored in the package, no network) and its wiring is checked against the project's
own settings: services, health checks, start order, the S3 endpoint, buckets, keys.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from fedlib.server.credentials import server_policy
from fedlib.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
LONG_RUNNING = {
    "postgres",
    "minio",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
}
ONE_SHOT = {"minio-init", "airflow-init", "fl-init"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_specification():
    checker = Path(sys.executable).parent / "check-jsonschema"
    proc = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_services_health_checks_and_start_order(compose):
    services = compose["services"]
    assert set(services) >= LONG_RUNNING | ONE_SHOT
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck", {})
        assert check.get("test"), f"{name} has no health check"
        assert services[name].get("restart") == "always", name
    for name in ONE_SHOT:
        assert "healthcheck" not in services[name] and "restart" not in services[name]
    # Airflow components wait for healthy Postgres/MinIO and a finished init
    for name in ("airflow-apiserver", "airflow-scheduler"):
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["minio"]["condition"] == "service_healthy"
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
        assert deps["fl-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["fl-init"]["depends_on"]["minio-init"]["condition"] == (
        "service_completed_successfully"
    )
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"


def test_airflow_reaches_minio_with_the_projects_buckets_and_settings(compose):
    services = compose["services"]
    env = services["airflow-scheduler"]["environment"]
    conn = json.loads(
        re.sub(r"\$\{(\w+)[^}]*\}", r"\1", env["AIRFLOW_CONN_FL_S3"])
    )  # ${VAR:?msg} -> VAR
    endpoint = urlsplit(conn["extra"]["endpoint_url"])
    assert endpoint.hostname == "minio"
    minio_command = services["minio"]["command"]
    assert f'--address ":{endpoint.port}"' in minio_command
    assert f"{endpoint.port}:{endpoint.port}" in services["minio"]["ports"]
    assert (conn["login"], conn["password"]) == ("FL_S3_ACCESS_KEY", "FL_S3_SECRET_KEY")

    toml_mount = next(v for v in services["airflow-scheduler"]["volumes"] if "fl-server" in v)
    host, container, *_ = toml_mount.split(":")
    assert env["FL_SERVER_CONFIG"] == container
    settings = ServerSettings.model_validate(tomllib.loads((ROOT / host).read_text()))
    assert settings.s3_endpoint_url == conn["extra"]["endpoint_url"]
    assert settings.credential_issuer == "none"  # MinIO has no AWS IAM API
    buckets = [
        settings.inbox_bucket,
        settings.models_bucket,
        settings.state_bucket,
        settings.airgap_bucket,
    ]
    init_script = services["minio-init"]["command"][0]
    assert f"for bucket in {' '.join(buckets)}; do" in init_script
    policy = json.loads((ROOT / "deploy/minio/fl-server-policy.json").read_text())
    assert policy == server_policy(buckets)  # kept current with the generator

    # keys: a read-only secrets mount where the settings look, writable only for fl-init
    keys = str(settings.keys_dir)
    for name, service in services.items():
        mounts = [v for v in service.get("volumes", []) if f":{keys}" in v]
        if name == "fl-init":
            assert mounts and not mounts[0].endswith(":ro")
        elif name == "airflow-apiserver":  # the web process: public keys only
            assert mounts == [f"./secrets/dadm-fl/public:{keys}/public:ro"], mounts
        elif name.startswith("airflow-"):
            assert mounts and all(m.endswith(":ro") for m in mounts), name


def test_image_extends_the_official_airflow_image_at_our_version():
    from importlib.metadata import version

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}", dockerfile, re.M)
    pinned = re.search(r"^ARG AIRFLOW_VERSION=(\S+)", dockerfile, re.M)
    assert pinned and pinned.group(1) == version("apache-airflow")
    assert "COPY --chown=airflow:0 fedlib" in dockerfile
    assert "keys" not in dockerfile.lower().replace("keys and s3 credentials", "")


def test_no_secret_is_written_into_the_stack():
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("PASSWORD", "SECRET"):
        for line in text.splitlines():
            if var in line and ":" in line and not line.lstrip().startswith("#"):
                value = line.split(":", 1)[1]
                assert "${" in value or "$$" in value or var not in value.upper(), line
    example = (ROOT / ".env.example").read_text()
    assert "change-me" in example  # placeholders only
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/" in ignored

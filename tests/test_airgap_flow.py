"""Air-gap end to end: the export DAG writes a bundle; a device with no endpoint at all
verifies and installs it through the fl-client CLI, and refuses tampered or older ones."""

from __future__ import annotations

import json

from client.agent import InstalledModels
from client.cli import main as client_main
from fedlib.ops.admin import main as admin_main
from fedlib.ops.admin import write_client_config
from tests.test_client import make_client
from tests.test_registry import bump


def export(dagbag, deployment, **conf) -> dict:
    dag = dagbag.dags["fl_airgap_export"]
    run = dag.test(run_conf={"version": None, "expires_in_days": 30, **conf})
    assert run.state == "success"
    store = deployment.store(deployment.settings.airgap_bucket)
    records = [i.key for i in store.list("bundles/") if i.key.endswith(".json")]
    docs = [json.loads(store.get(k)) for k in records]
    return {d["version"]: (d, store.get(d["key"])) for d in docs}


def test_export_verify_install_offline(airflow_deployment, dagbag, tmp_path, capsys):
    dep = airflow_deployment
    registry = dep.registry(signing=True)
    registry.publish(bump(registry.read_active(), 2))
    bundles = export(dagbag, dep)
    bundles.update(export(dagbag, dep, version=1))
    record, bundle = bundles[2]
    assert record["active"] and record["size"] == len(bundle)

    rows = dep.dataset.clients[dep.dataset.client_ids[0]]
    config = make_client(dep, tmp_path, "far-1", rows)  # enrolled while connected...
    cfg_path = tmp_path / "far-1" / "client.json"
    doc = json.loads(cfg_path.read_text())
    doc["s3"] = {"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1}  # ...now no route
    write_client_config(cfg_path, doc)

    files = {}
    for version, (_, data) in bundles.items():
        files[version] = tmp_path / f"v{version}.tar"
        files[version].write_bytes(data)
    tampered = tmp_path / "tampered.tar"
    raw = bytearray(bundle)
    raw[len(raw) // 2] ^= 0x01
    tampered.write_bytes(bytes(raw))

    assert client_main(["verify-bundle", str(files[2]), "--config", str(cfg_path)]) == 0
    assert "bundle OK: model version 2" in capsys.readouterr().out
    assert client_main(["verify-bundle", str(tampered), "--config", str(cfg_path)]) == 1
    assert "REFUSED" in capsys.readouterr().err
    assert client_main(["install-bundle", str(files[2]), "--config", str(cfg_path)]) == 0
    models = InstalledModels(config.state_dir / "models")
    assert models.current_version() == 2
    assert models.load_current(config.trusted_package_keys()).version == 2
    assert client_main(["install-bundle", str(files[1]), "--config", str(cfg_path)]) == 1
    assert "older" in capsys.readouterr().err
    assert models.current_version() == 2


def test_bundle_timestamp_copied_into_the_live_bucket_is_refused_online(
    airflow_deployment, dagbag, tmp_path
):
    """A long-lived air-gap timestamp must not hold online devices on an old state.

    (A device that already trusts that timestamp version ignores an equal one; a device
    that has not seen it yet, like this fresh one, must refuse it.)"""
    import io
    import tarfile

    from client.agent import run_cycle

    dep = airflow_deployment
    rows = dep.dataset.clients[dep.dataset.client_ids[1]]
    _, bundle = export(dagbag, dep)[1]
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:  # an attacker copies them over
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if name == "timestamp.json" or name.endswith(".snapshot.json"):
                dep.models.put(f"tuf/metadata/{name}", tar.extractfile(member).read())
    config = make_client(dep, tmp_path, "online-1", rows)
    report = run_cycle(config)
    assert not report.ok and "air-gap" in report.model_message


def test_operator_finds_and_fetches_bundles_through_fl_admin(
    airflow_deployment, dagbag, tmp_path, capsys, caplog, monkeypatch
):
    """The export's log names the bundle as s3://BUCKET/KEY; ``fl-admin bundles list``
    shows it (key, size, time, version); ``bundles get`` writes the file a device then
    verifies offline; a bundle that does not match its export record is refused."""
    import logging

    dep = airflow_deployment
    with caplog.at_level(logging.INFO, logger="dadm_fl"):
        record, bundle = export(dagbag, dep)[1]
    url = f"s3://{dep.settings.airgap_bucket}/{record['key']}"
    assert record["url"] == url
    assert any(url in r.getMessage() for r in caplog.records), caplog.text

    # fl-admin with the deployment's settings file and the S3 keys from the environment
    monkeypatch.setenv("FL_S3_ENDPOINT_URL", dep.s3.endpoint_url)
    monkeypatch.setenv("FL_S3_ACCESS_KEY", dep.s3.access_key)
    monkeypatch.setenv("FL_S3_SECRET_KEY", dep.s3.secret_key)
    capsys.readouterr()
    assert admin_main(["bundles", "list", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["key"], entry["url"], entry["size"]) == (record["key"], url, len(bundle))
    assert entry["version"] == 1 and entry["sha256"] == record["sha256"] and entry["modified_ms"]
    assert admin_main(["bundles", "list"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(record["key"]) and f"{len(bundle):,} B" in line and " v1 " in line

    out = tmp_path / "carry" / "bundle.tar.gz"
    assert admin_main(["bundles", "get", record["key"], "--out", str(out)]) == 0
    assert out.read_bytes() == bundle
    said = capsys.readouterr().out
    assert "matches its export record" in said
    assert f"fl-client verify-bundle {out} --config client.json" in said
    # the form the DAG logs works too
    assert admin_main(["bundles", "get", url, "--out", str(tmp_path / "again.tar.gz")]) == 0
    assert (tmp_path / "again.tar.gz").read_bytes() == bundle

    rows = dep.dataset.clients[dep.dataset.client_ids[0]]
    make_client(dep, tmp_path, "far-2", rows)
    cfg = tmp_path / "far-2" / "client.json"
    assert client_main(["verify-bundle", str(out), "--config", str(cfg)]) == 0

    # refusals: exit 1 with the reason, nothing written
    store = dep.store(dep.settings.airgap_bucket)
    forged = record["key"].replace(".tar", "-forged.tar")
    store.put(forged, bundle[:-1] + bytes([bundle[-1] ^ 1]))
    store.put(f"{forged}.json", json.dumps({**record, "key": forged}).encode())
    capsys.readouterr()
    assert admin_main(["bundles", "get", forged, "--out", str(tmp_path / "forged")]) == 1
    assert "does not match its export record" in capsys.readouterr().err
    assert not (tmp_path / "forged").exists()
    assert admin_main(["bundles", "get", "bundles/nope.tar", "--out", str(tmp_path / "x")]) == 1
    assert "no such key" in capsys.readouterr().err
    assert admin_main(["bundles", "get", "s3://elsewhere/" + record["key"], "--out", "y"]) == 1
    assert "not in the air-gap bucket" in capsys.readouterr().err

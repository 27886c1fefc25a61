"""Air-gap end to end: the export DAG writes a bundle; a device with no endpoint at all
verifies and installs it through the fl-client CLI, and refuses tampered or older ones."""

from __future__ import annotations

import json

from client.agent import InstalledModels
from client.cli import main as client_main
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

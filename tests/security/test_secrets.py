"""Server private keys never leave the keys folder: not in any bucket, XCom, task log or
report. Runs a real fl_round (dag.test) and an air-gap export, then searches everything."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.test_fl_round_dag import T0, run_dag
from tests.test_round_runner import upload_updates


def secret_needles(keys_dir: Path) -> list[bytes]:
    """Every private key in the keys folder, as PEM body lines, raw bytes and base64."""
    needles: list[bytes] = []
    blocks = [
        block
        for path in keys_dir.rglob("*.pem")
        if not path.name.endswith(".pub.pem")  # public halves (keys_dir/public/) may travel
        for block in re.findall(
            rb"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", path.read_bytes(), re.S
        )
    ]  # a hybrid HPKE key is two blocks: ML-KEM-768 and X25519
    for pem in blocks:
        body = b"".join(pem.splitlines()[1:-1])
        needles += [body[:40], body[-40:]]
        key = serialization.load_pem_private_key(pem, password=None)
        try:
            raw = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        except ValueError:  # ECDSA has no raw form: its DER is what could leak
            raw = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )[-32:]
        needles += [raw, raw.hex().encode(), base64.b64encode(raw)]
    for path in keys_dir.rglob("*.bin"):  # the DP noise secret: seeds must not leak either
        raw = path.read_bytes()
        needles += [raw, raw.hex().encode(), base64.b64encode(raw)]
    assert len(needles) >= 5 * 8, "expected HPKE, package and channel keys"
    return needles


def test_no_private_key_anywhere_after_a_round(airflow_deployment, dagbag, airflow_home, capfd):
    dep = airflow_deployment
    upload_updates(dep, 3)
    assert run_dag(dagbag, T0).state == "success"
    export = dagbag.dags["fl_airgap_export"].test(run_conf={"version": None, "expires_in_days": 7})
    assert export.state == "success"
    needles = secret_needles(Path(dep.settings.keys_dir))

    searched = 0
    for bucket in (
        dep.settings.inbox_bucket,
        dep.settings.models_bucket,
        dep.settings.state_bucket,
        dep.settings.airgap_bucket,
    ):
        store = dep.store(bucket)
        for info in store.list(""):
            data = store.get(info.key)
            searched += 1
            for needle in needles:
                assert needle not in data, f"key material in s3://{bucket}/{info.key}"
    assert searched > 20

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        values = [str(v).encode() for v in session.scalars(select(XComModel.value)).all()]
    assert values, "the runs pushed XComs"
    out, err = capfd.readouterr()  # dag.test streams task logs (at the configured level)
    logs = [p.read_bytes() for p in Path(airflow_home, "logs").rglob("*") if p.is_file()]
    for blob in [*values, *logs, out.encode(), err.encode()]:
        for needle in needles:
            assert needle not in blob

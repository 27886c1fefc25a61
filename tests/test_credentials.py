"""Per-device S3 credentials against a real SeaweedFS: what the keys may and may not do."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from fedlib.errors import StoreError
from fedlib.ops.admin import main as admin_main
from fedlib.server.credentials import (
    ClientCredentials,
    CredentialError,
    CredentialIssuer,
    IamCredentialIssuer,
    client_policy,
    server_policy,
)
from fedlib.storage.store import S3Config, S3Store
from scripts.seaweed import SeaweedServer


def _buckets(admin: S3Config) -> dict[str, S3Store]:
    tag = uuid.uuid4().hex[:10]
    stores = {name: S3Store(f"{name}-{tag}", admin) for name in ("inbox", "models", "state")}
    for store in stores.values():
        store.ensure_bucket()
    stores["models"].put("packages/1/model.onnx", b"model v1")
    stores["state"].put("ledger/0", b"ledger")
    return stores


def _issuer(admin: S3Config) -> IamCredentialIssuer:
    # IAM users are server-wide: a unique prefix keeps tests on the shared server apart.
    return IamCredentialIssuer(admin, user_prefix=f"t{uuid.uuid4().hex[:8]}-", ready_timeout=10)


def _as(creds: ClientCredentials, admin: S3Config, bucket: str) -> S3Store:
    config = S3Config(
        endpoint_url=admin.endpoint_url,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        max_attempts=1,
    )
    return S3Store(bucket, config)


def _denied(action: Callable[[], Any]) -> None:
    with pytest.raises(StoreError, match="access denied"):
        action()


def _issue(issuer: IamCredentialIssuer, client_id: str, b: dict[str, S3Store]) -> ClientCredentials:
    return issuer.issue(client_id, inbox_bucket=b["inbox"].bucket, models_bucket=b["models"].bucket)


def test_policy_document_is_least_privilege() -> None:
    doc = client_policy("client-1", "fl-inbox", "fl-models")
    assert doc["Version"] == "2012-10-17"
    grants = {
        (s["Effect"], a, r) for s in doc["Statement"] for a in s["Action"] for r in s["Resource"]
    }
    assert grants == {
        ("Allow", "s3:PutObject", "arn:aws:s3:::fl-inbox/updates/client-1/*"),
        ("Allow", "s3:GetObject", "arn:aws:s3:::fl-models/*"),
        ("Allow", "s3:ListBucket", "arn:aws:s3:::fl-models"),
    }
    for bad_id in ("*", "client-1/*", "Client-1", "", "a?b", "../x"):
        with pytest.raises(ValueError):
            client_policy(bad_id, "fl-inbox", "fl-models")
    for bad_bucket in ("*", "fl-inbox/x", "FL", "fl-inbox*"):
        with pytest.raises(ValueError):
            client_policy("client-1", bad_bucket, "fl-models")
    with pytest.raises(ValueError):
        client_policy("client-1", "same", "same")


def test_policy_through_fl_admin(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MinIO operators print the policies with fl-admin; buckets default to the settings."""
    monkeypatch.chdir(tmp_path)  # no ./fl-server.toml here
    monkeypatch.delenv("FL_SERVER_CONFIG", raising=False)
    for name in ("INBOX", "MODELS", "STATE", "AIRGAP"):
        monkeypatch.delenv(f"FL_{name}_BUCKET", raising=False)
    assert (
        admin_main(
            ["credentials", "policy", "c-7", "--inbox-bucket", "fl-in", "--models-bucket", "fl-mod"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == client_policy("c-7", "fl-in", "fl-mod")
    assert admin_main(["credentials", "policy", "c-7"]) == 0
    assert json.loads(capsys.readouterr().out) == client_policy("c-7", "fl-inbox", "fl-models")
    config = tmp_path / "site.toml"
    config.write_text('inbox_bucket = "site-inbox"\nmodels_bucket = "site-models"\n')
    assert admin_main(["--config", str(config), "credentials", "policy", "c-7"]) == 0
    assert json.loads(capsys.readouterr().out) == client_policy("c-7", "site-inbox", "site-models")
    assert admin_main(["credentials", "server-policy"]) == 0
    assert json.loads(capsys.readouterr().out) == server_policy(
        ["fl-inbox", "fl-models", "fl-state", "fl-airgap"]
    )
    assert admin_main(["credentials", "server-policy", "aa-1", "bb-2"]) == 0
    assert json.loads(capsys.readouterr().out) == server_policy(["aa-1", "bb-2"])


def test_user_names_fit_iam_limits(s3_config: S3Config) -> None:
    issuer = IamCredentialIssuer(s3_config)
    assert isinstance(issuer, CredentialIssuer)
    assert issuer.user_name("client-1") == "fl-client-client-1"
    long_a, long_b = "a" * 63, "a" * 62 + "b"
    names = {issuer.user_name(long_a), issuer.user_name(long_b)}
    assert len(names) == 2 and all(len(n) <= 64 for n in names)
    assert issuer.user_name(long_a) == issuer.user_name(long_a)
    creds = ClientCredentials("AKIA", "very-secret", "u")
    assert "very-secret" not in repr(creds)


def test_issued_keys_are_least_privilege(s3_config: S3Config) -> None:
    b = _buckets(s3_config)
    issuer = _issuer(s3_config)
    one = _issue(issuer, "client-1", b)
    two = _issue(issuer, "client-2", b)
    assert one.access_key != two.access_key
    assert one.user_name == issuer.user_name("client-1")
    inbox, models, state = (_as(one, s3_config, b[n].bucket) for n in ("inbox", "models", "state"))

    inbox.put("updates/client-1/u1", b"update")
    inbox.put("updates/client-1/u2", b"update", if_absent=True)
    _as(two, s3_config, b["inbox"].bucket).put("updates/client-2/u1", b"other")
    _denied(lambda: inbox.put("updates/client-2/u9", b"forged"))
    _denied(lambda: inbox.put("updates/client-10/u9", b"prefix sibling"))
    _denied(lambda: inbox.put("root", b"x"))
    _denied(lambda: inbox.put("updates/client-1", b"no slash"))
    _denied(lambda: inbox.get("updates/client-1/u1"))
    _denied(lambda: inbox.get("updates/client-2/u1"))
    _denied(lambda: inbox.exists("updates/client-1/u1"))
    _denied(lambda: list(inbox.list()))
    _denied(lambda: list(inbox.list("updates/client-1/")))
    _denied(lambda: inbox.delete("updates/client-1/u1"))
    _denied(lambda: inbox.delete("updates/client-2/u1"))
    _denied(lambda: models.put("packages/2/model.onnx", b"evil"))
    _denied(lambda: models.delete("packages/1/model.onnx"))
    _denied(lambda: state.put("ledger/1", b"evil"))
    _denied(lambda: state.get("ledger/0"))
    _denied(lambda: list(state.list()))

    assert models.get("packages/1/model.onnx") == b"model v1"
    assert models.exists("packages/1/model.onnx")
    assert [o.key for o in models.list()] == ["packages/1/model.onnx"]
    # What the device wrote is there, for the server to read with its own keys.
    admin_inbox = b["inbox"]
    assert admin_inbox.get("updates/client-1/u1") == b"update"
    assert sorted(o.key for o in admin_inbox.list()) == [
        "updates/client-1/u1",
        "updates/client-1/u2",
        "updates/client-2/u1",
    ]
    admin_inbox.put("admin-still-works", b"ok")


def test_revoke_disables_keys(s3_config: S3Config) -> None:
    b = _buckets(s3_config)
    issuer = _issuer(s3_config)
    one = _issue(issuer, "client-1", b)
    two = _issue(issuer, "client-2", b)
    _as(one, s3_config, b["inbox"].bucket).put("updates/client-1/u1", b"x")

    issuer.revoke("client-1")
    _denied(lambda: _as(one, s3_config, b["inbox"].bucket).put("updates/client-1/u2", b"x"))
    _denied(lambda: _as(one, s3_config, b["models"].bucket).get("packages/1/model.onnx"))
    assert issuer.access_keys("client-1") == []
    issuer.revoke("client-1")  # idempotent
    issuer.revoke("never-enrolled")
    # The other client is untouched.
    _as(two, s3_config, b["inbox"].bucket).put("updates/client-2/u1", b"x")
    # Re-enrolling after a revoke starts afresh.
    again = _issue(issuer, "client-1", b)
    _as(again, s3_config, b["inbox"].bucket).put("updates/client-1/u3", b"x")


def test_reissue_rotates_the_key(s3_config: S3Config) -> None:
    b = _buckets(s3_config)
    issuer = _issuer(s3_config)
    old = _issue(issuer, "client-1", b)
    new = _issue(issuer, "client-1", b)
    assert new.access_key != old.access_key
    assert issuer.access_keys("client-1") == [new.access_key]
    _denied(lambda: _as(old, s3_config, b["inbox"].bucket).put("updates/client-1/a", b"x"))
    _as(new, s3_config, b["inbox"].bucket).put("updates/client-1/a", b"x")
    _denied(lambda: _as(new, s3_config, b["inbox"].bucket).put("updates/client-2/a", b"x"))
    # Leftover keys (e.g. from a crash mid-rotation) are cleaned up on the next issue.
    user = issuer.user_name("client-1")
    issuer.iam.create_access_key(UserName=user)
    issuer.iam.create_access_key(UserName=user)
    newest = _issue(issuer, "client-1", b)
    assert issuer.access_keys("client-1") == [newest.access_key]


def test_iam_needs_write_flag_and_survives_restart(
    seaweed_factory: Callable[..., SeaweedServer],
) -> None:
    server = seaweed_factory(iam_writable=False)
    admin = server.s3_config()
    b = _buckets(admin)
    issuer = _issuer(admin)
    with pytest.raises(CredentialError, match="readOnly=false"):
        _issue(issuer, "client-1", b)

    server.iam_writable = True
    server.restart()
    creds = _issue(issuer, "client-1", b)
    server.restart()
    # Users, keys and policies live in the filer, so they outlive the process; the
    # -s3.config admin identity keeps working beside them.
    inbox = _as(creds, admin, b["inbox"].bucket)
    inbox.put("updates/client-1/after-restart", b"x")
    _denied(lambda: inbox.put("updates/client-2/after-restart", b"x"))
    _denied(lambda: list(inbox.list()))
    assert b["inbox"].get("updates/client-1/after-restart") == b"x"
    assert issuer.access_keys("client-1") == [creds.access_key]

"""Issue 16 item 6: enrolling an enrolled id with another key is refused unless the
operator asks for the rotation path; the same key again changes nothing; a revoked key
stays revoked. Through the installed ``fl-admin`` (exit status as a shell sees it)."""

from __future__ import annotations

from pathlib import Path

from client.cli import main as client_main
from fedlib.crypto import sealing
from fedlib.ops.admin import main as admin_main
from fedlib.server.deployment import Deployment
from fedlib.server.settings import ServerSettings
from tests.test_admin import assert_refused, fl_admin


def keygen(tmp_path: Path, name: str) -> tuple[str, str]:
    """A device key through the client CLI: (public key path, key id)."""
    private = tmp_path / name / "client_key.pem"
    assert client_main(["keygen", "--out", str(private)]) == 0
    public = private.with_name("client_key.pub.pem")
    kid = sealing.key_id(sealing.load_verify_key(public.read_bytes()))
    return str(public), kid


def fleet_of() -> dict[str, tuple[str, int | None, int]]:
    fleet = Deployment(ServerSettings.load()).load_fleet()
    return {k: (e.client_id, e.revoked_at_ms, e.enrolled_at_ms) for k, e in fleet.entries.items()}


def test_enroll_refuses_a_second_key_unless_added_for_rotation(admin_env, tmp_path):
    assert admin_main(["init", "--holdout", str(admin_env["holdout"])]) == 0
    old_pub, old_kid = keygen(tmp_path, "old")
    new_pub, new_kid = keygen(tmp_path, "new")
    out = str(tmp_path / "client.json")

    def enroll(*extra: str, public: str, client: str = "dev-1"):
        return fl_admin("enroll", client, "--public-key", public, "--out", out, *extra)

    assert enroll(public=old_pub).returncode == 0
    first = fleet_of()
    assert enroll(public=old_pub).returncode == 0  # the same key again: nothing changes
    assert fleet_of() == first

    assert_refused(enroll(public=new_pub), "dev-1 is enrolled with key", "--add-key")
    assert fleet_of() == first  # refused before anything was written

    added = enroll("--add-key", public=new_pub)
    assert added.returncode == 0, added.stderr
    fleet = fleet_of()
    assert {k for k, (c, revoked, _) in fleet.items() if c == "dev-1" and revoked is None} == {
        old_kid,
        new_kid,
    }  # the rotation path: the old key stays until revoked

    assert fl_admin("revoke", "dev-1", "--key-id", old_kid).returncode == 0
    assert_refused(enroll(public=old_pub), f"key {old_kid} of dev-1 was revoked")
    assert_refused(enroll("--add-key", public=old_pub), "was revoked")
    assert fleet_of()[old_kid][1] is not None  # the operator's revocation stands

    other_pub, _ = keygen(tmp_path, "other")
    assert_refused(enroll("--add-key", public=other_pub, client="dev-2"), "no active key")
    assert_refused(enroll(public=new_pub, client="dev-2"), "already enrolled for dev-1")

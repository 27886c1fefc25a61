"""Key rotation without downtime, and the signed device config that carries it.

Every key the fleet depends on can be replaced while devices keep uploading:

- **Server HPKE keys**: a new key becomes current; the old one keeps opening what was
  sealed to it (spooled updates of offline devices) until the operator retires it, and
  retiring refuses while the inbox still holds updates sealed to it.
- **Package-signing keys**: the new key is trusted before it signs; the old one stays
  trusted until retired, so versions it signed still verify.
- **Channel keys** (TUF): online roles and root rotate through the root chain
  (``ChannelRepository.rotate_online_key`` / ``rotate_root`` in
  :mod:`fedlib.trust.channel_repository`); devices walk
  ``N.root.json -> N+1.root.json`` checking both thresholds.
- **Device keys**: a device's new signing key is enrolled next to the old one; the old
  key keeps working (spooled updates) until it is revoked on its own.

Devices learn the server key and the package-signing keys from ``device-config.json``,
a target of the TUF channel: signed by the targets key, listed in snapshot and
timestamp, so it is as fresh and untampered as the models themselves. Its ``serial``
only goes up. A device that seals with the post-quantum suite never accepts a config
that would move it back to classic X25519.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlib.crypto import pq_signing, sealing, signing
from fedlib.errors import FedError
from fedlib.trust.device_config import DEVICE_CONFIG_SCHEMA, DEVICE_CONFIG_TARGET, DeviceConfig
from fedlib.wire import protocol

if TYPE_CHECKING:
    from fedlib.server.deployment import Deployment
    from fedlib.trust.channel_repository import ChannelRepository


# -- server side ------------------------------------------------------------------------------


def device_config(deployment: Deployment, serial: int) -> DeviceConfig:
    """The device config of the deployment's current keys."""
    public = deployment.current_server_public_key()
    return DeviceConfig.model_validate(
        {
            "schema": DEVICE_CONFIG_SCHEMA,
            "serial": serial,
            "server_key": {
                "key_id": sealing.key_id(public),
                "suite": sealing.suite_name(sealing.suite_of(public)),
                "public_key_pem": sealing.public_pem(public).decode(),
            },
            "package_signing_keys_pem": [
                pq_signing.public_pem(key).decode()
                for _, key in sorted(deployment.trusted_package_keys().items())
            ],
        }
    )


def published_device_config(
    deployment: Deployment, repository: ChannelRepository | None = None
) -> DeviceConfig | None:
    """The device config the channel serves now (verified against its targets)."""
    repository = repository or deployment.channel_repository()
    data = repository.read_target(DEVICE_CONFIG_TARGET)
    return None if data is None else DeviceConfig.from_bytes(data)


def publish_device_config(deployment: Deployment) -> DeviceConfig:
    """Sign the current keys into the channel; the serial only goes up."""
    repository = deployment.channel_repository(signing=True)
    previous = published_device_config(deployment, repository)
    now = int(time.time() * 1000)
    serial = max(now, previous.serial + 1) if previous else now
    doc = device_config(deployment, serial)
    if previous is not None and previous.model_dump(exclude={"serial"}) == doc.model_dump(
        exclude={"serial"}
    ):
        return previous
    repository.put_target(DEVICE_CONFIG_TARGET, doc.to_bytes())
    return doc


@dataclass(frozen=True)
class Rotation:
    """What a rotation did, for the operator's screen."""

    what: str
    old: str | None
    new: str | None
    device_config_serial: int | None = None

    def summary(self) -> str:
        moved = f" ({self.old} -> {self.new})" if self.old or self.new else ""
        serial = (
            f"; device config serial {self.device_config_serial}"
            if self.device_config_serial
            else ""
        )
        return f"{self.what}{moved}{serial}"


def rotate_server_key(deployment: Deployment, suite: str | None = None) -> Rotation:
    """A new current HPKE key; the old ones keep opening updates sealed to them."""
    old = deployment.current_server_key_id()
    new = deployment.add_server_key(suite)
    doc = publish_device_config(deployment)
    return Rotation("server HPKE key rotated", old, new, doc.serial)


def pending_sealed_to(deployment: Deployment, kid: str) -> int:
    """Inbox updates whose (signed, cleartext) header names server key ``kid``.

    Only for the operator's safety check: headers are read, not trusted."""
    count = 0
    for info in deployment.inbox.list("updates/"):
        try:
            blob = deployment.inbox.get(info.key, max_bytes=protocol.MAX_ENVELOPE_BYTES)
            parts = protocol.split_envelope(blob)
            header = protocol.parse_header(parts.header_bytes)
        except FedError:  # a missing or broken object is the round's business
            continue
        count += header.server_key_id == kid
    return count


def retire_server_key(deployment: Deployment, kid: str, *, force: bool = False) -> Rotation:
    """Delete an old HPKE key once nothing in the inbox is sealed to it."""
    if kid == deployment.current_server_key_id():
        raise ValueError(f"{kid} is the current server key: rotate-server-key first")
    waiting = pending_sealed_to(deployment, kid)
    if waiting and not force:
        raise ValueError(
            f"{waiting} update(s) in the inbox are sealed to {kid}: run a round first "
            "(or --force: they will be quarantined as unknown_server_key)"
        )
    deployment.retire_server_key(kid)
    return Rotation("server HPKE key retired", kid, None)


def rotate_package_key(deployment: Deployment) -> Rotation:
    """A new package-signing key, trusted by devices before it signs anything."""
    old, new = deployment.rotate_package_key()
    doc = publish_device_config(deployment)
    return Rotation("package-signing key rotated", old, new, doc.serial)


def retire_package_key(deployment: Deployment, kid: str) -> Rotation:
    """Stop trusting an old package-signing key (devices drop it with the next config)."""
    deployment.untrust_package_key(kid)
    doc = publish_device_config(deployment)
    return Rotation("package-signing key retired", kid, None, doc.serial)


def rotate_channel_key(deployment: Deployment, role: str, *, root_keys: int = 0) -> Rotation:
    """Rotate a TUF role's key through the root chain (root keys must be loaded).

    ``role="root"`` replaces the root keys themselves (``root_keys`` new keys, default
    as many as now): root N+1 is signed by the old and the new threshold."""
    from fedlib.trust.channel_layout import ONLINE_ROLES
    from fedlib.trust.channel_repository import generate_signer

    repository = deployment.channel_repository(signing=True)
    if role == "root":
        count = root_keys or len(repository.keys.root)
        old = ",".join(sorted(s.public_key.keyid[:16] for s in repository.keys.root))
        signers = [generate_signer() for _ in range(count)]
        version = repository.rotate_root(signers)
        new = ",".join(sorted(s.public_key.keyid[:16] for s in signers))
        return Rotation(f"channel root keys rotated (root v{version})", old, new)
    if role not in ONLINE_ROLES:
        raise ValueError(f"unknown channel role {role!r}")
    old_key = repository.keys.online(role).public_key.keyid[:16]
    signer = repository.rotate_online_key(role)
    return Rotation(f"channel {role} key rotated", old_key, signer.public_key.keyid[:16])


def revoke_device_key(deployment: Deployment, client_id: str, kid: str) -> Rotation:
    """Revoke one signing key of a device (the end of its key rotation)."""
    fleet = deployment.load_fleet()
    fleet.revoke_key(client_id, kid)
    deployment.save_fleet(fleet)
    return Rotation(f"device key of {client_id} revoked", kid, None)


def add_device_key(deployment: Deployment, client_id: str, public_key_pem: bytes) -> Rotation:
    """Enroll a device's next signing key next to its current one."""
    fleet = deployment.load_fleet()
    if client_id not in fleet.client_ids():
        raise KeyError(f"{client_id} is not enrolled (or revoked): use enroll")
    kid = fleet.enroll(client_id, public_key_pem, add_key=True)
    deployment.save_fleet(fleet)
    return Rotation(f"device key of {client_id} added", None, kid)


def key_inventory(deployment: Deployment) -> dict[str, object]:
    """Key ids in use, for ``fl-admin keys`` (no key material)."""
    current = deployment.current_server_key_id()
    ring = deployment.server_keyring()
    package_current = signing.key_id(deployment.package_signing_key().public_key())
    published = published_device_config(deployment)
    return {
        "server_keys": [
            {
                "key_id": kid,
                "suite": sealing.suite_name(sealing.suite_of(ring.get(kid))),  # type: ignore[arg-type]
                "current": kid == current,
            }
            for kid in ring.key_ids()
        ],
        "accepted_suites": list(deployment.settings.accepted_hpke_suites),
        "package_signing_keys": [
            {"key_id": kid, "current": kid == package_current}
            for kid in sorted(deployment.trusted_package_keys())
        ],
        "device_config_serial": published.serial if published else None,
        "channel": _channel_keys(deployment),
    }


def _channel_keys(deployment: Deployment) -> dict[str, object]:
    status = deployment.channel_repository().status()
    return {"root_version": status.root_version}

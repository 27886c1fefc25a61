"""The fleet: enrolled devices, their signing keys and whether they are revoked.

The server opens an update only if its signing key belongs to an enrolled, unrevoked
client. The fleet is a small JSON document (public keys only) kept in the state
bucket; enrolling and revoking rewrite it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from fedlib.crypto import sealing
from fedlib.wire import protocol
from fedlib.wire.protocol import ClientId, KeyId

FLEET_SCHEMA = "dadm.fleet.v1"


class EnrollmentRefused(ValueError):
    """An enrollment that would change a device's keys without the operator saying so."""


class ClientEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: ClientId
    key_id: KeyId
    public_key_pem: str
    enrolled_at_ms: int
    revoked_at_ms: int | None = None


@dataclass
class Fleet:
    """Enrolled clients by signing-key id (a :class:`fedlib.crypto.sealing.ClientLookup`)."""

    entries: dict[str, ClientEntry] = field(default_factory=dict)
    _keys: dict[str, sealing.ClientKey] = field(default_factory=dict, repr=False)
    #: Key ids by client, for the first ``_indexed`` entries (entries are never removed:
    #: a revocation replaces one): enrolling device n costs O(1), not a scan of n - 1.
    _by_client: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _indexed: int = field(default=0, repr=False)

    def _key_ids(self, client_id: str) -> list[str]:
        """Every key id ever enrolled for ``client_id`` (revoked ones too)."""
        if self._indexed != len(self.entries):
            self._by_client = {}
            for kid, entry in self.entries.items():
                self._by_client.setdefault(entry.client_id, []).append(kid)
            self._indexed = len(self.entries)
        return self._by_client.get(client_id, [])

    def enroll(
        self,
        client_id: str,
        public_key_pem: bytes,
        *,
        add_key: bool = False,
        now_ms: int | None = None,
    ) -> str:
        """Register a client's Ed25519 key; return its key id.

        Enrolling the key a client already holds changes nothing. A *different* key for
        a client with an active key is refused unless ``add_key`` (the rotation path:
        the old key stays valid until revoked), so re-running enroll cannot silently
        leave two keys able to sign for one device. A revoked key is never re-enrolled:
        the operator's revocation stands; the device makes a new key.
        """
        public = sealing.load_verify_key(public_key_pem)
        kid = sealing.key_id(public)
        existing = self.entries.get(kid)
        if existing is not None and existing.client_id != client_id:
            raise EnrollmentRefused(f"key {kid} is already enrolled for {existing.client_id}")
        if existing is not None and existing.revoked_at_ms is not None:
            raise EnrollmentRefused(
                f"key {kid} of {client_id} was revoked; a revoked key is not enrolled again "
                "(the device needs a new key)"
            )
        if existing is not None:
            return kid  # the same key again: idempotent, nothing changes
        active = self.active_keys(client_id)
        if active and not add_key:
            raise EnrollmentRefused(
                f"{client_id} is enrolled with key {', '.join(active)}; enrolling key {kid} "
                "would leave both valid. To rotate, add the key with `fl-admin enroll "
                "--add-key` (or `fl-admin add-device-key`), then revoke the old one with "
                "`fl-admin revoke CLIENT_ID --key-id OLD_ID`"
            )
        if add_key and not active:
            raise EnrollmentRefused(
                f"{client_id} has no active key to add one next to: enroll without --add-key"
            )
        in_step = self._indexed == len(self.entries)
        self.entries[kid] = ClientEntry(
            client_id=client_id,
            key_id=kid,
            public_key_pem=public_key_pem.decode("ascii"),
            enrolled_at_ms=now_ms if now_ms is not None else int(time.time() * 1000),
        )
        if in_step:  # keep the index current instead of rebuilding it
            self._by_client.setdefault(client_id, []).append(kid)
            self._indexed += 1
        self._keys.pop(kid, None)
        return kid

    def active_keys(self, client_id: str) -> list[str]:
        """Key ids the client can sign with now (not revoked), sorted."""
        return sorted(
            kid for kid in self._key_ids(client_id) if self.entries[kid].revoked_at_ms is None
        )

    def revoke(self, client_id: str, *, now_ms: int | None = None) -> list[str]:
        """Revoke every key of a client; its later updates are quarantined as revoked_client."""
        stamp = now_ms if now_ms is not None else int(time.time() * 1000)
        revoked = []
        for kid, entry in list(self.entries.items()):
            if entry.client_id == client_id and entry.revoked_at_ms is None:
                self.entries[kid] = entry.model_copy(update={"revoked_at_ms": stamp})
                self._keys.pop(kid, None)
                revoked.append(kid)
        if not revoked:
            raise KeyError(f"no active key enrolled for {client_id}")
        return revoked

    def revoke_key(self, client_id: str, key_id: str, *, now_ms: int | None = None) -> None:
        """Revoke one key of a client (the end of a key rotation); its others stay valid."""
        entry = self.entries.get(key_id)
        if entry is None or entry.client_id != client_id:
            raise KeyError(f"{client_id} has no key {key_id}")
        if entry.revoked_at_ms is None:
            stamp = now_ms if now_ms is not None else int(time.time() * 1000)
            self.entries[key_id] = entry.model_copy(update={"revoked_at_ms": stamp})
            self._keys.pop(key_id, None)

    def lookup(self, key_id: str) -> sealing.ClientKey | None:
        cached = self._keys.get(key_id)
        if cached is not None:
            return cached
        entry = self.entries.get(key_id)
        if entry is None:
            return None
        key = sealing.ClientKey(
            client_id=entry.client_id,
            key_id=entry.key_id,
            public_key=sealing.load_verify_key(entry.public_key_pem.encode("ascii")),
            revoked=entry.revoked_at_ms is not None,
        )
        self._keys[key_id] = key
        return key

    def client_ids(self, *, include_revoked: bool = False) -> list[str]:
        return sorted(
            {
                e.client_id
                for e in self.entries.values()
                if include_revoked or e.revoked_at_ms is None
            }
        )

    def to_json(self) -> bytes:
        doc = {
            "schema": FLEET_SCHEMA,
            "clients": [self.entries[k].model_dump() for k in sorted(self.entries)],
        }
        return protocol.canonical_json(doc)

    @classmethod
    def from_json(cls, data: bytes) -> Fleet:
        raw = protocol.parse_json_limited(data, 64 * 1024 * 1024, "fleet document")
        if not isinstance(raw, dict) or raw.get("schema") != FLEET_SCHEMA:
            raise ValueError("not a dadm.fleet.v1 document")
        fleet = cls()
        for item in raw.get("clients", []):
            entry = ClientEntry.model_validate(item)
            fleet.entries[entry.key_id] = entry
        return fleet

"""Least-privilege S3 credentials for each device, issued through the AWS IAM API.

Why: a device's keys sit on hardware we do not control. Stolen keys must not let
anyone read other devices' updates, forge updates under another client id, delete
anything, or touch the model channel. So each device gets its own IAM user whose only
permissions are (see :func:`client_policy`):

* ``s3:PutObject`` on ``<inbox>/updates/<client_id>/*`` (no read, list or delete);
* ``s3:GetObject`` on ``<models>/*`` and ``s3:ListBucket`` on ``<models>``.

Everything else is an implicit deny (other buckets, the inbox root, ACLs, tagging,
bucket policies, IAM itself).

Where it works (measured against SeaweedFS 4.48 ``weed mini``; see tests):

* **SeaweedFS** serves the IAM API on the S3 port. Writes need
  ``-s3.iam.readOnly=false`` (:mod:`scripts.seaweed` sets it); otherwise every write
  fails with "IAM write operations are disabled on this server". Only identities
  with the ``Admin`` action may call it. The gateway enforces the policy JSON as
  written, the ``-s3.config`` identities keep working, and users, keys and policies
  are stored in the filer (``/etc/iam``) so they survive a restart. New keys work on
  the first request and deleted or deactivated keys fail on the next one (IAM and S3
  share the ``weed mini`` process); :meth:`IamCredentialIssuer.issue` still waits,
  bounded, for the new key to work, as AWS IAM and multi-gateway clusters are only
  eventually consistent.
* **AWS**: the same calls, ``S3Config(endpoint_url=None)``.
* **MinIO** has no AWS IAM API. Its policies use the same JSON, so an operator runs
  ``fl-admin credentials policy CLIENT_ID > p.json`` (buckets from the deployment's
  settings, or ``--inbox-bucket I --models-bucket M``), then ``mc admin policy create
  ALIAS fl-client-CLIENT_ID p.json``, ``mc admin user add ALIAS ACCESS SECRET`` and
  ``mc admin policy attach ALIAS fl-client-CLIENT_ID --user ACCESS``, and passes the
  keys to ``fl-admin enroll`` by hand. That is why the issuer is optional.

Limits: S3 has no create-only permission, so a device can overwrite its *own*
objects. The update's signature and idempotent key still hold, and the ledger
counts each key once. AWS's ``s3:if-none-match`` condition key would close that gap,
but SeaweedFS then denies every PUT, so the policy leaves it out. SeaweedFS also
lets ``DeleteUser`` go through while the user still has keys (AWS refuses), and
reports success for ``DeleteAccessKey`` on a deleted user.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fedlib.errors import FedError
from fedlib.storage.store import S3Config
from fedlib.wire.protocol import inbox_key

if TYPE_CHECKING:
    from botocore.client import BaseClient

__all__ = [
    "ClientCredentials",
    "CredentialError",
    "CredentialIssuer",
    "IamCredentialIssuer",
    "client_policy",
    "server_policy",
]

POLICY_VERSION = "2012-10-17"
MAX_USER_NAME = 64  # AWS IAM limit on user names
MAX_KEYS_PER_USER = 2  # AWS IAM limit; SeaweedFS has none, but we stay portable
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9+=,.@_-]{1,32}$")
# Answers from a key the S3 gateway does not know yet or whose policy has not arrived.
_NOT_READY = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}
)


class CredentialError(FedError):
    """Credentials could not be issued or revoked."""


@dataclass(frozen=True)
class ClientCredentials:
    """One device's S3 key pair and the IAM user that owns it; the secret is not in repr."""

    access_key: str
    secret_key: str = field(repr=False)
    user_name: str


@runtime_checkable
class CredentialIssuer(Protocol):
    """Something that hands out and takes back per-device S3 credentials."""

    def issue(self, client_id: str, *, inbox_bucket: str, models_bucket: str) -> ClientCredentials:
        """Return working credentials for ``client_id``; invalidate any earlier ones."""
        ...

    def revoke(self, client_id: str) -> None:
        """Make every credential of ``client_id`` stop working; no-op if there are none."""
        ...


def _check_bucket(name: str) -> str:
    if not isinstance(name, str) or not _BUCKET_RE.match(name) or ".." in name:
        raise ValueError(f"bad bucket name {name!r}")
    return name


def client_policy(client_id: str, inbox_bucket: str, models_bucket: str) -> dict[str, Any]:
    """The IAM policy document of one device (AWS, SeaweedFS and MinIO read it alike).

    * ``PutOwnUpdates``: ``s3:PutObject`` on ``arn:aws:s3:::<inbox>/updates/<id>/*``,
      the prefix :func:`fedlib.wire.protocol.inbox_key` uses. The trailing ``/`` keeps
      ``client-1`` out of ``client-10``'s prefix. There is no GetObject, ListBucket or
      DeleteObject on the inbox, so a device cannot see or remove what anyone
      (itself included) uploaded.
    * ``ReadModels``: ``s3:GetObject`` on ``arn:aws:s3:::<models>/*`` (this also
      covers HEAD) and ``s3:ListBucket`` on ``arn:aws:s3:::<models>``, to find and
      download signed packages. A device cannot write there.

    ``client_id`` must match the protocol's client id pattern. That pattern has no
    ``*``, ``?`` or ``/``, so the id cannot widen its own resource.
    """
    own_prefix = inbox_key(client_id, "*")  # validates the id; "updates/<id>/*"
    inbox = _check_bucket(inbox_bucket)
    models = _check_bucket(models_bucket)
    if inbox == models:
        raise ValueError("inbox and models buckets must differ")
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "PutOwnUpdates",
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": [f"arn:aws:s3:::{inbox}/{own_prefix}"],
            },
            {
                "Sid": "ReadModels",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{models}/*"],
            },
            {
                "Sid": "ListModels",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{models}"],
            },
        ],
    }


def server_policy(buckets: list[str]) -> dict[str, Any]:
    """The server's (Airflow's) policy: everything on the deployment's buckets, nothing
    else (MinIO's one-shot init attaches it to the server user of the compose stack)."""
    names = [_check_bucket(b) for b in buckets]
    if len(set(names)) != len(names):
        raise ValueError("bucket names must differ")
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "ServerBuckets",
                "Effect": "Allow",
                "Action": ["s3:*"],
                "Resource": [
                    arn for b in names for arn in (f"arn:aws:s3:::{b}", f"arn:aws:s3:::{b}/*")
                ],
            }
        ],
    }


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


class IamCredentialIssuer:
    """Issue per-device IAM users and keys through the AWS IAM API (AWS, SeaweedFS).

    ``config`` must hold credentials that may administer IAM. The IAM endpoint is
    ``config.endpoint_url`` unless ``iam_endpoint_url`` is given (SeaweedFS serves IAM
    on its S3 port; with both unset, boto3 talks to AWS). User names are
    ``user_prefix + client_id``, hashed down to 64 characters when longer.
    """

    def __init__(
        self,
        config: S3Config,
        *,
        user_prefix: str = "fl-client-",
        policy_name: str = "fl-client",
        iam_endpoint_url: str | None = None,
        ready_timeout: float = 30.0,
        poll_interval: float = 0.1,
    ) -> None:
        if not _PREFIX_RE.match(user_prefix):
            raise ValueError(f"bad IAM user prefix {user_prefix!r}")
        self.config = config
        self.user_prefix = user_prefix
        self.policy_name = policy_name
        self.iam_endpoint_url = iam_endpoint_url or config.endpoint_url
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self._iam: BaseClient | None = None

    def __repr__(self) -> str:
        where = self.iam_endpoint_url or "AWS"
        return f"IamCredentialIssuer({where!r}, user_prefix={self.user_prefix!r})"

    @property
    def iam(self) -> BaseClient:
        """The boto3 IAM client, created on first use."""
        if self._iam is None:
            import boto3
            from botocore.config import Config

            cfg = self.config
            self._iam = boto3.session.Session().client(
                "iam",
                endpoint_url=self.iam_endpoint_url,
                region_name=cfg.region,
                aws_access_key_id=cfg.access_key,
                aws_secret_access_key=cfg.secret_key,
                config=Config(
                    retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
                    connect_timeout=cfg.connect_timeout,
                    read_timeout=cfg.read_timeout,
                ),
            )
        return self._iam

    def user_name(self, client_id: str) -> str:
        """The IAM user of ``client_id``: deterministic, so revoke finds what issue made."""
        inbox_key(client_id, "*")  # same validation as the inbox prefix
        name = self.user_prefix + client_id
        if len(name) <= MAX_USER_NAME:
            return name
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:12]
        keep = MAX_USER_NAME - len(self.user_prefix) - len(digest) - 1
        return f"{self.user_prefix}{client_id[:keep]}-{digest}"

    # ------------------------------------------------------------------ IAM calls

    def _call(self, op: str, ignore: frozenset[str] = frozenset(), **kwargs: Any) -> Any:
        """One IAM call; botocore errors become CredentialError, codes in ``ignore`` None."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.iam, op)(**kwargs)
        except ClientError as exc:
            code = _code(exc)
            if code in ignore:
                return None
            hint = ""
            if "disabled" in str(exc).lower() and "write" in str(exc).lower():
                hint = " (SeaweedFS: start it with -s3.iam.readOnly=false)"
            raise CredentialError(f"IAM {op} failed: {code}: {exc}{hint}") from exc
        except BotoCoreError as exc:
            raise CredentialError(f"IAM {op} failed: {exc}") from exc

    def _keys(self, user: str) -> list[dict[str, Any]] | None:
        """The user's access key metadata, oldest first where dates are known; None if no user."""
        rows: list[dict[str, Any]] = []
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"UserName": user}
            if marker:
                kwargs["Marker"] = marker
            resp = self._call("list_access_keys", frozenset({"NoSuchEntity"}), **kwargs)
            if resp is None:
                return None
            rows.extend(resp.get("AccessKeyMetadata", ()))
            marker = resp.get("Marker")
            if not resp.get("IsTruncated") or not marker:
                break
        # SeaweedFS gives no CreateDate: keep its listing order (creation order) then.
        order = {row["AccessKeyId"]: i for i, row in enumerate(rows)}
        return sorted(rows, key=lambda r: (str(r.get("CreateDate", "")), order[r["AccessKeyId"]]))

    def access_keys(self, client_id: str) -> list[str]:
        """Access key ids the client's IAM user holds now (empty if it has no user)."""
        return [row["AccessKeyId"] for row in self._keys(self.user_name(client_id)) or ()]

    def _delete_key(self, user: str, key_id: str) -> None:
        self._call(
            "delete_access_key", frozenset({"NoSuchEntity"}), UserName=user, AccessKeyId=key_id
        )

    # ------------------------------------------------------------------ issue / revoke

    def issue(self, client_id: str, *, inbox_bucket: str, models_bucket: str) -> ClientCredentials:
        """Create (or rotate) the client's key: new key first, old keys go once it works.

        Re-running after a failure is safe: the user and policy are upserts, and
        leftover keys beyond AWS's two-key limit are removed oldest first (inactive
        ones before active ones) before the new key is made.
        """
        user = self.user_name(client_id)
        policy = json.dumps(client_policy(client_id, inbox_bucket, models_bucket))
        self._call("create_user", frozenset({"EntityAlreadyExists"}), UserName=user)
        self._call(
            "put_user_policy", UserName=user, PolicyName=self.policy_name, PolicyDocument=policy
        )
        old = self._keys(user) or []
        old.sort(key=lambda r: r.get("Status") == "Active")  # stable: inactive ones first
        while len(old) >= MAX_KEYS_PER_USER:
            self._delete_key(user, old.pop(0)["AccessKeyId"])
        created = self._call("create_access_key", UserName=user)["AccessKey"]
        creds = ClientCredentials(created["AccessKeyId"], created["SecretAccessKey"], user)
        try:
            self.wait_until_usable(creds, models_bucket)
        except CredentialError:
            self._delete_key(user, creds.access_key)  # the old key, if any, still works
            raise
        for row in old:
            self._delete_key(user, row["AccessKeyId"])
        return creds

    def wait_until_usable(self, creds: ClientCredentials, models_bucket: str) -> float:
        """Poll a harmless request (list one model key) with ``creds``; return seconds waited.

        A write probe would drop a junk object into the inbox, so readiness is checked
        on the read-only half of the policy. A missing models bucket counts as ready:
        the key was accepted, there is just nothing to list yet.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        probe = S3Config(
            endpoint_url=self.config.endpoint_url,
            region=self.config.region,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
            max_attempts=1,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
        ).client()
        began = time.monotonic()
        last = ""
        while True:
            try:
                probe.list_objects_v2(Bucket=models_bucket, MaxKeys=1)
                return time.monotonic() - began
            except ClientError as exc:
                code = _code(exc)
                if code == "NoSuchBucket":
                    return time.monotonic() - began
                if code not in _NOT_READY:
                    raise CredentialError(f"new key for {creds.user_name} refused: {exc}") from exc
                last = code
            except BotoCoreError as exc:
                last = str(exc)
            if time.monotonic() - began >= self.ready_timeout:
                raise CredentialError(
                    f"new key for {creds.user_name} not usable after {self.ready_timeout:.0f} s"
                    f" (last answer: {last})"
                )
            time.sleep(self.poll_interval)

    def revoke(self, client_id: str) -> None:
        """Delete the client's keys first (that is what locks the device out), then the
        policy and the user, so nothing is left to reactivate. Unknown clients are a no-op.
        """
        user = self.user_name(client_id)
        keys = self._keys(user)
        if keys is None:
            return
        for row in keys:
            self._delete_key(user, row["AccessKeyId"])
        resp = self._call("list_user_policies", frozenset({"NoSuchEntity"}), UserName=user)
        for name in (resp or {}).get("PolicyNames", ()):
            self._call(
                "delete_user_policy", frozenset({"NoSuchEntity"}), UserName=user, PolicyName=name
            )
        self._call("delete_user", frozenset({"NoSuchEntity"}), UserName=user)

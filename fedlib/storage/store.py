"""The object-store seam: one small interface over S3-compatible stores and a directory.

Everything in fedlib that persists bytes (inbox, ledger, models, bundles) talks to an
:class:`ObjectStore`, so the same code runs against MinIO in production, SeaweedFS in
tests and the demo, and a plain directory on devices or air-gapped sites.

Errors are normalised to :class:`~fedlib.errors.StoreError` and its subclasses so callers
never need to know botocore's exception zoo.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import itertools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote, unquote_plus, urlparse, urlsplit
from xml.etree import ElementTree

from fedlib.errors import ObjectExists, StoreError
from fedlib.files import TMP_PREFIX, fsync_dir

if TYPE_CHECKING:
    from botocore.client import BaseClient

__all__ = [
    "LocalStore",
    "NoSuchKey",
    "ObjectExists",
    "ObjectInfo",
    "ObjectStore",
    "ObjectTooLarge",
    "S3Config",
    "S3Store",
    "StoreError",
    "open_store",
]

# S3's own maximum page; also what the server returns when asked for more.
DEFAULT_PAGE_SIZE = 1000

log = logging.getLogger(__name__)


class NoSuchKey(StoreError, KeyError):
    """The key does not exist; also a ``KeyError`` so mapping-style callers can catch it."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(f"no such key: {key!r}" + (f" ({detail})" if detail else ""))
        self.key = key

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message; keep it readable.
        return str(self.args[0])


class ObjectTooLarge(StoreError):
    """The object is larger than the caller's ``max_bytes``; refused before reading it."""

    def __init__(self, key: str, size: int, max_bytes: int, etag: str = "") -> None:
        super().__init__(f"oversized object {key!r}: {size} bytes > max_bytes={max_bytes}")
        self.etag = etag
        self.key = key
        self.size = size
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class ObjectInfo:
    """One listing entry; ``etag`` is opaque (compare it only with the same backend)."""

    key: str
    size: int
    etag: str
    last_modified_ms: int = 0  # when the store received it (server clock)


@runtime_checkable
class ObjectStore(Protocol):
    """What fedlib needs from a store: write-once puts, bounded gets, ordered listing."""

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Store ``data``; with ``if_absent`` refuse to overwrite (raises ObjectExists)."""
        ...

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Return the object's bytes (NoSuchKey, ObjectTooLarge)."""
        ...

    def get_with_etag(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """Bytes plus the ETag of that version (the one :meth:`list` reports)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        ...

    def list(
        self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None
    ) -> Iterator[ObjectInfo]:
        """Yield objects under ``prefix`` in the store's key order, after ``start_after``."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error (as in S3)."""
        ...

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy ``src_key`` to ``dst_key`` without a round trip through the caller."""
        ...


# --------------------------------------------------------------------------- S3


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


@dataclass(frozen=True)
class S3Config:
    """How to reach an S3-compatible endpoint; ``endpoint_url=None`` means AWS itself."""

    endpoint_url: str | None
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    max_attempts: int = 5
    connect_timeout: float = 3.0
    read_timeout: float = 30.0

    @classmethod
    def from_env(cls, prefix: str = "FL_S3_", environ: Mapping[str, str] | None = None) -> S3Config:
        """Read ``{prefix}ENDPOINT_URL`` etc., falling back to the standard ``AWS_*`` names."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for name, conv in (
            ("max_attempts", int),
            ("connect_timeout", float),
            ("read_timeout", float),
        ):
            raw = env.get(prefix + name.upper())
            if raw:
                kwargs[name] = conv(raw)
        return cls(
            endpoint_url=_env(
                env, prefix + "ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
            ),
            region=_env(env, prefix + "REGION", "AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
            access_key=_env(env, prefix + "ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
            secret_key=_env(env, prefix + "SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
            **kwargs,
        )

    def airflow_connection(self) -> dict[str, Any]:
        """This endpoint as an Airflow ``aws`` connection (the JSON of
        ``AIRFLOW_CONN_FL_S3``), the form ``dags/runtime.py`` reads back."""
        return {
            "conn_type": "aws",
            "login": self.access_key,
            "password": self.secret_key,
            "extra": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def client(self) -> BaseClient:
        """A new boto3 S3 client; create it once and share it (it is thread-safe)."""
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # botocore's "max_attempts" counts retries (N+1 tries); "total_max_attempts"
            # counts tries, which is what S3Config.max_attempts means.
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            tcp_keepalive=True,
            max_pool_connections=32,
            # botocore >= 1.36 adds CRC checksums to every request by default; several
            # S3-compatible servers reject or mishandle them, and our payloads carry
            # their own signatures, so only send them where the API requires it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "config": config,
        }
        if self.access_key and self.secret_key:
            with _SESSION_LOCK:  # a session is not thread-safe; its clients are
                return _shared_session().client("s3", **kwargs)
        # A private session keeps credential resolution off boto3's global default session
        # (and a fresh one per client: it caches what the credential chain resolved).
        return boto3.session.Session().client("s3", **kwargs)


_SESSION_LOCK = threading.Lock()
_SESSION: Any = None


def _shared_session() -> Any:
    """fedlib's own boto3 session (never boto3's default) for clients with explicit keys.

    botocore parses the S3 service model once per session: a session per client cost
    ~12 MB of RSS and ~0.1 s per client (a Deployment makes three). Explicit keys mean
    nothing is resolved through the session's credential chain, so sharing it shares
    only the parsed models. Call with ``_SESSION_LOCK`` held.
    """
    global _SESSION
    if _SESSION is None:
        import boto3

        _SESSION = boto3.session.Session()
    return _SESSION


_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
    }
)
_CONFLICT = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


class _FastPath:
    """GET and PUT of one object, and one page of a listing, as one signed HTTP request
    without botocore's per-call machinery (events, parameter validation, response
    parsing, its request signer: ~0.45 ms of CPU a call, more than a local S3 server
    spends on the request; a 1,000-key page took 45 ms to parse, dates by dateutil).

    The request goes through the botocore client's own HTTP session (same connection
    pool, TLS verification, proxies and timeouts), signed here with AWS Signature V4 from
    the config's static keys (path-style URL, payload hash included). Only plain success
    is handled here: any other answer, and any transport error, makes the caller repeat
    the call through botocore, whose retries and error mapping then decide, so every
    error stays what it was. The cost of that is one extra request on an error, and a
    slower worst case on timeouts. A server that refuses its signatures
    (``SignatureDoesNotMatch``) turns it off for the store: either the keys are wrong,
    and botocore's answer is the same, or this signer is, and botocore's path works.
    """

    enabled = True

    def __init__(self, client: BaseClient, config: S3Config, bucket: str) -> None:
        from botocore.awsrequest import AWSPreparedRequest

        self._send = client._endpoint.http_session.send  # AttributeError: no fast path
        self._prepared = AWSPreparedRequest
        endpoint = client.meta.endpoint_url.rstrip("/")
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or parts.query or not parts.hostname:
            raise ValueError(f"no fast path for endpoint {endpoint!r}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if parts.port is not None and parts.port != {"http": 80, "https": 443}[parts.scheme]:
            host = f"{host}:{parts.port}"
        self._host = host  # what botocore signs and sends as Host
        self._bucket = bucket
        self._path = f"{parts.path}/{quote(bucket, safe='')}"
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._access_key = str(config.access_key)
        self._secret = str(config.secret_key).encode()
        self._scope_tail = f"/{config.region}/s3/aws4_request"
        self._keys: dict[str, bytes] = {}  # signing key per UTC day

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = b"AWS4" + self._secret
            for part in (day, *self._scope_tail[1:].split("/")):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {day: key}
        return key

    def _call(
        self,
        method: str,
        key: str | None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        stream: bool = False,
    ) -> Any:
        """Send one signed request for ``key`` (None: the bucket itself)."""
        path = self._path if key is None else f"{self._path}/{quote(key, safe='/~')}"
        params = "&".join(  # sorted and encoded once: what is signed is what is sent
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
            for k, v in sorted((query or {}).items())
        )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        payload = hashlib.sha256(data or b"").hexdigest()
        signed = {
            "host": self._host,
            **{name.lower(): value for name, value in (headers or {}).items()},
            "x-amz-content-sha256": payload,
            "x-amz-date": stamp,
        }
        names = ";".join(sorted(signed))
        canonical = "\n".join(
            [
                method,
                path,
                params,
                *(f"{n}:{signed[n]}" for n in sorted(signed)),
                "",
                names,
                payload,
            ]
        )
        scope = stamp[:8] + self._scope_tail
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}"
        signature = hmac.new(self._signing_key(stamp[:8]), to_sign.encode(), hashlib.sha256)
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self._access_key}/{scope}, "
            f"SignedHeaders={names}, Signature={signature.hexdigest()}"
        )
        if data is not None:
            signed["content-length"] = str(len(data))
        url = self._origin + path + (f"?{params}" if params else "")
        return self._send(self._prepared(method, url, signed, data, stream))

    def _refused(self, status: int, body: bytes) -> None:
        if status == 403 and b"SignatureDoesNotMatch" in body and self.enabled:
            self.enabled = False
            log.warning("S3 fast path off for %s: signature refused", self._origin)

    def get(self, key: str, max_bytes: int | None) -> tuple[bytes, str] | None:
        """(bytes, ETag) of a 200 read in full; ObjectTooLarge as botocore's path; else None."""
        try:
            response = self._call("GET", key, stream=True)
        except Exception:  # botocore's transport errors: botocore's retries decide
            return None
        raw, done = response.raw, False
        try:
            if response.status_code != 200:
                self._refused(response.status_code, raw.read(4096))
                return None
            etag = str(response.headers.get("ETag", "")).strip('"')
            declared = response.headers.get("Content-Length")
            size = int(declared) if declared is not None else -1
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(key, size, max_bytes, etag)
            # Read one byte past the limit so a lying Content-Length cannot sneak more in.
            data = raw.read() if max_bytes is None else raw.read(max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                raise ObjectTooLarge(key, len(data), max_bytes, etag)
            if size >= 0 and len(data) != size:
                return None  # a torn body: let botocore's retries read it again
            done = True
            return bytes(data), etag
        except ObjectTooLarge:
            raise
        except Exception:
            return None
        finally:
            if not done:
                raw.close()  # unread bytes: this connection must not be reused
            raw.release_conn()

    def put(self, key: str, data: bytes, if_absent: bool) -> bool:
        """True once stored; ObjectExists as botocore's path; False: repeat via botocore."""
        headers = {"If-None-Match": "*"} if if_absent else {}
        try:
            response = self._call("PUT", key, bytes(data), headers)
        except Exception:
            return False
        if 200 <= response.status_code < 300:
            return True
        if if_absent and response.status_code in (409, 412):
            raise ObjectExists(f"object already exists: s3://{self._bucket}/{key}")
        self._refused(response.status_code, response.content)
        return False

    def list_page(self, max_keys: int, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """One ListObjectsV2 page shaped as botocore returns it (the fields ``list`` reads),
        or None (botocore's turn). Keys are URL-encoded on the wire and decoded as botocore
        decodes them, so unusual keys survive; timestamps must carry their zone."""
        query = {"list-type": "2", "max-keys": str(max_keys), "encoding-type": "url"}
        for param, name in (
            ("prefix", "Prefix"),
            ("start-after", "StartAfter"),
            ("continuation-token", "ContinuationToken"),
        ):
            if kwargs.get(name):
                query[param] = str(kwargs[name])
        try:
            response = self._call("GET", None, query=query)
            if response.status_code != 200:
                self._refused(response.status_code, response.content)
                return None
            root = ElementTree.fromstring(response.content)  # noqa: S314 (our S3 server)
            page: dict[str, Any] = {"Contents": [], "IsTruncated": False}
            encoding = None
            for child in root:
                name = child.tag.rsplit("}", 1)[-1]
                if name == "Contents":
                    fields = {c.tag.rsplit("}", 1)[-1]: c.text or "" for c in child}
                    modified = datetime.fromisoformat(fields["LastModified"])
                    if modified.tzinfo is None:
                        return None
                    page["Contents"].append(
                        {
                            "Key": fields["Key"],
                            "Size": int(fields.get("Size") or 0),
                            "ETag": fields.get("ETag", ""),
                            "LastModified": modified,
                        }
                    )
                elif name == "IsTruncated":
                    page["IsTruncated"] = child.text == "true"
                elif name == "NextContinuationToken":
                    page["NextContinuationToken"] = child.text or ""
                elif name == "EncodingType":
                    encoding = child.text
            if encoding == "url":
                for obj in page["Contents"]:
                    obj["Key"] = unquote_plus(obj["Key"])
            return page
        except Exception:
            return None


class S3Store:
    """An :class:`ObjectStore` on one bucket of an S3-compatible server.

    One boto3 client is created up front and reused: request setup in botocore is the
    dominant per-call cost, so the hot path makes exactly one HTTP request per call,
    and GETs, PUTs and listings skip botocore's per-call machinery (:class:`_FastPath`)
    when the store made its client itself from keys in its config (``fast_path``).
    """

    def __init__(
        self,
        bucket: str,
        config: S3Config | None = None,
        *,
        client: BaseClient | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        fast_path: bool = True,
    ) -> None:
        if not bucket:
            raise ValueError("bucket name must not be empty")
        self.bucket = bucket
        self.config = config if config is not None else S3Config.from_env()
        self._fast: _FastPath | None = None
        if client is None:
            client = self.config.client()
            # A client handed in may hold other keys than the config: never sign for it.
            if fast_path and self.config.access_key and self.config.secret_key:
                try:
                    self._fast = _FastPath(client, self.config, bucket)
                except (AttributeError, ImportError, ValueError) as exc:  # botocore changed
                    log.debug("no S3 fast path: %s", exc)
        self.client = client
        self.page_size = page_size
        self.endpoint = self.client.meta.endpoint_url
        import botocore.exceptions as bce

        self._bce = bce

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, endpoint={self.endpoint!r})"

    # ------------------------------------------------------------------ errors

    def _error(self, exc: Exception, op: str, key: str | None = None) -> StoreError:
        """Translate a botocore exception into fedlib's store errors."""
        where = f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"
        bce = self._bce
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = err.get("Message", "") or code
            if code in _NOT_FOUND and key is not None:
                return NoSuchKey(key, f"{op} on {self.endpoint}")
            if code == "NoSuchBucket" or (code in _NOT_FOUND and key is None):
                return StoreError(f"{op} {where}: no such bucket on {self.endpoint}")
            if code in _DENIED or status == 403:
                return StoreError(f"{op} {where}: access denied by {self.endpoint} ({code})")
            if status >= 500:
                return StoreError(
                    f"{op} {where}: {self.endpoint} failed with HTTP {status} {code} "
                    f"after {self.config.max_attempts} attempts: {message}"
                )
            return StoreError(f"{op} {where}: {self.endpoint} refused: {code} {message}")
        if isinstance(
            exc,
            bce.EndpointConnectionError
            | bce.ConnectTimeoutError
            | bce.ReadTimeoutError
            | bce.ConnectionClosedError,
        ):
            return StoreError(f"{op} {where}: cannot reach S3 endpoint {self.endpoint}: {exc}")
        if isinstance(exc, bce.NoCredentialsError):
            return StoreError(f"{op} {where}: no S3 credentials configured for {self.endpoint}")
        return StoreError(f"{op} {where} on {self.endpoint}: {exc}")

    def _catchable(self) -> tuple[type[Exception], ...]:
        return (self._bce.BotoCoreError, self._bce.ClientError)

    # ------------------------------------------------------------------ bucket

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.config.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            self.client.create_bucket(**kwargs)
        except self._bce.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise self._error(exc, "create bucket") from exc
        except self._bce.BotoCoreError as exc:
            raise self._error(exc, "create bucket") from exc

    # ------------------------------------------------------------------ objects

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Upload ``data``; ``if_absent`` uses ``If-None-Match: *`` so the server decides."""
        if self._fast is not None and self._fast.enabled and self._fast.put(key, data, if_absent):
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**kwargs)
        except self._bce.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if if_absent and (code in _CONFLICT or status in (409, 412)):
                raise ObjectExists(f"object already exists: s3://{self.bucket}/{key}") from exc
            raise self._error(exc, "put", key) from exc
        except self._bce.BotoCoreError as exc:
            raise self._error(exc, "put", key) from exc

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Download ``key`` in one GET; the size check uses the GET's own Content-Length."""
        return self.get_with_etag(key, max_bytes=max_bytes)[0]

    def get_with_etag(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """The bytes and the ETag of that very GET (to delete only what was judged)."""
        if self._fast is not None and self._fast.enabled:
            found = self._fast.get(key, max_bytes)
            if found is not None:
                return found
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except self._catchable() as exc:
            raise self._error(exc, "get", key) from exc
        body = resp["Body"]
        etag = str(resp.get("ETag", "")).strip('"')
        try:
            size = int(resp.get("ContentLength", -1))
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(key, size, max_bytes, etag)
            # Read one byte past the limit so a lying Content-Length cannot sneak more in.
            data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                raise ObjectTooLarge(key, len(data), max_bytes, etag)
            return data, etag
        except self._catchable() as exc:
            raise self._error(exc, "get", key) from exc
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        """HEAD the key; a missing key is False, a denied one is an error."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except self._catchable() as exc:
            err = self._error(exc, "head", key)
            if isinstance(err, NoSuchKey):
                return False
            raise err from exc
        return True

    def list(
        self,
        prefix: str = "",
        *,
        start_after: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[ObjectInfo]:
        """Yield objects page by page (lazily) in the server's listing order.

        AWS and MinIO list in byte-lexicographic order. SeaweedFS walks its directory
        tree instead, so ``a/b`` comes before ``a-c``; ``start_after`` stays consistent
        with whatever order the server uses.
        """
        if limit is not None and limit <= 0:
            return
        size = page_size or self.page_size
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        yielded = 0
        while True:
            want = size if limit is None else min(size, limit - yielded)
            fast = self._fast if self._fast is not None and self._fast.enabled else None
            resp = fast.list_page(want, kwargs) if fast is not None else None
            if resp is None:
                try:
                    resp = self.client.list_objects_v2(MaxKeys=want, **kwargs)
                except self._catchable() as exc:
                    raise self._error(exc, "list", None) from exc
            for obj in resp.get("Contents", ()):
                modified = obj.get("LastModified")
                yield ObjectInfo(
                    obj["Key"],
                    int(obj.get("Size", 0)),
                    obj.get("ETag", "").strip('"'),
                    int(modified.timestamp() * 1000) if modified else 0,
                )
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = token

    def delete(self, key: str) -> None:
        """Delete ``key``; S3 reports success for a missing key and so do we."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except self._catchable() as exc:
            err = self._error(exc, "delete", key)
            if isinstance(err, NoSuchKey):
                return
            raise err from exc

    def copy(self, src_key: str, dst_key: str, *, src_bucket: str | None = None) -> None:
        """Server-side copy, within the bucket or from ``src_bucket`` on the same server
        (bytes never pass through this process: how oversized objects are quarantined)."""
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=dst_key,
                CopySource={"Bucket": src_bucket or self.bucket, "Key": src_key},
            )
        except self._catchable() as exc:
            err = self._error(exc, "copy", src_key)
            raise err from exc


# --------------------------------------------------------------------------- local


def validate_key(key: str) -> str:
    """Refuse keys that could escape the root or differ between backends; return ``key``."""
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"object key {key!r} contains NUL or a backslash")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} is absolute")
    for seg in key.split("/"):
        if seg in ("", ".", ".."):
            raise ValueError(f"object key {key!r} has an empty, '.' or '..' segment")
        if seg.startswith(TMP_PREFIX):
            raise ValueError(f"object key {key!r} uses the reserved prefix {TMP_PREFIX!r}")
    return key


def _local_etag(st: os.stat_result) -> str:
    return hashlib.blake2b(
        f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode(), digest_size=16
    ).hexdigest()


class LocalStore:
    """An :class:`ObjectStore` in a directory, for devices and sites without S3.

    Keys are ``/``-separated paths under ``root``. Writes go to a temp file in the
    target directory, are fsynced, then renamed (or hard-linked for ``if_absent``), so
    readers see either the old object or the complete new one, never a torn write.
    Listing is byte-lexicographic by key, like AWS S3.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StoreError(f"local store root {self.root} is not a directory")

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _write_temp(self, path: Path, data: bytes) -> str:
        """Write ``data`` to a fsynced temp file beside ``path``; return its name."""
        for _ in range(5):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
            except FileNotFoundError:
                continue  # a concurrent delete pruned the empty directory; recreate it
            break
        else:
            raise StoreError(f"cannot create a temp file in {path.parent}")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Atomically store ``data``; ``if_absent`` links the temp file, which fails if taken."""
        path = self._path(key)
        try:
            tmp = self._write_temp(path, bytes(data))
            try:
                if if_absent:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        if path.is_dir():
                            raise StoreError(
                                f"put {key!r}: a key prefix of that name exists"
                            ) from None
                        raise ObjectExists(
                            f"object already exists: {key!r} in {self.root}"
                        ) from None
                else:
                    os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            fsync_dir(path.parent)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"put {key!r} in {self.root}: {exc}") from exc

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read ``key``; the size is checked with fstat before any byte is read."""
        return self.get_with_etag(key, max_bytes=max_bytes)[0]

    def get_with_etag(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """The bytes and the same ETag :meth:`list` reports for this file version."""
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                etag = _local_etag(st)
                if max_bytes is not None and st.st_size > max_bytes:
                    raise ObjectTooLarge(key, st.st_size, max_bytes, etag)
                data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NoSuchKey(key, f"in {self.root}") from None
        except OSError as exc:
            raise StoreError(f"get {key!r} from {self.root}: {exc}") from exc
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(key, len(data), max_bytes, etag)
        return data, etag

    def exists(self, key: str) -> bool:
        """Whether a regular file backs ``key``."""
        return self._path(key).is_file()

    def list(
        self,
        prefix: str = "",
        *,
        start_after: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[ObjectInfo]:
        """Walk the tree in byte-lexicographic key order, pruning what cannot match.

        ``page_size`` is accepted for interface parity with :class:`S3Store` and ignored.
        """
        del page_size
        if limit is not None and limit <= 0:
            return
        walk = self._walk(self.root, "", prefix, start_after)
        yield from walk if limit is None else itertools.islice(walk, limit)

    def _walk(
        self, directory: Path, base: str, prefix: str, start_after: str | None
    ) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(directory) as it:
                entries = [e for e in it if not e.name.startswith(TMP_PREFIX)]
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"list {directory}: {exc}") from exc
        # Sorting a directory as "name/" makes the depth-first walk globally
        # lexicographic: every key inside it starts with exactly that string.
        rows = []
        for entry in entries:
            is_dir = entry.is_dir(follow_symlinks=False)
            if not is_dir and not entry.is_file(follow_symlinks=False):
                continue
            rows.append((base + entry.name + ("/" if is_dir else ""), is_dir, entry))
        rows.sort(key=lambda r: r[0])  # code-point order == UTF-8 byte order
        for name, is_dir, entry in rows:
            if is_dir:
                if not (name.startswith(prefix) or prefix.startswith(name)):
                    continue
                if (
                    start_after is not None
                    and name < start_after
                    and not start_after.startswith(name)
                ):
                    continue  # every key in here sorts before start_after
                yield from self._walk(Path(entry.path), name, prefix, start_after)
                continue
            if not name.startswith(prefix) or (start_after is not None and name <= start_after):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while listing
            yield ObjectInfo(name, st.st_size, _local_etag(st), st.st_mtime_ns // 1_000_000)

    def delete(self, key: str) -> None:
        """Remove ``key`` and prune directories it leaves empty; missing keys are fine."""
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StoreError(f"delete {key!r} from {self.root}: {exc}") from exc
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise StoreError(f"delete {key!r}: cannot prune {parent}: {exc}") from exc
            parent = parent.parent

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy through memory and an atomic write (local objects are small)."""
        validate_key(dst_key)  # refuse a bad destination before touching the source
        self.put(dst_key, self.get(src_key))


# --------------------------------------------------------------------------- factory


def open_store(url: str, config: S3Config | None = None) -> ObjectStore:
    """Pick the backend from a URL, so deployments choose storage by configuration.

    ``s3://bucket`` -> :class:`S3Store`; ``file:///path`` or a plain path -> :class:`LocalStore`.
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URL {url!r} has no bucket")
        if parsed.path not in ("", "/"):
            raise ValueError(f"store URL {url!r}: key prefixes are not supported, use s3://bucket")
        return S3Store(parsed.netloc, config)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"store URL {url!r}: remote file hosts are not supported")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise ValueError(f"unsupported store URL scheme {parsed.scheme!r} in {url!r}")
    return LocalStore(url)

"""The device's side of the TUF channel: refresh, check and download verified targets.

:class:`ChannelClient` is python-tuf's ``Updater`` over :class:`StoreFetcher`, which
reads metadata and targets from an object store (S3 in the fleet, a directory on
air-gapped sites). It holds no signing key and never imports the repository side.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    Metadata,
    Root,
    TargetFile,
    Timestamp,
)
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from fedlib.errors import StoreError
from fedlib.storage.store import LocalStore, NoSuchKey, ObjectStore, ObjectTooLarge
from fedlib.storage.store import validate_key as _validate_key
from fedlib.trust.channel_layout import (
    ACTIVE_TARGET,
    AIRGAP_TIMESTAMP_FIELD,
    NAME_RE,
    ChannelLayout,
    ChannelVerificationError,
    custom_version,
    manifest_path,
    target_path,
)

STORE_URL_PREFIX: Final = "store:///"


class _BadChannelKey(tuf_exc.DownloadError):
    """A URL that maps to no valid channel object: a refusal, not an outage."""


class StoreFetcher(FetcherInterface):
    """ngclient's transport over an :class:`ObjectStore`, reading at most what TUF allows.

    ngclient asks for ``store:///<key>`` with the length it is prepared to accept
    (from signed metadata, or its fixed caps for timestamp/root). The store refuses a
    longer object from its size before reading the body, so endless data is cut off
    at the first response, not after buffering it.
    """

    def __init__(
        self,
        store: ObjectStore,
        allowed_prefixes: Sequence[str],
        *,
        max_object_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.max_object_bytes = max_object_bytes

    def key_for(self, url: str) -> str:
        """Map ngclient's URL to an object key inside the channel's prefixes only."""
        if not url.startswith(STORE_URL_PREFIX):
            raise tuf_exc.DownloadError(f"not a channel URL: {url!r}")
        key = url[len(STORE_URL_PREFIX) :]
        try:
            _validate_key(key)
        except ValueError as exc:
            raise _BadChannelKey(f"bad channel key in {url!r}: {exc}") from exc
        if not key.startswith(self.allowed_prefixes):
            raise _BadChannelKey(f"{key!r} is outside the channel prefixes")
        return key

    def _get(self, url: str, max_length: int) -> bytes:
        key = self.key_for(url)
        try:
            return self.store.get(key, max_bytes=max_length)
        except ObjectTooLarge as exc:
            raise tuf_exc.DownloadLengthMismatchError(
                f"{key}: {exc.size} bytes exceed the {max_length} allowed"
            ) from exc
        except NoSuchKey as exc:
            # ngclient ends the root walk on 404: the newest root was reached.
            raise tuf_exc.DownloadHTTPError(f"{key} not found", 404) from exc
        except StoreError as exc:
            raise tuf_exc.DownloadError(f"{key}: {exc}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        """The interface's unbounded path; still capped, at ``max_object_bytes``."""
        yield self._get(url, self.max_object_bytes)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Overridden so the cap reaches the store (the base class only sees chunks)."""
        data = self._get(url, max_length)
        with tempfile.TemporaryFile() as fh:
            fh.write(data)
            fh.seek(0)
            yield fh


@contextlib.contextmanager
def _refusals(action: str) -> Iterator[None]:
    """Turn ngclient's exceptions into fedlib's: VerificationError vs StoreError."""
    try:
        yield
    except tuf_exc.DownloadLengthMismatchError as exc:
        raise ChannelVerificationError(
            "mismatch",
            f"{action}: length or hash mismatch: the object is longer than its signed "
            f"length (endless data refused): {exc}",
        ) from exc
    except tuf_exc.DownloadHTTPError as exc:
        cause = exc.__cause__
        if isinstance(cause, NoSuchKey):
            raise NoSuchKey(cause.key, f"{action}: missing from the channel") from exc
        raise StoreError(f"{action}: {exc}") from exc
    except _BadChannelKey as exc:  # signed metadata naming an impossible object: refuse it
        raise ChannelVerificationError("malformed", f"{action}: {exc}") from exc
    except tuf_exc.DownloadError as exc:
        raise StoreError(f"{action}: channel store unreachable: {exc.__cause__ or exc}") from exc
    except tuf_exc.BadVersionNumberError as exc:
        raise ChannelVerificationError(
            "rollback", f"{action}: replayed older version refused (rollback): {exc}"
        ) from exc
    except tuf_exc.ExpiredMetadataError as exc:
        raise ChannelVerificationError(
            "expired", f"{action}: metadata expired (frozen or stale channel): {exc}"
        ) from exc
    except tuf_exc.UnsignedMetadataError as exc:
        raise ChannelVerificationError(
            "unsigned", f"{action}: unsigned by a trusted key: {exc}"
        ) from exc
    except tuf_exc.LengthOrHashMismatchError as exc:
        raise ChannelVerificationError(
            "mismatch", f"{action}: length or hash mismatch: {exc}"
        ) from exc
    except tuf_exc.RepositoryError as exc:
        raise ChannelVerificationError(
            "refused", f"{action}: channel metadata refused: {exc}"
        ) from exc


class ChannelClient:
    """The device side: ngclient's verified workflow over our store, a pinned root.

    ``trusted_root`` is the root.json shipped in the device config: the only thing the
    device trusts up front. ``metadata_dir`` keeps the last verified metadata, which is
    what makes a later replay of older metadata detectable; ``targets_dir`` caches
    verified files so unchanged ones are not downloaded twice.
    """

    def __init__(
        self,
        store_or_dir: ObjectStore | str | os.PathLike[str],
        metadata_dir: str | os.PathLike[str],
        targets_dir: str | os.PathLike[str],
        trusted_root: bytes,
        *,
        layout: ChannelLayout | None = None,
        config: UpdaterConfig | None = None,
        allow_airgap_timestamp: bool = False,
    ) -> None:
        self.allow_airgap_timestamp = allow_airgap_timestamp
        if isinstance(store_or_dir, str | os.PathLike):
            self.store: ObjectStore = LocalStore(store_or_dir, create=False)
        else:
            self.store = store_or_dir
        self.layout = layout or ChannelLayout()
        self.metadata_dir = Path(metadata_dir)
        self.targets_dir = Path(targets_dir)
        self.trusted_root = bytes(trusted_root)
        self.config = config or UpdaterConfig()
        self.fetcher = StoreFetcher(
            self.store, (self.layout.metadata_prefix, self.layout.targets_prefix)
        )
        self._updater: Updater | None = None

    def _new_updater(self) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        with _refusals("load pinned root"):
            return Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=STORE_URL_PREFIX + self.layout.metadata_prefix,
                target_dir=str(self.targets_dir),
                target_base_url=STORE_URL_PREFIX + self.layout.targets_prefix,
                fetcher=self.fetcher,
                config=self.config,
                bootstrap=self.trusted_root,
            )

    def refresh(self) -> Updater:
        """Fetch and verify root (walking rotations), timestamp, snapshot and targets.

        On refusal the previously verified metadata stays in ``metadata_dir``, so the
        device keeps trusting what it had (and keeps running its current model).
        """
        self._updater = None
        updater = self._new_updater()
        with _refusals("refresh channel"):
            updater.refresh()
        if not self.allow_airgap_timestamp:
            # a bundle's long-lived timestamp copied into a live bucket must not hold
            # online devices on an old state for weeks
            timestamp = Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))
            if AIRGAP_TIMESTAMP_FIELD in timestamp.signed.unrecognized_fields:
                raise ChannelVerificationError(
                    "refused", "the live channel serves an air-gap bundle's timestamp"
                )
        self._updater = updater
        return updater

    def _refreshed(self) -> Updater:
        if self._updater is None:
            return self.refresh()
        return self._updater

    def _info(self, path: str) -> TargetFile | None:
        with _refusals(f"look up {path}"):
            return self._refreshed().get_targetinfo(path)

    @property
    def root_version(self) -> int:
        """The version of the newest root this device has verified."""
        md = Metadata[Root].from_file(str(self.metadata_dir / "root.json"))
        return md.signed.version

    def active_version(self) -> int | None:
        """The active model version according to verified targets metadata (None: none)."""
        info = self._info(ACTIVE_TARGET)
        return None if info is None else custom_version(info)

    def package_info(self, version: int) -> dict[str, Any]:
        """The signed custom info of ``version`` (``version``, ``files``, ``rollback_of``...)."""
        info = self._info(manifest_path(version))
        if info is None:
            raise ChannelVerificationError(
                "unlisted", f"version {version} is not in the signed channel"
            )
        if custom_version(info) != version or not _valid_names(info.custom.get("files")):
            raise ChannelVerificationError(
                "malformed", f"manifest of version {version} has an invalid custom field"
            )
        return dict(info.custom)

    def download(self, version: int) -> dict[str, bytes]:
        """Exactly the files of ``version``, each checked against signed length and hash."""
        names = self.package_info(version)["files"]
        return {name: self.fetch_target(target_path(version, name)) for name in names}

    def download_active(self) -> tuple[int, dict[str, bytes]]:
        """The active version and its files."""
        version = self.active_version()
        if version is None:
            raise ChannelVerificationError("unlisted", "the channel has no active version yet")
        return version, self.download(version)

    def optional_target(self, path: str) -> bytes | None:
        """A target that may not be published (yet): None when signed metadata omits it."""
        return None if self._info(path) is None else self.fetch_target(path)

    def fetch_target(self, path: str) -> bytes:
        """One target by its TUF path; anything not listed in signed metadata is refused."""
        info = self._info(path)
        if info is None:
            raise ChannelVerificationError(
                "unlisted", f"{path!r} is not listed in the signed targets metadata"
            )
        updater = self._refreshed()
        with _refusals(f"download {path}"):
            local = updater.find_cached_target(info) or updater.download_target(info)
            data = Path(local).read_bytes()
            info.verify_length_and_hashes(data)  # the cache is ours, but disks rot
        return data


def _valid_names(names: Any) -> bool:
    return (
        isinstance(names, list)
        and bool(names)
        and all(isinstance(n, str) and NAME_RE.match(n) for n in names)
    )

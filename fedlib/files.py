"""Local file primitives every layer shares: atomic, durable replacement of a file.

A crash leaves the old file or the new one, never a torn one; a private key written
here is never readable by others, not even for a moment. No imports from the rest of
``fedlib`` but ``failpoints`` (fault tests): keys (crypto), stores (storage) and the
device's state all use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedlib import failpoints

TMP_PREFIX = ".fl-tmp-"  # temp files of atomic writes; swept, never valid keys


def atomic_write(
    path: Path | str, data: bytes, *, mode: int | None = None, torn_point: str | None = None
) -> None:
    """Replace ``path`` with ``data`` all at once: a crash leaves the old file or the new.

    Temp file beside the target, fsync, optional chmod (before any byte is written, so a
    private key is never readable by others), rename, fsync of the directory.
    ``torn_point``: a failpoint (fault tests) that, armed, kills the process once half
    the bytes are in the temp file, before the fsync and the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            start = 0
            if torn_point is not None and failpoints.is_armed(torn_point):
                start = len(data) // 2
                fh.write(data[:start])
                fh.flush()  # in the file (the kernel keeps it), not yet fsynced or renamed
                failpoints.failpoint(torn_point)
            fh.write(data[start:])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Persist a rename/link: without this a crash can forget the new directory entry."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Writing a file so that a crash or a full disk never leaves part of it.

The bytes go to a temporary file in the same directory, created with the
final permissions, and are flushed to disk before the file takes its final
name; the directory is flushed too, so the name survives a crash. Whoever
reads the path finds the old file (or none) or all of the new one, never a
truncated key or token that the next start would take for a bad one.

It lives in signer/ because both the signer CLI and the server use it, and
logserver/ imports signer/, never the other way round.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from pathlib import Path

# os.link fails with these where the file system has no hard links (FAT,
# some network and FUSE file systems).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def write_atomic(
    path: Path, data: bytes, *, mode: int = 0o666, exclusive: bool = False
) -> None:
    """Put `data` at `path` all at once, or not at all.

    The file is created with `mode` less the umask from its first moment, so
    a secret written with 0o600 is never readable by others, not even while
    it is being written. With `exclusive`, an existing `path` is never
    replaced: FileExistsError, as from os.open with O_EXCL. Otherwise an
    existing file is replaced in one step. If the data cannot be written,
    the temporary file is removed and `path` is left as it was.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, mode)
    except OSError as e:  # name the file the caller asked for, not ours
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            _link_new(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


# The name write_atomic gives its temporary file.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")


def remove_stale_temporaries(directory: Path, older_than: float = 60.0) -> list[Path]:
    """Remove what a write_atomic cut short (a crash, a kill) left in
    `directory`: its temporary files not touched for `older_than` seconds.
    A younger one may belong to a write still going on, and is kept.
    Returns the files removed.
    """
    removed = []
    cutoff = time.time() - older_than
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not _TEMPORARY.fullmatch(entry.name) or not entry.is_file(
            follow_symlinks=False
        ):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue  # removed meanwhile
    return removed


def _link_new(temporary: Path, path: Path) -> None:
    """Give `temporary` the name `path` too, unless `path` exists."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: check and refuse, then rename. Only a writer
        # racing between the check and the rename could be overwritten.
        if os.path.lexists(path):
            raise FileExistsError(
                errno.EEXIST, os.strerror(errno.EEXIST), str(path)
            ) from None
        os.replace(temporary, path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

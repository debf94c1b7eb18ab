"""An exclusive lock on a directory that exists already, so taking it needs no space.

``flock`` works on a directory's descriptor as on a file's, and is released
when the descriptor closes (or the process dies). Locking a directory the
layout has anyway, instead of a lock file, keeps a snapshotter able to open
on a filesystem with no inode left.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ._libc import StrPath

__all__ = ["locked_dir"]


@contextmanager
def locked_dir(path: StrPath) -> Iterator[None]:
    """Hold an exclusive ``flock`` on directory ``path`` (threads and processes alike)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

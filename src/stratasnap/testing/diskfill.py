"""Fill a filesystem to its last block and inode, to test (and measure) what a full disk does.

Used by the full-disk tests and the kill campaign benchmark::

    filler = fill_filesystem(mountpoint / "ballast")      # nothing left
    ...                                                  # the code under test
    filler.release()                                     # give it all back

Inodes go first (empty files, while there are still blocks for the
directory to grow), then blocks: ``fallocate`` of halving sizes down to a
single block, so that filling a big filesystem takes milliseconds and
writes nothing. ``leave`` keeps some bytes free instead (a filesystem that
is *nearly* full).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Filler", "FreeSpace", "fill_filesystem", "free_space"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class FreeSpace:
    """What ``statvfs`` says an unprivileged writer can still get."""

    bytes: int
    inodes: int


def free_space(path: Path) -> FreeSpace:
    """Free bytes and inodes (for non-root writers, so reserved blocks do not count)."""
    st = os.statvfs(path)
    return FreeSpace(bytes=st.f_bavail * st.f_frsize, inodes=st.f_favail)


@dataclass(frozen=True)
class Filler:
    """The files that fill a filesystem; :meth:`release` deletes them."""

    directory: Path
    files: int
    allocated: int

    def release(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        os.sync()


def _is_full(exc: OSError) -> bool:
    return exc.errno in _FULL


def fill_filesystem(directory: Path, *, leave: int = 0, inodes: bool = True) -> Filler:
    """Fill the filesystem that will hold ``directory`` (made here) to ``leave`` free bytes.

    ``inodes``: use up every inode too. Returns what was made, for
    :meth:`Filler.release`. Works as root too: blocks reserved for root
    are filled as well, since stratasnap runs as root.
    """
    directory.mkdir(parents=True)
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    files = 1
    try:
        if inodes:
            files += _use_inodes(directory)
        allocated = _use_blocks(fd, directory, leave)
    finally:
        os.close(fd)
    return Filler(directory=directory, files=files, allocated=allocated)


def _use_inodes(directory: Path) -> int:
    made = 0
    while True:
        try:
            os.close(os.open(directory / f"i{made}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC))
        except OSError as exc:
            if _is_full(exc):
                return made
            raise
        made += 1


def _use_blocks(fd: int, directory: Path, leave: int) -> int:
    """fallocate halving chunks until even one block is refused (or ``leave`` is reached)."""
    st = os.statvfs(directory)
    block = st.f_frsize
    offset = os.fstat(fd).st_size
    # Deleted blocks come back at the journal's commit: settle first.
    os.sync()
    chunk = max(st.f_bfree * block - leave, block)
    while chunk >= block:
        free = os.statvfs(directory).f_bfree * block
        if leave and free - chunk < leave:
            chunk = (free - leave) // block * block
            if chunk < block:
                break
        try:
            os.posix_fallocate(fd, offset, chunk)
        except OSError as exc:
            if not _is_full(exc):
                raise
            chunk //= 2
            continue
        offset += chunk
    os.fsync(fd)
    return offset

"""Copying one file's data: a reflink when the filesystem can, else only its data extents.

Order of attempts, each remembered per copy so that a tree on ext4 or tmpfs
does not pay a failing ioctl per file:

1. ``FICLONE``: shares the extents (xfs with reflink=1, btrfs); holes stay holes.
2. ``copy_file_range`` over each data extent found with SEEK_DATA/SEEK_HOLE.
   Over a hole it would write zeros on ext4 (python-baselines 4b), hence the
   extents; it stays in the kernel, and on xfs/btrfs it reflinks by itself.
3. ``pread``/``pwrite`` when copy_file_range is refused (EXDEV across some
   filesystem pairs, ENOSYS/EINVAL on old kernels or special files).
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

__all__ = ["FICLONE", "CopyStats", "DataCopier"]

FICLONE = 0x40049409  # _IOW(0x94, 9, int)

# The filesystem (pair) cannot clone at all: stop trying for this copy.
_NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.ENOSYS})
# Only this file cannot be cloned (btrfs: differing nodatasum, swap files...).
_NO_CLONE_THIS = frozenset({errno.EINVAL, errno.ETXTBSY})
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
_RANGE_CHUNK = 1 << 30  # the kernel caps one call at ~2 GiB anyway
_RW_CHUNK = 1 << 20


@dataclass
class CopyStats:
    """What a copy did; tests use it to see which data path was taken."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    #: Device nodes, FIFOs and sockets.
    specials: int = 0
    #: Entries made as a hard link to an inode copied earlier.
    hardlinks: int = 0
    #: Regular files whose data was shared with FICLONE.
    reflinked: int = 0
    #: Data bytes written by copy_file_range or read/write (not reflinked ones).
    bytes_copied: int = 0
    #: Extended attributes the source or destination refused (ENOTSUP/EPERM).
    xattrs_skipped: int = 0


class DataCopier:
    """Copies file data between open fds; one per copy, as it remembers failures."""

    def __init__(self, stats: CopyStats) -> None:
        self.stats = stats
        self.clone = True
        self.copy_range = True

    def copy(self, src: int, dst: int, st: os.stat_result) -> None:
        """Copy ``st.st_size`` bytes of ``src`` (stat'ed as ``st``) into empty ``dst``."""
        size = st.st_size
        if size == 0:
            return
        if self.clone and self._clone(src, dst):
            return
        if st.st_blocks * 512 >= size:
            # As many bytes allocated as the size: no holes worth looking for.
            self._copy_range(src, dst, 0, size)
            return
        self._copy_extents(src, dst, size)

    def _clone(self, src: int, dst: int) -> bool:
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as e:
            if e.errno in _NO_CLONE:
                self.clone = False
                return False
            if e.errno in _NO_CLONE_THIS:
                return False
            raise
        self.stats.reflinked += 1
        return True

    def _copy_extents(self, src: int, dst: int, size: int) -> None:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but a hole up to EOF
                    break
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here
                    self._copy_range(src, dst, pos, size)
                    return
                raise
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
            self._copy_range(src, dst, start, end)
            pos = end
        # A hole at the end is no extent: set the size explicitly.
        os.ftruncate(dst, size)

    def _copy_range(self, src: int, dst: int, start: int, end: int) -> None:
        off = start
        while off < end:
            if self.copy_range:
                try:
                    n = os.copy_file_range(src, dst, min(end - off, _RANGE_CHUNK), off, off)
                except OSError as e:
                    if e.errno not in _NO_COPY_RANGE:
                        raise
                    self.copy_range = False
                    continue
            else:
                n = _pread_pwrite(src, dst, off, min(end - off, _RW_CHUNK))
            if n == 0:  # the source shrank while we copied: keep what there was
                break
            off += n
            self.stats.bytes_copied += n


def _pread_pwrite(src: int, dst: int, off: int, length: int) -> int:
    data = os.pread(src, length, off)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(dst, view[done:], off + done)
    return len(data)

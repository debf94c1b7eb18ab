"""Making a freshly written tree durable before its commit (containerd#5854).

A commit must not be recorded while a power loss could still take back the
layer's data or entries. Three ways to get there, chosen by the filesystem
and the size of the tree, all in the same walk that measures its usage:

- **writeback, then one journal commit** (ext3/ext4 with a jbd2 journal,
  data=ordered or writeback: :func:`.durable.journal_commit_covers_written_back_data`),
  up to :data:`WRITEBACK_LIMIT` files and directories. Writeback of every file
  is started (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), then waited for
  (``WAIT_BEFORE | WRITE | WAIT_AFTER``, which also writes what was dirtied
  meanwhile); then an fsync of the tree's root directory and an fdatasync of
  one of its files. Why that is enough, from the kernel's ext4 and jbd2 code:

  * once writeback of a page has ended, its block is allocated and written:
    ext4 ends page writeback only after converting an unwritten extent to a
    written one (the conversion is a journalled change made at I/O completion);
    the size and extent updates of writeback are journalled too. So after the
    waits every change that makes the data reachable (and the files, their
    entries, modes, xattrs, whiteouts) is in the running transaction or an
    earlier one;
  * an fsync of a directory on ext4 forces a commit of the running transaction
    (``ext4_sync_file``: non-regular inodes are in "journalled data" mode,
    ``ext4_force_commit``; since 6.4 ``ext4_fsync_journal`` does so explicitly
    for non-regular inodes), and jbd2 commits transactions in order: every
    earlier change is committed with it, and the commit block is written with
    a cache flush and FUA (``journal_submit_commit_record``);
  * data overwritten in place changes no metadata, so no commit needs to
    carry it, and its blocks may still sit in the device's volatile cache: the
    fdatasync of a file whose transaction has committed issues a device flush
    of its own (``needs_barrier`` in ``ext4_sync_file``), after every write
    of the tree completed.

  One journal commit and one flush, whatever the number of files, and no
  writeback of anyone else's dirty data (which a syncfs would do).
- **an fsync each** (other filesystems, up to :data:`FSYNC_LIMIT` files and
  directories): files, then directories deepest first.
- **syncfs(2)** otherwise: writes back everything dirty on the filesystem.

benchmarks/flush.py, fresh ext4 loop, its image on the host's disk / in
/dev/shm (shared machine, load 6, medians of 5, ms, the walk included);
"busy": 256 MiB of other data dirty on the filesystem; "written back": the
layer synced before (as unmounting an overlay does to its upper: the chain
of containerd's benchsuite):

=================================  ===========  ===========  ===========
tree                               fsync each   syncfs       one commit
=================================  ===========  ===========  ===========
4 files of 64 KiB                  3.2 / 2.1    2.1 / 0.8    1.8 / 1.0
4 files of 64 KiB, busy            7.0 / 10     215 / 275    2.3 / 1.2
10 files of 1 MiB                  16 / 10      7.4 / 7.9    9.0 / 14
10 files of 1 MiB, busy            16 / 7.7     184 / 143    7.2 / 4.4
10 files of 1 MiB, written back    2.3 / 0.5    1.2 / 0.4    1.4 / 0.6
1,000 files of 4 KiB                            31 / 31      40 / 58
1,000 files of 4 KiB, busy                      210 / 155    62 / 49
30,000 files of 4 KiB                           696 / 604    1165 / 1139
=================================  ===========  ===========  ===========

So one commit costs up to 2x a syncfs when nothing else is dirty (the
written-back chain: +0.2 ms; an open and two sync_file_range calls per file
and the extra flush), and saves 3-60x when something else is. Beyond
:data:`WRITEBACK_LIMIT` the per-file calls outweigh that: syncfs.
"""

from __future__ import annotations

import ctypes
import os

from ..types import Usage
from ._libc import StrPath, libc, os_error
from .durable import journal_commit_covers_written_back_data
from .usage import fsync_path, syncfs, walk_tree

__all__ = ["FSYNC_LIMIT", "WRITEBACK_LIMIT", "flush_tree", "journal_device"]

#: Above this many files and directories, one syncfs(2) instead of an fsync each
#: (where one journal commit does not cover a tree). Each fsync on a journalling
#: filesystem is a journal commit plus a device flush; syncfs is one of each but
#: also writes back whatever *else* is dirty on the filesystem, an unbounded cost
#: on a busy node; so a handful of entries get their own fsync.
FSYNC_LIMIT = 8
#: Above this many, syncfs(2) instead of writeback and one journal commit: each
#: file costs an open and two sync_file_range calls (see the table above).
WRITEBACK_LIMIT = 1024

_sync_file_range = libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
# Files whose writeback is in flight together: bounds the descriptors held.
_BATCH = 128
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def journal_device(path: StrPath) -> int | None:
    """``st_dev`` of the filesystem of ``path`` when one journal commit covers a
    written-back tree there (see the module's doc), else None. Probed once per open."""
    if not journal_commit_covers_written_back_data(path):
        return None
    return os.stat(path).st_dev


def flush_tree(
    path: StrPath,
    journal_dev: int | None = None,
    fsync_limit: int = FSYNC_LIMIT,
    writeback_limit: int = WRITEBACK_LIMIT,
) -> Usage:
    """Make the data and entries of the tree at ``path`` durable; return its usage.

    ``journal_dev`` is what :func:`journal_device` said of the filesystem the
    tree was made on: a tree wholly on that device is written back and covered
    by one journal commit; others get an fsync each, or a syncfs beyond
    ``fsync_limit``. One walk serves the flush and the usage.
    """
    root = os.fspath(path)
    tree = walk_tree(root, writeback_limit if journal_dev is not None else fsync_limit)
    if tree.files is None:
        syncfs(root)
    elif journal_dev is not None and tree.one_device and os.lstat(root).st_dev == journal_dev:
        _writeback_then_commit(root, tree.files, tree.dirs[-1] if tree.dirs else root)
    elif len(tree.files) + len(tree.dirs) > fsync_limit:
        syncfs(root)
    else:
        for p in (*tree.files, *tree.dirs):
            fsync_path(p)
    return tree.usage


def _writeback_then_commit(root: str, files: list[str], top: str) -> None:
    """Write back ``files``, wait, then one journal commit (fsync of directory ``top``)
    and one device flush (fdatasync of a file): see the module's doc for why."""
    last = -1
    try:
        for start in range(0, len(files), _BATCH):
            fds: list[int] = []
            try:
                for p in files[start : start + _BATCH]:
                    try:
                        fd = os.open(p, _FILE_FLAGS)
                    except FileNotFoundError:
                        continue  # deleted meanwhile: nothing of it to flush
                    fds.append(fd)
                    _range(fd, _WRITE, p)
                for fd in fds:
                    _range(fd, _WAIT_BEFORE | _WRITE | _WAIT_AFTER, root)
            finally:
                if fds:
                    # Keep one open: the flush after the commit needs a file.
                    if last >= 0:
                        os.close(last)
                    last = fds.pop()
                for fd in fds:
                    os.close(fd)
        fsync_path(top)
        if last >= 0:
            os.fdatasync(last)
    finally:
        if last >= 0:
            os.close(last)


def _range(fd: int, flags: int, path: str) -> None:
    if _sync_file_range(fd, 0, 0, flags) != 0:
        raise os_error(ctypes.get_errno(), path, "sync_file_range")

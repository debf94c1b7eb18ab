"""Making a freshly written tree durable before its commit (containerd#5854).

A commit must not be recorded while a power loss could still take back the
layer's data or entries. Three ways to get there, chosen by the filesystem
and the size of the tree, all in the same walk that measures its usage:

- **writeback, then one journal commit** (ext3/ext4 with a jbd2 journal,
  data=ordered or writeback: :func:`.durable.journal_commit_covers_written_back_data`),
  up to :data:`WRITEBACK_LIMIT` files and directories. Writeback of every file
  is started (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), then waited for
  (``WAIT_BEFORE | WRITE | WAIT_AFTER``, which also writes what was dirtied
  meanwhile); then the times of a directory of the caller's (the anchor, not
  in the tree) are set, and the tree's root directory is fsynced. Why that is
  enough, from the kernel's ext4 and jbd2 code:

  * once writeback of a page has ended, its block is allocated and written:
    ext4 ends page writeback only after converting an unwritten extent to a
    written one (the conversion is a journalled change made at I/O completion);
    the size and extent updates of writeback are journalled too. So after the
    waits every change that makes the data reachable (and the files, their
    entries, modes, xattrs, whiteouts) is in the running transaction or an
    earlier one;
  * the anchor's new times are a journalled change made after every write of
    the tree completed: a transaction is running and holds it;
  * an fsync of a directory on ext4 forces a commit of the running transaction
    (``ext4_sync_file``: non-regular inodes are in "journalled data" mode,
    ``ext4_force_commit``; since 6.4 ``ext4_fsync_journal`` does so explicitly
    for non-regular inodes), and jbd2 commits transactions in order: every
    earlier change is committed with it. That commit began after the anchor's
    change, so after every write of the tree completed, and it flushes the
    device's cache before its commit block (``REQ_PREFLUSH | REQ_FUA`` in
    ``journal_submit_commit_record``; with ``async_commit``, a flush after it):
    data overwritten in place, which no transaction carries, is on stable
    storage too.

  One journal commit and its one flush, whatever the number of files, and no
  writeback of anyone else's dirty data (which a syncfs would do).
- **an fsync each** (other filesystems, up to :data:`FSYNC_LIMIT` files and
  directories): files, then directories deepest first.
- **syncfs(2)** otherwise: writes back everything dirty on the filesystem.

benchmarks/flush.py, fresh ext4 loop, its image on the host's disk / in
/dev/shm (shared machine, load 5-7, medians of 5, ms, the walk included);
"busy": 256 MiB of other data dirty on the filesystem; "written back": the
layer synced before (as unmounting an overlay does to its upper: the chain
of containerd's benchsuite):

=================================  ===========  ===========  ===========
tree                               fsync each   syncfs       one commit
=================================  ===========  ===========  ===========
4 files of 64 KiB                  4.4 / 0.6    3.9 / 0.8    3.0 / 0.5
4 files of 64 KiB, busy            15 / 1.3     252 / 173    25 / 1.7
10 files of 1 MiB                  38 / 7.1     9.7 / 2.9    14 / 3.6
10 files of 1 MiB, busy            34 / 6.4     228 / 177    9.1 / 6.0
10 files of 1 MiB, written back    2.9 / 0.6    1.4 / 0.8    2.7 / 0.7
1,000 files of 4 KiB                            43 / 57      78 / 80
1,000 files of 4 KiB, busy                      280 / 337    76 / 47
30,000 files of 4 KiB                           590 / 863    1160 / 1186
=================================  ===========  ===========  ===========

The ten 1 MiB files alone again, 15 rounds alternated (disk / /dev/shm):
syncfs 8.2 / 3.8 ms, one commit 7.7 / 4.1 ms; written back, 1.32 / 0.39 and
1.34 / 0.41 ms. So where nothing else is dirty one commit costs about what a
syncfs does up to a few hundred files (1.4-2x it at 1,000, for the open and
two sync_file_range calls per file), and where something else is, it saves
3-20x. Beyond :data:`WRITEBACK_LIMIT`: syncfs.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ..types import Usage
from ._libc import StrPath, libc, os_error
from .durable import journal_commit_covers_written_back_data
from .usage import fsync_path, syncfs, walk_tree

__all__ = ["FSYNC_LIMIT", "WRITEBACK_LIMIT", "JournalCommit", "flush_tree", "journal_commit"]

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


@dataclass(frozen=True)
class JournalCommit:
    """Where one journal commit makes a written-back tree durable (see the module's doc)."""

    #: ``st_dev`` of the filesystem: only trees wholly on it are flushed this way.
    device: int
    #: A directory of the caller's on it, whose timestamps a flush sets (the
    #: change that makes sure a transaction is running when it forces a commit).
    anchor: str


def journal_commit(directory: StrPath) -> JournalCommit | None:
    """A :class:`JournalCommit` anchored at ``directory`` (the caller's own) when one
    journal commit covers a written-back tree on its filesystem, else None.

    Probed once per open.
    """
    if not journal_commit_covers_written_back_data(directory):
        return None
    return JournalCommit(os.stat(directory).st_dev, os.fspath(directory))


def flush_tree(
    path: StrPath,
    journal: JournalCommit | None = None,
    fsync_limit: int = FSYNC_LIMIT,
    writeback_limit: int = WRITEBACK_LIMIT,
) -> Usage:
    """Make the data and entries of the tree at ``path`` durable; return its usage.

    ``journal`` is what :func:`journal_commit` said of the filesystem the
    tree was made on: a tree wholly on it is written back and covered by one
    journal commit; others get an fsync each, or a syncfs beyond
    ``fsync_limit``. One walk serves the flush and the usage.
    """
    root = os.fspath(path)
    tree = walk_tree(root, writeback_limit if journal is not None else fsync_limit)
    if tree.files is None:
        syncfs(root)
    elif journal is not None and tree.one_device and os.lstat(root).st_dev == journal.device:
        _writeback_then_commit(tree.files, tree.dirs[-1] if tree.dirs else root, journal.anchor)
    elif len(tree.files) + len(tree.dirs) > fsync_limit:
        syncfs(root)
    else:
        for p in (*tree.files, *tree.dirs):
            fsync_path(p)
    return tree.usage


def _writeback_then_commit(files: list[str], top: str, anchor: str) -> None:
    """Write back ``files`` and wait; set ``anchor``'s times; fsync directory ``top``,
    which commits the journal with a device flush: see the module's doc for why."""
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
                _range(fd, _WAIT_BEFORE | _WRITE | _WAIT_AFTER, top)
        finally:
            for fd in fds:
                os.close(fd)
    os.utime(anchor)
    fsync_path(top)


def _range(fd: int, flags: int, path: str) -> None:
    if _sync_file_range(fd, 0, 0, flags) != 0:
        raise os_error(ctypes.get_errno(), path, "sync_file_range")

"""Which fsyncs make a freshly created snapshot directory durable, per filesystem.

A new snapshot directory is made (``new-<id>`` with ``fs/``, ``work/``…), then
renamed to ``<id>``, and the store records it. Two ways keep the store from
ever holding a snapshot whose storage a power loss took back:

**Rely on the filesystem's order** (:func:`later_fsync_covers_new_names`). An
active or view snapshot's storage right after its create holds nothing a
user could have made durable: it is derived from its parent (committed,
durable) and its labels (in the store). Where every later fsync inside the
new tree also makes the ``mkdir``/rename that made it durable, a power loss
can only take the storage back together with everything written into it
since, so the next open rebuilds it from the parent, exactly as the create
made it (:meth:`stratasnap.snapshotter.BaseSnapshotter._rebuild_lost_storage`),
and a create needs no fsync of its own: the store's commit is its only flush.
A commit makes ``<id>`` durable itself before the store records it. This
holds on:

- ext3/ext4 with a jbd2 journal: every metadata change goes into one journal
  whose transactions commit in order, and an fsync commits the one holding
  the fsynced inode's last change, with every earlier one (a user's write
  into the snapshot comes after its rename). With ``fast_commit`` the rename
  of a directory makes the next commit a full one ("Dir renamed" is an
  ineligible reason in fs/ext4/fast_commit.c). A user's fsync inside a loop-
  mounted image (blockfile, size-limited uppers) is an fsync of the image
  file on this filesystem, so the same holds;
- xfs: one metadata log; an fsync forces it up to the inode's last change,
  and a log force writes every earlier transaction with it (``xfs_rename``
  also logs the renamed inode, so an fsync of ``<id>`` itself, as commit
  does, forces the log through its rename);
- tmpfs: nothing survives a power loss to begin with.

Not on btrfs: its fsync logs an inode's ancestors only when they were
created in the running transaction (``log_new_ancestors_fast`` in
fs/btrfs/tree-log.c checks ``generation >= transid``), and log trees are per
subvolume, so a file fsynced inside a snapshot's subvolume, or after a
transaction commit between the ``mkdir`` and the rename (every subvolume
snapshot commits one), leaves the rename unlogged: the user's file would
survive under ``new-<id>``, which the rebuild would delete. Nor on ext4
without a journal or on filesystems not known here.

**Sync before the commit** (everywhere else): an fsync of ``snapshots/``
after the rename, once per shared commit, and on filesystems where that
does not also cover the entries made inside (:func:`parent_sync_covers_new_entries`)
an fsync of ``new-<id>`` too. On a loop-mounted ext4 the fsync of
``snapshots/`` costs a journal commit per prepare (0.80-0.87 ms against
0.63-0.65 ms in-process on an image in memory), which is why it is skipped
where the order makes it redundant.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from ._libc import StrPath, check, libc

__all__ = [
    "BTRFS_SUPER_MAGIC",
    "fs_magic",
    "journal_commit_covers_written_back_data",
    "later_fsync_covers_new_names",
    "parent_sync_covers_new_entries",
]

EXT4_SUPER_MAGIC = 0xEF53  # ext2, ext3 and ext4 share it: the journal tells them apart
XFS_SUPER_MAGIC = 0x58465342
BTRFS_SUPER_MAGIC = 0x9123683E
TMPFS_MAGIC = 0x01021994

_fstatfs = libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
_fstatfs.restype = ctypes.c_int


def fs_magic(path: StrPath) -> int:
    """``f_type`` of the filesystem holding ``path`` (statfs(2)'s magic number)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        check(_fstatfs(fd, buf), path, "fstatfs")
    finally:
        os.close(fd)
    (f_type,) = struct.unpack_from("=q", buf, 0)  # f_type: the first field, a long
    return int(f_type) & 0xFFFFFFFF


def parent_sync_covers_new_entries(directory: StrPath) -> bool:
    """Whether an fsync of ``directory`` makes new subdirectories' entries durable too.

    ext4 with a journal and xfs: by their order (see above); btrfs: an fsync of
    a directory logs its new subdirectories' entries with it (or commits the
    whole transaction); tmpfs: nothing to lose.
    """
    return fs_magic(directory) == BTRFS_SUPER_MAGIC or later_fsync_covers_new_names(directory)


def later_fsync_covers_new_names(directory: StrPath) -> bool:
    """Whether any later fsync of something inside a new subdirectory of ``directory``
    also makes durable the ``mkdir`` and renames that made that subdirectory."""
    magic = fs_magic(directory)
    if magic in (XFS_SUPER_MAGIC, TMPFS_MAGIC):
        return True
    return magic == EXT4_SUPER_MAGIC and _journal_device(directory) is not None


def journal_commit_covers_written_back_data(directory: StrPath) -> bool:
    """Whether, on the filesystem of ``directory``, one journal commit makes every
    earlier metadata change durable, and the data of files whose writeback has
    completed is then one device flush away (see :mod:`.flush`).

    ext3/ext4 with a jbd2 journal, data ordered or writeback. Not data=journal,
    where file data goes through the journal by other paths than writeback.
    """
    name = _journal_device(directory) if fs_magic(directory) == EXT4_SUPER_MAGIC else None
    if name is None:
        return False
    try:
        # Every option, defaults included (the mount table leaves those out).
        options = Path(f"/proc/fs/ext4/{name}/options").read_text().split()
    except OSError:
        return False
    return "data=ordered" in options or "data=writeback" in options


def _block_device_name(path: StrPath) -> str | None:
    """The kernel's name of the block device holding ``path`` (``loop3``, ``sda1``)."""
    dev = os.stat(path).st_dev
    try:
        return Path(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")).name
    except OSError:
        return None  # not a block device (tmpfs, overlay, nfs...)


def _journal_device(path: StrPath) -> str | None:
    """The block device of the ext filesystem holding ``path`` when it runs a jbd2
    journal (/proc/fs/jbd2/DEV-8), else None (no journal, or an unknown device:
    fsync each directory)."""
    name = _block_device_name(path)
    if name is None or not Path(f"/proc/fs/jbd2/{name}-8").is_dir():
        return None
    return name

"""btrfs subvolumes and qgroups through ioctls (no ``btrfs`` binary).

The structures and numbers come from the kernel's uapi headers
``linux/btrfs.h`` and ``linux/btrfs_tree.h``. Every call takes paths or
fds and raises :class:`OSError` carrying the errno, the path and the
ioctl's name, like the mount helpers.

What a snapshotter needs:

- :func:`create_subvolume`, :func:`snapshot` (writable or read-only),
  :func:`destroy_subvolume` (one ioctl; the kernel frees the blocks in
  the background), :func:`is_subvolume`;
- :func:`destroy_subvolumes_in` (before deleting a tree: its subvolumes, read-only
  ones and nested ones too);
- :func:`is_readonly` / :func:`set_readonly` (the subvolume's RDONLY flag);
- quotas: :func:`quota_status`, :func:`enable_quota`, :func:`set_qgroup_limit`,
  :func:`qgroup_info` (referenced and exclusive bytes of one subvolume's
  qgroup, read from the quota tree with one TREE_SEARCH), :func:`subvolume_id`;
- :func:`sync` (commit the filesystem's transaction: qgroup numbers are
  brought up to date at commits).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._libc import StrPath, os_error
from .durable import BTRFS_SUPER_MAGIC, fs_magic
from .mountinfo import read_mountinfo

__all__ = [
    "BTRFS_SUPER_MAGIC",
    "QgroupInfo",
    "QuotaStatus",
    "create_subvolume",
    "destroy_subvolume",
    "destroy_subvolumes_in",
    "enable_quota",
    "filesystem_name",
    "is_btrfs",
    "is_readonly",
    "is_subvolume",
    "qgroup_info",
    "quota_status",
    "remove_qgroup",
    "set_qgroup_limit",
    "set_readonly",
    "snapshot",
    "subvolume_id",
    "sync",
]


# -- ioctl numbers (_IOC(dir, 0x94, nr, size)) --------------------------------------------

_MAGIC = 0x94
_WRITE, _READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_MAGIC << 8) | nr


_VOL_ARGS_V2 = 4096  # struct btrfs_ioctl_vol_args_v2 (the name union pads it to a page)
_SEARCH_KEY = struct.Struct("=7Q2L2L4Q")  # struct btrfs_ioctl_search_key, 104 bytes
_SEARCH_HEADER = struct.Struct("=3Q2L")  # struct btrfs_ioctl_search_header, 32 bytes
_SEARCH_ARGS = 4096  # key + 3992 bytes of results
_QGROUP_LIMIT = struct.Struct("=Q5Q")  # qgroupid + struct btrfs_qgroup_limit

IOC_SNAP_CREATE_V2 = _ioc(_WRITE, 23, _VOL_ARGS_V2)
IOC_SUBVOL_CREATE_V2 = _ioc(_WRITE, 24, _VOL_ARGS_V2)
IOC_SNAP_DESTROY_V2 = _ioc(_WRITE, 63, _VOL_ARGS_V2)
IOC_SUBVOL_GETFLAGS = _ioc(_READ, 25, 8)
IOC_SUBVOL_SETFLAGS = _ioc(_WRITE, 26, 8)
IOC_TREE_SEARCH = _ioc(_READ | _WRITE, 17, _SEARCH_ARGS)
IOC_INO_LOOKUP = _ioc(_READ | _WRITE, 18, 4096)
IOC_SYNC = _ioc(0, 8, 0)
IOC_QUOTA_CTL = _ioc(_READ | _WRITE, 40, 16)
IOC_QGROUP_CREATE = _ioc(_WRITE, 42, 16)
IOC_QGROUP_LIMIT = _ioc(_READ, 43, _QGROUP_LIMIT.size)

SUBVOL_RDONLY = 1 << 1
SUBVOL_NAME_MAX = 4039
QUOTA_CTL_ENABLE = 1
QGROUP_LIMIT_MAX_EXCL = 1 << 1

# Tree ids, item types and objectids (linux/btrfs_tree.h).
_QUOTA_TREE = 8
_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root directory
_QGROUP_STATUS_KEY = 240
_QGROUP_INFO_KEY = 242
_QGROUP_STATUS_ON = 1 << 0
_QGROUP_STATUS_RESCAN = 1 << 1
_QGROUP_STATUS_INCONSISTENT = 1 << 2
_U64_MAX = (1 << 64) - 1

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _ioctl(fd: int, request: int, arg: bytearray | int, path: StrPath, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise os_error(e.errno or errno.EIO, path, what) from None


@contextmanager
def _opened(path: StrPath, flags: int = _DIR_FLAGS) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


# -- which filesystem ---------------------------------------------------------------------

def is_btrfs(path: StrPath) -> bool:
    """Whether ``path`` (which must exist) is on a btrfs filesystem."""
    return fs_magic(path) == BTRFS_SUPER_MAGIC


def filesystem_name(path: StrPath) -> str:
    """The type of the filesystem holding ``path`` as the mount table names it (``ext4``…)."""
    real = os.path.realpath(path)
    best, name = -1, "unknown"
    for m in read_mountinfo():
        mp = str(m.mountpoint)
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= best:  # the longest match; later (stacked) mounts win ties
            best, name = len(mp), m.fstype
    return name


# -- subvolumes -----------------------------------------------------------------------------


def _vol_args(name: str, fd: int = 0, flags: int = 0) -> bytearray:
    raw = os.fsencode(name)
    if not raw or b"/" in raw or len(raw) > SUBVOL_NAME_MAX or raw in (b".", b".."):
        raise os_error(errno.EINVAL, name, "not a subvolume name")
    buf = bytearray(_VOL_ARGS_V2)
    struct.pack_into("=qQQ", buf, 0, fd, 0, flags)  # fd, transid, flags
    buf[56 : 56 + len(raw)] = raw  # name, after the 32-byte size/qgroup_inherit union
    return buf


def create_subvolume(parent_dir: StrPath, name: str) -> None:
    """Create an empty subvolume ``parent_dir/name``."""
    with _opened(parent_dir) as dfd:
        args = _vol_args(name)
        _ioctl(
            dfd, IOC_SUBVOL_CREATE_V2, args, Path(parent_dir) / name, "BTRFS_IOC_SUBVOL_CREATE_V2"
        )


def snapshot(source: StrPath, parent_dir: StrPath, name: str, readonly: bool = False) -> None:
    """Snapshot the subvolume ``source`` as ``parent_dir/name`` (one ioctl, whatever it holds).

    Subvolumes nested inside ``source`` are not part of the snapshot (they
    show up as empty directories), as with ``btrfs subvolume snapshot``.
    """
    with _opened(source) as sfd, _opened(parent_dir) as dfd:
        args = _vol_args(name, sfd, SUBVOL_RDONLY if readonly else 0)
        _ioctl(dfd, IOC_SNAP_CREATE_V2, args, Path(parent_dir) / name, "BTRFS_IOC_SNAP_CREATE_V2")


def destroy_subvolume(parent_dir: StrPath, name: str) -> None:
    """Delete the subvolume ``parent_dir/name``, read-only or not.

    The directory entry goes at once; the kernel's cleaner frees the tree
    and its blocks in the background (an orphan item makes that survive a
    crash). ENOTEMPTY: it holds other subvolumes, which must go first.
    """
    with _opened(parent_dir) as dfd:
        args = _vol_args(name)
        _ioctl(dfd, IOC_SNAP_DESTROY_V2, args, Path(parent_dir) / name, "BTRFS_IOC_SNAP_DESTROY_V2")


def is_subvolume(path: StrPath) -> bool:
    """Whether ``path`` is the root of a btrfs subvolume (not followed if a symlink).

    A subvolume's root directory always has inode number 256 on btrfs.
    """
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_ino == _FIRST_FREE_OBJECTID and is_btrfs(path)


def _get_flags(fd: int, path: StrPath) -> int:
    buf = bytearray(8)
    _ioctl(fd, IOC_SUBVOL_GETFLAGS, buf, path, "BTRFS_IOC_SUBVOL_GETFLAGS")
    (flags,) = struct.unpack("=Q", buf)
    return int(flags)


def is_readonly(subvolume: StrPath) -> bool:
    """Whether the subvolume has the RDONLY flag (no write to anything in it succeeds)."""
    with _opened(subvolume) as fd:
        return bool(_get_flags(fd, subvolume) & SUBVOL_RDONLY)


def set_readonly(subvolume: StrPath, readonly: bool = True) -> bool:
    """Set or clear the subvolume's RDONLY flag; returns whether it changed.

    Setting it ends writes at once, also through mounts and open files
    (they get EROFS from then on). The kernel makes the change durable.
    """
    with _opened(subvolume) as fd:
        flags = _get_flags(fd, subvolume)
        new = flags | SUBVOL_RDONLY if readonly else flags & ~SUBVOL_RDONLY
        if new == flags:
            return False
        buf = bytearray(struct.pack("=Q", new))
        _ioctl(fd, IOC_SUBVOL_SETFLAGS, buf, subvolume, "BTRFS_IOC_SUBVOL_SETFLAGS")
    return True


def subvolume_id(path: StrPath) -> int:
    """The id (tree id) of the subvolume holding ``path``: also its level-0 qgroup's id."""
    buf = bytearray(4096)  # struct btrfs_ioctl_ino_lookup_args; treeid 0: the fd's own
    struct.pack_into("=QQ", buf, 0, 0, _FIRST_FREE_OBJECTID)
    with _opened(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) as fd:
        _ioctl(fd, IOC_INO_LOOKUP, buf, path, "BTRFS_IOC_INO_LOOKUP")
    (treeid,) = struct.unpack_from("=Q", buf, 0)
    return int(treeid)


def sync(path: StrPath) -> None:
    """Write back the filesystem's dirty data and commit its transaction (``BTRFS_IOC_SYNC``)."""
    with _opened(path) as fd:
        _ioctl(fd, IOC_SYNC, 0, path, "BTRFS_IOC_SYNC")


# -- tree search ------------------------------------------------------------------------------


def _lookup_item(
    path: StrPath, tree_id: int, objectid: int, item_type: int, offset: int
) -> bytes | None:
    """The data of the item with exactly this key in tree ``tree_id``; None if there is none.

    One TREE_SEARCH whose range is the one key. ENOENT: the tree itself does
    not exist (the quota tree before quotas were ever enabled), also None.
    """
    buf = bytearray(_SEARCH_ARGS)
    _SEARCH_KEY.pack_into(
        buf, 0, tree_id, objectid, objectid, offset, offset, 0, _U64_MAX,
        item_type, item_type, 1, 0, 0, 0, 0, 0,
    )  # fmt: skip
    with _opened(path) as fd:
        try:
            _ioctl(fd, IOC_TREE_SEARCH, buf, path, "BTRFS_IOC_TREE_SEARCH")
        except FileNotFoundError:
            return None
    if _SEARCH_KEY.unpack_from(buf, 0)[9] == 0:  # nr_items
        return None
    *_, length = _SEARCH_HEADER.unpack_from(buf, _SEARCH_KEY.size)
    start = _SEARCH_KEY.size + _SEARCH_HEADER.size
    return bytes(buf[start : start + length])


# -- quotas ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaStatus:
    """Whether qgroups are on for a filesystem, and whether their numbers can be trusted yet."""

    enabled: bool
    rescanning: bool = False
    inconsistent: bool = False


@dataclass(frozen=True)
class QgroupInfo:
    """Bytes a subvolume's qgroup accounts, as of the last transaction commit."""

    referenced: int
    exclusive: int


def quota_status(path: StrPath) -> QuotaStatus:
    """The qgroup status of the btrfs filesystem holding ``path`` (needs CAP_SYS_ADMIN)."""
    data = _lookup_item(path, _QUOTA_TREE, 0, _QGROUP_STATUS_KEY, 0)
    if data is None:
        return QuotaStatus(enabled=False)
    _version, _generation, flags = struct.unpack_from("<3Q", data)
    return QuotaStatus(
        enabled=bool(flags & _QGROUP_STATUS_ON),
        rescanning=bool(flags & _QGROUP_STATUS_RESCAN),
        inconsistent=bool(flags & _QGROUP_STATUS_INCONSISTENT),
    )


def enable_quota(path: StrPath) -> None:
    """Turn qgroups on for the filesystem holding ``path``.

    Existing data is accounted by a rescan the kernel starts in the
    background; subvolumes created from now on are accounted at once.
    """
    buf = bytearray(struct.pack("=QQ", QUOTA_CTL_ENABLE, 0))
    with _opened(path) as fd:
        _ioctl(fd, IOC_QUOTA_CTL, buf, path, "BTRFS_IOC_QUOTA_CTL(enable)")


def set_qgroup_limit(subvolume: StrPath, max_exclusive: int | None) -> None:
    """Limit the bytes the subvolume may hold exclusively (None: no limit).

    Exclusive bytes are those no other subvolume shares: for a snapshot of
    a parent, what was written in it. Past the limit writes fail with EDQUOT.
    """
    limit = 0 if max_exclusive is None else max_exclusive
    # qgroupid 0: the level-0 qgroup of the subvolume the fd is in.
    buf = bytearray(_QGROUP_LIMIT.pack(0, QGROUP_LIMIT_MAX_EXCL, 0, limit, 0, 0))
    with _opened(subvolume) as fd:
        _ioctl(fd, IOC_QGROUP_LIMIT, buf, subvolume, "BTRFS_IOC_QGROUP_LIMIT")


def qgroup_info(fs_path: StrPath, subvol_id: int) -> QgroupInfo | None:
    """The level-0 qgroup of subvolume ``subvol_id``; None if it has none (quotas off).

    ``fs_path`` is any path on the filesystem (the search names the tree).
    One TREE_SEARCH of the quota tree for the key ``(0, QGROUP_INFO, id)``.
    """
    data = _lookup_item(fs_path, _QUOTA_TREE, 0, _QGROUP_INFO_KEY, subvol_id)
    if data is None:
        return None
    _gen, rfer, _rfer_cmpr, excl, _excl_cmpr = struct.unpack_from("<5Q", data)
    return QgroupInfo(referenced=int(rfer), exclusive=int(excl))


def remove_qgroup(fs_path: StrPath, subvol_id: int) -> None:
    """Delete the level-0 qgroup of a deleted subvolume (EBUSY until the kernel dropped it)."""
    buf = bytearray(struct.pack("=QQ", 0, subvol_id))  # create=0: remove
    with _opened(fs_path) as fd:
        _ioctl(fd, IOC_QGROUP_CREATE, buf, fs_path, "BTRFS_IOC_QGROUP_CREATE(remove)")


# -- deleting trees that hold subvolumes ------------------------------------------------------


def _subvolume_roots(top: str, top_dev: int) -> list[str]:
    """Subvolumes nested below directory ``top`` (not below those), outermost first.

    A nested subvolume's root has inode 256 and a device number of its own.
    """
    found: list[str] = []
    stack = [top]
    while stack:
        d = stack.pop()
        with os.scandir(d) as entries:
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    continue
                st = e.stat(follow_symlinks=False)
                if st.st_ino == _FIRST_FREE_OBJECTID and st.st_dev != top_dev:
                    found.append(e.path)
                else:
                    stack.append(e.path)
    return found


def _destroy(path: str) -> None:
    parent, name = os.path.split(path)
    try:
        destroy_subvolume(parent, name)
        return
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            raise
    # It holds subvolumes of its own (made inside a container): those go
    # first, which needs this one writable.
    set_readonly(path, False)
    for inner in _subvolume_roots(path, os.lstat(path).st_dev):
        _destroy(inner)
    destroy_subvolume(parent, name)


def destroy_subvolumes_in(path: StrPath) -> bool:
    """Delete the subvolume at ``path``, or every subvolume below the directory ``path``.

    Subvolumes go with one ioctl each, however many files they hold (a
    read-only one could not be emptied file by file anyway), including
    subvolumes nested in them. Returns whether ``path`` itself was a
    subvolume (and is gone); otherwise only plain files and directories
    are left below it. A path that is gone already is fine.
    """
    top = os.fspath(path)
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        return False
    if st.st_ino == _FIRST_FREE_OBJECTID and is_btrfs(top):
        _destroy(top)
        return True
    for inner in _subvolume_roots(top, st.st_dev):
        with contextlib.suppress(FileNotFoundError):
            _destroy(inner)
    return False

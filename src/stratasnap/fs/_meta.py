"""Copying an inode's metadata: owner, extended attributes, mode, times.

The order matters and is the same everywhere: owner first, because chown
clears setuid/setgid and ``security.capability``; then xattrs; then the mode
(setuid bits survive now); times last, because every other change (and the
data) bumps them.
"""

from __future__ import annotations

import errno
import os
import stat

from ._data import CopyStats

__all__ = ["Xattrs", "apply_fd", "apply_path", "read_xattrs"]

Xattrs = list[tuple[str, bytes]]

# A single attribute that cannot be read or written (a namespace the
# filesystem lacks, or one we may not touch) is skipped, as containerd does;
# anything else is a real error.
_SKIP = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})


def read_xattrs(target: int | str, stats: CopyStats) -> Xattrs:
    """All readable xattrs of an fd, or of a path without following a symlink."""
    try:
        if isinstance(target, int):
            names = os.listxattr(target)
        else:
            names = os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in _SKIP:  # no xattr support at all on the source
            return []
        raise
    result: Xattrs = []
    for name in names:
        try:
            if isinstance(target, int):
                value = os.getxattr(target, name)
            else:
                value = os.getxattr(target, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed since listxattr
                continue
            if e.errno in _SKIP:
                stats.xattrs_skipped += 1
                continue
            raise
        result.append((name, value))
    return result


def _set_xattrs(target: int | str, xattrs: Xattrs, stats: CopyStats) -> None:
    for name, value in xattrs:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _SKIP:
                raise
            stats.xattrs_skipped += 1


def _owner_matches(st: os.stat_result, have: os.stat_result) -> bool:
    return st.st_uid == have.st_uid and st.st_gid == have.st_gid


def apply_fd(fd: int, st: os.stat_result, xattrs: Xattrs, stats: CopyStats) -> None:
    """Give the inode open as ``fd`` the metadata in ``st`` and ``xattrs``."""
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        # Unprivileged: fine as long as the copy already has that owner.
        if not _owner_matches(st, os.fstat(fd)):
            raise
    _set_xattrs(fd, xattrs, stats)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def apply_path(
    dir_fd: int, name: str, path: str, st: os.stat_result, xattrs: Xattrs, stats: CopyStats
) -> None:
    """The same for an inode we cannot open (symlink, device, FIFO, socket).

    ``name`` is relative to ``dir_fd``; ``path`` is the same entry as a full
    path, for the xattr calls, which have no ``*at`` form.
    """
    try:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    except PermissionError:
        if not _owner_matches(st, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)):
            raise
    _set_xattrs(path, xattrs, stats)
    if not stat.S_ISLNK(st.st_mode):  # a symlink's mode is always 0777 on Linux
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

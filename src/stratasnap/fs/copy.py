"""Copying directory trees and files with everything a container layer carries.

``shutil.copytree`` loses owners, hard links, device nodes and FIFOs
(python-baselines 4b); this walker keeps all of them, plus setuid/sticky
modes, xattrs, nanosecond times and holes, and shares data by reflink where
the filesystem can.

The walk opens each directory once and works relative to its fd (one
``fstatat`` per entry, no path resolution per file); directories are pushed
on an explicit stack, so depth costs neither recursion nor open fds.
Directory metadata is applied after all of the tree is in place, children
before parents: creating entries would bump a parent's times, and a
read-only mode would stop an unprivileged copy from filling it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path

from . import _meta
from ._data import FICLONE, CopyStats, DataCopier
from ._libc import StrPath, fsencode, libc, os_error

__all__ = ["CopyStats", "copy_file", "copy_file_atomic", "copy_tree", "reflink_supported"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL = frozenset({stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})


class _TreeCopier:
    def __init__(self) -> None:
        self.stats = CopyStats()
        self.data = DataCopier(self.stats)
        # (st_dev, st_ino) of every multiply-linked source inode → its copy.
        self.links: dict[tuple[int, int], str] = {}
        # Directories to finish at the end: (copy, source stat, source xattrs).
        self.pending: list[tuple[str, os.stat_result, _meta.Xattrs]] = []
        self.stack: list[tuple[str, str, os.stat_result]] = []

    def run(self, src: str, dst: str, st: os.stat_result) -> CopyStats:
        self.stack.append((src, dst, st))
        while self.stack:
            self._copy_dir(*self.stack.pop())
        for path, dir_st, xattrs in reversed(self.pending):
            fd = os.open(path, _DIR_FLAGS)
            try:
                _meta.apply_fd(fd, dir_st, xattrs, self.stats)
            finally:
                os.close(fd)
        return self.stats

    def _copy_dir(self, src: str, dst: str, st: os.stat_result) -> None:
        sfd = os.open(src, _DIR_FLAGS)
        try:
            dfd = os.open(dst, _DIR_FLAGS)
            try:
                self.pending.append((dst, st, _meta.read_xattrs(sfd, self.stats)))
                with os.scandir(sfd) as entries:
                    for entry in entries:
                        self._copy_entry(entry, src, dst, sfd, dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def _copy_entry(self, entry: os.DirEntry[str], src: str, dst: str, sfd: int, dfd: int) -> None:
        name = entry.name
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dfd)
            self.stack.append((f"{src}/{name}", f"{dst}/{name}", st))
            self.stats.dirs += 1
            return
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None:
                os.link(first, name, dst_dir_fd=dfd, follow_symlinks=False)
                self.stats.hardlinks += 1
                return
            self.links[key] = f"{dst}/{name}"
        if stat.S_ISREG(mode):
            self._copy_file_at(sfd, dfd, name, st)
            return
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            self.stats.symlinks += 1
        elif stat.S_IFMT(mode) in _SPECIAL:
            # Sockets too: mknod recreates the inode (no listener, as with cp -a).
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
            self.stats.specials += 1
        else:
            raise os_error(errno.EINVAL, f"{src}/{name}", f"unknown file type {mode:o}")
        xattrs = _meta.read_xattrs(f"{src}/{name}", self.stats)
        _meta.apply_path(dfd, name, f"{dst}/{name}", st, xattrs, self.stats)

    def _copy_file_at(self, sfd: int, dfd: int, name: str, st: os.stat_result) -> None:
        src = os.open(name, _READ_FLAGS, dir_fd=sfd)
        try:
            # Private (0600) until the copy is complete; the real mode comes last.
            dst = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dfd)
            try:
                self.data.copy(src, dst, st)
                _meta.apply_fd(dst, st, _meta.read_xattrs(src, self.stats), self.stats)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self.stats.files += 1


def _prepare_root(dst: str) -> None:
    try:
        os.mkdir(dst, 0o700)
    except FileExistsError:
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise
        with os.scandir(dst) as it:
            if next(it, None) is not None:
                raise os_error(errno.ENOTEMPTY, dst, "copy destination is not empty") from None


def copy_tree(src: StrPath, dst: StrPath) -> CopyStats:
    """Copy directory ``src`` to ``dst`` with owners, modes, times, xattrs and links.

    ``dst`` must not exist (it is made, and gets ``src``'s metadata) or be an
    empty directory (whose metadata is then set from ``src``). Hard links
    inside ``src`` stay hard links in the copy; symlinks are copied as links;
    device nodes, FIFOs and sockets are recreated; holes stay holes; data is
    reflinked when the filesystem can. On failure the partial copy stays for
    the caller to remove. Returns what was done (e.g. ``reflinked`` files).
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    st = os.lstat(src_s)
    if not stat.S_ISDIR(st.st_mode):
        raise os_error(errno.ENOTDIR, src_s, "copy source")
    real_src = os.path.realpath(src_s).rstrip("/") + "/"
    if (os.path.realpath(dst_s).rstrip("/") + "/").startswith(real_src):
        raise os_error(errno.EINVAL, dst_s, "cannot copy a directory into itself")
    _prepare_root(dst_s)
    return _TreeCopier().run(src_s, dst_s, st)


def _copy_file(src: StrPath, dst: StrPath, sync: bool) -> CopyStats:
    stats = CopyStats()
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise os_error(errno.EINVAL, src, "not a regular file")
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            DataCopier(stats).copy(sfd, dfd, st)
            _meta.apply_fd(dfd, st, _meta.read_xattrs(sfd, stats), stats)
            if sync:
                os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            _unlink_quietly(dst)  # we made it (O_EXCL), so it is ours to remove
            raise
        os.close(dfd)
    finally:
        os.close(sfd)
    stats.files = 1
    return stats


def copy_file(src: StrPath, dst: StrPath) -> CopyStats:
    """Copy one regular file (following a symlink at ``src``) to new file ``dst``.

    Reflinks when possible, keeps holes, copies owner, mode, xattrs and
    times. ``dst`` must not exist; on failure it is removed again.
    """
    return _copy_file(src, dst, sync=False)


def _unlink_quietly(path: StrPath) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2 = libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def _rename_noreplace(old: str, new: str) -> None:
    if _renameat2(_AT_FDCWD, fsencode(old), _AT_FDCWD, fsencode(new), RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise os_error(err, new, "rename")
    # The filesystem has no RENAME_NOREPLACE: link() fails on an existing name too.
    os.link(old, new)
    os.unlink(old)


def copy_file_atomic(src: StrPath, dst: StrPath, replace: bool = False) -> CopyStats:
    """Copy a file so that ``dst`` appears complete and durable, or not at all.

    The data goes to ``.<name>.tmp-<random>`` in ``dst``'s directory, is
    fsynced, then renamed into place (refusing an existing ``dst`` unless
    ``replace``), and the directory is fsynced. An exception at any point
    (KeyboardInterrupt included) removes the temporary file; only a killed
    process can leave one, under that recognisable name.
    """
    dst_p = Path(dst)
    # Cut the name so that the temporary one stays within NAME_MAX (255).
    tmp = str(dst_p.with_name(f".{dst_p.name[:200]}.tmp-{secrets.token_hex(6)}"))
    stats = _copy_file(src, tmp, sync=True)
    try:
        if replace:
            os.replace(tmp, dst_p)
        else:
            _rename_noreplace(tmp, str(dst_p))
    except BaseException:
        _unlink_quietly(tmp)
        raise
    dfd = os.open(dst_p.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return stats


def _tmpfile(directory: str) -> int:
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    # No O_TMPFILE on this filesystem: a named file, unlinked at once.
    path = os.path.join(directory, f".reflink-probe-{secrets.token_hex(6)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    return fd


def reflink_supported(directory: StrPath) -> bool:
    """Whether files in ``directory`` can be cloned with FICLONE (xfs reflink, btrfs).

    Probes with two unnamed (O_TMPFILE) files, so nothing is left behind.
    """
    d = os.fspath(directory)
    a = _tmpfile(d)
    try:
        b = _tmpfile(d)
        try:
            os.write(a, b"\0" * 4096)  # a real block: some filesystems accept empty clones
            fcntl.ioctl(b, FICLONE, a)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
                return False
            raise
        finally:
            os.close(b)
    finally:
        os.close(a)
    return True

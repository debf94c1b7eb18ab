"""Apply one OCI layer (an uncompressed tar stream) to a directory, safely.

Two ways to land a layer, chosen by what the snapshot's mounts say (never
by asking which backend it is):

* **a full tree** (native, blockfile, btrfs: the directory holds the parent's
  files too): whiteouts delete from the tree, an opaque marker empties the
  directory of what lower layers put there;
* **an overlay upper** (overlay and erofs uppers: the directory holds only
  this layer, its parents are lowerdirs): a whiteout becomes a 0/0 character
  device, an opaque marker the ``overlay.opaque`` xattr (``trusted.``, or
  ``user.`` when the overlay mounts with ``userxattr``); lookups that need
  the merged view (is this parent a directory? a hard link to a lower file?)
  read the lowerdirs.

Safety: every name is checked before anything is written, by the reader's one
rule for names, which the EROFS converter applies too
(:func:`stratasnap.tarstream.split_name`: an absolute name is scoped to the
layer root as containerd and docker do; ``..`` components, NUL bytes and
over-long components are refused); parent directories are resolved component by
component without following a symlink out of the tree (a symlink whose
target is absolute or climbs above the root refuses the layer; one that
stays inside is followed, like containerd's scoped resolution); the file
itself is created with ``O_NOFOLLOW | O_EXCL`` after whatever was there is
removed; hard-link targets are resolved the same way. A refused layer raises
:class:`UnsafeLayer` and the caller throws the snapshot away: nothing of it
is committed.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import InvalidArgument
from ..tarstream import (
    BLK,
    CHR,
    DIR,
    HARDLINK,
    REG,
    SYMLINK,
    TarEntry,
    TarReader,
    split_name,
)
from .writers import FileJob, FileWriters

__all__ = ["ApplyStats", "Target", "UnsafeLayer", "apply_tar"]

_MAX_SYMLINKS = 40
_COPY_CHUNK = 1 << 20
#: Files up to this size are written by the writer threads (their data held in memory).
_THREADED_MAX = 1 << 20
#: Writer threads: creating files is syscall-bound, and syscalls release the GIL.
DEFAULT_THREADS = 3
_NO_PENDING: frozenset[str] = frozenset()
_WH = ".wh."
_OPAQUE = ".wh..wh..opq"
_IS_ROOT = os.geteuid() == 0


def _umask() -> int:
    """The process umask, read without changing it.

    os.umask can only read it by setting it, which would race with other
    threads creating files meanwhile (a server start sets 0o177 around its
    bind): Linux (4.7+) shows it in /proc/self/status instead.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the racy way, restored at once
    os.umask(mask)
    return mask


class UnsafeLayer(InvalidArgument):
    """A layer entry would write outside the snapshot, or the tar is malformed on purpose."""


@dataclass(frozen=True)
class Target:
    """Where a layer lands: ``root``, and for an overlay upper its lowerdirs (top first)."""

    root: str
    overlay: bool = False
    lowers: tuple[str, ...] = ()
    xattr_prefix: str = "trusted."


@dataclass
class ApplyStats:
    """What an apply did: entries, regular-file bytes, whiteouts."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _clean(name: bytes, offset: int) -> str:
    """A member name (or hard-link target) as a path relative to the layer root."""
    return os.fsdecode(b"/".join(split_name(name, offset)))


def _xattrs(e: TarEntry) -> dict[str, bytes]:
    return {os.fsdecode(k): v for k, v in e.xattrs} if e.xattrs else {}


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _is_whiteout_dev(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _Applier:
    def __init__(self, target: Target, writers: FileWriters | None = None) -> None:
        self.t = target
        self._writers = writers
        self.root = target.root.rstrip("/") or "/"
        self.stats = ApplyStats()
        #: Relative directory path as named in the layer -> its real relative path.
        self._dirs: dict[str, str] = {"": ""}
        #: Real relative paths this layer created (whiteouts never remove those).
        self._written: set[str] = set()
        self._dir_times: list[tuple[str, int]] = []
        self._opaque_xattr = target.xattr_prefix + "overlay.opaque"
        self._umask = _umask()
        # New files are ours: chown only when the layer wants another owner.
        self._uid, self._gid = os.geteuid(), os.getegid()

    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # -- merged lookups (overlay uppers) ---------------------------------------------

    def _lower_lookup(self, rel: str) -> tuple[str, os.stat_result] | None:
        """The entry ``rel`` in the lowerdirs as overlayfs would show it, or None."""
        head = rel.rpartition("/")[0]
        for lower in self.t.lowers:
            p = f"{lower}/{rel}"
            st = _lstat(p)
            if st is not None:
                return None if _is_whiteout_dev(st) else (p, st)
            if head and self._is_opaque(f"{lower}/{head}"):
                return None
        return None

    def _is_opaque(self, path: str) -> bool:
        try:
            return os.getxattr(path, self._opaque_xattr, follow_symlinks=False) == b"y"
        except OSError:
            return False

    # -- path resolution -------------------------------------------------------------

    def resolve_dir(self, rel: str, depth: int = 0) -> str:
        """The real relative path of directory ``rel``, created if missing."""
        hit = self._dirs.get(rel)
        if hit is not None:
            return hit
        if depth > _MAX_SYMLINKS:
            raise UnsafeLayer(f"too many levels of symbolic links resolving {rel!r}")
        head, _, name = rel.rpartition("/")
        parent = self.resolve_dir(head, depth)
        here = _join(parent, name)
        st = _lstat(self.abs(here))
        if st is not None and _is_whiteout_dev(st) and self.t.overlay:
            # This layer whited it out, and now puts a directory there: a fresh, opaque one.
            os.unlink(self.abs(here))
            os.mkdir(self.abs(here), 0o755)
            os.setxattr(self.abs(here), self._opaque_xattr, b"y", follow_symlinks=False)
            result = here
        elif st is None:
            lower = self._lower_lookup(here) if self.t.overlay else None
            if lower is not None and stat.S_ISLNK(lower[1].st_mode):
                return self._follow(rel, parent, os.readlink(lower[0]), depth)
            if lower is not None and not stat.S_ISDIR(lower[1].st_mode):
                raise InvalidArgument(f"layer: parent {rel!r} is not a directory")
            os.mkdir(self.abs(here), 0o755)
            if lower is not None:  # copy the lower directory's metadata up, as overlayfs does
                lst = lower[1]
                self._chown(self.abs(here), lst.st_uid, lst.st_gid)
                os.chmod(self.abs(here), stat.S_IMODE(lst.st_mode))
            result = here
        elif stat.S_ISDIR(st.st_mode):
            result = here
        elif stat.S_ISLNK(st.st_mode):
            return self._follow(rel, parent, os.readlink(self.abs(here)), depth)
        else:
            raise InvalidArgument(f"layer: parent {rel!r} is not a directory")
        self._dirs[rel] = result
        return result

    def _follow(self, rel: str, parent: str, link: str, depth: int) -> str:
        """Follow a symlinked parent directory, only if it stays inside the tree."""
        if link.startswith("/"):
            raise UnsafeLayer(
                f"layer writes through {rel!r}, a symlink to the absolute path {link!r}"
            )
        # Component by component, each symlink resolved as met (not lexically), so that
        # ``d/up/..`` with ``d/up -> ..`` is seen to climb out of the tree.
        cur = parent
        for comp in link.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not cur:
                    raise UnsafeLayer(
                        f"layer writes through {rel!r}, a symlink to {link!r} outside the tree"
                    )
                cur = cur.rpartition("/")[0]
            else:
                cur = self.resolve_dir(_join(cur, comp), depth + 1)
        resolved = cur
        self._dirs[rel] = resolved
        return resolved

    def resolve(self, name: str) -> tuple[str, str]:
        """(real relative parent, base name) of a cleaned entry name."""
        head, _, base = name.rpartition("/")
        return self.resolve_dir(head), base

    # -- changes ---------------------------------------------------------------------

    def _remove(self, rel: str, st: os.stat_result, synced: bool = False) -> None:
        if not synced:
            self.sync()
        path = self.abs(rel)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self._dirs = {"": ""}  # resolved paths below it are stale
        else:
            os.unlink(path)
            if stat.S_ISLNK(st.st_mode):
                self._dirs = {"": ""}

    @property
    def _pending(self) -> set[str] | frozenset[str]:
        return self._writers.pending if self._writers is not None else _NO_PENDING

    def sync(self) -> None:
        """Wait for the file writers; redo (here) the files whose names were taken."""
        if self._writers is None:
            return
        for job, _exc in self._writers.drain():
            st = _lstat(job.path)
            if st is not None:
                self._remove(job.rel, st, synced=True)
            self._writers.write_here(job)

    def whiteout(self, parent: str, name: str) -> None:
        if name in ("", ".", "..") or "/" in name:
            raise UnsafeLayer(f"layer has a whiteout for {name!r}")
        rel = _join(parent, name)
        self.stats.whiteouts += 1
        self.sync()
        if rel in self._written:
            return  # a whiteout hides lower layers only
        st = _lstat(self.abs(rel))
        if st is not None:
            self._remove(rel, st)
        if self.t.overlay:
            os.mknod(self.abs(rel), stat.S_IFCHR | 0o000, 0)
            self._written.add(rel)

    def opaque(self, parent: str) -> None:
        self.stats.whiteouts += 1
        self.sync()
        if self.t.overlay:
            os.setxattr(self.abs(parent), self._opaque_xattr, b"y", follow_symlinks=False)
            return
        with os.scandir(self.abs(parent)) as it:
            doomed = [e.name for e in it if _join(parent, e.name) not in self._written]
        for name in doomed:
            rel = _join(parent, name)
            st = _lstat(self.abs(rel))
            if st is not None:
                self._remove(rel, st)

    def _chown(self, path: str, uid: int, gid: int) -> None:
        try:
            os.lchown(path, uid, gid)
        except PermissionError:
            if _IS_ROOT:
                raise
            # Unprivileged (native backend without root): files stay ours, as with rootless tar.

    def entry(self, tar: TarReader, e: TarEntry) -> None:
        name = _clean(e.name, e.offset)
        self.stats.entries += 1
        head, _, base = name.rpartition("/")
        if base.startswith(_WH):
            parent = self.resolve_dir(head)
            if base == _OPAQUE:
                self.opaque(parent)
            else:
                self.whiteout(parent, base[len(_WH) :])
            return
        if not name:  # the root directory itself: only its metadata
            if e.type == DIR:
                self._metadata(e, self.root, fd=None)
                self._dir_times.append(("", e.mtime_ns))
            return
        parent, base = self.resolve(name)
        rel = _join(parent, base)
        path = self.abs(rel)
        if e.type == REG:
            self._regular(tar, e, rel, path)
            return
        if path in self._pending:
            self.sync()
        st = _lstat(path)
        if e.type == DIR:
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self._remove(rel, st)
                st = None
            if st is None:
                os.mkdir(path, 0o700)
            self._written.add(rel)
            self._dirs[name] = rel
            self._metadata(e, path, fd=None, fresh_mode=0o700 if st is None else -1)
            self._dir_times.append((rel, e.mtime_ns))
            return
        if st is not None:
            self._remove(rel, st)
        if e.type == HARDLINK:
            self._hardlink(e, rel)
            self._written.add(rel)
            return
        if e.type == SYMLINK:
            os.symlink(os.fsdecode(e.linkname), path)
        elif e.type in (CHR, BLK):
            kind = stat.S_IFCHR if e.type == CHR else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(e.devmajor, e.devminor))
        else:  # FIFO: the reader yields no other member type
            os.mkfifo(path, 0o600)
        self._written.add(rel)
        self._metadata(e, path, fd=None, fresh_mode=0o600 if e.type != SYMLINK else -1)
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    def _regular(self, tar: TarReader, e: TarEntry, rel: str, path: str) -> None:
        if self._writers is not None and e.size <= _THREADED_MAX and path not in self._pending:
            data = tar.read(e.size) if e.size else b""  # all of it, even from a pipe
            xattrs = _xattrs(e)
            fresh = e.mode & 0o777 & ~self._umask
            chown = (e.uid, e.gid) if (e.uid, e.gid) != (self._uid, self._gid) else None
            chmod = e.mode if (e.mode != fresh or chown or xattrs) else None
            job = FileJob(path, data, e.mode & 0o777, e.mtime_ns, chown, chmod, xattrs, rel)
            self._writers.submit(job)
            self._written.add(rel)
            self.stats.files += 1
            self.stats.bytes += e.size
            return
        if path in self._pending:
            self.sync()
        # The common case (a new file) costs open, write, futimens and close: no lstat
        # first; only when the name exists is it looked at and replaced.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        create_mode = e.mode & 0o777
        try:
            fd = os.open(path, flags, create_mode)
        except FileExistsError:
            st = _lstat(path)
            if st is not None:
                self._remove(rel, st)
            fd = os.open(path, flags, create_mode)
        try:
            left = e.size
            while left:
                chunk = tar.read(min(left, _COPY_CHUNK))
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                left -= len(chunk)
            self._metadata(e, path, fd=fd, fresh_mode=create_mode & ~self._umask)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)
        self._written.add(rel)
        self.stats.files += 1
        self.stats.bytes += e.size

    def _hardlink(self, e: TarEntry, rel: str) -> None:
        self.sync()
        target_name = _clean(e.linkname, e.offset)
        name, link = os.fsdecode(e.name), os.fsdecode(e.linkname)
        if not target_name:
            raise UnsafeLayer(f"layer entry {name!r} is a hard link to the root")
        tparent, tbase = self.resolve(target_name)
        trel = _join(tparent, tbase)
        tst = _lstat(self.abs(trel))
        if tst is None and self.t.overlay:
            lower = self._lower_lookup(trel)
            if lower is not None and not stat.S_ISDIR(lower[1].st_mode):
                _copy_up(lower[0], self.abs(trel), lower[1])
                tst = _lstat(self.abs(trel))
        if tst is None or _is_whiteout_dev(tst):
            raise InvalidArgument(
                f"layer entry {name!r} is a hard link to {link!r}, which does not exist"
            )
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeLayer(f"layer entry {name!r} is a hard link to a directory")
        os.link(self.abs(trel), self.abs(rel), follow_symlinks=False)

    def _metadata(self, e: TarEntry, path: str, fd: int | None, fresh_mode: int = -1) -> None:
        """Owner, xattrs and mode, in that order: chown clears setuid bits and
        security.capability. Calls that would change nothing are skipped
        (``fresh_mode`` is the mode the entry was created with, -1 if unknown)."""
        if e.uid != self._uid or e.gid != self._gid or fresh_mode < 0:
            try:
                if fd is not None:
                    os.fchown(fd, e.uid, e.gid)
                else:
                    os.lchown(path, e.uid, e.gid)
            except PermissionError:
                if _IS_ROOT:
                    raise
                # Unprivileged (native backend without root): files stay ours, like rootless tar.
        for key, value in _xattrs(e).items():
            set_xattr(path if fd is None else fd, key, value)
        if e.type == SYMLINK:
            return
        if e.mode != fresh_mode or e.xattrs or e.uid != self._uid or e.gid != self._gid:
            if fd is not None:
                os.fchmod(fd, e.mode)
            else:
                os.chmod(path, e.mode)

    def finish(self) -> None:
        self.sync()
        # Directory times last, children before parents: writing inside a directory
        # changes its mtime.
        for rel, ns in reversed(self._dir_times):
            os.utime(self.abs(rel), ns=(ns, ns), follow_symlinks=False)


def _copy_up(src: str, dst: str, st: os.stat_result) -> None:
    """Copy a lower file into the upper (for a hard link to it), with its metadata."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))


def set_xattr(target: str | int, name: str, value: bytes) -> None:
    """Set a layer entry's xattr on a path (not followed) or an open fd."""
    if name.split(".", 1)[-1].startswith("overlay."):
        return  # never let a layer forge overlayfs' own attributes
    try:
        if isinstance(target, int):
            os.setxattr(target, name, value)
        else:
            os.setxattr(target, name, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM) and not name.startswith("user."):
            return  # e.g. trusted.* unprivileged, or a filesystem without them
        raise


def apply_tar(stream: BinaryIO, target: Target, threads: int = DEFAULT_THREADS) -> ApplyStats:
    """Apply the uncompressed layer tar read from ``stream`` to ``target``.

    Raises :class:`UnsafeLayer` or InvalidArgument on a hostile or broken
    layer; what was written by then stays in ``target.root``, which the caller
    discards.
    """
    writers = FileWriters(threads, set_xattr) if threads else None
    applier = _Applier(target, writers)
    buffered = None
    if not isinstance(stream, io.BufferedIOBase):
        # Headers are read 512 bytes at a time: let a C buffer serve those reads. It is
        # detached at the end: closing it (or its garbage collection) would close
        # ``stream``, which belongs to the caller.
        buffered = io.BufferedReader(stream, _COPY_CHUNK)  # type: ignore[type-var]
    reader = TarReader(buffered or stream)
    try:
        for entry in reader:
            applier.entry(reader, entry)
        applier.finish()
    finally:
        if buffered is not None:
            buffered.detach()
        if writers is not None:
            try:
                writers.drain()
            except BaseException:
                pass  # the layer failed already; its first error is what counts
            finally:
                writers.close()
    return applier.stats

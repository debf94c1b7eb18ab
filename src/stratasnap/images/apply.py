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

Safety: every name is checked before anything is written. Absolute names and
``..`` components are refused; parent directories are resolved component by
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
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from ..errors import InvalidArgument, Unimplemented

__all__ = ["ApplyStats", "Target", "UnsafeLayer", "apply_tar"]

#: Largest PAX or GNU long-name header we read (tarfile would read any size into memory).
MAX_HEADER_BYTES = 1 << 20
_MAX_SYMLINKS = 40
_COPY_CHUNK = 1 << 20
_WH = ".wh."
_OPAQUE = ".wh..wh..opq"
_IS_ROOT = os.geteuid() == 0


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


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized extended headers before tarfile reads them whole."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if (
            self.type
            in (
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE,
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
            )
            and self.size > MAX_HEADER_BYTES
        ):
            raise UnsafeLayer(
                f"layer has a {self.size}-byte extended header (limit {MAX_HEADER_BYTES})"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


def _clean(name: str) -> str:
    """A tar member name as a relative path; refuses absolute names and ``..``."""
    if name.startswith("/"):
        raise UnsafeLayer(f"layer entry {name!r} has an absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"layer entry {name!r} climbs out of the tree ('..')")
    return "/".join(parts)


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
    def __init__(self, target: Target) -> None:
        self.t = target
        self.root = target.root.rstrip("/") or "/"
        self.stats = ApplyStats()
        #: Relative directory path as named in the layer -> its real relative path.
        self._dirs: dict[str, str] = {"": ""}
        #: Real relative paths this layer created (whiteouts never remove those).
        self._written: set[str] = set()
        self._dir_times: list[tuple[str, int]] = []
        self._opaque_xattr = target.xattr_prefix + "overlay.opaque"

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

    def _remove(self, rel: str, st: os.stat_result) -> None:
        path = self.abs(rel)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self._dirs = {"": ""}  # resolved paths below it are stale
        else:
            os.unlink(path)
            if stat.S_ISLNK(st.st_mode):
                self._dirs = {"": ""}

    def whiteout(self, parent: str, name: str) -> None:
        if name in ("", ".", "..") or "/" in name:
            raise UnsafeLayer(f"layer has a whiteout for {name!r}")
        rel = _join(parent, name)
        self.stats.whiteouts += 1
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

    def entry(self, tar: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        name = _clean(ti.name)
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
            if ti.isdir():
                self._metadata(ti, "")
                self._dir_times.append(("", _ns(ti.mtime)))
            return
        parent, base = self.resolve(name)
        rel = _join(parent, base)
        path = self.abs(rel)
        st = _lstat(path)
        if ti.isdir():
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self._remove(rel, st)
                st = None
            if st is None:
                os.mkdir(path, 0o700)
            self._written.add(rel)
            self._dirs[name] = rel
            self._metadata(ti, rel)
            self._dir_times.append((rel, _ns(ti.mtime)))
            return
        if st is not None:
            self._remove(rel, st)
        if ti.islnk():
            self._hardlink(ti, rel)
            self._written.add(rel)
            return
        if ti.isreg():
            self._regular(tar, ti, path)
        elif ti.issym():
            os.symlink(ti.linkname, path)
        elif ti.ischr() or ti.isblk():
            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(ti.devmajor, ti.devminor))
        elif ti.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise Unimplemented(f"layer entry {ti.name!r} has unsupported tar type {ti.type!r}")
        self._written.add(rel)
        self._metadata(ti, rel)
        ns = _ns(ti.mtime)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _regular(self, tar: tarfile.TarFile, ti: tarfile.TarInfo, path: str) -> None:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            if ti.issparse():
                src = tar.extractfile(ti)
                assert src is not None
                _copy(src, fd, ti.size, ti.name)
            else:
                # Stream mode: read the data straight from tarfile's stream (it tracks
                # the position and skips the padding to the next header itself).
                _copy(tar.fileobj, fd, ti.size, ti.name)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += ti.size

    def _hardlink(self, ti: tarfile.TarInfo, rel: str) -> None:
        target_name = _clean(ti.linkname)
        if not target_name:
            raise UnsafeLayer(f"layer entry {ti.name!r} is a hard link to the root")
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
                f"layer entry {ti.name!r} is a hard link to {ti.linkname!r}, which does not exist"
            )
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeLayer(f"layer entry {ti.name!r} is a hard link to a directory")
        os.link(self.abs(trel), self.abs(rel), follow_symlinks=False)

    def _metadata(self, ti: tarfile.TarInfo, rel: str) -> None:
        path = self.abs(rel)
        # chown first: it clears setuid bits and security.capability, so those come after.
        self._chown(path, ti.uid, ti.gid)
        for key, value in ti.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                self._xattr(path, key[len("SCHILY.xattr.") :], value, ti.name)
        if not ti.issym():
            os.chmod(path, ti.mode & 0o7777)

    def _xattr(self, path: str, name: str, value: str, entry: str) -> None:
        if ".overlay." in name and name.split(".", 1)[1].startswith("overlay."):
            return  # never let a layer forge overlayfs' own attributes
        raw = value.encode("utf-8", "surrogateescape")
        try:
            os.setxattr(path, name, raw, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM) and not name.startswith("user."):
                return  # e.g. trusted.* unprivileged, or a filesystem without them
            raise

    def finish(self) -> None:
        # Directory times last, children before parents: writing inside a directory
        # changes its mtime.
        for rel, ns in reversed(self._dir_times):
            os.utime(self.abs(rel), ns=(ns, ns), follow_symlinks=False)


def _ns(mtime: float) -> int:
    """A tar mtime (PAX allows fractions) in nanoseconds."""
    return round(mtime * 1_000_000_000)


def _copy(src: IO[bytes], fd: int, size: int, name: str) -> None:
    left = size
    while left:
        chunk = src.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise InvalidArgument(f"layer ends inside the data of {name!r} (truncated)")
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        left -= len(chunk)


def _copy_up(src: str, dst: str, st: os.stat_result) -> None:
    """Copy a lower file into the upper (for a hard link to it), with its metadata."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            ti = tar.next()
        except tarfile.HeaderError as exc:
            raise InvalidArgument(f"layer tar is corrupt: {exc}") from None
        except tarfile.ReadError as exc:
            raise InvalidArgument(f"layer tar is corrupt or truncated: {exc}") from None
        if ti is None:
            return
        yield ti


def apply_tar(stream: BinaryIO, target: Target) -> ApplyStats:
    """Apply the uncompressed layer tar read from ``stream`` to ``target``.

    Raises :class:`UnsafeLayer` or InvalidArgument on a hostile or broken
    layer; what was written by then stays in ``target.root``, which the caller
    discards.
    """
    applier = _Applier(target)
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            for ti in _members(tar):
                applier.entry(tar, ti)
    except tarfile.ReadError as exc:
        raise InvalidArgument(f"layer is not a tar archive: {exc}") from None
    applier.finish()
    return applier.stats

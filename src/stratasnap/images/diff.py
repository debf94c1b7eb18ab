"""An OCI layer of an active snapshot's changes against its parent.

Where the changes are is read from the snapshot's mounts, never from the
backend's name: an overlay mount with an ``upperdir`` holds exactly the
changes (a 0/0 character device is a deletion, the ``overlay.opaque`` xattr
an emptied directory); any other snapshot is compared, tree against tree,
with a read-only view of its parent (type, mode, owner, size, mtime, link
target, device, xattrs; a regular file whose metadata all match is taken as
unchanged, as containerd's walking differ does). Files that are hard links
of each other inside the layer become tar hard links.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import FailedPrecondition, NotFound
from ..snapshotter import Snapshotter
from ..types import Kind
from .compression import compressor
from .reference import Digest
from .unpack import landing

__all__ = ["LayerWritten", "write_diff"]

_COMPRESSED_MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True)
class LayerWritten:
    """The layer that was written: its digest, diff ID, size and media type."""

    digest: Digest
    diff_id: Digest
    size: int
    media_type: str


class _HashingWriter:
    """A write-only file that hashes and counts what passes to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        if n.split(".", 1)[-1].startswith("overlay."):
            continue  # overlayfs' own bookkeeping, never layer content
        with suppress(OSError):
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


class _TarOut:
    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.links: dict[tuple[int, int], str] = {}

    def whiteout(self, rel: str) -> None:
        head, _, name = rel.rpartition("/")
        self._empty(f"{head}/.wh.{name}" if head else f".wh.{name}")

    def opaque(self, rel: str) -> None:
        self._empty(f"{rel}/.wh..wh..opq" if rel else ".wh..wh..opq")

    def _empty(self, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.mode = 0o644
        self.tar.addfile(ti)

    def entry(self, path: str, rel: str, st: os.stat_result) -> None:
        ti = tarfile.TarInfo(rel)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.mtime = st.st_mtime_ns / 1e9 if st.st_mtime_ns % 1_000_000_000 else st.st_mtime
        xattrs = _xattrs(path)
        if xattrs:
            ti.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
            }
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFREG:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                ti.type, ti.linkname = tarfile.LNKTYPE, self.links[key]
                self.tar.addfile(ti)
                return
            if st.st_nlink > 1:
                self.links[key] = rel
            ti.size = st.st_size
            with open(path, "rb") as f:
                self.tar.addfile(ti, f)
            return
        if fmt == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif fmt == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
        else:
            return  # sockets are not layer content
        self.tar.addfile(ti)


def _walk(root: str, rel: str = "") -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, relative name, lstat) of everything below ``root``, parents first, sorted."""
    base = os.path.join(root, rel) if rel else root
    with os.scandir(base) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        name = f"{rel}/{e.name}" if rel else e.name
        st = e.stat(follow_symlinks=False)
        yield e.path, name, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, name)


def _same(a: os.stat_result, pa: str, b: os.stat_result, pb: str) -> bool:
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISDIR(a.st_mode):
        return _xattrs(pa) == _xattrs(pb)
    if a.st_mtime_ns != b.st_mtime_ns or a.st_size != b.st_size or a.st_rdev != b.st_rdev:
        return False
    if stat.S_ISLNK(a.st_mode) and os.readlink(pa) != os.readlink(pb):
        return False
    return _xattrs(pa) == _xattrs(pb)


def _diff_upper(out: _TarOut, upper: str, xattr_prefix: str) -> None:
    opaque_name = xattr_prefix + "overlay.opaque"
    for path, rel, st in _walk(upper):
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out.whiteout(rel)
            continue
        out.entry(path, rel, st)
        if stat.S_ISDIR(st.st_mode):
            with suppress(OSError):
                if os.getxattr(path, opaque_name, follow_symlinks=False) == b"y":
                    out.opaque(rel)


def _diff_trees(out: _TarOut, new: str, old: str | None) -> None:
    skip: str | None = None  # a new directory (or one replacing a non-dir): all of it goes
    for path, rel, st in _walk(new):
        if skip is not None and rel.startswith(skip):
            out.entry(path, rel, st)
            continue
        skip = None
        before = None
        if old is not None:
            with suppress(FileNotFoundError):
                before = os.lstat(os.path.join(old, rel))
        if before is None or not _same(st, path, before, os.path.join(old or "", rel)):
            out.entry(path, rel, st)
            if stat.S_ISDIR(st.st_mode) and (before is None or not stat.S_ISDIR(before.st_mode)):
                skip = rel + "/"
    if old is None:
        return
    # Deletions: the topmost path that the parent has and the snapshot lacks.
    gone_dirs: list[str] = []
    for _path, rel, _st in _walk(old):
        if any(rel.startswith(g) for g in gone_dirs[-1:]):
            continue
        try:
            now = os.lstat(os.path.join(new, rel))
        except FileNotFoundError:
            out.whiteout(rel)
            gone_dirs.append(rel + "/")
            continue
        if stat.S_ISDIR(_st.st_mode) and not stat.S_ISDIR(now.st_mode):
            gone_dirs.append(rel + "/")  # replaced by a non-directory: its entry says so


@contextmanager
def _parent_view(sn: Snapshotter, parent: str) -> Iterator[str | None]:
    if not parent:
        yield None
        return
    key = f"diff-view-{uuid.uuid4().hex[:12]}"
    mounts = sn.view(key, parent)
    try:
        with landing(mounts) as target:
            yield target.root
    finally:
        with suppress(NotFound):
            sn.remove(key)


def write_diff(sn: Snapshotter, key: str, out: BinaryIO, compression: str = "gzip") -> LayerWritten:
    """Write the changes of active (or view) snapshot ``key`` to ``out`` as an OCI layer."""
    info = sn.stat(key)
    if info.kind is Kind.COMMITTED:
        raise FailedPrecondition(
            f"snapshot {key!r} is committed: diff takes an active snapshot "
            "(prepare one on it and diff that)"
        )
    wrap = compressor(compression)
    counted = _HashingWriter(out)
    zipped: Any = wrap(counted)  # type: ignore[arg-type]
    diff_hash = _HashingWriter(zipped)
    with tarfile.open(fileobj=diff_hash, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tw = _TarOut(tar)
        with landing(sn.mounts(key)) as target:
            if target.overlay:
                _diff_upper(tw, target.root, target.xattr_prefix)
            else:
                with _parent_view(sn, info.parent) as old:
                    _diff_trees(tw, target.root, old)
    if compression != "none":
        zipped.close()  # ends the gzip member / zstd frame; ``out`` stays open
    counted.flush()
    return LayerWritten(
        digest=Digest("sha256", counted.hash.hexdigest()),
        diff_id=Digest("sha256", diff_hash.hash.hexdigest()),
        size=counted.size,
        media_type=_COMPRESSED_MEDIA[compression],
    )

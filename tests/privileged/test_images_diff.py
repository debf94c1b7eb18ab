"""``diff`` of an active snapshot, then applying that layer on the same parent, gives the
same tree, on every backend and with every compression."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need_root
from e2e.oci import write_oci_archive
from e2e.tree import listing
from test_images_unpack import rich_layers

from stratasnap import open_snapshotter
from stratasnap.backends import BACKENDS
from stratasnap.fs.idmapped import apply_idmapped_mounts
from stratasnap.fs.mount import unmount_all_under
from stratasnap.images.apply import apply_tar
from stratasnap.images.archive import import_archive
from stratasnap.images.compression import DecompressingReader
from stratasnap.images.diff import write_diff
from stratasnap.images.store import ImageStore
from stratasnap.images.unpack import landing


def _mutate(root: Path) -> None:
    (root / "etc" / "passwd").write_text("changed\n")
    (root / "new-dir" / "deep").mkdir(parents=True)
    (root / "new-dir" / "deep" / "f").write_bytes(os.urandom(5000))
    os.link(root / "new-dir" / "deep" / "f", root / "new-dir" / "hl")
    shutil.rmtree(root / "etc" / "sub")
    (root / "home-file").unlink()
    os.chmod(root / "cap", 0o700)
    os.chown(root / "fifo", 7, 8)
    os.setxattr(root / "cap", "user.added", b"1")
    shutil.move(root / "replaced", root / "moved")  # a dir gone, another new (EXDEV: copy)
    (root / "sticky").rmdir()
    (root / "sticky").write_text("now a file")
    os.symlink("../etc/passwd", root / "new-dir" / "ln")


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_diff_then_apply_gives_same_tree(
    backend: str, compression: str, scratch: Path, store_root: Callable[[str], Path]
) -> None:
    need_root()
    archive = scratch / "rich.tar"
    write_oci_archive(archive, "example.com/rich:1", rich_layers())
    root = store_root(backend)
    mnt = scratch / "mnt"
    mnt.mkdir()
    with open_snapshotter(root, backend) as sn:
        store = ImageStore(root, sn)
        (imp,) = import_archive(archive, store.content)
        rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, "", "")
        img = store.load(rec)
        store.unpack(img)
        apply_idmapped_mounts(sn.prepare("work", img.top_layer), mnt)
        try:
            _mutate(mnt)
            want = listing(mnt)
        finally:
            unmount_all_under(mnt)
        buf = io.BytesIO()
        layer = write_diff(sn, "work", buf, compression)
        assert layer.size == len(buf.getvalue())
        buf.seek(0)
        with landing(sn.prepare("again", img.top_layer)) as target:
            apply_tar(DecompressingReader(buf, compression), target)  # type: ignore[arg-type]
        apply_idmapped_mounts(sn.mounts("again"), mnt)
        try:
            got = listing(mnt)
        finally:
            unmount_all_under(mnt)
        store.close()
    for tree in (got, want):
        tree.pop("lost+found", None)
    assert got == want
    assert "etc/sub" not in got and "home-file" not in got and "moved/now-a-dir" in got

"""Unpack an image into every backend and compare the tree with ``umoci unpack``'s."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need, need_root
from e2e.oci import Layer, write_oci_archive
from e2e.tree import Listing, listing

from stratasnap import open_snapshotter
from stratasnap.backends import BACKENDS
from stratasnap.fs.idmapped import apply_idmapped_mounts
from stratasnap.fs.mount import unmount_all_under
from stratasnap.images.archive import import_archive
from stratasnap.images.store import ImageStore

NAME = "example.com/test/rich:1"


def rich_layers() -> list[Layer]:
    """Layers exercising every entry type, owners, modes, xattrs and both whiteout kinds."""
    base = (
        Layer()
        .dirs("etc/sub")
        .file("etc/passwd", "root:x:0:0::/:/bin/sh\n")
        .file("etc/sub/suid", b"\x7fELF", 0o4755)
        .file("etc/sub/sgid", b"g", 0o2750, owner=(0, 50))
        .file("home-file", "mine", 0o600, owner=(1000, 1000))
        .file("cap", b"c", 0o755, xattrs={"user.note": b"hello", "user.bin": b"\x00\xff"})
        .symlink("etc/link", "passwd")
        .symlink("abs-link", "/etc/passwd")
        .hardlink("etc/hard", "etc/passwd")
        .dirs("dev")
        .device("dev/null", True, 1, 3)
        .device("dev/loop9", False, 7, 9, 0o660)
        .fifo("fifo")
        .dirs("gone/deep")
        .file("gone/deep/f", "f")
        .dirs("opq/keep")
        .file("opq/old", "old")
        .file("replaced", "was a file")
        .dir("sticky", 0o1777)
    )
    top = (
        Layer()
        .whiteout("gone")
        .opaque("opq")
        .file("opq/new", "new")
        .whiteout("etc/link")
        .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        .dirs("replaced")
        .file("replaced/now-a-dir", "d")
        .hardlink("hard-to-lower", "home-file")
    )
    return [base, top]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Listing]:
    """The OCI archive, and umoci's unpacked tree of it as the reference."""
    need_root()
    need(shutil.which("umoci") is not None, "umoci not installed (apt-get install umoci)")
    work = tmp_path_factory.mktemp("rich")
    archive = work / "rich.tar"
    write_oci_archive(archive, NAME, rich_layers())
    layout = work / "layout"
    with tarfile.open(archive) as t:
        t.extractall(layout, filter="fully_trusted")
    bundle = work / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:1", str(bundle)],
        check=True,
        capture_output=True,
    )
    return archive, listing(bundle / "rootfs")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_unpack_matches_umoci(
    backend: str,
    scratch: Path,
    image: tuple[Path, Listing],
    store_root: Callable[[str], Path],
) -> None:
    archive, expected = image
    root = store_root(backend)
    with open_snapshotter(root, backend) as sn:
        store = ImageStore(root, sn)
        (imp,) = import_archive(archive, store.content)
        rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, imp.platform, "t")
        img = store.load(rec)
        stats = store.unpack(img)
        assert (stats.applied, stats.skipped) == (2, 0)
        assert store.unpack(img).skipped == 2  # the layers exist: nothing applied again
        target = scratch / "mnt"
        target.mkdir()
        apply_idmapped_mounts(sn.view("v", img.top_layer), target)
        try:
            got = listing(target)
        finally:
            unmount_all_under(target)
        store.close()
    if "lost+found" not in expected:
        got.pop("lost+found", None)  # a filesystem image's own (blockfile)
    assert got == expected
    assert "gone" not in got and "opq/old" not in got and "etc/link" not in got
    assert got["etc/sub/suid"]["mode"] == 0o4755
    assert got["hard-to-lower"]["links_to"] == got["home-file"]["links_to"] == "hard-to-lower"
    assert got["home-file"]["uid"] == 1000
    assert got["cap"]["xattrs"] == {"user.note": b"hello", "user.bin": b"\x00\xff"}

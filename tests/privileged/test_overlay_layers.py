"""Overlay layers with real mounts: whiteouts, opaque directories, deep chains, rebase.

Roots are on tmpfs (``scratch``); one case repeats the layer semantics on a
fresh ext4 loop filesystem, the common production case.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import need_root

from stratasnap import open_snapshotter
from stratasnap.backends.overlay import OverlaySnapshotter
from stratasnap.fs.mount import apply_mounts, unmount_all_under
from stratasnap.fs.overlay_compact import Compacted, compact_lowerdirs, mount_overlay_compact
from stratasnap.testing import mounted
from stratasnap.types import Mount

pytestmark = pytest.mark.privileged


def _open(root: Path, **options: object) -> OverlaySnapshotter:
    s = open_snapshotter(root, "overlay", **options)
    assert isinstance(s, OverlaySnapshotter)
    return s


@pytest.fixture
def sn(scratch: Path) -> Iterator[OverlaySnapshotter]:
    need_root()
    s = _open(scratch / "root")
    try:
        yield s
    finally:
        s.close()


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> file content, or "<dir>" for directories."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() and not p.is_symlink() else p.read_text()
    return out


def _commit_layer(
    sn: OverlaySnapshotter, mnt: Path, name: str, parent: str, change: Callable[[Path], object]
) -> None:
    with mounted(sn.prepare(f"{name}-a", parent), mnt) as root:
        change(root)
    sn.commit(name, f"{name}-a")


def _view(sn: OverlaySnapshotter, mnt: Path, parent: str) -> dict[str, str]:
    with mounted(sn.view(f"v-{parent}", parent), mnt) as root:
        tree = _tree(root)
    sn.remove(f"v-{parent}")
    return tree


def _upper(sn: OverlaySnapshotter, name: str) -> Path:
    with sn._store.read() as tx:
        return sn.storage_dir(tx.get(name).id) / "fs"


def _whiteouts_and_opaque(sn: OverlaySnapshotter, mnt: Path) -> None:
    def l1(root: Path) -> None:
        for rel in ("a/x", "a/y", "d/sub/f", "d/g", "keep"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(rel)

    def l2(root: Path) -> None:
        (root / "a" / "x").unlink()  # a whiteout
        shutil.rmtree(root / "d")  # recreated below: an opaque directory
        (root / "d").mkdir()
        (root / "d" / "new").write_text("new")

    def l3(root: Path) -> None:
        (root / "a" / "x").write_text("back")  # over the whiteout
        (root / "keep").unlink()

    _commit_layer(sn, mnt, "l1", "", l1)
    _commit_layer(sn, mnt, "l2", "l1", l2)
    _commit_layer(sn, mnt, "l3", "l2", l3)

    full = {"a": "<dir>", "a/x": "a/x", "a/y": "a/y", "d": "<dir>", "d/g": "d/g"}
    full |= {"d/sub": "<dir>", "d/sub/f": "d/sub/f", "keep": "keep"}
    assert _view(sn, mnt, "l1") == full
    after_l2 = {"a": "<dir>", "a/y": "a/y", "d": "<dir>", "d/new": "new", "keep": "keep"}
    assert _view(sn, mnt, "l2") == after_l2
    after_l3 = {"a": "<dir>", "a/x": "back", "a/y": "a/y", "d": "<dir>", "d/new": "new"}
    assert _view(sn, mnt, "l3") == after_l3

    # On disk, l2 holds what overlayfs defines: a 0/0 character device for
    # the deleted file and an opaque mark on the recreated directory.
    up = _upper(sn, "l2")
    st = os.lstat(up / "a" / "x")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(up / "d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(up / "d")) == ["new"]


def test_whiteouts_and_opaque_dirs_across_layers(sn: OverlaySnapshotter, scratch: Path) -> None:
    _whiteouts_and_opaque(sn, scratch)


def test_whiteouts_and_opaque_dirs_on_ext4(loopfs: Callable[..., Path]) -> None:
    base = loopfs("ext4", size="256M")
    with _open(base / "root") as s:
        _whiteouts_and_opaque(s, base)


def test_rebase_with_real_mounts(sn: OverlaySnapshotter, scratch: Path) -> None:
    _commit_layer(sn, scratch, "base", "", lambda r: (r / "f").write_text("base"))
    # Unpacked in parallel: a layer prepared without its parent, rebased at commit.
    _commit_layer(sn, scratch, "loose", "", lambda r: (r / "g").write_text("loose"))
    sn.prepare("loose2-a")
    with mounted(sn.mounts("loose2-a"), scratch) as root:
        (root / "h").write_text("h")
    sn.commit("rebased", "loose2-a", parent="base")
    assert _view(sn, scratch, "rebased") == {"f": "base", "h": "h"}


@pytest.mark.parametrize("depth", [128, 200])
def test_deep_chains_mount_and_read(sn: OverlaySnapshotter, scratch: Path, depth: int) -> None:
    parent = ""
    for i in range(depth):
        sn.prepare(f"k{i}", parent)
        # Write straight into the upper: the chain is what is under test.
        (_upper(sn, f"k{i}") / f"f{i}").write_text(str(i))
        if i % 50 == 0:
            (_upper(sn, f"k{i}") / "shadowed").write_text(str(i))
        sn.commit(f"c{i}", f"k{i}")
        parent = f"c{i}"
    [m] = sn.prepare("top", parent)
    lowerdir = next(o for o in m.options if o.startswith("lowerdir="))
    assert len(lowerdir) > os.sysconf("SC_PAGE_SIZE")  # more than mount(2) takes
    with mounted([m], scratch) as root:
        names = os.listdir(root)
        assert len(names) == depth + 1
        assert (root / "f0").read_text() == "0"
        assert (root / f"f{depth - 1}").read_text() == str(depth - 1)
        assert (root / "shadowed").read_text() == str((depth - 1) // 50 * 50)
        (root / "f0").write_text("changed")  # copy-up from the bottom layer
    assert (_upper(sn, "top") / "f0").read_text() == "changed"


def test_containerd_style_compaction_mounts_200_layers(
    sn: OverlaySnapshotter, scratch: Path
) -> None:
    """The layout lets lowerdir shrink to ``<id>/fs`` relative to ``snapshots/``.

    That is containerd's way (and our fallback before Linux 6.8): change
    into the common directory in a forked helper and pass relative paths
    to mount(2). 200 layers then fit in the one page mount(2) takes, both
    through our helper and through the ``mount`` binary run from there.
    """
    parent = ""
    for i in range(200):
        sn.prepare(f"k{i}", parent)
        (_upper(sn, f"k{i}") / f"f{i}").write_text(str(i))
        sn.commit(f"c{i}", f"k{i}")
        parent = f"c{i}"
    [view] = sn.view("top", parent)
    [active] = sn.prepare("top-a", parent)
    compacted = compact_lowerdirs(view.options)
    assert compacted is not None and compacted.workdir == str(sn.snapshots_dir)
    assert len(compacted.data) < os.sysconf("SC_PAGE_SIZE") - 512  # containerd's threshold
    target = scratch / "compact"
    target.mkdir()
    for options in (view.options, active.options):
        mount_overlay_compact(options, target)
        try:
            assert len(os.listdir(target)) == 200
            assert (target / "f0").read_text() == "0"
        finally:
            unmount_all_under(target)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", compacted.data, str(target)],
        cwd=compacted.workdir,
        check=True,
    )
    try:
        assert (target / "f199").read_text() == "199"
    finally:
        unmount_all_under(target)


def test_compaction_edge_cases() -> None:
    assert compact_lowerdirs(["upperdir=/x"]) is None
    assert compact_lowerdirs(["lowerdir=/a/1/fs"]) is None  # one layer
    assert compact_lowerdirs(["lowerdir=/a:/b"]) is None  # nothing but / in common
    got = compact_lowerdirs(["ro", "lowerdir=/r/s/12/fs:/r/s/13/fs:/r/s/1/fs"])
    assert got == Compacted("/r/s", ("ro", "lowerdir=12/fs:13/fs:1/fs"))
    got = compact_lowerdirs(["lowerdir=/r\\:x/1/fs:/r\\:x/2/fs"])
    assert got is not None and got.workdir == "/r:x"


def test_mounts_apply_with_our_helper_and_unmount(sn: OverlaySnapshotter, scratch: Path) -> None:
    _commit_layer(sn, scratch, "b", "", lambda r: (r / "f").write_text("b"))
    target = scratch / "t"
    target.mkdir()
    apply_mounts([Mount(m.type, m.source, m.options) for m in sn.prepare("a", "b")], target)
    try:
        assert (target / "f").read_text() == "b"
    finally:
        unmount_all_under(target)


def test_root_without_d_type_is_refused(loopfs: Callable[..., Path]) -> None:
    """ext4 without the filetype feature reports DT_UNKNOWN, which overlayfs cannot use."""
    from stratasnap.errors import FailedPrecondition

    base = loopfs("ext4", size="64M", mkfs_args=("-O", "^filetype"))
    with pytest.raises(FailedPrecondition, match="d_type"):
        _open(base / "root")
    ok = loopfs("ext4", size="64M")
    with _open(ok / "root") as s:
        s.prepare("a")

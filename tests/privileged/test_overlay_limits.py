"""Size-limited writable layers: ENOSPC at the limit, O(1) usage, commit, remove, restart.

Roots are on tmpfs (``scratch``); each limited snapshot is an ext4 image
loop-mounted over its storage directory.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_root

from stratasnap import open_snapshotter
from stratasnap.backends import overlay_limits
from stratasnap.backends.overlay import OverlaySnapshotter
from stratasnap.backends.overlay_limits import IMAGE
from stratasnap.backends.overlay_options import MAX_SIZE_LABEL
from stratasnap.errors import FailedPrecondition, InvalidArgument
from stratasnap.fs import loop
from stratasnap.fs.manifest import Entry, manifest
from stratasnap.fs.mount import is_mountpoint, mounts_under, unmount
from stratasnap.fs.usage import disk_usage
from stratasnap.testing import mounted

pytestmark = pytest.mark.privileged

MiB = 1 << 20
LIMIT = {MAX_SIZE_LABEL: str(32 * MiB)}


def _open(root: Path, **options: object) -> OverlaySnapshotter:
    s = open_snapshotter(root, "overlay", **options)
    assert isinstance(s, OverlaySnapshotter)
    return s


@pytest.fixture
def sn(scratch: Path) -> Iterator[OverlaySnapshotter]:
    need_root()
    need(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 not installed")
    s = _open(scratch / "root")
    try:
        yield s
    finally:
        s.close()


def _storage(sn: OverlaySnapshotter, key: str) -> Path:
    with sn._store.read() as tx:
        return sn.storage_dir(tx.get(key).id)


def _fill(path: Path, size: int) -> None:
    """Write ``size`` bytes of real data (no holes) to a new file, fsync'd."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(chunk[: min(left, MiB)])
        f.flush()
        os.fsync(f.fileno())


def _manifest(root: Path) -> dict[str, Entry]:
    """The tree's manifest; whiteouts without their link group.

    overlayfs makes whiteouts as hard links of one shared whiteout in its
    work directory where the upper allows it, so in the image a whiteout
    has a link count of 2, and its partner is not part of the layer.
    """
    return {
        path: dataclasses.replace(e, link_group="") if e.kind == "chr" else e
        for path, e in manifest(root).items()
    }


def _loops(root: Path) -> list[Path]:
    prefix = str(root) + "/"
    found = []
    for b in Path("/sys/block").glob("loop*"):
        try:
            backing = (b / "loop" / "backing_file").read_text()
        except OSError:
            continue  # free, or freed while we looked
        if backing.startswith(prefix):
            found.append(Path("/dev") / b.name)
    return found


def _images_and_loops(root: Path, loops_left: int = 0) -> tuple[list[Path], list[Path], list[Path]]:
    """Images, loop devices and mounts under ``root``.

    An autoclear loop device is released a moment after its last unmount
    (the kernel finishes the detach asynchronously), so this waits, for a
    bounded time, until at most ``loops_left`` remain: devices only ever
    go away on their own, never appear.
    """
    deadline = time.monotonic() + 10
    loops = _loops(root)
    while len(loops) > loops_left and time.monotonic() < deadline:
        time.sleep(0.01)
        loops = _loops(root)
    return list((root / "snapshots").rglob(IMAGE)), loops, mounts_under(root / "snapshots")


def test_limited_snapshot_is_an_image_mounted_at_its_storage(sn: OverlaySnapshotter) -> None:
    sn.prepare("a", labels=LIMIT)
    storage = _storage(sn, "a")
    assert is_mountpoint(storage)
    assert sorted(os.listdir(storage)) == ["fs", "lost+found", "work"]
    assert oct(os.stat(storage / "fs").st_mode & 0o7777) == oct(0o755)
    # An empty limited snapshot reports what a walk of its empty upper does.
    assert sn.usage("a") == disk_usage(storage / "fs")


def test_write_past_the_limit_fails_and_neighbours_are_unaffected(
    sn: OverlaySnapshotter, scratch: Path
) -> None:
    sn.prepare("b-a")
    sn.commit("b", "b-a")
    small = sn.prepare("small", "b", labels=LIMIT)
    other = sn.prepare("other", "b", labels=LIMIT)
    unlimited = sn.prepare("unlimited", "b")
    with mounted(small, scratch) as root:
        _fill(root / "half", 16 * MiB)  # within the limit
        with pytest.raises(OSError) as err:
            _fill(root / "too-much", 40 * MiB)
        assert err.value.errno == errno.ENOSPC
        (root / "too-much").unlink()
        _fill(root / "again", 8 * MiB)  # freed space is usable again
    with mounted(other, scratch) as root:
        _fill(root / "f", 24 * MiB)
    with mounted(unlimited, scratch) as root:
        _fill(root / "f", 48 * MiB)
    assert 24 * MiB <= sn.usage("small").size < 26 * MiB


def test_default_size_applies_to_actives_only(scratch: Path) -> None:
    need_root()
    with _open(scratch / "root", default_size="16MiB") as s:
        s.prepare("a")
        assert is_mountpoint(_storage(s, "a"))
        s.prepare("u", labels={MAX_SIZE_LABEL: "0"})  # explicitly unlimited
        assert not is_mountpoint(_storage(s, "u"))
        s.commit("c", "a")
        s.view("v", "c", labels=LIMIT)  # a view holds no writes: no image
        assert not is_mountpoint(_storage(s, "v"))
        with pytest.raises(InvalidArgument, match=MAX_SIZE_LABEL):
            s.prepare("tiny", labels={MAX_SIZE_LABEL: "4096"})
        assert sorted(os.listdir(s.snapshots_dir)) == sorted(
            str(_storage(s, k).name) for k in ("c", "u", "v")
        )


def test_usage_of_50000_files_is_right_and_does_not_walk(
    sn: OverlaySnapshotter, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sn.prepare("big", labels={MAX_SIZE_LABEL: str(1 << 30)})
    fs = _storage(sn, "big") / "fs"
    for d in range(100):
        sub = fs / f"d{d}"
        sub.mkdir()
        for f in range(500):
            (sub / f"f{f}").write_bytes(b"x" * (f % 7) * 1000)
    walked = disk_usage(fs)
    assert walked.inodes == 1 + 100 + 50_000

    def no_walk(*args: object) -> object:
        raise AssertionError("usage of a limited snapshot walked the tree")

    monkeypatch.setattr(os, "scandir", no_walk)
    got = sn.usage("big")
    monkeypatch.undo()
    assert got.inodes == walked.inodes
    # statvfs also sees the extent and directory blocks of the filesystem:
    # within a percent of the walk.
    assert abs(got.size - walked.size) <= walked.size // 100


def test_commit_moves_every_file_out_of_the_image(sn: OverlaySnapshotter, scratch: Path) -> None:
    sn.prepare("b-a")
    with mounted(sn.mounts("b-a"), scratch) as root:
        (root / "gone").write_text("lower")
        (root / "dir").mkdir()
        (root / "dir" / "old").write_text("old")
    sn.commit("b", "b-a")
    with mounted(sn.prepare("lim", "b", labels=LIMIT), scratch) as root:
        (root / "gone").unlink()  # whiteout
        shutil.rmtree(root / "dir")
        (root / "dir").mkdir()  # opaque
        (root / "dir" / "new").write_text("new")
        (root / "sub").mkdir(mode=0o750)
        (root / "sub" / "data").write_bytes(os.urandom(3 * MiB))
        os.link(root / "sub" / "data", root / "sub" / "link")
        os.symlink("data", root / "sub" / "sym")
        os.chown(root / "sub", 1234, 5678)
        os.mkfifo(root / "fifo")
    storage = _storage(sn, "lim")
    before = _manifest(storage / "fs")
    usage_before = sn.usage("lim")
    sn.commit("lim-c", "lim")
    assert not is_mountpoint(storage)
    assert sorted(os.listdir(storage)) == ["fs", "work"]
    assert _manifest(storage / "fs") == before  # whiteouts, xattrs, links, owners
    assert sn.usage("lim-c") == disk_usage(storage / "fs")
    assert abs(sn.usage("lim-c").size - usage_before.size) <= 64 * 1024
    # Children stack on it like on any layer.
    with mounted(sn.view("v", "lim-c"), scratch) as root:
        assert sorted(os.listdir(root)) == ["dir", "fifo", "sub"]
        assert os.listdir(root / "dir") == ["new"]
        assert os.stat(root / "sub" / "link").st_nlink == 2
    assert _images_and_loops(sn.root)[:2] == ([], [])


def test_remove_and_cleanup_leave_nothing_behind(sn: OverlaySnapshotter, scratch: Path) -> None:
    with mounted(sn.prepare("a", labels=LIMIT), scratch) as root:
        (root / "f").write_text("x")
    sn.prepare("b", labels=LIMIT)
    _, loops, mounts = _images_and_loops(sn.root, loops_left=2)
    assert (len(loops), len(mounts)) == (2, 2)
    sn.remove("a")  # async by default: renamed aside, unmounted
    sn.cleanup()
    _, loops, mounts = _images_and_loops(sn.root, loops_left=1)
    assert (len(loops), len(mounts)) == (1, 1)
    sn.remove("b")
    sn.cleanup()
    assert _images_and_loops(sn.root) == ([], [], [])
    assert os.listdir(sn.snapshots_dir) == []


def test_sync_remove_of_a_limited_snapshot(scratch: Path) -> None:
    need_root()
    with _open(scratch / "root", sync_remove=True) as s:
        s.prepare("a", labels=LIMIT)
        s.remove("a")
        assert _images_and_loops(s.root) == ([], [], [])
        assert os.listdir(s.snapshots_dir) == []


def test_cleanup_reclaims_orphan_images_mounts_and_loops(
    sn: OverlaySnapshotter, scratch: Path
) -> None:
    sn.prepare("keep", labels=LIMIT)
    # An image a crash left mounted (where prepare mounts it first) under an
    # id the store never committed.
    orphan = sn.snapshots_dir / "999999"
    orphan.mkdir()
    overlay_limits.LimitedLayers(sn.snapshots_dir, scratch / "lock").populate(
        orphan, 16 * MiB, None
    )
    assert is_mountpoint(orphan / "setup")
    # And a loop device attached (not mounted, no autoclear) to an aside image.
    aside = sn.snapshots_dir / "rm-999998"
    aside.mkdir()
    (aside / IMAGE).write_bytes(b"\0" * MiB)
    loop.attach(aside / IMAGE)
    assert len(_images_and_loops(sn.root, loops_left=3)[1]) == 3
    sn.cleanup()
    assert not loop.is_attached(aside / IMAGE) and not aside.exists()
    images, loops, mounts = _images_and_loops(sn.root, loops_left=1)
    assert (len(images), len(loops), len(mounts)) == (0, 1, 1)  # "keep" only
    assert sorted(os.listdir(sn.snapshots_dir)) == [_storage(sn, "keep").name]


def test_restart_reattaches_limited_actives(scratch: Path) -> None:
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        with mounted(s.prepare("a", labels=LIMIT), scratch) as mnt:
            (mnt / "f").write_text("kept")
        s.prepare("b-a")
        s.commit("b", "b-a")
        s.prepare("c", "b", labels=LIMIT)
        storages = [_storage(s, "a"), _storage(s, "c")]
    # A reboot: the mounts (and with them the loop devices) are gone.
    for st in storages:
        unmount(st)
    assert _images_and_loops(root)[1:] == ([], [])
    with _open(root) as s:
        assert all(is_mountpoint(st) for st in storages)
        assert (storages[0] / "fs" / "f").read_text() == "kept"
        with mounted(s.mounts("c"), scratch) as mnt:
            (mnt / "g").write_text("g")
        s.commit("c2", "c")
        assert (_storage(s, "c2") / "fs" / "g").read_text() == "g"


def test_restart_with_a_broken_image_opens_and_says_so(
    scratch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        s.prepare("a", labels=LIMIT)
        s.prepare("ok")
        storage = _storage(s, "a")
    unmount(storage)
    (storage / IMAGE).write_bytes(b"not a filesystem")
    with caplog.at_level(logging.WARNING), _open(root) as s:
        assert s.stat("ok").kind.value == "active"  # the store opened
        with pytest.raises(OSError):
            s.mounts("a")  # the broken snapshot reports its error
    assert any(
        str(storage) in r.getMessage() and "not mounted" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_mounts_remounts_an_image_taken_off(sn: OverlaySnapshotter, scratch: Path) -> None:
    sn.prepare("a", labels=LIMIT)
    storage = _storage(sn, "a")
    unmount(storage)
    assert not is_mountpoint(storage)
    assert sn.usage("a").inodes == 1  # usage mounts it again too
    unmount(storage)
    with mounted(sn.mounts("a"), scratch) as root:
        (root / "x").write_text("x")
    assert is_mountpoint(storage)


def test_interrupted_commit_is_finished_at_open(scratch: Path) -> None:
    """A crash after the layer moved out but before the image was deleted."""
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        with mounted(s.prepare("a", labels=LIMIT), scratch) as mnt:
            (mnt / "f").write_text("data")
        storage = _storage(s, "a")
    staging = scratch / "staging"
    staging.mkdir()
    shutil.copytree(storage / "fs", staging / "fs")
    unmount(storage)
    os.rename(staging / "fs", storage / "fs")  # the point of no return
    with _open(root) as s:
        assert not is_mountpoint(storage)
        assert not (storage / IMAGE).exists()
        assert (storage / "fs" / "f").read_text() == "data"
        s.commit("c", "a")  # a plain active now
        assert s.stat("c").kind.value == "committed"


def test_commit_of_a_busy_layer_changes_nothing(sn: OverlaySnapshotter, scratch: Path) -> None:
    sn.prepare("a", labels=LIMIT)
    storage = _storage(sn, "a")
    (storage / "fs" / "f").write_text("x")
    fd = os.open(storage / "fs" / "f", os.O_RDONLY)  # keeps the image filesystem busy
    try:
        with pytest.raises(FailedPrecondition, match="busy"):
            sn.commit("c", "a")  # "try again later", as containerd's GC understands
    finally:
        os.close(fd)
    assert sn.stat("a").kind.value == "active"
    assert is_mountpoint(storage) and (storage / "fs" / "f").read_text() == "x"
    assert [n for n in os.listdir(sn.snapshots_dir) if n.startswith("new-")] == []
    sn.commit("c", "a")
    assert (_storage(sn, "c") / "fs" / "f").read_text() == "x"


def test_open_moves_up_an_image_left_at_its_setup_mount(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the create transaction and the mounts leaves the image at setup/."""
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        with monkeypatch.context() as m:
            m.setattr(overlay_limits.LimitedLayers, "ensure_mounted", lambda self, st: True)
            s.prepare("a", labels=LIMIT)
        storage = _storage(s, "a")
    assert not is_mountpoint(storage) and is_mountpoint(storage / "setup")
    with _open(root) as s:
        assert is_mountpoint(storage) and (storage / "fs").is_dir()
        with mounted(s.mounts("a"), scratch) as mnt:
            (mnt / "f").write_text("x")
        s.commit("c", "a")
        assert sorted(os.listdir(storage)) == ["fs", "work"]
    assert _images_and_loops(root) == ([], [], [])

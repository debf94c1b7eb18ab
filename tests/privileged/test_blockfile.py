"""Blockfile with real loop devices and mounts: reflinks, sparse copies, growth, xfs, busy images.

The snapshot roots live on filesystems the tests make (``loopfs``) when
the host filesystem matters (reflink on xfs/btrfs, sparse copies on ext4),
else on tmpfs (``scratch``). Images stay small: 64 MiB ext4 templates, and
320 MiB for xfs, the smallest Debian 12's mkfs.xfs accepts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import need, need_root

from stratasnap.backends.blockfile import BlockfileSnapshotter
from stratasnap.backends.blockfile_config import SIZE_BYTES_LABEL, VM_SCRATCH_LABEL
from stratasnap.errors import FailedPrecondition, NotFound
from stratasnap.fs import image as fsimage
from stratasnap.fs import loop
from stratasnap.fs.mount import apply_mounts, unmount_all_under
from stratasnap.fs.usage import syncfs
from stratasnap.testing.conformance import mounted
from stratasnap.types import Mount

pytestmark = pytest.mark.privileged

MiB = 1 << 20

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQ16xI12x")


def extents(path: str | Path) -> list[tuple[int, int, int]]:
    """(logical offset, length, flags) of each data extent of ``path`` (FIEMAP)."""
    found: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        start, count = 0, 128
        while True:
            req = _FIEMAP.pack(start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, count, 0)
            buf = bytearray(req + bytes(_EXTENT.size * count))
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP.unpack_from(buf)[3]
            flags = FIEMAP_EXTENT_LAST
            for i in range(mapped):
                logical, _phys, length, flags = _EXTENT.unpack_from(buf, _FIEMAP.size + i * 56)
                found.append((logical, length, flags))
                start = logical + length
            if mapped == 0 or flags & FIEMAP_EXTENT_LAST:
                return found
    finally:
        os.close(fd)


def allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def need_tool(name: str) -> None:
    need(
        (shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")) is not None,
        f"{name} not installed",
    )


@pytest.fixture
def open_bf() -> Iterator[Callable[..., BlockfileSnapshotter]]:
    made: list[BlockfileSnapshotter] = []

    def make(root: Path, **options: object) -> BlockfileSnapshotter:
        need_root()
        need_tool("mkfs.ext4")
        s = BlockfileSnapshotter(root, **{"scratch_size": "64M", **options})
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def layer_with_data(sn: BlockfileSnapshotter, mnt: Path, name: str, mb: int) -> str:
    """A committed snapshot holding ``mb`` MiB of random data; returns its image."""
    with mounted(sn.prepare(f"{name}-a"), mnt) as root:
        with open(root / "data", "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(MiB))
        (root / "hello").write_text("world")
    sn.commit(name, f"{name}-a")
    (view,) = sn.view(f"{name}-peek", name)
    sn.remove(f"{name}-peek")
    return view.source


# -- how images are copied ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fs_type", "size", "args"),
    [("xfs", "512M", ("-m", "reflink=1")), ("btrfs", "512M", ())],
)
def test_prepare_reflinks_on_xfs_and_btrfs(
    loopfs: Callable[..., Path],
    open_bf: Callable[..., BlockfileSnapshotter],
    fs_type: str,
    size: str,
    args: tuple[str, ...],
) -> None:
    host = loopfs(fs_type, size=size, mkfs_args=args)
    sn = open_bf(host / "root")
    parent = layer_with_data(sn, host, "base", 16)
    # Settle the parent's delayed allocation first: it moves free space too.
    syncfs(host)
    free = os.statvfs(host).f_bavail * os.statvfs(host).f_frsize
    (m,) = sn.prepare("child", "base")
    syncfs(host)
    ext = extents(m.source)
    assert ext and all(flags & FIEMAP_EXTENT_SHARED for _, _, flags in ext)
    assert sum(length for _, length, _ in ext) >= 16 * MiB
    used = free - os.statvfs(host).f_bavail * os.statvfs(host).f_frsize
    assert used < 4 * MiB  # shared, not copied
    assert allocated(m.source) >= 16 * MiB and allocated(parent) >= 16 * MiB
    with mounted([m], host) as root:
        assert (root / "hello").read_text() == "world"


def test_prepare_copies_sparse_on_ext4(
    loopfs: Callable[..., Path], open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    host = loopfs("ext4", size="512M")
    sn = open_bf(host / "root")
    parent = layer_with_data(sn, host, "base", 8)
    (m,) = sn.prepare("child", "base")
    assert not any(flags & FIEMAP_EXTENT_SHARED for _, _, flags in extents(m.source))
    # Holes stay holes: the copy allocates what the parent does, not 64 MiB.
    assert os.stat(m.source).st_size == 64 * MiB
    assert abs(allocated(m.source) - allocated(parent)) <= 64 * 1024
    assert allocated(m.source) < 24 * MiB
    with mounted([m], host) as root:
        assert (root / "hello").read_text() == "world"
        assert os.path.getsize(root / "data") == 8 * MiB


# -- sizes ---------------------------------------------------------------------------------


def test_new_snapshots_are_empty_like_every_backends(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    """No lost+found (mkfs.ext4 makes one): containerd's testsuite and containers see the root."""
    sn = open_bf(scratch / "root")
    with mounted(sn.prepare("a"), scratch) as root:
        assert os.listdir(root) == []
        (root / "lost+found").mkdir()  # a layer's own lost+found is kept
    sn.commit("c", "a")
    mounts = sn.prepare("b", "c", labels={SIZE_BYTES_LABEL: str(128 * MiB)})
    with mounted(mounts, scratch) as root:
        assert os.listdir(root) == ["lost+found"]


def test_image_is_a_hard_size_limit(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    sn = open_bf(scratch / "root")
    with mounted(sn.prepare("small"), scratch) as root:
        with pytest.raises(OSError) as err, open(root / "fill", "wb") as f:
            for _ in range(80):
                f.write(bytes(MiB))
                f.flush()
                os.fsync(f.fileno())
        assert err.value.errno == errno.ENOSPC


def test_grown_image_mounts_with_the_requested_size(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    need_tool("resize2fs")
    sn = open_bf(scratch / "root")
    mounts = sn.prepare("big", labels={SIZE_BYTES_LABEL: str(256 * MiB)})
    with mounted(mounts, scratch) as root:
        assert os.listdir(root) == []  # e2fsck made a lost+found; it is gone again
        st = os.statvfs(root)
        assert st.f_blocks * st.f_frsize > 220 * MiB
        with open(root / "fill", "wb") as f:  # more than the 64 MiB template holds
            for _ in range(96):
                f.write(bytes(MiB))


# -- xfs -----------------------------------------------------------------------------------


def test_xfs_images(scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]) -> None:
    need_tool("mkfs.xfs")
    need_tool("xfs_growfs")
    sn = open_bf(scratch / "root", fs_type="xfs", scratch_size="320M")
    assert fsimage.probe_fs_type(sn.template) == "xfs"
    (m,) = sn.prepare("a")
    assert m.type == "xfs" and m.options == ("loop", "rw", "nouuid")
    with mounted([m], scratch) as root:
        (root / "f").write_text("on xfs")
        assert not (root / "lost+found").exists()
    sn.commit("c", "a")
    # Two copies of one template share its UUID: both mount at once (nouuid).
    one, two = sn.prepare("one", "c"), sn.prepare("two", "c")
    with mounted(one, scratch) as r1, mounted(two, scratch) as r2:
        assert (r1 / "f").read_text() == (r2 / "f").read_text() == "on xfs"
        st = os.statvfs(r1)
        before = st.f_blocks * st.f_frsize
    (v,) = sn.view("v", "c")
    assert v.options == ("loop", "ro", "nouuid", "norecovery")
    with mounted([v], scratch) as root:
        assert (root / "f").read_text() == "on xfs"
    big = sn.prepare("big", "c", labels={SIZE_BYTES_LABEL: str(640 * MiB)})
    assert os.stat(big[0].source).st_size == 640 * MiB
    with mounted(big, scratch) as root:
        st = os.statvfs(root)
        assert st.f_blocks * st.f_frsize - before >= 300 * MiB  # grown by 320 MiB
        assert (root / "f").read_text() == "on xfs"


# -- commit while mounted -------------------------------------------------------------------


def test_commit_while_mounted_gives_a_consistent_layer(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    sn = open_bf(scratch / "root")
    with mounted(sn.prepare("a"), scratch) as root:
        for i in range(200):
            (root / f"f{i}").write_text(str(i))
        (root / "d").mkdir()
        sn.commit("c", "a")  # still mounted
        # The read-only view does not replay the journal: the data must be in place.
        with mounted(sn.view("v", "c"), scratch) as view:
            assert len([n for n in os.listdir(view) if n.startswith("f")]) == 200
            assert (view / "f199").read_text() == "199"
            assert (view / "d").is_dir()
    assert sn.usage("c").inodes >= 211


# -- busy images ------------------------------------------------------------------------------


def test_remove_refuses_a_mounted_image(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    sn = open_bf(scratch / "root")
    mounts = sn.prepare("a")
    image = mounts[0].source
    target = scratch / "mnt"
    target.mkdir()
    apply_mounts(mounts, target)
    try:
        with pytest.raises(FailedPrecondition, match="in use"):
            sn.remove("a")
        assert sn.stat("a").name == "a"  # nothing happened
        assert os.path.exists(image)
    finally:
        unmount_all_under(target)
    sn.remove("a")
    assert not os.path.exists(image)
    assert not loop.loop_devices_for(image)


def test_remove_detaches_an_idle_loop_device(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    sn = open_bf(scratch / "root")
    (m,) = sn.prepare("a")
    dev = loop.attach(m.source)  # no autoclear: it would stay forever
    try:
        assert loop.loop_devices_for(m.source)
        sn.remove("a")
        assert not os.path.exists(m.source)
        assert not loop.loop_devices_for(m.source)
        with pytest.raises(NotFound):
            sn.stat("a")
    finally:
        loop.detach(dev)


def test_cleanup_never_deletes_an_attached_image(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    sn = open_bf(scratch / "root")
    orphan = sn.snapshots_dir / "777777"  # storage no snapshot owns (a crash leftover)
    orphan.mkdir()
    shutil.copyfile(sn.template, orphan / "rootfs.img")
    target = scratch / "mnt"
    target.mkdir()
    apply_mounts([Mount("ext4", str(orphan / "rootfs.img"), ("loop", "rw"))], target)
    try:
        got = sn.cleanup()
        assert got.paths == ()
        (aside,) = [p for p in sn.snapshots_dir.iterdir() if p.name.startswith("rm-")]
        assert loop.loop_devices_for(aside / "rootfs.img")
        assert os.path.ismount(target)  # the mount still works
    finally:
        unmount_all_under(target)
    got = sn.cleanup()
    assert [Path(p).name for p in got.paths] == ["rm-777777"]
    assert list(sn.snapshots_dir.iterdir()) == []


# -- the VM scratch disk ------------------------------------------------------------------------


def test_vm_scratch_disk_mounts_at_vm(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter]
) -> None:
    vm = scratch / "vm.img"
    fsimage.make_image(vm, 32 * MiB, "ext4", ("-L", "vmscratch"))
    sn = open_bf(scratch / "root", vm_scratch_template=str(vm))
    base, vm_mount = sn.prepare("a", labels={VM_SCRATCH_LABEL: "true"})
    with mounted([base], scratch) as root:
        (root / "vm").mkdir()  # a mount point for the sub-mount
    with mounted([base, vm_mount], scratch) as root:
        assert os.stat(root).st_dev != os.stat(root / "vm").st_dev
        (root / "vm" / "state").write_text("vm data")
        (root / "rootfs-file").write_text("x")
    assert not (Path(vm_mount.source).parent.parent / "rootfs.img").samefile(vm_mount.source)
    with mounted([replace(vm_mount, target="")], scratch) as vm_root:
        assert (vm_root / "state").read_text() == "vm data"
    with mounted([base], scratch) as root:
        assert (root / "rootfs-file").exists() and not (root / "vm" / "state").exists()


def test_remove_refuses_an_image_held_open_then_goes_once_released(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter], monkeypatch: pytest.MonkeyPatch
) -> None:
    import stratasnap.backends.blockfile as blockfile

    monkeypatch.setattr(blockfile, "RELEASE_WAIT", 0.2)
    sn = open_bf(scratch / "root")
    (m,) = sn.prepare("a")
    dev = loop.attach(m.source)
    held = os.open(dev, os.O_RDONLY)  # e.g. a VM runtime using the block device
    try:
        with pytest.raises(FailedPrecondition, match=str(dev)):
            sn.remove("a")
        assert sn.stat("a").name == "a"
    finally:
        os.close(held)  # the detach asked for above happens at this last close
    sn.remove("a")  # waits for the kernel to let go
    assert not os.path.exists(m.source) and not loop.loop_devices_for(m.source)


def test_an_io_error_flushing_a_mounted_image_fails_the_commit(
    scratch: Path, open_bf: Callable[..., BlockfileSnapshotter], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stratasnap.backends import blockfile
    from stratasnap.errors import SnapshotError
    from stratasnap.types import Kind

    sn = open_bf(scratch / "root")
    with mounted(sn.prepare("a"), scratch) as root:
        (root / "f").write_text("x")
        flushed: list[Path] = []

        def failing_syncfs(where: Path) -> None:
            flushed.append(Path(where))
            raise OSError(errno.EIO, "Input/output error", str(where))

        monkeypatch.setattr(blockfile, "syncfs", failing_syncfs)
        with pytest.raises(SnapshotError, match="Input/output error"):
            sn.commit("c", "a")
        assert flushed == [root]  # the mount of the image, not some other filesystem
        assert sn.stat("a").kind is Kind.ACTIVE
        with pytest.raises(NotFound):
            sn.stat("c")
        monkeypatch.undo()
        sn.commit("c", "a")  # once the disk answers again
    assert sn.stat("c").kind is Kind.COMMITTED

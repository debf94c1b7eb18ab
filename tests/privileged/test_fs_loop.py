"""Loop devices through ioctls: attach, mount, detach, autoclear; apply_mounts with `loop`."""

from __future__ import annotations

import errno
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_root

from stratasnap.fs import loop
from stratasnap.fs.mount import apply_mounts, is_mountpoint, mount, unmount, unmount_all_under
from stratasnap.fs.mountopts import MS_RDONLY
from stratasnap.types import Mount

pytestmark = pytest.mark.privileged


@pytest.fixture
def image(scratch: Path) -> Path:
    need_root()
    need(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 not installed")
    img = scratch / "fs.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True)
    return img


@pytest.fixture
def mnt(scratch: Path) -> Iterator[Path]:
    m = scratch / "mnt"
    m.mkdir()
    yield m
    unmount_all_under(m, lazy=True)


def _released(image: Path, timeout: float = 2.0) -> bool:
    """Whether no loop device is left on ``image`` (autoclear runs at the last close)."""
    end = time.monotonic() + timeout
    while loop.is_attached(image):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_attach_mount_detach(image: Path, mnt: Path) -> None:
    assert not loop.is_attached(image)
    dev = loop.attach(image)
    try:
        assert loop.loop_devices_for(image) == [dev]
        assert loop.is_attached(image)
        mount(dev, mnt, "ext4")
        (mnt / "hello").write_text("hi")
        unmount(mnt)
        mount(dev, mnt, "ext4", MS_RDONLY)
        assert (mnt / "hello").read_text() == "hi"
        with pytest.raises(OSError) as e:
            (mnt / "x").write_text("x")
        assert e.value.errno == errno.EROFS
        unmount(mnt)
    finally:
        loop.detach(dev)
    assert _released(image)
    assert loop.loop_devices_for(image) == []
    loop.detach(dev)  # detaching a free device is not an error


def test_readonly_attach(image: Path) -> None:
    dev = loop.attach(image, readonly=True)
    try:
        assert Path(f"/sys/block/{dev.name}/ro").read_text().strip() == "1"
    finally:
        loop.detach(dev)
    assert _released(image)


def test_attached_device_goes_with_the_last_unmount(image: Path, mnt: Path) -> None:
    with loop.attached(image) as dev:
        mount(dev, mnt, "ext4")
    assert loop.loop_devices_for(image) == [dev]  # the mount holds it now
    (mnt / "f").write_text("x")
    unmount(mnt)
    assert _released(image)


def test_attached_without_a_mount_leaves_nothing(image: Path) -> None:
    with loop.attached(image) as dev:
        assert loop.loop_devices_for(image) == [dev]
    assert _released(image)


def test_apply_mounts_with_loop_option(image: Path, mnt: Path) -> None:
    apply_mounts([Mount("ext4", str(image), ("loop", "rw"))], mnt)
    assert is_mountpoint(mnt)
    (mnt / "data").write_text("kept")
    assert unmount_all_under(mnt) == [mnt]
    assert _released(image)

    apply_mounts([Mount("ext4", str(image), ("loop", "ro"))], mnt)
    assert (mnt / "data").read_text() == "kept"
    (dev,) = loop.loop_devices_for(image)
    assert Path(f"/sys/block/{dev.name}/ro").read_text().strip() == "1"
    unmount(mnt)
    assert _released(image)


def test_failed_loop_mount_leaves_no_device(image: Path, mnt: Path) -> None:
    with pytest.raises(OSError):
        apply_mounts([Mount("xfs", str(image), ("loop",))], mnt)
    assert not is_mountpoint(mnt)
    assert _released(image)

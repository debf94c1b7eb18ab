"""copy_tree as root: device nodes, owners, privileged xattrs, reflinks, holes on ext4."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need_root

from stratasnap.fs.copy import copy_file, copy_tree, reflink_supported
from stratasnap.fs.manifest import manifest
from stratasnap.fs.usage import syncfs

pytestmark = pytest.mark.privileged

MiB = 1 << 20
UID, GID = 1234, 5678
# struct vfs_cap_data, revision 2, effective, CAP_NET_BIND_SERVICE permitted
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def test_devices_owners_and_privileged_xattrs(scratch: Path) -> None:
    src = scratch / "src"
    (src / "dir" / "private").mkdir(parents=True)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "blk", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.mknod(src / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
    os.link(src / "null", src / "dir" / "null-again")
    os.mkfifo(src / "fifo")
    (src / "dir" / "suid").write_bytes(b"\x7fELF")
    (src / "dir" / "private" / "secret").write_bytes(b"s")
    os.symlink("suid", src / "dir" / "link")
    for p in [src, *src.rglob("*")]:
        os.chown(p, UID, GID, follow_symlinks=False)
    os.chown(src / "blk", 0, GID)
    # chown clears these, so they come after it (the copier must do the same)
    os.chmod(src / "dir" / "suid", 0o6755)
    os.setxattr(src / "dir" / "suid", "security.capability", CAPABILITY)
    os.setxattr(src / "dir", "trusted.overlay.opaque", b"y")
    os.chmod(src / "dir" / "private", 0o000)
    os.utime(src / "dir" / "link", ns=(3_000_000_003, 4_000_000_004), follow_symlinks=False)

    stats = copy_tree(src, scratch / "dst")
    dst = scratch / "dst"
    assert manifest(dst) == manifest(src)
    st = os.lstat(dst / "dir" / "suid")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, 0o6755)
    assert os.getxattr(dst / "dir" / "suid", "security.capability") == CAPABILITY
    assert os.getxattr(dst / "dir", "trusted.overlay.opaque") == b"y"
    assert os.lstat(dst / "blk").st_rdev == os.makedev(7, 200)
    assert os.lstat(dst / "blk").st_uid == 0
    assert os.lstat(dst / "dir" / "link").st_uid == UID
    assert os.lstat(dst / "dir" / "link").st_mtime_ns == 4_000_000_004
    assert os.lstat(dst / "null").st_ino == os.lstat(dst / "dir" / "null-again").st_ino
    assert stats.specials == 4 and stats.hardlinks == 1 and stats.xattrs_skipped == 0


@pytest.mark.parametrize(
    ("fs", "args"), [("xfs", ("-m", "reflink=1")), ("btrfs", ())], ids=["xfs", "btrfs"]
)
def test_reflink_shares_extents(
    loopfs: Callable[..., Path], fs: str, args: tuple[str, ...]
) -> None:
    mnt = loopfs(fs, size="1G", mkfs_args=args)
    assert reflink_supported(mnt)
    src = mnt / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(8):
        (src / "sub" / f"blob{i}").write_bytes(os.urandom(8 * MiB))
    (src / "small").write_bytes(b"tiny")
    (src / "empty").touch()
    syncfs(mnt)  # allocate delayed extents, so that the free count is settled
    vfs = os.statvfs(mnt)
    free_before = vfs.f_bfree * vfs.f_frsize

    stats = copy_tree(src, mnt / "dst")
    syncfs(mnt)
    vfs = os.statvfs(mnt)
    grew = free_before - vfs.f_bfree * vfs.f_frsize

    assert stats.reflinked == 9  # every non-empty file
    assert stats.bytes_copied == 0
    assert grew < 4 * MiB, f"a 64 MiB copy took {grew} bytes"
    assert manifest(mnt / "dst") == manifest(src)

    image_copy = copy_file(src / "sub" / "blob0", mnt / "blob0-copy")
    assert image_copy.reflinked == 1
    assert not list(mnt.glob(".reflink-probe-*"))


def test_sparse_copy_on_ext4_keeps_holes(loopfs: Callable[..., Path]) -> None:
    mnt = loopfs("ext4", size="1G")
    assert not reflink_supported(mnt)
    src = mnt / "src"
    src.mkdir()
    with open(src / "image", "wb") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
        f.seek(200 * MiB)
        f.write(os.urandom(MiB // 2))
        f.truncate(512 * MiB)
    (src / "dense").write_bytes(os.urandom(5 * MiB))
    syncfs(mnt)
    vfs = os.statvfs(mnt)
    free_before = vfs.f_bfree * vfs.f_frsize

    stats = copy_tree(src, mnt / "dst")
    syncfs(mnt)
    vfs = os.statvfs(mnt)
    grew = free_before - vfs.f_bfree * vfs.f_frsize

    assert stats.reflinked == 0
    a, b = src / "image", mnt / "dst" / "image"
    assert b.read_bytes() == a.read_bytes()
    assert _allocated(b) <= _allocated(a) + 64 * 1024
    assert grew < 16 * MiB, f"copying 6.5 MiB of data took {grew} bytes"

    one = copy_file(a, mnt / "image-copy")
    assert _allocated(mnt / "image-copy") <= _allocated(a) + 64 * 1024
    assert one.bytes_copied < 2 * MiB

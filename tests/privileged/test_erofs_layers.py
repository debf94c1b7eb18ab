"""erofs layers with real mounts: images, whiteouts, restart, removal, leaks, compression.

Roots are on tmpfs (``scratch``): images there are mounted through loop
devices (tmpfs files cannot back an EROFS mount directly), so every check
that nothing leaked counts loop devices too, scoped to our own root.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import need_root

# The overlay backend's test_* cases are collected here again with this module's
# ``sn`` (erofs): 128- and 200-layer chains of mounted images (lowerdir beyond one
# page), rebase at commit, and containerd's relative-path compaction.
from test_overlay_layers import (  # noqa: F401
    _commit_layer,
    _view,
    _whiteouts_and_opaque,
    test_containerd_style_compaction_mounts_200_layers,
    test_deep_chains_mount_and_read,
    test_rebase_with_real_mounts,
)

from stratasnap import open_snapshotter
from stratasnap.backends.erofs import DIGEST_DETAIL, IMAGE, ErofsSnapshotter
from stratasnap.cli import cli
from stratasnap.errors import FailedPrecondition, NotFound, SnapshotError
from stratasnap.fs.erofs_image import (
    file_sha256,
    is_immutable,
    mount_image,
    supports_ztailpacking,
)
from stratasnap.fs.image import find_tool
from stratasnap.fs.loop import backing_files
from stratasnap.fs.manifest import manifest
from stratasnap.fs.mount import is_mountpoint, mount, mounts_under, unmount_all_under
from stratasnap.fs.mountinfo import read_mountinfo
from stratasnap.fs.mountopts import MS_RDONLY
from stratasnap.testing import mounted

pytestmark = pytest.mark.privileged


def _open(root: Path, **options: object) -> ErofsSnapshotter:
    s = open_snapshotter(root, "erofs", **options)
    assert isinstance(s, ErofsSnapshotter)
    return s


@pytest.fixture
def sn(scratch: Path) -> Iterator[ErofsSnapshotter]:
    need_root()
    s = _open(scratch / "root")
    try:
        yield s
    finally:
        s.close()


def _storage(sn: ErofsSnapshotter, key: str) -> Path:
    with sn._store.read() as tx:
        return sn.storage_dir(tx.get(key).id)


def _loops_under(root: Path) -> list[Path]:
    prefix = str(root) + "/"
    return [dev for dev, backing in backing_files() if backing.startswith(prefix)]


def _settled_loops(root: Path, expected: int) -> list[Path]:
    # Autoclear devices are released a moment after the last unmount.
    deadline = time.monotonic() + 10
    loops = _loops_under(root)
    while len(loops) > expected and time.monotonic() < deadline:
        time.sleep(0.01)
        loops = _loops_under(root)
    return loops


def test_commit_leaves_an_image_mounted_and_its_digest_recorded(
    sn: ErofsSnapshotter, scratch: Path
) -> None:
    _commit_layer(sn, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
    storage = _storage(sn, "l1")
    assert sorted(os.listdir(storage)) == ["fs", IMAGE]  # no upper, no work dir left
    assert is_mountpoint(storage / "fs")
    [m] = [m for m in read_mountinfo() if m.mountpoint == storage / "fs"]
    assert m.fstype == "erofs" and "ro" in m.options.split(",")
    assert (storage / "fs" / "f").read_text() == "one"
    digest = sn.details("l1")[DIGEST_DETAIL]
    assert digest == "sha256:" + file_sha256(storage / IMAGE)
    assert sn.usage("l1").size == os.stat(storage / IMAGE).st_blocks * 512
    with pytest.raises(OSError) as err:
        (storage / "fs" / "g").write_text("no")
    assert err.value.errno == errno.EROFS


def test_info_shows_the_image_digest(scratch: Path) -> None:
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        _commit_layer(s, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
        want = s.details("l1")[DIGEST_DETAIL]
    got = CliRunner().invoke(cli, ["--root", str(root), "--backend", "erofs", "info", "l1"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["storage"] == {DIGEST_DETAIL: want}


def test_whiteouts_and_opaque_dirs_across_image_layers(sn: ErofsSnapshotter, scratch: Path) -> None:
    # The overlay case, unchanged: its on-disk checks now look into the mounted images.
    _whiteouts_and_opaque(sn, scratch)
    for layer in ("l1", "l2", "l3"):
        assert is_mountpoint(_storage(sn, layer) / "fs")


def test_whiteouts_and_opaque_dirs_on_ext4_file_backed(loopfs: Callable[..., Path]) -> None:
    base = loopfs("ext4", size="256M")
    with _open(base / "root") as s:
        _whiteouts_and_opaque(s, base)
        image = _storage(s, "l2") / IMAGE
        [m] = [m for m in read_mountinfo() if m.mountpoint == image.parent / "fs"]
        if m.source != str(image):
            # A loop device only where the kernel refuses the file itself (before 6.12).
            assert m.source in [str(d) for d in _loops_under(base)]
            probe = base / "probe"
            probe.mkdir()
            with pytest.raises(OSError) as err:
                mount(image, probe, "erofs", MS_RDONLY)
            assert err.value.errno == errno.ENOTBLK


@pytest.mark.parametrize("compression", ["none", "lz4", "lz4hc"])
def test_compression_round_trip(scratch: Path, compression: str) -> None:
    """Every file's bytes and metadata come back out of the image as they went in."""
    need_root()

    def fill(root: Path) -> None:
        (root / "dir" / "sub").mkdir(parents=True)
        (root / "text").write_text("hello " * 10000)  # compresses
        (root / "random").write_bytes(os.urandom(300_000))  # does not
        (root / "empty").write_bytes(b"")
        with open(root / "sparse", "wb") as f:
            f.truncate(5 << 20)
            f.seek(2 << 20)
            f.write(b"middle")
        os.link(root / "text", root / "dir" / "hardlink")
        os.symlink("../text", root / "dir" / "link")
        os.mknod(root / "dir" / "fifo", stat.S_IFIFO | 0o640)
        os.mknod(root / "dir" / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chmod(root / "dir" / "sub", 0o2751)
        os.chown(root / "dir" / "sub", 1234, 5678)
        os.lchown(root / "dir" / "link", 42, 43)
        os.setxattr(root / "dir", "user.note", b"kept")
        os.setxattr(root / "text", "trusted.something", b"\x00\x01")
        # File capabilities (ping's cap_net_raw+ep), as images carry them.
        cap = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
        os.setxattr(root / "random", "security.capability", cap)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(root / "dir" / "sock"))
        os.utime(root / "random", ns=(1_000_000_000, 1_234_567_891_011_121_314))
        os.utime(root / "dir" / "sub", ns=(5, 946_684_800_123_456_789))

    sn = _open(scratch / "root", compression=compression)
    try:
        (scratch / "m").mkdir()
        with mounted(sn.prepare("a"), scratch / "m") as r:
            fill(r)
            want = manifest(r)
        sn.commit("c", "a")
        got = manifest(_storage(sn, "c") / "fs")
        assert got.keys() == want.keys()
        for path, entry in want.items():
            assert got[path] == entry, path
        if compression != "none":
            # Text and the sparse file's zeroes compress: less than the files take.
            assert sn.usage("c").size < 300_000 + 60_000 + (1 << 20)
    finally:
        sn.close()


def test_restart_remounts_committed_layers(scratch: Path) -> None:
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        _commit_layer(s, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
        _commit_layer(s, scratch, "l2", "l1", lambda r: (r / "g").write_text("two"))
    # A reboot: every mount gone, the images still there.
    unmount_all_under(root / "snapshots")
    assert mounts_under(root / "snapshots") == []
    with _open(root) as s:
        assert _view(s, scratch, "l2") == {"f": "one", "g": "two"}
        with mounted(s.prepare("ctr", "l2"), scratch) as r:
            (r / "f").write_text("changed")
            assert (r / "g").read_text() == "two"
        assert is_mountpoint(_storage(s, "l1") / "fs")
        assert is_mountpoint(_storage(s, "l2") / "fs")


def test_mount_layers_mounts_all_at_once(scratch: Path) -> None:
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        for i in range(3):
            _commit_layer(s, scratch, f"l{i}", "", lambda r: (r / "f").write_text("x"))
    unmount_all_under(root / "snapshots")
    with _open(root) as s:
        assert mounts_under(root / "snapshots") == []  # opening mounts nothing
        assert s.mount_layers() == 3
        assert s.mount_layers() == 0
        assert len(mounts_under(root / "snapshots")) == 3


def test_remove_and_cleanup_leave_no_mount_loop_or_file(
    sn: ErofsSnapshotter, scratch: Path
) -> None:
    root = scratch / "root"
    _commit_layer(sn, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
    _commit_layer(sn, scratch, "l2", "l1", lambda r: (r / "g").write_text("two"))
    sn.view("v", "l2")
    assert len(mounts_under(root)) == 2
    assert len(_loops_under(root)) == 2  # tmpfs: each image on its own loop device
    for key in ("v", "l2", "l1"):
        sn.remove(key)
    sn.cleanup()
    assert mounts_under(root) == []
    assert _settled_loops(root, 0) == []
    assert os.listdir(root / "snapshots") == []


def test_remove_of_a_busy_layer_is_failed_precondition(sn: ErofsSnapshotter, scratch: Path) -> None:
    _commit_layer(sn, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
    fs = _storage(sn, "l1") / "fs"
    fd = os.open(fs / "f", os.O_RDONLY)  # a process still reading the layer
    try:
        with pytest.raises(FailedPrecondition, match="in use"):
            sn.remove("l1")
    finally:
        os.close(fd)
    assert sn.stat("l1").name == "l1"
    assert _view(sn, scratch, "l1") == {"f": "one"}  # mounted again on use
    sn.remove("l1")
    sn.cleanup()
    assert mounts_under(scratch / "root") == []


def test_immutable_images_are_sealed_and_removal_clears_the_flag(
    loopfs: Callable[..., Path],
) -> None:
    base = loopfs("ext4", size="256M")  # tmpfs has no FS_IMMUTABLE_FL before Linux 6.0
    with _open(base / "root", immutable=True) as s:
        _commit_layer(s, base, "l1", "", lambda r: (r / "f").write_text("one"))
        image = _storage(s, "l1") / IMAGE
        assert is_immutable(image)
        with pytest.raises(PermissionError):
            os.unlink(image)
        s.remove("l1")
        s.cleanup()
        assert not image.exists()
        assert os.listdir(base / "root" / "snapshots") == []
    assert mounts_under(base / "root") == []


def test_cleanup_unmounts_and_deletes_unowned_images(sn: ErofsSnapshotter, scratch: Path) -> None:
    root = scratch / "root"
    _commit_layer(sn, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
    storage = _storage(sn, "l1")
    # A crash between the rename of new-<id> and the commit of a create leaves
    # storage nobody owns; here, a mounted image of one.
    stray = root / "snapshots" / "999"
    (stray / "fs").mkdir(parents=True)
    os.link(storage / IMAGE, stray / IMAGE)
    mount_image(stray / IMAGE, stray / "fs")
    reclaimed = sn.cleanup()
    assert str(root / "snapshots" / "rm-999") in reclaimed.paths
    assert sorted(os.listdir(root / "snapshots")) == [storage.name]
    assert mounts_under(root) == [storage / "fs"]
    assert len(_settled_loops(root, 1)) == 1


def test_limited_upper_commits_to_an_image(scratch: Path) -> None:
    need_root()
    with _open(scratch / "root", default_size="64MiB") as s:
        _commit_layer(s, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
        with mounted(s.prepare("a", "l1"), scratch) as r:
            (r / "g").write_bytes(b"x" * 100_000)
            (r / "f").unlink()
            with pytest.raises(OSError) as err:
                (r / "big").write_bytes(b"\0" * (80 << 20))
            assert err.value.errno == errno.ENOSPC
            (r / "big").unlink()
        s.commit("l2", "a")
        storage = _storage(s, "l2")
        assert sorted(os.listdir(storage)) == ["fs", IMAGE]  # no ext4 image left
        assert _view(s, scratch, "l2") == {"g": "x" * 100_000}
        # Only the two layer images remain attached (tmpfs: through loop devices).
        assert len(_settled_loops(scratch / "root", 2)) == 2


def test_ztailpacking_probe_mounts_a_real_image_and_leaves_nothing(scratch: Path) -> None:
    need_root()
    probe = scratch / "probe"
    probe.mkdir()
    # Linux 5.17+ reads inline compressed tails; Debian 12's 6.1 and later do.
    assert supports_ztailpacking(find_tool("mkfs.erofs"), probe)
    assert os.listdir(probe) == []
    assert mounts_under(scratch) == []


def test_concurrent_commits_of_one_key_leave_one_intact_layer(
    sn: ErofsSnapshotter, scratch: Path
) -> None:
    with mounted(sn.prepare("a"), scratch) as r:
        (r / "f").write_text("data")
    errors: list[BaseException] = []

    def commit(name: str) -> None:
        try:
            sn.commit(name, "a")
        except SnapshotError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and all(isinstance(e, NotFound) for e in errors), errors
    [name] = [i.name for i in sn.walk()]
    storage = _storage(sn, name)
    assert sn.details(name)[DIGEST_DETAIL] == "sha256:" + file_sha256(storage / IMAGE)
    assert _view(sn, scratch, name) == {"f": "data"}


def test_a_lost_image_is_a_clear_error_naming_it(scratch: Path) -> None:
    need_root()
    root = scratch / "root"
    with _open(root) as s:
        _commit_layer(s, scratch, "l1", "", lambda r: (r / "f").write_text("one"))
        image = _storage(s, "l1") / IMAGE
    unmount_all_under(root / "snapshots")
    image.unlink()  # an operator's mistake, or a disk that lost it
    with _open(root) as s, pytest.raises(SnapshotError, match=f"mounting layer image {image}"):
        s.prepare("c", "l1")

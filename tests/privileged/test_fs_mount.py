"""Bind mounts, the mount table, overlay via apply_mounts (incl. > 1 page of options), as root."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need_kernel, need_root

from stratasnap.fs import mount as fsmount
from stratasnap.fs._fsmount import mount_fs as real_mount_fs
from stratasnap.fs._fsmount import overlay_lowerdir_plus
from stratasnap.fs.mount import (
    apply_mounts,
    bind,
    is_mountpoint,
    mount,
    mounts_under,
    unmount,
    unmount_all_under,
)
from stratasnap.types import Mount

pytestmark = pytest.mark.privileged


@pytest.fixture
def area(scratch: Path) -> Iterator[Path]:
    """The scratch dir; whatever a test leaves mounted under it is taken off."""
    need_root()
    yield scratch
    unmount_all_under(scratch, lazy=True)


def _mkdirs(base: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (base / n).mkdir(parents=True)
        out.append(base / n)
    return out


def _write_fails_erofs(path: Path) -> None:
    with pytest.raises(OSError) as e:
        path.write_text("nope")
    assert e.value.errno == errno.EROFS


def test_bind_rw_and_ro(area: Path) -> None:
    src, rw, ro = _mkdirs(area, "src", "rw", "ro")
    (src / "f").write_text("x")
    bind(src, rw)
    assert is_mountpoint(rw)  # a bind within one filesystem: same st_dev as its parent
    (rw / "new").write_text("y")
    assert (src / "new").read_text() == "y"
    bind(src, ro, readonly=True)
    assert (ro / "f").read_text() == "x"
    _write_fails_erofs(ro / "g")
    unmount(ro)
    unmount(rw)
    assert not is_mountpoint(rw) and not is_mountpoint(ro)
    (src / "still-writable").write_text("z")


def test_ro_rbind_makes_sub_mounts_ro_too(area: Path) -> None:
    src, ro = _mkdirs(area, "src", "ro")
    (src / "sub").mkdir()
    mount("tmpfs", src / "sub", "tmpfs", 0, "size=1m")
    bind(src, ro, readonly=True, recursive=True)
    _write_fails_erofs(ro / "top")
    _write_fails_erofs(ro / "sub" / "inner")
    (src / "sub" / "inner").write_text("source side stays writable")
    assert mounts_under(ro) == [ro / "sub", ro]


def test_mount_table_deepest_first_and_unmount_all(area: Path) -> None:
    base = area / "m"
    base.mkdir()
    mount("tmpfs", base, "tmpfs", 0, "size=1m")
    spaced = base / "with space\tand tab"
    spaced.mkdir()
    mount("tmpfs", spaced, "tmpfs", 0, "size=1m")
    (spaced / "deep").mkdir()
    mount("tmpfs", spaced / "deep", "tmpfs")
    (base / "x").mkdir()
    mount("tmpfs", base / "x", "tmpfs")
    mount("tmpfs", base / "x", "tmpfs")  # stacked
    got = mounts_under(base)
    assert got == [spaced / "deep", base / "x", base / "x", spaced, base]
    assert is_mountpoint(spaced)
    done = unmount_all_under(base)
    assert done == got
    assert mounts_under(base) == []
    assert not is_mountpoint(base)


def test_errors_carry_errno_and_path(area: Path) -> None:
    with pytest.raises(OSError) as e:
        unmount(area)
    assert e.value.errno == errno.EINVAL and e.value.filename == str(area)
    with pytest.raises(OSError) as e:
        mount("tmpfs", area / "missing", "tmpfs")
    assert e.value.errno == errno.ENOENT and e.value.filename == str(area / "missing")
    with pytest.raises(OSError) as e:
        mount("x", area, "no-such-fs")
    assert e.value.errno == errno.ENODEV


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def test_overlay_of_three_layers_with_whiteouts(area: Path) -> None:
    l1, l2, l3, upper, work, target = _mkdirs(area, "l1", "l2", "l3", "upper", "work", "mnt")
    (l1 / "a").write_text("1")
    (l1 / "b").write_text("1")
    (l1 / "gone").write_text("1")
    (l1 / "dir").mkdir()
    (l1 / "dir" / "x").write_text("1")
    (l1 / "opq").mkdir()
    (l1 / "opq" / "old").write_text("1")
    (l2 / "b").write_text("2")
    _whiteout(l2 / "gone")
    (l2 / "dir").mkdir()
    (l2 / "dir" / "y").write_text("2")
    (l3 / "c").write_text("3")
    (l3 / "opq").mkdir()
    os.setxattr(l3 / "opq", "trusted.overlay.opaque", b"y")
    (l3 / "opq" / "new").write_text("3")
    opts = (f"lowerdir={l3}:{l2}:{l1}", f"upperdir={upper}", f"workdir={work}", "index=off")
    apply_mounts([Mount("overlay", "overlay", opts)], target)
    assert [(target / n).read_text() for n in "abc"] == ["1", "2", "3"]
    assert not (target / "gone").exists()
    assert sorted(os.listdir(target / "dir")) == ["x", "y"]
    assert os.listdir(target / "opq") == ["new"]
    (target / "written").write_text("up")
    os.unlink(target / "a")
    assert (upper / "written").read_text() == "up"
    assert stat.S_ISCHR(os.lstat(upper / "a").st_mode)  # the overlay made a whiteout
    assert unmount_all_under(target) == [target]


def _layers(base: Path, count: int, name_len: int) -> list[Path]:
    """``count`` layers, topmost first; each has its own file and a shared one."""
    layers = []
    for i in range(count):
        d = base / f"layer-{i:03d}-".ljust(name_len, "x")
        d.mkdir(parents=True)
        (d / f"only-{i}").write_text(str(i))
        (d / "shared").write_text(str(i))
        layers.append(d)
    (layers[-1] / "deepest").write_text("bottom layer")
    return layers


LOWERDIR_PLUS = "overlayfs lowerdir+ (Linux 6.8)"


def test_overlay_with_200_layers_beyond_a_page(area: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_kernel(overlay_lowerdir_plus(), LOWERDIR_PLUS)
    calls: list[str] = []

    def spy(fstype: str, *rest: Any) -> None:
        calls.append(fstype)
        real_mount_fs(fstype, *rest)

    monkeypatch.setattr(fsmount, "mount_fs", spy)
    layers = _layers(area / "layers", 200, 60)
    upper, work, target = _mkdirs(area, "upper", "work", "mnt")
    lowerdir = "lowerdir=" + ":".join(str(p) for p in layers)
    opts = (lowerdir, f"upperdir={upper}", f"workdir={work}")
    assert len(",".join(opts)) > 4095  # the kernel would cut this string
    apply_mounts([Mount("overlay", "overlay", opts)], target)
    assert (target / "deepest").read_text() == "bottom layer"
    assert (target / "shared").read_text() == "0"  # the first lowerdir is on top
    assert (target / "only-199").read_text() == "199"
    assert len(os.listdir(target)) == 200 + 2
    assert calls == ["overlay"]  # through fsopen/fsconfig, not mount(2)
    (target / "new").write_text("rw")
    assert (upper / "new").exists()
    unmount(target)


def test_overlay_beyond_a_page_with_a_long_layer_path(area: Path) -> None:
    # A layer path over 255 bytes cannot be an fsconfig string: it goes as an fd.
    need_kernel(overlay_lowerdir_plus(), LOWERDIR_PLUS)
    layers = _layers(area / "layers", 60, 80)
    long_dir = area / ("a" * 200) / ("b" * 200)
    long_dir.mkdir(parents=True)
    (long_dir / "from-long").write_text("long")
    assert len(str(long_dir)) > 255
    target = area / "mnt"
    target.mkdir()
    lowerdir = "lowerdir=" + ":".join(str(p) for p in [*layers, long_dir])
    assert len(lowerdir) > 4095
    apply_mounts([Mount("overlay", "overlay", (lowerdir, "ro"))], target)
    assert (target / "from-long").read_text() == "long"
    _write_fails_erofs(target / "x")


def test_too_many_layers_reports_the_kernel_message(area: Path) -> None:
    need_kernel(overlay_lowerdir_plus(), LOWERDIR_PLUS)
    layers = _layers(area / "layers", 501, 20)
    target = area / "mnt"
    target.mkdir()
    lowerdir = "lowerdir=" + ":".join(str(p) for p in layers)
    with pytest.raises(OSError) as e:
        apply_mounts([Mount("overlay", "overlay", (lowerdir,))], target)
    assert e.value.errno == errno.EINVAL
    assert "lower" in str(e.value)  # "overlay: too many lower directories, limit is 500"
    assert not is_mountpoint(target)


def test_overlay_beyond_a_page_without_lowerdir_plus_is_compacted(
    area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Linux 6.8 the new mount API refuses lowerdir+, as mount_fs does here.

    Layers that share a directory then mount with paths relative to it
    from a helper process, as containerd does, within mount(2)'s one page.
    """

    def refuse(fstype: str, *rest: Any) -> None:
        raise OSError(errno.EINVAL, "fsconfig lowerdir+: Invalid argument (as on Linux 6.1)")

    monkeypatch.setattr(fsmount, "mount_fs", refuse)
    monkeypatch.setattr(fsmount, "overlay_lowerdir_plus", lambda: False)
    layers = _layers(area / "layers", 200, 12)
    upper, work, target = _mkdirs(area, "upper", "work", "mnt")
    opts = ("lowerdir=" + ":".join(str(p) for p in layers), f"upperdir={upper}", f"workdir={work}")
    assert len(",".join(opts)) > 4095
    apply_mounts([Mount("overlay", "overlay", opts)], target)
    try:
        assert (target / "deepest").read_text() == "bottom layer"
        assert (target / "shared").read_text() == "0"
        assert len(os.listdir(target)) == 200 + 2
        (target / "new").write_text("rw")
        assert (upper / "new").exists()
    finally:
        unmount(target)
    monkeypatch.setattr(fsmount, "overlay_lowerdir_plus", lambda: True)
    with pytest.raises(OSError, match=r"as on Linux 6\.1"):
        apply_mounts([Mount("overlay", "overlay", opts)], target)  # the probe decides


def test_sub_mounts_and_rollback(area: Path) -> None:
    rootfs, vol, target = _mkdirs(area, "rootfs", "vol", "mnt")
    (rootfs / "data").mkdir()
    (vol / "v").write_text("volume")
    mounts = [
        Mount("bind", str(rootfs), ("rbind", "rw")),
        Mount("bind", str(vol), ("rbind", "ro", "nosuid"), target="/data"),
    ]
    apply_mounts(mounts, target)
    assert (target / "data" / "v").read_text() == "volume"
    _write_fails_erofs(target / "data" / "w")
    (target / "rw-root").write_text("ok")
    assert os.statvfs(target / "data").f_flag & os.ST_NOSUID
    assert unmount_all_under(target) == [target / "data", target]

    broken = [mounts[0], Mount("bind", str(area / "missing"), ("rbind",), target="data")]
    with pytest.raises(FileNotFoundError):
        apply_mounts(broken, target)
    assert not is_mountpoint(target)  # the first mount was taken off again

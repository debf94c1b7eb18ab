"""Mount option words, overlay escapes, mountinfo parsing; mount table queries (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratasnap.fs import mount as mnt
from stratasnap.fs import mountopts as mo
from stratasnap.fs.mountinfo import (
    escape_field,
    mountpoints_below,
    parse_mountinfo,
    read_mountinfo,
    unescape_field,
)


def test_flags_apply_in_order() -> None:
    o = mo.parse_options(["ro", "nosuid", "rw", "nodev", "noexec", "relatime"])
    assert o.flags == mo.MS_NOSUID | mo.MS_NODEV | mo.MS_NOEXEC | mo.MS_RELATIME
    assert mo.parse_options(["rw", "ro"]).flags == mo.MS_RDONLY
    assert mo.parse_options(["rbind", "ro"]).flags == mo.MS_BIND | mo.MS_REC | mo.MS_RDONLY
    assert mo.parse_options(["noatime", "atime"]).flags == 0
    assert mo.parse_options(["defaults"]).flags == 0


def test_data_propagation_loop_and_userspace_words() -> None:
    words = ["loop", "rprivate", "lowerdir=/a:/b", "userxattr", "X-containerd.mkfs.fs=ext4"]
    o = mo.parse_options([*words, "x-y", "ro"])
    assert o.loop
    assert o.propagation == mo.MS_PRIVATE | mo.MS_REC
    assert o.data == ("lowerdir=/a:/b", "userxattr")
    assert o.data_string == "lowerdir=/a:/b,userxattr"
    assert o.flags == mo.MS_RDONLY


def test_split_escaped_and_unescape() -> None:
    assert mo.split_escaped(r"a:b\:c::d", ":") == ["a", r"b\:c", "", "d"]
    assert mo.split_escaped(r"x=1,y=a\,b,z", ",") == ["x=1", r"y=a\,b", "z"]
    assert mo.split_escaped(r"a\\:b", ":") == [r"a\\", "b"]  # escaped backslash, then a colon
    assert mo.split_escaped("", ":") == [""]
    assert mo.unescape(r"b\:c\\d\,e") == r"b:c\d,e"


SAMPLE = (
    b"22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"36 22 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - "
    b"ext3 /dev/root rw,errors=continue\n"
    b"37 36 0:30 / /mnt/tab\\011and\\134backslash ro - overlay overlay rw,lowerdir=/a:/b\n"
    b"38 22 0:31 / /odd\\377name rw - tmpfs tmpfs rw\n"
    b"garbage line\n"
)


def test_parse_mountinfo_unescapes() -> None:
    infos = parse_mountinfo(SAMPLE)
    assert [i.mountpoint for i in infos] == [
        Path("/"),
        Path("/mnt/with space"),
        Path("/mnt/tab\tand\\backslash"),
        Path("/odd\udcffname"),  # an undecodable byte survives as os does it
    ]
    assert infos[1].root == "/mnt1" and infos[1].fstype == "ext3"
    assert infos[1].source == "/dev/root" and infos[1].super_options == "rw,errors=continue"
    assert infos[2].options == "ro" and infos[2].parent_id == 36


def test_read_mountinfo_has_root() -> None:
    assert any(m.mountpoint == Path("/") for m in read_mountinfo())


def _line(i: int, point: bytes) -> bytes:
    return b"%d 1 0:%d / %s rw - tmpfs tmpfs rw\n" % (i, i, point)


def test_mounts_under_deepest_and_latest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    points = [
        b"/",
        b"/nonexistent-x",
        b"/nonexistent-x/a",
        b"/nonexistent-x/a/b/c",
        b"/nonexistent-xy",  # a sibling with the same prefix: not under
        b"/nonexistent-x/a",  # stacked on top of 3
        b"/nonexistent-x/z",
    ]
    table = b"".join(_line(i, p) for i, p in enumerate(points, 1))
    monkeypatch.setattr(mnt, "read_mountinfo_bytes", lambda: table)
    got = mnt.mounts_under("/nonexistent-x")
    assert got[0] == Path("/nonexistent-x/a/b/c")
    assert got[-1] == Path("/nonexistent-x")
    assert got.count(Path("/nonexistent-x/a")) == 2
    assert Path("/nonexistent-xy") not in got
    assert len(got) == 5
    assert len(mnt.mounts_under("/")) == len(points)
    assert mnt.mounts_under("/nonexistent-q") == []


@pytest.mark.parametrize("name", ["with space", "tab\there", "back\\slash", "new\nline", "ü"])
def test_escape_field_is_what_the_kernel_writes(name: str) -> None:
    assert unescape_field(escape_field(f"/mnt/{name}")) == f"/mnt/{name}"
    assert not set(escape_field(name)) & set(b" \t\n")


def test_mountpoints_below_finds_escaped_paths_and_skips_lookalikes() -> None:
    # The substring pre-check must match the kernel's escaped spelling, and a
    # look-alike elsewhere on a line (a bind's root, a source) must not be taken
    # for a mount point.
    lookalike = b"40 22 0:40 /mnt/with\\040space /elsewhere rw - tmpfs /mnt/with\\040space rw\n"
    table = SAMPLE + lookalike
    assert mountpoints_below(table, "/mnt/with space") == [(1, Path("/mnt/with space"))]
    assert mountpoints_below(table, "/mnt/tab\tand\\backslash") == [
        (2, Path("/mnt/tab\tand\\backslash"))
    ]
    assert mountpoints_below(table, "/mnt/with") == []
    assert mountpoints_below(table, "/mnt") == [
        (1, Path("/mnt/with space")),
        (2, Path("/mnt/tab\tand\\backslash")),
    ]
    assert mountpoints_below(table, "/elsewhere/below") == []


def test_is_mountpoint_unprivileged(tmp_path: Path) -> None:
    assert mnt.is_mountpoint("/")
    assert mnt.is_mountpoint("/proc")
    assert not mnt.is_mountpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        mnt.is_mountpoint(tmp_path / "missing")


def test_sub_mount_targets_stay_inside(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "escape").symlink_to("/tmp")
    assert mnt._mount_point(tmp_path, "") == tmp_path
    assert mnt._mount_point(tmp_path, "/etc") == Path(tmp_path.resolve(), "etc")
    with pytest.raises(ValueError):
        mnt._mount_point(tmp_path, "../outside")
    with pytest.raises(ValueError):
        mnt._mount_point(tmp_path, "escape/x")

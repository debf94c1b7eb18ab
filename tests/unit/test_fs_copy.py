"""copy_tree / copy_file on a scratch directory (no root needed)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, need, need_kernel, user_xattrs_work

from stratasnap.fs import _data
from stratasnap.fs.copy import (
    copy_file,
    copy_file_atomic,
    copy_tree,
    reflink_supported,
)
from stratasnap.fs.manifest import manifest

MiB = 1 << 20


def _set_times(path: Path, mtime_ns: int, atime_ns: int) -> None:
    os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)


def make_tree(root: Path) -> None:
    """A tree with one of everything an unprivileged user can make."""
    root.mkdir()
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "file").write_bytes(b"hello\n")
    (root / "empty").touch()
    (root / "dir" / "sub" / "deep").write_bytes(os.urandom(70_000))
    (root / "big").write_bytes(os.urandom(3 * MiB + 17))
    os.chmod(root / "file", 0o640)
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "readonly-dir").mkdir()
    (root / "readonly-dir" / "inside").write_bytes(b"x")
    # hard links: three names, in different directories
    (root / "dir" / "linked").write_bytes(b"linked data")
    os.link(root / "dir" / "linked", root / "link2")
    os.link(root / "dir" / "linked", root / "dir" / "sub" / "link3")
    # symlinks: relative, absolute, dangling; and a hard-linked symlink
    os.symlink("file", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("nowhere/at/all", root / "dangling")
    os.link(root / "rel-link", root / "rel-link-hard", follow_symlinks=False)
    os.mkfifo(root / "fifo", 0o620)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    # explicit times with nanoseconds
    now = time.time_ns()
    for i, p in enumerate(sorted(root.rglob("*"))):
        _set_times(p, now - 10**11 + i * 1_000 + 123, now - 10**10 + i * 1_000 + 456)
    os.chmod(root / "readonly-dir", 0o555)
    _set_times(root, now - 10**12 + 7, now - 10**10 + 9)


def test_copy_tree_reproduces_everything(scratch: Path) -> None:
    src, dst = scratch / "src", scratch / "dst"
    make_tree(src)
    # atimes first, before reading the trees moves them (relatime: atime < ctime)
    atimes = {rel: os.lstat(src / rel).st_atime_ns for rel in ("file", "rel-link", "dir", ".")}
    stats = copy_tree(src, dst)
    assert {rel: os.lstat(dst / rel).st_atime_ns for rel in atimes} == atimes
    want, got = manifest(src), manifest(dst)
    assert got == want
    # spot checks of what the manifest compares
    assert got["setuid"].mode == 0o4755
    assert got["sticky"].mode == 0o1777
    assert got["readonly-dir"].mode == 0o555
    assert got["link2"].link_group == got["dir/linked"].link_group == "dir/linked"
    assert got["rel-link-hard"].link_group == "rel-link"
    assert got["fifo"].kind == "fifo" and got["sock"].kind == "sock"
    assert os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns
    assert stats.hardlinks == 3 and stats.symlinks == 3 and stats.specials == 2


def test_copy_tree_copies_user_xattrs(scratch: Path, tmp_path: Path) -> None:
    # tmpfs has user xattrs since Linux 6.6; before that, tmp_path's filesystem.
    base = next((d for d in (scratch, tmp_path) if user_xattrs_work(d)), None)
    need_kernel(base is not None, "user xattrs on tmpfs (Linux 6.6) and on tmp_path")
    assert base is not None
    src, dst = base / "src", base / "dst"
    make_tree(src)
    os.setxattr(src / "file", "user.one", b"1")
    os.setxattr(src / "dir", "user.dir", b"\x00binary\xff")
    copy_tree(src, dst)
    assert manifest(dst) == manifest(src)
    assert os.getxattr(dst / "file", "user.one") == b"1"
    assert os.getxattr(dst / "dir", "user.dir") == b"\x00binary\xff"


def test_whiteout_device_is_copied(scratch: Path) -> None:
    src = scratch / "src"
    src.mkdir()
    try:
        os.mknod(src / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    except PermissionError:
        need(IS_ROOT, "this kernel does not let unprivileged users make 0/0 whiteouts")
        raise
    copy_tree(src, scratch / "dst")
    st = os.lstat(scratch / "dst" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_into_existing_empty_dir_sets_its_metadata(scratch: Path) -> None:
    src, dst = scratch / "src", scratch / "dst"
    src.mkdir()
    (src / "f").write_text("x")
    os.chmod(src, 0o710)
    os.utime(src, ns=(5_000_000_123, 6_000_000_456))
    dst.mkdir(mode=0o777)
    copy_tree(src, dst)
    st = os.stat(dst)
    assert stat.S_IMODE(st.st_mode) == 0o710
    assert st.st_mtime_ns == 6_000_000_456
    assert (dst / "f").read_text() == "x"


def test_refuses_bad_destinations(scratch: Path) -> None:
    src = scratch / "src"
    src.mkdir()
    (src / "f").touch()
    full = scratch / "full"
    full.mkdir()
    (full / "x").touch()
    with pytest.raises(OSError) as e:
        copy_tree(src, full)
    assert e.value.errno == errno.ENOTEMPTY
    (scratch / "afile").touch()
    with pytest.raises(FileExistsError):
        copy_tree(src, scratch / "afile")
    with pytest.raises(OSError) as e:
        copy_tree(src, src / "inside")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(NotADirectoryError):
        copy_tree(src / "f", scratch / "nope")
    with pytest.raises(FileNotFoundError):
        copy_tree(scratch / "missing", scratch / "nope")


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def _write_sparse(p: Path, size: int, chunks: dict[int, bytes]) -> None:
    with open(p, "wb") as f:
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
        f.truncate(size)


def test_sparse_files_keep_their_holes(scratch: Path) -> None:
    src = scratch / "src"
    src.mkdir()
    _write_sparse(src / "holey", 64 * MiB, {5 * MiB: b"a" * 5000, 40 * MiB: os.urandom(MiB)})
    _write_sparse(src / "hole-first", 16 * MiB, {15 * MiB: b"tail"})
    _write_sparse(src / "all-hole", 32 * MiB, {})
    need(_allocated(src / "holey") < 64 * MiB, "the scratch filesystem does not keep holes")
    copy_tree(src, scratch / "dst")
    for name in ("holey", "hole-first", "all-hole"):
        a, b = src / name, scratch / "dst" / name
        assert b.read_bytes() == a.read_bytes(), name
        assert os.stat(b).st_size == os.stat(a).st_size
        # allowed slack: the copier may round an extent to whole pages
        assert _allocated(b) <= _allocated(a) + 64 * 1024, name
    assert _allocated(scratch / "dst" / "all-hole") == 0


def test_reflink_failure_is_remembered_per_copy(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = scratch / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(b"data %d" % i)
    calls = []
    real_ioctl = fcntl.ioctl

    def counting_ioctl(fd: int, req: int, arg: int = 0) -> object:
        calls.append(req)
        if req == _data.FICLONE:
            raise OSError(errno.EOPNOTSUPP, "no reflink")
        return real_ioctl(fd, req, arg)

    monkeypatch.setattr(fcntl, "ioctl", counting_ioctl)
    stats = copy_tree(src, scratch / "dst")
    assert calls.count(_data.FICLONE) == 1
    assert stats.reflinked == 0 and stats.files == 20
    assert manifest(scratch / "dst") == manifest(src)


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EINVAL])
def test_read_write_fallback(scratch: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    src = scratch / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 * MiB + 5))
    _write_sparse(src / "sparse", 32 * MiB, {20 * MiB: b"z" * 10})
    calls = []

    def refuse(*args: object) -> int:
        calls.append(args)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    stats = copy_tree(src, scratch / "dst")
    assert len(calls) == 1  # remembered, not retried per extent
    assert manifest(scratch / "dst") == manifest(src)
    assert stats.bytes_copied == 3 * MiB + 5 + 4096  # extents come in whole pages


def test_other_copy_errors_propagate(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = scratch / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 100)

    def broken(*args: object) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(OSError) as e:
        copy_tree(src, scratch / "dst")
    assert e.value.errno == errno.EIO


def test_xattr_enotsup_and_eperm_are_skipped_others_raise(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = scratch / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    fake = {"user.a": b"1", "security.refused": b"2", "trusted.nope": b"3"}
    monkeypatch.setattr(os, "listxattr", lambda *a, **k: list(fake))
    monkeypatch.setattr(os, "getxattr", lambda t, n, **k: fake[n])
    written: list[str] = []

    def setxattr(target: object, name: str, value: bytes, *a: object, **k: object) -> None:
        if name == "security.refused":
            raise OSError(errno.EPERM, "not allowed")
        if name == "trusted.nope":
            raise OSError(errno.ENOTSUP, "not supported")
        written.append(name)

    monkeypatch.setattr(os, "setxattr", setxattr)
    stats = copy_tree(src, scratch / "dst")
    assert stats.xattrs_skipped == 4  # two refused, on the root dir and on f
    assert written == ["user.a", "user.a"]

    def failing(target: object, name: str, value: bytes, *a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "no space")

    monkeypatch.setattr(os, "setxattr", failing)
    with pytest.raises(OSError) as e:
        copy_tree(src, scratch / "dst2")
    assert e.value.errno == errno.ENOSPC


def test_copy_file_keeps_data_metadata_and_holes(scratch: Path) -> None:
    src = scratch / "image"
    _write_sparse(src, 128 * MiB, {MiB: b"superblock", 100 * MiB: os.urandom(4096)})
    os.chmod(src, 0o604)
    os.utime(src, ns=(1_000_000_001, 2_000_000_002))
    stats = copy_file(src, scratch / "copy")
    out = scratch / "copy"
    assert out.read_bytes() == src.read_bytes()
    st = os.stat(out)
    assert stat.S_IMODE(st.st_mode) == 0o604 and st.st_mtime_ns == 2_000_000_002
    assert _allocated(out) <= _allocated(src) + 64 * 1024
    assert stats.files == 1
    with pytest.raises(FileExistsError):
        copy_file(src, out)


def test_copy_file_atomic(scratch: Path) -> None:
    src = scratch / "a"
    src.write_bytes(b"first")
    dst = scratch / "b"
    copy_file_atomic(src, dst)
    assert dst.read_bytes() == b"first"
    src.write_bytes(b"second")
    with pytest.raises(FileExistsError):
        copy_file_atomic(src, dst)
    assert dst.read_bytes() == b"first"
    copy_file_atomic(src, dst, replace=True)
    assert dst.read_bytes() == b"second"
    long_name = scratch / ("n" * 255)
    copy_file_atomic(src, long_name)
    assert long_name.read_bytes() == b"second"
    assert sorted(p.name for p in scratch.iterdir()) == ["a", "b", "n" * 255]


def test_interrupted_copy_file_atomic_leaves_nothing(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = scratch / "a"
    src.write_bytes(os.urandom(MiB))
    before = sorted(scratch.iterdir())

    def interrupt(self: object, *args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_data.DataCopier, "copy", interrupt)
    with pytest.raises(KeyboardInterrupt):
        copy_file_atomic(src, scratch / "b")
    assert sorted(scratch.iterdir()) == before
    monkeypatch.undo()

    # interrupted after the data is complete, at the rename
    monkeypatch.setattr("stratasnap.fs.copy._rename_noreplace", lambda a, b: interrupt(None))
    with pytest.raises(KeyboardInterrupt):
        copy_file_atomic(src, scratch / "b")
    assert sorted(scratch.iterdir()) == before


def test_reflink_supported_on_scratch_leaves_nothing(scratch: Path) -> None:
    # tmpfs and ext4 cannot clone; xfs/btrfs answer True in test_fs_copy_root.
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", str(scratch)], capture_output=True, text=True, check=True
    ).stdout.strip()
    need(kind in ("tmpfs", "ext2/ext3"), f"scratch on {kind}, whose reflink answer is not known")
    assert reflink_supported(scratch) is False
    assert list(scratch.iterdir()) == []


def test_deep_tree_needs_no_recursion(scratch: Path) -> None:
    src = scratch / "src"
    p = src
    for _ in range(300):  # deeper than fds or recursion would like if held per level
        p = p / "d"
    p.mkdir(parents=True)
    (p / "leaf").write_text("deep")
    copy_tree(src, scratch / "dst")
    assert (scratch / "dst" / p.relative_to(src) / "leaf").read_text() == "deep"

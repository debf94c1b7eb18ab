"""disk_usage against du, flush_tree and syncfs (no root needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stratasnap.fs import usage
from stratasnap.fs.usage import disk_usage, flush_tree, syncfs
from stratasnap.types import Usage


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def unique_inodes(path: Path) -> int:
    """`find | wc -l`, counting each hard-linked inode once."""
    seen = {(os.lstat(path).st_dev, os.lstat(path).st_ino)}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            seen.add((st.st_dev, st.st_ino))
    return len(seen)


def make_tree(root: Path) -> None:
    root.mkdir()
    for d in range(12):
        sub = root / f"d{d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(25):
            (sub / f"f{f}").write_bytes(b"x" * (f * 1500))
    (root / "big").write_bytes(os.urandom(1 << 20))
    with open(root / "sparse", "wb") as fh:
        fh.seek(50 << 20)
        fh.write(b"end")
    for i in range(5):
        os.link(root / "big", root / f"d{i}" / "big-link")
    os.symlink("big", root / "symlink")
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "fifo")
    (root / "empty-dir").mkdir()


def test_matches_du_and_find(scratch: Path) -> None:
    root = scratch / "tree"
    make_tree(root)
    got = disk_usage(root)
    assert got == Usage(size=du_bytes(root), inodes=unique_inodes(root))
    # 1 root + 24 dirs + 300 files + big + sparse + 2 symlinks + fifo + empty-dir
    assert got.inodes == 1 + 24 + 300 + 1 + 1 + 2 + 1 + 1


def test_hard_links_count_once(scratch: Path) -> None:
    root = scratch / "t"
    root.mkdir()
    (root / "a").write_bytes(os.urandom(64 * 1024))
    before = disk_usage(root)
    for i in range(10):
        os.link(root / "a", root / f"l{i}")
    assert disk_usage(root) == before


def test_sparse_counts_allocated_not_apparent(scratch: Path) -> None:
    root = scratch / "t"
    root.mkdir()
    with open(root / "s", "wb") as fh:
        fh.truncate(1 << 30)
    got = disk_usage(root)
    assert got.size < 1 << 20
    assert got.size == du_bytes(root)


def test_file_root_and_missing_root(scratch: Path) -> None:
    (scratch / "f").write_bytes(b"x" * 10_000)
    got = disk_usage(scratch / "f")
    assert got.inodes == 1 and got.size == os.stat(scratch / "f").st_blocks * 512
    with pytest.raises(FileNotFoundError):
        disk_usage(scratch / "missing")


def test_empty_dir(scratch: Path) -> None:
    assert disk_usage(scratch) == Usage(size=du_bytes(scratch), inodes=1)


def test_big_tree_against_du(scratch: Path) -> None:
    root = scratch / "big"
    root.mkdir()
    for d in range(50):
        sub = root / f"{d:02d}"
        sub.mkdir()
        for f in range(100):
            (sub / str(f)).write_bytes(b"y" * ((d * f) % 9000))
    assert disk_usage(root) == Usage(size=du_bytes(root), inodes=1 + 50 + 5000)


def test_flush_tree_small_fsyncs_each(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = scratch / "t"
    (root / "sub").mkdir(parents=True)
    (root / "a").write_text("a")
    (root / "sub" / "b").write_text("b")
    os.symlink("a", root / "link")
    os.mkfifo(root / "fifo")  # opening it would block: must be skipped
    synced: list[str] = []
    real = usage.fsync_path

    def spy(path: str) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(usage, "fsync_path", spy)
    monkeypatch.setattr(usage, "syncfs", lambda p: pytest.fail("syncfs on a small tree"))
    os.link(root / "a", root / "sub" / "a-link")  # one inode, one fsync
    got = flush_tree(root)
    rel = [os.path.relpath(p, root) for p in synced]
    assert sorted(rel[:2]) in (["a", "sub/b"], ["sub/a-link", "sub/b"])  # files first
    assert rel[2:] == ["sub", "."]  # then directories, deepest first
    assert got == disk_usage(root)  # the same walk measured the tree


def test_flush_tree_counts_directories_towards_the_limit(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Empty directories need an fsync each too: many of them are a syncfs.
    root = scratch / "t"
    for i in range(6):
        (root / f"d{i}").mkdir(parents=True)
    calls: list[object] = []
    monkeypatch.setattr(usage, "syncfs", calls.append)
    monkeypatch.setattr(usage, "fsync_path", lambda p: pytest.fail("fsync per directory"))
    assert flush_tree(root, fsync_limit=5) == disk_usage(root)
    assert calls == [str(root)]


def test_flush_tree_large_uses_syncfs(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = scratch / "t"
    root.mkdir()
    for i in range(10):
        (root / str(i)).write_text("x")
    calls: list[object] = []
    monkeypatch.setattr(usage, "syncfs", calls.append)
    monkeypatch.setattr(usage, "fsync_path", lambda p: pytest.fail("fsync per file"))
    assert flush_tree(root, fsync_limit=5) == disk_usage(root)
    assert calls == [str(root)]


def test_flush_tree_of_a_file_and_syncfs(scratch: Path) -> None:
    (scratch / "f").write_text("x")
    flush_tree(scratch / "f")
    syncfs(scratch)
    with pytest.raises(FileNotFoundError):
        syncfs(scratch / "missing")

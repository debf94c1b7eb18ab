"""disk_usage against du, walk_tree and syncfs (no root needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stratasnap.fs.usage import disk_usage, syncfs, walk_tree
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


def test_syncfs(scratch: Path) -> None:
    (scratch / "f").write_text("x")
    syncfs(scratch)
    with pytest.raises(FileNotFoundError):
        syncfs(scratch / "missing")


def test_walk_tree_lists_files_then_directories_deepest_first(scratch: Path) -> None:
    root = scratch / "t"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a").write_text("a")
    (root / "sub" / "deeper" / "b").write_text("b")
    os.link(root / "a", root / "sub" / "a-link")  # one inode: listed once
    os.mkfifo(root / "fifo")  # not a regular file: not listed
    tree = walk_tree(root, 10)
    assert tree.usage == disk_usage(root)
    assert tree.one_device
    assert tree.files is not None
    assert len(tree.files) == 2
    assert tree.dirs == [str(root / "sub" / "deeper"), str(root / "sub"), str(root)]
    assert walk_tree(root, 4).files is None  # 2 files + 3 directories: over the limit

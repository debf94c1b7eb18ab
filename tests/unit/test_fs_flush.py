"""flush_tree: which syncs make a tree durable where (no root needed: tmpfs or tmp).

On ext4 with a journal (a loop filesystem, as root) see
tests/privileged/test_commit_durable_order.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stratasnap.fs import flush
from stratasnap.fs.flush import JournalCommit, flush_tree, journal_commit
from stratasnap.fs.usage import disk_usage, fsync_path


def test_flush_tree_small_fsyncs_each(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = scratch / "t"
    (root / "sub").mkdir(parents=True)
    (root / "a").write_text("a")
    (root / "sub" / "b").write_text("b")
    os.symlink("a", root / "link")
    os.mkfifo(root / "fifo")  # opening it would block: must be skipped
    synced: list[str] = []
    real = fsync_path

    def spy(path: str) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(flush, "fsync_path", spy)
    monkeypatch.setattr(flush, "syncfs", lambda p: pytest.fail("syncfs on a small tree"))
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
    monkeypatch.setattr(flush, "syncfs", calls.append)
    monkeypatch.setattr(flush, "fsync_path", lambda p: pytest.fail("fsync per directory"))
    assert flush_tree(root, fsync_limit=5) == disk_usage(root)
    assert calls == [str(root)]


def test_flush_tree_large_uses_syncfs(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = scratch / "t"
    root.mkdir()
    for i in range(10):
        (root / str(i)).write_text("x")
    calls: list[object] = []
    monkeypatch.setattr(flush, "syncfs", calls.append)
    monkeypatch.setattr(flush, "fsync_path", lambda p: pytest.fail("fsync per file"))
    assert flush_tree(root, fsync_limit=5) == disk_usage(root)
    assert calls == [str(root)]


def test_flush_tree_of_a_file(scratch: Path) -> None:
    (scratch / "f").write_text("x")
    assert flush_tree(scratch / "f") == disk_usage(scratch / "f")


def test_no_journal_commit_off_ext4(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tmpfs (or whatever holds tmp): never the journal path, even when a caller says so.
    assert journal_commit(scratch) is None
    root = scratch / "t"
    root.mkdir()
    (root / "a").write_text("a")
    monkeypatch.setattr(flush, "_writeback_then_commit", lambda *a: pytest.fail("journal path"))
    elsewhere = JournalCommit(os.stat(scratch).st_dev + 1, str(scratch))
    assert flush_tree(root, elsewhere) == disk_usage(root)

"""Commit's durable order, read from the syscalls a real commit makes, per filesystem.

A commit must not be durable before the layer's data and entries are
(containerd#5854): whatever flushes the layer comes before the fdatasync of
SQLite's log, which is the commit. Which flush depends on the filesystem
(see stratasnap.fs.flush): on ext4 with a journal, writeback of every file
(sync_file_range), waited for, then a change of the times of ``snapshots/``
(a transaction is running) and an fsync of the layer's directory (which
commits it, with a device flush), whatever the layer's size; elsewhere an
fsync of each file and directory for a small layer, a syncfs for a bigger
one. A child process is traced with strace.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need, need_root

from stratasnap.fs.durable import journal_commit_covers_written_back_data
from stratasnap.fs.flush import FSYNC_LIMIT, journal_commit

SYSCALL = re.compile(r"^\d+ +(\w+)\((\d+)<([^>]+)>(.*)\) += 0$")
UTIME = re.compile(r'^\d+ +(utimensat)\(AT_FDCWD(?:<[^>]*>)?, "([^"]+)"(.*)\) += 0$')

CHILD = textwrap.dedent(
    """
    import json, sys
    from stratasnap import open_snapshotter

    layers = {}
    with open_snapshotter(sys.argv[1], "overlay") as sn:
        for name, files in (("small", 3), ("large", int(sys.argv[2]))):
            [m] = sn.prepare(name + "-a")
            for i in range(files):
                with open(f"{m.source}/f{i}", "wb") as f:
                    f.write(b"x" * 65536)  # dirty in the page cache at commit
            sn.commit(name, name + "-a")
            layers[name] = m.source
    print(json.dumps(layers))
    """
)


def traced_commits(root: Path, out: Path) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """(layer name -> its fs dir, [(syscall, path, rest)]) of a child's two commits."""
    strace = shutil.which("strace")
    need(strace is not None, "strace not installed (apt-get install strace)")
    assert strace is not None
    large = str(FSYNC_LIMIT + 4)
    done = subprocess.run(
        [
            *(strace, "-f", "-qq", "-y", "-o", str(out)),
            *("-e", "trace=sync_file_range,fsync,fdatasync,syncfs,utimensat"),
            *(sys.executable, "-c", CHILD, str(root), large),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    calls: list[tuple[str, str, str]] = []
    for line in out.read_text().splitlines():
        if m := SYSCALL.match(line):
            calls.append((m.group(1), m.group(3), m.group(4)))
        elif u := UTIME.match(line):
            calls.append((u.group(1), u.group(2), u.group(3)))
    return json.loads(done.stdout), calls


def _fs_with(loopfs: Callable[..., Path], kind: str) -> Path:
    if kind == "ext4":
        return loopfs("ext4", size="1G")
    if kind == "ext4-nojournal":
        return loopfs("ext4", size="1G", mkfs_args=("-O", "^has_journal"))
    if kind == "ext4-data-journal":
        mnt = loopfs("ext4", size="1G")
        # The data mode cannot change on a remount: mount the image again.
        subprocess.run(["umount", str(mnt)], check=True)
        image = mnt.parent / "fs.img"
        subprocess.run(["mount", "-o", "loop,data=journal", str(image), str(mnt)], check=True)
        return mnt
    return loopfs("xfs", size="1G")


@pytest.mark.parametrize(
    ("kind", "one_commit"),
    [("ext4", True), ("ext4-nojournal", False), ("ext4-data-journal", False), ("xfs", False)],
)
def test_which_filesystems_take_one_journal_commit(
    kind: str, one_commit: bool, loopfs: Callable[..., Path]
) -> None:
    need_root()
    mnt = _fs_with(loopfs, kind)
    assert journal_commit_covers_written_back_data(mnt) is one_commit
    assert (journal_commit(mnt) is not None) is one_commit


@pytest.mark.parametrize(
    ("kind", "one_commit"),
    [("ext4", True), ("ext4-nojournal", False), ("ext4-data-journal", False)],
)
def test_commit_flushes_the_layer_before_the_store_commits(
    kind: str, one_commit: bool, loopfs: Callable[..., Path], tmp_path: Path
) -> None:
    need_root()
    mnt = _fs_with(loopfs, kind)
    root = mnt / "root"
    layers, calls = traced_commits(root, tmp_path / "strace.out")
    wal = f"{root / 'metadata.db'}-wal"
    snapshots = str(root / "snapshots")
    for name, fs in layers.items():
        files = {str(p) for p in Path(fs).iterdir()}
        mine = [i for i, (_, path, _) in enumerate(calls) if path == fs or path in files]
        assert mine, f"{name}: nothing of the layer was synced"
        # The store commits (its log is synced) after the layer's last sync.
        commit = next(i for i, (_, path, _) in enumerate(calls) if i > mine[-1] and path == wal)
        assert not any(path == wal for _, path, _ in calls[mine[0] : mine[-1]])
        flushed = [calls[i] for i in mine]
        syncfs = [i for i, (call, _, _) in enumerate(calls) if call == "syncfs" and i < commit]
        if one_commit:
            # Whatever the size: every file written back and waited for, then the
            # anchor's change, then the journal's commit (the directory's fsync).
            ranges = [i for i in mine if calls[i][0] == "sync_file_range"]
            started = {
                calls[i][1] for i in ranges if calls[i][2].endswith(" SYNC_FILE_RANGE_WRITE")
            }
            waited = [i for i in ranges if "WAIT_AFTER" in calls[i][2]]
            assert started == files and {calls[i][1] for i in waited} == files
            [journal] = [i for i in mine if calls[i][:2] == ("fsync", fs)]
            anchors = [i for i, c in enumerate(calls) if c[:2] == ("utimensat", snapshots)]
            assert any(max(waited) < i < journal for i in anchors)
            assert journal < commit
            assert [c for c, _, _ in flushed if c != "sync_file_range"] == ["fsync"]
            assert not syncfs, "a syncfs writes back everyone's data"
        elif name == "small":
            fsynced = {path for call, path, _ in flushed if call == "fsync"}
            assert fsynced == files | {fs}
        else:
            # Over FSYNC_LIMIT: one syncfs (through the layer's directory), no fsync each.
            assert [call for call, _, _ in flushed] == ["syncfs"]

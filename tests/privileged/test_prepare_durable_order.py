"""Prepare's and commit's durable order, read from the syscalls they make on ext4 and xfs.

A power loss keeps what was flushed and may drop the rest. The store must
never hold a snapshot whose storage a power loss can take back for good.

Where the filesystem orders its metadata (ext4 with a journal, xfs; see
``stratasnap.fs.durable``) a prepare renames ``new-<id>`` to ``<id>`` and then
syncs SQLite's log, which is the commit, with no fsync of ``snapshots/`` or
``new-<id>`` at all: a power loss that takes the rename back takes everything
written below it with it, and the next open rebuilds the storage (tested in
test_rebuild_lost_storage.py). A commit then fsyncs ``<id>`` before its log
sync: a committed layer cannot be rebuilt.

Elsewhere (here: ext4 without a journal) a prepare fsyncs ``new-<id>`` (its
``fs/``, ``work/`` entries) before the rename and ``snapshots/`` between the
rename and the log sync (an fdatasync of the log alone does not commit the
filesystem's journal, so the rename would not ride along). The test traces a
child process with strace and checks that order.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need, need_root

from stratasnap.fs.durable import later_fsync_covers_new_names, parent_sync_covers_new_entries

RENAME = re.compile(r'^\d+ +rename(?:at2?)?\(.*?"([^"]+)",.*?"([^"]+)".*= 0$')
SYNC = re.compile(r"^\d+ +(fsync|fdatasync)\(\d+<([^>]+)>\) += 0$")

CHILD = textwrap.dedent(
    """
    import sys
    from stratasnap import open_snapshotter

    with open_snapshotter(sys.argv[1], sys.argv[2]) as sn:
        sn.prepare("layer-a")
        sn.commit("layer", "layer-a")
        sn.prepare("ctr", "layer")
        sn.view("ro", "layer")
    """
)


def traced_prepares(root: Path, backend: str, out: Path) -> list[str]:
    strace = shutil.which("strace")
    need(strace is not None, "strace not installed (apt-get install strace)")
    assert strace is not None
    subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "-y",
            "-o",
            str(out),
            "-e",
            "trace=rename,renameat,renameat2,fsync,fdatasync",
            sys.executable,
            "-c",
            CHILD,
            str(root),
            backend,
        ],
        check=True,
    )
    return out.read_text().splitlines()


@pytest.mark.parametrize(
    ("backend", "fs_type", "mkfs_args", "lazy"),
    [
        ("native", "ext4", (), True),
        ("overlay", "ext4", (), True),
        ("overlay", "xfs", (), True),
        ("overlay", "ext4", ("-O", "^has_journal"), False),
    ],
)
def test_prepare_and_commit_order_their_storage_before_the_store_commits(
    backend: str,
    fs_type: str,
    mkfs_args: tuple[str, ...],
    lazy: bool,
    loopfs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    need_root()
    mnt = loopfs(fs_type, size="1G", mkfs_args=mkfs_args)
    assert later_fsync_covers_new_names(mnt) is lazy
    # Without a journal an fsync of snapshots/ does not cover new-<id>'s entries.
    children = not lazy and not parent_sync_covers_new_entries(mnt)
    assert children is (not lazy)
    root = mnt / "root"
    lines = traced_prepares(root, backend, tmp_path / "strace.out")
    snapshots = str(root / "snapshots")
    wal = f"{root / 'metadata.db'}-wal"
    creates = [
        (i, src, dst)
        for i, line in enumerate(lines)
        if (m := RENAME.match(line)) and Path(m.group(1)).name.startswith("new-")
        for src, dst in [m.groups()]
    ]
    assert len(creates) == 3, lines  # prepare, prepare, view
    syncs = [(j, m.group(2)) for j, line in enumerate(lines) if (m := SYNC.match(line))]
    for at, work, final in creates:
        assert Path(final).parent == Path(snapshots)
        before = {path for j, path in syncs if j < at}
        assert (work in before) is children, f"{work}: fsynced before its rename is {children}"
        commit = next(j for j, path in syncs if j > at and path == wal)
        between = {path for j, path in syncs if at < j < commit}
        assert (snapshots in between) is not lazy, (
            f"{snapshots} fsynced between the rename and the commit: {snapshots in between}"
        )
        assert final not in between  # the store's commit is the only flush of a create
    # The commit of the first layer ("layer-a" -> "layer"): <id> is made durable
    # before the log sync that records the commit, on every filesystem.
    first = creates[0][2]
    commit_at = next(j for j, path in syncs if j > creates[0][0] and path == wal)
    layer_commit = next(j for j, path in syncs if j > commit_at and path == wal)
    synced = {path for j, path in syncs if commit_at < j < layer_commit}
    if lazy:
        assert first in synced, f"{first} not fsynced before the commit's log sync"


@pytest.mark.parametrize(
    ("fs_type", "mkfs_args", "covers", "lazy"),
    [
        ("ext4", (), True, True),
        ("ext4", ("-O", "^has_journal"), False, False),
        ("xfs", (), True, True),
        # btrfs logs a directory's new entries with it, but a file's fsync does
        # not log an older renamed ancestor (nor across subvolumes).
        ("btrfs", (), True, False),
    ],
)
def test_which_filesystems_order_new_entries_before_a_parent_fsync(
    fs_type: str,
    mkfs_args: tuple[str, ...],
    covers: bool,
    lazy: bool,
    loopfs: Callable[..., Path],
) -> None:
    mnt = loopfs(fs_type, size="1G", mkfs_args=mkfs_args)
    assert parent_sync_covers_new_entries(mnt) is covers
    assert later_fsync_covers_new_names(mnt) is lazy

"""Prepare's durable order, read from the syscalls a real prepare makes on ext4.

A power loss keeps what was flushed and may drop the rest. For the store never
to hold a snapshot whose storage a power loss takes back, a prepare must make
its directory durable first: rename ``new-<id>`` to ``<id>``, fsync
``snapshots/`` (the rename), and only then sync SQLite's log, which is the
commit. (An fdatasync of the log alone does not commit the filesystem's
journal, so the rename would not ride along.) On ext4 without a journal the
fsync of ``snapshots/`` orders nothing else, so ``new-<id>`` (its ``fs/``,
``work/`` entries) is fsynced too, before the rename. The test traces a child
process with strace and checks that order.
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

from stratasnap.fs.durable import parent_sync_covers_new_entries

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
    ("backend", "mkfs_args", "children"),
    [
        ("native", (), False),
        ("overlay", (), False),
        ("overlay", ("-O", "^has_journal"), True),
    ],
)
def test_prepare_syncs_its_storage_before_the_store_commits(
    backend: str,
    mkfs_args: tuple[str, ...],
    children: bool,
    loopfs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    need_root()
    mnt = loopfs("ext4", size="1G", mkfs_args=mkfs_args)
    assert parent_sync_covers_new_entries(mnt) is not children
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
        assert snapshots in between, f"{snapshots} not fsynced between the rename and the commit"


@pytest.mark.parametrize(
    ("fs_type", "mkfs_args", "covers"),
    [("ext4", (), True), ("ext4", ("-O", "^has_journal"), False), ("xfs", (), True)],
)
def test_which_filesystems_order_new_entries_before_a_parent_fsync(
    fs_type: str, mkfs_args: tuple[str, ...], covers: bool, loopfs: Callable[..., Path]
) -> None:
    mnt = loopfs(fs_type, size="1G", mkfs_args=mkfs_args)
    assert parent_sync_covers_new_entries(mnt) is covers

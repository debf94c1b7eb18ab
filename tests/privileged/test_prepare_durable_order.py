"""Prepare's durable order, read from the syscalls a real prepare makes on ext4.

A power loss keeps what was flushed and may drop the rest. For the store never
to hold a snapshot whose storage a power loss takes back, a prepare must make
its directory durable first: rename ``new-<id>`` to ``<id>``, fsync ``<id>``
(its ``fs/``, ``work/`` entries) and ``snapshots/`` (the rename), and only
then sync SQLite's log, which is the commit. (A fdatasync of the log alone
does not commit the filesystem's journal, so the rename would not ride along.)
The test traces a child process with strace and checks that order.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import need, need_root

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


@pytest.mark.parametrize("backend", ["native", "overlay"])
def test_prepare_syncs_its_storage_before_the_store_commits(
    backend: str, loopfs: pytest.FixtureDef[Path], tmp_path: Path
) -> None:
    need_root()
    mnt = loopfs("ext4", size="1G")  # type: ignore[operator]
    root = mnt / "root"
    lines = traced_prepares(root, backend, tmp_path / "strace.out")
    snapshots = str(root / "snapshots")
    wal = f"{root / 'metadata.db'}-wal"
    creates = [
        (i, dst)
        for i, line in enumerate(lines)
        if (m := RENAME.match(line)) and Path(m.group(1)).name.startswith("new-")
        for dst in [m.group(2)]
    ]
    assert len(creates) == 3, lines  # prepare, prepare, view
    for at, final in creates:
        assert Path(final).parent == Path(snapshots)
        after = [
            (j, m.group(2)) for j, line in enumerate(lines[at:], at) if (m := SYNC.match(line))
        ]
        commit = next(j for j, path in after if path == wal)
        synced = {path for j, path in after if j < commit}
        assert final in synced, f"{final} not fsynced before the store's commit:\n" + "\n".join(
            lines[at : commit + 1]
        )
        assert snapshots in synced, f"{snapshots} not fsynced before the store's commit"

"""Scratch filesystems for benchmarks: a fresh loop filesystem (as root) or tmpfs.

The machine's root filesystem is pathologically slow at creating files, so a
benchmark that measured there would measure that, not us. Every benchmark
prints which filesystem it ran on.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_fs(fs_type: str = "ext4", size: str = "8G") -> Iterator[tuple[Path, str]]:
    """Yield (mount point, description). ``fs_type``: ext4, xfs, xfs-reflink, btrfs, tmpfs.

    Without root, falls back to a directory under $TMPDIR and says so.
    """
    base = Path(tempfile.mkdtemp(prefix=f"stratasnap-bench-{fs_type}-"))
    mnt = base / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        yield mnt, f"{base} (not root: no fresh filesystem)"
        shutil.rmtree(base, ignore_errors=True)
        return
    image = base / "fs.img"
    try:
        if fs_type == "tmpfs":
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True
            )
            desc = f"tmpfs ({size})"
        else:
            subprocess.run(["truncate", "-s", size, str(image)], check=True)
            mkfs = {
                # Inode tables and journal written now: by default ext4 zeroes them
                # from a kernel thread after the mount, disk writes that would land
                # in the first seconds of a measurement on a fresh filesystem.
                "ext4": [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                ],
                "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=0"],
                "xfs-reflink": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
                "btrfs": ["mkfs.btrfs", "-q", "-f"],
            }[fs_type]
            subprocess.run([*mkfs, str(image)], check=True)
            subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
            desc = f"fresh {fs_type} loop filesystem ({size})"
        yield mnt, desc
    finally:
        _unmount(mnt)
        if os.path.ismount(mnt):
            # Never rmtree through a live mount; leave it for the operator.
            print(f"warning: {mnt} is still mounted; left in place")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _unmount(mnt: Path) -> None:
    """Unmount ``mnt`` and everything below; retry while the kernel still holds it busy."""
    for _ in range(50):
        subprocess.run(["umount", "-R", str(mnt)], capture_output=True)
        if not os.path.ismount(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-R", "-l", str(mnt)], capture_output=True)


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def drop_caches() -> None:
    """Write back dirty data so one measurement does not pay for the last one's."""
    os.sync()


def fsync_floor(directory: Path, writes: int) -> float:
    """Median time of a one-row SQLite write (WAL, synchronous=FULL), as the store does.

    The floor a metadata call cannot go under on ``directory``'s filesystem;
    benchmarks state their figures against it.
    """
    db = sqlite3.connect(directory / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (x)")
    times = []
    for i in range(writes):
        t0 = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?)", (i,))
        db.execute("COMMIT")
        times.append(time.perf_counter() - t0)
    db.close()
    return statistics.median(times)

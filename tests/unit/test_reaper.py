"""Removed storage comes back without cleanup(): the reaper, start-up reaping, and a
store that opens without writing (issue 14; the full-disk runs are in
tests/privileged/test_full_disk.py)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import need_root

from stratasnap import open_snapshotter
from stratasnap.errors import ResourceExhausted
from stratasnap.metastore import WAL_RESERVE, MetaStore
from stratasnap.reaper import Reaper


def _entries(root: Path) -> list[str]:
    return sorted(os.listdir(root / "snapshots"))


def test_background_reaper_deletes_soon_after_submit(scratch: Path) -> None:
    done = threading.Event()
    deleted: list[Path] = []

    def delete(path: Path) -> bool:
        deleted.append(path)
        done.set()
        return True

    reaper = Reaper(delete)
    reaper.start()
    reaper.submit(scratch / "rm-1")
    assert done.wait(5)
    assert reaper.wait_idle(5)
    assert deleted == [scratch / "rm-1"] and reaper.reaped == 1
    reaper.drain()
    assert not reaper.running


def test_reaper_without_thread_deletes_at_drain_and_survives_failures() -> None:
    calls: list[str] = []

    def delete(path: Path) -> bool:
        calls.append(path.name)
        if path.name == "rm-boom":
            raise PermissionError(13, "denied")
        return path.name != "rm-mounted"

    reaper = Reaper(delete)
    for name in ("rm-boom", "rm-mounted", "rm-ok"):
        reaper.submit(Path(name))
    assert calls == [] and reaper.pending == 3  # nothing runs until drain()
    reaper.drain()
    # One failure does not stop the rest; failures are left for cleanup().
    assert calls == ["rm-boom", "rm-mounted", "rm-ok"]
    assert (reaper.reaped, reaper.failed, reaper.pending) == (1, 2, 0)


def test_flush_finishes_the_queue_with_or_without_the_thread() -> None:
    """What a create on a full disk calls: the queued storage is gone when it returns."""
    release = threading.Event()
    deleted: list[str] = []

    def delete(path: Path) -> bool:
        release.wait(5)
        deleted.append(path.name)
        return True

    idle = Reaper(delete)
    assert idle.flush() is False  # nothing queued: nothing to wait for
    release.set()
    idle.submit(Path("rm-1"))
    assert idle.flush() is True and deleted == ["rm-1"] and idle.pending == 0
    assert not idle.running  # deleted in the caller's thread, the thread not started

    release.clear()
    background = Reaper(delete)
    background.start()
    background.submit(Path("rm-2"))
    threading.Timer(0.2, release.set).start()
    assert background.flush(timeout=5) is True
    assert deleted == ["rm-1", "rm-2"] and background.pending == 0
    background.submit(Path("rm-3"))  # the thread still runs after a flush
    assert background.wait_idle(5) and deleted[-1] == "rm-3"
    background.drain()


@pytest.mark.parametrize("backend", ["native", "overlay"])
def test_remove_without_cleanup_frees_storage_by_close(scratch: Path, backend: str) -> None:
    if backend == "overlay":
        need_root()
    root = scratch / "root"
    with open_snapshotter(root, backend) as sn:
        sn.prepare("a")
        sn.remove("a")
        # overlay defers the delete (sync_remove=false): the reaper holds it now.
        if backend == "overlay":
            assert sn.reaper.pending == 1
            assert any(n.startswith("rm-") for n in _entries(root))
    assert _entries(root) == []


def test_start_reaps_leftovers_of_a_killed_remove_and_create(scratch: Path) -> None:
    root = scratch / "root"
    with open_snapshotter(root) as sn:
        sn.prepare("keep")
        sn.prepare("gone")
    code = (
        "import os, sys\n"
        "from stratasnap import open_snapshotter\n"
        "sn = open_snapshotter(sys.argv[1])\n"
        "sn.sync_remove = False\n"  # leave the delete to the reaper, then die
        "sn.remove('gone')\n"
        "os.mkdir(sn.snapshots_dir / 'new-999')\n"  # and a create killed half-way
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)
    assert sorted(n.split("-")[0] for n in _entries(root) if not n.isdigit()) == ["new", "rm"]
    with open_snapshotter(root) as sn:
        assert sn.reaper.pending == 2  # found at open, no cleanup() asked for
        assert [i.name for i in sn.walk()] == ["keep"]
    assert len(_entries(root)) == 1 and _entries(root)[0].isdigit()


def test_store_keeps_wal_and_index_files_and_opens_without_writing(scratch: Path) -> None:
    path = scratch / "metadata.db"
    store = MetaStore(path)
    with store.write() as tx:
        tx._conn.execute("INSERT INTO meta VALUES ('x', '1')")
    store.close()
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    # SQLite deletes both when the last connection closes; a full disk could not
    # make them again, so the store keeps them, and keeps WAL space in reserve.
    assert wal.exists() and shm.exists()
    assert os.stat(wal).st_blocks * 512 >= WAL_RESERVE
    before = {p: (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (path, wal)}
    # Opened, read, even a write transaction that changes nothing, and closed.
    again = MetaStore(path)
    with again.read() as tx:
        assert tx.id_map() == {}
    with again.write() as wtx:
        assert wtx.id_map() == {}
    again.close()
    assert {p: (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (path, wal)} == before


def test_sqlite_full_is_resource_exhausted(scratch: Path) -> None:
    store = MetaStore(scratch / "metadata.db")
    try:
        with pytest.raises(ResourceExhausted, match="metadata"), store.write() as tx:
            raise _full_error()
        # The failed transaction left the connection usable.
        with store.write() as tx:
            tx._conn.execute("INSERT INTO meta VALUES ('y', '1')")
    finally:
        store.close()


def _full_error() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = 13
    return exc

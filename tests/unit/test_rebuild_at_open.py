"""The rebuild at open of active/view storage a power loss took back (native, no mounts).

The per-backend behaviour (mounts, parents' files) is in
tests/privileged/test_rebuild_lost_storage.py; here: what open leaves alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

import pytest

from stratasnap import open_snapshotter


@pytest.fixture
def root(scratch: Path) -> Path:
    """base (committed, one file) <- ctr (active, id 2)."""
    r = scratch / "root"
    with open_snapshotter(r) as sn:
        sn.prepare("layer")
        (r / "snapshots" / "1" / "f").write_text("base's")
        sn.commit("base", "layer")
        sn.prepare("ctr", "base")
    assert (r / "snapshots" / "2" / "f").read_text() == "base's"
    return r


def test_a_locked_new_dir_is_another_process_rebuilding(root: Path) -> None:
    snapshots = root / "snapshots"
    shutil.rmtree(snapshots / "2")
    work = snapshots / "new-2"
    work.mkdir()
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live rebuild (or create) holds
        with open_snapshotter(root):
            pass
        assert work.is_dir() and not (snapshots / "2").exists()
    finally:
        os.close(fd)
    with open_snapshotter(root):
        pass
    assert not work.exists()
    assert (snapshots / "2" / "f").read_text() == "base's"


def test_a_failed_rebuild_is_logged_and_the_store_opens(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshots = root / "snapshots"
    shutil.rmtree(snapshots / "2")
    shutil.rmtree(snapshots / "1")  # the parent's files are gone too: nothing to copy
    with caplog.at_level(logging.WARNING, logger="stratasnap"), open_snapshotter(root) as sn:
        assert sn.stat("ctr").name == "ctr"
        sn.prepare("other")
    assert 'snapshot "ctr" could not be rebuilt' in caplog.text
    left = os.listdir(snapshots)
    assert len(left) == 1 and left[0].isdigit()  # other's storage; no new-2 left behind


def test_storage_present_is_never_touched(root: Path) -> None:
    marker = root / "snapshots" / "2" / "written"
    marker.write_text("the container's")
    with open_snapshotter(root):
        pass
    assert marker.read_text() == "the container's"

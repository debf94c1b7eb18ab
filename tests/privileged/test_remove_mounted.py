"""Remove and cleanup never delete through a mount that is still there."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from conftest import need_root

from stratasnap import open_snapshotter
from stratasnap.fs.mount import bind, mounts_under

pytestmark = pytest.mark.privileged


def _storage(sn, key: str) -> Path:  # type: ignore[no-untyped-def]
    return Path(sn.mounts(key)[0].source)


def test_remove_of_a_mounted_snapshot_unmounts_then_deletes(scratch: Path) -> None:
    need_root()
    precious = scratch / "precious"
    precious.mkdir()
    (precious / "keep").write_text("must survive")
    with open_snapshotter(scratch / "root") as sn:
        sn.prepare("busy")
        storage = _storage(sn, "busy")
        # The storage directory itself is a mount point (rename gives EBUSY) and
        # something else is mounted inside it.
        bind(storage, storage)
        (storage / "inner").mkdir()
        bind(precious, storage / "inner")
        sn.remove("busy")
        assert not mounts_under(scratch / "root")
        assert (precious / "keep").read_text() == "must survive"
        assert list((scratch / "root" / "snapshots").iterdir()) == []


def test_cleanup_leaves_a_leftover_whose_mount_cannot_go(
    scratch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    need_root()
    precious = scratch / "precious"
    precious.mkdir()
    (precious / "keep").write_text("must survive")
    with open_snapshotter(scratch / "root") as sn:
        leftover = scratch / "root" / "snapshots" / "rm-4242"
        (leftover / "inner").mkdir(parents=True)
        bind(precious, leftover / "inner")
        # Hold the mount busy: a process with its cwd inside it.
        holder = subprocess.Popen(["sleep", "30"], cwd=leftover / "inner")
        try:
            with caplog.at_level(logging.WARNING, logger="stratasnap"):
                got = sn.cleanup()
            # The busy mount refuses a plain unmount (EBUSY), and cleanup never
            # detaches lazily (that would delete through it): the leftover stays
            # for later, with a warning that says why.
            assert str(leftover) not in got.paths
            assert (leftover / "inner").is_dir()
            assert mounts_under(leftover) == [leftover / "inner"]
            assert (precious / "keep").read_text() == "must survive"
            assert any(
                "rm-4242" in r.getMessage() and "busy" in r.getMessage() for r in caplog.records
            ), [r.getMessage() for r in caplog.records]
        finally:
            holder.kill()
            holder.wait()
        for m in mounts_under(leftover):
            subprocess.run(["umount", "-l", str(m)], check=False)
        sn.cleanup()
        assert not leftover.exists()
        assert (precious / "keep").read_text() == "must survive"

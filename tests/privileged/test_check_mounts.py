"""``stratasnap check`` on mounts and loop devices left on storage no snapshot owns."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import need_root

from stratasnap import open_snapshotter
from stratasnap.backends.blockfile import BlockfileSnapshotter
from stratasnap.check import check, repair
from stratasnap.findings import Repair
from stratasnap.fs import loop
from stratasnap.fs.mount import bind, mounts_under, unmount_all_under


def test_stale_mount_and_loop_device_are_found_and_released(scratch: Path) -> None:
    need_root()
    root = scratch / "bf"
    with open_snapshotter(root, "blockfile", scratch_size="64M") as sn:
        assert isinstance(sn, BlockfileSnapshotter)
        sn.prepare("live")
        template = sn.template
    snaps = root / "snapshots"
    src = scratch / "src"  # what gets mounted: outside the root, so nothing nests
    src.mkdir()
    # A crash leftover that is still mounted, and one still attached to a loop device.
    orphan = snaps / "900"
    (orphan / "mnt").mkdir(parents=True)
    bind(src, orphan / "mnt", recursive=False)
    attached = snaps / "rm-901"
    attached.mkdir()
    shutil.copyfile(template, attached / "rootfs.img")
    dev = loop.attach(attached / "rootfs.img")
    # The live snapshot's own mount and loop device are no finding.
    live_mnt = snaps / "1" / "m"
    live_mnt.mkdir()
    bind(src, live_mnt, recursive=False)
    live_dev = loop.attach(snaps / "1" / "rootfs.img")
    try:
        found = {(f.code, f.repair) for f in check(root, "blockfile").findings}
        assert found == {
            ("orphan-storage", Repair.RECLAIM),
            ("interrupted-remove", Repair.RECLAIM),
            ("stale-mount", Repair.UNMOUNT),
            ("stale-loop", Repair.DETACH),
        }
        assert mounts_under(orphan) and loop.loop_devices_for(attached / "rootfs.img")

        report = repair(root, "blockfile", {"scratch_size": "64M"})
        assert report.healthy, report.remaining
        assert len(report.repaired) == 4
        assert not mounts_under(orphan) and not orphan.exists() and not attached.exists()
        # (Its number may already serve another process's image: look at backing files.)
        assert not [d for d, b in loop.backing_files() if b.startswith(str(attached))]
        assert mounts_under(live_mnt) and loop.loop_devices_for(snaps / "1" / "rootfs.img")
    finally:
        unmount_all_under(snaps, lazy=True)
        # Only devices still backed by our files: a freed number may be someone else's now.
        real = os.path.realpath(snaps)
        for d, backing in loop.backing_files():
            if d in (dev, live_dev) and backing.startswith(real):
                loop.detach(d)

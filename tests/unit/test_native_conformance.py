"""The native backend against the shipped conformance mixin.

Mount-based cases need root (CI is root); the rest run anywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stratasnap.testing import SnapshotterConformance


class TestNative(SnapshotterConformance):
    backend = "native"

    @pytest.fixture
    def snapshot_root(self, scratch: Path) -> Path:
        return scratch / "root"


def test_remove_succeeds_when_deleting_storage_fails(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metadata is gone either way; the storage waits for cleanup()."""
    import stratasnap.snapshotter as base
    from stratasnap import NotFound, open_snapshotter

    with open_snapshotter(scratch / "root") as sn:
        sn.prepare("doomed")

        def refuse(path: Path) -> None:
            raise PermissionError(1, "Operation not permitted", str(path))

        monkeypatch.setattr(base, "_rmtree", refuse)
        sn.remove("doomed")  # no error: containerd's GC pass must not abort
        with pytest.raises(NotFound):
            sn.stat("doomed")
        leftovers = sorted(p.name for p in (scratch / "root" / "snapshots").iterdir())
        assert len(leftovers) == 1 and leftovers[0].startswith("rm-")
        monkeypatch.undo()
        assert [Path(p).name for p in sn.cleanup().paths] == leftovers
        assert list((scratch / "root" / "snapshots").iterdir()) == []


def test_remove_that_cannot_move_storage_is_failed_precondition(scratch: Path) -> None:
    """containerd's GC skips a FailedPrecondition and goes on; anything else ends the pass."""
    import os

    from stratasnap import FailedPrecondition, open_snapshotter

    with open_snapshotter(scratch / "root") as sn:
        sn.prepare("stuck")
        snapshots = scratch / "root" / "snapshots"
        (sid,) = os.listdir(snapshots)
        # An rm-<id> that is a non-empty directory makes rename(2) fail with ENOTEMPTY.
        (snapshots / f"rm-{sid}" / "x").mkdir(parents=True)
        with pytest.raises(FailedPrecondition):
            sn.remove("stuck")
        assert sn.stat("stuck").name == "stuck"  # nothing changed

"""Crash safety of the btrfs backend: killed before any step, subvolume ioctls included.

Besides the shared checks (``tests/crashkit.py``), a commit killed after it
made the subvolume read-only must leave a writable active snapshot once the
store is opened again, and cleanup must delete half-made subvolumes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from crashkit import OPS, CrashRun

pytestmark = pytest.mark.privileged


@pytest.mark.parametrize("op", sorted(OPS))
def test_kill_at_every_step(op: str, btrfs_fs: Path) -> None:
    CrashRun(Path(tempfile.mkdtemp(dir=btrfs_fs)), "btrfs").kill_at_every_step(op)


@pytest.mark.parametrize("op", ["prepare", "commit"])
def test_kill_at_every_step_with_quotas(op: str, btrfs_quota_fs: Path) -> None:
    run = CrashRun(Path(tempfile.mkdtemp(dir=btrfs_quota_fs)), "btrfs", {"quota": True})
    run.kill_at_every_step(op)

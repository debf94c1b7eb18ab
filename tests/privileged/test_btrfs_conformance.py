"""The btrfs backend against the shipped conformance mixin, with real mounts.

Roots are on btrfs loop filesystems the tests make (one per module): one
with quotas off (usage walks), one with quotas on (usage from qgroups).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from stratasnap.snapshotter import Snapshotter
from stratasnap.testing import SnapshotterConformance

pytestmark = pytest.mark.privileged


class TestBtrfs(SnapshotterConformance):
    backend = "btrfs"

    @pytest.fixture
    def snapshot_root(self, btrfs_fs: Path) -> Path:
        return Path(tempfile.mkdtemp(dir=btrfs_fs)) / "root"


class TestBtrfsQuota(SnapshotterConformance):
    """With qgroups: active usage is the qgroup's exclusive bytes, and counts no inodes."""

    backend = "btrfs"
    options: ClassVar[Mapping[str, Any]] = {"quota": True}
    usage_counts_inodes = False

    @pytest.fixture
    def snapshot_root(self, btrfs_quota_fs: Path) -> Path:
        return Path(tempfile.mkdtemp(dir=btrfs_quota_fs)) / "root"

    def test_usage(self, sn: Snapshotter) -> None:
        sn.prepare("a")
        empty = sn.usage("a")
        # An empty subvolume holds one tree block of its own (16 KiB by default).
        assert 0 < empty.size <= 64 * 1024
        assert empty.inodes == 0  # qgroups count bytes only
        sn.commit("c", "a")
        assert sn.usage("c") == empty
        sn.view("v", "c")
        assert sn.usage("v").size == 0

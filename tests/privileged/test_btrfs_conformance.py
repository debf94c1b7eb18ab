"""The btrfs backend against the shipped conformance mixin, with real mounts.

Roots are on btrfs loop filesystems the tests make (one per module): one
with quotas off (usage walks), one with quotas on (usage from qgroups).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import need_root

from stratasnap.testing import SnapshotterConformance, mounted
from stratasnap.testing.conformance import Snapshotter

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

    def test_active_usage_grows_and_commit_stores_it(self, sn: Snapshotter, mnt_dir: Path) -> None:
        need_root()
        sn.prepare("a")
        before = sn.usage("a")
        with mounted(sn.mounts("a"), mnt_dir) as root:
            (root / "blob").write_bytes(os.urandom(256 * 1024))
            (root / "d").mkdir()
            os.link(root / "blob", root / "d" / "hardlink")  # counted once
        after = sn.usage("a")  # no sync by the caller: usage commits the transaction
        assert after.size - before.size >= 256 * 1024
        assert after.size - before.size < 2 * 256 * 1024
        sn.commit("c", "a")
        assert sn.usage("c") == after

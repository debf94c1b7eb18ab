"""The erofs backend against the conformance mixin, with real mounts of real images.

The overlay backend's case class is reused (its override of the rename
case holds here too: children stack on overlayfs the same way). The root is
on tmpfs, where the kernel refuses file-backed EROFS mounts (ENOTBLK), so
these run the loop-device fallback; TestErofsFileBacked repeats the mixin
on ext4, where images are mounted from the file itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from test_overlay_conformance import TestOverlay as _OverlayCases

from stratasnap.snapshotter import Snapshotter
from stratasnap.types import Usage

pytestmark = pytest.mark.privileged


class TestErofs(_OverlayCases):
    backend = "erofs"

    def check_committed_usage(self, sn: Snapshotter, name: str, active: Usage) -> None:
        """Committed usage is the image's allocated size and its superblock's inodes."""
        stored = sn.usage(name)
        storage = Path(snapshot_storage(sn, name))
        assert stored.size == os.stat(storage / "layer.erofs").st_blocks * 512
        assert stored.inodes == active.inodes  # the superblock's count: root, d, blob
        # Random bytes do not compress: the image holds the blob once (hard link).
        assert 256 * 1024 <= stored.size < 2 * 256 * 1024


def snapshot_storage(sn: Snapshotter, key: str) -> str:
    with sn._store.read() as tx:  # type: ignore[attr-defined]
        return str(sn.storage_dir(tx.get(key).id))  # type: ignore[attr-defined]


class TestErofsFileBacked(TestErofs):
    """On ext4 the images are mounted from the file itself (Linux 6.12+), else by loop."""

    many_layers = 32  # the 128-layer chain runs on tmpfs above

    @pytest.fixture
    def snapshot_root(self, loopfs: Callable[..., Path]) -> Path:
        return loopfs("ext4", size="1G") / "root"

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
from conftest import need_root
from test_overlay_conformance import TestOverlay as _OverlayCases

from stratasnap.testing import mounted
from stratasnap.testing.conformance import Snapshotter

pytestmark = pytest.mark.privileged


class TestErofs(_OverlayCases):
    backend = "erofs"

    def test_active_usage_grows_and_commit_stores_it(self, sn: Snapshotter, mnt_dir: Path) -> None:
        """Active usage is the upper's; committed usage is the image's allocated size."""
        need_root()
        sn.prepare("a")
        before = sn.usage("a")
        with mounted(sn.mounts("a"), mnt_dir) as root:
            (root / "blob").write_bytes(os.urandom(256 * 1024))
            (root / "d").mkdir()
            os.link(root / "blob", root / "d" / "hardlink")
        after = sn.usage("a")
        assert after.size - before.size >= 256 * 1024
        assert after.inodes == before.inodes + 2
        sn.commit("c", "a")
        stored = sn.usage("c")
        storage = Path(snapshot_storage(sn, "c"))
        assert stored.size == os.stat(storage / "layer.erofs").st_blocks * 512
        assert stored.inodes == after.inodes  # the superblock's count: root, d, blob
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

"""The overlay backend against the shipped conformance mixin, with real overlay mounts.

The root is on tmpfs (the ``scratch`` fixture): overlayfs takes tmpfs as
upper (trusted.* xattrs, whiteout devices and RENAME_WHITEOUT all work
there), and tmpfs makes the 128-layer case quick.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import need_root

from stratasnap.snapshotter import Snapshotter
from stratasnap.testing import SnapshotterConformance, mounted

pytestmark = pytest.mark.privileged


class TestOverlay(SnapshotterConformance):
    backend = "overlay"

    @pytest.fixture
    def snapshot_root(self, scratch: Path) -> Path:
        return scratch / "root"

    def test_move_file_from_lower_layer(self, sn: Snapshotter, mnt_dir: Path) -> None:
        """The mixin's case, with overlayfs' rule for directories from a lower layer.

        Without ``redirect_dir`` (off by default, as in containerd), renaming
        a directory that comes from a lower layer fails with EXDEV, and
        tools fall back to copy and delete, as ``mv`` does. Files move
        normally. TestOverlayRedirectDir runs the mixin's case unchanged.
        """
        need_root()
        self._layer(sn, mnt_dir, "l1", "", {"src/f": "data", "dst/keep": "k"})
        with mounted(sn.prepare("l2-a", "l1"), mnt_dir) as root:
            os.rename(root / "src" / "f", root / "dst" / "f")
            with pytest.raises(OSError) as err:
                os.rename(root / "src", root / "moved")
            assert err.value.errno == errno.EXDEV
            shutil.move(root / "src", root / "moved")  # mv's copy-and-delete
        sn.commit("l2", "l2-a")
        assert self._read_view(sn, mnt_dir, "l2") == {"dst/keep": "k", "dst/f": "data"}
        assert self._read_view(sn, mnt_dir, "l1") == {"src/f": "data", "dst/keep": "k"}


class TestOverlayRedirectDir(SnapshotterConformance):
    """With ``redirect_dir=on`` directories from lower layers rename in place."""

    backend = "overlay"
    options: ClassVar[Mapping[str, Any]] = {"mount_options": ("redirect_dir=on",)}

    @pytest.fixture
    def snapshot_root(self, scratch: Path) -> Path:
        return scratch / "root"

    def test_directory_from_a_lower_layer_renames_in_place(
        self, sn: Snapshotter, mnt_dir: Path
    ) -> None:
        """What redirect_dir promises: no copy, the directory keeps its inode in the
        merged view and its upper carries a redirect to the lower path."""
        need_root()
        self._layer(sn, mnt_dir, "l1", "", {"src/f": "data"})
        mounts = sn.prepare("l2-a", "l1")
        assert "redirect_dir=on" in mounts[0].options
        with mounted(mounts, mnt_dir) as root:
            before = os.stat(root / "src").st_ino
            os.rename(root / "src", root / "moved")  # no EXDEV, no copy-and-delete
            assert os.stat(root / "moved").st_ino == before
        upper = Path(next(o for o in mounts[0].options if o.startswith("upperdir="))[9:])
        # Renamed within its parent: the redirect is the old name, relative.
        assert os.getxattr(upper / "moved", "trusted.overlay.redirect") == b"src"
        sn.commit("l2", "l2-a")
        assert self._read_view(sn, mnt_dir, "l2") == {"moved/f": "data"}

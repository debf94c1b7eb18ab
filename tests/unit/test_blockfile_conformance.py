"""The blockfile backend against the shipped conformance mixin.

Images are small (64 MiB, sparse) and live on tmpfs (``scratch``), so the
many-layers case stays fast. Mount-based cases need root (CI is root); the
rest need only mkfs.ext4.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import need, need_root

from stratasnap.snapshotter import Snapshotter
from stratasnap.testing import SnapshotterConformance
from stratasnap.testing.conformance import mounted


class TestBlockfile(SnapshotterConformance):
    backend = "blockfile"
    options: ClassVar[dict[str, Any]] = {"scratch_size": "64M"}

    @pytest.fixture
    def snapshot_root(self, scratch: Path) -> Path:
        need(shutil.which("mkfs.ext4", path="/usr/sbin:/sbin") is not None, "mkfs.ext4 missing")
        return scratch / "root"

    def test_many_layers(self, sn: Snapshotter, mnt_dir: Path) -> None:
        # The mixin's case, except that an ext4 root also holds lost+found.
        need_root()
        parent = ""
        for i in range(self.many_layers):
            key = f"layer-{i}-a"
            with mounted(sn.prepare(key, parent), mnt_dir) as root:
                (root / f"f{i}").write_text(str(i))
            sn.commit(f"layer-{i}", key)
            parent = f"layer-{i}"
        with mounted(sn.view("top", parent), mnt_dir) as root:
            assert (root / "f0").read_text() == "0"
            last = self.many_layers - 1
            assert (root / f"f{last}").read_text() == str(last)
            assert set(os.listdir(root)) - {"lost+found"} == {
                f"f{i}" for i in range(self.many_layers)
            }

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

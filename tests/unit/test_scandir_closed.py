"""Directory scans are closed when the work inside them fails (no fd left to the GC)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from stratasnap import open_snapshotter
from stratasnap.errors import FailedPrecondition


def _unclosed_scans(call: Callable[[], object], fails_with: type[BaseException]) -> list[str]:
    """Run ``call``, which fails; the ResourceWarnings of scandir iterators it left open."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(fails_with):
            call()
        gc.collect()  # the failed frame (and an unclosed iterator in it) goes now
    return [str(w.message) for w in seen if "scandir" in str(w.message)]


def test_cleanup_that_fails_closes_its_scan(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_snapshotter(scratch / "root") as sn:
        (sn.snapshots_dir / "4242").mkdir()  # storage no snapshot owns
        (sn.snapshots_dir / "4243").mkdir()

        def busy(src: Path, dst: Path) -> bool:
            raise FailedPrecondition(f"{src} is busy")

        monkeypatch.setattr(sn, "_rename_aside", busy)
        assert _unclosed_scans(sn.cleanup, FailedPrecondition) == []


def test_blockfile_template_sweep_that_fails_closes_its_scan(scratch: Path) -> None:
    root = scratch / "root"
    root.mkdir()
    (root / ".scratch.img.tmp-dir").mkdir()  # not a file: unlinking it fails (EISDIR)
    opening = partial(open_snapshotter, root, "blockfile")
    assert _unclosed_scans(opening, IsADirectoryError) == []


def test_overlay_reattach_that_fails_closes_its_scan(scratch: Path) -> None:
    root = scratch / "root"
    with open_snapshotter(root, "overlay") as sn:
        sn.prepare("a")
        [storage] = [p for p in sn.snapshots_dir.iterdir()]
    (storage / "layer.img").mkdir()  # a finished commit's leftover that cannot be unlinked
    opening = partial(open_snapshotter, root, "overlay")
    assert _unclosed_scans(opening, IsADirectoryError) == []

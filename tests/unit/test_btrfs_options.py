"""The btrfs backend without btrfs: its options, and the error off btrfs (no root needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stratasnap import open_snapshotter
from stratasnap.backends import BACKENDS, backend_class
from stratasnap.backends.btrfs import BtrfsSnapshotter
from stratasnap.backends.btrfs_options import BtrfsOptions
from stratasnap.errors import FailedPrecondition, InvalidArgument
from stratasnap.fs import btrfs


def test_registered_without_capabilities() -> None:
    assert "btrfs" in BACKENDS
    cls = backend_class("btrfs")
    assert cls is BtrfsSnapshotter
    # Snapshots are full trees: no rebase; no idmapped layers either.
    assert cls.capabilities_for({"quota": "true"}) == ()


def test_options_take_text_and_typed_values() -> None:
    opts: dict[str, object] = {"quota": "yes", "default_size": "10GiB", "other": 1}
    got = BtrfsOptions.take(opts)
    assert got == BtrfsOptions(quota=True, default_size=10 << 30)
    assert opts == {"other": 1}  # the rest is left for the unknown-option check
    assert BtrfsOptions.take({"quota": False, "default_size": 0}) == BtrfsOptions()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quota": "maybe"}, r"btrfs option quota='maybe': expected true or false"),
        ({"default_size": "lots"}, r"btrfs option default_size='lots': expected a size"),
        ({"default_size": "1KiB"}, r"btrfs option default_size '1KiB'"),
    ],
)
def test_bad_options_are_invalid_argument_naming_them(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        BtrfsOptions.take(dict(options))


def test_off_btrfs_the_error_names_the_filesystem_found(tmp_path: Path) -> None:
    if btrfs.is_btrfs(tmp_path):
        pytest.skip("the temporary directory is on btrfs here")
    found = btrfs.filesystem_name(tmp_path)
    assert found != "unknown"
    root = tmp_path / "store" / "root"
    with pytest.raises(
        FailedPrecondition, match=rf"btrfs filesystem; {re.escape(str(root))} is on {found}:"
    ):
        open_snapshotter(root, "btrfs")
    assert not (tmp_path / "store").exists()  # nothing made on the wrong filesystem

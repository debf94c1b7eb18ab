"""fs.btrfs, the ioctl layer, on a btrfs loop filesystem the tests make."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from stratasnap.fs import btrfs

pytestmark = pytest.mark.privileged


@pytest.fixture
def top(btrfs_fs: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=btrfs_fs))


def test_subvolumes_snapshots_and_flags(top: Path) -> None:
    btrfs.create_subvolume(top, "a")
    assert btrfs.is_subvolume(top / "a") and not btrfs.is_subvolume(top)
    (top / "a" / "f").write_text("x")
    btrfs.snapshot(top / "a", top, "ro", readonly=True)
    assert btrfs.is_readonly(top / "ro") and not btrfs.is_readonly(top / "a")
    assert btrfs.subvolume_id(top / "ro") != btrfs.subvolume_id(top / "a")
    assert btrfs.subvolume_id(top / "a" / "f") == btrfs.subvolume_id(top / "a")
    assert btrfs.set_readonly(top / "ro", False) and not btrfs.set_readonly(top / "ro", False)
    btrfs.destroy_subvolume(top, "ro")
    assert not (top / "ro").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x" * (btrfs.SUBVOL_NAME_MAX + 1)])
def test_names_that_are_not_one_path_component_are_refused(top: Path, name: str) -> None:
    with pytest.raises(OSError) as err:
        btrfs.create_subvolume(top, name)
    assert err.value.errno == errno.EINVAL
    assert os.listdir(top) == []


def test_errors_carry_the_path_and_the_ioctl(top: Path) -> None:
    (top / "plain").mkdir()
    with pytest.raises(OSError) as err:
        btrfs.set_readonly(top / "plain")  # not a subvolume root
    assert err.value.filename == str(top / "plain")
    assert "BTRFS_IOC_SUBVOL" in str(err.value.strerror)


def test_destroy_subvolumes_in_a_tree_with_read_only_and_nested_ones(top: Path) -> None:
    tree = top / "tree"
    (tree / "plain" / "deep").mkdir(parents=True)
    btrfs.create_subvolume(tree / "plain", "sub")
    btrfs.create_subvolume(tree / "plain" / "sub", "inner")
    (tree / "plain" / "sub" / "inner" / "f").write_text("x")
    btrfs.set_readonly(tree / "plain" / "sub")
    assert btrfs.destroy_subvolumes_in(tree) is False  # the tree itself is plain
    assert not (tree / "plain" / "sub").exists()
    assert (tree / "plain" / "deep").is_dir()  # plain directories are the caller's
    btrfs.create_subvolume(top, "whole")
    assert btrfs.destroy_subvolumes_in(top / "whole") is True
    assert not (top / "whole").exists()
    assert btrfs.destroy_subvolumes_in(top / "gone") is True


def test_filesystem_names(top: Path, scratch: Path) -> None:
    assert btrfs.is_btrfs(top) and btrfs.filesystem_name(top) == "btrfs"
    assert not btrfs.is_btrfs(scratch) and btrfs.filesystem_name(scratch) == "tmpfs"

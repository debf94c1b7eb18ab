"""Open rebuilds the storage of active and view snapshots that a power loss took back.

Where the filesystem orders its metadata a create syncs nothing but the
store (see ``stratasnap.fs.durable``), so a power loss may keep a snapshot's
record and take back the ``mkdir`` or the rename of its storage. No test can
pull the plug, so each test does to the disk what such a power loss leaves:
``snapshots/<id>`` gone (the ``mkdir`` taken back), or back under
``new-<id>`` (the rename taken back; the create's files inside, which are
deleted, not trusted). Then the store is opened again, for every backend:
the storage is there, built as a create builds it, its mounts work and show
the parent's files, and a committed snapshot's missing storage is left as
it is (its files are lost: ``stratasnap check`` says so).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import need, need_root

from stratasnap import FailedPrecondition, open_snapshotter
from stratasnap.check import check
from stratasnap.fs import btrfs, loop
from stratasnap.fs.mount import mounts_under, unmount_all_under
from stratasnap.snapshotter import BaseSnapshotter
from stratasnap.testing import mounted


@dataclass(frozen=True)
class Case:
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    fs_type: str = "ext4"  # the loop filesystem the root lives on


CASES = {
    "native": Case("native"),
    "overlay": Case("overlay"),
    "overlay-limited": Case("overlay", {"default_size": "16MiB"}),
    "erofs": Case("erofs"),
    "blockfile": Case("blockfile", {"scratch_size": "64M"}),
    "btrfs": Case("btrfs", fs_type="btrfs"),
    "overlay-xfs": Case("overlay", fs_type="xfs"),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[str(request.param)]


@pytest.fixture
def root(case: Case, loopfs: Callable[..., Path]) -> Path:
    need_root()
    return loopfs(case.fs_type, size="1G") / "root"


def open_sn(root: Path, case: Case) -> BaseSnapshotter:
    try:
        sn = open_snapshotter(root, case.backend, **case.options)
    except FailedPrecondition as exc:  # e.g. no EROFS in this kernel
        need(False, f"{case.backend}: {exc}")
        raise
    assert isinstance(sn, BaseSnapshotter)
    return sn


def sid(root: Path, key: str) -> int:
    """A snapshot's id, read from the store as the layout names its storage."""
    # closing(): a connection left open keeps the loop filesystem busy at unmount.
    with closing(sqlite3.connect(root / "metadata.db")) as conn:
        (value,) = conn.execute("SELECT id FROM snapshots WHERE key = ?", (key,)).fetchone()
    return int(value)


def write(sn: BaseSnapshotter, key: str, name: str, text: str, tmp: Path) -> None:
    with mounted(sn.mounts(key), tmp) as target:
        (target / name).write_text(text)


def read_all(sn: BaseSnapshotter, key: str, tmp: Path) -> dict[str, str]:
    with mounted(sn.mounts(key), tmp) as target:
        return {
            p.name: p.read_text()
            for p in target.iterdir()
            if p.is_file() and p.name != "lost+found"
        }


def take_back(path: Path, *, to: Path | None, partial: bool = False) -> None:
    """What a power loss leaves of storage whose creation it took back.

    ``to`` None: nothing (the ``mkdir`` is gone); else the storage back under
    its ``new-*`` name, with a file the create never made, and when
    ``partial`` nothing else (the ``mkdir`` kept, what populate made lost).
    """
    if mounts_under(path):
        unmount_all_under(path)
    for image in path.glob("*.img"):
        for dev in loop.loop_devices_for(image):
            loop.detach(dev)
    if to is None or partial:
        btrfs_free(path)
        shutil.rmtree(path)
    if to is not None:
        if partial:
            to.mkdir()
        else:
            os.rename(path, to)
        (to / "stale-junk").write_text("not the create's")


def btrfs_free(path: Path) -> None:
    with suppress(OSError):  # not btrfs
        btrfs.destroy_subvolumes_in(path)


@pytest.fixture
def populated(root: Path, case: Case, tmp_path: Path) -> Iterator[dict[str, int]]:
    """base (committed, "hello" in it) <- ctr (active), look (a view of base);
    lone (committed, no children). Returns their ids; the store is closed."""
    sn = open_sn(root, case)
    try:
        sn.prepare("base-a")
        write(sn, "base-a", "hello", "from the parent", tmp_path)
        sn.commit("base", "base-a")
        sn.prepare("ctr", "base", labels={"role": "ctr"})
        sn.view("look", "base")
        sn.prepare("lone-a")
        write(sn, "lone-a", "mine", "only mine", tmp_path)
        sn.commit("lone", "lone-a")
        assert read_all(sn, "ctr", tmp_path) == {"hello": "from the parent"}
    finally:
        sn.close()
    yield {key: sid(root, key) for key in ("base", "ctr", "look", "lone")}


@pytest.mark.parametrize("leaves", ["nothing", "new-dir", "partial-new-dir"])
def test_open_rebuilds_active_and_view_storage_a_power_loss_took_back(
    root: Path,
    case: Case,
    populated: dict[str, int],
    leaves: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    snapshots = root / "snapshots"
    for key in ("ctr", "look", "lone"):
        n = populated[key]
        take_back(
            snapshots / str(n),
            to=None if leaves == "nothing" else snapshots / f"new-{n}",
            partial=leaves == "partial-new-dir",
        )
    found = {(f.code, f.where) for f in check(root, case.backend).findings}
    assert {
        ("unbuilt-storage", f"snapshots/{populated['ctr']}"),
        ("unbuilt-storage", f"snapshots/{populated['look']}"),
        ("missing-storage", f"snapshots/{populated['lone']}"),
    } <= found

    with caplog.at_level(logging.WARNING, logger="stratasnap"):
        sn = open_sn(root, case)
    try:
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert '"ctr"' in warned and '"look"' in warned and '"lone"' not in warned
        for key in ("ctr", "look"):
            assert (snapshots / str(populated[key])).is_dir()
            assert not os.path.lexists(snapshots / f"new-{populated[key]}")
        # A committed layer's files cannot be made up: it stays missing.
        assert not os.path.lexists(snapshots / str(populated["lone"]))
        assert read_all(sn, "ctr", tmp_path) == {"hello": "from the parent"}
        assert read_all(sn, "look", tmp_path) == {"hello": "from the parent"}
        assert_built_as_a_create_builds(case, snapshots / str(populated["ctr"]))
        write(sn, "ctr", "new", "written after the rebuild", tmp_path)
        sn.commit("next", "ctr")
        sn.prepare("top", "next")
        assert read_all(sn, "top", tmp_path) == {
            "hello": "from the parent",
            "new": "written after the rebuild",
        }
        sn.cleanup()
    finally:
        sn.close()
    after = [(f.code, f.where) for f in check(root, case.backend).findings]
    assert after == [("missing-storage", f"snapshots/{populated['lone']}")]


def assert_built_as_a_create_builds(case: Case, storage: Path) -> None:
    """What only the backend's own populate makes of an active snapshot's storage."""
    if case.options.get("default_size"):
        # A size-limited upper: a filesystem of its own of about 16 MiB (the
        # root's is 1 GiB), mounted on first use.
        st = os.statvfs(storage / "fs")
        assert st.f_blocks * st.f_frsize < 32 << 20
    elif case.backend == "btrfs":
        assert btrfs.is_subvolume(storage / "fs")  # a snapshot of the parent's subvolume
    elif case.backend == "blockfile":
        assert (storage / "rootfs.img").is_file()  # a copy of the parent's image
    elif case.backend in ("overlay", "erofs"):
        assert (storage / "work").is_dir() and (storage / "fs").is_dir()


def test_a_rebuild_that_fails_leaves_the_store_open(
    root: Path, case: Case, populated: dict[str, int], tmp_path: Path
) -> None:
    """The parent's own storage is gone too: ctr cannot be rebuilt, the rest still works."""
    snapshots = root / "snapshots"
    take_back(snapshots / str(populated["ctr"]), to=None)
    take_back(snapshots / str(populated["base"]), to=None)
    sn = open_sn(root, case)
    try:
        assert not os.path.lexists(snapshots / str(populated["ctr"]))
        assert not [n for n in os.listdir(snapshots) if n.startswith("new-")]
        sn.prepare("fresh")
        write(sn, "fresh", "f", "still works", tmp_path)
        assert read_all(sn, "fresh", tmp_path) == {"f": "still works"}
    finally:
        sn.close()

"""The btrfs backend: subvolumes, read-only commits, removal, orphan cleanup, qgroups.

Roots are on btrfs loop filesystems the tests make (``btrfs_fs`` with quotas
off, ``btrfs_quota_fs`` with quotas on, one each per module; ``loopfs`` for
a test that turns quotas on itself).
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stratasnap import open_snapshotter
from stratasnap.backends.btrfs import BtrfsSnapshotter
from stratasnap.backends.overlay_options import MAX_SIZE_LABEL
from stratasnap.check import check
from stratasnap.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from stratasnap.fs import btrfs
from stratasnap.fs.usage import disk_usage
from stratasnap.metastore import WriteTx

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def _open(root: Path, **options: object) -> BtrfsSnapshotter:
    s = open_snapshotter(root, "btrfs", **options)
    assert isinstance(s, BtrfsSnapshotter)
    return s


def _fresh(fs: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=fs)) / "root"


@pytest.fixture
def sn(btrfs_fs: Path) -> Iterator[BtrfsSnapshotter]:
    s = _open(_fresh(btrfs_fs))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def qsn(btrfs_quota_fs: Path) -> Iterator[BtrfsSnapshotter]:
    s = _open(_fresh(btrfs_quota_fs))
    try:
        yield s
    finally:
        s.close()


def _fs(sn: BtrfsSnapshotter, key: str) -> Path:
    with sn._store.read() as tx:
        return sn.storage_dir(tx.get(key).id) / "fs"


def _fill(path: Path, size: int) -> None:
    """Write ``size`` bytes of real data to a new file, fsync'd."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(chunk[: min(left, MiB)])
        f.flush()
        os.fsync(f.fileno())


def _subvolume_paths(fs: Path) -> set[str]:
    """Paths (relative to the filesystem's top) of every subvolume on ``fs``, from btrfs-progs."""
    out = subprocess.run(
        ["btrfs", "subvolume", "list", str(fs)], check=True, capture_output=True, text=True
    ).stdout
    return {line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line}


# -- the filesystem --------------------------------------------------------------------------


def test_root_must_be_on_btrfs_and_the_error_names_what_it_is_on(scratch: Path) -> None:
    root = scratch / "root"
    with pytest.raises(FailedPrecondition, match=r"needs its root on a btrfs filesystem.*tmpfs"):
        _open(root)
    assert not root.exists()  # nothing made on the wrong filesystem


# -- layout, prepare, view, commit -------------------------------------------------------------


def test_prepare_snapshots_the_parent_subvolume_and_commit_makes_it_read_only(
    sn: BtrfsSnapshotter,
) -> None:
    base = Path(sn.prepare("base-a")[0].source)
    assert btrfs.is_subvolume(base) and not btrfs.is_readonly(base)
    (base / "d").mkdir()
    (base / "d" / "f").write_bytes(b"x" * 10000)
    sn.commit("base", "base-a")
    assert btrfs.is_readonly(base)
    with pytest.raises(OSError) as err:
        (base / "late").write_text("no")
    assert err.value.errno == errno.EROFS

    m = sn.prepare("child", "base")
    assert m[0].type == "bind" and m[0].options == ("rbind", "rw")
    child = Path(m[0].source)
    assert child == _fs(sn, "child") and btrfs.is_subvolume(child)
    assert not btrfs.is_readonly(child)
    # A snapshot, not a copy: the same inode numbers, in a subvolume (device) of its own.
    ours, theirs = os.stat(child / "d" / "f"), os.stat(base / "d" / "f")
    assert ours.st_ino == theirs.st_ino and ours.st_dev != theirs.st_dev
    (child / "d" / "f").write_text("changed")
    assert (base / "d" / "f").read_bytes() == b"x" * 10000


def test_a_view_is_a_read_only_bind_of_the_parent_and_has_no_storage(
    sn: BtrfsSnapshotter,
) -> None:
    sn.prepare("a")
    sn.commit("c", "a")
    m = sn.view("v", "c")
    assert m[0].source == str(_fs(sn, "c")) and m[0].options == ("rbind", "ro")
    with sn._store.read() as tx:
        storage = sn.storage_dir(tx.get("v").id)
    assert os.listdir(storage) == []
    # A view of nothing is an empty read-only subvolume of its own.
    m = sn.view("empty", "")
    empty = Path(m[0].source)
    assert btrfs.is_subvolume(empty) and btrfs.is_readonly(empty)
    assert os.listdir(empty) == []


def test_a_failed_commit_leaves_the_snapshot_writable(
    sn: BtrfsSnapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = Path(sn.prepare("a")[0].source)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(WriteTx, "commit_active", refuse)
    with pytest.raises(OSError):
        sn.commit("c", "a")
    monkeypatch.undo()
    assert not btrfs.is_readonly(fs)
    (fs / "still-writable").write_text("yes")
    sn.commit("c", "a")
    assert btrfs.is_readonly(fs)


def test_open_makes_actives_a_killed_commit_left_read_only_writable(btrfs_fs: Path) -> None:
    root = _fresh(btrfs_fs)
    with _open(root) as s:
        fs = Path(s.prepare("a")[0].source)
        s.prepare("b")
        s.commit("c", "b")
        committed = _fs(s, "c")
    btrfs.set_readonly(fs)  # what a commit killed after its first step leaves
    # While a commit (here: its lock) is under way elsewhere, opening leaves it be.
    lock = os.open(fs.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _open(root).close()
        assert btrfs.is_readonly(fs)
    finally:
        os.close(lock)
    with _open(root) as s:
        assert not btrfs.is_readonly(fs)
        assert btrfs.is_readonly(committed)  # committed ones stay read-only
        assert s.stat("a").kind.value == "active"


# -- remove and cleanup ---------------------------------------------------------------------------


def test_remove_deletes_read_only_and_nested_subvolumes(
    sn: BtrfsSnapshotter, btrfs_fs: Path
) -> None:
    base = Path(sn.prepare("base-a")[0].source)
    _fill(base / "data", 4 * MiB)
    sn.commit("base", "base-a")
    child = Path(sn.prepare("child", "base")[0].source)
    # A container that makes subvolumes of its own (a read-only one inside, too).
    btrfs.create_subvolume(child, "inner")
    btrfs.create_subvolume(child / "inner", "deeper")
    btrfs.set_readonly(child / "inner")
    before = _subvolume_paths(btrfs_fs)
    sn.remove("child")
    sn.remove("base")
    assert os.listdir(sn.snapshots_dir) == []
    gone = before - _subvolume_paths(btrfs_fs)
    assert len(gone) == 4, gone  # base, child, inner, deeper
    with pytest.raises(NotFound):
        sn.stat("base")


def test_cleanup_reclaims_orphan_subvolumes_half_made_and_read_only_ones(
    sn: BtrfsSnapshotter, btrfs_fs: Path
) -> None:
    sn.prepare("keep-a")
    sn.commit("keep", "keep-a")
    sn.prepare("active", "keep")
    snaps = sn.snapshots_dir
    owned = set(os.listdir(snaps))
    owned_subvolumes = _subvolume_paths(btrfs_fs)
    # A create killed after its snapshot, before its rename.
    (snaps / "new-900").mkdir()
    btrfs.snapshot(_fs(sn, "keep"), snaps / "new-900", "fs")
    # A create killed after the rename, before the metadata commit.
    (snaps / "901").mkdir()
    btrfs.create_subvolume(snaps / "901", "fs")
    _fill(snaps / "901" / "fs" / "f", MiB)
    # A remove killed after its metadata commit: a committed (read-only) subvolume.
    (snaps / "rm-902").mkdir()
    btrfs.create_subvolume(snaps / "rm-902", "fs")
    btrfs.create_subvolume(snaps / "rm-902" / "fs", "nested")
    btrfs.set_readonly(snaps / "rm-902" / "fs")
    # A create killed before its snapshot: nothing but the directory.
    (snaps / "new-903").mkdir()
    got = sn.cleanup()
    assert sorted(Path(p).name for p in got.paths) == ["new-900", "new-903", "rm-901", "rm-902"]
    assert got.size >= MiB
    assert set(os.listdir(snaps)) == owned
    assert _subvolume_paths(btrfs_fs) == owned_subvolumes
    assert sn.cleanup().paths == ()
    assert sn.stat("active").parent == "keep"


# -- quotas ---------------------------------------------------------------------------------


def test_size_limit_without_quotas_is_invalid_argument_naming_quotas(
    sn: BtrfsSnapshotter, btrfs_fs: Path
) -> None:
    assert not sn.quotas_enabled()
    with pytest.raises(InvalidArgument, match=r"max-size.*quotas.*quota=true"):
        sn.prepare("a", labels={MAX_SIZE_LABEL: str(32 * MiB)})
    assert os.listdir(sn.snapshots_dir) == []
    with pytest.raises(NotFound):
        sn.stat("a")
    root = _fresh(btrfs_fs)
    with pytest.raises(InvalidArgument, match=r"default_size.*quotas"):
        _open(root, default_size="64MiB")
    assert not root.exists()  # nothing made for a configuration that cannot work


def test_quota_option_turns_quotas_on(loopfs: Callable[..., Path]) -> None:
    fs = loopfs("btrfs", size="1G")
    assert not btrfs.quota_status(fs).enabled
    with _open(fs / "root", quota="true", default_size="32MiB") as s:
        assert btrfs.quota_status(fs).enabled
        assert s.quotas_enabled()
        root = Path(s.prepare("a")[0].source)
        with pytest.raises(OSError) as err:
            _fill(root / "big", 48 * MiB)
        assert err.value.errno == errno.EDQUOT


def test_writes_past_the_limit_fail_in_that_snapshot_only(qsn: BtrfsSnapshotter) -> None:
    base = Path(qsn.prepare("b-a")[0].source)
    _fill(base / "lower", 40 * MiB)  # shared with the children: not theirs to pay for
    qsn.commit("b", "b-a")
    limit = {MAX_SIZE_LABEL: str(32 * MiB)}
    small = Path(qsn.prepare("small", "b", labels=limit)[0].source)
    other = Path(qsn.prepare("other", "b", labels=limit)[0].source)
    unlimited = Path(qsn.prepare("unlimited", "b")[0].source)
    _fill(small / "half", 16 * MiB)
    with pytest.raises(OSError) as err:
        _fill(small / "too-much", 40 * MiB)
    assert err.value.errno == errno.EDQUOT
    (small / "too-much").unlink()
    btrfs.sync(small)  # freed bytes leave the qgroup at the next transaction commit
    _fill(small / "again", 8 * MiB)
    _fill(other / "f", 24 * MiB)
    _fill(unlimited / "f", 64 * MiB)
    used = qsn.usage("small").size
    assert 24 * MiB <= used < 25 * MiB
    assert 64 * MiB <= qsn.usage("unlimited").size < 65 * MiB


def test_usage_with_quotas_reads_the_qgroup_and_does_not_walk(
    qsn: BtrfsSnapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = Path(qsn.prepare("b-a")[0].source)
    for d in range(20):
        (base / f"d{d}").mkdir()
        for f in range(100):
            (base / f"d{d}" / f"f{f}").write_bytes(b"y" * 5000)
    qsn.commit("b", "b-a")
    fs = Path(qsn.prepare("big", "b")[0].source)
    _fill(fs / "mine", 3 * MiB)
    walked = disk_usage(fs)
    assert walked.inodes == 1 + 20 + 2000 + 1

    def no_walk(*args: object) -> object:
        raise AssertionError("usage with quotas walked the tree")

    monkeypatch.setattr(os, "scandir", no_walk)
    got = qsn.usage("big")
    monkeypatch.undo()
    # Exclusive bytes: what this snapshot wrote (plus the tree blocks its
    # writes copied), not the parent's 2,000 files it shares.
    assert 3 * MiB <= got.size < 4 * MiB
    assert got.size < walked.size / 3
    assert got.inodes == 0


def test_default_size_applies_to_actives_and_max_size_zero_lifts_it(
    btrfs_quota_fs: Path,
) -> None:
    with _open(_fresh(btrfs_quota_fs), default_size="16MiB") as s:
        limited = Path(s.prepare("a")[0].source)
        with pytest.raises(OSError) as err:
            _fill(limited / "f", 24 * MiB)
        assert err.value.errno == errno.EDQUOT
        free = Path(s.prepare("u", labels={MAX_SIZE_LABEL: "0"})[0].source)
        _fill(free / "f", 24 * MiB)
        with pytest.raises(InvalidArgument, match=MAX_SIZE_LABEL):
            s.prepare("bad", labels={MAX_SIZE_LABEL: "lots"})


def _qgroup_ids(fs: Path) -> set[int]:
    """Level-0 qgroup ids on ``fs``, from btrfs-progs."""
    out = subprocess.run(
        ["btrfs", "qgroup", "show", "--raw", str(fs)], check=True, capture_output=True, text=True
    ).stdout
    return {
        int(w.split("/")[1])
        for w in (ln.split()[0] for ln in out.splitlines() if ln)
        if w.startswith("0/")
    }


def test_removed_snapshots_leave_no_qgroups_behind(
    qsn: BtrfsSnapshotter, btrfs_quota_fs: Path
) -> None:
    qsn.prepare("a-a")
    qsn.commit("a", "a-a")
    qsn.prepare("b", "a", labels={MAX_SIZE_LABEL: str(32 * MiB)})
    ids = {btrfs.subvolume_id(_fs(qsn, k)) for k in ("a", "b")}
    assert ids <= _qgroup_ids(btrfs_quota_fs)
    qsn.remove("b")
    qsn.remove("a")
    assert set(qsn._stale_qgroups.pending()) == ids  # remembered across restarts, too
    # btrfs drops deleted subvolumes in the background, after a transaction
    # commit wakes its cleaner; wait for that, as cleanup's next pass would.
    btrfs.sync(btrfs_quota_fs)
    subprocess.run(["btrfs", "subvolume", "sync", str(btrfs_quota_fs)], check=True)
    qsn.cleanup()
    assert not ids & _qgroup_ids(btrfs_quota_fs)
    assert qsn._stale_qgroups.pending() == []


def test_a_failing_commit_never_thaws_one_under_way(
    sn: BtrfsSnapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two commits of one key: the loser's clean-up must not undo the winner's flag."""
    sn.prepare("taken-a")
    sn.commit("taken", "taken-a")
    fs = Path(sn.prepare("a")[0].source)
    in_flush = threading.Event()
    real_sync = btrfs.sync

    def slow_sync(path: object) -> None:
        in_flush.set()  # the winner has set the flag and is flushing
        time.sleep(0.3)
        real_sync(path)  # type: ignore[arg-type]

    monkeypatch.setattr(btrfs, "sync", slow_sync)
    winner = threading.Thread(target=sn.commit, args=("c", "a"))
    winner.start()
    assert in_flush.wait(10)
    with pytest.raises(AlreadyExists):
        sn.commit("taken", "a")  # fails while the winner is between flag and metadata
    winner.join()
    assert sn.stat("c").kind.value == "committed"
    assert btrfs.is_readonly(fs)


def test_opening_reaps_leftover_read_only_subvolumes(btrfs_fs: Path) -> None:
    """A remove killed after its commit: the next process deletes its read-only subvolume."""
    root = _fresh(btrfs_fs)
    with _open(root) as s:
        s.prepare("keep")
    aside = root / "snapshots" / "rm-77"
    aside.mkdir()
    btrfs.create_subvolume(aside, "fs")
    (aside / "fs" / "f").write_text("x")
    btrfs.set_readonly(aside / "fs")
    with _open(root) as s:
        assert s.stat("keep").kind.value == "active"
    assert not aside.exists()  # gone at close, without a cleanup() call


def test_check_finds_lost_subvolumes_and_wrong_read_only_flags(btrfs_fs: Path) -> None:
    root = _fresh(btrfs_fs)
    with _open(root) as s:
        s.prepare("lost")
        s.prepare("frozen")
        s.prepare("c-a")
        s.commit("c", "c-a")
        s.view("v", "c")  # binds its parent: nothing of its own to check
        lost, frozen, committed = _fs(s, "lost"), _fs(s, "frozen"), _fs(s, "c")
    assert check(root, "btrfs").healthy
    btrfs.destroy_subvolume(lost.parent, "fs")
    btrfs.set_readonly(frozen)  # a commit killed after its flag
    btrfs.set_readonly(committed, False)
    found = {(f.code, f.where) for f in check(root, "btrfs").findings}
    assert found == {
        ("missing-subvolume", f"snapshots/{lost.parent.name}/fs"),
        ("read-only-active", f"snapshots/{frozen.parent.name}/fs"),
        ("writable-layer", f"snapshots/{committed.parent.name}/fs"),
    }

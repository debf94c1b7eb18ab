"""``stratasnap check [--repair]``: its findings, that it changes nothing, what repair does."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratasnap import open_snapshotter
from stratasnap.check import check, repair
from stratasnap.defaults import LOCK_NAME
from stratasnap.errors import FailedPrecondition, NotFound
from stratasnap.findings import Finding, Repair


@pytest.fixture
def root(scratch: Path) -> Path:
    """A native root: base (committed) <- ctr (active), and a view."""
    r = scratch / "root"
    with open_snapshotter(r) as sn:
        sn.prepare("layer")
        sn.commit("base", "layer")
        sn.prepare("ctr", "base")
        sn.view("ro", "base")
    return r


def codes(findings: tuple[Finding, ...]) -> list[tuple[str, str, Repair]]:
    return sorted((f.code, f.where, f.repair) for f in findings)


def tree(path: Path) -> list[str]:
    # SQLite's WAL index files may appear when any reader opens the store (a
    # read-only one too); they hold no data of their own.
    return sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.name not in ("metadata.db-wal", "metadata.db-shm")
    )


def test_healthy_root(root: Path) -> None:
    report = check(root)
    assert report.healthy and report.findings == () and report.snapshots == 3


def test_no_store_is_not_found(scratch: Path) -> None:
    with pytest.raises(NotFound, match="no snapshot store"):
        check(scratch / "nothing")
    with pytest.raises(NotFound, match="no snapshot store"):
        repair(scratch / "nothing")
    assert not (scratch / "nothing").exists()


def test_leftovers_are_found_without_changing_anything_then_repaired(root: Path) -> None:
    snaps = root / "snapshots"
    (snaps / "999").mkdir()  # orphan: renamed into place, then killed before the commit
    (snaps / "999" / "file").write_text("x")
    (snaps / "new-1000").mkdir()  # a create killed half-way
    (snaps / "rm-1001").mkdir()  # a remove whose delete never happened
    os.rename(snaps / "2", snaps / "rm-2")  # a remove killed before its commit: ctr is alive
    (snaps / "stray.txt").write_text("?")  # not ours: a person decides
    db = (root / "metadata.db").read_bytes()
    before = tree(root)

    report = check(root)
    assert codes(report.findings) == [
        ("interrupted-create", "snapshots/new-1000", Repair.RECLAIM),
        ("interrupted-remove", "snapshots/rm-1001", Repair.RECLAIM),
        ("interrupted-remove", "snapshots/rm-2", Repair.RESTORE),
        ("orphan-storage", "snapshots/999", Repair.RECLAIM),
        ("unknown-entry", "snapshots/stray.txt", Repair.PERSON),
    ]
    assert not report.healthy
    assert tree(root) == before and (root / "metadata.db").read_bytes() == db

    fixed = repair(root)
    assert codes(fixed.repaired) == codes(report.findings)[:4]
    assert codes(fixed.remaining) == [("unknown-entry", "snapshots/stray.txt", Repair.PERSON)]
    assert sorted(os.listdir(snaps)) == ["1", "2", "3", "stray.txt"]
    with open_snapshotter(root) as sn:
        assert sn.stat("ctr").parent == "base"  # its storage is back
    (snaps / "stray.txt").unlink()
    assert check(root).healthy


def test_a_create_in_progress_is_not_a_finding(root: Path) -> None:
    work = root / "snapshots" / "new-55"
    work.mkdir()
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live create holds
        assert check(root).healthy
        assert repair(root).healthy and work.is_dir()
    finally:
        os.close(fd)
    assert [f.code for f in check(root).findings] == ["interrupted-create"]


def test_missing_committed_storage_needs_a_person(root: Path) -> None:
    base = root / "snapshots" / "1"
    (base / "kept").write_text("the layer's own file")
    os.rename(base, root.parent / "elsewhere")
    (finding,) = check(root).findings
    assert (finding.code, finding.where, finding.repair) == (
        "missing-storage",
        "snapshots/1",
        Repair.PERSON,
    )
    assert 'snapshot "base" has no storage (its data is lost' in finding.what
    assert not repair(root).healthy
    assert not base.exists()  # a committed layer is never made up


def test_missing_active_storage_is_rebuilt_by_repair(root: Path) -> None:
    (root / "snapshots" / "1" / "f").write_text("from the parent")
    os.rename(root / "snapshots" / "2", root.parent / "elsewhere")
    (finding,) = check(root).findings
    assert (finding.code, finding.where, finding.repair) == (
        "unbuilt-storage",
        "snapshots/2",
        Repair.REBUILD,
    )
    assert 'active snapshot "ctr" has no storage' in finding.what
    report = repair(root)
    assert report.healthy and report.repaired == (finding,)
    # native: the active snapshot is a copy of its parent again.
    assert (root / "snapshots" / "2" / "f").read_text() == "from the parent"


def test_parent_problems_in_the_store(root: Path) -> None:
    conn = sqlite3.connect(root / "metadata.db")
    with conn:
        # base <- x <- y <- base: a cycle; z's parent is an active snapshot; w's is gone.
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.executescript(
            """
            INSERT INTO snapshots (id, key, kind, parent_id, created_ns, updated_ns)
              VALUES (10, 'x', 'committed', 1, 0, 0), (11, 'y', 'committed', 10, 0, 0),
                     (12, 'z', 'active', 2, 0, 0), (13, 'w', 'active', 4242, 0, 0);
            UPDATE snapshots SET parent_id = 11 WHERE id = 1;
            """
        )
    conn.close()
    for sid in (10, 11, 12, 13):
        (root / "snapshots" / str(sid)).mkdir()
    found = check(root).findings
    by_code = {f.code: f for f in found}
    assert set(by_code) == {"store", "missing-parent", "bad-parent", "parent-cycle"}
    assert "4242" in by_code["missing-parent"].what
    assert by_code["bad-parent"].where == 'snapshot "z"'
    assert by_code["parent-cycle"].what == 'parents form a cycle: "base" -> "y" -> "x"'
    assert all(f.repair is Repair.PERSON for f in found)


def test_a_corrupt_store_is_a_finding(root: Path) -> None:
    db = root / "metadata.db"
    with open_snapshotter(root) as sn:  # enough rows for several b-tree pages
        for i in range(300):
            sn.prepare(f"k{i}", labels={"pad": "p" * 200})
    data = bytearray(db.read_bytes())
    data[8192:12288] = b"\xff" * 4096  # one page of the tables overwritten
    db.write_bytes(bytes(data))
    report = check(root)
    assert any(f.code == "store" for f in report.findings)
    assert not report.healthy


def test_repair_is_refused_while_a_server_holds_the_root(root: Path) -> None:
    (root / "snapshots" / "999").mkdir()
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4321\n", 0)
        assert [f.code for f in check(root).findings] == ["orphan-storage"]  # read-only is fine
        with pytest.raises(FailedPrecondition, match=r"server \(pid 4321\) is serving"):
            repair(root)
        assert (root / "snapshots" / "999").is_dir()
    finally:
        os.close(fd)
    assert repair(root).healthy


def test_overlay_layers_without_their_upper(scratch: Path) -> None:
    root = scratch / "ov"
    with open_snapshotter(root, "overlay") as sn:
        sn.prepare("a")
        sn.prepare("b")
    os.rmdir(root / "snapshots" / "2" / "fs")
    (finding,) = check(root, "overlay").findings
    assert (finding.code, finding.where) == ("missing-upper", "snapshots/2/fs")
    assert check(root, "native").healthy  # native knows no fs/ directory


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stratasnap", "--root", str(root), "check", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_exit_codes_and_json(root: Path) -> None:
    ok = run_cli(root)
    assert ok.returncode == 0, ok.stderr
    assert "healthy" in ok.stdout
    (root / "snapshots" / "999").mkdir()
    bad = run_cli(root, "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["healthy"] is False
    assert [f["code"] for f in report["remaining"]] == ["orphan-storage"]
    assert report["remaining"][0]["repair"] == "reclaim"
    fixed = run_cli(root, "--repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired  orphan-storage" in fixed.stdout
    assert "--repair" in run_cli(root, "--help").stdout


@pytest.fixture
def blockfile_root(scratch: Path) -> Iterator[Path]:
    from conftest import need

    from stratasnap.fs.image import find_tool

    try:
        find_tool("mkfs.ext4")
    except FileNotFoundError:
        need(False, "mkfs.ext4 not installed")
    root = scratch / "bf"
    with open_snapshotter(root, "blockfile", scratch_size="64M") as sn:
        sn.prepare("a")
        sn.commit("c", "a")
        sn.view("v", "c")
    yield root


def test_blockfile_images_must_hold_a_filesystem(blockfile_root: Path) -> None:
    assert check(blockfile_root, "blockfile").healthy
    image = blockfile_root / "snapshots" / "1" / "rootfs.img"
    with open(image, "r+b") as f:
        f.write(b"\0" * 4096)  # the superblock is gone
    (finding,) = check(blockfile_root, "blockfile").findings
    assert (finding.code, finding.where) == ("bad-image", "snapshots/1/rootfs.img")
    assert finding.repair is Repair.PERSON


def test_a_backend_adds_its_own_checks_through_the_hook(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from stratasnap.backends import BACKENDS
    from stratasnap.backends.native import NativeSnapshotter
    from stratasnap.findings import Survey
    from stratasnap.types import Kind

    class SealedSnapshotter(NativeSnapshotter):
        """A backend of the future: committed layers carry a seal file that check verifies."""

        backend_name = "sealed"

        @classmethod
        def _check(cls, survey: Survey) -> Iterator[Finding]:
            yield from super()._check(survey)
            for sid, row in survey.rows.items():
                seal = survey.snapshots_dir / str(sid) / "seal"
                if row.kind is Kind.COMMITTED and not seal.exists():
                    yield Finding("unsealed-layer", f"snapshots/{sid}", f"{row.key} has no seal")

    monkeypatch.setitem(globals(), "SealedSnapshotter", SealedSnapshotter)
    monkeypatch.setitem(BACKENDS, "sealed", f"{__name__}:SealedSnapshotter")
    (root / "snapshots" / "999").mkdir()
    found = codes(check(root, "sealed").findings)
    assert found == [
        ("orphan-storage", "snapshots/999", Repair.RECLAIM),  # the layout's check still runs
        ("unsealed-layer", "snapshots/1", Repair.PERSON),
    ]
    assert codes(check(root, "native").findings) == found[:1]

"""``stratasnap check`` on erofs roots: layer images missing, corrupt, or half-committed.

Real images on tmpfs (mounted through loop devices); a corrupt image is made
by flipping one byte of the file after clearing its immutable flag.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import need_root

from stratasnap import Kind, open_snapshotter
from stratasnap.backends.erofs import DIGEST_DETAIL, IMAGE, ErofsSnapshotter
from stratasnap.check import check, repair
from stratasnap.cli import cli
from stratasnap.findings import Finding, Repair
from stratasnap.fs.erofs_image import file_sha256, is_immutable, set_immutable
from stratasnap.fs.mount import bind, is_mountpoint, unmount, unmount_all_under
from stratasnap.testing import mounted

pytestmark = pytest.mark.privileged


@pytest.fixture
def root(scratch: Path) -> Iterator[Path]:
    """An erofs root: ``base`` (committed, sealed) <- ``top`` (committed) <- ``ctr`` (active)."""
    need_root()
    root = scratch / "root"
    with open_snapshotter(root, "erofs", immutable=True) as sn:
        with mounted(sn.prepare("base-a"), scratch) as r:
            (r / "data").write_bytes(b"base layer " * 4096)
        sn.commit("base", "base-a")
        with mounted(sn.prepare("top-a", "base"), scratch) as r:
            (r / "top").write_text("top layer")
        sn.commit("top", "top-a")
        sn.prepare("ctr", "top")
    try:
        yield root
    finally:
        unmount_all_under(root, lazy=True)


def _storage(root: Path, key: str) -> Path:
    with open_snapshotter(root, "erofs") as sn:
        assert isinstance(sn, ErofsSnapshotter)
        with sn._store.read() as tx:
            return sn.storage_dir(tx.get(key).id)


def _codes(findings: tuple[Finding, ...]) -> set[tuple[str, str, Repair]]:
    return {(f.code, f.where, f.repair) for f in findings}


def _where(storage: Path, name: str = IMAGE) -> str:
    return f"snapshots/{storage.name}/{name}"


def test_a_healthy_root_is_healthy_with_and_without_deep(root: Path) -> None:
    assert check(root, "erofs").healthy
    assert check(root, "erofs", deep=True).healthy


def test_deep_check_finds_a_flipped_byte_and_repair_leaves_the_layer(root: Path) -> None:
    storage = _storage(root, "base")
    image = storage / IMAGE
    with open_snapshotter(root, "erofs") as sn:
        recorded = sn.details("base")[DIGEST_DETAIL]
    assert is_immutable(image)
    set_immutable(image, False)  # as an intruder (or a bad disk) would get past it
    with open(image, "r+b") as f:
        f.seek(os.path.getsize(image) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    actual = "sha256:" + file_sha256(image)

    assert check(root, "erofs").healthy  # without --deep no image is read
    [finding] = check(root, "erofs", deep=True).findings
    assert (finding.code, finding.where, finding.repair) == (
        "digest-mismatch",
        _where(storage),
        Repair.PERSON,
    )
    assert '"base"' in finding.what and recorded in finding.what and actual in finding.what

    # --repair never deletes a layer (here the parent of "top" and "ctr").
    report = repair(root, "erofs", {"immutable": True}, deep=True)
    assert report.remaining == (finding,) and not report.repaired
    assert image.exists()
    with open_snapshotter(root, "erofs") as sn:
        assert {i.name for i in sn.walk()} == {"base", "top", "ctr"}

    # The CLI says the same, with the exit status of problems remaining.
    args = ["--root", str(root), "--backend", "erofs", "check", "--deep", "--json"]
    got = CliRunner().invoke(cli, args)
    assert got.exit_code == 1, got.output
    [reported] = json.loads(got.output)["remaining"]
    assert reported["code"] == "digest-mismatch" and actual in reported["what"]


def test_a_missing_image_is_found_and_left_to_a_person(root: Path) -> None:
    storage = _storage(root, "top")
    if is_mountpoint(storage / "fs"):
        unmount(storage / "fs")
    set_immutable(storage / IMAGE, False)
    os.unlink(storage / IMAGE)
    report = check(root, "erofs")
    assert _codes(report.findings) == {("missing-image", _where(storage), Repair.PERSON)}
    assert '"top"' in report.findings[0].what
    after = repair(root, "erofs", {"immutable": True})
    assert not after.healthy and not after.repaired
    with open_snapshotter(root, "erofs") as sn:
        assert sn.stat("top").kind is Kind.COMMITTED and sn.stat("ctr").parent == "top"


def test_a_half_finished_commit_is_found_and_finished_by_repair(root: Path) -> None:
    """A commit killed after the store committed (the old upper still there, the image
    not mounted) and one killed before (a spare image beside an active upper)."""
    # (Storage paths first: opening the store, as _storage() does, finishes commits.)
    base, top, ctr = (_storage(root, key) for key in ("base", "top", "ctr"))
    unmount(top / "fs")
    os.rename(top / "fs", top / "upper.old")  # as step 4 of a commit leaves it
    (top / "upper.old" / "top").write_text("top layer")
    shutil.copyfile(base / IMAGE, ctr / IMAGE)
    report = check(root, "erofs")
    assert _codes(report.findings) == {
        ("unsettled-layer", f"snapshots/{top.name}", Repair.FINISH),
        ("spare-image", _where(ctr), Repair.FINISH),
    }
    fixed = repair(root, "erofs", {"immutable": True}, deep=True)
    assert fixed.healthy, fixed.remaining
    assert len(fixed.repaired) == 2
    assert sorted(os.listdir(top)) == ["fs", IMAGE] and not (ctr / IMAGE).exists()
    with open_snapshotter(root, "erofs") as sn:
        view = sn.view("look", "top")
        with mounted(view, root.parent) as r:
            assert (r / "top").read_text() == "top layer"
        sn.remove("look")


def test_something_else_mounted_on_a_layer_is_found(root: Path, scratch: Path) -> None:
    top = _storage(root, "top")
    with open_snapshotter(root, "erofs") as sn:
        assert isinstance(sn, ErofsSnapshotter)
        sn.mount_layers()  # every image mounted: none of those is a finding
    assert check(root, "erofs").healthy
    unmount(top / "fs")
    other = scratch / "other"
    other.mkdir()
    bind(other, top / "fs")
    report = check(root, "erofs")
    assert _codes(report.findings) == {("wrong-mount", f"snapshots/{top.name}/fs", Repair.PERSON)}
    what = report.findings[0].what
    assert '"top"' in what and "tmpfs from tmpfs" in what and f"/{other.parent.name}/other" in what


def test_file_backed_layers_on_ext4_are_healthy(loopfs: Callable[..., Path]) -> None:
    """On ext4 the images are mounted from the file itself (Linux 6.12+), else by loop."""
    need_root()
    root = loopfs("ext4", size="256M") / "root"
    with open_snapshotter(root, "erofs") as sn:
        assert isinstance(sn, ErofsSnapshotter)
        sn.prepare("a")
        sn.commit("base", "a")
        sn.prepare("ctr", "base")
        assert sn.mount_layers() == 0  # the commit mounted it
    assert check(root, "erofs", deep=True).healthy
    unmount_all_under(root)

"""``stratasnap … --mount TARGET`` and the printed ``mount`` commands, really mounted (root)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_root

BIN = Path(sys.executable).parent / "stratasnap"
CMD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "stratasnap"]

pytestmark = pytest.mark.privileged


def stratasnap(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CMD, "--root", str(root), *args], capture_output=True, text=True)
    assert "Traceback" not in r.stderr, r.stderr
    if ok:
        assert r.returncode == 0, (args, r.returncode, r.stderr)
    return r


@pytest.fixture
def root(scratch: Path) -> Path:
    need_root()
    return scratch / "store"


@pytest.fixture
def target(scratch: Path) -> Iterator[Path]:
    t = scratch / "mnt"
    t.mkdir()
    yield t
    while ismount(t):
        subprocess.run(["umount", str(t)], check=True)


def ismount(path: Path) -> bool:
    """Also true for a bind mount from the same filesystem (os.path.ismount is not)."""
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)
    assert not ismount(path)


def test_prepare_mount_is_writable_and_commit_keeps_what_was_written(
    root: Path, target: Path
) -> None:
    r = stratasnap(root, "prepare", "w", "--mount", str(target), "--label", "a=b")
    assert r.stdout == ""
    assert ismount(target)
    (target / "file").write_text("data")
    (target / "dir").mkdir()
    umount(target)
    stratasnap(root, "commit", "c", "w")

    stratasnap(root, "prepare", "child", "c", "--mount", str(target))
    assert (target / "file").read_text() == "data"
    (target / "file").write_text("changed")
    umount(target)

    stratasnap(root, "view", "v", "c", "--mount", str(target))
    assert (target / "file").read_text() == "data"  # the child's write stayed in the child
    with pytest.raises(OSError) as exc:
        (target / "new").write_text("x")
    assert exc.value.errno == errno.EROFS
    umount(target)


def test_printed_mount_commands_really_mount(root: Path, target: Path) -> None:
    stratasnap(root, "prepare", "k")
    cmd = stratasnap(root, "mounts", "k", str(target)).stdout
    subprocess.run(["sh", "-ec", cmd], check=True)
    assert ismount(target)
    (target / "via-sh").write_text("1")
    umount(target)
    stratasnap(root, "commit", "c", "k")
    stratasnap(root, "view", "v", "c", "--mount", str(target))
    assert (target / "via-sh").read_text() == "1"


def test_a_failed_mount_removes_the_new_snapshot(root: Path, target: Path) -> None:
    # Root inside a new user namespace but not a new mount namespace: mount(2) is refused.
    unshare = shutil.which("unshare")
    need(unshare is not None, "unshare (util-linux) not installed")
    assert unshare is not None
    probe = subprocess.run([unshare, "--user", "--map-root-user", "true"], capture_output=True)
    need(probe.returncode == 0, "user namespaces not available")
    stratasnap(root, "prepare", "l")  # create the store outside the namespace
    stratasnap(root, "commit", "base", "l")
    r = subprocess.run(
        [
            unshare,
            "--user",
            "--map-root-user",
            *CMD,
            "--root",
            str(root),
            "prepare",
            "k",
            "base",
            "--mount",
            str(target),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f'stratasnap: mounting snapshot "k" at {target}: '
    ), r.stderr
    assert lines[0].endswith("the snapshot was removed again")
    assert not ismount(target)
    assert stratasnap(root, "info", "k", ok=False).returncode == 4
    assert stratasnap(root, "ls").stdout.split()[3:] == ["base", "committed"]


def test_mount_target_must_be_an_existing_directory(root: Path, scratch: Path) -> None:
    r = stratasnap(root, "prepare", "k", "--mount", str(scratch / "missing"), ok=False)
    assert r.returncode == 2 and "Usage:" in r.stderr
    assert not root.exists()


def test_mount_of_an_idmapped_overlay_snapshot(root: Path, target: Path) -> None:
    """--mount applies the uidmap=/gidmap= options of a snapshot with mapping labels."""
    import os

    overlay = ("--backend", "overlay")
    stratasnap(root, *overlay, "prepare", "base-a", "--mount", str(target))
    (target / "f").write_text("x")
    umount(target)
    stratasnap(root, *overlay, "commit", "base", "base-a")
    stratasnap(
        root,
        *overlay,
        "prepare",
        "ctr",
        "base",
        "--label",
        "containerd.io/snapshot/uidmapping=0:100000:65536",
        "--label",
        "containerd.io/snapshot/gidmapping=0:200000:65536",
        "--mount",
        str(target),
    )
    st = os.stat(target / "f")
    assert (st.st_uid, st.st_gid) == (100000, 200000)

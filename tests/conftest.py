"""Shared fixtures: fast scratch filesystems for tests.

The machine's root filesystem creates files 20-100x slower than a fresh
filesystem, so tests that make files work on tmpfs (or a loop filesystem
they make) when they can: as root we mount one; otherwise pytest's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, but fail under CI=true.

    CI runs as root with every tool installed, so a missing prerequisite
    there is a broken CI set-up, not a reason to skip silently.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {reason}")
    pytest.skip(reason)


def need_kernel(condition: bool, feature: str) -> None:
    """Skip, even under CI, when the running kernel lacks ``feature``.

    ``condition`` comes from a probe of the feature, never from the kernel
    version (distributions backport). Unlike a missing tool, a missing
    kernel feature is not a broken CI set-up: Debian 12 runs Linux 6.1, and
    the skip names what the test would need.
    """
    if not condition:
        pytest.skip(f"this kernel lacks {feature}")


def user_xattrs_work(directory: Path) -> bool:
    """Whether ``user.*`` xattrs can be set in ``directory`` (tmpfs: Linux 6.6 and later)."""
    probe = directory / ".user-xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def need_root() -> None:
    need(IS_ROOT, "needs root (mounts, loop devices)")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture(scope="session")
def _scratch_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="stratasnap-tests-"))
    mounted = False
    if IS_ROOT:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8g,mode=0755", "tmpfs", str(base)],
            capture_output=True,
        )
        mounted = r.returncode == 0
    try:
        yield base
    finally:
        if mounted:
            _detach_below(base)
            _umount(base)
        shutil.rmtree(base, ignore_errors=True)


def _detach_below(directory: Path) -> int:
    """Lazily detach every mount below ``directory`` (deepest first); how many."""
    count = 0
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        mnt = line.split()[1].encode().decode("unicode_escape")
        if mnt.startswith(str(directory) + "/"):
            _umount(Path(mnt))
            count += 1
    return count


@pytest.fixture
def scratch(_scratch_base: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh empty directory on tmpfs (as root) or under tmp (otherwise).

    Emptied after the test, with whatever it left mounted below detached: a
    full run would otherwise keep every test's data in RAM (tmpfs) and every
    committed erofs layer on a loop device until the session ends.
    """
    d = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=_scratch_base))
    yield d
    if IS_ROOT:
        _detach_below(d)
    shutil.rmtree(d, ignore_errors=True)


def make_loopfs(
    work: Path, fs_type: str = "ext4", size: str = "2G", mkfs_args: tuple[str, ...] = ()
) -> Path:
    """Make a ``fs_type`` filesystem in a sparse file under ``work``, loop-mount it, return it.

    Needs root; skips (or fails under CI) otherwise, or when mkfs is missing.
    Undo with :func:`unmount_loopfs`.
    """
    need_root()
    mkfs = shutil.which(f"mkfs.{fs_type}")
    need(mkfs is not None, f"mkfs.{fs_type} not installed")
    assert mkfs is not None
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    quiet = {"ext4": ["-q", "-F", "-m", "0"], "xfs": ["-q", "-f"], "btrfs": ["-q", "-f"]}
    subprocess.run([mkfs, *quiet.get(fs_type, []), *mkfs_args, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    return mnt


def unmount_loopfs(mnt: Path) -> None:
    """Unmount what tests left below ``mnt``, then ``mnt`` (its loop device goes with it)."""
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        m = line.split()[1]
        if m.startswith(str(mnt) + "/"):
            _umount(Path(m))
    subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


@pytest.fixture
def loopfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """Factory: ``loopfs("xfs", size="1G")`` makes, loop-mounts and returns a fresh filesystem.

    Needs root; skips (or fails under CI) otherwise, or when mkfs is missing.
    """
    made: list[Path] = []

    def make(fs_type: str = "ext4", size: str = "2G", mkfs_args: tuple[str, ...] = ()) -> Path:
        mnt = make_loopfs(tmp_path_factory.mktemp(f"loop-{fs_type}"), fs_type, size, mkfs_args)
        made.append(mnt)
        return mnt

    yield make
    for mnt in reversed(made):
        unmount_loopfs(mnt)


def _btrfs_module_fs(factory: pytest.TempPathFactory, quota: bool) -> Iterator[Path]:
    mnt = make_loopfs(factory.mktemp("loop-btrfs"), "btrfs", "2G")
    try:
        if quota:
            subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True)
            # Until the first rescan ends the numbers are marked inconsistent
            # (and the backend walks instead of reading them).
            subprocess.run(["btrfs", "quota", "rescan", "-W", str(mnt)], check=True)
        yield mnt
    finally:
        unmount_loopfs(mnt)


@pytest.fixture(scope="module")
def btrfs_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh 2 GB btrfs loop filesystem (quotas off), shared by one test module."""
    yield from _btrfs_module_fs(tmp_path_factory, quota=False)


@pytest.fixture(scope="module")
def btrfs_quota_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh 2 GB btrfs loop filesystem with quotas (qgroups) on, shared by one module."""
    yield from _btrfs_module_fs(tmp_path_factory, quota=True)


@pytest.fixture
def store_root(scratch: Path, request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """``store_root(backend)``: where a test's snapshot root for ``backend`` goes.

    On the tmpfs of ``scratch``, except for backends that need a filesystem
    of their own: btrfs gets a directory on the module's btrfs loop filesystem.
    """

    def make(backend: str) -> Path:
        if backend == "btrfs":
            fs: Path = request.getfixturevalue("btrfs_fs")
            return Path(tempfile.mkdtemp(dir=fs)) / "root"
        return scratch / "root"

    return make

"""Filesystem images: make one (mkfs), grow one, tell its type, count its inodes.

A blockfile snapshot is one image file holding an ext4 or xfs filesystem.
Making and growing images needs the filesystem's own tools (e2fsprogs,
xfsprogs); everything else here reads the superblock directly, so that
``mounts()`` and ``usage()`` cost one ``pread`` and no subprocess.

Every failure is an :class:`OSError`: a missing tool is :class:`MissingTool`
(it names the Debian package to install), a tool that fails is
:class:`ToolFailed` carrying the end of its stderr, and one that runs past
:data:`TOOL_TIMEOUT_S` is killed (ETIMEDOUT).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import loop
from ._libc import StrPath
from .mount import mount, unmount
from .mountinfo import read_mountinfo
from .usage import fsync_path

__all__ = [
    "FS_TYPES",
    "TOOL_TIMEOUT_S",
    "MissingTool",
    "ToolFailed",
    "find_tool",
    "grow_image",
    "has_lost_found",
    "image_mountpoints",
    "make_image",
    "probe_fs_type",
    "remove_lost_found",
    "used_inodes",
]

#: The filesystems an image may hold.
FS_TYPES = ("ext4", "xfs")

#: Which Debian package ships each tool we run.
PACKAGES = {
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_growfs": "xfsprogs",
}

#: Seconds mkfs, e2fsck, resize2fs or xfs_growfs may run before it is killed and
#: the call fails with ETIMEDOUT: a hung tool (a stuck loop device, a disk that
#: stopped answering) must fail the call, not hold a server worker forever.
#: Generous: checking and growing a large image on a slow disk takes minutes.
TOOL_TIMEOUT_S = 600.0

#: mkfs arguments that come before the caller's own.
#: ext4: no reserved blocks (nobody logs in as root to a container rootfs);
#: no discard (it would only punch holes into a file that is all holes), and
#: lazy inode table and journal initialisation so that the image stays
#: sparse: a 10 GiB template then allocates 4 MB, not 240 MB (python-baselines 4d).
#: xfs: -K, no discard, for the same reason.
MKFS_ARGS: dict[str, tuple[str, ...]] = {
    "ext4": ("-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"),
    "xfs": ("-q", "-f", "-K"),
}


# Non-root PATHs usually lack the sbin directories where these tools live.
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# ext2/3/4: the superblock is at byte 1024; magic 0xEF53 at offset 56 (le16),
# s_inodes_count at 0 and s_free_inodes_count at 16 (le32).
_EXT_SB = 1024
_EXT_MAGIC = 0xEF53
# xfs: the superblock is at byte 0, magic "XFSB", sb_icount and sb_ifree
# (be64) at 128 and 136.
_XFS_MAGIC = b"XFSB"
_XFS_COUNTS = struct.Struct(">QQ")


class MissingTool(FileNotFoundError):
    """A filesystem tool is not installed; the message names the Debian package."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.package = PACKAGES.get(tool, "")
        hint = f" (install the Debian package {self.package})" if self.package else ""
        super().__init__(errno.ENOENT, f"{tool} not found{hint}", tool)


class ToolFailed(OSError):
    """A filesystem tool exited with an error; the message ends with its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        tool = Path(argv[0]).name
        detail = f"{tool} exited with {returncode}"
        said = _gist(stderr, tool)
        super().__init__(errno.EIO, f"{detail}: {said}" if said else detail, argv[-1])


def _gist(output: str, tool: str) -> str:
    """The lines of a tool's stderr that say what went wrong.

    The e2fsprogs tools start with a version banner and mkfs.xfs follows its
    complaint with a page of usage: neither says anything.
    """
    banner = re.compile(rf"{re.escape(tool)} [0-9][0-9.]* \(.*\)")
    lines: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("Usage:"):
            break
        if line and not banner.fullmatch(line):
            lines.append(line)
    return " / ".join(lines[:3])


def find_tool(name: str) -> str:
    """The path of tool ``name`` (searching the sbin directories too), or MissingTool."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if found is None:
        raise MissingTool(name)
    return found


def _run(argv: Sequence[str], ok: tuple[int, ...] = (0,)) -> str:
    """Run a tool (killed after TOOL_TIMEOUT_S); its stdout, or ToolFailed."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            timeout=TOOL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        # subprocess.run has killed it; the caller's cleanup removes its half-made image.
        tool = Path(argv[0]).name
        raise OSError(
            errno.ETIMEDOUT, f"{tool} did not finish in {TOOL_TIMEOUT_S:g} s (killed)", argv[-1]
        ) from None
    if proc.returncode not in ok:
        raise ToolFailed(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def _check_type(fs_type: str) -> None:
    if fs_type not in FS_TYPES:
        raise OSError(errno.EINVAL, f"unsupported filesystem type {fs_type!r} (use ext4 or xfs)")


def make_image(
    path: StrPath, size: int, fs_type: str = "ext4", mkfs_args: Sequence[str] = ()
) -> None:
    """Make a sparse image of ``size`` bytes at ``path`` holding a fresh ``fs_type``.

    The image is built under a temporary name next to ``path``, fsynced, and
    renamed into place (replacing an older one), so ``path`` is either the
    old file or a complete new one; on any failure the temporary file goes.
    """
    _check_type(fs_type)
    mkfs = find_tool(f"mkfs.{fs_type}")
    dst = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    try:
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        _run([mkfs, *MKFS_ARGS[fs_type], *mkfs_args, tmp])
        if fs_type == "ext4":
            remove_lost_found(tmp)
        fsync_path(tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(dst.parent)


def _superblock_head(path: StrPath) -> bytes:
    """The image's first bytes: enough for the xfs and the ext superblock fields we read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, _EXT_SB + 64, 0)
    finally:
        os.close(fd)


def probe_fs_type(path: StrPath) -> str | None:
    """``"ext4"`` or ``"xfs"`` from the image's superblock magic; None for anything else."""
    head = _superblock_head(path)
    if head[:4] == _XFS_MAGIC:
        return "xfs"
    if len(head) >= _EXT_SB + 58:
        (magic,) = struct.unpack_from("<H", head, _EXT_SB + 56)
        if magic == _EXT_MAGIC:
            return "ext4"  # ext2/3 images mount as ext4 too
    return None


def used_inodes(path: StrPath) -> int:
    """Inodes in use in the image's filesystem, as its superblock records them.

    The kernel writes these counters back at unmount (and at sync), so for a
    mounted image prefer ``statvfs`` of its mount point (see
    :func:`image_mountpoints`). Unknown image types count 0.
    """
    head = _superblock_head(path)
    if head[:4] == _XFS_MAGIC:
        icount, ifree = _XFS_COUNTS.unpack_from(head, 128)
        return max(int(icount) - int(ifree), 0)
    if len(head) >= _EXT_SB + 58 and struct.unpack_from("<H", head, _EXT_SB + 56)[0] == _EXT_MAGIC:
        count, free = struct.unpack_from("<I12xI", head, _EXT_SB)
        return max(int(count) - int(free), 0)
    return 0


def image_mountpoints(path: StrPath) -> list[Path]:
    """Where the image is mounted now, through any loop device backed by it."""
    devices = {str(dev) for dev in loop.loop_devices_for(path)}
    if not devices:
        return []
    return [m.mountpoint for m in read_mountinfo() if m.source in devices]


def grow_image(path: StrPath, size: int, fs_type: str | None = None) -> None:
    """Grow the image file to ``size`` bytes and its filesystem to fill it.

    ext4 is grown offline: ``e2fsck -f -p`` first (resize2fs insists on a
    checked filesystem, and a copy of a layer that was committed while
    mounted may have a journal to replay), then ``resize2fs``. xfs can only
    grow while mounted, so it is loop-mounted on a temporary directory next
    to the image for ``xfs_growfs`` (this needs root). The image must not be
    mounted elsewhere. Shrinking is refused with EINVAL.
    """
    fs_type = fs_type or probe_fs_type(path)
    if fs_type is None:
        raise OSError(errno.EINVAL, "not an ext4 or xfs image", os.fspath(path))
    _check_type(fs_type)
    current = os.stat(path).st_size
    if size < current:
        raise OSError(errno.EINVAL, f"cannot shrink an image of {current} bytes to {size}")
    if fs_type == "ext4":
        e2fsck, resize2fs = find_tool("e2fsck"), find_tool("resize2fs")
    else:
        growfs = find_tool("xfs_growfs")
    if size == current:
        return
    os.truncate(path, size)
    if fs_type == "ext4":
        had_lost_found = has_lost_found(path)
        # 1: errors were corrected (e.g. the journal was replayed): fine to go on.
        _run([e2fsck, "-f", "-p", os.fspath(path)], ok=(0, 1))
        _run([resize2fs, os.fspath(path)])
        if not had_lost_found:
            # e2fsck makes one wherever it is missing; the snapshot did not have it.
            remove_lost_found(path)
    else:
        _grow_xfs(Path(path), growfs)
    fsync_path(path)


def has_lost_found(path: StrPath) -> bool:
    """Whether the ext4 image's root holds ``lost+found`` (read with debugfs, no mount)."""
    # debugfs exits 0 either way; a missing file is a message on stderr.
    out = _run([find_tool("debugfs"), "-R", "stat /lost+found", os.fspath(path)])
    return "Inode:" in out


def remove_lost_found(path: StrPath) -> None:
    """Remove the empty ``lost+found`` that mkfs.ext4 and e2fsck put in the root.

    A snapshot starts as empty as every backend's (and as the image's layers
    say): containerd's snapshotter tests, and containers, see its root. e2fsck
    makes the directory again when it needs one, so nothing is lost.
    """
    _run([find_tool("debugfs"), "-w", "-R", "rmdir lost+found", os.fspath(path)])


def _grow_xfs(path: Path, growfs: str) -> None:
    where = Path(tempfile.mkdtemp(prefix=".grow-", dir=path.parent))
    try:
        with loop.attached(path) as dev:
            # nouuid: every copy of one template shares its UUID, and xfs
            # refuses a second mount of a UUID it already has mounted.
            mount(dev, where, "xfs", 0, "nouuid")
        try:
            _run([growfs, "-d", os.fspath(where)])
        finally:
            unmount(where)
    finally:
        where.rmdir()

"""Size-limited writable layers of the overlay backend.

A limited active snapshot keeps its upper and work directories inside a
filesystem image of its own, loop-mounted over its storage directory::

    snapshots/<id>/            mount point of the image's filesystem
        layer.img              the image (under the mount, hidden while mounted)
        setup/                 where prepare mounted it first (empty, hidden too)
    (inside the image)
        fs/  work/             upper and work, at the usual paths
        lost+found/

So ``snapshots/<id>/fs`` is the upper whether or not the layer is limited,
and containerd's own mount code sees an ordinary overlay. Writes past the
limit fail with ENOSPC in that snapshot only, and usage comes from
``statvfs`` of the image's filesystem, in constant time.

The image root carries the filesystem's use right after it was made (an
xattr), which usage subtracts: an empty limited snapshot reports what an
empty plain one does.

On commit the upper is copied out of the image into a plain ``fs``
directory under the storage directory, the image is unmounted and deleted,
and the committed layer is an ordinary one. Whether a snapshot is limited
is read from the disk, never from labels (which Update can change): its
storage directory is a mount point, or holds ``layer.img``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Set
from contextlib import AbstractContextManager, suppress
from pathlib import Path

from ..fs import loop
from ..fs.copy import copy_tree
from ..fs.dirlock import locked_dir
from ..fs.mount import is_mountpoint, unmount
from ..fs.overlay_image import fs_use, make_ext4, mount_image, move_mount_to
from ..fs.usage import disk_usage, syncfs
from ..types import Usage

__all__ = ["IMAGE", "LimitedLayers"]

log = logging.getLogger(__name__)

IMAGE = "layer.img"
#: Free space below which reattach() mounts no image (mounting writes into it).
MOUNT_HEADROOM = 16 << 20
SETUP = "setup"  # where populate() mounts the image, inside the new storage dir
_BASELINE = "user.stratasnap.baseline"
_WIDTH = 20  # digits per number: the xattr never changes size once set


def _baseline_value(size: int, inodes: int) -> bytes:
    return f"{size:0{_WIDTH}d} {inodes:0{_WIDTH}d}".encode()


class LimitedLayers:
    """The image-backed storage of limited active snapshots under ``snapshots_dir``."""

    def __init__(self, snapshots_dir: Path, lock_dir: Path) -> None:
        self.snapshots_dir = snapshots_dir
        # A directory that exists (flocked): no lock file to create on a full disk.
        self._lock_dir = lock_dir

    # -- creation ------------------------------------------------------------------

    def populate(self, work: Path, size: int, owner: tuple[int, int] | None) -> None:
        """Make the image in the fresh storage dir ``work`` and lay out ``fs`` and ``work``.

        The image is mounted on ``work/setup`` to lay it out and measure it,
        and stays mounted there: ``work`` is renamed into place by the caller
        (it must not be a mount point itself then), and :meth:`ensure_mounted`
        moves the mount up onto the storage directory. That saves an ext4
        unmount and a second mount per prepare. A crash meanwhile leaves a
        ``new-*`` directory that cleanup() unmounts and deletes, or an owned
        one whose setup mount reattach() moves up.
        """
        image = work / IMAGE
        make_ext4(image, size)
        setup = work / SETUP
        os.mkdir(setup, 0o700)
        mount_image(image, setup)
        try:
            _lay_out(setup, owner)
        except BaseException:
            unmount(setup)
            raise

    # -- state ---------------------------------------------------------------------

    def is_limited(self, storage: Path) -> bool:
        """Whether the snapshot stored at ``storage`` lives in an image (mounted or not)."""
        try:
            if is_mountpoint(storage) or _setup_mounted(storage):
                return True
        except FileNotFoundError:
            return False
        return _plain_image(storage)

    def ensure_mounted(self, storage: Path) -> bool:
        """Mount the image of a limited snapshot if it is not; False for a plain one."""
        if not os.path.lexists(storage / IMAGE):
            # Plain, or limited with its image mounted over ``storage`` (which hides
            # the image): either way nothing to mount. Every Prepare and Mounts of a
            # plain snapshot comes here, so two system calls, not five and an exception.
            return is_mountpoint(storage)
        if is_mountpoint(storage):
            return True
        if not _setup_mounted(storage) and not _plain_image(storage):
            return False
        with self._locked():
            # Another thread or process may have mounted it meanwhile.
            if is_mountpoint(storage):
                return True
            if _setup_mounted(storage):
                move_mount_to(storage / SETUP, storage)
            elif _plain_image(storage):
                mount_image(storage / IMAGE, storage)
            else:
                return False
        return True

    def _locked(self) -> AbstractContextManager[None]:
        # flock on an open of its own: serialises threads and processes alike.
        return locked_dir(self._lock_dir)

    def usage(self, storage: Path) -> Usage:
        """Usage of a mounted limited snapshot: statvfs minus the fresh filesystem's use."""
        now = fs_use(storage)
        try:
            size_s, inodes_s = os.getxattr(storage, _BASELINE).split()
            base_size, base_inodes = int(size_s), int(inodes_s)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
            base_size = base_inodes = 0
        return Usage(size=max(now.size - base_size, 0), inodes=max(now.inodes - base_inodes, 0))

    # -- commit ------------------------------------------------------------------------

    def move_out(self, storage: Path, staging: Path) -> Usage:
        """Turn the limited snapshot at ``storage`` into a plain one; return its usage.

        ``staging`` is a fresh ``new-*`` path the caller holds the lock of, so
        cleanup() reclaims it after a crash. The upper is copied there and
        flushed, the image is unmounted, and the copy is renamed into
        ``storage``: from that rename on (``storage/fs`` exists under the
        mount point) the snapshot is plain, and a crash before the image is
        deleted is finished by :meth:`reattach`. Before it, nothing changed.
        """
        self.ensure_mounted(storage)
        copy_tree(storage / "fs", staging / "fs")
        os.mkdir(staging / "work", 0o711)
        syncfs(staging)
        usage = disk_usage(staging / "fs")
        # EBUSY (a process still has its cwd in the layer) fails the commit
        # with FailedPrecondition, and the snapshot stays as it was.
        unmount(storage)
        os.rename(staging / "work", storage / "work")
        os.rename(staging / "fs", storage / "fs")
        os.unlink(storage / IMAGE)
        _remove_setup_dir(storage)
        return usage

    # -- restart, removal and cleanup ---------------------------------------------------

    def reattach(self, owned: Set[int]) -> None:
        """After a restart: mount the images of owned snapshots, finish interrupted commits.

        On a nearly full filesystem the images are left unmounted (each is
        mounted on first use instead): they are sparse, and a mount writes
        into them, which could fail half-way there and the open with it.
        """
        mount = _has_headroom(self.snapshots_dir)
        with os.scandir(self.snapshots_dir) as it:
            entries = list(it)  # closed even when one snapshot below fails
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) not in owned:
                continue  # not ours to touch: cleanup() decides about it
            storage = Path(entry.path)
            if is_mountpoint(storage) or not os.path.lexists(storage / IMAGE):
                continue
            if os.path.isdir(storage / "fs"):
                # The commit had moved the layer out of the image already.
                os.unlink(storage / IMAGE)
                _remove_setup_dir(storage)
                continue
            if not mount:
                log.warning(
                    "filesystem nearly full: limited layer left unmounted until first use",
                    extra={"storage": str(storage)},
                )
                continue
            try:
                self.ensure_mounted(storage)
            except OSError as exc:
                # A broken image must not stop the snapshotter from opening;
                # mounts() of that snapshot reports the error again.
                log.warning("size-limited snapshot %s not mounted at start: %s", storage, exc)

    def release(self, path: Path) -> None:
        """Detach any loop device still backed by the image under ``path``."""
        if not os.path.lexists(path / IMAGE):
            # Nothing can be backed by it (a deleted image's backing file reads
            # "... (deleted)" and matches no path): spare the scan of every loop
            # device, which the reaper would pay for each removed snapshot.
            return
        for dev in loop.loop_devices_for(path / IMAGE):
            try:
                loop.detach(dev)
            except OSError as exc:
                # Still open elsewhere: the caller finds the device busy and keeps the image.
                log.warning("loop device %s of %s not detached: %s", dev, path / IMAGE, exc)

    def stray_loops(self, owned: Set[int], in_use: Set[str]) -> list[Path]:
        """Loop devices backed by images under our storage that no snapshot owns."""
        prefix = str(self.snapshots_dir) + "/"
        stray: list[Path] = []
        for dev, backing in loop.backing_files():
            if not backing.startswith(prefix):
                continue
            top = backing[len(prefix) :].split("/", 1)[0]
            deleted = backing.endswith(" (deleted)")
            if top.isdigit() and int(top) in owned and not deleted:
                continue
            if top in in_use and not deleted:
                continue
            stray.append(dev)
        return stray


def _has_headroom(path: Path) -> bool:
    """Whether the filesystem of ``path`` has room for what mounting an image writes."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize >= MOUNT_HEADROOM and (st.f_files == 0 or st.f_favail > 0)


def _plain_image(storage: Path) -> bool:
    # A layer.img without fs/ next to it: limited, just not mounted now.
    return os.path.lexists(storage / IMAGE) and not os.path.isdir(storage / "fs")


def _setup_mounted(storage: Path) -> bool:
    # Prepared, but the image is still where populate() mounted it.
    try:
        return is_mountpoint(storage / SETUP)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _remove_setup_dir(storage: Path) -> None:
    with suppress(FileNotFoundError):
        os.rmdir(storage / SETUP)


def _lay_out(root: Path, owner: tuple[int, int] | None) -> None:
    """Create ``fs`` and ``work`` in a fresh image and record its baseline use."""
    os.mkdir(root / "work", 0o711)
    # overlayfs recreates work/work at every mount; making it now keeps the
    # inode and block counts the same before and after the first mount.
    os.mkdir(root / "work" / "work", 0o000)
    os.mkdir(root / "fs", 0o755)
    os.chmod(root / "fs", 0o755)  # whatever the umask: a fresh root is 0755
    if owner is not None:
        os.lchown(root / "fs", *owner)
    # Set a placeholder first: the xattr's own storage is then part of the
    # baseline, and rewriting it with the same length changes nothing.
    os.setxattr(root, _BASELINE, _baseline_value(0, 0))
    use = fs_use(root)
    fs_blocks = os.lstat(root / "fs").st_blocks * 512
    # The empty upper itself counts, as it does for a plain snapshot.
    os.setxattr(root, _BASELINE, _baseline_value(use.size - fs_blocks, use.inodes - 1))

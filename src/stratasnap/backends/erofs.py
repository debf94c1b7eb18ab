"""The erofs backend: overlay layers whose committed ones are read-only EROFS images.

Layout (containerd's erofs snapshotter's, non-block mode)::

    snapshots/<id>/fs            active: the overlay upper; committed: where
                                 the layer's image is mounted read-only
    snapshots/<id>/work          active: the overlay workdir
    snapshots/<id>/layer.erofs   committed: the layer, one EROFS image file

Everything about active snapshots is the overlay backend's (this class is
one): the mounts it hands out, size-limited uppers, uid/gid mapping labels,
options. What differs is what a commit leaves behind. Commit builds
``layer.erofs`` from the upper with ``mkfs.erofs`` (whiteouts and opaque
marks carry over as they are), makes it durable, records its allocated size
as the usage and its sha256 in the store, then empties ``fs`` and mounts the
image there. The lowerdirs of children are those mounts, so containerd
(down to 1.6) only ever sees a plain ``overlay`` or ``bind``.

Crash safety, step by step (each leaves one of two states, both complete):

1. the image is built in a locked ``new-commit-*`` directory: a crash
   leaves the active snapshot untouched and cleanup() deletes the directory;
2. it is fsynced and renamed to ``layer.erofs`` beside the upper: a crash
   before the store commits leaves the active snapshot with a spare image,
   which opening the store deletes;
3. the store commits (usage, digest): from here the layer is the image;
4. ``fs`` is renamed to ``upper.old``, a fresh ``fs`` gets the image
   mounted, and ``upper.old``/``work`` are deleted: a crash anywhere here
   is finished at open (or the first time the layer is needed).

A layer can also arrive whole: :meth:`ErofsSnapshotter.convert_layer` turns
an (uncompressed) layer tar straight into the image with stratasnap's own
converter (:mod:`stratasnap.erofs`), and the next commit of that snapshot
takes the image instead of running ``mkfs.erofs``: nothing is written file by
file. The converted image waits, between the two calls, in a locked
``new-convert-*`` directory, and the commit goes on from step 2 above with
it, so the same rules hold:

0. the tar is converted into a locked ``new-convert-*`` directory, where it
   stays until the commit: a crash (before or during the commit) leaves the
   active snapshot untouched, and the unlocked directory is deleted at the
   next open or cleanup(), as step 1's;
2.-4. as above; a failed store commit moves the image back, still pending.

Committed images are mounted on first use (a prepare, view or mounts()
that has them as parents), not at open: opening a store with 1,000 layers
then costs a directory scan instead of 1,000 mounts (see README figures).

Removing a committed layer unmounts its image (still in use:
FailedPrecondition, so containerd's GC retries later), clears the immutable
flag and unlinks the file: no walk over the layer's files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..erofs import convert_tar
from ..errors import FailedPrecondition, InvalidArgument, from_os_error
from ..findings import Finding, Repair, Row, Survey
from ..fs.erofs_image import (
    ZTAILPACKING,
    ErofsImage,
    build_image,
    describe,
    file_sha256,
    find_mkfs,
    kernel_supports_erofs,
    mkfs_compressors,
    mount_image,
    set_immutable,
    supports_ztailpacking,
)
from ..fs.image import MissingTool
from ..fs.mount import is_mountpoint, unmount
from ..fs.mountinfo import MountInfo, read_mountinfo
from ..fs.usage import fsync_path
from ..metastore import Record
from ..snapshotter import StagedCommit
from ..types import Kind, Mount, Usage
from .erofs_options import ErofsOptions
from .overlay import OverlaySnapshotter
from .overlay_limits import IMAGE as LIMIT_IMAGE
from .overlay_limits import SETUP as LIMIT_SETUP

__all__ = ["DIGEST_DETAIL", "IMAGE", "ErofsSnapshotter"]

log = logging.getLogger("stratasnap")

IMAGE = "layer.erofs"
#: The store detail holding a committed layer's image digest ("sha256:<hex>").
DIGEST_DETAIL = "image.digest"
_OLD_UPPER = "upper.old"


class ErofsSnapshotter(OverlaySnapshotter):
    """Overlay snapshots whose committed layers are EROFS images.

    Options: the overlay backend's (:class:`~.overlay_options.OverlayOptions`)
    and :class:`~.erofs_options.ErofsOptions`.
    """

    backend_name = "erofs"

    def __init__(self, root: str | Path, **options: object) -> None:
        rest = dict(options)
        self.erofs = ErofsOptions.take(rest)
        # Converted layers waiting for their commit, by snapshot id (see convert_layer).
        self._conversions: dict[int, _Conversion] = {}
        super().__init__(root, **rest)

    @classmethod
    def capabilities_for(cls, options: Mapping[str, object]) -> tuple[str, ...]:
        rest = dict(options)
        ErofsOptions.take(rest)  # a bad value is InvalidArgument, as at open
        return super().capabilities_for(rest)

    # -- hooks -----------------------------------------------------------------------

    def _opened(self) -> None:
        self._mount_lock = self.root / "erofs-mounts.lock"
        self._mkfs_args: tuple[str, ...] | None = None  # decided at the first commit
        self._commit_locks: dict[int, threading.Lock] = {}
        self._commit_locks_guard = threading.Lock()
        try:
            self._mkfs = _preconditions(self.erofs.compression)
            self._recover()
        except BaseException:
            self.close()
            raise
        super()._opened()

    def _recover(self) -> None:
        """Finish or undo what a killed commit left (see the module docstring)."""
        with self._store.read() as tx:
            kinds = tx.id_kinds()
        with os.scandir(self.snapshots_dir) as scan:  # closed even when a step fails
            for entry in scan:
                if not entry.name.isdigit() or int(entry.name) not in kinds:
                    continue  # not ours: cleanup() decides
                # Plain strings: this runs for every snapshot at every open.
                if kinds[int(entry.name)] is Kind.COMMITTED:
                    if _unsettled(entry.path):
                        with suppress(OSError), self._locked():
                            # A broken image must not keep the store from opening;
                            # mounts() of a child reports the error instead.
                            self._settle(Path(entry.path))
                elif os.path.lexists(entry.path + "/" + IMAGE):
                    # Built by a commit that never committed.
                    _unlink_image(Path(entry.path, IMAGE))

    def _populate(
        self, work: Path, kind: Kind, parent: Record | None, labels: Mapping[str, str]
    ) -> None:
        if parent is not None:
            self._ensure_layer(parent.id)  # its mounted root gives the upper its owner
        super()._populate(work, kind, parent, labels)

    def _mounts(self, rec: Record) -> list[Mount]:
        for pid in rec.parent_ids:
            self._ensure_layer(pid)
        return super()._mounts(rec)

    def _stage_commit(self, rec: Record) -> StagedCommit:
        # Released by _committed/_commit_failed.
        lock = self._hold(rec)
        try:
            conversion = self._conversions.get(rec.id)
            if conversion is None:
                return self._build_layer(rec)
            return self._take_conversion(rec, conversion)
        except BaseException:
            lock.release()
            raise

    def _hold(self, rec: Record) -> threading.Lock:
        """The commit lock of active ``rec``, acquired, once it is still that active snapshot.

        Two commits (or conversions) of one key at once would each make an
        image, and the loser's undo would delete the winner's: one at a time,
        then re-check, since the other may have committed it meanwhile.
        """
        lock = self._commit_lock(rec.id)
        lock.acquire()
        try:
            with self._store.read() as tx:
                now = tx.get(rec.info.name)  # NotFound: committed by the other
            if now.id != rec.id or now.info.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {rec.info.name!r} is not active")
        except BaseException:
            lock.release()
            raise
        return lock

    def _commit_lock(self, sid: int) -> threading.Lock:
        with self._commit_locks_guard:
            return self._commit_locks.setdefault(sid, threading.Lock())

    def _commit_done(self, sid: int) -> None:
        # Dropped only once the snapshot is committed: a thread still waiting on
        # this lock then finds it not active. After a failed commit the snapshot
        # is active still, and a fresh lock beside the one waited on would let
        # two threads in at once.
        with self._commit_locks_guard:
            lock = self._commit_locks.pop(sid)
        lock.release()

    def _build_layer(self, rec: Record) -> StagedCommit:
        """The image of active ``rec``, built, durable and in place beside its upper."""
        storage = self.storage_dir(rec.id)
        limited = self._limits.ensure_mounted(storage)
        # No flush of the upper: the image is what becomes the layer, and it is
        # fsynced before the store commits; the upper is discarded after.
        staging = _Staging.create(self.snapshots_dir, f"new-commit-{rec.id}-")
        try:
            built = build_image(
                storage / "fs",
                staging.image,
                self.erofs.compression,
                self._mkfs_arguments(staging.path),
                self._mkfs,
            )
            self._place(storage, staging.image, limited)
        finally:
            staging.release()
        return _staged(built)

    def _place(self, storage: Path, image: Path, limited: bool) -> None:
        """Move a finished ``image`` beside the upper of ``storage``, durably (step 2)."""
        if limited:
            # The image goes beside the limited filesystem, not into it.
            # Busy (EBUSY): the commit fails and the snapshot stays as it was.
            unmount(storage)
        final = storage / IMAGE
        if os.path.lexists(final):
            _unlink_image(final)
        os.rename(image, final)
        try:
            fsync_path(storage)
        except BaseException:
            _take_back(final, image)
            raise
        if self.erofs.immutable:
            self._seal(final)

    # -- converted layers --------------------------------------------------------------

    @property
    def converts_layers(self) -> bool:
        """Whether :meth:`convert_layer` takes layers: the option is on and the
        converter writes the configured compression."""
        # Read at call time: the compressions the converter writes grow over time.
        from ..erofs import COMPRESSIONS

        return self.erofs.convert_layers and self.erofs.compression in COMPRESSIONS

    def convert_layer(self, key: str, tar: BinaryIO) -> str:
        """Convert the uncompressed layer tar read from ``tar`` into the image of active ``key``.

        The next commit of ``key`` makes that image the layer, instead of
        building one from the upper (which must stay empty until then). Reads
        ``tar`` once, to its end; returns its diff ID ("sha256:<hex>").

        Errors: NotFound (no ``key``); FailedPrecondition (``key`` is not
        active, already has a converted layer or files in its upper, or
        :attr:`converts_layers` is False); InvalidArgument (not a valid layer
        tar); on any error nothing of the conversion is left.
        """
        if not self.converts_layers:
            from ..erofs import COMPRESSIONS

            why = (
                "convert_layers=false"
                if not self.erofs.convert_layers
                else f"compression={self.erofs.compression!r}, the converter writes "
                + ", ".join(COMPRESSIONS)
            )
            raise FailedPrecondition(f"erofs backend does not convert layers here ({why})")
        with self._store.read() as tx:
            rec = tx.get(key)
        if rec.info.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        lock = self._hold(rec)
        try:
            if rec.id in self._conversions:
                raise FailedPrecondition(
                    f"snapshot {key!r} has a converted layer already, waiting for its commit"
                )
            storage = self.storage_dir(rec.id)
            try:
                self._limits.ensure_mounted(storage)
                written = _has_entries(storage / "fs")
            except OSError as exc:
                raise from_os_error(exc, f"converting a layer into {key!r}") from exc
            if written:
                raise FailedPrecondition(
                    f"snapshot {key!r} has files in its upper: a converted layer replaces "
                    "the whole upper, so it only goes into an empty one"
                )
            staging = _Staging.create(self.snapshots_dir, f"new-convert-{rec.id}-")
            try:
                stats = convert_tar(
                    tar, staging.image, digest=True, compression=self.erofs.compression
                )
                built = describe(staging.image)
            except BaseException as exc:
                staging.release()
                if isinstance(exc, OSError):
                    raise from_os_error(exc, f"converting a layer into {key!r}") from exc
                raise
            with self._commit_locks_guard:
                self._conversions[rec.id] = _Conversion(staging, _staged(built))
        finally:
            lock.release()
        return stats.tar_digest

    def _take_conversion(self, rec: Record, conversion: _Conversion) -> StagedCommit:
        """The commit of a converted layer: its image goes in place of one built from the upper."""
        storage = self.storage_dir(rec.id)
        limited = self._limits.ensure_mounted(storage)
        # Files written into the upper after the conversion: refused, not merged
        # and not dropped. The image alone would lose them, the upper alone would
        # lose the layer whose diff ID the caller was given, and mixing both is
        # an unpack's job, not a commit's. The conversion stays pending, so
        # emptying the upper (or removing the snapshot) is the way on.
        if _has_entries(storage / "fs"):
            raise FailedPrecondition(
                f"snapshot {rec.info.name!r} has files in its upper written after its layer "
                "was converted: remove it and unpack the layer again"
            )
        if not os.path.exists(conversion.staging.image):
            # A failed commit could not move it back (see _take_back): never an
            # empty layer in its place.
            raise FailedPrecondition(
                f"snapshot {rec.info.name!r}: its converted layer image "
                f"{conversion.staging.image} is gone: remove it and unpack the layer again"
            )
        self._place(storage, conversion.staging.image, limited)
        return conversion.staged

    def _drop_conversion(self, sid: int) -> None:
        with self._commit_locks_guard:
            conversion = self._conversions.pop(sid, None)
        if conversion is not None:
            conversion.staging.release()

    def close(self) -> None:
        # Conversions never committed go with the process, as a crash's would.
        for sid in list(self._conversions):
            self._drop_conversion(sid)
        super().close()

    def _mkfs_arguments(self, scratch: Path) -> tuple[str, ...]:
        """Our mkfs.erofs arguments, then the configured ones (which may override ours)."""
        if self._mkfs_args is None:
            ours: tuple[str, ...] = ()
            # Inline compressed tails: a third less space for layers of small files,
            # where the kernel can read them (probed once, in the empty ``scratch``).
            if self.erofs.compression != "none" and supports_ztailpacking(self._mkfs, scratch):
                ours = (ZTAILPACKING,)
            self._mkfs_args = (*ours, *self.erofs.mkfs_options)
        return self._mkfs_args

    def _seal(self, image: Path) -> None:
        # Like containerd, a flag that cannot be set only costs the protection.
        try:
            if not set_immutable(image, True):
                log.info("%s: its filesystem has no immutable flag", image)
        except OSError as exc:
            log.warning("%s: cannot set the immutable flag: %s", image, exc)

    def _commit_failed(self, rec: Record) -> None:
        try:
            final = self.storage_dir(rec.id) / IMAGE
            conversion = self._conversions.get(rec.id)
            if conversion is not None:
                _take_back(final, conversion.staging.image)  # pending again, as before
            else:
                with suppress(FileNotFoundError):
                    _unlink_image(final)
        finally:
            self._commit_lock(rec.id).release()  # the snapshot is still active

    def _committed(self, rec: Record) -> None:
        try:
            self._drop_conversion(rec.id)  # its staging directory is empty now
            with self._locked():
                self._settle(self.storage_dir(rec.id))
        except OSError as exc:
            # Committed already; the next open or first use finishes the job.
            log.warning("committed active %s; mounting its image failed: %s", rec.info.name, exc)
        finally:
            self._commit_done(rec.id)

    def _rename_aside(self, src: Path, dst: Path) -> bool:
        fs = src / "fs"
        try:
            mounted = is_mountpoint(fs)
        except (FileNotFoundError, NotADirectoryError):
            mounted = False
        if mounted:
            try:
                unmount(fs)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise FailedPrecondition(
                        f"layer image {src / IMAGE} is in use (mounted at {fs}): {exc.strerror}"
                    ) from exc
                raise
        return super()._rename_aside(src, dst)

    def _release(self, path: Path) -> None:
        if path.name.startswith("rm-") and path.name[3:].isdigit():
            # Removed for good (the store committed): its pending conversion goes too.
            self._drop_conversion(int(path.name[3:]))
        super()._release(path)  # unmounts first: the image must not be in use
        with suppress(FileNotFoundError):
            _unlink_image(path / IMAGE)

    # -- check -------------------------------------------------------------------------

    @classmethod
    def _keeps_upper(cls, row: Row) -> bool:
        return row.kind is not Kind.COMMITTED  # a committed layer's files are its image

    @classmethod
    def _check(cls, survey: Survey) -> Iterator[Finding]:
        """Overlay's checks, then each committed layer's image: there, settled, and with
        ``survey.deep`` (``check --deep``) the sha256 recorded at commit.

        A layer whose image is not mounted is not a finding: images are
        mounted on first use (see the module docstring). Nothing here is
        deleted by a repair: a layer that is missing or corrupt may be the
        parent of other snapshots, so those findings need a person.
        """
        yield from super()._check(survey)
        mounted = _mounts_by_point(survey.snapshots_dir)
        loops = {str(dev): str(backing) for dev, backing in survey.loops}
        for sid, row in survey.stored():
            storage = survey.snapshots_dir / str(sid)
            where = f"snapshots/{sid}/{IMAGE}"
            layer = f"layer {json.dumps(row.key)}"
            if row.kind is not Kind.COMMITTED:
                if os.path.lexists(storage / IMAGE):
                    yield Finding(
                        "spare-image",
                        where,
                        f"{row.kind and row.kind.value} snapshot {json.dumps(row.key)} has an"
                        " image that a commit killed before it committed left behind",
                        Repair.FINISH,
                    )
                continue
            if not os.path.lexists(storage / IMAGE):
                yield Finding(
                    "missing-image",
                    where,
                    f"{layer} has no image (its files are lost; remove it with `stratasnap rm`"
                    " once nothing uses it, and pull its image again)",
                )
                continue
            if _unsettled(str(storage)):
                yield Finding(
                    "unsettled-layer",
                    f"snapshots/{sid}",
                    f"{layer}: a commit was killed after it committed, before the image was"
                    " mounted and the old upper deleted",
                    Repair.FINISH,
                )
            on_fs = mounted.get(os.path.realpath(storage / "fs"))
            if on_fs is not None and not _mounts_image(on_fs, storage / IMAGE, loops):
                yield Finding(
                    "wrong-mount",
                    f"snapshots/{sid}/fs",
                    f"{layer}: {_describe_mount(on_fs)} is mounted where its image belongs"
                    " (children would see other files)",
                )
            recorded = row.details.get(DIGEST_DETAIL)
            if recorded is None:
                yield Finding(
                    "missing-digest", where, f"{layer}: no image digest recorded at commit"
                )
            elif survey.deep:
                yield from _verify_digest(storage / IMAGE, where, layer, recorded)

    # -- layers ------------------------------------------------------------------------

    def mount_layers(self) -> int:
        """Mount every committed layer's image now (else each is on first use); how many."""
        with self._store.read() as tx:
            kinds = tx.id_kinds()
        count = 0
        for sid, kind in sorted(kinds.items()):
            if kind is Kind.COMMITTED and self._ensure_layer(sid):
                count += 1
        return count

    def _ensure_layer(self, sid: int) -> bool:
        """Mount a committed layer's image if it is not; True if this call mounted it."""
        fs = self._fs_dir(sid)
        if is_mountpoint(fs):
            return False
        try:
            with self._locked():
                return self._settle(self.storage_dir(sid))
        except OSError as exc:
            # A missing or broken image: say which layer, with the OS's words.
            raise from_os_error(exc, f"mounting layer image {fs.parent / IMAGE}") from exc

    def _settle(self, storage: Path) -> bool:
        """Finish a committed layer: image mounted on an empty ``fs``, nothing else left.

        Idempotent, so it finishes whatever step a crash interrupted. Call
        with the lock held. True if it mounted the image.
        """
        fs = storage / "fs"
        image = storage / IMAGE
        if not os.path.exists(image):
            raise FileNotFoundError(errno.ENOENT, "committed layer has no image", str(image))
        if is_mountpoint(storage):
            unmount(storage)  # a limited upper's filesystem, reattached by an older open
        mounted = False
        if not (os.path.isdir(fs) and is_mountpoint(fs)):
            old = storage / _OLD_UPPER
            if os.path.isdir(fs) and _has_entries(fs):
                if os.path.lexists(old):
                    shutil.rmtree(old)
                os.rename(fs, old)
            if not os.path.isdir(fs):
                os.mkdir(fs, 0o755)
            mount_image(image, fs)
            mounted = True
        # The rest is garbage: the upper's files (now in the image) and overlay's.
        for name in (_OLD_UPPER, "work"):
            if os.path.lexists(storage / name):
                shutil.rmtree(storage / name)
        with suppress(FileNotFoundError):
            os.unlink(storage / LIMIT_IMAGE)
        with suppress(FileNotFoundError):
            os.rmdir(storage / LIMIT_SETUP)
        return mounted

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock on an open of its own: threads and processes (CLI and server) alike.
        fd = os.open(self._mount_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@dataclass(frozen=True)
class _Staging:
    """A locked ``new-*`` directory where an image is made (cleanup() leaves it alone)."""

    path: Path
    lock: int  # the open directory, flocked

    @classmethod
    def create(cls, directory: Path, prefix: str) -> _Staging:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
        lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return cls(path, lock)

    @property
    def image(self) -> Path:
        return self.path / IMAGE

    def release(self) -> None:
        """Delete the directory (and an image still in it), then unlock."""
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self.lock)


@dataclass(frozen=True)
class _Conversion:
    """A converted layer waiting for the commit of its snapshot."""

    staging: _Staging  # holds the image until the commit moves it
    staged: StagedCommit  # what the store records for it


def _staged(image: ErofsImage) -> StagedCommit:
    return StagedCommit(
        Usage(size=image.allocated, inodes=image.inodes),
        {DIGEST_DETAIL: f"sha256:{image.sha256}"},
    )


def _take_back(final: Path, image: Path) -> None:
    """Undo :meth:`ErofsSnapshotter._place`: ``final`` back to where it came from.

    If it cannot go back it is deleted: never a spare image beside an upper.
    """
    with suppress(OSError):
        set_immutable(final, False)  # an immutable file cannot be renamed either
    try:
        os.rename(final, image)
    except FileNotFoundError:
        pass
    except OSError:
        _unlink_image(final)
        raise


def _preconditions(compression: str) -> str:
    """The path of mkfs.erofs, once the kernel and the tools are known to do the job."""
    if not kernel_supports_erofs() and not _erofs_module_available():
        raise FailedPrecondition(
            "the kernel has no EROFS filesystem (not in /proc/filesystems, no erofs module): "
            "use a kernel with CONFIG_EROFS_FS, or load the module with `modprobe erofs`"
        )
    try:
        mkfs = find_mkfs()
    except MissingTool as exc:
        raise FailedPrecondition(
            f"the erofs backend builds layer images with {exc.tool}, which is not installed: "
            f"install the Debian package {exc.package or 'erofs-utils'}"
        ) from exc
    if compression != "none":
        have = mkfs_compressors(mkfs)
        if compression not in have:
            raise InvalidArgument(
                f"erofs option compression={compression!r}: {mkfs} offers "
                + (", ".join(sorted(have)) or "no compressor")
            )
    return mkfs


def _erofs_module_available() -> bool:
    """Whether an erofs module exists for this kernel (mount(2) loads it on demand)."""
    release = os.uname().release
    try:
        with open(f"/lib/modules/{release}/modules.dep") as f:
            return any("/erofs.ko" in line.split(":", 1)[0] for line in f)
    except OSError:
        return False


def _mounts_by_point(directory: Path) -> dict[str, MountInfo]:
    """The top mount on each mount point below ``directory`` (real paths)."""
    prefix = os.path.realpath(directory) + "/"
    return {str(m.mountpoint): m for m in read_mountinfo() if str(m.mountpoint).startswith(prefix)}


def _describe_mount(m: MountInfo) -> str:
    within = "" if m.root == "/" else f" (its {m.root})"  # a bind mount of a subtree
    return f"{m.fstype} from {m.source}{within}"


def _mounts_image(m: MountInfo, image: Path, loops: Mapping[str, str]) -> bool:
    """Whether ``m`` is ``image`` mounted: from the file itself, or a loop device on it."""
    real = os.path.realpath(image)
    return m.fstype == "erofs" and real in (os.path.realpath(m.source), loops.get(m.source))


def _verify_digest(image: Path, where: str, layer: str, recorded: str) -> Iterator[Finding]:
    """A finding if the image's sha256 is not the one recorded at its commit."""
    try:
        actual = "sha256:" + file_sha256(image)
    except OSError as exc:
        yield Finding("unreadable-image", where, f"{layer}: cannot read its image: {exc}")
        return
    if actual != recorded:
        yield Finding(
            "digest-mismatch",
            where,
            f"{layer}: the image's digest is {actual}, but {recorded} was recorded at commit"
            " (the image changed or is corrupt: remove the layer once nothing uses it, and"
            " pull its image again)",
        )


def _unsettled(storage: str) -> bool:
    """Whether a committed layer's storage still holds what the commit meant to drop."""
    return any(
        os.path.lexists(f"{storage}/{name}")
        for name in (_OLD_UPPER, "work", LIMIT_IMAGE, LIMIT_SETUP)
    ) or not os.path.isdir(f"{storage}/fs")


def _has_entries(directory: Path) -> bool:
    with os.scandir(directory) as it:
        return next(it, None) is not None


def _unlink_image(image: Path) -> None:
    """Delete an image, clearing the immutable flag it may carry first."""
    with suppress(OSError):
        # Not set, or a filesystem without the flag: the unlink says what matters.
        set_immutable(image, False)
    os.unlink(image)

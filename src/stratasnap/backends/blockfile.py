"""The blockfile backend: every snapshot is a filesystem image file.

A writable snapshot's image is a copy of its parent's image, or of a
template scratch image (made once, by mkfs, when the snapshotter opens)
when it has no parent: a reflink where the host filesystem can (xfs,
btrfs: a few ms whatever the size), otherwise a sparse copy of the data
extents only. Labels may ask for a bigger image (it is grown before first
use) and for a second, VM scratch disk. A view mounts its parent's image
read-only, without copying. Mounts are ``loop`` mounts of the image, which
gives VM runtimes a block device and everyone a hard size limit (this
kernel has no quotas).

Layout, in the base layout's ``snapshots/<id>/``::

    <root>/scratch.img                the template every parentless snapshot starts from
    snapshots/<id>/rootfs.img         the snapshot's filesystem image
    snapshots/<id>/vm/scratch.img     the VM scratch disk, when one was asked for

This follows containerd's blockfile snapshotter (which has no size labels)
and the scratch-disk handling of its Windows snapshotters.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, suppress
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument
from ..findings import Finding, Survey
from ..fs import loop
from ..fs.copy import copy_file, copy_file_atomic
from ..fs.dirlock import locked_dir
from ..fs.image import (
    MissingTool,
    grow_image,
    has_lost_found,
    image_mountpoints,
    make_image,
    probe_fs_type,
    remove_lost_found,
    used_inodes,
)
from ..fs.mountinfo import read_mountinfo
from ..fs.usage import fsync_path, syncfs
from ..metastore import Record, validate_key
from ..snapshotter import BaseSnapshotter, unknown_options
from ..types import Kind, Mount, Usage
from .blockfile_config import VM_SCRATCH_LABEL, BlockfileConfig, ScratchRequest

__all__ = ["BlockfileSnapshotter"]

log = logging.getLogger(__name__)

IMAGE = "rootfs.img"
VM_IMAGE = "vm/scratch.img"
TEMPLATE = "scratch.img"
#: How long remove() waits for a loop device that is mounted nowhere to go (seconds).
RELEASE_WAIT = 2.0


class BlockfileSnapshotter(BaseSnapshotter):
    """Snapshots as ext4 or xfs images under ``<root>/snapshots/<id>/rootfs.img``.

    Options (see :class:`BlockfileConfig`): ``scratch_size``, ``fs_type``,
    ``mkfs_options``, ``scratch_file``, ``recreate_scratch``,
    ``vm_scratch_template``. Mounting the images needs root and loop devices.
    """

    backend_name = "blockfile"

    @classmethod
    def capabilities_for(cls, options: Mapping[str, object]) -> tuple[str, ...]:
        _, rest = BlockfileConfig.from_options(options)  # refuses what opening would
        if rest:
            raise unknown_options(cls.backend_name, rest)
        return cls.capabilities

    def __init__(self, root: str | Path, **options: object) -> None:
        self.config, rest = BlockfileConfig.from_options(options)
        self.template = Path(root).absolute() / TEMPLATE
        #: The template's filesystem type (known once it exists).
        self.fs_type = self.config.fs_type or "ext4"
        super().__init__(root, **rest)

    # -- the template ------------------------------------------------------------

    def _opened(self) -> None:
        try:
            with self._template_lock():
                self._ensure_template()
        except BaseException:
            self.close()
            raise

    def _template_lock(self) -> AbstractContextManager[None]:
        """Serialise template work between processes opening the same root.

        A lock on ``snapshots/`` (there already), not a lock file: opening on
        a full filesystem must not need a new inode.
        """
        return locked_dir(self.snapshots_dir)

    def _ensure_template(self) -> None:
        # A template build killed half-way leaves its temporary file; under
        # the lock nobody else is building one, so it can go.
        with os.scandir(self.root) as it:
            leftovers = [e.path for e in it if e.name.startswith(f".{TEMPLATE}.tmp-")]
        for path in leftovers:
            with suppress(FileNotFoundError):
                os.unlink(path)
        cfg = self.config
        if cfg.recreate_scratch or not self.template.exists():
            try:
                if cfg.scratch_file is not None:
                    copy_file_atomic(cfg.scratch_file, self.template, replace=True)
                else:
                    make_image(self.template, cfg.scratch_size, self.fs_type, cfg.mkfs_options)
            except MissingTool as exc:
                raise FailedPrecondition(f"making the scratch template: {exc.strerror}") from exc
            except OSError as exc:
                raise InvalidArgument(
                    f"making the scratch template {self.template}: {exc.strerror or exc}"
                ) from exc
        found = probe_fs_type(self.template)
        source = cfg.scratch_file or self.template
        if found is None:
            raise InvalidArgument(f"scratch image {source} holds no ext4 or xfs filesystem")
        if cfg.fs_type is not None and found != cfg.fs_type:
            raise InvalidArgument(
                f"scratch image {source} holds {found}, not fs_type={cfg.fs_type}"
                " (set recreate_scratch to make a new template)"
            )
        self.fs_type = found
        if found == "ext4" and has_lost_found(self.template):
            try:
                self._empty_template_root()
            except OSError as exc:
                # Best effort (a full disk, a hung debugfs): the template still works,
                # its snapshots just start with an empty lost+found as they used to.
                log.warning("scratch template %s keeps its lost+found: %s", self.template, exc)

    def _empty_template_root(self) -> None:
        """Take mkfs's lost+found out of a template made before stratasnap did that itself.

        Done on a copy renamed over the template: another process may be
        copying the template right now.
        """
        tmp = self.root / f".{TEMPLATE}.tmp-{os.getpid()}"
        try:
            copy_file(self.template, tmp)
            remove_lost_found(tmp)
            fsync_path(tmp)
            os.replace(tmp, self.template)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_path(self.root)

    # -- paths ---------------------------------------------------------------------

    def image_path(self, sid: int) -> Path:
        """The filesystem image of snapshot id ``sid``."""
        return self.storage_dir(sid) / IMAGE

    def _images(self, path: Path) -> list[Path]:
        return [path / IMAGE, path / VM_IMAGE]

    # -- creating ------------------------------------------------------------------

    def _populate(
        self, work: Path, kind: Kind, parent: Record | None, labels: Mapping[str, str]
    ) -> None:
        if kind is Kind.VIEW and parent is not None:
            return  # mounts the parent's image read-only: nothing to copy
        # Size and VM labels only mean something for a writable snapshot (as
        # in containerd's Windows snapshotter); everything is checked before
        # anything is copied, so a refused request costs nothing.
        request = ScratchRequest.from_labels(labels) if kind is Kind.ACTIVE else ScratchRequest()
        source = self.image_path(parent.id) if parent is not None else self.template
        vm_source = self._vm_template() if request.vm_scratch else None
        start = os.stat(source).st_size
        if request.size and request.size < start:
            raise InvalidArgument(
                f"label {request.size_label}={labels[request.size_label]!r}: {request.size} bytes"
                f" is smaller than the {start}-byte image the snapshot starts from"
            )
        image = work / IMAGE
        # No temporary name needed: work is private until the create commits,
        # copy_file removes its own partial file, and cleanup() reclaims the
        # work directory of a killed create.
        stats = copy_file(source, image)
        log.debug("image %s from %s: reflinked=%d", image, source, stats.reflinked)
        try:
            if request.size > start:
                grow_image(image, request.size, probe_fs_type(image) or self.fs_type)
            else:
                fsync_path(image)
            if vm_source is not None:
                (work / "vm").mkdir(mode=0o700)
                copy_file(vm_source, work / VM_IMAGE)
                fsync_path(work / VM_IMAGE)
                fsync_path(work / "vm")
        except MissingTool as exc:
            raise FailedPrecondition(f"growing the image: {exc.strerror}") from exc
        fsync_path(work)

    def _vm_template(self) -> Path:
        path = self.config.vm_scratch_template
        if path is None:
            raise FailedPrecondition(
                f"label {VM_SCRATCH_LABEL} asks for a VM scratch disk,"
                " but no vm_scratch_template is configured"
            )
        if not path.is_file():
            raise FailedPrecondition(
                f"label {VM_SCRATCH_LABEL}: vm_scratch_template {path} does not exist"
            )
        if probe_fs_type(path) is None:
            raise FailedPrecondition(
                f"label {VM_SCRATCH_LABEL}: vm_scratch_template {path} holds no ext4 or xfs"
            )
        return path

    # -- mounts --------------------------------------------------------------------

    def _mounts(self, rec: Record) -> list[Mount]:
        readonly = rec.info.kind is Kind.VIEW
        sid = rec.parent_ids[0] if readonly and rec.parent_ids else rec.id
        mounts = [self._image_mount(self.image_path(sid), readonly)]
        vm = self.storage_dir(rec.id) / VM_IMAGE
        if not readonly and vm.exists():
            mounts.append(self._image_mount(vm, readonly=False, target="/vm"))
        return mounts

    def _image_mount(self, image: Path, readonly: bool, target: str = "") -> Mount:
        try:
            fs_type = probe_fs_type(image) or self.fs_type
        except OSError:
            fs_type = self.fs_type  # gone meanwhile: the mount itself will say so
        options = ["loop", "ro" if readonly else "rw"]
        if fs_type == "xfs":
            # Every copy of one template has the template's UUID, and xfs
            # refuses to mount a UUID twice. A UUID of its own per copy would
            # cost xfs_db rewriting the copy's whole log (120-200 ms and 64 MiB
            # no longer shared per copy of the default 10 GiB template), and
            # views mount the very same image twice anyway.
            options.append("nouuid")
        if readonly:
            # A read-only loop device cannot replay a journal; a layer whose
            # image was not cleanly unmounted still mounts without replaying.
            options.append("noload" if fs_type == "ext4" else "norecovery")
        return Mount(type=fs_type, source=str(image), options=tuple(options), target=target)

    # -- usage and commit ------------------------------------------------------------

    def _measure(self, rec: Record) -> Usage:
        """Bytes the images allocate beyond the parent's; inodes: 1 + files added.

        The image file itself is one inode (all containerd's blockfile
        counts), so a layer that only deletes or rewrites files still uses
        one; the in-filesystem growth on top says how many files it added.
        """
        path = self.storage_dir(rec.id)
        image = path / IMAGE
        size = _allocated(image) + _allocated(path / VM_IMAGE)
        inodes = _inodes(image)
        parent = self._parent_image(rec)
        if parent is not None:
            size -= _allocated(parent)
            inodes -= _inodes(parent)
        return Usage(size=max(size, 0), inodes=1 + max(inodes, 0))

    def _parent_image(self, rec: Record) -> Path | None:
        if rec.parent_ids:
            return self.image_path(rec.parent_ids[0])
        if not rec.info.parent:
            return None
        # usage() and commit() pass the record without its parent chain.
        with self._store.read() as tx:
            return self.image_path(tx.get(rec.info.parent).id)

    def _prepare_commit(self, rec: Record) -> Usage:
        self._flush(rec)
        return self._measure(rec)

    def _flush(self, rec: Record) -> None:
        for image in self._images(self.storage_dir(rec.id)):
            if not image.exists():
                continue
            # Still mounted: syncfs writes the data and the committed metadata
            # through the loop device into the image, so the layer reads right
            # even through a read-only mount that does not replay the journal.
            # An I/O error there fails the commit: the layer would not be durable.
            for where in image_mountpoints(image):
                try:
                    syncfs(where)
                except FileNotFoundError:
                    continue  # unmounted and its directory removed meanwhile
            fsync_path(image)

    # -- check ---------------------------------------------------------------------

    @classmethod
    def _check(cls, survey: Survey) -> Iterator[Finding]:
        """The layout's checks, then: every image there should be holds a filesystem."""
        yield from super()._check(survey)
        template = survey.root / TEMPLATE
        if template.exists() and _fs_type(template) is None:
            yield Finding(
                "bad-image",
                TEMPLATE,
                "the scratch template holds no ext4 or xfs filesystem"
                " (open with recreate_scratch=true to make a new one)",
            )
        for sid, row in survey.stored():
            storage = survey.snapshots_dir / str(sid)
            if row.kind is Kind.VIEW and row.parent_id is not None:
                continue  # mounts its parent's image: nothing of its own
            for image in (storage / IMAGE, storage / VM_IMAGE):
                where = str(image.relative_to(survey.root))
                found = _fs_type(image)
                if found is None and (image.name == IMAGE or image.exists()):
                    yield Finding(
                        "bad-image",
                        where,
                        f"the image of snapshot {row.key!r} is missing or holds no filesystem",
                    )

    # -- removal ---------------------------------------------------------------------

    def remove(self, key: str) -> None:
        # An image that is still mounted through a loop device must not be
        # deleted under it: refuse, so that containerd's GC skips it for now.
        validate_key(key)
        with self._store.read() as tx:
            rec = tx.get(key)
        if rec.info.kind is not Kind.VIEW:
            busy = self._let_go(self.storage_dir(rec.id))
            if busy:
                raise FailedPrecondition(
                    f"snapshot {key!r}: its image is in use by {', '.join(busy)}"
                )
        super().remove(key)

    def _let_go(self, path: Path) -> list[str]:
        """Detach idle loop devices of the images; return the ones still holding them.

        The kernel releases an autoclear device after its last unmount
        asynchronously, so a device that is mounted nowhere gets a moment
        to go before it counts as busy; a mounted one counts at once.
        """
        deadline = time.monotonic() + RELEASE_WAIT
        while True:
            self._detach_all(path)
            busy = [str(d) for image in self._images(path) for d in loop.loop_devices_for(image)]
            if not busy or time.monotonic() > deadline:
                return busy
            sources = {m.source for m in read_mountinfo()}
            if any(dev in sources for dev in busy):
                return busy
            time.sleep(0.01)

    def _detach_all(self, path: Path) -> None:
        # A device that is mounted or open elsewhere is not freed by this
        # (the kernel frees it at its last close); an idle one is.
        for image in self._images(path):
            for dev in loop.loop_devices_for(image):
                with suppress(OSError):
                    loop.detach(dev)

    def _release(self, path: Path) -> None:
        super()._release(path)
        self._detach_all(path)

    def _storage_busy(self, path: Path) -> bool:
        # Never delete an image a loop device still holds (cleanup() retries later).
        return bool(self._let_go(path))


def _fs_type(image: Path) -> str | None:
    try:
        return probe_fs_type(image)
    except OSError:
        return None


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _inodes(image: Path) -> int:
    """Used inodes: live from the mounted filesystem, else from the superblock."""
    for where in image_mountpoints(image):
        try:
            st = os.statvfs(where)
        except OSError:
            continue
        return st.f_files - st.f_ffree
    try:
        return used_inodes(image)
    except FileNotFoundError:
        return 0

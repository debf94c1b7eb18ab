"""The btrfs backend: every snapshot is a btrfs subvolume, made by the kernel in one ioctl.

Layout (the shared one, plus one subvolume per snapshot)::

    snapshots/<id>/        a plain directory: what the base class renames
    snapshots/<id>/fs      the snapshot's subvolume (absent for a view of a parent)
    btrfs-stale-qgroups    ids of deleted subvolumes whose qgroups cleanup() removes

The subvolume sits one level below the directory the base class creates,
renames and locks, rather than being that directory: the create path holds
an flock on ``new-<id>`` while the snapshot is made (a snapshot ioctl
creates its destination itself, so it could not be locked beforehand), and
the two-phase remove renames a plain directory whatever state the
subvolume is in. Only erasing storage knows about subvolumes.

- **prepare** on a parent: a writable snapshot of the parent's subvolume
  (``BTRFS_IOC_SNAP_CREATE_V2``): one ioctl, whatever the parent holds.
  Without a parent: an empty subvolume.
- **view**: a read-only bind of the parent's subvolume, which is read-only
  already: no storage at all (a read-only snapshot would cost a transaction
  commit per view for nothing; ``benchmarks/btrfs.py`` measures both).
- **commit**: set the subvolume's RDONLY flag first (writes end there, also
  through existing mounts), then write back and commit the filesystem's
  transaction (``BTRFS_IOC_SYNC``), then the metadata. A commit that fails
  after the flag clears it again; one killed in between leaves an active
  snapshot with the flag set, which opening the snapshotter clears.
- **remove**: the base class's two-phase rename, then one
  ``BTRFS_IOC_SNAP_DESTROY_V2``; btrfs frees the blocks in the background.
- **mounts**: ``bind`` of the subvolume, ``rw`` (active) or ``ro`` (view).
  containerd's own btrfs snapshotter mounts the device with ``subvolid=``;
  a bind needs no device and works the same from any mount namespace.

Quotas (btrfs qgroups), when the filesystem has them on (option
``quota=true`` turns them on when the snapshotter opens): the
``containerd.io/snapshot/max-size`` label, or option ``default_size``,
limits an active snapshot's exclusive bytes (what it wrote itself; writes
past it fail with EDQUOT in that snapshot only), and the usage of an
active snapshot is its qgroup's exclusive bytes, read in constant time
after a transaction commit, instead of a walk. qgroups count bytes, not
inodes: usage from a qgroup reports 0 inodes. Without quotas usage walks
the tree (the parent's files included, as the native backend's), and a
size limit is InvalidArgument.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument, from_os_error
from ..filters import parse as parse_filters
from ..findings import Finding, Survey
from ..fs import btrfs
from ..fs.usage import disk_usage
from ..metastore import Record
from ..snapshotter import BaseSnapshotter, unknown_options
from ..types import Kind, Mount, Reclaimed, Usage
from .btrfs_options import BtrfsOptions
from .btrfs_qgroups import StaleQgroups
from .native import bind_mounts
from .overlay_options import MAX_SIZE_LABEL, parse_size_label

__all__ = ["BtrfsSnapshotter"]

FS = "fs"
_QUOTA_HINT = "turn them on with the option quota=true, or `btrfs quota enable <root>`"


def _check_on_btrfs(root: Path) -> Path:
    """The nearest existing path at or above ``root``; FailedPrecondition unless it is on btrfs."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not btrfs.is_btrfs(probe):
        raise FailedPrecondition(
            f"backend 'btrfs' needs its root on a btrfs filesystem; {root} is on "
            f"{btrfs.filesystem_name(probe)}"
        )
    return probe


class BtrfsSnapshotter(BaseSnapshotter):
    """Snapshots as btrfs subvolumes under ``<root>/snapshots/<id>/fs``.

    Options: see :class:`~.btrfs_options.BtrfsOptions`.
    """

    backend_name = "btrfs"

    def __init__(self, root: str | Path, **options: object) -> None:
        rest = dict(options)
        self.config = BtrfsOptions.take(rest)
        # Before anything is made under the root: a wrong filesystem or a
        # size limit without quotas leaves nothing behind.
        fs = _check_on_btrfs(Path(root).absolute())
        try:
            if self.config.quota and not btrfs.quota_status(fs).enabled:
                btrfs.enable_quota(fs)
            quotas = bool(self.config.default_size) and btrfs.quota_status(fs).enabled
        except OSError as exc:
            # EPERM: quota ioctls take CAP_SYS_ADMIN.
            raise from_os_error(exc, f"btrfs quotas on the filesystem of {root}") from exc
        if self.config.default_size and not quotas:
            raise InvalidArgument(
                f"btrfs option default_size={self.config.default_size} needs btrfs quotas, "
                f"which are off on the filesystem of {root}: {_QUOTA_HINT}"
            )
        # Before the base class opens: a full disk may make it erase leftovers then.
        self._stale_qgroups = StaleQgroups(Path(root).absolute() / "btrfs-stale-qgroups")
        super().__init__(root, **rest)

    @classmethod
    def capabilities_for(cls, options: Mapping[str, object]) -> tuple[str, ...]:
        rest = dict(options)
        BtrfsOptions.take(rest)  # a bad value is InvalidArgument, as at open
        if rest:
            raise unknown_options(cls.backend_name, rest)
        return cls.capabilities

    # -- hooks -----------------------------------------------------------------------

    def _opened(self) -> None:
        try:
            self._thaw_actives()
        except BaseException:
            self.close()
            raise

    def _thaw_actives(self) -> None:
        """Make writable again the active snapshots a commit killed midway left read-only.

        A commit holds the lock of the snapshot's storage directory from the
        flag to the metadata commit: a locked one is being committed right
        now (another process), not left behind, and is not touched.
        """
        with self._store.read() as tx:
            ids = [tx.get(i.name).id for i in tx.walk(parse_filters("kind==active"))]
        for sid in ids:
            with (
                suppress(FileNotFoundError),
                _storage_lock(self.storage_dir(sid), wait=False) as got,
            ):
                if got:
                    btrfs.set_readonly(self._fs_dir(sid), False)

    def _populate(
        self, work: Path, kind: Kind, parent: Record | None, labels: Mapping[str, str]
    ) -> None:
        size = parse_size_label(labels)  # a malformed label fails even on a view
        if kind is Kind.VIEW:
            if parent is None:
                # Nothing to bind: an empty subvolume, read-only like the parent would be.
                btrfs.create_subvolume(work, FS)
                os.chmod(work / FS, 0o755)
                btrfs.set_readonly(work / FS)
            return  # a view holds no writes: no limit either
        if size is None:
            size = self.config.default_size
        if size and not self.quotas_enabled():
            raise InvalidArgument(
                f"label {MAX_SIZE_LABEL}={size}: size limits need btrfs quotas, which are "
                f"off on the filesystem of {self.root}: {_QUOTA_HINT}"
            )
        if parent is not None:
            btrfs.snapshot(self._fs_dir(parent.id), work, FS)
        else:
            btrfs.create_subvolume(work, FS)
            os.chmod(work / FS, 0o755)  # whatever the umask: a fresh root is 0755
        if size:
            btrfs.set_qgroup_limit(work / FS, size)

    def _fs_dir(self, sid: int) -> Path:
        return self.storage_dir(sid) / FS

    def _mounts(self, rec: Record) -> list[Mount]:
        return bind_mounts(rec, self._fs_dir)

    def _measure(self, rec: Record) -> Usage:
        fs = self._fs_dir(rec.id)
        return self._qgroup_usage(fs) or disk_usage(fs)

    def _prepare_commit(self, rec: Record) -> Usage:
        fs = self._fs_dir(rec.id)
        # Read-only first: nothing written after the flush can be missed by it.
        btrfs.set_readonly(fs)
        try:
            btrfs.sync(fs)  # containerd#5854: the data is durable before the commit is
            return self._measure(rec)
        except BaseException:
            btrfs.set_readonly(fs, False)
            raise

    def _erase(self, path: Path) -> None:
        ids = self._qgroup_ids_below(path)
        if not btrfs.destroy_subvolumes_in(path):
            super()._erase(path)
        if ids:
            self._stale_qgroups.add(ids)

    def _qgroup_ids_below(self, path: Path) -> list[int]:
        """Ids of the snapshot subvolumes at or in ``path`` whose qgroups outlive them.

        Older kernels keep a deleted subvolume's level-0 qgroup (stale,
        but listed and loaded forever); cleanup() removes those of ours.
        """
        ids = []
        for sub in (path, path / FS):
            with suppress(OSError):
                if btrfs.is_subvolume(sub):
                    ids.append(btrfs.subvolume_id(sub))
        return ids if ids and self._quota_status_or_none() is not None else []

    # -- check ---------------------------------------------------------------------

    @classmethod
    def _check(cls, survey: Survey) -> Iterator[Finding]:
        """The layout's checks, then each snapshot's subvolume and its read-only flag."""
        yield from super()._check(survey)
        for sid, row in survey.stored():
            if row.kind is Kind.VIEW and row.parent_id is not None:
                continue  # binds its parent's subvolume: nothing of its own
            fs = survey.snapshots_dir / str(sid) / FS
            where = f"snapshots/{sid}/{FS}"
            try:
                readonly = btrfs.is_readonly(fs) if btrfs.is_subvolume(fs) else None
            except FileNotFoundError:
                readonly = None
            if readonly is None:
                yield Finding(
                    "missing-subvolume",
                    where,
                    f"snapshot {row.key!r} has no subvolume (its files are lost)",
                )
            elif row.kind is Kind.COMMITTED and not readonly:
                yield Finding(
                    "writable-layer",
                    where,
                    f"committed snapshot {row.key!r} is writable; its children may not"
                    f" match it (`btrfs property set {fs} ro true` stops further changes)",
                )
            elif row.kind is Kind.ACTIVE and readonly:
                yield Finding(
                    "read-only-active",
                    where,
                    f"active snapshot {row.key!r} is read-only (a commit was killed midway);"
                    " opening the store with the btrfs backend makes it writable again",
                )

    # -- calls that differ -------------------------------------------------------------

    def cleanup(self) -> Reclaimed:
        reclaimed = super().cleanup()
        self._stale_qgroups.remove_dropped(self.root)
        return reclaimed

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        with self._store.read() as tx:
            rec = tx.find(key)
        if rec is None or rec.info.kind is not Kind.ACTIVE:
            super().commit(name, key, labels, parent)  # raises the contract's error
            return
        # Locked from the RDONLY flag to the metadata commit: see _thaw_actives.
        with _storage_lock(self.storage_dir(rec.id), wait=True):
            try:
                super().commit(name, key, labels, parent)
            except BaseException:
                # The metadata did not change: if the snapshot is still active
                # its subvolume must be writable again.
                with self._store.read() as tx:
                    still = tx.find(key)
                if still is not None and still.id == rec.id and still.info.kind is Kind.ACTIVE:
                    with suppress(OSError):
                        btrfs.set_readonly(self._fs_dir(rec.id), False)
                raise

    # -- quotas --------------------------------------------------------------------------

    def quotas_enabled(self) -> bool:
        """Whether btrfs quotas are on for the filesystem of the root (read now)."""
        return btrfs.quota_status(self.root).enabled

    def _quota_status_or_none(self) -> btrfs.QuotaStatus | None:
        """The quota status if quotas are on and this process may read it, else None."""
        try:
            status = btrfs.quota_status(self.root)
        except PermissionError:
            return None  # reading the quota tree takes CAP_SYS_ADMIN
        return status if status.enabled else None

    def _qgroup_usage(self, fs: Path) -> Usage | None:
        """The exclusive bytes of ``fs``'s qgroup, or None when qgroups cannot tell.

        The kernel brings qgroup numbers up to date when it commits a
        transaction, so the pending one is committed first (a no-op when
        nothing changed). While a rescan runs, or after quotas were off for
        a while, the numbers are wrong: None then, and the caller walks
        (also when this process may not read the quota tree).
        """
        status = self._quota_status_or_none()
        if status is None or status.rescanning or status.inconsistent:
            return None
        btrfs.sync(fs)
        info = btrfs.qgroup_info(fs, btrfs.subvolume_id(fs))
        if info is None:
            return None
        return Usage(size=info.exclusive, inodes=0)


@contextmanager
def _storage_lock(storage: Path, wait: bool) -> Iterator[bool]:
    """flock a snapshot's storage directory; yields False if ``wait`` is off and it is taken.

    flock locks belong to an open file description, so this excludes other
    threads of this process as well as other processes.
    """
    try:
        fd = os.open(storage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False  # removed meanwhile: nothing to lock (the caller's next step says so)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)

"""The Snapshotter protocol (the contract every backend honours) and its shared base.

A snapshotter stores a tree of snapshots. Importing an image goes like this:
``prepare("extract-1 <chain-id>", parent="")`` returns the mounts of an empty
writable snapshot; the layer is unpacked into them; ``commit("<chain-id>",
"extract-1 <chain-id>")`` turns it into an immutable layer. The next layer is
prepared with that committed name as its parent, and so on. A container then
gets ``prepare(container_key, parent=<top chain-id>)``; ``view`` gives a
read-only snapshot instead. ``remove`` deletes leaves; ``cleanup`` reclaims
storage that no snapshot owns.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, Self, runtime_checkable

from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    Unimplemented,
    from_os_error,
)
from .filters import parse as parse_filters
from .findings import Finding, Repair, Survey
from .fs.durable import later_fsync_covers_new_names, parent_sync_covers_new_entries
from .fs.mount import mounts_under, unmount_all_under
from .fs.usage import disk_usage, flush_tree, fsync_path
from .metastore import (
    MetaStore,
    Record,
    WriteTx,
    clean_labels,
    owned_ids_if_closed,
    validate_key,
)
from .reaper import Reaper
from .types import Info, Kind, Mount, Reclaimed, Usage

__all__ = [
    "BaseSnapshotter",
    "Snapshotter",
    "StagedCommit",
    "create_in_progress",
    "unknown_options",
]

log = logging.getLogger("stratasnap")


@dataclass(frozen=True)
class StagedCommit:
    """What a backend hands the store for a commit: usage, and facts about the storage."""

    usage: Usage
    details: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Snapshotter(Protocol):
    """The calls of containerd's snapshots API, as Python methods."""

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create an active (writable) snapshot on top of ``parent``; return its mounts."""
        ...

    def view(self, key: str, parent: str, labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create a read-only snapshot of ``parent``; return its mounts."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot."""
        ...

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        """Turn active ``key`` into committed ``name`` (``parent`` rebases an unparented one)."""
        ...

    def remove(self, key: str) -> None:
        """Remove a snapshot that has no children, and its storage."""
        ...

    def stat(self, key: str) -> Info:
        """What is known about one snapshot."""
        ...

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        """Replace labels (``labels``) or single labels (``labels.<key>``); return the result."""
        ...

    def usage(self, key: str) -> Usage:
        """Disk use of the snapshot itself, parents excluded."""
        ...

    def walk(self, *filters: str) -> Iterator[Info]:
        """Every snapshot matching any of ``filters`` (containerd's filter language)."""
        ...

    def cleanup(self) -> Reclaimed:
        """Reclaim storage no snapshot owns; return what was reclaimed."""
        ...

    def close(self) -> None:
        """Release the store; calling it again does nothing."""
        ...


class BaseSnapshotter:
    """What every backend shares: the layout, the store, and every call but storage.

    A backend subclass fills in how a fresh snapshot directory is populated
    (:meth:`_populate`), which mounts assemble a snapshot (:meth:`_mounts`),
    and, where it differs, how usage is measured and storage released.

    Layout under ``root``::

        metadata.db            the store (SQLite, WAL)
        snapshots/<id>/        a snapshot's storage, named by its store id
        snapshots/new-<id>/    being created; renamed to <id> inside the create transaction
        snapshots/rm-<id>/     being removed; renamed inside the remove transaction,
                               deleted after it by remove() or the reaper
    """

    #: The name ``open_snapshotter`` knows this backend by.
    backend_name: ClassVar[str] = ""
    #: containerd proxy-plugin capabilities this backend really supports. The class
    #: value is what a default instance on this kernel offers; an instance may
    #: narrow or widen it from its options and environment.
    capabilities: tuple[str, ...] = ()

    @classmethod
    def capabilities_for(cls, options: Mapping[str, object]) -> tuple[str, ...]:
        """The capabilities an instance opened with ``options`` would offer, without opening one.

        Used to write containerd's config before the server runs.
        """
        return cls.capabilities

    #: Delete a removed snapshot's storage inside remove() (else the reaper does it
    #: right after: in the background once start_reaper() was called, else at close()).
    sync_remove: bool = True

    def __init__(self, root: str | Path, **options: object) -> None:
        if options:
            raise unknown_options(self.backend_name, options)
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(exist_ok=True, mode=0o700)
        # Where a later fsync inside new storage makes its name durable too, a
        # create syncs nothing and a power loss that takes its storage back is
        # repaired at open (_rebuild_lost_storage); elsewhere it fsyncs
        # snapshots/ before the store commits, and new-<id> too where that
        # fsync does not cover the entries inside (see .fs.durable).
        self._sync_new_names = not later_fsync_covers_new_names(self.snapshots_dir)
        self._sync_children = self._sync_new_names and not parent_sync_covers_new_entries(
            self.snapshots_dir
        )
        self._store = self._open_store()
        #: Deletes removed storage off remove()'s path (see :mod:`.reaper`).
        self.reaper = Reaper(self._delete)
        try:
            leftovers, lost = self._recover_interrupted_removes()
            self._opened()
            # After _opened: a backend builds on what it sets up there (the
            # template, size-limited layers' state, mounted erofs parents).
            self._rebuild_lost_storage(lost, leftovers)
        except BaseException:
            # A failed open must not keep the store's files open (a full disk
            # that cannot be unmounted, a root that cannot be deleted).
            self._store.close()
            raise
        # Earlier processes' leftovers go now, not at the next cleanup(): after a
        # crash or a kill on a full disk, that is what gives the space back.
        for path in leftovers:
            self.reaper.submit(path)

    # -- backend hooks -------------------------------------------------------

    def _opened(self) -> None:
        """Called once the store is open: re-attach what a restart or crash detached."""

    def _populate(
        self, work: Path, kind: Kind, parent: Record | None, labels: Mapping[str, str]
    ) -> None:
        """Fill the fresh (empty, mode 0755) directory of a new snapshot.

        Raise InvalidArgument for labels the backend cannot honour: ``work``
        is then deleted and nothing is left behind. Runs outside the write lock.
        """

    def _mounts(self, rec: Record) -> list[Mount]:
        """The mounts of an active or view snapshot."""
        raise NotImplementedError

    def _fs_dir(self, sid: int) -> Path:
        """Where a snapshot's files live (the tree usage measures)."""
        return self.storage_dir(sid)

    def _measure(self, rec: Record) -> Usage:
        """Usage of an active snapshot, measured now."""
        return disk_usage(self._fs_dir(rec.id))

    def _prepare_commit(self, rec: Record) -> Usage:
        """Storage work before an active snapshot's commit; returns the usage to store.

        The default makes the tree's data durable before the commit is
        (containerd#5854) and measures it, in one walk.
        """
        return flush_tree(self._fs_dir(rec.id))

    def _stage_commit(self, rec: Record) -> StagedCommit:
        """Storage work before the commit transaction; what the store records for it.

        Backends that record details about the committed storage override
        this; the others override :meth:`_prepare_commit`.
        """
        return StagedCommit(self._prepare_commit(rec))

    def _commit_failed(self, rec: Record) -> None:
        """Undo :meth:`_stage_commit` when the commit transaction did not commit."""

    def _committed(self, rec: Record) -> None:
        """Storage work after the commit is durable.

        ``rec`` is the active record as it was before the commit: the same id
        (and storage), not re-read, so a commit costs no extra query.

        The commit stands whatever happens here: a failure must leave work
        that the backend finishes on its own later (at open, on first use).
        """

    def _release(self, path: Path) -> None:
        """Let go of a removed snapshot's storage (mounts, loop devices) before deletion.

        The default unmounts everything still mounted below ``path``.
        """
        if mounts_under(path):
            try:
                unmount_all_under(path)
            except OSError as exc:
                # _delete() sees the mount that stayed and keeps the directory.
                log.warning("storage %s is busy, left for a later cleanup(): %s", path, exc)

    def _erase(self, path: Path) -> None:
        """Delete released storage at ``path`` and everything below it (default: rmtree)."""
        _rmtree(path)

    @classmethod
    def _check(cls, survey: Survey) -> Iterator[Finding]:
        """Findings on the storage of ``survey`` (``stratasnap check``); a class hook.

        Called on the class, with no store open: a check changes nothing. The
        base checks the layout every backend shares (each snapshot has its
        directory, each directory its snapshot, ``new-*``/``rm-*`` leftovers,
        mounts and loop devices on storage no snapshot owns). A backend adds
        the checks of its own storage with ``yield from super()._check(survey)``
        and its own; the repairs happen through the backend's own cleanup()
        and release, so what it deletes it also knows how to let go of.
        """
        rows, entries = survey.rows, survey.entries
        for sid, row in rows.items():
            if str(sid) in entries or f"rm-{sid}" in entries:
                continue
            if row.kind is Kind.ACTIVE or row.kind is Kind.VIEW:
                # A power loss took back its creation (see _rebuild_lost_storage).
                yield Finding(
                    "unbuilt-storage",
                    f"snapshots/{sid}",
                    f"{row.kind.value} snapshot {json.dumps(row.key)} has no storage: a power"
                    " loss took back its creation, before anything written into it was"
                    " durable; opening the store rebuilds it from its parent",
                    Repair.REBUILD,
                )
            else:
                yield Finding(
                    "missing-storage",
                    f"snapshots/{sid}",
                    f"snapshot {json.dumps(row.key)} has no storage (its data is lost;"
                    " remove it with `stratasnap rm` once nothing uses it)",
                )
        for name in sorted(entries):
            where = f"snapshots/{name}"
            if name.isdigit():
                if int(name) not in rows:
                    yield Finding(
                        "orphan-storage", where, "storage no snapshot owns", Repair.RECLAIM
                    )
            elif name.startswith("rm-") and name[3:].isdigit():
                if int(name[3:]) in rows:
                    if name[3:] in entries:
                        yield Finding(
                            "interrupted-remove",
                            where,
                            f"a remove of a live snapshot was interrupted, and snapshots/"
                            f"{name[3:]} exists too: which one holds its data is for a person",
                        )
                    else:
                        yield Finding(
                            "interrupted-remove",
                            where,
                            "a remove was killed before it committed; the snapshot still exists",
                            Repair.RESTORE,
                        )
                else:
                    yield Finding(
                        "interrupted-remove",
                        where,
                        "a removed snapshot's storage was never deleted",
                        Repair.RECLAIM,
                    )
            elif name.startswith("new-"):
                if name not in survey.locked:
                    yield Finding(
                        "interrupted-create", where, "a create was killed half-way", Repair.RECLAIM
                    )
            else:
                yield Finding(
                    "unknown-entry",
                    where,
                    "not something stratasnap makes: move it out of the snapshots directory",
                )
        for mnt in survey.mounts:
            if not survey.in_use(mnt):
                yield Finding(
                    "stale-mount",
                    str(mnt),
                    "mounted on storage no snapshot owns",
                    Repair.UNMOUNT,
                )
        for dev, backing in survey.loops:
            if not survey.in_use(backing):
                yield Finding(
                    "stale-loop",
                    str(dev),
                    f"backed by {backing}, which no snapshot owns",
                    Repair.DETACH,
                )

    def _storage_busy(self, path: Path) -> bool:
        """Whether storage below ``path`` is still in use where the mount table does not show.

        Asked after :meth:`_release`; storage that is busy is not deleted but
        left for a later cleanup(). E.g. an image still attached to a loop device.
        """
        return False

    # -- paths ---------------------------------------------------------------

    def storage_dir(self, sid: int) -> Path:
        """The storage directory of snapshot id ``sid``."""
        return self.snapshots_dir / str(sid)

    # -- the contract ----------------------------------------------------------

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        validate_key(key)
        if parent:
            validate_key(parent, "parent key")
        clean = clean_labels(labels)
        # Fail fast, before any slow work, with the error the transaction would give.
        with self._store.read() as tx:
            parent_rec = tx.check_create(kind, key, parent)
        self._make_room(key)
        sid = self._store.reserve_id()
        what = f"preparing snapshot {json.dumps(key)}"

        def recheck() -> None:
            # The parent may have gone while we copied it: report that, not ENOENT.
            with self._store.read() as tx:
                tx.check_create(kind, key, parent)

        rec = self._build_storage(
            sid,
            kind,
            parent_rec,
            clean,
            what,
            record=lambda wtx: wtx.create(sid, kind, key, parent, clean),
            recheck=recheck,
        )
        return self._mounts(rec)

    def _build_storage(
        self,
        sid: int,
        kind: Kind,
        parent: Record | None,
        labels: Mapping[str, str],
        what: str,
        record: Callable[[WriteTx], Record],
        recheck: Callable[[], object],
    ) -> Record:
        """Make the storage of snapshot ``sid`` and rename it into place as ``record`` commits.

        The one way storage of an active or view snapshot is made: by a
        create (``record`` inserts the row) and by the rebuild at open of
        storage a power loss took back (``record`` re-reads the row).
        ``recheck`` turns an OSError of the backend's populate into the
        error the store would give (e.g. the parent removed meanwhile).
        """
        work = self.snapshots_dir / f"new-{sid}"
        try:
            os.mkdir(work, 0o755)
        except OSError as exc:  # ENOSPC on a full disk: ResourceExhausted
            if exc.errno != errno.ENOSPC or not self.reaper.flush():
                raise from_os_error(exc, what) from exc
            try:
                os.mkdir(work, 0o755)  # once more, with the removed storage gone
            except OSError as again:
                raise from_os_error(again, what) from again
        os.chmod(work, 0o755)  # the fresh root is 0755 whatever the umask
        # The lock tells cleanup(), in this process or another, that work is in use.
        lock = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = self.storage_dir(sid)
        renamed = False
        try:
            try:
                self._populate(work, kind, parent, labels)
            except OSError as exc:
                recheck()
                raise from_os_error(exc, what) from exc
            # No fsync here where the filesystem orders its metadata (see
            # __init__ and .fs.durable): the store's commit is the only flush,
            # and a power loss that takes the rename back takes everything a
            # user wrote below it since with it, so the rebuild at open loses
            # nothing. Elsewhere the name is made durable by one fsync of
            # snapshots/ per shared commit, right before it, and new-<id>'s
            # entries (fs/, work/…) by one of its own where that fsync does not
            # cover them, outside the writer's turn (creates sync side by side).
            if self._sync_children:
                self._sync_new_storage(work)
            with self._store.write() as wtx:
                rec = record(wtx)
                os.rename(work, final)
                renamed = True
                if self._sync_new_names:
                    wtx.before_commit(self.snapshots_dir, self._sync_snapshots_dir)
        except OSError as exc:  # the rename or the fsync of new-<id> failed: nothing committed
            self._delete(final if renamed else work)
            raise from_os_error(exc, what) from exc
        except BaseException:
            self._delete(final if renamed else work)
            raise
        finally:
            os.close(lock)
        return rec

    def _make_room(self, key: str) -> None:
        """Refuse a create on a full disk, unless removed storage the reaper still
        holds (just removed, or reaped at start-up after a crash) frees room."""
        try:
            _check_room(self.snapshots_dir, key)
        except ResourceExhausted:
            if not self.reaper.flush():
                raise
            _check_room(self.snapshots_dir, key)

    def _sync_new_storage(self, work: Path) -> None:
        """fsync a new snapshot's directory: its entries are durable."""
        fsync_path(work)

    def _sync_snapshots_dir(self) -> None:
        """fsync ``snapshots/``: the renames into it so far are durable."""
        fsync_path(self.snapshots_dir)

    def mounts(self, key: str) -> list[Mount]:
        with self._store.read() as tx:
            rec = tx.get_mountable(key)
        return self._mounts(rec)

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        validate_key(name, "name")
        validate_key(key)
        clean = clean_labels(labels)
        with self._store.read() as tx:
            rec, _ = tx.check_commit(name, key, parent)
        if parent and not rec.info.parent and "rebase" not in self.capabilities:
            # A rebase only relabels metadata; it is right only for backends whose
            # storage holds the layer's own changes (overlay), not a full copy.
            raise Unimplemented(
                f"backend {json.dumps(self.backend_name)} cannot rebase snapshot "
                f"{json.dumps(key)} onto {json.dumps(parent)} at commit (no rebase capability)"
            )
        # Flush and measure outside the write lock: both can take long on a big layer.
        try:
            staged = self._stage_commit(rec)
            if not self._sync_new_names:
                # The create left the name <id> to ride on a later flush (see
                # _build_storage); a committed layer cannot be rebuilt, so its
                # name is durable before the store says it exists. On ext4 the
                # stage's flush has committed the journal already (this fsync
                # then writes nothing); on xfs it forces the log through the
                # rename, which logged <id>'s inode.
                fsync_path(self.storage_dir(rec.id))
        except OSError as exc:
            raise from_os_error(exc, f"committing snapshot {json.dumps(key)}") from exc
        try:
            with self._store.write() as wtx:
                wtx.commit_active(key, name, staged.usage, clean, parent, staged.details)
        except BaseException:
            self._commit_failed(rec)
            raise
        self._committed(rec)

    def remove(self, key: str) -> None:
        validate_key(key)
        moved: tuple[Path, Path] | None = None
        try:
            with self._store.write() as tx:
                rec = tx.remove(key)
                src, dst = self.storage_dir(rec.id), self.snapshots_dir / f"rm-{rec.id}"
                if self._rename_aside(src, dst):
                    moved = (src, dst)
        except BaseException:
            if moved is not None:
                os.rename(moved[1], moved[0])
            raise
        if moved is None:
            return
        if not self.sync_remove:
            self.reaper.submit(moved[1])
            return
        try:
            self._delete(moved[1])
        except OSError as exc:
            # The snapshot is gone (the transaction committed); its storage
            # waits for cleanup(). Failing here would abort containerd's GC pass.
            log.warning("removed %s; storage %s left for cleanup: %s", key, moved[1], exc)

    def _rename_aside(self, src: Path, dst: Path) -> bool:
        """Rename storage out of the way; unmount and retry once when it is busy.

        Any failure is FailedPrecondition ("try again later"): containerd's GC
        skips such a snapshot and goes on, where any other error would end
        the whole pass.
        """
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise FailedPrecondition(f"cannot move {src} aside: {exc.strerror}") from exc
            try:
                unmount_all_under(src)
                os.rename(src, dst)
            except OSError as again:
                raise FailedPrecondition(f"{src} is busy: {again.strerror}") from again
        return True

    def stat(self, key: str) -> Info:
        with self._store.read() as tx:
            return tx.get(key).info

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        validate_key(info.name)
        with self._store.write() as tx:
            return tx.update_info(info, fieldpaths)

    def usage(self, key: str) -> Usage:
        with self._store.read() as tx:
            rec = tx.get(key)
        if rec.info.kind is not Kind.ACTIVE:
            return rec.usage
        try:
            return self._measure(rec)
        except FileNotFoundError:
            # Removed while we measured: say so rather than leak ENOENT.
            with self._store.read() as tx:
                tx.get(key)
            raise

    def details(self, key: str) -> dict[str, str]:
        """What the backend recorded about a snapshot's storage (e.g. an image digest)."""
        with self._store.read() as tx:
            return tx.details(tx.get(key).id)

    def walk(self, *filters: str) -> Iterator[Info]:
        flt = parse_filters(*filters)  # parse now so a bad filter fails at the call
        with self._store.read() as tx:
            infos = tx.walk(flt)
        # Yield outside the transaction: a caller may Stat or write inside the loop.
        return iter(infos)

    def count_by_kind(self) -> dict[Kind, int]:
        """How many snapshots of each kind exist (for metrics)."""
        with self._store.read() as tx:
            return tx.count_by_kind()

    def commit_batch_sizes(self) -> dict[int, int]:
        """How many metadata commits made how many write calls durable (for metrics)."""
        return self._store.batch_sizes()

    def set_max_batch(self, max_batch: int) -> None:
        """Let at most ``max_batch`` concurrent write calls share one metadata commit.

        1 turns group commit off (every write commits, and fsyncs, alone);
        the default is :data:`stratasnap.group_commit.MAX_BATCH`.
        """
        self._store.set_max_batch(max_batch)

    def cleanup(self) -> Reclaimed:
        doomed: list[Path] = []
        with self._store.write() as tx:
            owned = tx.id_map()
            with os.scandir(self.snapshots_dir) as it:
                entries = list(it)  # closed even when a rename below fails
            for entry in entries:
                path = Path(entry.path)
                name = entry.name
                if name.isdigit():
                    if int(name) not in owned:  # a crash left it between rename and commit
                        aside = self.snapshots_dir / f"rm-{name}"
                        if self._rename_aside(path, aside):
                            doomed.append(aside)
                elif _is_leftover(name, path, owned):
                    doomed.append(path)
        paths: list[str] = []
        total = 0
        for path in doomed:
            size = _size_or_zero(path)
            if self._delete(path):
                paths.append(str(path))
                total += size
        return Reclaimed(paths=tuple(paths), size=total)

    def start_reaper(self) -> None:
        """Delete removed storage in a background thread from now on (a long-running server)."""
        self.reaper.start()

    def close(self) -> None:
        # What the reaper has not deleted yet goes now: a CLI `rm` frees its
        # space before the process exits. (A kill instead leaves rm-* for the next open.)
        self.reaper.drain()
        self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _open_store(self) -> MetaStore:
        path = self.root / "metadata.db"
        try:
            return MetaStore(path)
        except ResourceExhausted:
            # SQLite must make its -wal/-shm files and the disk is full: free
            # what earlier removes left behind (judged by an offline read of
            # the store) and try once more.
            owned = owned_ids_if_closed(path)
            if owned is None or not self._reap_offline(owned):
                raise
            log.warning("filesystem full: reaped removed storage to open %s", path)
            return MetaStore(path)

    def _reap_offline(self, owned: Container[int]) -> bool:
        """Delete leftovers before the store and the backend are open; True if any went.

        Only plain trees: anything with a mount below waits for the backend.
        """
        reaped = False
        with os.scandir(self.snapshots_dir) as it:
            entries = list(it)
        for entry in entries:
            path = Path(entry.path)
            if _is_leftover(entry.name, path, owned) and not mounts_under(path):
                self._erase(path)  # the backend's way (btrfs: read-only subvolumes)
                reaped = True
        return reaped

    def _recover_interrupted_removes(self) -> tuple[list[Path], list[int]]:
        """Undo a remove that was killed between its rename and its commit.

        The rename of ``<id>`` to ``rm-<id>`` happens inside the transaction; when
        the process dies before the commit, the row is still there and its
        storage must come back under its own name. Returns the leftovers of
        earlier processes that no snapshot owns (``rm-*`` of committed removes,
        ``new-*`` of killed creates), for the reaper, and the ids of active and
        view snapshots with no storage at all (see :meth:`_rebuild_lost_storage`):
        one listing of ``snapshots/`` against one query serves both.

        The write transaction only serialises with other processes' removes;
        it changes nothing in the store, so it needs no space on a full disk.
        """
        leftovers: list[Path] = []
        with self._store.write() as tx:
            kinds = tx.id_kinds()
            with os.scandir(self.snapshots_dir) as it:
                entries = list(it)
            present: set[str] = set()
            for entry in entries:
                present.add(entry.name)
                sid = entry.name[3:]
                if entry.name.startswith("rm-") and sid.isdigit() and int(sid) in kinds:
                    back = self.storage_dir(int(sid))
                    if not back.exists():
                        os.rename(entry.path, back)
                        present.add(sid)
                elif _is_leftover(entry.name, Path(entry.path), kinds):
                    leftovers.append(Path(entry.path))
        lost = [
            sid
            for sid, kind in kinds.items()
            if kind is not Kind.COMMITTED and str(sid) not in present
        ]
        return leftovers, lost

    def _rebuild_lost_storage(self, lost: Iterable[int], leftovers: list[Path]) -> None:
        """Make again the storage of active and view snapshots that a power loss took back.

        A create syncs nothing before the store's commit where the
        filesystem orders its metadata (see :mod:`.fs.durable`), so a power
        loss may keep the record and take back the ``mkdir`` or the rename
        of its storage. That storage held nothing anyone could have made
        durable (a user's fsync below it would have made the rename durable
        too): it came from the parent, which is committed, and the labels,
        which are stored. So it is made again the way the create made it
        (:meth:`_build_storage`). A ``new-<id>`` the create left (unlocked:
        no create or rebuild holds it) is deleted first, here and not by the
        reaper, since the rebuild makes that very name again. Committed
        snapshots are never rebuilt: their missing storage is data lost, for
        ``stratasnap check``.

        A rebuild that fails (a parent whose own storage is gone, a full
        disk) is logged and leaves the snapshot as it was: mounts() then
        fails for it alone, and the store still opens.
        """
        for sid in lost:
            stale = self.snapshots_dir / f"new-{sid}"
            if stale in leftovers:
                leftovers.remove(stale)
                if not self._delete(stale):
                    log.warning("storage %s is busy: snapshot id %d not rebuilt", stale, sid)
                    continue
            elif os.path.lexists(stale):
                continue  # locked: another process is rebuilding it right now
            self._rebuild(sid)

    def _rebuild(self, sid: int) -> None:
        """Rebuild the storage of active or view snapshot ``sid``; log what happens."""
        with self._store.read() as tx:
            rec = tx.find_id(sid, with_parents=True)
            parent = tx.find_id(rec.parent_ids[0]) if rec and rec.parent_ids else None
        if rec is None or rec.info.kind is Kind.COMMITTED:
            return  # removed or committed by another process meanwhile
        found = rec
        key = json.dumps(rec.info.name)
        log.warning(
            "snapshot %s (%s) had no storage (a power loss took back its creation):"
            " rebuilding it from its parent",
            key,
            rec.info.kind.value,
        )
        final = self.storage_dir(sid)

        def still_lost(tx: WriteTx | None = None) -> Record:
            if tx is None:
                with self._store.read() as rtx:
                    now = rtx.find_id(sid)
            else:
                now = tx.find_id(sid)
            if now is None or now.info.kind is Kind.COMMITTED:
                raise NotFound(f"snapshot {key} was removed or committed meanwhile")
            if os.path.lexists(final):
                raise AlreadyExists(f"snapshot {key} was rebuilt by another process")
            return found

        try:
            self._build_storage(
                sid,
                rec.info.kind,
                parent,
                rec.info.labels,
                f"rebuilding the storage of snapshot {key}",
                record=still_lost,
                recheck=still_lost,
            )
        except (OSError, SnapshotError) as exc:
            log.warning(
                "snapshot %s could not be rebuilt, its mounts will fail (`stratasnap check`"
                " looks at its parent's storage too): %s",
                key,
                exc,
            )

    def _delete(self, path: Path) -> bool:
        """Delete storage, never through a mount that is still there.

        Returns False when something is still mounted below ``path``; the
        directory is then left for a later cleanup().
        """
        if not path.exists():
            return True
        self._release(path)
        if mounts_under(path) or self._storage_busy(path):
            return False
        self._erase(path)
        return True


def unknown_options(backend: str, options: Mapping[str, object]) -> InvalidArgument:
    """The error for options a backend does not know (its own ones taken out first)."""
    names = ", ".join(sorted(options))
    return InvalidArgument(f"unknown option(s) {names} for backend {backend!r}")


def _rmtree(path: Path) -> None:
    """rmtree that tolerates a concurrent cleanup() deleting the same leftover."""

    def ignore_missing(func: object, p: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_missing)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: ignore_missing(f, p, info[1]))


def _check_room(directory: Path, key: str) -> None:
    """ResourceExhausted when the filesystem has no block or inode left for a new snapshot.

    Checked before the id is reserved: on a full disk that write would
    only spend the WAL room that removes need (see :mod:`.metastore`).
    """
    st = os.statvfs(directory)
    root = os.geteuid() == 0  # root may use the blocks reserved for it
    blocks, inodes = (st.f_bfree, st.f_ffree) if root else (st.f_bavail, st.f_favail)
    if blocks == 0 or (st.f_files > 0 and inodes == 0):
        raise ResourceExhausted(
            f"preparing snapshot {json.dumps(key)}: no space left on the filesystem of {directory}"
        )


def _is_leftover(name: str, path: Path, owned: Container[int]) -> bool:
    """Whether ``rm-*``/``new-*`` entry ``name`` is storage no snapshot and no create owns."""
    if name.startswith("rm-"):
        sid = name[3:]
        # rm-<owned id>: a remove killed before its commit, recovered at open.
        return not (sid.isdigit() and int(sid) in owned)
    return name.startswith("new-") and not create_in_progress(path)


def create_in_progress(path: Path) -> bool:
    """Whether a create (in any process) holds the lock on this ``new-*`` directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True  # gone already: nothing to reclaim
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _size_or_zero(path: Path) -> int:
    try:
        return disk_usage(path).size
    except OSError:
        return 0

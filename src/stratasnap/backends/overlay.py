"""The overlay backend: snapshots stacked with Linux overlayfs, like containerd's.

Each snapshot has an upper directory ``snapshots/<id>/fs`` and, when
active, a work directory ``snapshots/<id>/work``. A committed snapshot's
``fs`` becomes a lower layer of its children, so prepare and commit copy
nothing. The mounts follow containerd's overlayfs snapshotter exactly:

- no parent: a ``bind`` of the snapshot's own ``fs`` (``rw``, or ``ro`` for a view);
- a view of one parent: a read-only ``bind`` of the parent's ``fs``;
- otherwise ``overlay`` with ``lowerdir`` listing the parents nearest
  first, plus ``upperdir``/``workdir`` for an active snapshot; a view of
  several parents is an overlay of lowers only, marked ``ro`` (containerd
  leaves the mark out; the mount is read-only either way).

The layout is containerd's too, so containerd's own mount code can compact
long ``lowerdir`` lists by changing into ``snapshots/``.

Active snapshots with a size limit (label ``containerd.io/snapshot/max-size``
or option ``default_size``) keep their upper in a filesystem image of that
size: see :mod:`.overlay_limits`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path

from ..errors import FailedPrecondition
from ..findings import Finding, Row, Survey
from ..fs import loop
from ..fs.overlay_probe import (
    escape_layer_path,
    idmapped_layers_supported,
    in_user_namespace,
    supports_d_type,
    supports_index_option,
)
from ..fs.usage import disk_usage
from ..metastore import Record
from ..snapshotter import BaseSnapshotter, unknown_options
from ..types import Info, Kind, Mount, Reclaimed, Usage
from .overlay_idmap import GIDMAP_LABEL, UIDMAP_LABEL, parse_mapping_labels
from .overlay_limits import IMAGE as LIMITED_IMAGE
from .overlay_limits import LimitedLayers
from .overlay_options import OverlayOptions, parse_size_label

__all__ = ["UPPERDIR_LABEL", "OverlaySnapshotter"]

#: Plain active snapshots remembered at most (see OverlaySnapshotter._plain).
_PLAIN_CACHE = 65536

#: Label containerd's overlayfs adds (with ``upperdir_label``) naming a snapshot's upper.
UPPERDIR_LABEL = "containerd.io/snapshot/overlay.upperdir"


def default_mount_options(configured: Iterable[str]) -> tuple[str, ...]:
    """The configured overlay options plus containerd's automatic ones.

    ``index=off`` unless an ``index`` option is configured (a later option
    would win, but a configured one must not be overridden by ours);
    ``userxattr`` inside a user namespace, where ``trusted.*`` xattrs
    cannot be set and whiteout marks must live in ``user.overlay.*``.
    """
    opts = list(configured)
    keys = {o.partition("=")[0] for o in opts}
    if "index" not in keys and supports_index_option():
        opts.append("index=off")
    if "userxattr" not in keys and in_user_namespace():
        opts.append("userxattr")
    return tuple(opts)


def _idmap_options(labels: Mapping[str, str]) -> list[str]:
    # The label values as given, like containerd (they were checked at create;
    # an Update since is the caller's to answer for at mount time).
    uidmap, gidmap = labels.get(UIDMAP_LABEL), labels.get(GIDMAP_LABEL)
    if uidmap is None or gidmap is None:
        return []
    return [f"uidmap={uidmap}", f"gidmap={gidmap}"]


class OverlaySnapshotter(BaseSnapshotter):
    """Snapshots as overlayfs layers under ``<root>/snapshots/<id>/{fs,work}``.

    Options: see :class:`~.overlay_options.OverlayOptions`.
    """

    backend_name = "overlay"
    # Rebase costs nothing here: an unparented upper simply gets lowers.
    # remap-ids: the mapping labels become uidmap=/gidmap= options, which
    # containerd's mount code applies as idmapped lower layers (Linux 5.19+).
    capabilities: tuple[str, ...] = ("rebase", "remap-ids")

    def __init__(self, root: str | Path, **options: object) -> None:
        rest = dict(options)
        self.config = OverlayOptions.take(rest, self.backend_name)
        self.sync_remove = self.config.sync_remove
        self.mount_options = default_mount_options(self.config.mount_options)
        self.capabilities = _capabilities(self.config.slow_chown)
        # Active snapshots known to keep their upper in storage/fs, not in a
        # size-limited image: what they are is fixed at create, so the stats
        # that tell (.overlay_limits) are made once, not at every call. Made
        # first: opening may rebuild lost storage, which populates.
        self._plain: set[int] = set()
        super().__init__(root, **rest)

    # Mount options name a snapshot's directories by these prefixes: a chained
    # prepare names every layer below it, and building each as a Path, then
    # escaping it, cost 0.16 of its ms on a 16-layer chain.
    @cached_property
    def _source_prefix(self) -> str:
        return f"{self.snapshots_dir}/"

    @cached_property
    def _option_prefix(self) -> str:
        return escape_layer_path(self.snapshots_dir) + "/"

    @classmethod
    def capabilities_for(cls, options: Mapping[str, object]) -> tuple[str, ...]:
        rest = dict(options)
        parsed = OverlayOptions.take(rest, cls.backend_name)  # bad: InvalidArgument, as at open
        if rest:
            raise unknown_options(cls.backend_name, rest)
        return _capabilities(parsed.slow_chown)

    # -- hooks -----------------------------------------------------------------------

    def _opened(self) -> None:
        if not supports_d_type(self.root):
            self.close()
            raise FailedPrecondition(
                f"{self.root} is on a filesystem without d_type support, which overlayfs "
                "needs (xfs: reformat with ftype=1; ext4: enable the filetype feature)"
            )
        self._limits = LimitedLayers(self.snapshots_dir, self.snapshots_dir)
        with self._store.read() as tx:
            owned = set(tx.id_map())
        self._limits.reattach(owned)

    def _populate(
        self, work: Path, kind: Kind, parent: Record | None, labels: Mapping[str, str]
    ) -> None:
        size = parse_size_label(labels)  # a malformed label fails even on a view
        if size is None:
            size = self.config.default_size
        mapping = parse_mapping_labels(labels)
        if (
            mapping is not None
            and not idmapped_layers_supported(self.root)
            and not self.config.slow_chown
        ):
            raise FailedPrecondition(
                "uid/gid mapping labels need idmapped overlay layers (Linux 5.19+); "
                "set slow_chown=true to let containerd chown the layers instead"
            )
        # The upper's root belongs to the container's root when ids are
        # mapped; otherwise to the owner of the parent's (as in containerd):
        # a layer unpacked as another user keeps that user's root directory.
        owner = mapping.root_pair() if mapping is not None else None
        if owner is None and parent is not None:
            st = os.lstat(self._fs_dir(parent.id))
            owner = (st.st_uid, st.st_gid)
        if kind is Kind.ACTIVE and size:
            self._limits.populate(work, size, owner)
            return
        sid = work.name.removeprefix("new-")  # the layout's new-<id> (see BaseSnapshotter)
        if kind is Kind.ACTIVE and sid.isdigit():
            self._known_plain(int(sid))
        os.mkdir(work / "fs", 0o755)
        os.chmod(work / "fs", 0o755)  # whatever the umask
        if owner is not None:
            os.lchown(work / "fs", *owner)
        if kind is Kind.ACTIVE:
            os.mkdir(work / "work", 0o711)

    def _fs_dir(self, sid: int) -> Path:
        return self.storage_dir(sid) / "fs"

    @classmethod
    def _check(cls, survey: Survey) -> Iterator[Finding]:
        """The layout's checks, then: every snapshot has its upper (or its limited image)."""
        yield from super()._check(survey)
        for sid, row in survey.stored():
            if not cls._keeps_upper(row):
                continue
            storage = survey.snapshots_dir / str(sid)
            # A size-limited layer that is not mounted now shows only its image.
            if not (storage / "fs").is_dir() and not (storage / LIMITED_IMAGE).exists():
                yield Finding(
                    "missing-upper",
                    f"snapshots/{sid}/fs",
                    f"snapshot {row.key!r} has no fs directory (its files are lost)",
                )

    @classmethod
    def _keeps_upper(cls, row: Row) -> bool:
        """Whether ``row``'s files are in its ``fs`` directory (a subclass may keep them
        elsewhere, as erofs does for committed layers)."""
        return True

    def _mounts(self, rec: Record) -> list[Mount]:
        kind = rec.info.kind
        if kind is Kind.ACTIVE:
            self._ensure_mounted(rec.id)
        # Without idmapped layers (slow_chown) containerd chowns the layers
        # itself; only the upper's owner is ours to set, at create.
        options = _idmap_options(rec.info.labels)
        if options and not idmapped_layers_supported(self.root):  # probed only when asked
            options = []
        # Paths as in _fs_dir and storage_dir, built as strings (see __init__).
        source, escaped = self._source_prefix, self._option_prefix
        if not rec.parent_ids:
            mode = "ro" if kind is Kind.VIEW else "rw"
            return [
                Mount(type="bind", source=f"{source}{rec.id}/fs", options=(*options, mode, "rbind"))
            ]
        if kind is Kind.ACTIVE:
            options.append(f"workdir={escaped}{rec.id}/work")
            options.append(f"upperdir={escaped}{rec.id}/fs")
        elif len(rec.parent_ids) == 1:
            bound = f"{source}{rec.parent_ids[0]}/fs"
            return [Mount(type="bind", source=bound, options=(*options, "ro", "rbind"))]
        else:
            # Lowers only are read-only anyway; saying so lets consumers that
            # look for "ro" (containerd's mount.ReadOnly) see it too.
            options.append("ro")
        lowers = ":".join([f"{escaped}{p}/fs" for p in rec.parent_ids])
        options.append(f"lowerdir={lowers}")
        options.extend(self.mount_options)
        return [Mount(type="overlay", source="overlay", options=tuple(options))]

    def _ensure_mounted(self, sid: int) -> bool:
        """Mount a limited active snapshot's image if it is not; False for a plain one."""
        if sid in self._plain:
            return False
        if self._limits.ensure_mounted(self.storage_dir(sid)):
            return True
        self._known_plain(sid)
        return False

    def _known_plain(self, sid: int) -> None:
        if len(self._plain) >= _PLAIN_CACHE:
            self._plain.clear()  # a cache: forgetting only costs the stats again
        self._plain.add(sid)

    def _measure(self, rec: Record) -> Usage:
        if self._ensure_mounted(rec.id):
            return self._limits.usage(self.storage_dir(rec.id))
        return disk_usage(self._fs_dir(rec.id))

    def _prepare_commit(self, rec: Record) -> Usage:
        storage = self.storage_dir(rec.id)
        if rec.id in self._plain or not self._limits.is_limited(storage):
            self._plain.discard(rec.id)  # committed next: never active again
            return super()._prepare_commit(rec)
        # A new-* staging dir, locked like a create's, so that cleanup() in
        # any process leaves it alone now and reclaims it after a crash.
        staging = Path(tempfile.mkdtemp(prefix=f"new-commit-{rec.id}-", dir=self.snapshots_dir))
        lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                usage = self._limits.move_out(storage, staging)
            except BaseException:
                self._delete(staging)
                raise
            os.rmdir(staging)
        finally:
            os.close(lock)
        return usage

    def _release(self, path: Path) -> None:
        super()._release(path)
        self._limits.release(path)

    # -- calls that differ -------------------------------------------------------------

    def cleanup(self) -> Reclaimed:
        reclaimed = super().cleanup()
        with self._store.read() as tx:
            owned = set(tx.id_map())
        # What survived the base cleanup under new-* is a create or commit in progress.
        in_use = {n for n in os.listdir(self.snapshots_dir) if n.startswith("new-")}
        detached: list[str] = []
        for dev in self._limits.stray_loops(owned, in_use):
            try:
                loop.detach(dev)
            except OSError:
                continue
            detached.append(str(dev))
        if not detached:
            return reclaimed
        return dataclasses.replace(reclaimed, paths=reclaimed.paths + tuple(detached))

    def stat(self, key: str) -> Info:
        if not self.config.upperdir_label:
            return super().stat(key)
        with self._store.read() as tx:
            rec = tx.get(key)
        return self._with_upperdir(rec.info, rec.id)

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        updated = super().update(info, fieldpaths)
        if not self.config.upperdir_label:
            return updated
        with self._store.read() as tx:
            rec = tx.find(updated.name)
        return updated if rec is None else self._with_upperdir(updated, rec.id)

    def walk(self, *filters: str) -> Iterator[Info]:
        infos = super().walk(*filters)
        if not self.config.upperdir_label:
            return infos
        # Filters saw the stored labels only, as in containerd.
        with self._store.read() as tx:
            ids = {name: sid for sid, name in tx.id_map().items()}
        return (self._with_upperdir(i, ids[i.name]) if i.name in ids else i for i in infos)

    def _with_upperdir(self, info: Info, sid: int) -> Info:
        labels = {**info.labels, UPPERDIR_LABEL: str(self._fs_dir(sid))}
        return dataclasses.replace(info, labels=labels)


def _capabilities(slow_chown: bool) -> tuple[str, ...]:
    """What containerd may rely on, decided as its own overlayfs snapshotter does."""
    caps = []
    # In a user namespace a rebased layer's whiteouts may not be representable
    # (no 0/0 device nodes unprivileged); containerd does not offer it there either.
    if not in_user_namespace():
        caps.append("rebase")
    if idmapped_layers_supported():
        caps.append("remap-ids")
        # Without slow_chown a mapping we cannot apply is refused, so containerd
        # must not fall back to chowning the layers itself.
        if not slow_chown:
            caps.append("only-remap-ids")
    return tuple(caps)

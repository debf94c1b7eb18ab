"""The snapshot metadata store: SQLite in WAL mode.

It holds what containerd's ``core/snapshots/storage`` holds (keys, kinds,
parents, labels, stored usage, internal ids) and enforces the same rules in
the same order. It never touches files: backends compose "metadata
transaction + filesystem work + compensation" themselves.

Concurrency: one SQLite connection per thread for reads (readers never
block each other in WAL mode); writes go through one writer connection,
one at a time, and concurrent ones share a commit (:mod:`.group_commit`);
``BEGIN IMMEDIATE`` serialises them across processes.

A full disk: the store must still open, read, and delete rows on a
filesystem that has no free block or inode left, or a snapshotter that ran
the disk full could not free it. SQLite in WAL mode needs its ``-wal`` and
``-shm`` files for that, and a delete appends pages to the WAL. So the store
never lets SQLite delete those two files (the last connection to close is a
read-only one, which cannot checkpoint and so leaves them), keeps
:data:`WAL_RESERVE` bytes allocated to the WAL while there is room and
checkpoints before the WAL outgrows them, opens without writing (the schema
is checked by reading), and reports SQLite's "disk is full" as
ResourceExhausted.

Ids: a snapshot's storage directory is named by its id, so an id must never
be handed out twice, even when the process dies between renaming a fresh
directory into place and committing the row. Ids therefore come from a
durable sequence that is advanced in its own committed transaction *before*
any directory is named after them (see :meth:`MetaStore.reserve_id`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from . import filters as _filters
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    Unavailable,
    from_os_error,
)
from .findings import Row
from .group_commit import GroupCommit
from .store_filter import matching_ids
from .types import Info, Kind, Timestamp, Usage

__all__ = [
    "SCHEMA_VERSION",
    "ImageRecord",
    "MetaStore",
    "ReadTx",
    "Record",
    "WriteTx",
    "owned_ids_if_closed",
    "read_only_survey",
    "validate_key",
]

SCHEMA_VERSION = 3

log = logging.getLogger("stratasnap.metastore")

#: Bytes kept allocated to the WAL file. SQLite appends every transaction to
#: the WAL and starts it over from its beginning after a checkpoint, which it
#: runs once the WAL holds :data:`WAL_CHECKPOINT_FRAMES` pages; with the reserve
#: bigger than that, the WAL always writes inside blocks it has, full disk or
#: not. Kept small: test suites open hundreds of stores on tmpfs, where a
#: reserve is memory.
WAL_RESERVE = 1 << 20
#: wal_autocheckpoint: the WAL pages (4 KiB + a 24-byte header each) after
#: which SQLite checkpoints; three quarters of the reserve, leaving room for
#: the transaction that crosses the mark.
WAL_CHECKPOINT_FRAMES = WAL_RESERVE * 3 // 4 // (4096 + 24)

# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xff).
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14

#: containerd's rule (pkg/labels): a label's key and value together fit in 4096 bytes.
MAX_LABEL_BYTES = 4096
#: Our own bounds; containerd 1.6 stores 64 KiB keys and 50,000 labels unchecked.
MAX_KEY_BYTES = 4096
MAX_LABELS = 1024

# Ids are reserved in batches: one durable write per batch instead of one per
# snapshot. Ids reserved but unused when the process ends are simply skipped, so
# a process starts with batches of one (a CLI call wastes none) and doubles them
# up to this size as it keeps creating (a busy server).
_ID_BATCH_MAX = 32

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sequence (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent_id INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
CREATE TABLE labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
) WITHOUT ROWID;
CREATE INDEX labels_key_value ON labels(key, value);
INSERT INTO sequence VALUES ('snapshot', 0);
"""


# Version 2: image records (stratasnap.images). An image name points at one
# manifest (for one platform); the content store holds the blobs.
_IMAGES_SCHEMA = """
CREATE TABLE images (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    platform TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
);
CREATE INDEX images_digest ON images(digest);
"""

# Version 3: facts a backend records about a snapshot's storage at commit (the
# erofs backend: its image's digest); not labels, which containerd may replace.
_DETAILS_SCHEMA = """
CREATE TABLE details (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, name)
) WITHOUT ROWID;
"""


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for stmt in script.split(";"):
        if stmt.strip():
            conn.execute(stmt)


#: Migrations from version N to N+1, run inside one write transaction on open.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: lambda conn: _run_script(conn, _IMAGES_SCHEMA),
    2: lambda conn: _run_script(conn, _DETAILS_SCHEMA),
}

# One statement gives a consistent Info (row, parent key and labels) without an
# explicit transaction around several queries.
_INFO_SELECT = """
SELECT s.id, s.key, s.kind, COALESCE(p.key, ''), s.created_ns, s.updated_ns,
       s.size, s.inodes, s.parent_id,
       (SELECT json_group_object(l.key, l.value) FROM labels l WHERE l.snapshot_id = s.id)
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


@dataclass(frozen=True)
class Record:
    """A snapshot as the store knows it: its Info plus what backends need."""

    id: int
    info: Info
    usage: Usage
    #: Ids of the parent chain, immediate parent first (overlay's lowerdir order).
    parent_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ImageRecord:
    """An image name and the manifest it points at.

    ``digest`` is the manifest chosen for ``platform`` (``os/arch[/variant]``);
    ``source`` says where it came from (a registry reference or an archive path).
    """

    name: str
    digest: str
    media_type: str
    platform: str = ""
    source: str = ""
    created: datetime | None = None
    updated: datetime | None = None


def _now_ns() -> int:
    return time.time_ns()


def _to_datetime(ns: int) -> datetime:
    return Timestamp.from_epoch_ns(ns)


def validate_key(key: str, what: str = "snapshot key") -> None:
    """Keys are opaque text, but not empty, not NUL-bearing, valid UTF-8 and bounded."""
    if not key:
        raise InvalidArgument(f"{what} must not be empty")
    if "\x00" in key:
        raise InvalidArgument(f"{what} {key!r} contains a NUL byte")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {key!r} is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise InvalidArgument(f"{what} is {size} bytes long, more than {MAX_KEY_BYTES}")


def clean_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """Validated labels with empty values dropped (containerd never stores them)."""
    if not labels:
        return {}
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"label {k!r}={v!r}: keys and values must be strings")
        if not k:
            raise InvalidArgument("label key must not be empty")
        if "\x00" in k or "\x00" in v:
            raise InvalidArgument(f"label {k!r} contains a NUL byte")
        try:
            size = len(k.encode()) + len(v.encode())
        except UnicodeEncodeError:
            raise InvalidArgument(f"label {k!r} is not valid UTF-8") from None
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label key and value length ({size} bytes) greater than maximum size "
                f"({MAX_LABEL_BYTES} bytes), key: {k[:64]}"
            )
        if v:
            out[k] = v
    if len(out) > MAX_LABELS:
        raise InvalidArgument(f"{len(out)} labels, more than {MAX_LABELS}")
    return out


class ReadTx:
    """Reads inside one consistent snapshot of the store."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _row_to_record(self, row: tuple[object, ...], with_parents: bool) -> Record:
        (sid, key, kind, parent, created, updated, size, inodes, parent_id, labels) = row
        assert isinstance(sid, int) and isinstance(created, int) and isinstance(updated, int)
        info = Info(
            name=str(key),
            kind=Kind(str(kind)),
            parent=str(parent),
            labels=json.loads(str(labels)) if labels else {},
            created=(when := _to_datetime(created)),
            # The same object when equal: the wire conversion then works once.
            updated=when if updated == created else _to_datetime(updated),
        )
        usage = Usage(size=int(str(size)), inodes=int(str(inodes)))
        parents = self._parent_ids(parent_id) if with_parents and parent_id is not None else ()
        return Record(id=sid, info=info, usage=usage, parent_ids=parents)

    def _parent_ids(self, first: object) -> tuple[int, ...]:
        rows = self._conn.execute(
            """WITH RECURSIVE chain(id, parent_id, depth) AS (
                   SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
                   UNION ALL
                   SELECT s.id, s.parent_id, c.depth + 1
                   FROM snapshots s JOIN chain c ON s.id = c.parent_id)
               SELECT id FROM chain ORDER BY depth""",
            (first,),
        ).fetchall()
        return tuple(int(r[0]) for r in rows)

    def find(self, key: str, with_parents: bool = False) -> Record | None:
        """The record of ``key``, or None."""
        row = self._conn.execute(_INFO_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return None if row is None else self._row_to_record(row, with_parents)

    def find_id(self, sid: int, with_parents: bool = False) -> Record | None:
        """The record of snapshot id ``sid``, or None."""
        row = self._conn.execute(_INFO_SELECT + " WHERE s.id = ?", (sid,)).fetchone()
        return None if row is None else self._row_to_record(row, with_parents)

    def get(self, key: str, with_parents: bool = False) -> Record:
        """The record of ``key``; NotFound when there is none."""
        rec = self.find(key, with_parents)
        if rec is None:
            raise NotFound(f"snapshot {_q(key)}")
        return rec

    def get_mountable(self, key: str) -> Record:
        """An active or view snapshot with its parent chain (for Mounts)."""
        rec = self.get(key, with_parents=True)
        if rec.info.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {_q(key)} is committed, not active or view")
        return rec

    def check_create(self, kind: Kind, key: str, parent: str) -> Record | None:
        """containerd's checks for a new snapshot, in its order; returns the parent."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot type {kind} invalid; only active or view snapshots can be created"
            )
        parent_rec = None
        if parent:
            parent_rec = self.find(parent)
            if parent_rec is None:
                raise NotFound(f"parent snapshot {_q(parent)} does not exist")
            if parent_rec.info.kind is not Kind.COMMITTED:
                raise InvalidArgument(f"parent {_q(parent)} is not committed snapshot")
        if self.find(key) is not None:
            raise AlreadyExists(f"snapshot {_q(key)}")
        return parent_rec

    def check_commit(self, name: str, key: str, parent: str) -> tuple[Record, int | None]:
        """containerd's checks for a commit, in its order; returns the active record and
        the id of the parent to rebase onto (None: keep the parent)."""
        if self.find(name) is not None:
            raise AlreadyExists(f"snapshot {_q(name)}")
        rec = self.get(key)
        if rec.info.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {_q(key)} is not active")
        if not parent:
            return rec, None
        if rec.info.parent and rec.info.parent != parent:
            raise InvalidArgument(
                f"cannot change parent of {_q(key)} from {_q(rec.info.parent)} "
                f"to {_q(parent)} on commit"
            )
        prec = self.find(parent)
        if prec is None:
            raise NotFound(f"parent snapshot {_q(parent)} does not exist")
        if prec.info.kind is not Kind.COMMITTED:
            raise FailedPrecondition(f"parent {_q(parent)} is not committed snapshot")
        return rec, prec.id

    def walk(self, flt: _filters.Filter) -> list[Info]:
        """Every snapshot matching ``flt``, ordered by key.

        The filter is evaluated as sets of ids (:mod:`.store_filter`), then
        only the matching rows are read.
        """
        if flt.matches_everything:
            rows = self._conn.execute(_INFO_SELECT + " ORDER BY s.key")
        else:
            ids = matching_ids(self._conn, flt)
            if not ids.negated and not ids.ids:
                return []
            membership = "NOT IN" if ids.negated else "IN"
            rows = self._conn.execute(
                _INFO_SELECT
                + f" WHERE s.id {membership} (SELECT value FROM json_each(?)) ORDER BY s.key",
                (json.dumps(sorted(ids.ids)),),
            )
        return [self._row_to_record(r, False).info for r in rows]

    def details(self, sid: int) -> dict[str, str]:
        """What the backend recorded about snapshot id ``sid``'s storage at commit."""
        rows = self._conn.execute(
            "SELECT name, value FROM details WHERE snapshot_id = ? ORDER BY name", (sid,)
        )
        return {str(n): str(v) for n, v in rows}

    def id_kinds(self) -> dict[int, Kind]:
        """Every snapshot's id and kind."""
        return {int(i): Kind(k) for i, k in self._conn.execute("SELECT id, kind FROM snapshots")}

    def id_map(self) -> dict[int, str]:
        """Every snapshot's id and key (what owns storage)."""
        return {int(i): str(k) for i, k in self._conn.execute("SELECT id, key FROM snapshots")}

    def count_by_kind(self) -> dict[Kind, int]:
        """How many snapshots of each kind there are."""
        counts = {k: 0 for k in Kind}
        for kind, n in self._conn.execute("SELECT kind, count(*) FROM snapshots GROUP BY kind"):
            counts[Kind(kind)] = int(n)
        return counts

    # -- images ------------------------------------------------------------------

    def find_image(self, name: str) -> ImageRecord | None:
        """The image record called ``name``, or None."""
        row = self._conn.execute(_IMAGE_SELECT + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _image_from_row(row)

    def images(self) -> list[ImageRecord]:
        """Every image record, ordered by name."""
        rows = self._conn.execute(_IMAGE_SELECT + " ORDER BY name")
        return [_image_from_row(r) for r in rows]


_IMAGE_SELECT = (
    "SELECT name, digest, media_type, platform, source, created_ns, updated_ns FROM images"
)


def _image_from_row(row: tuple[object, ...]) -> ImageRecord:
    name, digest, media, platform, source, created, updated = row
    assert isinstance(created, int) and isinstance(updated, int)
    return ImageRecord(
        name=str(name),
        digest=str(digest),
        media_type=str(media),
        platform=str(platform),
        source=str(source),
        created=_to_datetime(created),
        updated=_to_datetime(updated),
    )


class WriteTx(ReadTx):
    """Changes, applied atomically when the transaction commits."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        before_commit: Callable[[Hashable, Callable[[], None]], None],
    ) -> None:
        super().__init__(conn)
        self._before_commit = before_commit

    def before_commit(self, key: Hashable, work: Callable[[], None]) -> None:
        """Have ``work`` done (once per ``key`` in a shared commit) before this change is durable.

        For what the change relies on outside the store, e.g. an fsync of
        the directory a snapshot was renamed into. When ``work`` raises,
        the change does not commit and the write raises that error (an
        OSError as a typed SnapshotError: every write sharing the commit
        gets it, whatever its own call was).
        """

        def durable() -> None:
            try:
                work()
            except OSError as exc:
                raise from_os_error(exc, "making storage durable before the commit") from exc

        self._before_commit(key, durable)

    def create(
        self, sid: int, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> Record:
        """Insert a new active or view snapshot with a reserved id; its record as stored."""
        parent_rec = self.check_create(kind, key, parent)
        now = _now_ns()
        self._conn.execute(
            "INSERT INTO snapshots (id, key, kind, parent_id, created_ns, updated_ns) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (sid, key, str(kind), parent_rec.id if parent_rec else None, now, now),
        )
        self._set_labels(sid, labels)
        # Built from what was just written, not read back: one query less per Prepare.
        when = _to_datetime(now)
        info = Info(
            name=key,
            kind=kind,
            parent=parent if parent_rec else "",
            labels={k: v for k, v in labels.items() if v},  # what _set_labels stored
            created=when,
            updated=when,
        )
        parents = self._parent_ids(parent_rec.id) if parent_rec else ()
        return Record(id=sid, info=info, usage=Usage(), parent_ids=parents)

    def commit_active(
        self,
        key: str,
        name: str,
        usage: Usage,
        labels: Mapping[str, str],
        parent: str = "",
        details: Mapping[str, str] | None = None,
    ) -> None:
        """Turn active ``key`` into committed ``name``, keeping its id (and storage).

        ``details`` are the backend's facts about the committed storage
        (see :meth:`ReadTx.details`); only commit writes them, so an active
        snapshot has none to delete first.
        """
        rec, parent_id = self.check_commit(name, key, parent)
        now = _now_ns()
        self._conn.execute(
            "UPDATE snapshots SET key = ?, kind = 'committed', created_ns = ?, updated_ns = ?, "
            "size = ?, inodes = ?, parent_id = COALESCE(?, parent_id) WHERE id = ?",
            (name, now, now, usage.size, usage.inodes, parent_id, rec.id),
        )
        # Commit replaces labels; it does not inherit the active snapshot's.
        if rec.info.labels:
            self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (rec.id,))
        self._set_labels(rec.id, labels)
        if details:
            self._conn.executemany(
                "INSERT INTO details (snapshot_id, name, value) VALUES (?, ?, ?)",
                [(rec.id, k, v) for k, v in details.items()],
            )

    def update_info(self, info: Info, fieldpaths: Iterable[str]) -> Info:
        """Update labels as containerd does; other fields of ``info`` are ignored."""
        rec = self.get(info.name)
        paths = list(fieldpaths)
        for path in paths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update {_q(path)} field on snapshot {_q(info.name)}")
        incoming = dict(info.labels or {})
        if not paths or "labels" in paths:
            # No mask, or "labels": the whole label set is replaced.
            new = incoming
        else:
            # "labels.<k>" sets one label from info.labels; absent or "" deletes it.
            new = dict(rec.info.labels)
            for path in paths:
                k = path[len("labels.") :]
                if incoming.get(k):
                    new[k] = incoming[k]
                else:
                    new.pop(k, None)
        cleaned = clean_labels(new)
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (rec.id,))
        self._set_labels(rec.id, cleaned)
        now = _now_ns()
        self._conn.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (now, rec.id))
        # What was just written, not read back (clean_labels dropped the empty values).
        return replace(rec.info, labels=cleaned, updated=_to_datetime(now))

    def remove(self, key: str) -> Record:
        """Delete ``key``'s metadata; refused while it has children."""
        rec = self.get(key)
        child = self._conn.execute(
            "SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (rec.id,)
        ).fetchone()
        if child is not None:
            raise FailedPrecondition(f"cannot remove snapshot {_q(key)} with child {_q(child[0])}")
        # Its labels and details go with it (ON DELETE CASCADE).
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        return rec

    def put_image(self, image: ImageRecord) -> ImageRecord:
        """Create or repoint the image called ``image.name`` (created time kept)."""
        now = _now_ns()
        self._conn.execute(
            "INSERT INTO images (name, digest, media_type, platform, source, created_ns, "
            "updated_ns) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
            "digest = excluded.digest, media_type = excluded.media_type, "
            "platform = excluded.platform, source = excluded.source, "
            "updated_ns = excluded.updated_ns",
            (image.name, image.digest, image.media_type, image.platform, image.source, now, now),
        )
        found = self.find_image(image.name)
        assert found is not None
        return found

    def delete_image(self, name: str) -> ImageRecord:
        """Delete the image record ``name``; NotFound when there is none."""
        found = self.find_image(name)
        if found is None:
            raise NotFound(f"image {_q(name)}")
        self._conn.execute("DELETE FROM images WHERE name = ?", (name,))
        return found

    def _set_labels(self, sid: int, labels: Mapping[str, str]) -> None:
        if not labels:
            return
        self._conn.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in labels.items() if v],
        )


def _q(s: str) -> str:
    """Quote like Go's %q for messages (double quotes, escapes)."""
    return json.dumps(s, ensure_ascii=False)


def _fs_full(path: Path) -> bool:
    """Whether the filesystem holding ``path`` has no block or no inode left for us."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)


def _typed(exc: sqlite3.Error, path: Path) -> SnapshotError | None:
    """The typed error for an SQLite failure that is the disk's, not the program's."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == _SQLITE_FULL:
        return ResourceExhausted(f"metadata {path}: {exc}")
    if code == _SQLITE_CANTOPEN:
        if _fs_full(path):
            # The -wal or -shm file was missing and could not be made.
            return ResourceExhausted(
                f"metadata {path}: cannot open it, the filesystem is full ({exc}); "
                "free some space on it"
            )
        return Unavailable(f"metadata {path}: {exc}")
    return None


def owned_ids_if_closed(path: Path) -> set[int] | None:
    """The snapshot ids of a store no process has open, read without creating a file.

    For a full disk where SQLite's ``-wal``/``-shm`` files are missing (a
    store last closed by a stratasnap that let SQLite delete them) and
    cannot be made: with no WAL the database file holds everything, so an
    ``immutable`` read of it is exact. None when a WAL exists (another
    process may have the store open, or its last commits are in the WAL)
    or the file cannot be read.
    """
    if not path.is_file() or os.path.lexists(f"{path}-wal"):
        return None
    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True)
        try:
            return {int(row[0]) for row in conn.execute("SELECT id FROM snapshots")}
        finally:
            conn.close()
    except sqlite3.Error:
        return None


class MetaStore:
    """The SQLite store under ``<root>/metadata.db``."""

    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        # The commit is looked up at each call, so that crash tests can interrupt it.
        self._group = GroupCommit(self._writer, lambda conn: self._commit(conn))
        self._ids: list[int] = []
        self._id_batch = 1
        self._ids_lock = threading.Lock()
        self._closed = False
        self._wrote = False  # committed a write: worth a checkpoint at close
        self._migrate()

    # -- connections -------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise Unavailable("snapshotter is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._typed_errors():
                conn = self._connect()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # only so close() may close it from another thread
        )
        try:
            # A no-op (no write) on a store that is in WAL mode already.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_FRAMES}")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _typed_errors(self) -> Iterator[None]:
        """Turn SQLite's full-disk and cannot-open failures into typed errors."""
        try:
            yield
        except sqlite3.Error as exc:
            typed = _typed(exc, self.path)
            if typed is None:
                raise
            raise typed from exc

    def _writer(self) -> sqlite3.Connection:
        """The connection every write transaction of this process runs on (by turns)."""
        if self._closed:
            raise Unavailable("snapshotter is closed")
        with self._typed_errors():
            conn = self._connect()
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection; later calls raise Unavailable."""
        if self._closed:
            return
        self._closed = True
        with self._conns_lock:
            keeper = self._wal_keeper()
            for conn in self._conns:
                with suppress(sqlite3.Error):
                    conn.close()
            self._conns.clear()
            if keeper is not None:
                with suppress(sqlite3.Error):
                    keeper.close()

    def _wal_keeper(self) -> sqlite3.Connection | None:
        """A read-only connection to close last, so that SQLite keeps ``-wal`` and ``-shm``.

        The last connection to a WAL database checkpoints and deletes both
        files when it closes; the next open must then create them, which a
        full filesystem refuses. A read-only connection cannot checkpoint,
        so when it is the last one the files stay (with their blocks). A
        checkpoint first lets the next writer start the WAL over from its
        beginning, inside blocks it already has; only after this process
        wrote (after a mere read it would copy the whole WAL again, since
        recovery forgets what was copied already).
        """
        if self._conns and self._wrote:
            with suppress(sqlite3.Error):
                self._conns[0].execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        try:
            keeper = sqlite3.connect(
                f"file:{quote(str(self.path))}?mode=ro", uri=True, isolation_level=None
            )
            # A read opens the WAL index and holds the database's shared lock.
            keeper.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error:
            return None
        return keeper

    def _reserve_wal(self) -> None:
        """Keep :data:`WAL_RESERVE` bytes allocated to the WAL, when the disk has room.

        Only ever uses space that is free with a good margin: opening on a
        full disk must not need any, and SQLite reads zeros past the last
        frame as the end of the log.
        """
        wal = Path(f"{self.path}-wal")
        try:
            fd = os.open(wal, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if st.st_blocks * 512 >= WAL_RESERVE:
                return
            fs = os.fstatvfs(fd)
            if fs.f_bavail * fs.f_frsize < 4 * WAL_RESERVE:
                log.debug("filesystem nearly full: WAL reserve not made", extra={"wal": str(wal)})
                return
            os.posix_fallocate(fd, 0, WAL_RESERVE)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EOPNOTSUPP, errno.EINVAL):
                log.warning("cannot reserve WAL space", extra={"wal": str(wal), "error": exc})
        finally:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- transactions ------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[ReadTx]:
        """A read transaction (nested inside one already open on this thread)."""
        conn = self._group.current() or self._conn()
        if conn.in_transaction:
            yield ReadTx(conn)
            return
        with self._typed_errors():
            conn.execute("BEGIN")
            try:
                yield ReadTx(conn)
            finally:
                if not self._closed and conn.in_transaction:
                    conn.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[WriteTx]:
        """A write transaction: durable when the block ends, rolled back on error.

        Concurrent ones may share one commit (see :mod:`.group_commit`); the
        block's own changes are all or nothing either way.
        """
        with self._immediate() as conn:
            yield WriteTx(conn, self._group.before_commit)

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer's connection, by turns; durable at the end."""
        if self._conn().in_transaction or self._group.current() is not None:
            # Nesting would wait for its own turn forever (and a reserved id must
            # be durable on its own, before the caller's transaction).
            raise RuntimeError("write transaction inside another transaction on this thread")
        # SQLite may roll a transaction back itself (a full disk does): the
        # group commit checks before it rolls back or commits.
        with self._typed_errors(), self._group.transaction() as conn:
            changes = conn.total_changes
            yield conn
            self._wrote |= conn.total_changes != changes

    def _commit(self, conn: sqlite3.Connection) -> None:
        # A separate method so crash tests can kill the process right here.
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def batch_sizes(self) -> dict[int, int]:
        """How many commits made how many write transactions durable: ``{size: commits}``."""
        return self._group.batch_sizes()

    def set_max_batch(self, max_batch: int) -> None:
        """At most ``max_batch`` write transactions per commit (1: each commits alone)."""
        self._group.set_max_batch(max_batch)

    def reserve_id(self) -> int:
        """An id no snapshot has had or will have, made durable before it is returned."""
        with self._ids_lock:
            if not self._ids:
                with self._immediate() as conn:
                    (last,) = conn.execute(
                        "UPDATE sequence SET value = value + ? WHERE name = 'snapshot' "
                        "RETURNING value",
                        (self._id_batch,),
                    ).fetchone()
                self._ids = list(range(int(last), int(last) - self._id_batch, -1))
                self._id_batch = min(self._id_batch * 2, _ID_BATCH_MAX)
            return self._ids.pop()

    # -- schema --------------------------------------------------------------

    def _schema_current(self) -> bool:
        """Whether the store has this version's schema (a read: opening writes nothing)."""
        with self.read() as tx:
            conn = tx._conn
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone():
                return False
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        return row is not None and int(row[0]) == SCHEMA_VERSION

    def _migrate(self) -> None:
        if self._schema_current():
            self._reserve_wal()
            return
        with self._immediate() as conn:
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if not has_meta:
                _run_script(conn, _SCHEMA)
                _run_script(conn, _IMAGES_SCHEMA)
                _run_script(conn, _DETAILS_SCHEMA)
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            else:
                (version,) = conn.execute(
                    "SELECT value FROM meta WHERE name = 'schema_version'"
                ).fetchone()
                version = int(version)
                if version > SCHEMA_VERSION:
                    raise Unavailable(
                        f"metadata {self.path} has schema version {version}; this "
                        f"stratasnap understands up to {SCHEMA_VERSION}: upgrade stratasnap"
                    )
                while version < SCHEMA_VERSION:
                    MIGRATIONS[version](conn)
                    version += 1
                conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(version),)
                )
        self._reserve_wal()


def read_only_survey(path: Path) -> tuple[dict[int, Row], tuple[str, ...]]:
    """Every snapshot row (with its details), and what SQLite's checks say, writing nothing.

    Opened read-only (``stratasnap check`` runs next to a live server): no
    migration, no recovery. Problems are SQLite's integrity check and the
    rows whose parent reference is dangling (foreign keys).
    """
    uri = f"file:{quote(str(Path(path).absolute()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise Unavailable(f"cannot open {path} read-only: {exc}") from None
    try:
        problems: list[str] = []
        try:
            result = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(20)")]
            if result != ["ok"]:
                problems.extend(result)
            for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check"):
                problems.append(f"{table} row {rowid} refers to a missing row of {parent}")
            details: dict[int, dict[str, str]] = {}
            with suppress(sqlite3.OperationalError):  # no details table before schema 3
                for sid, name, value in conn.execute(
                    "SELECT snapshot_id, name, value FROM details"
                ):
                    details.setdefault(int(sid), {})[str(name)] = str(value)
            rows: dict[int, Row] = {}
            kinds = {k.value: k for k in Kind}
            for sid, key, kind, parent_id in conn.execute(
                "SELECT id, key, kind, parent_id FROM snapshots"
            ):
                rows[int(sid)] = Row(
                    int(sid),
                    str(key),
                    kinds.get(str(kind)),
                    None if parent_id is None else int(parent_id),
                    details.get(int(sid), {}),
                )
        except sqlite3.DatabaseError as exc:
            # Corrupt beyond reading its rows: that is the finding.
            return {}, (*problems, f"cannot read the store: {exc}")
        return rows, tuple(problems)
    finally:
        conn.close()

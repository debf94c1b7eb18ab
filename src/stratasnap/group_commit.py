"""Group commit: concurrent write transactions share one SQLite commit (and its fsync).

A durable SQLite commit in WAL mode costs an fdatasync of the log; on a
loop-mounted ext4 that is most of a write call. When several callers write at
once, they need not pay one each: whoever holds the writer's turn runs its
operation inside the transaction that is already open, in a SAVEPOINT of its
own, and leaves the commit to the last of the callers queued behind it. So
one COMMIT (one fsync) makes a whole batch durable, and every caller is told
only after that. A lone caller finds nobody queued and commits at once, with
exactly the statements it would have used alone (BEGIN IMMEDIATE, its
operation, COMMIT): it is not made to wait for company.

An operation may ask for work that must be durable before its commit is
(:meth:`GroupCommit.before_commit`: e.g. an fsync of a directory it renamed
into place). The committer runs that work for the whole batch right before
COMMIT, each distinct piece once (callers arriving meanwhile queue for the
next batch, as during the COMMIT's fsync): N prepares renaming into one
directory share one fsync of it, as they share the log's.

An operation that fails is rolled back to its savepoint and its caller gets
its error at once (its pre-commit work is dropped); the others in the batch
are not affected. A commit that fails (a full disk, an I/O error, failed
pre-commit work) fails every caller of the batch, each of which then undoes
its own side effects, as it would have alone.

This module knows SQL transactions, not snapshots: the metadata store
(:mod:`.metastore`) uses it for every write.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress

__all__ = ["MAX_BATCH", "GroupCommit"]

#: Operations that may share one commit. Bounds how long the first caller of a
#: batch waits behind the others (each runs its operation in turn first).
MAX_BATCH = 64


class _Batch:
    """One open transaction and the callers waiting for it to be durable."""

    __slots__ = ("done", "error", "finished", "members", "pre_commit")

    def __init__(self) -> None:
        # Made only when a caller is left waiting: a lone caller commits itself.
        self.done: threading.Event | None = None
        self.finished = False
        self.error: BaseException | None = None
        self.members = 0  # operations that succeeded inside it
        # What must be durable before COMMIT, by key (one run per key), in order.
        self.pre_commit: dict[Hashable, Callable[[], None]] = {}


class GroupCommit:
    """Serialises write transactions on one connection and batches their commits.

    ``connect`` opens the writer's connection (once, on first use);
    ``commit`` commits the open transaction on it, rolling back when that
    fails (the store passes its own, which crash tests interrupt).
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        commit: Callable[[sqlite3.Connection], None],
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.max_batch = MAX_BATCH
        self.set_max_batch(max_batch)
        self._connect = connect
        self._commit = commit
        self._conn: sqlite3.Connection | None = None
        self._turn = threading.Lock()  # one operation (or commit) at a time
        self._queue_lock = threading.Lock()
        self._queued = 0  # callers waiting for the turn: they may join the open batch
        self._batch: _Batch | None = None  # the open transaction, touched under _turn
        self._sizes: Counter[int] = Counter()
        self._local = threading.local()

    def set_max_batch(self, max_batch: int) -> None:
        """Bound the operations one commit may carry from now on; 1 turns batching off."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.max_batch = max_batch

    @property
    def queued(self) -> int:
        """Callers waiting for their turn right now."""
        return self._queued

    def batch_sizes(self) -> dict[int, int]:
        """How many commits made how many operations durable: ``{size: commits}``."""
        with self._queue_lock:
            return dict(self._sizes)

    def current(self) -> sqlite3.Connection | None:
        """The writer's connection when this thread is inside an operation, else None."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        return conn

    def before_commit(self, key: Hashable, work: Callable[[], None]) -> None:
        """Run ``work`` before the COMMIT that makes this thread's operation durable.

        Called inside an operation. Work under a key already queued in the
        batch runs once. When ``work`` raises, the batch is rolled back and
        every caller of it gets that error, as with a failed COMMIT. Dropped
        when the operation itself fails.
        """
        pending: dict[Hashable, Callable[[], None]] | None = getattr(self._local, "pending", None)
        if pending is None:
            raise RuntimeError("before_commit outside a write transaction")
        pending.setdefault(key, work)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block as one operation of a batch; return once the batch is durable.

        The block's changes are undone when it raises (its error then
        propagates at once). When it succeeds, this waits for the commit
        of its batch and raises that commit's error, if any.
        """
        if self.current() is not None:
            # The turn is not reentrant: nesting would wait for itself forever.
            raise RuntimeError("write transaction inside another one on this thread")
        if not self._turn.acquire(blocking=False):
            # Counted while waiting, so that the holder leaves the batch open for us.
            with self._queue_lock:
                self._queued += 1
            self._turn.acquire()
            with self._queue_lock:
                self._queued -= 1
        batch = self._batch
        first = batch is None
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE" if first else "SAVEPOINT op")
        except BaseException:
            self._end_turn()
            raise
        if batch is None:
            batch = self._batch = _Batch()
        self._local.conn = conn
        pending: dict[Hashable, Callable[[], None]] = {}
        self._local.pending = pending
        try:
            yield conn
            if not first:
                conn.execute("RELEASE op")
        except BaseException:
            self._local.conn = self._local.pending = None
            try:
                self._undo(conn, first)
            except BaseException:
                # Its changes could not be taken out: the batch must not commit them.
                self._end_turn(abort=True)
                raise
            self._end_turn()
            raise
        self._local.conn = self._local.pending = None
        for key, work in pending.items():
            batch.pre_commit.setdefault(key, work)
        batch.members += 1
        self._end_turn()
        if not batch.finished:
            assert batch.done is not None  # made when the turn was handed on
            batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def _undo(self, conn: sqlite3.Connection, first: bool) -> None:
        """Roll back the failed operation only (all of it when it was alone)."""
        if not conn.in_transaction:
            return  # SQLite rolled the transaction back itself (a full disk does)
        if first:
            # Nobody joined before this operation: nothing else to keep.
            conn.execute("ROLLBACK")
            return
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")

    def _end_turn(self, abort: bool = False) -> None:
        """Hand the turn on: to a queued caller, who joins the batch, or commit the batch.

        ``abort``: roll the whole batch back and fail its callers instead.
        """
        batch = self._batch
        conn = self._conn
        if batch is None or conn is None:
            self._turn.release()
            return
        if abort and conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if abort or not conn.in_transaction:
            # The transaction is gone (rolled back by SQLite): so is the batch.
            self._batch = None
            if batch.members:
                batch.error = sqlite3.OperationalError(
                    "the shared write transaction was rolled back before its commit"
                )
            self._finish(batch)
            return
        if self._queued and batch.members < self.max_batch:
            # The next caller's operation joins this batch. (Reading the count
            # unlocked is safe: a caller counts itself before it waits for the
            # turn, so one we miss finds the turn free or the batch committed.)
            if batch.done is None:
                batch.done = threading.Event()
            self._turn.release()
            return
        self._batch = None
        try:
            if batch.members:
                for work in batch.pre_commit.values():
                    work()
                self._commit(conn)
            else:
                conn.execute("ROLLBACK")  # every operation in it failed: nothing to make durable
        except BaseException as exc:
            batch.error = exc
            if conn.in_transaction:  # pre-commit work failed: nothing of the batch commits
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        finally:
            if batch.members:
                with self._queue_lock:
                    self._sizes[batch.members] += 1
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        """Give up the turn and wake the batch's callers (its outcome is set)."""
        batch.finished = True
        self._turn.release()
        if batch.done is not None:
            batch.done.set()

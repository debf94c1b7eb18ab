"""Group commit in the metadata store: concurrent writes share one commit, each stays its own.

A batch is formed deterministically: a first write holds the writer's turn
inside its block until every other caller is queued behind it; they then
run one after the other inside the open transaction and the last commits.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stratasnap.errors import AlreadyExists, SnapshotError
from stratasnap.group_commit import GroupCommit
from stratasnap.metastore import MetaStore, WriteTx
from stratasnap.types import Kind

Body = Callable[[WriteTx], object]


@pytest.fixture
def store(scratch: Path) -> Iterator[MetaStore]:
    s = MetaStore(scratch / "metadata.db")
    yield s
    s.close()


def committed_keys(path: Path) -> set[str]:
    """Keys a fresh connection sees: what is committed, not what a batch holds open."""
    conn = sqlite3.connect(path)
    try:
        return {k for (k,) in conn.execute("SELECT key FROM snapshots")}
    finally:
        conn.close()


def creator(store: MetaStore, key: str) -> Body:
    sid = store.reserve_id()  # ids first: reserving one is a write of its own
    return lambda tx: tx.create(sid, Kind.ACTIVE, key, "", {"k": key})


def count_commits(store: MetaStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = store._commit

    def spy(conn: sqlite3.Connection) -> None:
        calls.append(1)
        real(conn)

    monkeypatch.setattr(store, "_commit", spy)
    return calls


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def run_together(
    store: MetaStore, first: Body, others: dict[str, Body]
) -> dict[str, BaseException | bool]:
    """Run ``first`` and then ``others`` queued behind it, each in its own thread.

    Returns, per name ("first" too), the error its write raised, or whether
    its changes were committed (seen by a fresh connection) when it returned.
    """
    outcome: dict[str, BaseException | bool] = {}
    holding, go = threading.Event(), threading.Event()
    queued_before = store._group.queued

    def call(name: str, body: Body, hold: bool) -> None:
        try:
            with store.write() as tx:
                body(tx)
                if hold:
                    holding.set()
                    go.wait(20)
        except BaseException as exc:
            outcome[name] = exc
            return
        outcome[name] = name in committed_keys(store.path)

    threads = [threading.Thread(target=call, args=("first", first, True))]
    threads[0].start()
    wait_until(holding.is_set, "the first write to hold its turn")
    for name, body in others.items():
        threads.append(threading.Thread(target=call, args=(name, body, False)))
        threads[-1].start()
    wait_until(lambda: store._group.queued - queued_before == len(others), "callers to queue")
    go.set()
    for t in threads:
        t.join(30)
    return outcome


def delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {k: v for k, v in (Counter(after) - Counter(before)).items() if v}


def test_concurrent_writes_share_one_commit(
    store: MetaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    others = {f"w{i}": creator(store, f"w{i}") for i in range(8)}
    first = creator(store, "first")
    commits = count_commits(store, monkeypatch)
    sizes = store.batch_sizes()
    outcome = run_together(store, first, others)
    # Every caller heard back only once its write was committed.
    assert outcome == {name: True for name in ["first", *others]}
    assert len(commits) == 1  # nine writes, one commit (one fsync)
    assert delta(store.batch_sizes(), sizes) == {9: 1}


def test_a_failing_write_leaves_the_rest_of_its_batch_committed(
    store: MetaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Boom(Exception):
        pass

    def half_then_fail(tx: WriteTx) -> None:
        tx._conn.execute(
            "INSERT INTO snapshots (id, key, kind, created_ns, updated_ns) "
            "VALUES (100000, 'half', 'active', 0, 0)"
        )
        raise Boom

    others: dict[str, Body] = {f"w{i}": creator(store, f"w{i}") for i in range(3)}
    others["half"] = half_then_fail
    others["dup"] = creator(store, "first")  # AlreadyExists: "first" is in the batch
    others.update({f"v{i}": creator(store, f"v{i}") for i in range(3)})
    first = creator(store, "first")
    commits = count_commits(store, monkeypatch)
    sizes = store.batch_sizes()
    outcome = run_together(store, first, others)
    assert isinstance(outcome.pop("half"), Boom)
    assert isinstance(outcome.pop("dup"), AlreadyExists)
    assert outcome == {name: True for name in outcome}
    assert len(outcome) == 7
    assert len(commits) == 1
    assert delta(store.batch_sizes(), sizes) == {7: 1}
    keys = committed_keys(store.path)
    assert "half" not in keys
    assert keys >= set(outcome)


def test_a_failed_commit_fails_every_caller_of_the_batch(
    store: MetaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    others = {f"w{i}": creator(store, f"w{i}") for i in range(4)}
    first = creator(store, "first")

    def failing_commit(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_commit", failing_commit)
    outcome = run_together(store, first, others)
    assert set(outcome) == {"first", *others}
    assert all(isinstance(e, sqlite3.OperationalError) for e in outcome.values())
    assert committed_keys(store.path) == set()
    monkeypatch.undo()
    with store.write() as tx:  # the writer is usable again
        creator(store, "after")(tx)
    assert committed_keys(store.path) == {"after"}


def test_a_lone_write_commits_at_once_as_it_would_alone(
    store: MetaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = creator(store, "alone")
    commits = count_commits(store, monkeypatch)
    sizes = store.batch_sizes()
    statements: list[str] = []
    with store.write() as tx:
        tx._conn.set_trace_callback(statements.append)
        body(tx)
    tx._conn.set_trace_callback(None)
    assert "alone" in committed_keys(store.path)
    assert len(commits) == 1 and delta(store.batch_sizes(), sizes) == {1: 1}
    assert not any("SAVEPOINT" in s for s in statements)  # no batching cost alone


def test_a_lone_write_commits_on_the_callers_thread(
    store: MetaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No handoff to a committer: the pre-commit work and the COMMIT (its fsync)
    # run on the calling thread, which never waits on another thread.
    body = creator(store, "alone")
    ran_on: dict[str, int] = {}
    real = store._commit

    def commit(conn: sqlite3.Connection) -> None:
        ran_on["commit"] = threading.get_ident()
        real(conn)

    def no_wait(self: threading.Event, timeout: float | None = None) -> bool:
        raise AssertionError("a lone write waited for another thread")

    monkeypatch.setattr(store, "_commit", commit)
    monkeypatch.setattr(threading.Event, "wait", no_wait)
    with store.write() as tx:
        body(tx)
        tx.before_commit("k", lambda: ran_on.update(pre_commit=threading.get_ident()))
    assert ran_on == {"commit": threading.get_ident(), "pre_commit": threading.get_ident()}
    assert "alone" in committed_keys(store.path)


def test_the_writer_connection_is_durable_and_reads_its_own_writes(store: MetaStore) -> None:
    with store.write() as tx:
        tx.create(500, Kind.ACTIVE, "mine", "", {})
        assert tx._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert tx._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with store.read() as rtx:  # nested read: sees the open transaction
            assert rtx.find("mine") is not None
        with pytest.raises(RuntimeError), store.write():
            pass
    assert "mine" in committed_keys(store.path)


def test_batches_are_bounded(scratch: Path) -> None:
    # A steady stream of callers cannot keep the first one waiting forever.
    conn = sqlite3.connect(scratch / "g.db", isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE t (v INTEGER)")

    def commit(c: sqlite3.Connection) -> None:
        c.execute("COMMIT")

    group = GroupCommit(lambda: conn, commit, max_batch=3)
    holding, go = threading.Event(), threading.Event()

    def write(v: int, hold: bool = False) -> None:
        with group.transaction() as c:
            c.execute("INSERT INTO t VALUES (?)", (v,))
            if hold:
                holding.set()
                go.wait(20)

    threads = [threading.Thread(target=write, args=(0, True))]
    threads[0].start()
    wait_until(holding.is_set, "the first write")
    for v in range(1, 8):
        threads.append(threading.Thread(target=write, args=(v,)))
        threads[-1].start()
    wait_until(lambda: group.queued == 7, "callers to queue")
    go.set()
    for t in threads:
        t.join(30)
    sizes = group.batch_sizes()
    assert max(sizes) <= 3 and sum(k * v for k, v in sizes.items()) == 8
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 8
    with pytest.raises(ValueError):
        GroupCommit(lambda: conn, lambda c: None, max_batch=0)


def test_concurrent_snapshot_calls_leave_rows_and_storage_in_step(scratch: Path) -> None:
    # Batched creates and removes rename storage inside the shared transaction:
    # afterwards every row has its directory and every directory its row.
    from stratasnap import open_snapshotter

    sn = open_snapshotter(scratch / "root", "native")
    try:
        sn.prepare("base-a")
        sn.commit("base", "base-a")
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(8):
                    sn.prepare(f"t{n}-a{i}", "base")
                    sn.commit(f"t{n}-c{i}", f"t{n}-a{i}")
                    if i % 2:
                        sn.remove(f"t{n}-c{i}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        names = {info.name for info in sn.walk()}
        assert names == {"base"} | {f"t{n}-c{i}" for n in range(12) for i in range(0, 8, 2)}
        with sn._store.read() as tx:
            owned = {str(sid) for sid in tx.id_map()}
        on_disk = {p.name for p in (scratch / "root" / "snapshots").iterdir()}
        assert on_disk == owned
        sizes = sn.commit_batch_sizes()
        # 12 x (8 prepares + 8 commits + 4 removes) write calls, plus base and id reservations.
        assert sum(size * n for size, n in sizes.items()) >= 12 * 20 + 2
    finally:
        sn.close()


def test_pre_commit_work_runs_once_per_key_before_the_shared_commit(
    store: MetaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real = store._commit

    def spy(conn: sqlite3.Connection) -> None:
        events.append("COMMIT")
        real(conn)

    monkeypatch.setattr(store, "_commit", spy)

    def with_work(key: str, shared: str) -> Body:
        make = creator(store, key)

        def body(tx: WriteTx) -> None:
            make(tx)
            tx.before_commit(key, lambda: events.append(key))
            tx.before_commit(shared, lambda: events.append(shared))

        return body

    def failing(tx: WriteTx) -> None:
        tx.before_commit("dropped", lambda: events.append("dropped"))
        raise KeyError("this write fails")

    others = {f"w{i}": with_work(f"w{i}", "dir") for i in range(3)}
    others["bad"] = failing
    first = with_work("first", "dir")
    events.clear()  # the ids' reservations committed on their own
    outcome = run_together(store, first, others)
    assert isinstance(outcome.pop("bad"), KeyError)
    assert outcome == {name: True for name in ["first", "w0", "w1", "w2"]}
    # Each operation's own work and the shared one once, all before the one COMMIT;
    # the failed operation's work never runs. (Queued callers take turns in any order.)
    assert events[:2] == ["first", "dir"] and events[-1] == "COMMIT"
    assert sorted(events[2:-1]) == ["w0", "w1", "w2"]


def test_failing_pre_commit_work_fails_the_batch_and_commits_nothing(store: MetaStore) -> None:
    def broken() -> None:
        raise OSError(5, "Input/output error")

    first_create = creator(store, "first")

    def first(tx: WriteTx) -> None:
        first_create(tx)
        tx.before_commit("sync", broken)

    others = {f"w{i}": creator(store, f"w{i}") for i in range(2)}
    outcome = run_together(store, first, others)
    # Every write of the batch hears the typed error, whatever its own call was.
    assert all(isinstance(e, SnapshotError) for e in outcome.values()), outcome
    assert all("Input/output error" in str(e) for e in outcome.values())
    assert committed_keys(store.path) == set()
    after = creator(store, "after")
    with store.write() as tx:  # the writer is usable again
        after(tx)
    assert committed_keys(store.path) == {"after"}
    with pytest.raises(RuntimeError):
        store._group.before_commit("outside", lambda: None)

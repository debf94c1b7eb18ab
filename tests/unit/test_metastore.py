"""The metadata store on its own: rules, ids, schema, concurrency, filter pushdown."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratasnap import filters
from stratasnap.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from stratasnap.metastore import SCHEMA_VERSION, MetaStore
from stratasnap.types import Info, Kind, Usage


@pytest.fixture
def store(scratch: Path) -> Iterator[MetaStore]:
    s = MetaStore(scratch / "metadata.db")
    yield s
    s.close()


def create(
    store: MetaStore,
    key: str,
    parent: str = "",
    kind: Kind = Kind.ACTIVE,
    labels: dict[str, str] | None = None,
) -> int:
    sid = store.reserve_id()
    with store.write() as tx:
        tx.create(sid, kind, key, parent, labels or {})
    return sid


def commit(store: MetaStore, name: str, key: str, labels: dict[str, str] | None = None) -> None:
    with store.write() as tx:
        tx.commit_active(key, name, Usage(10, 2), labels or {})


DURABLE = {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}  # 2: FULL


def _settings(store: MetaStore) -> dict[str, object]:
    # Read through the store's own connection: synchronous and foreign_keys are
    # per connection, so a fresh sqlite3.connect() would not see what the store uses.
    with store.read() as tx:
        return {p: tx._conn.execute(f"PRAGMA {p}").fetchone()[0] for p in DURABLE}


def test_wal_and_full_sync(store: MetaStore) -> None:
    """WAL with synchronous=FULL: a commit that returned survives a power cut;
    foreign keys keep labels from outliving their snapshot."""
    create(store, "a")
    assert _settings(store) == DURABLE
    other: list[dict[str, object]] = []
    worker = threading.Thread(target=lambda: other.append(_settings(store)))
    worker.start()
    worker.join()
    assert other == [DURABLE]  # every thread's connection, not only the first
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # on disk too
    conn.close()


def test_parent_chain_nearest_first(store: MetaStore) -> None:
    ids = []
    parent = ""
    for i in range(10):
        ids.append(create(store, f"a{i}", parent))
        commit(store, f"c{i}", f"a{i}")
        parent = f"c{i}"
    top = create(store, "top", parent)
    with store.read() as tx:
        rec = tx.get("top", with_parents=True)
    assert rec.id == top
    assert rec.parent_ids == tuple(reversed(ids))


@pytest.mark.parametrize("kind", [Kind.ACTIVE, Kind.VIEW])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_create_returns_the_record_as_stored(store: MetaStore, kind: Kind, depth: int) -> None:
    # create() builds its record from what it wrote: it must be what a read gives back.
    parent = ""
    for i in range(depth):
        create(store, f"a{i}", parent)
        commit(store, f"c{i}", f"a{i}")
        parent = f"c{i}"
    sid = store.reserve_id()
    labels = {"b": "2", "a": "1", "gone": ""}  # an empty value is not stored
    with store.write() as tx:
        made = tx.create(sid, kind, "new", parent, labels)
    with store.read() as tx:
        assert made == tx.get("new", with_parents=True)
    assert made.info.labels == {"a": "1", "b": "2"} and len(made.parent_ids) == depth


def test_commit_keeps_id_and_stores_usage(store: MetaStore) -> None:
    sid = create(store, "a", labels={"x": "1"})
    commit(store, "c", "a", {"y": "2"})
    with store.read() as tx:
        rec = tx.get("c")
        assert tx.find("a") is None
    assert rec.id == sid
    assert rec.usage == Usage(10, 2)
    assert dict(rec.info.labels) == {"y": "2"}


def test_ids_never_reused_even_after_reopen(scratch: Path) -> None:
    s = MetaStore(scratch / "m.db")
    first = s.reserve_id()
    s.close()  # a crash loses the unused rest of the reserved batch, never reuses it
    s2 = MetaStore(scratch / "m.db")
    again = s2.reserve_id()
    s2.close()
    assert again > first


def test_ids_unique_across_threads(store: MetaStore) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [store.reserve_id() for _ in range(200)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 1600


def test_schema_version_newer_is_refused(scratch: Path) -> None:
    s = MetaStore(scratch / "m.db")
    s.close()
    conn = sqlite3.connect(scratch / "m.db")
    conn.execute(
        "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    conn.commit()
    conn.close()
    with pytest.raises(Unavailable, match="schema version"):
        MetaStore(scratch / "m.db")


def test_migration_hook_runs(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stratasnap.metastore as ms

    s = MetaStore(scratch / "m.db")
    s.close()
    ran: list[int] = []
    monkeypatch.setattr(ms, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(ms.MIGRATIONS, SCHEMA_VERSION, lambda conn: ran.append(1))
    s = MetaStore(scratch / "m.db")
    s.close()
    assert ran == [1]
    conn = sqlite3.connect(scratch / "m.db")
    (v,) = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    assert int(v) == SCHEMA_VERSION + 1


def test_error_table(store: MetaStore) -> None:
    create(store, "act")
    create(store, "b")
    commit(store, "base", "b")
    create(store, "view", "base", Kind.VIEW)
    sid = store.reserve_id()
    with store.write() as tx:
        with pytest.raises(InvalidArgument):
            tx.create(sid, Kind.COMMITTED, "x", "", {})
        with pytest.raises(NotFound, match="parent"):
            tx.create(sid, Kind.ACTIVE, "x", "missing", {})
        with pytest.raises(InvalidArgument, match="not committed"):
            tx.create(sid, Kind.ACTIVE, "x", "act", {})
        with pytest.raises(AlreadyExists):
            tx.create(sid, Kind.VIEW, "act", "base", {})
        with pytest.raises(AlreadyExists):
            tx.commit_active("missing", "base", Usage(), {})
        with pytest.raises(NotFound):
            tx.commit_active("missing", "new", Usage(), {})
        with pytest.raises(FailedPrecondition, match="not active"):
            tx.commit_active("view", "new", Usage(), {})
        with pytest.raises(FailedPrecondition, match="child"):
            tx.remove("base")
        with pytest.raises(NotFound):
            tx.remove("missing")
        with pytest.raises(FailedPrecondition):
            tx.get_mountable("base")
    assert str(NotFound('snapshot "k"')) == 'snapshot "k": not found'


def test_failed_write_rolls_back(store: MetaStore) -> None:
    sid = store.reserve_id()
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.create(sid, Kind.ACTIVE, "doomed", "", {})
        raise RuntimeError("boom")
    with store.read() as tx:
        assert tx.find("doomed") is None


def test_concurrent_writers_and_readers(store: MetaStore) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(50):
                create(store, f"w{n}-{i}", labels={"n": str(n)})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(50):
                with store.read() as tx:
                    for info in tx.walk(filters.parse("labels.n==1")):
                        # Stat inside a running walk on the same thread: no deadlock.
                        with store.read() as inner:
                            assert inner.get(info.name).info.name == info.name
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with store.read() as tx:
        assert len(tx.walk(filters.parse())) == 300


def test_closed_store_says_so(scratch: Path) -> None:
    s = MetaStore(scratch / "m.db")
    s.close()
    s.close()
    with pytest.raises(Unavailable, match="closed"), s.read():
        pass


FIELDS = ["name", "parent", "kind", "labels.a", 'labels."x.y/z"', "labels.none", "other"]
VALUES = ["", "c1", "k2", "committed", "active", "1", "2", "v"]


def test_sql_pushdown_agrees_with_predicate(store: MetaStore) -> None:
    """Every walk filter gives exactly what the pure-Python predicate gives."""
    create(store, "k1", labels={"a": "1", "x.y/z": "v"})
    commit(store, "c1", "k1", {"a": "1"})
    create(store, "k2", "c1", labels={"a": "2"})
    create(store, "v1", "c1", Kind.VIEW, labels={"x.y/z": "v"})
    create(store, "k3")
    with store.read() as tx:
        everything = tx.walk(filters.parse())
        assert len(everything) == 4
        exprs = [f"{f}" for f in FIELDS]
        exprs += [
            f"{f}{op}{v or chr(34) * 2}" for f in FIELDS for op in ("==", "!=") for v in VALUES
        ]
        exprs += [f"{f}~=/^{v}/" for f in FIELDS for v in ("c", "k", "")]
        for a, b in itertools.product(exprs[::5], exprs[::7]):
            for flt_args in ((f"{a},{b}",), (a, b)):
                flt = filters.parse(*flt_args)
                want = [i.name for i in everything if flt.match(i)]
                got = [i.name for i in tx.walk(flt)]
                assert got == want, flt_args


def test_random_filters_agree_with_predicate(store: MetaStore) -> None:
    """Random ANDs and ORs of every selector shape: the store's sets give the predicate's."""
    import random

    create(store, "k1", labels={"a": "1", "x.y/z": "v"})
    commit(store, "c1", "k1", {"a": "1"})
    create(store, "k2", "c1", labels={"a": "2"})
    create(store, "v1", "c1", Kind.VIEW, labels={"x.y/z": "v", "b": "1"})
    create(store, "k3", labels={"b": ""})
    selectors = [f"{f}" for f in FIELDS]
    selectors += [
        f"{f}{op}{v or chr(34) * 2}" for f in FIELDS for op in ("==", "!=") for v in VALUES
    ]
    selectors += [f"{f}~=/{p}/" for f in FIELDS for p in ("^c", "1|2", "", "^$", "v$", "^(k|c)")]
    rng = random.Random(11)
    with store.read() as tx:
        everything = tx.walk(filters.parse())
        for _ in range(1500):
            strings = [
                ",".join(rng.choice(selectors) for _ in range(rng.randint(1, 3)))
                for _ in range(rng.randint(1, 3))
            ]
            flt = filters.parse(*strings)
            want = [i.name for i in everything if flt.match(i)]
            assert [i.name for i in tx.walk(flt)] == want, strings


def test_largest_filters_walk_in_sql(store: MetaStore) -> None:
    """As many alternatives and selectors as a request may have: no SQLite limit is hit."""
    for i in range(20):
        create(store, f"k{i}", labels={"n": str(i), "odd": "y"} if i % 2 else {"n": str(i)})
    most = filters.MAX_ALTERNATIVES
    shapes = [
        ["kind", *[f"name==k{i}" for i in range(most - 1)]],
        [f"labels.n=={i}" for i in range(most)],
        [f"labels.n!={i},labels.odd" for i in range(most)],
        [",".join(["kind"] * 3000)],  # one AND of 3,000 selectors
        [f"labels.{i}~=^$" for i in range(16)],  # as many regexes as a request may have
    ]
    with store.read() as tx:
        everything = tx.walk(filters.parse())
        for strings in shapes:
            flt = filters.parse(*_fit(strings))
            got = [i.name for i in tx.walk(flt)]
            assert got == [i.name for i in everything if flt.match(i)], strings[:2]
            assert got  # every shape selects something


def _fit(strings: list[str]) -> list[str]:
    """The longest head of ``strings`` within a request's byte bound."""
    total = 0
    for n, text in enumerate(strings):
        total += len(text)
        if total > filters.MAX_FILTER_BYTES:
            return strings[:n]
    return strings


def test_update_info_rules(store: MetaStore) -> None:
    create(store, "u", labels={"a": "1", "b": "2"})
    with store.write() as tx:
        info = tx.update_info(
            Info("u", Kind.ACTIVE, labels={"a": "9", "c": "3"}), ["labels.a", "labels.b"]
        )
    assert dict(info.labels) == {"a": "9"}
    with store.write() as tx, pytest.raises(InvalidArgument, match='cannot update "parent"'):
        tx.update_info(Info("u", Kind.ACTIVE), ["labels", "parent"])


@pytest.mark.parametrize("paths", [[], ["labels"], ["labels.a", "labels.gone"]])
def test_update_info_returns_the_info_as_stored(store: MetaStore, paths: list[str]) -> None:
    create(store, "a0")
    commit(store, "base", "a0")
    create(store, "u", "base", labels={"a": "1", "gone": "x", "kept": "k"})
    with store.write() as tx:
        made = tx.update_info(Info("u", Kind.ACTIVE, labels={"a": "9", "gone": ""}), paths)
    with store.read() as tx:
        stored = tx.get("u").info
    assert made == stored
    assert made.parent == "base" and made.updated > made.created
    assert made.labels == ({"a": "9", "kept": "k"} if paths[1:] else {"a": "9"})


def test_times_keep_nanoseconds(store: MetaStore) -> None:
    import time

    from stratasnap.types import Timestamp

    before = time.time_ns()
    create(store, "t")
    after = time.time_ns()
    with store.read() as tx:
        created = tx.get("t").info.created
    assert isinstance(created, Timestamp)
    assert before <= created.epoch_ns <= after
    assert created.nanosecond // 1000 == created.microsecond
    # Stored in nanoseconds, read back exactly (not rounded to microseconds).
    (stored,) = (
        sqlite3.connect(store.path)
        .execute("SELECT created_ns FROM snapshots WHERE key = 't'")
        .fetchone()
    )
    assert created.epoch_ns == stored


def test_short_lived_processes_waste_no_ids(scratch: Path) -> None:
    # A CLI call opens the store, creates one snapshot and exits.
    got = []
    for i in range(3):
        s = MetaStore(scratch / "m.db")
        got.append(create(s, f"k{i}"))
        s.close()
    assert got == [1, 2, 3]
    # A long-lived process reserves more at a time (fewer durable writes), still unique.
    s = MetaStore(scratch / "m.db")
    more = [create(s, f"m{i}") for i in range(100)]
    s.close()
    assert more == sorted(more) and len(set(more)) == 100 and more[0] == 4

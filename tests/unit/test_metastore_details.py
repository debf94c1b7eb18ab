"""Per-snapshot details: what a backend records about committed storage (schema 2)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from stratasnap.metastore import MetaStore
from stratasnap.types import Kind, Usage


def _commit(store: MetaStore, details: dict[str, str]) -> int:
    sid = store.reserve_id()
    with store.write() as tx:
        tx.create(sid, Kind.ACTIVE, "a", "", {})
        tx.commit_active("a", "c", Usage(1, 1), {}, details=details)
    return sid


def test_details_are_recorded_at_commit_and_go_with_the_snapshot(scratch: Path) -> None:
    store = MetaStore(scratch / "m.db")
    sid = _commit(store, {"image.digest": "sha256:ab", "other": "x"})
    with store.read() as tx:
        assert tx.details(sid) == {"image.digest": "sha256:ab", "other": "x"}
    with store.write() as tx:
        tx.remove("c")
    with store.read() as tx:
        assert tx.details(sid) == {}
    store.close()


def test_a_version_2_store_gains_the_details_table(scratch: Path) -> None:
    MetaStore(scratch / "m.db").close()
    conn = sqlite3.connect(scratch / "m.db")
    conn.execute("DROP TABLE details")
    conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    store = MetaStore(scratch / "m.db")
    sid = _commit(store, {"k": "v"})
    with store.read() as tx:
        assert tx.details(sid) == {"k": "v"}
    store.close()

"""A parsed filter evaluated against the store's tables, as sets of snapshot ids.

Each distinct selector becomes one indexed query (or, for a ``~=`` on a name
or parent, one pass over the keys) that gives the ids it matches, kept as a
set or, for selectors that match nearly everything (``!=``, absent fields),
as the complement of a small set. ANDs and ORs then combine sets. The cost
grows with the selectors and the snapshots they name, not with selectors
times snapshots, which is what one SQL expression per row costs: a request
of 4,096 OR-ed label selectors stays a few thousand index lookups, and no
SQLite expression limit is ever near.

Semantics are :meth:`stratasnap.filters.Filter.match`'s (containerd's): the
store's agreement test compares the two on every shape.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from . import filters as _filters

__all__ = ["Ids", "matching_ids"]

_Op = _filters.Operator


@dataclass(frozen=True)
class Ids:
    """A set of snapshot ids: ``ids`` itself, or (``negated``) every id but ``ids``."""

    ids: frozenset[int]
    negated: bool = False

    def __and__(self, other: Ids) -> Ids:
        a, b = self, other
        if a.negated and b.negated:
            return Ids(a.ids | b.ids, True)
        if a.negated:
            a, b = b, a
        return Ids(a.ids - b.ids if b.negated else a.ids & b.ids)

    def __or__(self, other: Ids) -> Ids:
        a, b = self, other
        if a.negated and b.negated:
            return Ids(a.ids & b.ids, True)
        if a.negated:
            a, b = b, a
        return Ids(b.ids - a.ids, True) if b.negated else Ids(a.ids | b.ids)


NOTHING = Ids(frozenset())
EVERYTHING = Ids(frozenset(), negated=True)


def matching_ids(conn: sqlite3.Connection, flt: _filters.Filter) -> Ids:
    """The ids of the snapshots ``flt`` matches (inside the caller's read transaction)."""
    found = _batched(conn, {sel for selectors in flt.alternatives for sel in selectors})
    scans = _Scans(conn)
    result = NOTHING
    for selectors in flt.alternatives:
        alternative = EVERYTHING
        for sel in selectors:
            ids = found.get(sel)
            if ids is None:
                ids = found[sel] = _selector_ids(conn, scans, sel)
            alternative &= ids
            if not alternative.negated and not alternative.ids:
                break  # nothing left for this alternative to match
        result |= alternative
    return result


def _batched(
    conn: sqlite3.Connection, selectors: set[_filters.Selector]
) -> dict[_filters.Selector, Ids]:
    """The equality and presence selectors' ids, one query per kind of lookup.

    A thousand ``name==`` selectors are one indexed query, not a thousand.
    """
    names: dict[str, set[int]] = {}
    parents: dict[str, set[int]] = {}
    pairs: dict[tuple[str, str], set[int]] = {}
    keys: dict[str, set[int]] = {}
    for sel in selectors:
        head, op, value = sel.fieldpath[0], sel.op, sel.value
        if op not in (_Op.EQUAL, _Op.NOT_EQUAL, _Op.PRESENT):
            continue
        if head == "labels":
            key = ".".join(sel.fieldpath[1:])
            if op is _Op.PRESENT or (op is _Op.NOT_EQUAL and not value):
                keys[key] = set()
            elif value:
                pairs[(key, value)] = set()
        elif op is not _Op.PRESENT and value:
            if head == "name":
                names[value] = set()
            elif head == "parent":
                parents[value] = set()
    _fill(
        conn, names, "SELECT key, id FROM snapshots WHERE key IN (SELECT value FROM json_each(?))"
    )
    _fill(
        conn,
        parents,
        "SELECT p.key, s.id FROM snapshots s JOIN snapshots p ON p.id = s.parent_id"
        " WHERE p.key IN (SELECT value FROM json_each(?))",
    )
    _fill(
        conn,
        keys,
        "SELECT key, snapshot_id FROM labels WHERE key IN (SELECT value FROM json_each(?))",
    )
    if pairs:
        rows = conn.execute(
            "SELECT l.key, l.value, l.snapshot_id FROM json_each(?) j JOIN labels l"
            " ON l.key = json_extract(j.value, '$[0]') AND l.value = json_extract(j.value, '$[1]')",
            (json.dumps(list(pairs)),),
        )
        for key, value, sid in rows:
            pairs[(str(key), str(value))].add(int(sid))
    found: dict[_filters.Selector, Ids] = {}
    for sel in selectors:
        head, op, value = sel.fieldpath[0], sel.op, sel.value
        if op not in (_Op.EQUAL, _Op.NOT_EQUAL, _Op.PRESENT):
            continue
        if head == "labels" and (value or op is not _Op.EQUAL):
            key = ".".join(sel.fieldpath[1:])
            ids = keys[key] if op is _Op.PRESENT or not value else pairs[(key, value)]
            negate = op is _Op.NOT_EQUAL and bool(value)
        elif head in ("name", "parent") and op is not _Op.PRESENT and value:
            ids = (names if head == "name" else parents)[value]
            negate = op is _Op.NOT_EQUAL
        else:
            continue
        found[sel] = Ids(frozenset(ids), negate)
    return found


def _fill(conn: sqlite3.Connection, into: dict[str, set[int]], sql: str) -> None:
    if into:
        for value, sid in conn.execute(sql, (json.dumps(list(into)),)):
            into[str(value)].add(int(sid))


class _Scans:
    """Rows read once per walk for the selectors that must look at every snapshot."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._rows: list[tuple[int, bytes, bytes]] | None = None
        self._labels: dict[str, dict[bytes, list[int]]] = {}

    def labels(self, key: str) -> dict[bytes, list[int]]:
        """Label ``key``'s values (as UTF-8), each with the ids of the snapshots carrying it.

        Grouped by value because label values repeat (containerd's GC and CRI
        labels take a handful of values across thousands of snapshots): a
        pattern is then tested once per distinct value, not once per snapshot.
        """
        found = self._labels.get(key)
        if found is None:
            found = self._labels[key] = {}
            for i, v in self._conn.execute(
                "SELECT snapshot_id, value FROM labels WHERE key = ?", (key,)
            ):
                found.setdefault(str(v).encode(), []).append(int(i))
        return found

    def rows(self) -> list[tuple[int, bytes, bytes]]:
        """(id, key, parent key) of every snapshot, keys as UTF-8 (encoded once for all)."""
        if self._rows is None:
            self._rows = [
                (int(i), str(k).encode(), str(p).encode())
                for i, k, p in self._conn.execute(
                    "SELECT s.id, s.key, COALESCE(p.key, '') FROM snapshots s "
                    "LEFT JOIN snapshots p ON p.id = s.parent_id"
                )
            ]
        return self._rows


def _selector_ids(conn: sqlite3.Connection, scans: _Scans, sel: _filters.Selector) -> Ids:
    head = sel.fieldpath[0]
    if head == "labels":
        return _label_ids(conn, scans, ".".join(sel.fieldpath[1:]), sel)
    if head not in ("name", "parent", "kind"):
        return _absent(sel)
    if sel.op is _Op.PRESENT:
        return EVERYTHING  # name, kind and parent (even "") are always present
    if sel.op is _Op.MATCHES:
        regex = _filters.compile_pattern(sel.value)
        if head == "kind":
            kinds = [k for (k,) in conn.execute("SELECT DISTINCT kind FROM snapshots")]
            return _query(conn, "kind", [k for k in kinds if regex.search(k)])
        test = regex.search_bytes
        if head == "name":
            return Ids(frozenset(i for i, key, _ in scans.rows() if test(key)))
        return Ids(frozenset(i for i, _, parent in scans.rows() if test(parent)))
    equal = _equal_ids(conn, head, sel.value)
    return equal if sel.op is _Op.EQUAL else Ids(equal.ids, True)


def _equal_ids(conn: sqlite3.Connection, head: str, value: str) -> Ids:
    if head == "name":
        return _ids(conn, "SELECT id FROM snapshots WHERE key = ?", value)
    if head == "kind":
        return _ids(conn, "SELECT id FROM snapshots WHERE kind = ?", value)
    if not value:
        return _ids(conn, "SELECT id FROM snapshots WHERE parent_id IS NULL")
    return _ids(
        conn,
        "SELECT s.id FROM snapshots s JOIN snapshots p ON p.id = s.parent_id WHERE p.key = ?",
        value,
    )


def _query(conn: sqlite3.Connection, column: str, values: list[str]) -> Ids:
    out: set[int] = set()
    for value in values:
        out |= _ids(conn, f"SELECT id FROM snapshots WHERE {column} = ?", value).ids
    return Ids(frozenset(out))


def _label_ids(conn: sqlite3.Connection, scans: _Scans, key: str, sel: _filters.Selector) -> Ids:
    """Stored labels are never "": an absent label (compared as "") differs from all."""
    op, value = sel.op, sel.value
    if op is _Op.PRESENT or (op is _Op.NOT_EQUAL and not value):
        return _ids(conn, "SELECT snapshot_id FROM labels WHERE key = ?", key)
    if op in (_Op.EQUAL, _Op.NOT_EQUAL):
        ids = _ids(conn, "SELECT snapshot_id FROM labels WHERE key = ? AND value = ?", key, value)
        return ids if op is _Op.EQUAL else Ids(ids.ids, True)
    test = _filters.compile_pattern(value).search_bytes
    values = scans.labels(key)
    # Absent labels are compared as "": if "" matches, the answer is everything
    # but the carriers of values that do not match.
    negate = test(b"")
    return Ids(frozenset(i for v, ids in values.items() if test(v) != negate for i in ids), negate)


def _absent(sel: _filters.Selector) -> Ids:
    """A field no snapshot has: compared as "" by != and ~=, never present or equal."""
    if sel.op is _Op.NOT_EQUAL:
        return EVERYTHING if sel.value else NOTHING
    if sel.op is _Op.MATCHES:
        return EVERYTHING if _filters.compile_pattern(sel.value).search("") else NOTHING
    return NOTHING


def _ids(conn: sqlite3.Connection, sql: str, *args: str) -> Ids:
    return Ids(frozenset(int(r[0]) for r in conn.execute(sql, args)))

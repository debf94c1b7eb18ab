"""Metadata store throughput, next to the fsync floor of an empty SQLite write.

Run: ``.venv/bin/python benchmarks/metastore.py`` (as root it uses a fresh ext4
loop filesystem). Prints ops/s for create+commit, stat, get-active with a
10-deep parent chain, remove, and walk over 10,000 snapshots (all, and with a
label filter pushed into SQL), each with the ratio to an empty write
transaction measured in the same run. Figures, never pass/fail.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import scratch_fs

from stratasnap import filters
from stratasnap.metastore import MetaStore
from stratasnap.types import Kind, Usage


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f}/s"


def main() -> None:
    with scratch_fs("ext4", "2G") as (mnt, desc):
        print(f"# metastore benchmark on {desc}")
        # The floor: an empty BEGIN IMMEDIATE/COMMIT with the same pragmas.
        floor_db = sqlite3.connect(mnt / "floor.db", isolation_level=None)
        floor_db.execute("PRAGMA journal_mode=WAL")
        floor_db.execute("PRAGMA synchronous=FULL")
        floor_db.execute("CREATE TABLE t (x)")
        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            floor_db.execute("BEGIN IMMEDIATE")
            floor_db.execute("INSERT INTO t VALUES (?)", (i,))
            floor_db.execute("COMMIT")
        floor = (time.perf_counter() - t0) / n
        print(f"fsync floor (one-row write transaction): {1 / floor:,.0f}/s ({floor * 1e6:.0f} µs)")

        store = MetaStore(mnt / "metadata.db")
        # create + commit pairs
        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            sid = store.reserve_id()
            with store.write() as tx:
                tx.create(
                    sid, Kind.ACTIVE, f"extract-{i}", "", {"containerd.io/snapshot.ref": f"r{i}"}
                )
            with store.write() as tx:
                tx.commit_active(f"extract-{i}", f"layer-{i}", Usage(4096, 1), {"n": str(i % 10)})
        dt = time.perf_counter() - t0
        print(f"create+commit pairs:      {rate(n, dt)}  ({dt / n / floor:.1f}x floor per pair)")

        # a 10-deep chain for get-active
        parent = ""
        for i in range(10):
            sid = store.reserve_id()
            with store.write() as tx:
                tx.create(sid, Kind.ACTIVE, f"chain-a{i}", parent, {})
                tx.commit_active(f"chain-a{i}", f"chain-{i}", Usage(), {})
            parent = f"chain-{i}"
        sid = store.reserve_id()
        with store.write() as tx:
            tx.create(sid, Kind.ACTIVE, "chain-top", parent, {})

        n = 20000
        t0 = time.perf_counter()
        for i in range(n):
            with store.read() as tx:
                tx.get(f"layer-{i % 2000}")
        dt = time.perf_counter() - t0
        print(f"stat:                     {rate(n, dt)}  ({floor / (dt / n):.1f} per floor)")

        n = 10000
        t0 = time.perf_counter()
        for _ in range(n):
            with store.read() as tx:
                rec = tx.get_mountable("chain-top")
        assert len(rec.parent_ids) == 10
        dt = time.perf_counter() - t0
        print(f"get-active, 10 parents:   {rate(n, dt)}")

        # fill to 10,000 snapshots for walks
        for i in range(2000, 10000):
            sid = store.reserve_id()
            with store.write() as tx:
                tx.create(sid, Kind.ACTIVE, f"bulk-{i}", "", {"n": str(i % 10)})
        every = filters.parse()
        flt = filters.parse("labels.n==3")
        for label, f in (("walk all 10k", every), ("walk 10k, labels.n==3", flt)):
            best = 1e9
            for _ in range(5):
                t0 = time.perf_counter()
                with store.read() as tx:
                    got = tx.walk(f)
                best = min(best, time.perf_counter() - t0)
            print(f"{label + ':':<26}{best * 1000:>9.1f} ms  ({len(got)} results)")

        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            with store.write() as tx:
                tx.remove(f"bulk-{i + 2000}")
        dt = time.perf_counter() - t0
        print(f"remove:                   {rate(n, dt)}  ({dt / n / floor:.1f}x floor)")
        store.close()


if __name__ == "__main__":
    main()

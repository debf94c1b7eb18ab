"""Metadata store throughput, next to the fsync floor of a one-row SQLite write.

Run: ``.venv/bin/python benchmarks/metastore.py [--fs ext4] [--rounds 5] [--batch 500]``
(as root it uses a fresh loop filesystem of that type). Prints ops/s for
create+commit pairs, stat, get-active with a 10-deep parent chain, remove,
and walk over 10,000 snapshots (all, and with a label filter pushed into SQL).

The floor is a one-row write transaction with the store's pragmas (WAL,
synchronous=FULL) on a database of its own. A fresh database writes about
2x slower for its first few thousand transactions (the WAL and the file
grow), so both the floor and the store are warmed up first (``--warmup``
writes each, not counted), and then the floor and the create+commit pairs
are measured in alternating batches (``--rounds`` of ``--batch``): the ratio
per pair is the median pair time over the median floor time of the same
run. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
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


def floor_batch(db: sqlite3.Connection, n: int, start: int) -> float:
    """Seconds per one-row write transaction, over ``n`` of them."""
    t0 = time.perf_counter()
    for i in range(start, start + n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?)", (i,))
        db.execute("COMMIT")
    return (time.perf_counter() - t0) / n


def pairs_batch(store: MetaStore, n: int, start: int) -> float:
    """Seconds per create + commit pair (two write transactions), over ``n`` of them."""
    t0 = time.perf_counter()
    for i in range(start, start + n):
        sid = store.reserve_id()
        with store.write() as tx:
            tx.create(sid, Kind.ACTIVE, f"extract-{i}", "", {"containerd.io/snapshot.ref": f"r{i}"})
        with store.write() as tx:
            tx.commit_active(f"extract-{i}", f"layer-{i}", Usage(4096, 1), {"n": str(i % 10)})
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fs", default="ext4", help="scratch filesystem (ext4, xfs, tmpfs…)")
    ap.add_argument("--warmup", type=int, default=3000, help="uncounted writes on each database")
    ap.add_argument("--rounds", type=int, default=5, help="alternated floor/pairs batches")
    ap.add_argument("--batch", type=int, default=500, help="writes (or pairs) per batch")
    args = ap.parse_args()
    with scratch_fs(args.fs, "2G") as (mnt, desc):
        print(f"# metastore benchmark on {desc}")
        # The floor: a one-row BEGIN IMMEDIATE/COMMIT with the same pragmas.
        floor_db = sqlite3.connect(mnt / "floor.db", isolation_level=None)
        floor_db.execute("PRAGMA journal_mode=WAL")
        floor_db.execute("PRAGMA synchronous=FULL")
        floor_db.execute("CREATE TABLE t (x)")
        store = MetaStore(mnt / "metadata.db")
        cold = floor_batch(floor_db, args.warmup, 0)
        pairs_batch(store, args.warmup // 2, 0)  # two writes each: as many as the floor's
        floors: list[float] = []
        pairs: list[float] = []
        written = args.warmup
        for r in range(args.rounds):
            # Alternate which side goes first, so neither always follows the other.
            for side in ("floor", "pairs") if r % 2 == 0 else ("pairs", "floor"):
                if side == "floor":
                    floors.append(floor_batch(floor_db, args.batch, written))
                else:
                    pairs.append(pairs_batch(store, args.batch, written))
            written += args.batch
        floor, pair = statistics.median(floors), statistics.median(pairs)
        print(
            f"fsync floor (one-row write transaction, warm): {1 / floor:,.0f}/s"
            f" ({floor * 1e6:.0f} µs; the first {args.warmup:,} on a fresh database:"
            f" {1 / cold:,.0f}/s)"
        )
        print(
            f"create+commit pairs:      {1 / pair:>10,.0f}/s  ({pair / floor:.1f}x floor per pair;"
            f" medians of {args.rounds} alternated batches of {args.batch})"
        )
        layers = [f"layer-{i}" for i in range(args.warmup // 2)]
        layers += [f"layer-{i}" for i in range(args.warmup, written)]

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
                tx.get(layers[i % len(layers)])
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

        # fill to 10,000 snapshots for walks (at least 2,000 of them to remove later)
        bulk = max(10_000 - len(layers) - 11, 2000)
        for i in range(bulk):
            sid = store.reserve_id()
            with store.write() as tx:
                tx.create(sid, Kind.ACTIVE, f"bulk-{i}", "", {"n": str(i % 10)})
        every = filters.parse()
        flt = filters.parse("labels.n==3")
        for label, f in (("walk all", every), ("walk, labels.n==3", flt)):
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
                tx.remove(f"bulk-{i}")
        dt = time.perf_counter() - t0
        print(f"remove:                   {rate(n, dt)}  ({dt / n / floor:.1f}x floor)")
        store.close()


if __name__ == "__main__":
    main()

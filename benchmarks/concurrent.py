"""Concurrent mixed load in-process: group commit on against off, same store, alternated.

Run: ``.venv/bin/python benchmarks/concurrent.py [--backend overlay] [--clients 64]``
as root (the store goes on a fresh ext4 loop filesystem; ``--fs`` picks
another type). ``--clients`` threads share one snapshotter; each repeats a
cycle of prepare (on a shared committed parent), stat, commit, stat, list
(its own snapshots, by label filter) and remove, for ``--seconds``. Rounds
alternate between group commit on (the default: concurrent write calls share
one metadata commit and its fsync) and off (every write commits alone, as
before group commit), and between which goes first; a round with one client
shows that a lone caller pays nothing for it. Prints ops/s per round, the
medians and their ratio (on / off), and how many write calls each commit
carried.

The machine this runs on may be shared: compare ratios from one run, not
figures from different runs. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import scratch_fs

from stratasnap import open_snapshotter
from stratasnap.group_commit import MAX_BATCH
from stratasnap.snapshotter import BaseSnapshotter

OPS_PER_CYCLE = 6  # prepare, stat, commit, stat, list, remove


def round_ops(sn: BaseSnapshotter, clients: int, seconds: float, tag: str) -> float:
    """Calls per second from ``clients`` threads running mixed cycles for ``seconds``."""
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def work(n: int) -> None:
        own = f'labels."client"=={tag}-{n}'
        labels = {"client": f"{tag}-{n}"}
        start.wait()
        i = 0
        try:
            while not stop.is_set():
                key, name = f"{tag}-{n}-a{i}", f"{tag}-{n}-c{i}"
                sn.prepare(key, "base", labels)
                sn.stat(key)
                sn.commit(name, key, labels)
                sn.stat(name)
                list(sn.walk(own))
                sn.remove(name)
                counts[n] += OPS_PER_CYCLE
                i += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", default="overlay", help="overlay (default) or native")
    ap.add_argument("--fs", default="ext4", help="scratch filesystem type (default ext4)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent threads (default 64)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per round (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="per setting (default 3)")
    args = ap.parse_args()

    with scratch_fs(args.fs, "4G") as (mnt, desc):
        print(f"# {args.backend} on {desc}; {args.clients} clients, {args.seconds:g} s rounds")
        print("# the machine may be shared: read the ratios, alternated in one run")
        sn = open_snapshotter(mnt / "root", args.backend)
        sn.prepare("base-a")
        sn.commit("base", "base-a")
        group = sn._store._group  # the benchmark's switch; not an option users need
        results: dict[tuple[int, str], list[float]] = {}
        batches: Counter[int] = Counter()
        n = 0
        for r in range(args.rounds):
            order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
            for clients in (args.clients, 1):
                for setting in order:
                    group.max_batch = MAX_BATCH if setting == "on" else 1
                    before = Counter(sn.commit_batch_sizes())
                    seconds = args.seconds if clients > 1 else args.seconds / 2
                    rate = round_ops(sn, clients, seconds, f"r{n}")
                    n += 1
                    if setting == "on" and clients > 1:
                        batches += Counter(sn.commit_batch_sizes()) - before
                    results.setdefault((clients, setting), []).append(rate)
                    print(f"round {r + 1}: {clients:>3} clients, group commit {setting:>3}: "
                          f"{rate:8,.0f} ops/s")
        sn.close()
    print()
    print(f"{'clients':>8} {'on ops/s':>10} {'off ops/s':>10} {'on/off':>7}")
    for clients in (args.clients, 1):
        on = statistics.median(results[(clients, "on")])
        off = statistics.median(results[(clients, "off")])
        print(f"{clients:>8} {on:10,.0f} {off:10,.0f} {on / off:6.2f}x")
    commits = sum(batches.values())
    calls = sum(size * k for size, k in batches.items())
    print()
    print(f"with {args.clients} clients, group commit on: {calls:,} write calls in "
          f"{commits:,} commits ({calls / max(commits, 1):.1f} per commit)")
    print("  batch size: " + ", ".join(f"{s}: {batches[s]}" for s in sorted(batches)))


if __name__ == "__main__":
    main()

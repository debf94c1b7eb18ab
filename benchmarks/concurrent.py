"""Concurrent mixed load: group commit on against off (in-process), or two servers (socket).

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

``--socket REF`` measures through the unix socket instead: this checkout's
server (``python -m stratasnap.server serve``) against REF, each on its own root
on the same scratch filesystem, rounds alternated. REF is another checkout's
``src`` directory (e.g. ``git archive <rev> src | tar -x -C /tmp/ref``, a commit
before group commit: the same command run from there), or ``containerd``:
containerd's own overlay snapshotter served by ``goproxy/`` (Go, containerd's
snapshotservice, built like goclient). Without ``--go`` every client thread has its own
:class:`~stratasnap.server.client.Client` (Python: about 170 µs of client CPU
per call, so on a small machine the clients share the CPU with the server).
With ``--go`` the clients are goroutines of ``goclient/`` (containerd's generated
Go client, mode ``mixed-concurrent``, all on one connection as containerd's proxy
plugin calls), built offline as ``goclient/main.go`` says (needs ``golang-go`` and
``golang-github-containerd-containerd-dev``).

The machine this runs on may be shared: compare ratios from one run, not
figures from different runs. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# benchmarks/grpc.py would shadow the grpc package: import the real one first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402, F401

sys.path.insert(0, str(HERE))

from _scratch import scratch_fs  # noqa: E402
from _server import Server, built  # noqa: E402

from stratasnap import open_snapshotter  # noqa: E402
from stratasnap.group_commit import MAX_BATCH  # noqa: E402
from stratasnap.server.client import Client  # noqa: E402
from stratasnap.snapshotter import Snapshotter  # noqa: E402

OPS_PER_CYCLE = 6  # prepare, stat, commit, stat, list, remove


def round_ops(
    connect: Callable[[], Snapshotter], clients: int, seconds: float, tag: str, own: bool = False
) -> float:
    """Calls per second from ``clients`` threads running mixed cycles for ``seconds``.

    Each thread calls through its own ``connect()`` (closed at the end when ``own``).
    """
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def work(n: int) -> None:
        mine = f'labels."client"=={tag}-{n}'
        labels = {"client": f"{tag}-{n}"}
        sn = connect()
        start.wait()
        i = 0
        try:
            while not stop.is_set():
                key, name = f"{tag}-{n}-a{i}", f"{tag}-{n}-c{i}"
                sn.prepare(key, "base", labels)
                sn.stat(key)
                sn.commit(name, key, labels)
                sn.stat(name)
                list(sn.walk(mine))
                sn.remove(name)
                counts[n] += OPS_PER_CYCLE
                i += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            if own:
                sn.close()

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


def go_round(binary: Path, address: Path, clients: int, seconds: float, tag: str) -> float:
    argv = [str(binary), "-address", f"unix://{address}", "-mode", "mixed-concurrent"]
    argv += ["-c", str(clients), "-conns", "1", "-seconds", str(seconds)]
    argv += ["-prefix", tag, "-key", "base"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"goclient failed: {done.stderr.strip()}")
    return float(json.loads(done.stdout)["ops_per_s"])


def socket_main(args: argparse.Namespace) -> None:
    here = Path(__file__).resolve().parents[1] / "src"
    with scratch_fs(args.fs, "4G") as (mnt, desc):
        containerd = args.socket == "containerd"
        ref = (
            built("goproxy", mnt, "benchmarks/concurrent.py")
            if containerd
            else Path(args.socket).resolve()
        )
        sides = {"this": here, "ref": ref}
        kind = "Go (one connection)" if args.go else "Python"
        print(f"# {args.backend} through the socket on {desc}; {args.clients} {kind} clients")
        print(f"# this = {here}, ref = {sides['ref']}; the machine may be shared: read ratios")
        servers = {
            name: Server(src, args.backend, mnt / f"root-{name}", mnt / f"{name}.log")
            for name, src in sides.items()
        }
        try:
            for server in servers.values():
                with Client(server.address) as c:
                    c.prepare("base-a")
                    c.commit("base", "base-a")
            results: dict[str, list[float]] = {name: [] for name in servers}
            binary = built("goclient", mnt, "benchmarks/concurrent.py") if args.go else None
            for r in range(args.rounds):
                order = ["this", "ref"] if r % 2 == 0 else ["ref", "this"]
                for name in order:
                    address = servers[name].address
                    if binary is not None:
                        rate = go_round(binary, address, args.clients, args.seconds, f"r{r}")
                    else:
                        rate = round_ops(
                            lambda a=address: Client(a), args.clients, args.seconds, f"r{r}", True
                        )
                    results[name].append(rate)
                    print(f"round {r + 1}: {name:>4}: {rate:8,.0f} ops/s")
        finally:
            for server in servers.values():
                server.stop()
    this, ref = (statistics.median(results[n]) for n in ("this", "ref"))
    print(f"\nmedians: this {this:,.0f} ops/s, ref {ref:,.0f} ops/s: {this / ref:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", default="overlay", help="overlay (default) or native")
    ap.add_argument("--fs", default="ext4", help="scratch filesystem type (default ext4)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent threads (default 64)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per round (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="per setting (default 3)")
    ap.add_argument(
        "--socket", metavar="REF", help="through the socket, against a src dir or 'containerd'"
    )
    ap.add_argument("--go", action="store_true", help="--socket with Go clients (goclient/)")
    args = ap.parse_args()
    if args.go and not args.socket:
        ap.error("--go needs --socket")
    if args.socket:
        socket_main(args)
        return

    with scratch_fs(args.fs, "4G") as (mnt, desc):
        print(f"# {args.backend} on {desc}; {args.clients} clients, {args.seconds:g} s rounds")
        print("# the machine may be shared: read the ratios, alternated in one run")
        sn = open_snapshotter(mnt / "root", args.backend)
        sn.prepare("base-a")
        sn.commit("base", "base-a")
        results: dict[tuple[int, str], list[float]] = {}
        batches: Counter[int] = Counter()
        n = 0
        for r in range(args.rounds):
            order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
            for clients in (args.clients, 1):
                for setting in order:
                    # What the server's [group_commit] enabled = true/false sets.
                    sn.set_max_batch(MAX_BATCH if setting == "on" else 1)
                    before = Counter(sn.commit_batch_sizes())
                    seconds = args.seconds if clients > 1 else args.seconds / 2
                    rate = round_ops(lambda: sn, clients, seconds, f"r{n}")
                    n += 1
                    if setting == "on" and clients > 1:
                        batches += Counter(sn.commit_batch_sizes()) - before
                    results.setdefault((clients, setting), []).append(rate)
                    print(
                        f"round {r + 1}: {clients:>3} clients, group commit {setting:>3}: "
                        f"{rate:8,.0f} ops/s"
                    )
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
    print(
        f"with {args.clients} clients, group commit on: {calls:,} write calls in "
        f"{commits:,} commits ({calls / max(commits, 1):.1f} per commit)"
    )
    print("  batch size: " + ", ".join(f"{s}: {batches[s]}" for s in sorted(batches)))


if __name__ == "__main__":
    main()

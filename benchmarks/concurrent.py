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
server (``python -m stratasnap.server serve``) against REF, rounds alternated
(which side goes first, too), and every round of every side on a server of
its own on a fresh loop filesystem of its own. REF is another checkout's
``src`` directory (e.g. ``git archive <rev> src | tar -x -C /tmp/ref``, a commit
before group commit: the same command run from there), or ``containerd``:
containerd's own overlay snapshotter served by ``goproxy/`` (Go, containerd's
snapshotservice, built like goclient). Its Remove deletes at once: containerd
1.6's plugin renames and leaves the deletion to its garbage collector's
Cleanup, which nothing here calls, while stratasnap's reaper deletes in the
same process during the round, so deleting at once counts the same work on
both sides. Without ``--go`` every client thread has its own
:class:`~stratasnap.server.client.Client` (Python: about 170 µs of client CPU
per call, so on a small machine the clients share the CPU with the server).
With ``--go`` the clients are goroutines of ``goclient/`` (containerd's generated
Go client, mode ``mixed-concurrent``, all on one connection as containerd's proxy
plugin calls), built offline as ``goclient/main.go`` says (needs ``golang-go`` and
``golang-github-containerd-containerd-dev``). Next to ops/s it prints the
server process's CPU time per call (user + system of all its threads, from
``/proc``), which the neighbours' load moves much less than wall time, the
load average, and for this side the write calls per metadata commit (group
commit, from its metrics). The ratio is the median of per-round ratios.

The loop images live under ``$TMPDIR``: on a disk other processes keep busy
every flush waits for them; ``TMPDIR=/dev/shm`` keeps the images in memory,
where flushes cost nothing and what is left is the code's own work.

The machine this runs on may be shared: compare ratios from one run, not
figures from different runs. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# benchmarks/grpc.py would shadow the grpc package: import the real one first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402, F401

sys.path.insert(0, str(HERE))

from _cpu import CpuMeter, load, paired_ratio  # noqa: E402
from _scratch import scratch_fs  # noqa: E402
from _server import Server, built  # noqa: E402

from stratasnap import open_snapshotter  # noqa: E402
from stratasnap.group_commit import MAX_BATCH  # noqa: E402
from stratasnap.server.client import Client  # noqa: E402
from stratasnap.snapshotter import Snapshotter  # noqa: E402

OPS_PER_CYCLE = 6  # prepare, stat, commit, stat, list, remove


def round_ops(
    connect: Callable[[], Snapshotter], clients: int, seconds: float, tag: str, own: bool = False
) -> tuple[int, float]:
    """(calls, seconds) of ``clients`` threads running mixed cycles for about ``seconds``.

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
    return sum(counts), elapsed


@dataclass(frozen=True)
class SocketRound:
    """One side's round through the socket: rate, the server's CPU per call, the load."""

    ops: int
    seconds: float
    server_cpu: float  # CPU seconds of the server process (all threads) over the round
    load: float  # one-minute load average at the end of the round
    per_commit: float | None  # write calls per metadata commit (this side: its metrics)

    @property
    def per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1e3 * self.server_cpu / max(self.ops, 1)


def go_round(
    binary: Path, address: Path, clients: int, seconds: float, tag: str
) -> tuple[int, float]:
    """(calls, seconds) of goclient's mixed cycles on ``address``."""
    argv = [str(binary), "-address", f"unix://{address}", "-mode", "mixed-concurrent"]
    argv += ["-c", str(clients), "-conns", "1", "-seconds", str(seconds)]
    argv += ["-prefix", tag, "-key", "base"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"goclient failed: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    ops = int(out["ops"])
    return ops, ops / float(out["ops_per_s"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def calls_per_commit(port: int) -> float | None:
    """Mean write calls per metadata commit, from the server's batch-size histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    calls = commits = 0.0
    for line in text.splitlines():
        if line.startswith("stratasnap_commit_batch_size_sum"):
            calls += float(line.split()[-1])
        elif line.startswith("stratasnap_commit_batch_size_count"):
            commits += float(line.split()[-1])
    return calls / commits if commits else None


def socket_round(
    args: argparse.Namespace, src: Path, go: Path | None, tag: str, metrics: bool
) -> SocketRound:
    """One round of one side: its own server on its own fresh scratch filesystem.

    A fresh filesystem per round keeps one side's leftovers (a grown database,
    its journal's writeback) out of the other's figures, and out of its own
    next round's.
    """
    with scratch_fs(args.fs, "4G") as (mnt, _desc):
        port = free_port() if metrics else None
        extra = ["--metrics-address", f"127.0.0.1:{port}"] if port is not None else []
        if args.config is not None and metrics:
            extra += ["--config", str(args.config.resolve())]
        server = Server(src, args.backend, mnt / "root", mnt / "server.log", extra)
        try:
            with Client(server.address) as c:
                c.prepare("base-a")
                c.commit("base", "base-a")
            meter = CpuMeter.start({"server": server.proc.pid})
            if go is not None:
                ops, seconds = go_round(go, server.address, args.clients, args.seconds, tag)
            else:
                ops, seconds = round_ops(
                    lambda a=server.address: Client(a), args.clients, args.seconds, tag, True
                )
            cpu = meter.stop()["server"]
            per_commit = calls_per_commit(port) if port is not None else None
        finally:
            server.stop()
    return SocketRound(ops, seconds, cpu, load(), per_commit)


def socket_main(args: argparse.Namespace) -> None:
    here = Path(__file__).resolve().parents[1] / "src"
    containerd = args.socket == "containerd"
    # The Go programs are built once, on tmpfs, outside the measured filesystems.
    with scratch_fs("tmpfs", "1G") as (tools, _):
        ref = (
            built("goproxy", tools, "benchmarks/concurrent.py")
            if containerd
            else Path(args.socket).resolve()
        )
        go = built("goclient", tools, "benchmarks/concurrent.py") if args.go else None
        sides = {"this": here, "ref": ref}
        kind = "Go (one connection)" if args.go else "Python"
        print(
            f"# {args.backend} through the socket, {args.clients} {kind} clients, "
            f"{args.seconds:g} s rounds; each side's round on its own fresh {args.fs} loop "
            f"filesystem and server; {os.cpu_count()} CPUs, load {load():.2f}"
        )
        print(f"# this = {here}, ref = {sides['ref']}; the machine may be shared: read ratios")
        print("# cpu = the server process's user+sys per call (all threads)")
        results: dict[str, list[SocketRound]] = {name: [] for name in sides}
        for r in range(args.rounds):
            order = ["this", "ref"] if r % 2 == 0 else ["ref", "this"]
            for name in order:
                res = socket_round(args, sides[name], go, f"r{r}", metrics=name == "this")
                results[name].append(res)
                batch = f", {res.per_commit:4.1f} calls/commit" if res.per_commit else ""
                print(
                    f"round {r + 1}: {name:>4}: {res.per_s:8,.0f} ops/s, cpu "
                    f"{res.cpu_ms:5.2f} ms/op, load {res.load:4.1f}{batch}",
                    flush=True,
                )
    this, ref = results["this"], results["ref"]
    print(f"\n{'':>6}{'ops/s':>10}{'cpu ms/op':>11}   (medians over {args.rounds} rounds)")
    for name, rs in results.items():
        rate = statistics.median(x.per_s for x in rs)
        cpu = statistics.median(x.cpu_ms for x in rs)
        print(f"{name:>6}{rate:10,.0f}{cpu:11.2f}")
    ratio = paired_ratio([x.per_s for x in this], [x.per_s for x in ref])
    cpu_ratio = paired_ratio([x.cpu_ms for x in this], [x.cpu_ms for x in ref])
    print(
        f"this/ref ops/s {ratio:.2f}x (median of per-round ratios; target >= 1.5x), "
        f"server cpu/op {cpu_ratio:.2f}x; load {min(x.load for x in this + ref):.1f}-"
        f"{max(x.load for x in this + ref):.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", default="overlay", help="overlay (default) or native")
    ap.add_argument("--fs", default="ext4", help="scratch filesystem type (default ext4)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent threads (default 64)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per round (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="per setting (default 5)")
    ap.add_argument(
        "--socket", metavar="REF", help="through the socket, against a src dir or 'containerd'"
    )
    ap.add_argument("--go", action="store_true", help="--socket with Go clients (goclient/)")
    ap.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="--socket: a server config file for this checkout's side (e.g. [group_commit])",
    )
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
                    ops, took = round_ops(lambda: sn, clients, seconds, f"r{n}")
                    rate = ops / took
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

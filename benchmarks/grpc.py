"""The server's cost: snapshot calls over the unix socket next to the same calls in-process.

Run: ``.venv/bin/python benchmarks/grpc.py`` (as root both stores go on one
fresh ext4 loop filesystem). One store is opened in this process; the other
is served by ``python -m stratasnap.server serve`` (native backend, a
subprocess, log level warning) and driven with :class:`stratasnap.server.client.Client`.
Both start with the same 10,000 snapshots. Rounds alternate between the two
(and which goes first), and the tables give medians over the rounds:

- prepare+commit pairs, stat and remove round trips per second, and the ratio
  (socket / in-process); the server's overhead per prepare+commit pair in ms;
- Stat latency p50/p99, one call at a time, and the server's CPU per Stat;
- Stat/s from 32 concurrent clients (threads, each with its own channel);
- List (Walk) of 10,000 snapshots.

Figures, never pass/fail; the targets of issue 3 are printed next to them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# This file is named grpc.py: keep its directory off sys.path while the real
# grpc package is imported, or "import grpc" would import this script.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402  (the real one, cached for everything below)

sys.path.insert(0, str(HERE))

import argparse  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

from _scratch import scratch_fs  # noqa: E402

from stratasnap.backends import open_snapshotter  # noqa: E402
from stratasnap.server.client import Client  # noqa: E402
from stratasnap.snapshotter import Snapshotter  # noqa: E402

REF = "containerd.io/snapshot.ref"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def populate(sn: Snapshotter, n: int) -> None:
    """``n`` snapshots like a node's: committed layer chains (4 deep) and active ones."""
    parent = ""
    for i in range(n):
        if i % 5 == 4:
            sn.prepare(f"bulk/active-{i}", parent, {"containerd.io/snapshot/ctr": str(i)})
            parent = ""
            continue
        sn.prepare(f"bulk/extract-{i}", parent, {REF: f"sha256:{i:064x}"})
        name = f"bulk/sha256:{i:064x}"
        sn.commit(name, f"bulk/extract-{i}", {REF: f"sha256:{i:064x}"})
        parent = name


def cpu_seconds(pid: int) -> float:
    """utime+stime of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Server:
    """``python -m stratasnap.server serve`` on ``root``, as a subprocess."""

    def __init__(self, root: Path, address: Path, log: Path) -> None:
        self.address = address
        argv = [sys.executable, "-m", "stratasnap.server", "serve", "--root", str(root)]
        argv += ["--address", str(address), "--log-level", "warning"]
        self.log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, cwd="/", start_new_session=True
        )
        deadline = time.monotonic() + 30
        while not address.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the measured phases -----------------------------------------------------------------


class Round:
    """One round's figures for one side (seconds)."""

    def __init__(self) -> None:
        self.pair = self.prepare = self.commit = self.stat = self.remove = 0.0
        self.latencies: list[float] = []


def one_round(sn: Snapshotter, tag: str, pairs: int, stats: int) -> Round:
    r = Round()
    t_prep = t_commit = 0.0
    for i in range(pairs):
        t0 = time.perf_counter()
        sn.prepare(f"{tag}/extract-{i}", "", {REF: f"{tag}-{i}"})
        t1 = time.perf_counter()
        sn.commit(f"{tag}/layer-{i}", f"{tag}/extract-{i}", {REF: f"{tag}-{i}"})
        t2 = time.perf_counter()
        t_prep += t1 - t0
        t_commit += t2 - t1
    r.prepare, r.commit = t_prep / pairs, t_commit / pairs
    r.pair = r.prepare + r.commit
    lat = r.latencies
    for i in range(stats):
        key = f"{tag}/layer-{i % pairs}"
        t0 = time.perf_counter()
        sn.stat(key)
        lat.append(time.perf_counter() - t0)
    r.stat = statistics.fmean(lat)
    t0 = time.perf_counter()
    for i in range(pairs):
        sn.remove(f"{tag}/layer-{i}")
    r.remove = (time.perf_counter() - t0) / pairs
    return r


def concurrent_stats(
    make: Callable[[], Snapshotter], keys: Sequence[str], clients: int, seconds: float
) -> float:
    """Stat calls per second from ``clients`` threads, each with its own ``make()``."""
    counts = [0] * clients
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def work(n: int) -> None:
        sn = make()
        sn.stat(keys[0])
        start.wait()
        i, done = n, 0
        while not stop.is_set():
            sn.stat(keys[i % len(keys)])
            i += 7
            done += 1
        counts[n] = done
        if isinstance(sn, Client):
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
    return sum(counts) / (time.perf_counter() - t0)


def time_list(sn: Snapshotter, repeat: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = sum(1 for _ in sn.walk())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


# -- output ------------------------------------------------------------------------------


def rate(seconds: float) -> str:
    return f"{1 / seconds:>9,.0f}/s" if seconds > 0 else "-"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:>8.3f} ms"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=200, help="prepare+commit pairs per round")
    ap.add_argument("--stats", type=int, default=2000, help="sequential Stats per round")
    ap.add_argument("--snapshots", type=int, default=10_000, help="snapshots in each store")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0, help="of each concurrent phase")
    ap.add_argument("--fs", default="ext4", help="scratch filesystem (ext4, xfs, tmpfs…)")
    args = ap.parse_args(argv)

    with scratch_fs(args.fs, "4G") as (mnt, desc):
        print(f"# gRPC benchmark: stratasnap (native) in-process vs over a unix socket, on {desc}")
        print(
            f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
            f"Python {sys.version.split()[0]}; grpcio {getattr(grpc, '__version__', '?')}"
        )
        roots = {"in-process": mnt / "inproc", "socket": mnt / "served"}
        t0 = time.perf_counter()
        for root in roots.values():
            with open_snapshotter(root, "native") as store:
                populate(store, args.snapshots)
        print(
            f"# populated both stores with {args.snapshots:,} snapshots in "
            f"{time.perf_counter() - t0:.1f} s"
        )

        inproc = open_snapshotter(roots["in-process"], "native")
        server = Server(roots["socket"], mnt / "run" / "ss.sock", mnt / "server.log")
        client = Client(server.address)
        try:
            client.wait_ready()
            sides: dict[str, Snapshotter] = {"in-process": inproc, "socket": client}
            for name, sn in sides.items():  # warm-up
                one_round(sn, f"warm-{name}", 20, 200)
            results: dict[str, list[Round]] = {name: [] for name in sides}
            server_cpu: list[float] = []
            client_cpu: list[float] = []
            for rnd in range(args.rounds):
                order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
                for name in order:
                    results[name].append(one_round(sides[name], f"r{rnd}", args.pairs, args.stats))
                # The server's CPU per Stat, measured on its own (clock ticks: many calls).
                keys = [f"bulk/sha256:{i:064x}" for i in range(2000) if i % 5 != 4]
                cpu0, mine0 = cpu_seconds(server.proc.pid), time.process_time()
                for i in range(args.stats):
                    client.stat(keys[i % len(keys)])
                server_cpu.append((cpu_seconds(server.proc.pid) - cpu0) / args.stats)
                client_cpu.append((time.process_time() - mine0) / args.stats)

            def med(name: str, attr: str) -> float:
                return float(statistics.median(getattr(r, attr) for r in results[name]))

            print()
            print(
                f"## round trips ({args.rounds} rounds x {args.pairs} prepare+commit pairs, "
                f"{args.stats} stats, {args.pairs} removes; medians)"
            )
            print(f"{'operation':<22}{'in-process':>14}{'socket':>14}{'ratio':>9}   target")
            for attr, label in (
                ("pair", "prepare+commit pair"),
                ("prepare", "prepare"),
                ("commit", "commit"),
                ("stat", "stat"),
                ("remove", "remove"),
            ):
                a, b = med("in-process", attr), med("socket", attr)
                print(f"{label:<22}{rate(a):>14}{rate(b):>14}{b / a:>8.1f}x")
            a, b = med("in-process", "pair"), med("socket", "pair")
            print(f"{'server overhead/pair':<22}{'':>14}{ms(b - a):>14}{'':>9}   <= 0.5 ms")

            lat = {n: sorted(x for r in results[n] for x in r.latencies) for n in sides}

            def pct(xs: list[float], p: float) -> float:
                return xs[min(len(xs) - 1, int(len(xs) * p))]

            print()
            print("## Stat, one call at a time")
            print(f"{'':<22}{'in-process':>14}{'socket':>14}")
            print(
                f"{'p50 latency':<22}{ms(pct(lat['in-process'], 0.5)):>14}"
                f"{ms(pct(lat['socket'], 0.5)):>14}   target <= 0.5 ms (socket)"
            )
            print(
                f"{'p99 latency':<22}{ms(pct(lat['in-process'], 0.99)):>14}"
                f"{ms(pct(lat['socket'], 0.99)):>14}"
            )
            print(
                f"{'server CPU per Stat':<22}{'':>14}"
                f"{statistics.median(server_cpu) * 1e6:>11.0f} µs"
            )
            print(
                f"{'client CPU per Stat':<22}{'':>14}"
                f"{statistics.median(client_cpu) * 1e6:>11.0f} µs   (the Python client; "
                "containerd's is Go)"
            )

            keys = [f"bulk/sha256:{i:064x}" for i in range(args.snapshots) if i % 5 != 4]
            print()
            print(
                f"## Stat from {args.clients} concurrent clients ({args.seconds:.0f} s each, "
                "threads; socket: one channel per thread)"
            )
            inproc_rate = concurrent_stats(lambda: inproc, keys, args.clients, args.seconds)
            cpu0 = cpu_seconds(server.proc.pid)
            sock_rate = concurrent_stats(
                lambda: Client(server.address), keys, args.clients, args.seconds
            )
            cpu = cpu_seconds(server.proc.pid) - cpu0
            print(
                f"{'Stat/s':<22}{inproc_rate:>12,.0f}/s{sock_rate:>12,.0f}/s"
                f"   target >= 3,000/s (socket)"
            )
            print(f"{'server CPU':<22}{'':>14}{cpu / args.seconds:>10.2f} cores")

            print()
            print("## List of every snapshot (median of 5; the in-process one is walk())")
            a, na = time_list(inproc, 5)
            b, nb = time_list(client, 5)
            print(
                f"{'List ' + f'{nb:,}':<22}{ms(a):>14}{ms(b):>14}{b / a:>8.1f}x"
                "   target <= 300 ms (socket)"
            )
            assert na == nb, (na, nb)
            print(f"\n# load average at the end: {os.getloadavg()[0]:.2f} (the machine is shared)")
        finally:
            client.close()
            server.stop()
            inproc.close()


if __name__ == "__main__":
    main()

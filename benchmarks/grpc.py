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

The Python client costs ~170 µs of CPU per call itself; containerd's client is
Go. So when ``go`` and Debian's containerd Go API are installed
(``apt-get install golang-go golang-github-containerd-containerd-dev``), the
Go client in ``goclient/`` (containerd's generated ``SnapshotsClient`` on
grpc-go) is built once into a temp dir (GOPATH mode, offline) and every socket
phase is measured with it too, as a third side: its rounds alternate with the
other two, on the same server. Without them one line says so and the tables
keep the Python client's figures.

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
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

from _gobuild import build_go  # noqa: E402
from _scratch import scratch_fs  # noqa: E402
from _server import ServerProcess  # noqa: E402

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


class Server(ServerProcess):
    """``python -m stratasnap.server serve`` on ``root``, as a subprocess."""

    def __init__(self, root: Path, address: Path, log: Path) -> None:
        argv = [sys.executable, "-m", "stratasnap.server", "serve", "--root", str(root)]
        argv += ["--address", str(address), "--log-level", "warning"]
        super().__init__(argv, address, log)


# -- the Go client ---------------------------------------------------------------------


def build_goclient(tmp: Path) -> tuple[Path | None, str]:
    """Build ``goclient/`` into ``tmp``: (binary, description) or (None, why not)."""
    binary, note = build_go("goclient", tmp, "Go-client figures")
    if binary is None:
        return None, note
    return binary, f"{note}, containerd's generated snapshots v1 client"


class GoClient:
    """Runs ``goclient`` modes against one server; each run is a fresh process."""

    def __init__(self, binary: Path, server: Server, keys_file: Path) -> None:
        self.binary, self.server, self.keys_file = binary, server, keys_file

    def run(self, mode: str, *args: object) -> dict[str, object]:
        argv = [str(self.binary), "-address", f"unix://{self.server.address}", "-mode", mode]
        argv += ["-server-pid", str(self.server.proc.pid), *map(str, args)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"goclient {mode} failed: {proc.stderr.strip()}")
        out: dict[str, object] = json.loads(proc.stdout)
        return out


def go_round(go: GoClient, tag: str, pairs: int, stats: int, warmup: int = 200) -> Round:
    """:func:`one_round` with the Go client (after ``warmup`` Stats on its new connection)."""
    args = ("-n", pairs, "-stats", stats, "-prefix", tag, "-keys", go.keys_file)
    out = go.run("round", *args, "-warmup", warmup)
    us = 1e-6
    r = Round()
    r.prepare = float(out["prepare_mean_us"]) * us  # type: ignore[arg-type]
    r.commit = float(out["commit_mean_us"]) * us  # type: ignore[arg-type]
    r.pair = r.prepare + r.commit
    r.stat = float(out["stat_mean_us"]) * us  # type: ignore[arg-type]
    r.remove = float(out["remove_mean_us"]) * us  # type: ignore[arg-type]
    r.latencies = [float(x) * us for x in out["stat_lat_us"]]  # type: ignore[attr-defined]
    r.server_cpu = float(out.get("server_cpu_us", "nan")) * us  # type: ignore[arg-type]
    return r


# -- the measured phases -----------------------------------------------------------------


class Round:
    """One round's figures for one side (seconds)."""

    def __init__(self) -> None:
        self.pair = self.prepare = self.commit = self.stat = self.remove = 0.0
        self.latencies: list[float] = []
        self.server_cpu = float("nan")  # per Stat, when measured


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
    ap.add_argument("--no-go", action="store_true", help="skip the Go client")
    args = ap.parse_args(argv)

    with (
        scratch_fs(args.fs, "4G") as (mnt, desc),
        tempfile.TemporaryDirectory(prefix="stratasnap-goclient-") as gotmp,
    ):
        print(f"# gRPC benchmark: stratasnap (native) in-process vs over a unix socket, on {desc}")
        print(
            f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
            f"Python {sys.version.split()[0]}; grpcio {getattr(grpc, '__version__', '?')}"
        )
        binary: Path | None = None
        if args.no_go:
            print("# --no-go: Go-client figures skipped")
        else:
            binary, note = build_goclient(Path(gotmp))
            print(f"# {note}")
        roots = {"in-process": mnt / "inproc", "socket": mnt / "served"}
        t0 = time.perf_counter()
        for root in roots.values():
            with open_snapshotter(root, "native") as store:
                populate(store, args.snapshots)
        print(
            f"# populated both stores with {args.snapshots:,} snapshots in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        keys = [f"bulk/sha256:{i:064x}" for i in range(args.snapshots) if i % 5 != 4]
        keys_file = Path(gotmp) / "keys.txt"
        keys_file.write_text("".join(f"{k}\n" for k in keys[:1600]))  # the 2,000 of the CPU phase
        all_keys_file = Path(gotmp) / "all-keys.txt"
        all_keys_file.write_text("".join(f"{k}\n" for k in keys))

        inproc = open_snapshotter(roots["in-process"], "native")
        server = Server(roots["socket"], mnt / "run" / "ss.sock", mnt / "server.log")
        client = Client(server.address)
        try:
            client.wait_ready()
            go = GoClient(binary, server, keys_file) if binary else None
            sides: dict[str, Snapshotter] = {"in-process": inproc, "socket": client}
            names = [*sides, "socket-go"] if go else list(sides)

            def run_round(name: str, tag: str, pairs: int, stats: int) -> Round:
                if name == "socket-go":
                    assert go is not None
                    return go_round(go, f"{tag}-go", pairs, stats)
                return one_round(sides[name], tag, pairs, stats)

            for name in names:  # warm-up
                run_round(name, f"warm-{name}", 20, 200)
            results: dict[str, list[Round]] = {name: [] for name in names}
            server_cpu: list[float] = []
            client_cpu: list[float] = []
            go_stat: list[dict[str, object]] = []
            for rnd in range(args.rounds):
                order = names if rnd % 2 == 0 else list(reversed(names))
                for name in order:
                    results[name].append(run_round(name, f"r{rnd}", args.pairs, args.stats))
                # The server's CPU per Stat, measured on its own (clock ticks: many calls).
                cpu_keys = keys[:1600]
                cpu0, mine0 = cpu_seconds(server.proc.pid), time.process_time()
                for i in range(args.stats):
                    client.stat(cpu_keys[i % len(cpu_keys)])
                server_cpu.append((cpu_seconds(server.proc.pid) - cpu0) / args.stats)
                client_cpu.append((time.process_time() - mine0) / args.stats)
                if go:  # the same with the Go client: the 3,000-call stat mode
                    go_stat.append(go.run("stat", "-n", 3000, "-keys", keys_file))

            def med(name: str, attr: str) -> float:
                return float(statistics.median(getattr(r, attr) for r in results[name]))

            def gomed(runs: list[dict[str, object]], field: str) -> float:
                return float(statistics.median(float(r[field]) for r in runs))  # type: ignore[arg-type]

            socks = [n for n in names if n != "in-process"]
            head = {"in-process": "in-process", "socket": "socket (Py)", "socket-go": "socket (Go)"}
            cols = "".join(f"{head[n]:>14}" for n in names)
            ratios = "".join(f"{'ratio ' + head[n][8:10]:>9}" for n in socks)
            print()
            print(
                f"## round trips ({args.rounds} rounds x {args.pairs} prepare+commit pairs, "
                f"{args.stats} stats, {args.pairs} removes; medians)"
            )
            print(f"{'operation':<22}{cols}{ratios}   target")
            for attr, label in (
                ("pair", "prepare+commit pair"),
                ("prepare", "prepare"),
                ("commit", "commit"),
                ("stat", "stat"),
                ("remove", "remove"),
            ):
                a = med("in-process", attr)
                line = "".join(f"{rate(med(n, attr)):>14}" for n in names)
                line += "".join(f"{med(n, attr) / a:>8.1f}x" for n in socks)
                print(f"{label:<22}{line}")
            a = med("in-process", "pair")
            line = "".join(f"{ms(med(n, 'pair') - a):>14}" for n in socks)
            print(f"{'server overhead/pair':<22}{'':>14}{line}{'':>{9 * len(socks)}}   <= 0.5 ms")

            lat = {n: sorted(x for r in results[n] for x in r.latencies) for n in names}

            def pct(xs: list[float], p: float) -> float:
                return xs[min(len(xs) - 1, int(len(xs) * p))]

            print()
            print(
                f"## Stat, one call at a time ({args.rounds} x {args.stats} in the rounds, pooled)"
            )
            print(f"{'':<22}{cols}")
            for p, label, target in (
                (0.5, "p50", "   target <= 0.5 ms (socket)"),
                (0.99, "p99", ""),
            ):
                line = "".join(f"{ms(pct(lat[n], p)):>14}" for n in names)
                print(f"{label + ' latency':<22}{line}{target}")
            if go_stat:
                line = f"{'':>14}{'':>14}{gomed(go_stat, 'p50_us') / 1e3:>11.3f} ms"
                print(f"{'p50, 3,000-call run':<22}{line}")
                line = f"{'':>14}{'':>14}{gomed(go_stat, 'calls_per_s'):>12,.0f}/s"
                print(f"{'calls/s, one at a time':<22}{line}")
            srv = f"{statistics.median(server_cpu) * 1e6:>11.0f} µs"
            cli = f"{statistics.median(client_cpu) * 1e6:>11.0f} µs"
            if go_stat:
                srv += f"{gomed(go_stat, 'server_cpu_us'):>11.0f} µs"
                cli += f"{gomed(go_stat, 'client_cpu_us'):>11.0f} µs"
            print(f"{'server CPU per Stat':<22}{'':>14}{srv}")
            print(f"{'client CPU per Stat':<22}{'':>14}{cli}   (containerd's client is Go)")

            print()
            print(
                f"## Stat from {args.clients} concurrent clients ({args.seconds:g} s each; "
                "Python: threads, a channel each; Go: goroutines, a connection each, "
                "or all on one connection like containerd's proxy)"
            )
            inproc_rate = concurrent_stats(lambda: inproc, keys, args.clients, args.seconds)
            cpu0 = cpu_seconds(server.proc.pid)
            t0 = time.perf_counter()
            sock_rate = concurrent_stats(
                lambda: Client(server.address), keys, args.clients, args.seconds
            )
            cpu = (cpu_seconds(server.proc.pid) - cpu0) / (time.perf_counter() - t0)
            conc: dict[str, dict[str, object]] = {}
            if go:
                go_args = ("-c", args.clients, "-seconds", args.seconds, "-keys", all_keys_file)
                conc["own"] = go.run("stat-concurrent", *go_args)
                conc["one"] = go.run("stat-concurrent", *go_args, "-conns", 1)
            line = f"{inproc_rate:>12,.0f}/s{sock_rate:>12,.0f}/s"
            line += "".join(f"{float(c['calls_per_s']):>12,.0f}/s" for c in conc.values())  # type: ignore[arg-type]
            print(
                f"{'Stat/s':<22}{'in-process':>14}{'socket (Py)':>14}"
                + ("" if not conc else f"{'Go, 32 conns':>14}{'Go, 1 conn':>14}")
            )
            print(f"{'':<22}{line}   target >= 3,000/s (socket)")
            line = f"{cpu:>10.2f} cores"
            line += "".join(f"{float(c['server_cores']):>8.2f} cores" for c in conc.values())  # type: ignore[arg-type]
            print(f"{'server CPU':<22}{'':>14}{line}")
            if conc:
                line = "".join(
                    f"{float(c['p50_us']) / 1e3:>6.1f}/{float(c['p99_us']) / 1e3:<5.1f}ms"  # type: ignore[arg-type]
                    for c in conc.values()
                )
                print(f"{'Go p50/p99 latency':<22}{'':>14}{'':>14}{line}")

            print()
            print("## List of every snapshot (median of 5; the in-process one is walk())")
            a, na = time_list(inproc, 5)
            b, nb = time_list(client, 5)
            line = f"{ms(a):>14}{ms(b):>14}"
            if go:
                gl = go.run("list", "-repeat", 5)
                line += f"{ms(float(gl['median_s'])):>14}"  # type: ignore[arg-type]
                assert gl["infos"] == nb, (gl["infos"], nb)
            print(f"{'':<22}{cols}")
            print(f"{'List ' + f'{nb:,}':<22}{line}   target <= 300 ms (socket)")
            assert na == nb, (na, nb)
            print(f"\n# load average at the end: {os.getloadavg()[0]:.2f} (the machine is shared)")
        finally:
            client.close()
            server.stop()
            inproc.close()


if __name__ == "__main__":
    main()

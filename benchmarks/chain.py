"""Prepare and commit through the socket: containerd's benchsuite chain and a single prepare.

Run: ``.venv/bin/python benchmarks/chain.py`` as root (mounts, a loop
filesystem). Two snapshots servers run side by side (``--fs``, ext4 by default): this checkout's
``stratasnap serve --backend overlay`` (``this``) and a reference (``ref``),
each on a fresh loop filesystem of its own (so that one side's flush never
writes back the other's dirty layers):
by default containerd 1.6's own overlay snapshotter behind ``goproxy/`` (Go,
containerd's snapshot service, no containerd daemon), or, with ``--ref SRC``,
another checkout's ``src`` directory (e.g. ``git archive <rev> src | tar -x -C
/tmp/old``, to compare before and after a change). ``--old SRC`` adds a third
side (``old``, another checkout's ``src``) to the same run, alternated with the
other two. All are driven by
``goclient/`` (containerd's generated Go client, as containerd's proxy plugin
calls a snapshotter), so both pay the same client. Needs ``golang-go`` and
``golang-github-containerd-containerd-dev`` (built offline).

1. **chain**: containerd's snapshotter benchsuite shape. A chain of
   ``--layers`` layers (16), each prepared on the one below, mounted with
   containerd's mount package, given ten 1 MiB files and a 4-byte rewrite of
   a file of the layer below (a copy-up), unmounted and committed. Prepare and
   commit are timed per layer (the commit includes flushing the layer's data,
   which both snapshotters do before recording it). ``--rounds`` chains per
   side, alternated, which side goes first alternating too.
2. **prepare**: ``--prepares`` single Prepares of an empty snapshot, one at a
   time (then all removed, untimed): p50 and p99. A third side, ``floor``
   (``_floor.py``: grpcio serving the same API the way our server does, with
   handlers that do nothing), takes its turn too: what it measures is grpcio's
   own cost per call, so the report can say what stratasnap adds on top of it
   (``--no-floor`` leaves it out).

The loop images go under ``$TMPDIR``: on a busy host disk a device flush (an
fsync of the image file) can take several milliseconds and swamp everything
else; ``TMPDIR=/dev/shm`` keeps the images in memory, so flushes cost nothing
and the figures show what the filesystems and the servers themselves do.

Prints each round, then medians over rounds of the per-round medians, and
the ratios this / ref next to issue 12's targets (chain prepare + commit
<= 1.3x; one prepare p50 <= 1.0 ms). The machine may be shared (the load
average is printed): compare ratios within one run. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

# benchmarks/grpc.py would shadow the grpc package: import the real one first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402, F401

sys.path.insert(0, str(HERE))

from _rounds import rotated  # noqa: E402
from _scratch import scratch_fs  # noqa: E402
from _server import Server, ServerProcess, built  # noqa: E402

SCRIPT = "benchmarks/chain.py"


def goclient(binary: Path, address: Path, mode: str, *args: str) -> dict[str, object]:
    argv = [str(binary), "-address", f"unix://{address}", "-mode", mode, *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"goclient -mode {mode} failed: {done.stderr.strip()}")
    result: dict[str, object] = json.loads(done.stdout)
    return result


def ms(us: object) -> float:
    assert isinstance(us, int | float)
    return float(us) / 1000


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ref", default="containerd", help="'containerd' (default) or a src dir")
    ap.add_argument("--old", metavar="SRC", help="a third side: another checkout's src dir")
    ap.add_argument("--fs", default="ext4", help="scratch filesystem type (default ext4)")
    ap.add_argument("--size", default="8G", help="of the scratch filesystem (default 8G)")
    ap.add_argument("--layers", type=int, default=16, help="layers per chain (default 16)")
    ap.add_argument("--rounds", type=int, default=5, help="chains per side (default 5)")
    ap.add_argument("--prepares", type=int, default=300, help="single prepares per round")
    ap.add_argument("--prepare-rounds", type=int, default=3, help="(default 3)")
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more flag for this checkout's server (repeat), e.g. --serve-arg=--config=F",
    )
    ap.add_argument("--only", choices=("chain", "prepare"), action="append", help="run only these")
    ap.add_argument(
        "--no-floor", action="store_true", help="no trivial-handler grpcio server (floor) side"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit(f"{SCRIPT} needs root (mounts, a loop filesystem)")
    parts = args.only or ["chain", "prepare"]
    here = Path(__file__).resolve().parents[1] / "src"
    with ExitStack() as stack:
        mnt, desc = stack.enter_context(scratch_fs(args.fs, args.size))
        ref_mnt, _ = stack.enter_context(scratch_fs(args.fs, args.size))
        mounts = {"this": mnt, "ref": ref_mnt}
        client = built("goclient", mnt, SCRIPT)
        ref_src = built("goproxy", mnt, SCRIPT) if args.ref == "containerd" else Path(args.ref)
        where = os.environ.get("TMPDIR", "/tmp")
        print(f"# overlay through the socket, each side on a {desc} (image in {where}), Go client")
        print(f"# load average {load()}")
        print(f"# this = {here} {' '.join(args.serve_arg)}")
        containerd = args.ref == "containerd"
        print(f"# ref  = {'containerd 1.6 overlayfs behind goproxy' if containerd else ref_src}")
        servers: dict[str, ServerProcess] = {
            "this": Server(here, "overlay", mnt / "root-this", mnt / "this.log", args.serve_arg),
            "ref": Server(ref_src, "overlay", ref_mnt / "root-ref", ref_mnt / "ref.log"),
        }
        if args.old:
            print(f"# old  = {args.old}")
            old_mnt = mounts["old"] = stack.enter_context(scratch_fs(args.fs, args.size))[0]
            old_root, old_log = old_mnt / "root-old", old_mnt / "old.log"
            servers["old"] = Server(Path(args.old), "overlay", old_root, old_log)
        if "prepare" in parts and not args.no_floor:
            print("# floor = grpcio with do-nothing handlers (_floor.py), single prepares only")
            servers["floor"] = floor_server(here, mnt)
        chains: dict[str, list[tuple[float, float]]] = {n: [] for n in servers}
        singles: dict[str, list[tuple[float, float]]] = {n: [] for n in servers}
        try:
            if "chain" in parts:
                print(f"\n## {args.layers}-layer chain, median per layer (ms)")
                chain_sides = [n for n in servers if n != "floor"]  # floor: prepares only
                for r in range(args.rounds):
                    for name in rotated(chain_sides, r):
                        target = mounts[name] / f"mnt-{name}"
                        target.mkdir(exist_ok=True)
                        out = goclient(
                            client,
                            servers[name].address,
                            "chain",
                            *("-n", str(args.layers), "-prefix", f"c{r}", "-mountdir", str(target)),
                        )
                        prep, commit = ms(out["prepare_p50_us"]), ms(out["commit_p50_us"])
                        chains[name].append((prep, commit))
                        print(
                            f"round {r + 1}: {name:>4}: prepare {prep:6.2f}  commit {commit:6.2f}"
                            f"  (load {load()})",
                            flush=True,
                        )
            if "prepare" in parts:
                print(f"\n## single prepare, {args.prepares} per round (ms)")
                sides = list(singles)
                for r in range(args.prepare_rounds):
                    # Each side goes first in turn (and last, reversed).
                    order = rotated(sides, r)
                    for name in order if r % 2 == 0 else order[::-1]:
                        out = goclient(
                            client,
                            servers[name].address,
                            "prepares",
                            *("-n", str(args.prepares), "-prefix", f"p{r}"),
                        )
                        p50, p99 = ms(out["prepare_p50_us"]), ms(out["prepare_p99_us"])
                        singles[name].append((p50, p99))
                        print(
                            f"round {r + 1}: {name:>4}: p50 {p50:6.3f}  p99 {p99:6.3f}", flush=True
                        )
        finally:
            for server in servers.values():
                server.stop()
    report(chains, singles)


def floor_server(src: Path, mnt: Path) -> ServerProcess:
    """``_floor.py`` on ``<mnt>/floor.sock``, importing stratasnap from ``src``."""
    address = mnt / "floor.sock"
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, str(HERE / "_floor.py"), str(address)]
    return ServerProcess(argv, address, mnt / "floor.log", env=env, timeout=60, poll=0.05)


def report(
    chains: dict[str, list[tuple[float, float]]], singles: dict[str, list[tuple[float, float]]]
) -> None:
    def med(rows: list[tuple[float, float]], i: int) -> float:
        return statistics.median(row[i] for row in rows)

    print(f"\n## medians over rounds (load average now {load()})")
    if chains.get("old"):
        t, o, r = chains["this"], chains["old"], chains["ref"]
        for i, what in enumerate(("prepare", "commit")):
            now, before, ref = med(t, i), med(o, i), med(r, i)
            print(
                f"chain {what} this / old: {now:.2f} / {before:.2f} ms: {now / before:.2f}x"
                f" (old / ref: {before / ref:.2f}x)"
            )
    if chains["this"]:
        t_p, t_c = med(chains["this"], 0), med(chains["this"], 1)
        r_p, r_c = med(chains["ref"], 0), med(chains["ref"], 1)
        print(f"chain prepare: this {t_p:.2f} ms, ref {r_p:.2f} ms: {t_p / r_p:.2f}x")
        print(f"chain commit:  this {t_c:.2f} ms, ref {r_c:.2f} ms: {t_c / r_c:.2f}x")
        both = (t_p + t_c) / (r_p + r_c)
        print(
            f"chain prepare + commit: this {t_p + t_c:.2f} ms, ref {r_p + r_c:.2f} ms:"
            f" {both:.2f}x (target <= 1.3x)"
        )
    if singles["this"]:
        t50, r50 = med(singles["this"], 0), med(singles["ref"], 0)
        t99, r99 = med(singles["this"], 1), med(singles["ref"], 1)
        print(
            f"single prepare p50: this {t50:.3f} ms (target <= 1.0 ms), ref {r50:.3f} ms:"
            f" {t50 / r50:.2f}x; p99 this {t99:.3f}, ref {r99:.3f} ms"
        )
        if singles.get("floor"):
            f50 = med(singles["floor"], 0)
            print(
                f"grpcio floor p50 {f50:.3f} ms (do-nothing handlers): this adds"
                f" {t50 - f50:.3f} ms to it, ref is {r50 - f50:+.3f} ms from it"
            )


if __name__ == "__main__":
    main()

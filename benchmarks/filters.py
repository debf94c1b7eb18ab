"""Hostile filters: a 10 kB filter of every shape, answered through the socket.

Run: ``.venv/bin/python benchmarks/filters.py [--snapshots N] [--rounds R]`` (as root
on a fresh ext4 loop filesystem). A store of 10,000 snapshots with containerd's
labels is served by ``stratasnap serve``'s Server; each shape is sent as one List
request of about 10 kB (or as the bound allows), round-robin for R rounds, and the
median time to the last answer (or to InvalidArgument) is printed next to the
same List with a plain one-selector filter (``labels.n==3``) and with none.
Target: every shape answered in <= 50 ms. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# benchmarks/grpc.py would shadow the grpc package: import the real one first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402

sys.path.insert(0, str(HERE))

from _scratch import scratch_fs  # noqa: E402

from stratasnap import open_snapshotter  # noqa: E402
from stratasnap.metastore import MetaStore  # noqa: E402
from stratasnap.server.api.containerd.services.snapshots.v1 import (  # noqa: E402
    snapshots_pb2 as pb,
)
from stratasnap.server.api.containerd.services.snapshots.v1 import (  # noqa: E402
    snapshots_pb2_grpc,
)
from stratasnap.server.config import load_config  # noqa: E402
from stratasnap.server.daemon import Server  # noqa: E402
from stratasnap.types import Kind  # noqa: E402

SIZE = 10_000  # bytes per hostile request


def fill(make: Callable[[int], str], size: int = SIZE) -> list[str]:
    """Alternatives made by ``make(i)`` until the request holds ``size`` bytes."""
    out: list[str] = []
    total = 0
    i = 0
    while total + len(make(i).encode()) <= size:
        out.append(make(i))
        total += len(out[-1].encode())
        i += 1
    return out


def one_string(make: Callable[[int], str], size: int = SIZE) -> list[str]:
    return [",".join(fill(lambda i: make(i) + ",", size)).replace(",,", ",").rstrip(",")]


REF = 'labels."containerd.io/snapshot.ref"'
SHAPES: dict[str, list[str]] = {
    "no filter (reference)": [],
    "labels.n==3 (reference)": ["labels.n==3"],
    "OR of name==": fill(lambda i: f"name==default/{i}/sha256:{i:064x}"[:80]),
    "OR of label==": fill(lambda i: f"{REF}==sha256:{i:060x}"),
    "AND of label!=": one_string(lambda i: f"labels.n!=v{i}"),
    "OR of kind,label presence": fill(lambda i: f"kind==view,labels.x{i}"),
    "regex 1 KiB alternation + OR": [
        "name~=^(" + "|".join(f"k{i}" for i in range(300))[:1010] + ")$",
        *fill(lambda i: f"name==n{i}", SIZE - 1030),
    ],
    "regex 500-deep groups + OR": [
        "name~=" + "(" * 500 + "x" + ")" * 500,
        *fill(lambda i: f"name==n{i}", SIZE - 1010),
    ],
    "16 label regexes matching ''": [f"labels.n~=^$|^{i % 10}" for i in range(16)],
    "16 name regexes + OR": [
        *[f"name~=^k{i}$" for i in range(16)],
        *fill(lambda i: f"name==n{i}", SIZE - 200),
    ],
    "backtracking regex (a+)+$": ["name~=(a+)+$", *fill(lambda i: f"parent==p{i}", SIZE - 20)],
    "rejected: 10 kB regex": ["name~=" + "a" * (SIZE - 6)],
    "rejected: 10,000 alternatives": ["kind"] * 10_000,
    "rejected: pattern too large": ["name~=" + r"\pL{1000}" * 110],
}


def build(root: Path, n: int) -> None:
    open_snapshotter(root).close()
    store = MetaStore(root / "metadata.db")
    for i in range(n):
        sid = store.reserve_id()
        with store.write() as tx:
            tx.create(
                sid,
                Kind.ACTIVE,
                f"default/{i}/sha256:{i:064x}",
                "",
                {"containerd.io/snapshot.ref": f"sha256:{i:060x}", "n": str(i % 10)},
            )
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=10_000, help="snapshots in the store")
    ap.add_argument("--rounds", type=int, default=7, help="round-robin rounds (median)")
    args = ap.parse_args()
    with scratch_fs("ext4", "2G") as (mnt, desc):
        root = mnt / "root"
        build(root, args.snapshots)
        print(f"# filter benchmark on {desc}: {args.snapshots:,} snapshots, served over a")
        print("# unix socket, Python gRPC client; the machine was shared with other jobs")
        times: dict[str, list[float]] = {k: [] for k in SHAPES}
        results: dict[str, str] = {}
        config = load_config(root=root, address=mnt / "s.sock")
        with Server(config) as server, grpc.insecure_channel(f"unix:{server.address}") as ch:
            stub = snapshots_pb2_grpc.SnapshotsStub(ch)
            for _ in range(args.rounds):
                for name, filters in SHAPES.items():
                    req = pb.ListSnapshotsRequest(filters=filters)
                    t0 = time.perf_counter()
                    try:
                        n = sum(len(r.info) for r in stub.List(req, timeout=60))
                        results[name] = f"{n} matched"
                    except grpc.RpcError as e:
                        results[name] = e.code().name
                    times[name].append(time.perf_counter() - t0)
        print(f"{'shape':36} {'bytes':>7} {'median':>9}  answer")
        for name, filters in SHAPES.items():
            size = sum(len(f.encode()) for f in filters)
            med = statistics.median(times[name]) * 1000
            print(f"{name:36} {size:7,} {med:7.1f} ms  {results[name]}")


if __name__ == "__main__":
    main()

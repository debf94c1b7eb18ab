"""``stratasnap check`` on a root of 10,000 snapshots, next to a walk of all of them.

Run: ``.venv/bin/python benchmarks/check.py [--snapshots N] [--backend overlay]
[--layer-kib K]`` (as root it builds the root on a fresh ext4 loop filesystem).
The root holds chains of 10 committed layers with an active snapshot on each,
as containerd leaves them, each layer holding a file of K KiB. Prints the
median of the read-only check, of a --repair that finds nothing to do, of
``check --deep`` (erofs: every layer image hashed against its recorded
digest), of an open and close of the snapshotter (what every start pays,
among it the look for active and view storage a power loss took back) and
of a walk of every snapshot (``stratasnap ls``: the least a look at every
snapshot costs), alternated, with ratios. Target: check <= 5 s. Figures,
never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import scratch_fs

from stratasnap import Mount, open_snapshotter
from stratasnap.check import check, repair


def _upper(mounts: list[Mount]) -> Path:
    """The directory an active snapshot's writes go to (bind source, or overlay upper)."""
    [m] = mounts
    uppers = [o.partition("=")[2] for o in m.options if o.startswith("upperdir=")]
    return Path(uppers[0] if uppers else m.source)


def build(root: Path, backend: str, n: int, layer_bytes: int = 0) -> None:
    with open_snapshotter(root, backend) as sn:
        made = 0
        chain = 0
        while made < n:
            parent = ""
            for depth in range(min(10, n - made - 1) or 1):
                key = f"extract-{chain}-{depth}"
                mounts = sn.prepare(key, parent)
                if layer_bytes:
                    (_upper(mounts) / "data").write_bytes(os.urandom(layer_bytes))
                name = f"sha256:{chain:032x}{depth:032x}"
                sn.commit(name, key, labels={"containerd.io/gc.root": "x"} if depth else None)
                parent = name
                made += 1
            if made < n:
                sn.prepare(f"k8s.io/{chain}/ctr", parent)
                made += 1
            chain += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=10_000, help="snapshots in the root")
    ap.add_argument("--backend", default="overlay", help="backend to build and check with")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds (median)")
    ap.add_argument("--layer-kib", type=int, default=0, help="KiB of data in each layer")
    args = ap.parse_args()
    with scratch_fs("ext4", "4G") as (mnt, desc):
        root = mnt / "root"
        t0 = time.perf_counter()
        build(root, args.backend, args.snapshots, args.layer_kib * 1024)
        stored = sum(e.stat().st_blocks * 512 for e in (root / "snapshots").glob("*/layer.erofs"))
        print(
            f"# check benchmark on {desc}; {args.backend} root of {args.snapshots:,} snapshots"
            f", {args.layer_kib} KiB per layer ({stored / 2**20:.0f} MiB of erofs images)"
        )
        print(f"# (built in {time.perf_counter() - t0:.1f} s; machine shared with other jobs)")
        times: dict[str, list[float]] = {
            "check": [],
            "check --deep": [],
            "repair (nothing to do)": [],
            "open + close": [],
            "walk": [],
        }
        with open_snapshotter(root, args.backend) as sn:
            for _ in range(args.rounds):
                for what, fn in (
                    ("check", lambda: check(root, args.backend)),
                    ("check --deep", lambda: check(root, args.backend, deep=True)),
                    ("walk", lambda: list(sn.walk())),
                    ("repair (nothing to do)", lambda: repair(root, args.backend)),
                    ("open + close", lambda: open_snapshotter(root, args.backend).close()),
                ):
                    t0 = time.perf_counter()
                    result = fn()
                    times[what].append(time.perf_counter() - t0)
                    if what.startswith("check"):
                        assert result.healthy, result.remaining  # type: ignore[union-attr]
        walk = statistics.median(times["walk"])
        for what, ts in times.items():
            med = statistics.median(ts)
            print(f"{what:24} {med * 1000:9.1f} ms   {med / walk:5.1f}x walk   (target <= 5 s)")


if __name__ == "__main__":
    main()

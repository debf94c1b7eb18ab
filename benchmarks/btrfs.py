"""btrfs backend: prepare on a big parent, views, commit, and usage with quotas.

Run as root: ``.venv/bin/python benchmarks/btrfs.py [--files 50000] [--mb 300] [--reps 3]``.
Each part runs on a fresh btrfs loop filesystem it makes, and alternates
the measured call with its reference in one run. Prints medians and ratios;
never pass/fail.

1. ``prepare(child, parent)`` on a committed parent of N files / M MB: the
   btrfs backend (one snapshot ioctl) against the native backend's prepare
   of the same tree on the same filesystem (a copy whose data is reflinked)
   and against ``cp -a --reflink=always`` of the tree. Target: >= 20x both.
2. ``view``: the read-only bind the backend hands out against what a
   read-only snapshot per view would cost (the ioctl alone).
3. ``commit`` in containerd's benchsuite shape: a 16-layer chain, per layer
   prepare, write ten 1 MiB files and rewrite 4 bytes of one from the layer
   below, commit (read-only flag, flush, metadata). Target: <= 2 ms.
4. ``usage`` of an active snapshot holding N files with quotas on (its
   qgroup's exclusive bytes) against walking it. Target: >= 50x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import fsync_floor, scratch_fs
from native import make_tree

from stratasnap import open_snapshotter
from stratasnap.backends.btrfs import BtrfsSnapshotter
from stratasnap.fs import btrfs
from stratasnap.fs.usage import disk_usage

MiB = 1 << 20


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


def med(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    os.sync()  # one measurement must not pay for the last one's writeback
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _open(root: Path, **options: object) -> BtrfsSnapshotter:
    sn = open_snapshotter(root, "btrfs", **options)
    assert isinstance(sn, BtrfsSnapshotter)
    return sn


def bench_prepare(files: int, mb: int, reps: int) -> None:
    with scratch_fs("btrfs", "8G") as (mnt, desc):
        print(f"\n## prepare on a parent of {files:,} files / {mb} MB ({desc})")
        sn = _open(mnt / "btrfs-root")
        native = open_snapshotter(mnt / "native-root", "native")
        src = Path(sn.prepare("parent-a")[0].source)
        make_tree(src, files, mb)
        sn.commit("parent", "parent-a")
        parent_dir = Path(sn.view("pv", "parent")[0].source)
        nsrc = Path(native.prepare("parent-a")[0].source)
        shutil.rmtree(nsrc)
        subprocess.run(["cp", "-a", "--reflink=always", str(parent_dir), str(nsrc)], check=True)
        native.commit("parent", "parent-a")
        times: dict[str, list[float]] = {
            "btrfs prepare": [],
            "native prepare (reflinks)": [],
            "cp -a --reflink=always": [],
        }
        removes: dict[str, list[float]] = {"btrfs remove": [], "native remove": []}
        for r in range(reps):
            times["btrfs prepare"].append(timed(lambda r=r: sn.prepare(f"c{r}", "parent")))
            times["native prepare (reflinks)"].append(
                timed(lambda r=r: native.prepare(f"c{r}", "parent"))
            )
            dst = mnt / f"cp-{r}"
            cp = ["cp", "-a", "--reflink=always", str(parent_dir), str(dst)]
            times["cp -a --reflink=always"].append(
                timed(lambda cp=cp: subprocess.run(cp, check=True))
            )
            shutil.rmtree(dst)
            removes["btrfs remove"].append(timed(lambda r=r: sn.remove(f"c{r}")))
            removes["native remove"].append(timed(lambda r=r: native.remove(f"c{r}")))
        m = {k: med(v) for k, v in times.items()}
        base = m["btrfs prepare"]
        for k, v in m.items():
            print(f"  {k:<28}{ms(v)}   {v / base:8.1f}x the btrfs prepare")
        print("  target: native and cp -a >= 20x the btrfs prepare")
        rb, rn = med(removes["btrfs remove"]), med(removes["native remove"])
        print(f"  remove of such a child: btrfs {ms(rb).strip()}, native {ms(rn).strip()}")

        print("\n## view of that parent")
        bind: list[float] = []
        ro_snap: list[float] = []
        parent_fs = Path(sn.mounts("pv")[0].source)
        for r in range(max(reps, 10)):
            bind.append(timed(lambda r=r: sn.view(f"v{r}", "parent")))
            ro_snap.append(
                timed(lambda r=r: btrfs.snapshot(parent_fs, mnt, f"ro-{r}", readonly=True))
            )
            btrfs.destroy_subvolume(mnt, f"ro-{r}")
        print(f"  view (read-only bind, no storage){ms(med(bind))}")
        print(f"  a read-only snapshot (ioctl alone){ms(med(ro_snap))}")
        print(f"  the snapshot would cost {med(ro_snap) / med(bind):.1f}x the whole view")
        native.close()
        sn.close()


def chain(sn: BtrfsSnapshotter, prefix: str, presync: bool) -> tuple[list[float], list[float]]:
    """Prepare and commit times of a 16-layer chain, each layer ten 1 MiB files and a copy."""
    data = os.urandom(MiB)
    prep: list[float] = []
    commit: list[float] = []
    parent = ""
    for layer in range(16):
        key, name = f"{prefix}-a{layer}", f"{prefix}-{layer}"
        t0 = time.perf_counter()
        root = Path(sn.prepare(key, parent)[0].source)
        prep.append(time.perf_counter() - t0)
        for i in range(10):
            (root / f"l{layer}-f{i}").write_bytes(data)
        if layer:
            # Rewrite 4 bytes in the middle of a file of the layer below.
            with open(root / f"l{layer - 1}-f0", "r+b") as f:
                f.seek(MiB // 2)
                f.write(b"abcd")
        if presync:
            os.sync()
        t0 = time.perf_counter()
        sn.commit(name, key)
        commit.append(time.perf_counter() - t0)
        parent = name
    return prep, commit


def bench_commit() -> None:
    for quota in (False, True):
        with scratch_fs("btrfs", "4G") as (mnt, desc):
            what = "quotas on: usage from the qgroup" if quota else "quotas off: usage walks"
            print(f"\n## 16-layer chain (containerd benchsuite shape), {what} ({desc})")
            sn = _open(mnt / "root", quota=quota)
            floor = fsync_floor(mnt, writes=100)
            print(
                f"  reference: one-row SQLite write transaction (fsync floor) {ms(floor).strip()}"
            )
            snap = Path(sn.prepare("ref")[0].source)
            flips = [timed(partial(btrfs.set_readonly, snap, ro)) for ro in (True, False) * 5]
            print(f"  reference: the RDONLY flag alone (a transaction) {ms(med(flips)).strip()}")
            for presync in (False, True):
                prep, commit = chain(sn, "s" if presync else "c", presync)
                label = "data synced before commit" if presync else "commit flushes the data"
                print(f"  [{label}]")
                print(f"    prepare {ms(med(prep))}   (max {ms(max(prep)).strip()})")
                print(
                    f"    commit  {ms(med(commit))}   (max {ms(max(commit)).strip()};"
                    f" {med(commit) / floor:.1f}x the fsync floor)"
                )
            print("  target: commit <= 2 ms")
            sn.close()


def bench_usage(files: int, reps: int) -> None:
    with scratch_fs("btrfs", "4G") as (mnt, desc):
        print(f"\n## usage of an active snapshot holding {files:,} files, quotas on ({desc})")
        sn = _open(mnt / "root", quota=True)
        fs = Path(sn.prepare("big")[0].source)
        per_dir = 500
        for d in range(files // per_dir):
            sub = fs / f"d{d}"
            sub.mkdir()
            for f in range(per_dir):
                (sub / f"f{f}").write_bytes(b"x" * ((f % 8) * 1024))
        walk: list[float] = []
        qgroup: list[float] = []
        for _ in range(reps * 3):
            walk.append(timed(lambda: disk_usage(fs)))
            qgroup.append(timed(lambda: sn.usage("big")))
        w, u = disk_usage(fs), sn.usage("big")
        print(f"  walk (disk_usage)        {ms(med(walk))}   size={w.size:,} inodes={w.inodes:,}")
        print(f"  usage() from the qgroup  {ms(med(qgroup))}   size={u.size:,} (exclusive bytes)")
        print(f"  ratio: {med(walk) / med(qgroup):,.0f}x faster than walking (target >= 50x)")
        # Right after writes usage commits the pending transaction (the writes' flush).
        (fs / "fresh").write_bytes(os.urandom(8 * MiB))
        t0 = time.perf_counter()
        after = sn.usage("big")
        dt = time.perf_counter() - t0
        print(
            f"  usage() right after writing 8 MiB {ms(dt).strip()} (+{after.size - u.size:,} bytes)"
        )
        sn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=50_000, help="files in the parent / active tree")
    ap.add_argument("--mb", type=int, default=300, help="MB of data in the parent")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (medians)")
    ap.add_argument(
        "--parts", default="prepare,commit,usage", help="which parts: prepare,commit,usage"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/btrfs.py needs root (loop filesystems, btrfs ioctls)")
    parts = set(args.parts.split(","))
    print(f"# btrfs backend benchmark (kernel {os.uname().release})")
    if "prepare" in parts:
        bench_prepare(args.files, args.mb, args.reps)
    if "commit" in parts:
        bench_commit()
    if "usage" in parts:
        bench_usage(args.files, args.reps)


if __name__ == "__main__":
    main()

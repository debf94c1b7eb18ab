"""Overlay backend: containerd's benchsuite shape, size-limited usage and prepare.

Run: ``.venv/bin/python benchmarks/overlay.py [--fs ext4]`` as root (mounts, loop
devices); it makes a fresh loop filesystem of that type for the root. Prints:

1. A 16-layer chain as containerd's snapshotter benchmark builds it: per
   layer prepare, mount, write ten 1 MiB files and rewrite 4 bytes in the
   middle of one from the layer below (a copy-up), unmount, commit. Median
   prepare, mount, unmount and commit times per layer, next to containerd's
   published ~1.5 ms per layer for its overlayfs. Commit flushes the
   layer's data (syncfs) before it records it; a second chain syncs first,
   to show what the commit costs on its own.
2. Usage of a size-limited active snapshot holding 50,000 files (statvfs of
   its image) against walking the same tree, as a ratio.
3. Prepare of a size-limited snapshot (sparse image, mkfs.ext4, a setup
   mount) against a plain prepare.

Figures and ratios, never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import fsync_floor, scratch_fs

from stratasnap import open_snapshotter
from stratasnap.backends.overlay import OverlaySnapshotter
from stratasnap.fs.mount import apply_mounts, unmount_all_under
from stratasnap.fs.overlay_image import make_ext4
from stratasnap.fs.usage import disk_usage, syncfs

MiB = 1 << 20
CONTAINERD_OVERLAY_MS = 1.5  # per layer, containerd#2988 benchsuite


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def med(values: list[float]) -> float:
    return statistics.median(values)


def chain(sn: OverlaySnapshotter, mnt: Path, prefix: str, presync: bool) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"prepare": [], "mount": [], "unmount": [], "commit": []}
    data = os.urandom(MiB)
    parent = ""
    for layer in range(16):
        key, name = f"{prefix}-a{layer}", f"{prefix}-{layer}"
        t0 = time.perf_counter()
        mounts = sn.prepare(key, parent)
        t1 = time.perf_counter()
        apply_mounts(mounts, mnt)
        t2 = time.perf_counter()
        for i in range(10):
            (mnt / f"l{layer}-f{i}").write_bytes(data)
        if layer:
            # Rewrite 4 bytes in the middle of a file of the layer below: a copy-up.
            with open(mnt / f"l{layer - 1}-f0", "r+b") as f:
                f.seek(MiB // 2)
                f.write(b"abcd")
        t3 = time.perf_counter()
        unmount_all_under(mnt)
        t4 = time.perf_counter()
        if presync:
            syncfs(sn.root)
        t5 = time.perf_counter()
        sn.commit(name, key)
        t6 = time.perf_counter()
        times["prepare"].append(t1 - t0)
        times["mount"].append(t2 - t1)
        times["unmount"].append(t4 - t3)
        times["commit"].append(t6 - t5)
        parent = name
    return times


def wait_for_loops(base: Path, timeout: float = 5.0) -> None:
    """Wait until no loop device holds an image under ``base``.

    An autoclear loop device lets go of its backing file a moment after the
    last unmount (the kernel finishes the detach asynchronously); leaving
    the scratch filesystem before that makes its unmount fail with EBUSY.
    """
    prefix = f"{base}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for f in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                busy = busy or f.read_text().startswith(prefix)
            except OSError:
                continue
        if not busy:
            return
        time.sleep(0.01)


def best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fs", default="ext4", help="filesystem of the root (ext4, xfs, tmpfs…)")
    ap.add_argument("--size", default="8G", help="of that scratch filesystem")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/overlay.py needs root (overlay mounts, loop devices)")
    with scratch_fs(args.fs, args.size) as (base, desc):
        print(f"# overlay benchmark on {desc}")
        sn = open_snapshotter(base / "root", "overlay")
        assert isinstance(sn, OverlaySnapshotter)
        mnt = Path(tempfile.mkdtemp(dir=base))
        floor = fsync_floor(base, writes=200)
        print(f"reference: one-row SQLite write transaction (fsync floor) {ms(floor).strip()}")

        print("\n## 16-layer chain (containerd benchsuite shape), median per layer")
        for presync in (False, True):
            t = chain(sn, mnt, "sync" if presync else "chain", presync)
            label = "data synced before commit" if presync else "commit flushes the data"
            print(f"[{label}]")
            for op in ("prepare", "mount", "unmount", "commit"):
                m = med(t[op])
                print(
                    f"  {op + ':':<9}{ms(m)}   (max {ms(max(t[op])).strip()};"
                    f" {m / floor:.1f}x the fsync floor)"
                )
            per_layer = med(t["prepare"]) + med(t["commit"])
            ratio = per_layer * 1000 / CONTAINERD_OVERLAY_MS
            print(
                f"  prepare+commit: {ms(per_layer).strip()}"
                f" = {ratio:.2f}x containerd's published {CONTAINERD_OVERLAY_MS} ms/layer"
            )

        print("\n## usage of a size-limited active snapshot with 50,000 files")
        sn.prepare("big", labels={"containerd.io/snapshot/max-size": str(2 << 30)})
        with sn._store.read() as tx:
            fs = sn.storage_dir(tx.get("big").id) / "fs"
        for d in range(100):
            sub = fs / f"d{d}"
            sub.mkdir()
            for f in range(500):
                (sub / f"f{f}").write_bytes(b"x" * ((f % 8) * 512))
        syncfs(fs)
        walk = best_of(lambda: disk_usage(fs), 3)
        stat = best_of(lambda: sn.usage("big"), 50)
        u, w = sn.usage("big"), disk_usage(fs)
        print(f"  walk (disk_usage):   {ms(walk)}   size={w.size:,} inodes={w.inodes:,}")
        print(f"  usage() via statvfs: {ms(stat)}   size={u.size:,} inodes={u.inodes:,}")
        print(f"  ratio: {walk / stat:,.0f}x faster than walking")
        t0 = time.perf_counter()
        sn.commit("big-c", "big")
        print(f"  commit (moves 50,000 files out of the image): {ms(time.perf_counter() - t0)}")

        print("\n## prepare of a size-limited snapshot")
        sn.prepare("p-a")
        sn.commit("p", "p-a")
        limited: list[float] = []
        plain: list[float] = []
        for i in range(10):
            t0 = time.perf_counter()
            sn.prepare(f"lim-{i}", "p", labels={"containerd.io/snapshot/max-size": str(1 << 30)})
            t1 = time.perf_counter()
            sn.prepare(f"plain-{i}", "p")
            t2 = time.perf_counter()
            limited.append(t1 - t0)
            plain.append(t2 - t1)
        mkfs: list[float] = []
        for i in range(5):
            t0 = time.perf_counter()
            make_ext4(base / f"ref-{i}.img", 1 << 30)
            mkfs.append(time.perf_counter() - t0)
            os.unlink(base / f"ref-{i}.img")
        print(f"  limited (1 GiB): {ms(med(limited))}   (max {ms(max(limited)).strip()})")
        print(
            f"  reference, mkfs.ext4 of the image alone: {ms(med(mkfs)).strip()}"
            f" (the whole prepare is {med(limited) / med(mkfs):.1f}x that)"
        )
        print(f"  plain:           {ms(med(plain))}")
        print(f"  ratio: {med(limited) / med(plain):.0f}x a plain prepare")
        t0 = time.perf_counter()
        for i in range(10):
            sn.remove(f"lim-{i}")
        t1 = time.perf_counter()
        reclaimed = sn.cleanup()
        t2 = time.perf_counter()
        print(
            f"  remove (async): {ms((t1 - t0) / 10).strip()} each;"
            f" cleanup of {len(reclaimed.paths)} paths: {ms(t2 - t1).strip()}"
        )
        sn.close()
        wait_for_loops(base)


if __name__ == "__main__":
    main()

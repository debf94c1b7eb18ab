"""Native backend: prepare on a big parent vs ``cp -a``, active usage vs ``du -s``.

Run as root: ``.venv/bin/python benchmarks/native.py [--files 50000] [--mb 300]``.
For each filesystem (a fresh ext4 loop filesystem, and xfs with reflink) it
builds a committed parent of N files / M MB inside the snapshotter, then
alternates, in one run: ``prepare(child, parent)`` (a full copy of the
parent) against ``cp -a`` of the same tree on the same filesystem (on xfs
also ``cp -a --reflink=never``), and ``usage()`` of an active snapshot
holding the tree against ``du -s``. Prints medians and ratios; never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import scratch_fs

from stratasnap import open_snapshotter


def make_tree(root: Path, files: int, total_mb: int) -> None:
    """``files`` files in directories of 25, sizes averaging total/files, some hard links."""
    avg = total_mb * 1024 * 1024 // files
    chunk = os.urandom(1 << 20)
    for i in range(files):
        d = root / f"d{i // 625:03d}" / f"s{(i // 25) % 25:02d}"
        if i % 25 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = (avg // 2) + (i * 7919) % avg  # between avg/2 and 1.5 avg
        off = (i * 4099) % (len(chunk) - size) if size < len(chunk) else 0
        (d / f"f{i}").write_bytes(chunk[off : off + size])
        if i % 500 == 0:
            os.symlink(f"f{i}", d / f"link{i}")


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_fs(fs_type: str, files: int, mb: int, reps: int) -> None:
    with scratch_fs(fs_type, "8G") as (mnt, desc):
        print(f"\n## {desc}: parent of {files:,} files, {mb} MB")
        sn = open_snapshotter(mnt / "root")
        src = Path(sn.prepare("parent-a")[0].source)
        make_tree(src, files, mb)
        sn.commit("parent", "parent-a")
        parent_dir = Path(sn.view("pv", "parent")[0].source)
        times: dict[str, list[float]] = {"prepare": [], "cp -a": []}
        if fs_type.startswith("xfs"):
            times["cp -a --reflink=never"] = []
        for r in range(reps):
            times["prepare"].append(timed(lambda r=r: sn.prepare(f"child-{r}", "parent")))
            dst = mnt / f"cp-{r}"
            times["cp -a"].append(
                timed(
                    lambda dst=dst: subprocess.run(
                        ["cp", "-a", str(parent_dir), str(dst)], check=True
                    )
                )
            )
            if "cp -a --reflink=never" in times:
                dst2 = mnt / f"cpn-{r}"
                times["cp -a --reflink=never"].append(
                    timed(
                        lambda dst2=dst2: subprocess.run(
                            ["cp", "-a", "--reflink=never", str(parent_dir), str(dst2)], check=True
                        )
                    )
                )
                shutil.rmtree(dst2)
            shutil.rmtree(dst)
            sn.remove(f"child-{r}")
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:<24} {v * 1000:>9.0f} ms   ratio to prepare: {v / med['prepare']:.2f}x")
        print(f"prepare / cp -a = {med['prepare'] / med['cp -a']:.2f} (target <= 1.2)")
        if "cp -a --reflink=never" in med:
            print(
                f"cp -a --reflink=never / prepare = "
                f"{med['cp -a --reflink=never'] / med['prepare']:.1f}x (target >= 10x)"
            )

        # usage of an active snapshot holding the tree vs du -s
        sn.prepare("active", "parent")
        active_dir = Path(sn.mounts("active")[0].source)
        u_times, du_times = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            usage = sn.usage("active")
            u_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = subprocess.run(
                ["du", "-s", "-B1", str(active_dir)], capture_output=True, text=True, check=True
            ).stdout
            du_times.append(time.perf_counter() - t0)
        du_bytes = int(out.split()[0])
        u, d = statistics.median(u_times), statistics.median(du_times)
        found = f"{usage.size:,} bytes, {usage.inodes:,} inodes"
        print(f"usage(active)            {u * 1000:>9.0f} ms   ({found})")
        print(f"du -s                    {d * 1000:>9.0f} ms   ({du_bytes:,} bytes)")
        print(f"usage / du -s = {u / d:.2f} (target <= 1.5); same bytes: {usage.size == du_bytes}")
        sn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fs", nargs="*", default=["ext4", "xfs-reflink"])
    args = ap.parse_args()
    print("# native backend benchmark")
    for fs_type in args.fs:
        bench_fs(fs_type, args.files, args.mb, args.reps)


if __name__ == "__main__":
    main()

"""Blockfile backend: prepare on a 10 GiB parent image holding 1 GiB, vs ``cp``.

Run as root: ``.venv/bin/python benchmarks/blockfile.py [--gib 1] [--reps 5] [--disk]``.
For each host filesystem (a fresh xfs with reflink, btrfs, ext4: loop
filesystems this script makes, their images on tmpfs unless ``--disk``) it
builds, inside the snapshotter, a committed parent whose 10 GiB ext4 image
holds ``--gib`` GiB of data, then alternates in one run:

- ``prepare(child, parent)``: a copy of the parent's image, reflinked where
  the host can, else sparse (data extents only), fsynced; and the copier it
  uses (``stratasnap.fs.copy.copy_file``) alone, without the fsync;
- ``cp --sparse=always`` of the same image, and the same followed by an
  fsync of the copy (prepare fsyncs, so that is the like-for-like figure);
- on xfs/btrfs, ``cp --reflink=always``;
- ``prepare`` with a size label that grows the image to 20 GiB.

Prints medians and ratios; never pass/fail. Targets (issue 4): reflink
prepare <= 20 ms; sparse prepare on ext4 no slower than cp --sparse=always.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _rounds import rotated
from _scratch import scratch_fs

from stratasnap.backends.blockfile import BlockfileSnapshotter
from stratasnap.backends.blockfile_config import SIZE_BYTES_LABEL
from stratasnap.fs.copy import copy_file
from stratasnap.testing.conformance import mounted

GiB = 1 << 30
MiB = 1 << 20


def timed(fn: Callable[[], object]) -> float:
    os.sync()  # the last step's writeback is not this step's cost
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def build_parent(sn: BlockfileSnapshotter, mnt: Path, gib: int) -> Path:
    """Commit a snapshot holding ``gib`` GiB of data; return its image (commit keeps it)."""
    chunk = os.urandom(4 * MiB)
    mounts = sn.prepare("parent-a")
    with mounted(mounts, mnt) as root, open(root / "data", "wb") as f:
        for _ in range(gib * GiB // len(chunk)):
            f.write(chunk)
    sn.commit("parent", "parent-a")
    return Path(mounts[0].source)


@contextmanager
def ram_fs(fs_type: str, size: str) -> Iterator[tuple[Path, str]]:
    """A fresh loop filesystem whose image lives on tmpfs (in RAM).

    This VM's disk is shared with other workloads, and writeback of a GiB
    to it takes 0.4 to 4 s from one run to the next; with the host image in
    RAM, fsync still goes through the loop device but not to that disk.
    """
    base = Path(tempfile.mkdtemp(prefix=f"stratasnap-bench-bf-{fs_type}-"))
    mnt = base / "mnt"
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16g", "tmpfs", str(base)], check=True)
        mnt.mkdir()
        image = base / "fs.img"
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        mkfs = {
            "ext4": ["mkfs.ext4", "-q", "-F", "-m", "0"],
            "xfs-reflink": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
            "btrfs": ["mkfs.btrfs", "-q", "-f"],
        }[fs_type]
        subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        yield mnt, f"fresh {fs_type} loop filesystem ({size}, image on tmpfs)"
    finally:
        subprocess.run(["umount", "-R", str(mnt)], capture_output=True)
        subprocess.run(["umount", str(base)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def bench_fs(fs_type: str, gib: int, reps: int, disk: bool) -> dict[str, float]:
    reflink = fs_type in ("xfs-reflink", "btrfs")
    host = scratch_fs if disk else ram_fs
    with host(fs_type, "24G") as (mnt, desc):
        sn = BlockfileSnapshotter(mnt / "root")  # default template: 10 GiB ext4
        try:
            parent = build_parent(sn, mnt, gib)
            st = os.stat(parent)
            print(
                f"\n## {desc}: parent image {st.st_size / GiB:.0f} GiB,"
                f" {st.st_blocks * 512 / GiB:.2f} GiB allocated"
            )
            dst = mnt / "cp.img"

            def cp(*flags: str) -> Callable[[], object]:
                return lambda: subprocess.run(["cp", *flags, str(parent), str(dst)], check=True)

            def cp_sync() -> None:
                cp("--sparse=always")()
                fsync_file(dst)

            grow = {SIZE_BYTES_LABEL: str(20 * GiB)}
            # name -> (the timed step, what undoes it untimed)
            steps: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
                "prepare": (lambda: sn.prepare("child", "parent"), lambda: sn.remove("child")),
                "copy_file alone (no fsync)": (lambda: copy_file(parent, dst), dst.unlink),
                "cp --sparse=always": (cp("--sparse=always"), dst.unlink),
                "cp --sparse=always + fsync": (cp_sync, dst.unlink),
                "prepare, no parent (template)": (
                    lambda: sn.prepare("fresh"),
                    lambda: sn.remove("fresh"),
                ),
                "prepare + grow to 20 GiB": (
                    lambda: sn.prepare("grown", "parent", labels=grow),
                    lambda: sn.remove("grown"),
                ),
            }
            if reflink:
                steps["cp --reflink=always"] = (cp("--reflink=always"), dst.unlink)
            times: dict[str, list[float]] = {name: [] for name in steps}
            names = list(steps)
            for r in range(reps):
                # Each rep starts at another step, so that no step always
                # follows the same one (and its deferred frees and writeback).
                for name in rotated(names, r):
                    step, undo = steps[name]
                    times[name].append(timed(step))
                    undo()
        finally:
            sn.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:34s} {ms(v)}   (runs: {', '.join(f'{t * 1000:.1f}' for t in times[k])})")
    base = med["prepare"]
    print(f"  prepare / cp --sparse=always         {base / med['cp --sparse=always']:6.2f}x")
    print(
        f"  prepare / cp --sparse=always + fsync {base / med['cp --sparse=always + fsync']:6.2f}x"
    )
    if reflink:
        print(f"  prepare / cp --reflink=always        {base / med['cp --reflink=always']:6.2f}x")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=int, default=1, help="data in the parent image (GiB)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--disk", action="store_true", help="host filesystem images on the root disk, not tmpfs"
    )
    ap.add_argument(
        "--fs", nargs="*", default=["xfs-reflink", "btrfs", "ext4"], help="host filesystems"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: loop filesystems and mounts")
    print(f"# blockfile prepare: 10 GiB ext4 parent image holding {args.gib} GiB; medians")
    results = {fs: bench_fs(fs, args.gib, args.reps, args.disk) for fs in args.fs}
    if "ext4" in results and len(results) > 1:
        sparse = results["ext4"]["prepare"]
        print("\n## reflink vs sparse copy (prepare on xfs/btrfs vs prepare on ext4)")
        for fs, med in results.items():
            if fs != "ext4":
                print(f"  {fs:12s} {ms(med['prepare'])}  = {sparse / med['prepare']:7.1f}x faster")


if __name__ == "__main__":
    main()

"""erofs backend: image builds, disk use, removal, cold reads, open time; against overlay.

Run: ``.venv/bin/python benchmarks/erofs.py`` as root (mounts, loop devices,
drop_caches). Everything runs on a fresh ext4 loop filesystem (``--fs``),
where EROFS images are mounted from the file itself (Linux 6.12+). Parts
(``--only``), each alternating the compared cases rep by rep:

1. ``compress``: ``mkfs.erofs`` of one generated layer (``--files`` files,
   sizes averaging ``--mean-size``, half random and half repeated bytes,
   like tests/e2e/oci.py's images; or a copy of ``--tree``, real files)
   with compression none, lz4 and lz4hc:
   build time and image size against the tree's own allocated size. This
   is what picks the default compression.
2. ``remove``: remove + cleanup of a committed layer of that tree, overlay
   backend (a walk deleting every file) against erofs (unmount, unlink).
3. ``coldread``: read every file of a 3-layer container rootfs (an active
   snapshot on the top layer, mounted as containerd would) right after
   ``echo 3 > /proc/sys/vm/drop_caches``: overlay backend against erofs.
4. ``open``: a store of ``--open-layers`` committed layers after a
   "reboot" (every image unmounted): open as shipped (images mounted on
   first use), open plus mounting every image (the alternative), and the
   first prepare on one layer.
5. ``containerd``: import + unpack of the large image through one private
   containerd (benchmarks/containerd.py's stack) with its built-in
   ``overlayfs``, ``ss-overlay`` and ``ss-erofs`` (default compression),
   then the disk the unpacked layers take (``du -x``: image files, not
   their mounted contents).

Figures and ratios, never pass/fail. The machine may be shared: the load
average is printed at the start and end.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/grpc.py would shadow the grpc package: import the real one first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402, F401

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from _scratch import scratch_fs  # noqa: E402

from stratasnap import open_snapshotter  # noqa: E402
from stratasnap.backends.erofs import ErofsSnapshotter  # noqa: E402
from stratasnap.fs.erofs_image import COMPRESSIONS, ZTAILPACKING, build_image  # noqa: E402
from stratasnap.fs.mount import apply_mounts, unmount_all_under  # noqa: E402
from stratasnap.snapshotter import BaseSnapshotter  # noqa: E402

MiB = 1 << 20


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float], unit: float = 1.0, fmt: str = "{:.2f}") -> str:
    return (
        f"{fmt.format(med(xs) * unit)} ({fmt.format(min(xs) * unit)}-{fmt.format(max(xs) * unit)})"
    )


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def du_x(path: Path) -> int:
    """Allocated bytes under ``path`` on its own filesystem (not through mounts)."""
    out = subprocess.run(["du", "-sxB1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def write_tree(root: Path, files: int, mean_size: int, seed: int) -> int:
    """Generated files under ``root``; returns how many bytes of file data."""
    rng = random.Random(seed)
    pool = rng.randbytes(MiB)
    total = 0
    for i in range(files):
        d = root / f"d{i // 1000:03d}" / f"e{(i // 100) % 10}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = min(int(rng.expovariate(1 / mean_size)), MiB)
        half = size // 2
        off = rng.randrange(0, len(pool) - half)
        (d / f"f{i:06d}").write_bytes(pool[off : off + half] + bytes([i % 251]) * (size - half))
        total += size
    return total


def read_all(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    while chunk := f.read(MiB):
                        total += len(chunk)
    return total


@contextmanager
def store(path: Path, backend: str, **options: object) -> Iterator[BaseSnapshotter]:
    sn = open_snapshotter(path, backend, **options)
    try:
        yield sn
    finally:
        sn.close()
        unmount_all_under(path)
        shutil.rmtree(path, ignore_errors=True)


def committed_layer(
    sn: BaseSnapshotter, mnt: Path, name: str, parent: str, fill: Callable[[Path], object]
) -> None:
    mounts = sn.prepare(f"{name}-a", parent)
    apply_mounts(mounts, mnt)
    try:
        fill(mnt)
    finally:
        unmount_all_under(mnt)
    sn.commit(name, f"{name}-a")


# -- 1. compression ----------------------------------------------------------------------


def bench_compress(base: Path, args: argparse.Namespace) -> list[str]:
    tree = base / "tree"
    if args.tree:
        # Real files (say /usr): copied first, so the source's filesystem is ours.
        subprocess.run(["cp", "-a", str(args.tree), str(tree)], check=True)
        what = f"a copy of {args.tree}"
    else:
        data = write_tree(tree, args.files, args.mean_size, 1)
        what = f"{args.files:,} generated files, {data / 1e6:.0f} MB of data"
    os.sync()
    allocated = du_x(tree)
    print(f"# tree: {what}, {allocated / 1e6:.0f} MB allocated")
    times: dict[str, list[float]] = {c: [] for c in COMPRESSIONS}
    sizes: dict[str, int] = {}
    for rep in range(args.reps):
        order = list(COMPRESSIONS) if rep % 2 == 0 else list(COMPRESSIONS)[::-1]
        for c in order:
            image = base / f"img-{c}.erofs"
            t0 = time.perf_counter()
            # The backend's arguments (inline compressed tails where the kernel can),
            # fsynced and digested: what a commit pays.
            built = build_image(tree, image, c, (ZTAILPACKING,) if c != "none" else ())
            times[c].append(time.perf_counter() - t0)
            sizes[c] = built.allocated
            image.unlink()
            print(
                f"  rep {rep + 1}: {c:<6} {times[c][-1]:6.2f} s {built.allocated / 1e6:7.0f} MB",
                flush=True,
            )
    shutil.rmtree(tree)
    out = [
        "",
        f"{'compression':<14}{'build (mkfs+fsync+sha256), s':>32}{'image, MB':>12}{'vs tree':>9}",
    ]
    for c in COMPRESSIONS:
        out.append(
            f"{c:<14}{spread(times[c]):>32}{sizes[c] / 1e6:>12.0f}{sizes[c] / allocated:>8.2f}x"
        )
    return out


# -- 2. remove + cleanup ------------------------------------------------------------------


def bench_remove(base: Path, args: argparse.Namespace) -> list[str]:
    mnt = base / "mnt-rm"
    mnt.mkdir(exist_ok=True)
    times: dict[str, list[float]] = {"overlay": [], "erofs": []}
    for rep in range(args.reps):
        order = ["overlay", "erofs"] if rep % 2 == 0 else ["erofs", "overlay"]
        for backend in order:
            with store(base / f"rm-{backend}", backend) as sn:
                committed_layer(
                    sn, mnt, "layer", "", lambda r: write_tree(r, args.files, args.mean_size, 2)
                )
                os.sync()
                t0 = time.perf_counter()
                sn.remove("layer")
                sn.cleanup()
                times[backend].append(time.perf_counter() - t0)
            print(
                f"  rep {rep + 1}: {backend:<8} remove+cleanup {times[backend][-1] * 1e3:8.1f} ms",
                flush=True,
            )
    ratio = med(times["overlay"]) / med(times["erofs"])
    return [
        "",
        f"{'':<10}{'remove+cleanup, ms':>26}",
        *(f"{b:<10}{spread(xs, 1e3, '{:.0f}'):>26}" for b, xs in times.items()),
        f"  erofs is {ratio:.1f}x faster (target >= 3x)",
    ]


# -- 3. cold reads ------------------------------------------------------------------------


def bench_coldread(base: Path, args: argparse.Namespace) -> list[str]:
    mnt = base / "mnt-read"
    mnt.mkdir(exist_ok=True)
    backends = ["overlay", "erofs"]
    times: dict[str, list[float]] = {b: [] for b in backends}
    stores = {b: open_snapshotter(base / f"read-{b}", b) for b in backends}
    try:
        for sn in stores.values():
            parent = ""
            for n in range(3):
                committed_layer(
                    sn,
                    mnt,
                    f"l{n}",
                    parent,
                    lambda r, n=n: write_tree(
                        r / f"data{n}", args.files // 3, args.mean_size, 10 + n
                    ),
                )
                parent = f"l{n}"
            sn.prepare("rootfs", parent)
        nbytes = 0
        for rep in range(args.reps):
            for b in backends if rep % 2 == 0 else backends[::-1]:
                apply_mounts(stores[b].mounts("rootfs"), mnt)
                try:
                    drop_caches()
                    t0 = time.perf_counter()
                    nbytes = read_all(mnt)
                    times[b].append(time.perf_counter() - t0)
                finally:
                    unmount_all_under(mnt)
                print(f"  rep {rep + 1}: {b:<8} {times[b][-1]:6.2f} s", flush=True)
    finally:
        for b, sn in stores.items():
            sn.close()
            unmount_all_under(base / f"read-{b}")
    ratio = med(times["erofs"]) / med(times["overlay"])
    return [
        "",
        f"{'':<10}{f'read all ({nbytes / 1e6:.0f} MB) cold, s':>30}",
        *(f"{b:<10}{spread(xs):>30}" for b, xs in times.items()),
        f"  erofs/overlay: {ratio:.2f}x (target <= 1.3x)",
    ]


# -- 4. open time ------------------------------------------------------------------------


def bench_open(base: Path, args: argparse.Namespace) -> list[str]:
    root = base / "open"
    n = args.open_layers
    t0 = time.perf_counter()
    with open_snapshotter(root, "erofs") as sn:
        for i in range(n):
            [bind] = sn.prepare(f"a{i}")
            (Path(bind.source) / "f").write_text(str(i))
            sn.commit(f"l{i}", f"a{i}")
    print(f"# {n} one-file layers committed in {time.perf_counter() - t0:.1f} s", flush=True)
    lazy: list[float] = []
    eager: list[float] = []
    first: list[float] = []
    for rep in range(args.reps):
        for mode in ("lazy", "eager") if rep % 2 == 0 else ("eager", "lazy"):
            unmount_all_under(root / "snapshots")  # a reboot
            t0 = time.perf_counter()
            sn = open_snapshotter(root, "erofs")
            assert isinstance(sn, ErofsSnapshotter)
            if mode == "eager":
                sn.mount_layers()
                eager.append(time.perf_counter() - t0)
            else:
                lazy.append(time.perf_counter() - t0)
                t1 = time.perf_counter()
                sn.prepare(f"first-{rep}", f"l{n // 2}")
                first.append(time.perf_counter() - t1)
                sn.remove(f"first-{rep}")
            sn.close()
    unmount_all_under(root)
    return [
        "",
        f"{n} committed layers, after a reboot (no image mounted)",
        f"  open (images mounted on first use):   {spread(lazy, 1e3, '{:.0f}')} ms",
        f"  open + mount every image:             {spread(eager, 1e3, '{:.0f}')} ms",
        f"  then the first prepare on one layer:  {spread(first, 1e3, '{:.1f}')} ms",
    ]


# -- 5. through containerd ----------------------------------------------------------------


def bench_containerd(base: Path, args: argparse.Namespace) -> list[str]:
    from containerd import BIG, PREFIX, Bench, MultiStack, warm
    from e2e.oci import generated_layers, write_oci_archive

    archive = base / "big.tar"
    layers = generated_layers(3, args.files // 3, args.mean_size)
    info = write_oci_archive(archive, BIG, layers, compresslevel=1)
    raw = sum(layer.bytes for layer in layers)
    del layers
    print(
        f"# image: 3 layers, {args.files:,} files, {raw / 1e6:.0f} MB, "
        f"{info.size / 1e6:.0f} MB compressed"
    )
    stack = MultiStack(
        base / "stack", ["erofs", "overlay"], {}, namespace="bench", log_level="info"
    )
    snaps = ["overlayfs", PREFIX + "overlay", PREFIX + "erofs"]
    roots = {
        "overlayfs": stack.cd_root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots",
        PREFIX + "overlay": stack.ss_root.parent / f"{PREFIX}overlay" / "snapshots",
        PREFIX + "erofs": stack.ss_root.parent / f"{PREFIX}erofs" / "snapshots",
    }
    times: dict[str, list[float]] = {s: [] for s in snaps}
    disk: dict[str, int] = {}
    try:
        stack.start()
        bench = Bench(stack, snaps, 3)
        bench.ctr("bench-content", "images", "import", "--no-unpack", str(archive))
        for rep in range(args.reps):
            for snap in snaps if rep % 2 == 0 else snaps[::-1]:
                ns = f"big-{snap}-{rep}"
                warm(archive)
                times[snap].append(
                    bench.ctr(ns, "images", "import", "--snapshotter", snap, str(archive))
                )
                os.sync()
                disk[snap] = du_x(roots[snap])
                bench.ctr(ns, "images", "rm", "--sync", BIG)
                print(
                    f"  rep {rep + 1}: {snap:<12} import+unpack {times[snap][-1]:6.2f} s, "
                    f"layers {disk[snap] / 1e6:6.0f} MB",
                    flush=True,
                )
    finally:
        stack.close()
    ref_t, ref_d = med(times["overlayfs"]), disk["overlayfs"]
    out = [
        "",
        f"{'':<14}{'import+unpack, s':>22}{'ratio':>8}{'layers on disk, MB':>20}{'ratio':>8}",
    ]
    for s in snaps:
        out.append(
            f"{s:<14}{spread(times[s]):>22}{med(times[s]) / ref_t:>7.2f}x"
            f"{disk[s] / 1e6:>20.0f}{disk[s] / ref_d:>7.2f}x"
        )
    out.append("  targets (ss-erofs vs overlayfs): import+unpack <= 1.5x, disk <= 0.6x")
    return out


PARTS: dict[str, Callable[[Path, argparse.Namespace], list[str]]] = {
    "compress": bench_compress,
    "remove": bench_remove,
    "coldread": bench_coldread,
    "open": bench_open,
    "containerd": bench_containerd,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--files", type=int, default=30_000, help="files in the layer tree / image")
    ap.add_argument("--mean-size", type=int, default=10_000, help="mean file size, bytes")
    ap.add_argument("--reps", type=int, default=3, help="runs per compared case")
    ap.add_argument("--open-layers", type=int, default=1000)
    ap.add_argument("--tree", type=Path, help="compress: a real directory to build images of")
    ap.add_argument("--only", choices=list(PARTS), action="append", help="run only these parts")
    ap.add_argument("--fs", default="ext4")
    ap.add_argument("--size", default="12G", help="of the scratch filesystem")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/erofs.py mounts images and drops caches: run it as root")
    results: list[str] = []
    with scratch_fs(args.fs, args.size) as (mnt, desc):
        print(f"# erofs benchmark on {desc}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        for name in args.only or list(PARTS):
            print(f"\n## {name}", flush=True)
            results += [f"\n### {name}", *PARTS[name](mnt, args)]
    print("\n## results (median, min-max)")
    print("\n".join(results))
    print(f"\n# load average at the end: {os.getloadavg()[0]:.2f} (the machine is shared)")


if __name__ == "__main__":
    main()

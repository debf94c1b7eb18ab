"""Layer tar -> EROFS image: stratasnap's streaming converter against mkfs.erofs.

Run: ``.venv/bin/python benchmarks/erofs_convert.py`` as root (it makes a fresh
ext4 loop filesystem; ``--help`` for options). It builds a layer tar on that
filesystem: ``--content random`` (default: 300 MB of incompressible data in
30,000 files, 300 directories, symlinks, hard links), ``--content real``
(300 MB of this machine's /usr: binaries, libraries, Python sources, docs and
data, headers: what compression sees in a real layer), or ``--tar`` to use a given one. Then it
times, alternated round by round, each ending with the image fsynced:

1. ``stratasnap``: ``convert_tar`` reading the tar once, writing the image;
   with ``--compression``, also ``stratasnap lz4`` (and ``lz4hc``).
2. ``mkfs.erofs``: ``mkfs.erofs -Enoinline_data`` (as containerd's erofs
   snapshotter runs it) from the layer already extracted (extraction not
   timed): the best case of the extract-then-convert path; with
   ``--compression``, also ``mkfs.erofs -zlz4`` (and ``-zlz4hc``).
3. ``tar+mkfs``: GNU tar extraction to a fresh directory, then the same mkfs:
   what a host without ``mkfs.erofs --tar`` (erofs-utils < 1.7) pays.

Prints MB/s of tar for each, the image size against the tar, the ratios, the
converter's peak RSS when run as a separate process, and with
``--compression`` the time to read every file back through a fresh mount. Figures and ratios,
never pass/fail; on a shared machine, read the ratios, not the absolute figures.

Does lz4 pay? On ``--content real`` (367 MB of /usr; this machine, shared, 2
CPUs; figures in the README): the lz4 image is 0.58x the uncompressed one,
written at 0.56x the uncompressed converter's speed (2.6x its CPU, on two
worker threads: as fast as ``mkfs.erofs -zlz4`` on an extracted tree) and read
back at 0.7x. It pays where disk or the bytes shipped matter; ``none`` stays
the default where conversion time matters most. On incompressible data nothing
is compressed and the image is the uncompressed one, for 1.8x the CPU. lz4hc
saves 8% more for 3.6x lz4's CPU: only for images built once and kept long.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import scratch_fs

from stratasnap.erofs import convert_tar
from stratasnap.fs.erofs_image import mount_image
from stratasnap.fs.mount import unmount

MB = 1_000_000


def make_tar(path: Path, total_mb: int, files: int, seed: int = 1) -> None:
    """A rootfs-like layer: many small files, a few large ones, links; incompressible data."""
    rng = random.Random(seed)
    pool = rng.randbytes(32 << 20)
    # Sizes in a rootfs are heavy-tailed: most files are small, a few hold most bytes.
    weights = [rng.paretovariate(1.2) for _ in range(files)]
    scale = total_mb * MB / sum(weights)
    sizes = [min(int(w * scale), 24 << 20) for w in weights]
    dirs = [f"usr/d{i // 30:02d}/s{i % 30:02d}" for i in range(300)]
    with (
        path.open("wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        for d in ["usr", *sorted({d.rsplit("/", 1)[0] for d in dirs}), *dirs]:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for i, size in enumerate(sizes):
            ti = tarfile.TarInfo(f"{dirs[i % len(dirs)]}/file-{i:06d}.bin")
            ti.size, ti.mode, ti.mtime = size, 0o644 if i % 7 else 0o755, 1_700_000_000
            start = rng.randrange(0, len(pool) - size) if size < len(pool) else 0
            tf.addfile(ti, io.BytesIO(pool[start : start + size]))
            if i % 100 == 0:
                link = tarfile.TarInfo(f"{dirs[i % len(dirs)]}/link-{i:06d}")
                link.type, link.linkname, link.mode = tarfile.SYMTYPE, f"file-{i:06d}.bin", 0o777
                tf.addfile(link)
            if i % 1000 == 1:
                hard = tarfile.TarInfo(f"{dirs[i % len(dirs)]}/hard-{i:06d}")
                hard.type, hard.linkname = tarfile.LNKTYPE, ti.name
                tf.addfile(hard)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


REAL_TREES = ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/lib/python3", "usr/share", "usr/include")


def make_real_tar(path: Path, total_mb: int) -> None:
    """A layer of this machine's files: an equal share of ``total_mb`` from each of
    ``REAL_TREES`` (binaries, libraries, Python sources, docs and data, headers)."""
    listed: list[str] = []
    share = total_mb * MB // len(REAL_TREES)
    for top in REAL_TREES:
        taken = 0
        for dirpath, dirnames, filenames in os.walk(Path("/") / top):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if taken >= share or full.is_symlink() or not full.is_file():
                    continue
                listed.append(str(full.relative_to("/")))
                taken += full.stat().st_size
            if taken >= share:
                break
    files = path.with_suffix(".list")
    files.write_text("\n".join(listed) + "\n")
    subprocess.run(
        ["tar", "--format=pax", "-cf", str(path), "-C", "/", "-T", str(files)], check=True
    )
    files.unlink()


def run_ours(tar: Path, image: Path, compression: str = "none") -> None:
    with tar.open("rb", buffering=1 << 20) as f:
        convert_tar(f, image, compression=compression)


def run_mkfs(src: Path, image: Path, compression: str = "none") -> None:
    z = [f"-z{compression}"] if compression != "none" else []
    subprocess.run(
        ["mkfs.erofs", "--quiet", *z, "-Enoinline_data", str(image), str(src)], check=True
    )
    fsync_file(image)


def run_tar_mkfs(tar: Path, work: Path, image: Path) -> None:
    work.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--numeric-owner", "-xpf", str(tar), "-C", str(work)], check=True
    )
    run_mkfs(work, image)


Variant = tuple[Callable[[int], None], Callable[[int], Path]]


def compressed_variant(
    run: Callable[[Path, Path, str], None], src: Path, mnt: Path, tag: str, compression: str
) -> Variant:
    """(run round r, the image of round r) for ``run(src, image, compression)``."""

    def image(r: int) -> Path:
        return mnt / f"{tag}-{compression}-{r}.erofs"

    return (lambda r: run(src, image(r), compression)), image


def read_tree(image: Path, mnt: Path) -> float:
    """Seconds to read every file of ``image`` through a fresh mount.

    The image file itself is in the page cache (just written), and a new mount
    starts with empty caches of its own: this times what the kernel does per
    byte read (copying, or decompressing), not the disk.
    """
    mnt.mkdir(exist_ok=True)
    mount_image(image, mnt)
    buf = bytearray(1 << 20)
    try:
        t0 = time.perf_counter()
        for dirpath, _dirs, files in os.walk(mnt):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
        return time.perf_counter() - t0
    finally:
        unmount(mnt)


def cpu_seconds() -> float:
    """User+sys CPU of this process and of its finished children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb(tar: Path, image: Path) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of ``stratasnap erofs convert - IMAGE`` fed by a pipe."""
    cmd = [sys.executable, "-m", "stratasnap", "erofs", "convert", "-", str(image), "--json"]
    t0 = time.perf_counter()
    cat = subprocess.Popen(["cat", str(tar)], stdout=subprocess.PIPE)
    proc = subprocess.Popen(cmd, stdin=cat.stdout, stdout=subprocess.PIPE)
    assert cat.stdout is not None
    cat.stdout.close()
    out, _ = proc.communicate()
    cat.wait()
    if proc.returncode != 0:
        raise SystemExit(f"converter failed with {proc.returncode}")
    return json.loads(out)["peak_rss_kib"] / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tar", type=Path, help="use this (uncompressed) layer tar instead of a synthetic one"
    )
    ap.add_argument(
        "--content",
        choices=("random", "real"),
        default="random",
        help="synthetic tar: incompressible data (default), or real files from /usr",
    )
    ap.add_argument(
        "--compression",
        choices=("none", "lz4", "lz4hc"),
        default="none",
        help="also time the converter and mkfs.erofs with lz4 (lz4hc: with lz4 and lz4hc)",
    )
    ap.add_argument("--size-mb", type=int, default=300, help="synthetic tar: data MB (default 300)")
    ap.add_argument(
        "--files", type=int, default=30_000, help="synthetic tar: files (default 30000)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    ap.add_argument("--fs-size", default="6G", help="loop ext4 size (default 6G)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one converter run")
    args = ap.parse_args()
    if shutil.which("mkfs.erofs") is None:
        raise SystemExit("mkfs.erofs (erofs-utils) is needed for the reference")
    with scratch_fs("ext4", args.fs_size) as (mnt, desc):
        tar = mnt / "layer.tar"
        if args.tar:
            shutil.copyfile(args.tar, tar)
        elif args.content == "real":
            make_real_tar(tar, args.size_mb)
        else:
            make_tar(tar, args.size_mb, args.files)
        tar_mb = tar.stat().st_size / MB
        extracted = mnt / "extracted"
        extracted.mkdir()
        subprocess.run(
            ["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(extracted)], check=True
        )
        version = subprocess.run(
            ["mkfs.erofs", "-V"], capture_output=True, text=True
        ).stdout.strip()
        first = version.splitlines()[0] if version else "mkfs.erofs"
        print(f"filesystem: {desc}; tar: {tar_mb:.0f} MB; {first}")
        print(
            f"machine: {os.cpu_count()} CPUs, shared with other work (read ratios, not absolutes)"
        )
        # name -> (run it for round r, the image it wrote)
        variants: dict[str, Variant] = {
            "stratasnap": (
                lambda r: run_ours(tar, mnt / f"ours-{r}.erofs"),
                lambda r: mnt / f"ours-{r}.erofs",
            ),
            "mkfs.erofs (pre-extracted)": (
                lambda r: run_mkfs(extracted, mnt / f"mkfs-{r}.erofs"),
                lambda r: mnt / f"mkfs-{r}.erofs",
            ),
            "tar -x + mkfs.erofs": (
                lambda r: run_tar_mkfs(tar, mnt / f"x-{r}", mnt / f"tm-{r}.erofs"),
                lambda r: mnt / f"tm-{r}.erofs",
            ),
        }
        compressors = {"none": [], "lz4": ["lz4"], "lz4hc": ["lz4", "lz4hc"]}[args.compression]
        for z in compressors:
            variants[f"stratasnap {z}"] = compressed_variant(run_ours, tar, mnt, "ours", z)
            variants[f"mkfs.erofs -z{z} (pre-extr.)"] = compressed_variant(
                run_mkfs, extracted, mnt, "mkfs", z
            )
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        sizes: dict[str, int] = {}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                os.sync()
                c0 = cpu_seconds()
                t0 = time.perf_counter()
                variants[name][0](r)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
                sizes[name] = variants[name][1](r).stat().st_size
            for p in mnt.iterdir():  # keep the filesystem from filling up
                if p.name not in ("layer.tar", "extracted", "lost+found", "layer.list"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        ours = statistics.median(times["stratasnap"])
        head = (
            f"{'variant':29} {'wall s':>7} {'MB/s':>5} {'x ours':>6} {'CPU s':>6} {'MB/CPU-s':>8}"
            f" {'image MB':>8} {'x tar':>5}"
        )
        print(f"{head}   wall of each run")
        for name, ts in times.items():
            med = statistics.median(ts)
            runs = " ".join(f"{t:.2f}" for t in ts)
            c = statistics.median(cpu[name])
            print(
                f"{name:29} {med:7.2f} {tar_mb / med:5.0f} {med / ours:6.2f} {c:6.2f} "
                f"{tar_mb / c:8.0f} {sizes[name] / MB:8.0f} {sizes[name] / MB / tar_mb:5.2f}"
                f"   {runs}"
            )
        print("(medians; wall includes the fsync; CPU s: user+sys of the process(es) doing")
        print(" the work, less sensitive than wall to other work on a shared machine;")
        print(" x ours: wall against the uncompressed converter; x tar: image size / tar size)")
        if compressors:
            # Reading back: the images of the last round, alternated.
            readers = {"stratasnap": mnt / f"ours-{args.rounds - 1}.erofs"}
            for z in compressors:
                readers[f"stratasnap {z}"] = mnt / f"ours-{z}-{args.rounds - 1}.erofs"
            for name, image in readers.items():  # build them again: they were removed
                run_ours(tar, image, name.split()[1] if " " in name else "none")
            reads: dict[str, list[float]] = {k: [] for k in readers}
            for r in range(args.rounds):
                for name in readers if r % 2 == 0 else reversed(readers):
                    reads[name].append(read_tree(readers[name], mnt / "read-mnt"))
            plain = statistics.median(reads["stratasnap"])
            print("reading every file through a fresh mount (image file in the page cache):")
            for name, ts in reads.items():
                med = statistics.median(ts)
                runs = " ".join(f"{t:.2f}" for t in ts)
                print(
                    f"  {name:27} {med:6.2f} s {tar_mb / med:6.0f} MB/s "
                    f"{med / plain:5.2f}x   {runs}"
                )
        rss, secs = peak_rss_mb(tar, mnt / "rss.erofs")
        print(f"converter as a process fed by a pipe: {secs:.2f}s, peak RSS {rss:.0f} MB")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(this benchmark process itself, tar generation included: {own:.0f} MB)")
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(run_ours, tar, mnt / "prof.erofs")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(15)


if __name__ == "__main__":
    main()

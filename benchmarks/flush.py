"""Ways to make a freshly written layer durable before its commit, compared.

Run: ``.venv/bin/python benchmarks/flush.py [--fs ext4] [--rounds 3]`` as root
(a fresh loop filesystem of that type; without root, a temp directory). Three
layer shapes, each written fresh (through the page cache, not synced) before
every timed flush, and the filesystem synced untimed in between:

- a small layer: four 64 KiB files, alone and on a busy filesystem (``--busy``
  MiB of someone else's data left dirty on it, as other containers' writes
  would be: syncfs writes that back too);
- containerd's benchsuite layer: ten 1 MiB files, alone, busy, and written back
  already (as unmounting an overlay does to its upper: the chain's case);
- 1,000 files of 4 KiB, alone and busy;
- an unpacked image layer: ``--files`` (30,000) files of 4 KiB in 300 directories.

Methods, alternated round by round (medians printed), each through
``stratasnap.fs.flush.flush_tree`` (the walk that also measures usage included),
except the third:

- ``fsync each``: fsync(2) of every file, then every directory (the default for a
  handful of entries off ext4; skipped for the big layer unless ``--all``: it
  takes tens of seconds);
- ``syncfs``: one syncfs(2) of the filesystem (the default for bigger trees off ext4);
- ``sfr + fsync each``: sync_file_range(SYNC_FILE_RANGE_WRITE) on every file first, so
  their writeback runs together, then the fsyncs (which only wait and commit the
  journal): each fsync still ends in a device flush, so it is not used;
- ``one commit``: writeback of every file, waited for, then one journal commit with
  its device flush (the default on ext4 with a journal up to ``WRITEBACK_LIMIT``
  entries; only on such a filesystem).

Figures, never pass/fail. The machine may be shared: read the ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _scratch import scratch_fs

from stratasnap.fs.flush import flush_tree, journal_commit
from stratasnap.fs.usage import fsync_path, syncfs

_libc = ctypes.CDLL(None, use_errno=True)
_sfr = _libc.sync_file_range
_sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sfr.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2

MiB = 1 << 20


def write_benchsuite(root: Path) -> None:
    data = os.urandom(MiB)
    for i in range(10):
        (root / f"f{i}").write_bytes(data)


def write_small(root: Path) -> None:
    data = os.urandom(64 << 10)
    for i in range(4):
        (root / f"f{i}").write_bytes(data)


def writer_busy(mib: int, layer: Callable[[Path], None]) -> Callable[[Path], None]:
    """``layer``, plus ``mib`` MiB of dirty data elsewhere on the filesystem."""
    chunk = os.urandom(MiB)

    def write(root: Path) -> None:
        with open(root.parent / f"{root.name}-other", "wb") as other:
            for _ in range(mib):
                other.write(chunk)
        layer(root)

    return write


def written_back(layer: Callable[[Path], None]) -> Callable[[Path], None]:
    """``layer``, then synced (as unmounting an overlay does to its upper)."""

    def write(root: Path) -> None:
        layer(root)
        syncfs(root)

    return write


def writer_unpack(files: int) -> Callable[[Path], None]:
    data = os.urandom(4096)

    def write(root: Path) -> None:
        per_dir = max(files // 300, 1)
        for i in range(files):
            d = root / f"d{i // per_dir}"
            if i % per_dir == 0:
                d.mkdir()
            (d / f"f{i}").write_bytes(data)

    return write


def entries(root: Path) -> tuple[list[str], list[str]]:
    files: list[str] = []
    dirs: list[str] = []
    for dirpath, _, names in os.walk(root):
        dirs.append(dirpath)
        files.extend(os.path.join(dirpath, n) for n in names)
    return files, dirs


def fsync_each(root: Path) -> None:
    flush_tree(root, None, fsync_limit=1 << 30)


def sfr_then_fsync_each(root: Path) -> None:
    files, dirs = entries(root)
    for f in files:
        fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _sfr(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "sync_file_range", f)
        finally:
            os.close(fd)
    for f in files:
        fsync_path(f)
    for d in reversed(dirs):
        fsync_path(d)


def flush_syncfs(root: Path) -> None:
    flush_tree(root, None, fsync_limit=0)


def one_commit(root: Path) -> None:
    journal = journal_commit(root.parent)
    assert journal is not None
    flush_tree(root, journal, writeback_limit=1 << 30)


def measure(
    base: Path, write: Callable[[Path], None], flush: Callable[[Path], None], n: int
) -> float:
    root = base / f"layer-{n}"
    root.mkdir()
    write(root)
    t0 = time.perf_counter()
    flush(root)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(root)
    Path(f"{root}-other").unlink(missing_ok=True)
    syncfs(base)  # the next round starts with nothing dirty
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fs", default="ext4", help="scratch filesystem type (default ext4)")
    ap.add_argument("--rounds", type=int, default=3, help="per method and shape (default 3)")
    ap.add_argument("--files", type=int, default=30_000, help="files of the unpacked layer")
    ap.add_argument("--busy", type=int, default=256, help="MiB dirty elsewhere (default 256)")
    ap.add_argument("--all", action="store_true", help="fsync each file of the big layer too")
    args = ap.parse_args()
    methods: dict[str, Callable[[Path], None]] = {
        "fsync each": fsync_each,
        "syncfs": flush_syncfs,
        "sfr + fsync each": sfr_then_fsync_each,
        "one commit": one_commit,
    }
    busy = f"{args.busy} MiB dirty elsewhere"
    many = writer_unpack(1000)
    shapes = {
        "small layer (4 x 64 KiB)": (write_small, list(methods)),
        f"small layer, {busy}": (writer_busy(args.busy, write_small), list(methods)),
        "benchsuite (10 x 1 MiB)": (write_benchsuite, list(methods)),
        f"benchsuite, {busy}": (writer_busy(args.busy, write_benchsuite), list(methods)),
        "benchsuite, written back already": (written_back(write_benchsuite), list(methods)),
        "1,000 x 4 KiB": (many, ["syncfs", "one commit"]),
        f"1,000 x 4 KiB, {busy}": (writer_busy(args.busy, many), ["syncfs", "one commit"]),
        f"unpack ({args.files:,} x 4 KiB)": (
            writer_unpack(args.files),
            list(methods) if args.all else ["syncfs", "one commit"],
        ),
    }
    with scratch_fs(args.fs, "4G") as (mnt, desc):
        if journal_commit(mnt) is None:
            print("# not ext4 with a journal: no 'one commit'")
            del methods["one commit"]
            shapes = {k: (w, [m for m in ms if m in methods]) for k, (w, ms) in shapes.items()}
        where = os.environ.get("TMPDIR", "/tmp")
        print(f"# flush benchmark on {desc} (image in {where}); medians of {args.rounds}")
        print(f"# load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        n = 0
        for shape, (write, names) in shapes.items():
            times: dict[str, list[float]] = {m: [] for m in names}
            for r in range(args.rounds):
                order = names if r % 2 == 0 else list(reversed(names))
                for m in order:
                    times[m].append(measure(mnt, write, methods[m], n))
                    n += 1
            print(f"\n## {shape}")
            ref = statistics.median(times[names[0]])
            for m in names:
                med = statistics.median(times[m])
                print(f"  {m:<18} {med * 1000:9.2f} ms   ({med / ref:5.2f}x {names[0]})")


if __name__ == "__main__":
    main()

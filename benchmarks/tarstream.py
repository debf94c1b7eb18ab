"""Tar header parsing throughput: stratasnap's streaming reader against ``tarfile``.

Builds an in-memory tar of ``--files`` small regular files (default 30,000 of
1 KiB in 300 directories, PAX format with one xattr every tenth file, as image
layers carry), then reads it alternately with ``stratasnap.tarstream.TarReader``
and with ``tarfile`` in stream mode (``r|``), every member's data read, for
``--rounds`` rounds. Prints MB of tar per CPU-second (median) for each reader
and their ratio. No files are written: this measures parsing, not the disk.

Figures, never pass/fail; the machine may be shared, so compare the ratio.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import tarfile
import time
from collections.abc import Callable


def build(files: int, size: int) -> bytes:
    buf = io.BytesIO()
    data = os.urandom(size)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in range(max(1, files // 100)):
            ti = tarfile.TarInfo(f"usr/share/d{d:04d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            t.addfile(ti)
        for i in range(files):
            ti = tarfile.TarInfo(f"usr/share/d{i // 100:04d}/file-{i:06d}.txt")
            ti.size, ti.mode, ti.mtime = size, 0o644, 1_700_000_000
            if i % 10 == 0:
                ti.pax_headers = {"SCHILY.xattr.user.tag": "v"}
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def ours(module: str) -> Callable[[bytes], int]:
    reader_cls = importlib.import_module(module).TarReader

    def parse(raw: bytes) -> int:
        r = reader_cls(io.BytesIO(raw))
        read = getattr(r, "read_data", None) or r.read
        n = 0
        for _e in r:
            n += 1
            while read(1 << 20):
                pass
        return n

    return parse


def with_tarfile(raw: bytes) -> int:
    n = 0
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as t:
        for ti in t:
            n += 1
            if ti.isreg():
                t.extractfile(ti).read()  # type: ignore[union-attr]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=30_000, help="regular files in the tar")
    ap.add_argument("--size", type=int, default=1024, help="bytes per file")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds per reader")
    ap.add_argument(
        "--module",
        action="append",
        default=[],
        help="module with a TarReader to measure (repeatable; default stratasnap.tarstream)",
    )
    args = ap.parse_args()
    raw = build(args.files, args.size)
    mb = len(raw) / 1e6
    readers: dict[str, Callable[[bytes], int]] = {
        m: ours(m) for m in args.module or ["stratasnap.tarstream"]
    }
    readers["tarfile r| (reference)"] = with_tarfile
    cpu: dict[str, list[float]] = {k: [] for k in readers}
    counts = {}
    for _ in range(args.rounds):
        for label, fn in readers.items():
            c0 = time.process_time()
            counts[label] = fn(raw)
            cpu[label].append(time.process_time() - c0)
    print(f"tar: {mb:.1f} MB, {args.files} files of {args.size} B; load {os.getloadavg()[0]:.1f}")
    ref = statistics.median(cpu["tarfile r| (reference)"])
    for label, times in cpu.items():
        med = statistics.median(times)
        print(
            f"{label:40s} {mb / med:8.0f} MB/CPU-s  {counts[label] / med:9.0f} members/CPU-s"
            f"  x{ref / med:.2f} vs tarfile"
        )


if __name__ == "__main__":
    main()

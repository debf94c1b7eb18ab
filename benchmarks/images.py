"""Images without containerd: pull, import and layer apply, against the usual tools.

Run: ``.venv/bin/python benchmarks/images.py`` as root (needs docker-registry,
skopeo, umoci, containerd and ctr). On one fresh loop filesystem it builds an
image (3 layers of generated files: by default 30,000 files, ~300 MB, gzip),
serves it from a private ``docker-registry`` on 127.0.0.1, and measures,
alternating the tools in every round:

1. **pull + unpack** of the image from the registry:
   ``stratasnap --backend overlay image pull``; ``stratasnap --backend erofs
   image pull`` twice: layers converted straight to EROFS images (the
   converter, ``convert_layers=true``) and applied file by file into an upper
   then built by ``mkfs.erofs`` (``convert_layers=false``), both with
   ``compression`` = ``--erofs-compression``; ``ctr images pull`` with
   containerd's built-in ``overlayfs`` (then ``ctr images rm --sync``, so every
   pull downloads again); and ``skopeo copy`` + ``umoci unpack``. Every
   stratasnap pull starts from an empty root (``--pull-tools`` picks some);
2. **import** of the same image from an OCI archive: ``stratasnap image import``
   against ``ctr images import`` (overlayfs);
3. **layer apply** throughput (MB/s of uncompressed tar) of stratasnap's
   applier, and where the time goes: parsing the tar alone, gunzip alone (ISA-L
   and zlib), applying with and without writer threads, and the whole pipeline
   from the gzip blob (decompression overlapped with applying).

Medians over the rounds; ratios are stratasnap's time over the reference's.
Figures, never pass/fail. The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402

from _scratch import scratch_fs  # noqa: E402
from e2e.harness import Stack  # noqa: E402
from e2e.oci import generated_layers, write_oci_archive  # noqa: E402
from e2e.registry import LocalRegistry, push  # noqa: E402

from stratasnap.fs.mount import unmount_all_under  # noqa: E402
from stratasnap.images.apply import Target, apply_tar  # noqa: E402
from stratasnap.images.compression import DecompressingReader, gzip_backend  # noqa: E402
from stratasnap.images.layer_stream import LayerStream  # noqa: E402
from stratasnap.images.reference import Digest  # noqa: E402
from stratasnap.tarstream import TarReader  # noqa: E402

REPO = "bench/big:1"
TOOLS = ("docker-registry", "skopeo", "umoci", "containerd", "ctr")


def run(argv: list[str], **kw: object) -> float:
    return run_output(argv, **kw)[0]


def run_output(argv: list[str], **kw: object) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stdout}\n{r.stderr}")
    return time.perf_counter() - t0, r.stdout


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def show(label: str, xs: list[float], ref: list[float] | None = None) -> None:
    ratio = f"  {med(xs) / med(ref):.2f}x" if ref else ""
    spread = ", ".join(f"{x:.2f}" for x in xs)
    print(f"  {label:<56} {med(xs):7.2f} s  ({spread}){ratio}")


def stratasnap_cli(root: Path, *args: str, backend: str = "overlay") -> list[str]:
    return [sys.executable, "-m", "stratasnap", "--root", str(root), "--backend", backend, *args]


#: The stratasnap pulls measured: name -> (backend, its -o options).
def stratasnap_pulls(erofs_compression: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    erofs = ("erofs", ("-o", f"compression={erofs_compression}"))
    return {
        "stratasnap": ("overlay", ()),
        "erofs-convert": (erofs[0], (*erofs[1], "-o", "convert_layers=true")),
        "erofs-mkfs": (erofs[0], (*erofs[1], "-o", "convert_layers=false")),
    }


PULL_TOOLS = ("stratasnap", "erofs-convert", "erofs-mkfs", "ctr", "skopeo+umoci")


def bench_pull(
    work: Path, stack: Stack, ref: str, reps: int, tools: list[str], erofs_compression: str
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {t: [] for t in tools}
    ctr = ["ctr", "--address", str(stack.cd_socket), "-n", "bench"]
    ours = stratasnap_pulls(erofs_compression)
    for rep in range(reps):
        order = list(out) if rep % 2 == 0 else list(reversed(out))
        for tool in order:
            os.sync()
            if tool in ours:
                backend, options = ours[tool]
                root = fresh(work / "ss-pull")
                argv = stratasnap_cli(root, *options, "image", "pull", "--plain-http", "--json",
                                      ref, backend=backend)  # fmt: skip
                seconds, stdout = run_output(argv)
                out[tool].append(seconds)
                got = json.loads(stdout)
                # The path measured must be the one named: converted or not, every layer.
                want = got["layers"] if tool == "erofs-convert" else 0
                if got["converted"] != want:
                    raise SystemExit(f"{tool}: {got['converted']} layers converted, not {want}")
                unmount_all_under(root)  # erofs: the layers' images are mounted in the root
                shutil.rmtree(root)
            elif tool == "ctr":
                out[tool].append(
                    run([*ctr, "images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref])
                )
                run([*ctr, "images", "rm", "--sync", ref])
            else:
                layout = fresh(work / "umoci") / "layout"
                t = run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                         f"docker://{ref}", f"oci:{layout}:1"])  # fmt: skip
                t += run(["umoci", "unpack", "--image", f"{layout}:1", str(work / "umoci" / "b")])
                out[tool].append(t)
                shutil.rmtree(work / "umoci")
    return out


def bench_import(work: Path, stack: Stack, archive: Path, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"stratasnap": [], "ctr": []}
    ctr = ["ctr", "--address", str(stack.cd_socket), "-n", "bench-import"]
    for rep in range(reps):
        for tool in list(out) if rep % 2 == 0 else list(reversed(out)):
            os.sync()
            if tool == "stratasnap":
                root = fresh(work / "ss-import")
                out[tool].append(run(stratasnap_cli(root, "image", "import", str(archive))))
                shutil.rmtree(root)
            else:
                out[tool].append(
                    run([*ctr, "images", "import", "--snapshotter", "overlayfs", str(archive)])
                )
                run([*ctr, "images", "rm", "--sync", f"localhost/{REPO}"], check=False)
                subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True)
                for name in subprocess.run(
                    [*ctr, "images", "ls", "-q"], capture_output=True, text=True
                ).stdout.split():
                    run([*ctr, "images", "rm", "--sync", name])
    return out


def show_pulls(res: dict[str, list[float]], erofs_compression: str) -> None:
    """Each pull, then its ratio against each reference that was measured."""
    labels = {
        "ctr": "ctr images pull (containerd overlayfs)",
        "skopeo+umoci": "skopeo copy + umoci unpack",
        "stratasnap": "stratasnap image pull (overlay)",
        "erofs-convert": f"stratasnap image pull (erofs {erofs_compression}, converted)",
        "erofs-mkfs": f"stratasnap image pull (erofs {erofs_compression}, apply+mkfs)",
    }
    for tool, xs in res.items():
        show(labels[tool], xs)
    pairs = [
        ("stratasnap", "ctr"),
        ("stratasnap", "skopeo+umoci"),
        ("erofs-convert", "ctr"),
        ("erofs-mkfs", "ctr"),
        ("erofs-convert", "erofs-mkfs"),
        ("erofs-convert", "stratasnap"),
    ]
    print("  ratios (medians):")
    for a, b in pairs:
        if a in res and b in res:
            print(f"    {a} / {b}: {med(res[a]) / med(res[b]):.2f}x")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_apply(work: Path, raws: list[bytes], blobs: list[bytes], reps: int) -> None:
    total = sum(len(r) for r in raws)
    mb = total / 1e6
    rows: dict[str, list[tuple[float, float]]] = {}

    def add(label: str, seconds: tuple[float, float]) -> None:
        rows.setdefault(label, []).append(seconds)

    def parse() -> None:
        for raw in raws:
            r = TarReader(io.BytesIO(raw))
            for _e in r:
                while r.read(1 << 20):
                    pass

    def gunzip(mod: str) -> None:
        for blob in blobs:
            if mod == "zlib":
                d = zlib.decompressobj(31)
                d.decompress(blob)
            else:
                DecompressingReader(io.BytesIO(blob), "gzip").read()

    def apply(threads: int) -> None:
        dest = fresh(work / "apply")
        for raw in raws:
            apply_tar(io.BytesIO(raw), Target(str(dest)), threads=threads)

    def pipeline() -> None:
        dest = fresh(work / "apply")
        for raw, blob in zip(raws, blobs, strict=True):
            s = LayerStream(io.BytesIO(blob), "gzip", Digest.of(blob), Digest.of(raw))
            apply_tar(s, Target(str(dest)))  # type: ignore[arg-type]
            s.finish()
            s.close()

    for _ in range(reps):
        add("tar parsing only (headers + data read)", timed(parse))
        add(f"gunzip only ({gzip_backend()})", timed(lambda: gunzip("isal")))
        add("gunzip only (zlib)", timed(lambda: gunzip("zlib")))
        for threads in (0, 3):
            fresh(work / "apply")
            os.sync()
            add(f"apply uncompressed, {threads} writer threads", timed(lambda t=threads: apply(t)))
        fresh(work / "apply")
        os.sync()
        add("pipeline: gzip blob -> verified apply", timed(pipeline))
    print(
        f"\n## 3. layer apply: {mb:,.0f} MB of uncompressed tar, {len(raws)} layers ({reps} runs)"
    )
    print("  (MB/CPU-s: per second of CPU this process used, all threads: what a quiet")
    print("  machine would give when nothing waits on the disk; wall MB/s depends on the load)")
    for label, xs in rows.items():
        wall = med([x[0] for x in xs])
        cpu = med([x[1] for x in xs])
        print(f"  {label:<44} {wall:6.2f} s  {mb / wall:6.0f} MB/s  {mb / cpu:6.0f} MB/CPU-s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--files", type=int, default=10_000, help="files per layer")
    ap.add_argument("--mean-size", type=int, default=10_000, help="mean file size, bytes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=("pull", "import", "apply"), action="append")
    ap.add_argument(
        "--pull-tools",
        default=",".join(PULL_TOOLS),
        help=f"comma-separated, of {', '.join(PULL_TOOLS)} [default: all]",
    )
    ap.add_argument(
        "--erofs-compression",
        default="none",
        help="erofs pulls' compression option [default: none, what the converter writes]",
    )
    ap.add_argument("--fs", default="ext4")
    ap.add_argument("--size", default="20G")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/images.py mounts filesystems and runs containerd: run as root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}")
    parts = set(args.only or ("pull", "import", "apply"))
    tools = [t for t in args.pull_tools.split(",") if t]
    if unknown := set(tools) - set(PULL_TOOLS):
        raise SystemExit(f"--pull-tools: unknown {', '.join(sorted(unknown))}")
    with scratch_fs(args.fs, args.size) as (mnt, desc):
        print(f"# images benchmark on {desc}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        t0 = time.perf_counter()
        layers = generated_layers(args.layers, args.files, args.mean_size)
        raws = [layer.tar() for layer in layers]
        files = sum(layer.files for layer in layers)
        del layers
        layout, archive = mnt / "layout", mnt / "big.tar"
        info = write_oci_archive(layout, f"localhost/{REPO}", raws, compresslevel=1,
                                 layout_dir=True)  # fmt: skip
        write_oci_archive(archive, f"localhost/{REPO}", raws, compresslevel=1)
        blobs = [
            (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes() for d in info.layer_digests
        ]
        print(
            f"# image: {args.layers} layers, {files:,} files, "
            f"{sum(map(len, raws)) / 1e6:,.0f} MB of tar, {info.size / 1e6:,.0f} MB gzip; "
            f"built in {time.perf_counter() - t0:.1f} s"
        )
        if parts & {"pull", "import"}:
            with LocalRegistry(mnt / "registry") as reg, Stack(mnt / "stack") as stack:
                ver = subprocess.run(["containerd", "--version"], capture_output=True, text=True)
                print(f"# {ver.stdout.strip()}; registry {reg.address}")
                ref = f"{reg.address}/{REPO}"
                push(layout, ref)
                if "pull" in parts:
                    res = bench_pull(
                        mnt / "work", stack, ref, args.reps, tools, args.erofs_compression
                    )
                    print(f"\n## 1. pull + unpack from the local registry ({args.reps} runs)")
                    show_pulls(res, args.erofs_compression)
                if "import" in parts:
                    res = bench_import(mnt / "work", stack, archive, args.reps)
                    print(f"\n## 2. import of the OCI archive ({args.reps} runs)")
                    show("ctr images import (overlayfs)", res["ctr"])
                    show("stratasnap image import (overlay) vs ctr", res["stratasnap"], res["ctr"])
        if "apply" in parts:
            bench_apply(mnt / "work", raws, blobs, args.reps)
        print(f"\n# load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""CRI-style pull + unpack through containerd: stratasnap erofs on the fast path vs overlayfs.

Run: ``.venv/bin/python benchmarks/fastpath.py`` as root (needs containerd,
ctr, runc, docker-registry, skopeo, go and Debian's containerd Go sources).
On one fresh ext4 loop filesystem it builds an image (3 layers of generated
files: by default 30,000 files, ~300 MB, gzip level 1), pushes it to a private
``docker-registry``, and pulls it through one private containerd (1.6) with
``gopull`` (tests/e2e/gopull: containerd's client.Pull with WithPullUnpack and
the image annotations CRI adds), alternating in every round between:

- ``overlayfs``: containerd's built-in snapshotter (the reference);
- ``ss-erofs``: stratasnap's erofs backend (``compression = "none"``, as in
  the README's figures; the default ``lz4`` is converted too), where layers
  take the remote-snapshot fast path: read from containerd's content store,
  converted tar -> EROFS, no file-by-file unpack by containerd;
- ``ss-erofs-unpack`` (``--no-unpack-reference`` leaves it out): the same
  backend with ``convert_layers = false``, containerd unpacking every layer
  into it (what the fast path saves).

Each pull goes into a fresh namespace and is followed by ``ctr images rm
--sync`` (GC removes its snapshots and blobs), so every pull downloads again.
A second part (``--no-fetched`` skips it) puts the blobs in containerd's
store first (``ctr content fetch``, untimed): only the unpack is left, and on
``ss-erofs`` every layer takes the fast path (as on a node where the image's
blobs are already present, e.g. unpacked for another snapshotter).
The time is gopull's (client.Pull: resolve, fetch, unpack). stratasnap's
metrics say how many layers took the fast path in each pull (containerd 1.6
starts fetching only after the first Prepare of a pull returns, so its first
layer goes the normal way). Medians; ratios against overlayfs; the machine
may be shared (the load average is printed). Figures, never pass/fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402, F401  (benchmarks/grpc.py would shadow it)

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from _scratch import scratch_fs  # noqa: E402
from e2e.gobuild import GOPULL, build_go  # noqa: E402
from e2e.harness import REQUIRED_TOOLS, Stack  # noqa: E402
from e2e.oci import generated_layers, write_oci_archive  # noqa: E402
from e2e.registry import LocalRegistry, free_port, push  # noqa: E402

FAST = "ss-erofs"
UNPACK = "ss-erofs-unpack"
#: stratasnap snapshotter -> erofs backend options.
OURS = {
    FAST: {"compression": "none"},
    UNPACK: {"compression": "none", "convert_layers": False},
}


class ErofsStack(Stack):
    """One stratasnap server with the erofs snapshotters of :data:`OURS`, one containerd."""

    def __init__(self, base: Path, names: Sequence[str], fetch_start: float, **kw: object) -> None:
        self.names = list(names)
        self.fetch_start = fetch_start
        super().__init__(base, "erofs", snapshotter=self.names[0], **kw)  # type: ignore[arg-type]

    def _write_configs(self) -> None:
        super()._write_configs()
        q = json.dumps
        ss = [
            "version = 1",
            f"address = {q(str(self.ss_socket))}",
            f"metrics_address = {q(self.metrics_address)}",
            'log_level = "info"',
            "[fast_path]",
            f"containerd_address = {q(str(self.cd_socket))}",
            f"fetch_start_timeout = {self.fetch_start}",
        ]
        cd = [self.cd_config.read_text().split("[proxy_plugins.")[0].rstrip("\n")]
        for name in self.names:
            opts = ", ".join(f"{q(k)} = {q(v)}" for k, v in OURS[name].items())
            ss += [
                f"[snapshotters.{name}]",
                'backend = "erofs"',
                f"root = {q(str(self.ss_root.parent / name))}",
                f"options = {{{opts}}}",
            ]
            cd += [
                f"[proxy_plugins.{name}]",
                '  type = "snapshot"',
                f"  address = {q(str(self.ss_socket))}",
            ]
        self.ss_config.write_text("\n".join(ss) + "\n")
        self.cd_config.write_text("\n".join(cd) + "\n")


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    return f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"


def fast_layers(metrics: str) -> float:
    """stratasnap_fastpath_layers_total, all labels summed."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("stratasnap_fastpath_layers_total{")
    )


def pulls(
    stack: Stack,
    gopull: Path,
    ref: str,
    metrics: str,
    contenders: Sequence[str],
    args: argparse.Namespace,
    fetched: bool,
) -> tuple[dict[str, list[float]], list[float]]:
    """Timed gopull runs, alternated: (seconds per snapshotter, fast-path layers per FAST pull).

    With ``fetched`` the blobs are put in containerd's store first (``ctr content
    fetch``, untimed), so that only the unpack is left to each snapshotter.
    """
    times: dict[str, list[float]] = {c: [] for c in contenders}
    fast: list[float] = []
    for rep in range(args.reps):
        order = list(contenders) if rep % 2 == 0 else list(contenders)[::-1]
        for snap in order:
            ns = f"pull-{snap}-{rep}-{'f' if fetched else 'p'}"
            ctr = ["ctr", "--address", str(stack.cd_socket), "-n", ns]
            if fetched:
                stack.run([*ctr, "content", "fetch", "--plain-http", ref], timeout=1800)
            before = fast_layers(metrics)
            argv = [str(gopull), "-address", str(stack.cd_socket), "-namespace", ns]
            argv += ["-snapshotter", snap, "-ref", ref]
            out = stack.run(argv, timeout=1800).stdout
            seconds = float(json.loads(out)["seconds"])
            converted = fast_layers(metrics) - before
            times[snap].append(seconds)
            note = ""
            if snap == FAST:
                fast.append(converted)
                note = f", {converted:.0f} of {args.layers} layers on the fast path"
            print(f"  rep {rep + 1}: {snap:<16} pull+unpack {seconds:6.2f} s{note}", flush=True)
            stack.run([*ctr, "images", "rm", "--sync", ref], timeout=600)
            os.sync()
    return times, fast


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--files", type=int, default=10_000, help="files per layer")
    ap.add_argument("--mean-size", type=int, default=10_000, help="mean file size, bytes")
    ap.add_argument("--reps", type=int, default=3, help="pulls per snapshotter")
    ap.add_argument("--size", default="20G", help="of the scratch ext4 filesystem")
    ap.add_argument(
        "--fetch-start-timeout",
        type=float,
        default=1.0,
        help="[fast_path] fetch_start_timeout: what the first layer of a pull waits (s)",
    )
    ap.add_argument(
        "--no-unpack-reference",
        action="store_true",
        help=f"leave out {UNPACK} (erofs with containerd unpacking every layer)",
    )
    ap.add_argument(
        "--no-fetched",
        action="store_true",
        help="skip the second part (blobs put in containerd's store before each pull)",
    )
    ap.add_argument(
        "--logs",
        type=Path,
        help="copy the daemons' logs here at the end (stratasnap logs each layer's path "
        "and, on the fast path, where its time went: wait_ms, convert_ms, commit_ms)",
    )
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        raise SystemExit("benchmarks/fastpath.py runs containerd: run it as root")
    missing = [
        t for t in (*REQUIRED_TOOLS, "docker-registry", "skopeo", "go") if shutil.which(t) is None
    ]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}")

    names = [FAST] if args.no_unpack_reference else [FAST, UNPACK]
    with scratch_fs("ext4", args.size) as (mnt, desc):
        print(
            f"# fast-path benchmark on {desc}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
        )
        gopull, why = build_go(GOPULL, mnt / "gopull", mnt / "gobuild")
        if gopull is None:
            raise SystemExit(f"gopull: {why}")
        print(f"# {why}")
        t0 = time.perf_counter()
        layers = generated_layers(args.layers, args.files, args.mean_size)
        files = sum(layer.files for layer in layers)
        raw = sum(layer.bytes for layer in layers)
        layout = mnt / "layout"
        metrics = f"127.0.0.1:{free_port()}"
        stack = ErofsStack(
            mnt / "stack",
            names,
            args.fetch_start_timeout,
            namespace="bench",
            log_level="info",
            metrics_address=metrics,
        )
        results: list[tuple[str, tuple[dict[str, list[float]], list[float]]]] = []
        with LocalRegistry(mnt / "registry") as registry:
            ref = f"{registry.address}/bench/big:1"
            info = write_oci_archive(layout, ref, layers, compresslevel=1, layout_dir=True)
            del layers
            push(layout, ref)
            print(
                f"# image: {args.layers} layers, {files:,} files, {raw / 1e6:,.0f} MB of file "
                f"data, {info.size / 1e6:,.0f} MB compressed; built and pushed in "
                f"{time.perf_counter() - t0:.1f} s"
            )
            try:
                stack.start()
                ver = stack.run(["containerd", "--version"]).stdout.split()
                print(
                    f"# containerd {ver[2] if len(ver) > 2 else '?'}; fetch_start_timeout "
                    f"{args.fetch_start_timeout:g} s; ratios against overlayfs"
                )
                contenders = ["overlayfs", *names]
                for fetched in (False, True):
                    if fetched and args.no_fetched:
                        continue
                    what = "blobs fetched first" if fetched else "fresh pull"
                    print(f"\n## {what} ({args.reps} runs each)", flush=True)
                    results.append(
                        (what, pulls(stack, gopull, ref, metrics, contenders, args, fetched))
                    )
            finally:
                stack.close()
                if args.logs is not None:
                    shutil.copytree(stack.logs, args.logs, dirs_exist_ok=True)
        for what, (times, fast) in results:
            ref_t = med(times["overlayfs"])
            print(f"\n{what:<18}{'pull+unpack, s':>24}{'ratio':>8}")
            for snap, xs in times.items():
                print(f"{snap:<18}{spread(xs):>24}{med(xs) / ref_t:>7.2f}x")
            layers = ", ".join(f"{f:.0f}" for f in fast)
            print(f"  fast-path layers per {FAST} pull: {layers} (of {args.layers})")
        print(f"  target: {FAST} (fast path) <= 0.7x overlayfs")


if __name__ == "__main__":
    main()

"""``stratasnap erofs``: EROFS image tools that need no snapshot store."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import sys
import time
import uuid as uuidlib
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, cast

import click

from ._format import human_size

__all__ = ["erofs"]


@click.group()
def erofs() -> None:
    """EROFS image tools (no store, no mounts)."""


@erofs.command("convert")
@click.argument("layer", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("image", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("--uuid", "uuid_text", metavar="UUID", help="Filesystem UUID. [default: random]")
@click.option(
    "--default-mtime",
    type=int,
    default=None,
    metavar="SECONDS",
    help="mtime of parent directories the tar does not list. "
    "[default: the newest mtime in the layer]",
)
@click.option(
    "--compression",
    type=click.Choice(["none", "lz4", "lz4hc"]),
    default="none",
    show_default=True,
    help="How file data is stored. none: as is (fastest to write and to read). "
    "lz4: compressed in 4 KiB clusters wherever that saves a block; text and "
    "binaries take about half the disk, already-compressed files stay as they "
    "are; costs CPU to write and a little to read. lz4hc: 5-10% smaller "
    "than lz4, several times slower to write, as fast to read. "
    "Compressed images mount on Linux 5.3 and later.",
)
@click.option("--digest", is_flag=True, help="Also print the tar's sha256 (the layer's diff ID).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def convert(
    layer: str,
    image: Path,
    uuid_text: str | None,
    default_mtime: int | None,
    compression: str,
    digest: bool,
    as_json: bool,
) -> None:
    """Convert an uncompressed layer tar LAYER into an EROFS image IMAGE.

    One streaming pass, no mounts, no extraction: file data goes straight
    into the image (4 KiB blocks), uncompressed or, with --compression,
    lz4-compressed where that saves space. OCI whiteouts
    become overlayfs ones (.wh.NAME: a 0/0 character device NAME;
    .wh..wh..opq: trusted.overlay.opaque=y on the directory), so the image
    works as an overlayfs lower layer. Owners, modes (setuid too), mtimes
    (nanoseconds), hard links, devices, fifos and PAX xattrs are kept.

    LAYER '-' reads standard input; a gzip-compressed LAYER (tar+gzip, the
    usual layer blob) is decompressed on the way. IMAGE is replaced
    atomically and fsynced;
    a corrupt or hostile tar (bad header, '..' in a name, truncated data,
    absurd sizes) is refused with exit code 3 and writes nothing.

    \b
    Examples:
      stratasnap erofs convert layer.tar layer.erofs
      stratasnap erofs convert --digest blobs/sha256/4f4f… layer.erofs
      stratasnap erofs convert --compression lz4 layer.tar layer.erofs
      zstdcat layer.tar.zst | stratasnap erofs convert - layer.erofs
      mount -t erofs -o ro layer.erofs /mnt/layer
    """
    from ..erofs import COMPRESSIONS, convert_tar

    if compression not in COMPRESSIONS:
        from ..erofs.lz4 import library_error

        raise click.BadParameter(
            f"{compression} is not available here: {library_error()}",
            param_hint="'--compression'",
        )
    try:
        fs_uuid = uuidlib.UUID(uuid_text).bytes if uuid_text else None
    except ValueError:
        raise click.BadParameter(f"{uuid_text!r} is not a UUID", param_hint="'--uuid'") from None
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        raw = (
            sys.stdin.buffer
            if layer == "-"
            else stack.enter_context(open(layer, "rb", buffering=1 << 20))
        )
        stream = _maybe_gunzip(raw, stack)
        stats = convert_tar(
            stream,
            image,
            uuid=fs_uuid,
            default_mtime=default_mtime,
            digest=digest,
            compression=compression,
        )
    elapsed = time.monotonic() - start
    if as_json:
        extra = {"seconds": round(elapsed, 3), "peak_rss_kib": _peak_rss_kib()}
        click.echo(json.dumps({**asdict(stats), **extra}))
        return
    rate = stats.tar_bytes / elapsed / 1e6 if elapsed > 0 else 0.0
    click.echo(
        f"{image}: {human_size(stats.image_bytes)} image, {stats.inodes} inodes "
        f"({stats.files} files, {stats.directories} dirs, {stats.whiteouts} whiteouts"
        + (f", {stats.compressed_files} files compressed" if compression != "none" else "")
        + ") "
        f"from {human_size(stats.tar_bytes)} of tar in {elapsed:.2f}s ({rate:.0f} MB/s)"
    )
    if digest:
        click.echo(f"diff ID: {stats.tar_digest}")


def _maybe_gunzip(stream: BinaryIO, stack: contextlib.ExitStack) -> BinaryIO:
    """``stream`` itself, or its gzip decompression when it starts with gzip's magic.

    Layers are usually stored gzipped (…tar+gzip); the converter reads plain
    tar, so the command takes either. (zstd layers: decompress first.)
    """
    if isinstance(stream, io.BufferedReader):
        buffered = stream
    else:  # e.g. an in-memory stream (tests): peek() needs a buffered reader
        buffered = io.BufferedReader(cast(io.RawIOBase, stream))
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return cast(BinaryIO, stack.enter_context(gzip.GzipFile(fileobj=buffered, mode="rb")))
    return cast(BinaryIO, buffered)


def _peak_rss_kib() -> int | None:
    """This process's peak resident memory since exec (VmHWM), None off Linux.

    Not getrusage's ru_maxrss: that also counts what the parent had at fork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

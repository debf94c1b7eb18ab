"""``stratasnap image …``: pull, import, list, inspect, remove and mount OCI images."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import NotFound, SnapshotError
from ..images.manifest import Platform, host_platform
from ..images.store import Image, ImageStore
from ..images.unpack import UnpackStats
from ._app import Session
from ._format import human_size, rfc3339, table
from ._mount import mount_at
from ._progress import progress_bar

__all__ = ["diff", "image"]

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _store() -> Iterator[ImageStore]:
    session = click.get_current_context().find_object(Session)
    assert session is not None
    store = ImageStore(session.root, session.snapshotter())
    try:
        yield store
    finally:
        store.close()


def _platform_option(f: F) -> F:
    return click.option(
        "--platform",
        default=None,
        metavar="OS/ARCH[/VARIANT]",
        help=f"Platform to pick from a multi-platform image [default: {host_platform()}].",
    )(f)


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(f)


def _unpack(store: ImageStore, image: Image, quiet: bool) -> UnpackStats:
    layers = sum(layer.size for layer in image.manifest.layers)
    with progress_bar(f"unpack {image.record.name}", layers, enabled=not quiet) as bar:
        return store.unpack(image, bar.advance)


def _unpacked(stats: UnpackStats) -> dict[str, int]:
    """For --json: layers, how many were unpacked now, how many of those the backend
    converted whole (the erofs backend's converter) instead of writing them file by file."""
    return {"layers": stats.layers, "unpacked": stats.applied, "converted": stats.converted}


class _InOrder(click.Group):
    """Lists the verbs in the order of the workflow, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_InOrder)
def image() -> None:
    """Pull, import, list, inspect, remove and mount OCI images, without containerd.

    Images live in the store's root: blobs under <root>/content, names in
    its metadata, layers as committed snapshots named by chain ID (shared
    between images, like containerd's). On the erofs backend each layer tar
    is converted straight into its EROFS image (no file written per entry,
    no mkfs.erofs) where the backend can: option convert_layers=true (the
    default) and a compression the converter writes (-o compression=none).

    \b
    Example:
      stratasnap --backend overlay image import alpine.tar
      stratasnap --backend overlay image mount alpine /mnt/alpine
    """


@image.command()
@click.argument("ref")
@_platform_option
@click.option(
    "--user",
    "-u",
    default="",
    metavar="USER:PASSWORD",
    help=(
        "Registry credentials [default: docker's config.json: credHelpers, "
        "credsStore (docker-credential-* helpers), then auths]."
    ),
)
@click.option("--plain-http", is_flag=True, help="Talk HTTP, not HTTPS, to the registry.")
@click.option(
    "--hosts-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="STRATASNAP_HOSTS_DIR",
    show_envvar=True,
    help="containerd-style registry host configs (DIR/<registry>/hosts.toml: mirrors, TLS).",
)
@click.option("--no-unpack", is_flag=True, help="Only download the blobs.")
@_json_option
def pull(
    ref: str,
    platform: str | None,
    user: str,
    plain_http: bool,
    hosts_dir: Path | None,
    no_unpack: bool,
    as_json: bool,
) -> None:
    """Pull image REF from its registry and unpack it.

    REF is [REGISTRY/]REPOSITORY[:TAG][@DIGEST]; without a registry it is
    on Docker Hub (alpine = docker.io/library/alpine:latest). A pull that is
    interrupted resumes its downloads when run again.

    \b
    Examples:
      stratasnap --backend overlay image pull alpine:3.20
      stratasnap image pull --plain-http -u ci:secret 127.0.0.1:5000/app:1
      stratasnap image pull --platform linux/arm64 --hosts-dir /etc/containerd/certs.d nginx
    """
    from ..images.pull import PullOptions
    from ..images.pull import pull as do_pull

    options = PullOptions(
        platform=Platform.parse(platform) if platform else None,
        user=user,
        plain_http=plain_http,
        hosts_dir=hosts_dir,
        unpack=not no_unpack,
    )
    with _store() as store, progress_bar(f"pull {ref}", enabled=not as_json) as bar:
        result = do_pull(store, ref, options, bar.advance, bar.set_total)
    rec = result.record
    if as_json:
        out: dict[str, Any] = {"name": rec.name, "digest": rec.digest, "platform": rec.platform}
        if result.stats:
            out |= _unpacked(result.stats)
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"{rec.name}  {rec.digest}")


@image.command("import")
@click.argument("archive", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--name",
    default="",
    metavar="REF",
    help="Name for the image (or the repository bare tags in the archive are joined to).",
)
@_platform_option
@click.option("--no-unpack", is_flag=True, help="Only store the blobs; unpack later on use.")
@_json_option
def import_(archive: Path, name: str, platform: str | None, no_unpack: bool, as_json: bool) -> None:
    """Import images from ARCHIVE: an OCI image layout (directory or tar) or a docker save tar.

    The blobs are verified as they are stored, then the layers are unpacked
    into the backend.

    \b
    Examples:
      stratasnap image import alpine-oci.tar
      stratasnap image import ./layout-dir --name registry.local/app:1.0
      docker save busybox | gzip > busybox.tar.gz && stratasnap image import busybox.tar.gz
    """
    from ..images.archive import import_archive

    plat = Platform.parse(platform) if platform else None
    with _store() as store:
        with progress_bar(f"import {archive.name}", enabled=not as_json) as bar:
            found = import_archive(
                archive,
                store.content,
                name=name,
                platform=plat,
                progress=bar.advance,
                total=bar.set_total,
            )
        names: list[dict[str, Any]] = []
        for imp in found:
            rec = store.add(
                imp.name,
                imp.manifest.digest,
                imp.manifest.media_type,
                imp.platform,
                str(archive.resolve()),
            )
            entry: dict[str, Any] = {"name": rec.name, "digest": rec.digest}
            if not no_unpack:
                entry |= _unpacked(_unpack(store, store.load(rec), as_json))
            names.append(entry)
    if as_json:
        click.echo(json.dumps(names, indent=2))
    else:
        for n in names:
            click.echo(f"{n['name']}  {n['digest']}")


@image.command("ls")
@_json_option
def ls(as_json: bool) -> None:
    """List images: name, platform, size, manifest digest.

    \b
    Example:
      stratasnap image ls --json
    """
    with _store() as store:
        rows: list[dict[str, Any]] = []
        for rec in store.records():
            try:
                size = store.load(rec).size
            except SnapshotError:  # a record whose blobs are gone: listed, size unknown
                size = 0
            rows.append(
                {
                    "name": rec.name,
                    "digest": rec.digest,
                    "platform": rec.platform,
                    "size": size,
                    "created": rfc3339(rec.created) if rec.created else "",
                }
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table(
        ("NAME", "PLATFORM", "SIZE", "DIGEST"),
        (
            (str(r["name"]), str(r["platform"]), human_size(r["size"]), str(r["digest"]))
            for r in rows
        ),
    )


@image.command()
@click.argument("ref")
def inspect(ref: str) -> None:
    """Print image REF as JSON: record, manifest, config, layers and their snapshots.

    \b
    Example:
      stratasnap image inspect alpine | jq .layers
    """
    with _store() as store:
        img = store.get(ref)
        layers = []
        for desc, diff_id, chain in zip(
            img.manifest.layers, img.config.diff_ids, img.chain_ids, strict=True
        ):
            try:
                store.sn.stat(str(chain))
                unpacked = True
            except NotFound:
                unpacked = False
            layers.append(
                {
                    **desc.to_json(),
                    "diffID": str(diff_id),
                    "chainID": str(chain),
                    "unpacked": unpacked,
                }
            )
        out = {
            "name": img.record.name,
            "digest": img.record.digest,
            "mediaType": img.record.media_type,
            "platform": img.record.platform,
            "source": img.record.source,
            "created": rfc3339(img.record.created) if img.record.created else "",
            "size": img.size,
            "snapshot": img.top_layer,
            "layers": layers,
            "config": img.config.raw,
        }
    click.echo(json.dumps(out, indent=2))


@image.command()
@click.argument("refs", nargs=-1, required=True)
@_json_option
def rm(refs: tuple[str, ...], as_json: bool) -> None:
    """Remove images, then reclaim the blobs and layer snapshots nothing uses any more.

    Layers a container (or any other snapshot) still builds on stay.

    \b
    Example:
      stratasnap image rm alpine registry.local/app:1.0
    """
    with _store() as store:
        paths: list[str] = []
        size = 0
        for ref in refs:
            got = store.remove(ref)
            paths.extend(got.paths)
            size += got.size
    if as_json:
        click.echo(json.dumps({"removed": list(refs), "reclaimed": paths, "size": size}))
    else:
        click.echo(f"removed {', '.join(refs)}; reclaimed {human_size(size)} of blobs")


def _default_key(name: str, rw: bool) -> str:
    return f"{'rw' if rw else 'view'}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"


@image.command()
@click.argument("ref")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", default="", help="Key of the snapshot to create [default: view-NAME].")
@click.option("--rw", is_flag=True, help="A writable (active) snapshot instead of a view.")
def mount(ref: str, target: Path, key: str, rw: bool) -> None:
    """Mount image REF at TARGET (a view, or a writable snapshot with --rw).

    Unpacks the image first if needed. Prints the snapshot key; undo with
    `umount TARGET && stratasnap rm KEY`. With --rw, `stratasnap diff KEY`
    turns the changes into a layer.

    \b
    Example:
      stratasnap --backend overlay image mount alpine /mnt/alpine --rw --key work-1
    """
    with _store() as store:
        img = store.get(ref)
        _unpack(store, img, False)
        key = key or _default_key(img.record.name, rw)
        parent = img.top_layer
        sn = store.sn
        mounts = sn.prepare(key, parent) if rw else sn.view(key, parent)
        try:
            mount_at(mounts, target)
        except BaseException:
            sn.remove(key)
            raise
    click.echo(key)


@click.command()
@click.argument("key")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the layer to FILE (atomically) instead of standard output.",
)
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd", "none"]),
    default="gzip",
    show_default=True,
    help="Compression of the layer tar.",
)
@_json_option
def diff(key: str, output: Path | None, compression: str, as_json: bool) -> None:
    """Write the changes of active snapshot KEY against its parent as an OCI layer.

    Deletions become OCI whiteouts. Prints the layer's digest, diff ID
    and size (JSON with --json) when writing to a file.

    \b
    Examples:
      stratasnap --backend overlay image mount alpine /mnt/a --rw --key work-1
      echo hi > /mnt/a/hello && umount /mnt/a
      stratasnap --backend overlay diff work-1 -o layer.tar.gz
      stratasnap diff work-1 --compression zstd > layer.tar.zst
    """
    import os
    import sys

    from ..images.diff import write_diff

    session = click.get_current_context().find_object(Session)
    assert session is not None
    sn = session.snapshotter()
    if output is None:
        if sys.stdout.isatty():
            raise click.UsageError("the layer is binary: redirect standard output or use -o FILE")
        write_diff(sn, key, sys.stdout.buffer, compression)
        return
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            layer = write_diff(sn, key, f, compression)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    desc = {
        "mediaType": layer.media_type,
        "digest": str(layer.digest),
        "size": layer.size,
        "diffID": str(layer.diff_id),
    }
    if as_json:
        click.echo(json.dumps(desc, indent=2))
    else:
        click.echo(f"{output}  {layer.digest}  diffID {layer.diff_id}  {human_size(layer.size)}")

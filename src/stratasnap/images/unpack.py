"""Unpack an image's layers into snapshots, the way containerd does.

Each layer is prepared on its parent's chain ID, applied, checked against
the config's ``rootfs.diff_ids``, and committed under its own chain ID (the
OCI image spec's definition), so images share layers and a layer that is
already committed is skipped. A layer that fails (a digest or diff-ID
mismatch, a hostile entry, a full disk) is removed again: nothing of it is
committed.

Only the public Snapshotter API is used. Where a layer lands is read from
the mounts ``prepare`` returns: a bind mount is written in place, an overlay
mount's upperdir is written with overlay whiteouts, anything else is mounted
on a temporary directory (root only).

A backend with a faster whole-layer path (the erofs backend's tar → EROFS
converter) offers it through :class:`LayerConverter`: unpack then still reads
the blob itself (decompression and the blob digest, in
:class:`~.layer_stream.LayerStream`) and hands the backend the uncompressed
tar; the diff ID the backend computed of what it read is checked against the
config's here, so no backend needs to know about blobs, compression or image
configs. Unpack never asks which backend it has.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, cast, runtime_checkable

from ..errors import AlreadyExists, FailedPrecondition, NotFound, from_os_error
from ..snapshotter import Snapshotter
from ..tarstream import TarFormatError
from ..types import Kind, Mount
from .apply import ApplyStats, Target, apply_tar
from .content import ContentStore, DigestMismatch
from .layer_stream import LayerStream
from .manifest import ImageConfig, Manifest, chain_ids, layer_compression
from .reference import Digest

__all__ = [
    "LAYER_LABEL",
    "LayerBlob",
    "LayerConverter",
    "UnpackStats",
    "in_progress_labels",
    "landing",
    "layer_converter",
    "remove_abandoned",
    "unpack",
]

#: Set on every layer snapshot unpack commits (value: the layer's diff ID), so that
#: ``image rm`` reclaims only layers it made, never containerd's.
LAYER_LABEL = "stratasnap.io/image.layer"
#: On the active snapshot a layer is applied in: the process applying it. A snapshot
#: whose process is gone (killed mid-unpack) is removed by the next unpack or gc.
UNPACK_PID_LABEL = "stratasnap.io/unpack.pid"


@dataclass(frozen=True)
class LayerBlob:
    """A layer to unpack: its blob file, and what that must hold."""

    path: Path
    digest: Digest
    compression: str
    diff_id: Digest


@runtime_checkable
class LayerConverter(Protocol):
    """Optional backend side: take a whole uncompressed layer tar into an active snapshot.

    ``converts_layers`` says whether this instance does it now (else the
    generic applier writes the layer into the snapshot's mounts).
    ``convert_layer(key, tar)`` reads the tar once, to its end, and makes it
    the content the next commit of active ``key`` records; it returns the
    tar's diff ID ("sha256:<hex>"), which unpack compares with the config's.
    """

    @property
    def converts_layers(self) -> bool: ...

    def convert_layer(self, key: str, tar: BinaryIO) -> str: ...


def layer_converter(sn: object) -> LayerConverter | None:
    """``sn`` when it takes whole layer tars now (``converts_layers``), else None."""
    # ``is True``: a flag, not anything truthy an object's __getattr__ might return.
    if isinstance(sn, LayerConverter) and sn.converts_layers is True:
        return sn
    return None


@dataclass
class UnpackStats:
    """What an unpack did, and where the time went."""

    layers: int = 0
    applied: int = 0
    converted: int = 0  # of the applied: taken whole by the backend (LayerConverter)
    skipped: int = 0
    bytes: int = 0
    files: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, what: str, seconds: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + seconds


def _split_escaped(value: str, sep: str = "") -> list[str]:
    """An overlay option value with ``\\`` escapes removed, split on unescaped ``sep``."""
    out: list[str] = []
    cur: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            cur.append(next(chars, ""))
        elif sep and ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


@contextmanager
def landing(mounts: Sequence[Mount]) -> Iterator[Target]:
    """Where to write a layer for a snapshot with ``mounts``."""
    if len(mounts) == 1 and mounts[0].type in ("bind", "rbind") and not mounts[0].target:
        yield Target(root=mounts[0].source)
        return
    if len(mounts) == 1 and mounts[0].type == "overlay":
        opts = dict(o.partition("=")[::2] for o in mounts[0].options)
        if "upperdir" in opts:
            yield Target(
                root=_split_escaped(opts["upperdir"])[0],
                overlay=True,
                lowers=tuple(p for p in _split_escaped(opts.get("lowerdir", ""), ":") if p),
                xattr_prefix="user." if "userxattr" in mounts[0].options else "trusted.",
            )
            return
    # Any other kind of mount (a loop-mounted image, a filesystem of its own): mount it.
    from ..fs.idmapped import apply_idmapped_mounts
    from ..fs.mount import unmount_all_under

    where = Path(tempfile.mkdtemp(prefix="stratasnap-unpack-"))
    try:
        apply_idmapped_mounts(mounts, where)
        try:
            yield Target(root=str(where))
        finally:
            unmount_all_under(where)
    finally:
        os.rmdir(where)


def _exists(sn: Snapshotter, name: str) -> bool:
    try:
        return sn.stat(name).kind is Kind.COMMITTED
    except NotFound:
        return False


def unpack(
    sn: Snapshotter,
    content: ContentStore,
    manifest: Manifest,
    config: ImageConfig,
    progress: Callable[[int], None] | None = None,
    on_layer: Callable[[int, Digest, str], None] | None = None,
    ready: Callable[[int], None] | None = None,
) -> UnpackStats:
    """Unpack every layer of ``manifest`` into committed snapshots named by chain ID.

    ``progress`` is called with compressed bytes as they are read;
    ``on_layer(index, chain_id, "skipped"|"applied")`` after each layer;
    ``ready(index)`` blocks until layer ``index``'s blob is in the content store
    (a pull downloads while earlier layers unpack).
    """
    chains = chain_ids(config.diff_ids)
    stats = UnpackStats(layers=len(chains))
    remove_abandoned(sn)
    parent = ""
    for i, (desc, diff_id, chain) in enumerate(
        zip(manifest.layers, config.diff_ids, chains, strict=True)
    ):
        name = str(chain)
        if _exists(sn, name):
            stats.skipped += 1
            if progress:
                progress(desc.size)
            if on_layer:
                on_layer(i, chain, "skipped")
            parent = name
            continue
        compression = layer_compression(desc)
        if ready:
            t0 = time.perf_counter()
            ready(i)
            stats.add_time("waiting for download", time.perf_counter() - t0)
        blob = LayerBlob(content.path(desc.digest), desc.digest, compression, diff_id)
        key = f"extract-{uuid.uuid4().hex[:12]} {name}"
        t0 = time.perf_counter()
        mounts = sn.prepare(key, parent, {LAYER_LABEL: str(diff_id), **in_progress_labels()})
        stats.add_time("prepare", time.perf_counter() - t0)
        try:
            applied = _apply_layer(sn, key, mounts, blob, progress, stats)
            stats.files += applied.files
            stats.bytes += applied.bytes
            t0 = time.perf_counter()
            sn.commit(name, key, {LAYER_LABEL: str(diff_id)})
            stats.add_time("commit", time.perf_counter() - t0)
        except AlreadyExists:
            # Another unpack committed the same layer meanwhile: use theirs.
            _discard(sn, key)
        except BaseException:
            _discard(sn, key)
            raise
        stats.applied += 1
        if on_layer:
            on_layer(i, chain, "applied")
        parent = name
    return stats


def in_progress_labels() -> dict[str, str]:
    """The labels of an active snapshot this process is filling: :func:`remove_abandoned`
    removes it once the process is gone (killed mid-layer)."""
    return {UNPACK_PID_LABEL: _process_id()}


def _process_id() -> str:
    """This process, as ``pid:start-time`` (a recycled pid has another start time)."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22 (starttime), counted after the parenthesised command name.
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def remove_abandoned(sn: Snapshotter) -> list[str]:
    """Remove the snapshots of unpacks whose process has died; return their keys."""
    removed = []
    for info in sn.walk(f'labels."{UNPACK_PID_LABEL}",kind==active'):
        pid_text, _, started = info.labels.get(UNPACK_PID_LABEL, "").partition(":")
        if pid_text.isdigit() and _start_time(int(pid_text)) == started and started:
            continue  # still running (maybe in another process)
        with suppress(NotFound, FailedPrecondition):
            sn.remove(info.name)
            removed.append(info.name)
    return removed


def _empty(root: str) -> None:
    with suppress(OSError), os.scandir(root) as it:
        for entry in list(it):
            with suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)


def _discard(sn: Snapshotter, key: str) -> None:
    with suppress(NotFound):
        sn.remove(key)


def _apply_layer(
    sn: Snapshotter,
    key: str,
    mounts: Sequence[Mount],
    blob: LayerBlob,
    progress: Callable[[int], None] | None,
    stats: UnpackStats,
) -> ApplyStats:
    converter = layer_converter(sn)
    t0 = time.perf_counter()
    try:
        if converter is not None:
            conv = converter
            try:
                applied, decompress = _read_blob(
                    blob, progress, lambda s: _convert(conv, key, s, blob), converted=True
                )
            except TarFormatError:
                # A layer only its parents make whole (a hard link to a file of a
                # lower layer) cannot be an image of its own: the converter refused
                # it and wrote nothing, so it is applied entry by entry instead (a
                # really bad tar is refused there too).
                converter = None
        if converter is None:
            applied, decompress = _read_blob(
                blob, progress, lambda s: _apply(s, mounts), converted=False
            )
    except FileNotFoundError as exc:
        if exc.filename == str(blob.path):
            raise NotFound(f"layer blob {blob.digest} is not in the content store") from None
        raise from_os_error(exc, f"applying layer {blob.digest}") from exc
    except OSError as exc:
        raise from_os_error(exc, f"applying layer {blob.digest}") from exc
    total = time.perf_counter() - t0
    if converter is not None:
        stats.converted += 1
    stats.add_time("convert" if converter is not None else "apply", total)
    stats.add_time("decompress+hash (overlapped)", decompress)
    return applied


def _read_blob(
    blob: LayerBlob,
    progress: Callable[[int], None] | None,
    take: Callable[[LayerStream], ApplyStats],
    *,
    converted: bool,
) -> tuple[ApplyStats, float]:
    """``take`` the layer's uncompressed tar; also the seconds spent decompressing."""
    with open(blob.path, "rb") as src:
        stream = LayerStream(
            src,
            blob.compression,
            blob.digest,
            blob.diff_id,
            progress,
            # The converter hashes what it reads (its answer is checked): one sha256
            # pass over the uncompressed layer instead of two.
            hash_diff_id=not converted,
        )
        try:
            return take(stream), stream.decompress_seconds
        finally:
            stream.close()


def _apply(stream: LayerStream, mounts: Sequence[Mount]) -> ApplyStats:
    """The generic way: the layer's entries written one by one where the mounts say."""
    with landing(mounts) as target:
        try:
            applied = apply_tar(stream, target)  # type: ignore[arg-type]
            stream.finish()
        except BaseException:
            # The snapshot is thrown away next; empty it first, so that a full disk
            # has room again for the store to record the removal.
            _empty(target.root)
            raise
    return applied


def _convert(
    converter: LayerConverter, key: str, stream: LayerStream, blob: LayerBlob
) -> ApplyStats:
    """The backend's way: the whole verified, uncompressed tar handed over at once."""
    got = converter.convert_layer(key, cast(BinaryIO, stream))
    stream.finish()  # the blob digest of what the backend read
    if got != str(blob.diff_id):
        raise DigestMismatch(
            f"layer {blob.digest}: uncompressed content has diff ID {got} "
            f"(as converted by the backend), the image config says {blob.diff_id}"
        )
    return ApplyStats()  # entries and files: the backend's business

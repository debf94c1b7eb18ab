"""Pull an image from a registry into an :class:`~stratasnap.images.store.ImageStore`.

Resolve the reference to a manifest (through an index, for the platform
asked), fetch the config, download the layers (a few at a time) while
unpacking them in order as each one arrives, then record the image. A pull
killed halfway leaves only partial blobs under ``content/ingest``, which the
next pull resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from ..metastore import ImageRecord
from .credentials import credentials_for
from .hosts import hosts_for
from .manifest import (
    Index,
    Manifest,
    Platform,
    host_platform,
    layer_compression,
    parse_config,
    parse_document,
)
from .reference import parse_reference
from .registry import Registry
from .store import ImageStore
from .unpack import UnpackStats, unpack

__all__ = ["PullOptions", "PullResult", "pull"]


@dataclass(frozen=True)
class PullOptions:
    platform: Platform | None = None
    user: str = ""
    plain_http: bool = False
    hosts_dir: str | Path | None = None
    unpack: bool = True
    parallel: int = 3


@dataclass(frozen=True)
class PullResult:
    record: ImageRecord
    stats: UnpackStats | None


def pull(
    store: ImageStore,
    ref_text: str,
    options: PullOptions = PullOptions(),
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> PullResult:
    """Pull ``ref_text`` into ``store`` (and unpack it); returns the image record."""
    ref = parse_reference(ref_text)
    want = options.platform or host_platform()
    hosts = hosts_for(ref.registry, ref.api_host, options.hosts_dir, options.plain_http)
    reg = Registry(ref, hosts, credentials_for(ref.registry, options.user))
    try:
        data, media, digest = reg.manifest(ref.object)
        doc = parse_document(data, media)
        if isinstance(doc, Index):
            desc = doc.select(want)
            data, media, digest = reg.manifest(str(desc.digest))
            doc = parse_document(data, desc.media_type or media)
        if not isinstance(doc, Manifest):
            raise InvalidArgument(f"{ref}: an index inside an index is not supported")
        for layer in doc.layers:
            layer_compression(layer)  # refuse foreign/unknown layers before downloading
        reg.fetch_blob(doc.config, store.content)
        config = parse_config(store.content.read(doc.config.digest), doc.layers)
        if total:
            total(sum(layer.size for layer in doc.layers) * (2 if options.unpack else 1))
        with ThreadPoolExecutor(max_workers=max(1, options.parallel)) as pool:
            futures: list[Future[None]] = [
                pool.submit(reg.fetch_blob, layer, store.content, progress) for layer in doc.layers
            ]
            try:
                stats = None
                if options.unpack:
                    stats = unpack(
                        store.sn,
                        store.content,
                        doc,
                        config,
                        progress,
                        ready=lambda i: futures[i].result(),
                    )
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        store.content.put(data, digest)
        record = store.add(str(ref), digest, doc.media_type, str(config.platform), str(ref))
        return PullResult(record, stats)
    finally:
        reg.close()

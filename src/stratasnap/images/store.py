"""Images of one stratasnap root: records (name → manifest) and their blobs and layers.

:class:`ImageStore` ties the content store (``<root>/content``), the image
records in the metadata store, and a snapshotter (for unpacking and
reclaiming layers). Removing an image reclaims every blob no remaining image
refers to and every layer snapshot unpack made that no image uses and no
other snapshot builds on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..metastore import ImageRecord, MetaStore
from ..snapshotter import Snapshotter
from ..types import Reclaimed
from .content import ContentStore
from .manifest import (
    ImageConfig,
    Manifest,
    chain_ids,
    parse_config,
    parse_document,
)
from .reference import Digest, parse_digest, parse_reference
from .unpack import LAYER_LABEL, UnpackStats, remove_abandoned, unpack

__all__ = ["Image", "ImageStore"]


@dataclass(frozen=True)
class Image:
    """An image record with its manifest and config read from the content store."""

    record: ImageRecord
    manifest: Manifest
    config: ImageConfig

    @property
    def chain_ids(self) -> list[Digest]:
        return chain_ids(self.config.diff_ids)

    @property
    def top_layer(self) -> str:
        """The committed snapshot holding the whole image (its last chain ID)."""
        chains = self.chain_ids
        if not chains:
            raise InvalidArgument(f"image {self.record.name!r} has no layers")
        return str(chains[-1])

    @property
    def size(self) -> int:
        """Bytes of its blobs (manifest not included)."""
        return self.manifest.config.size + sum(layer.size for layer in self.manifest.layers)


class ImageStore:
    """Image records, blobs and unpacked layers under one stratasnap ``root``."""

    def __init__(self, root: str | Path, snapshotter: Snapshotter) -> None:
        self.root = Path(root)
        self.sn = snapshotter
        self.content = ContentStore(self.root / "content")
        self._meta = MetaStore(self.root / "metadata.db")

    def close(self) -> None:
        self._meta.close()

    # -- records ---------------------------------------------------------------

    def add(
        self, name: str, manifest_digest: Digest, media_type: str, platform: str, source: str
    ) -> ImageRecord:
        """Record (or repoint) image ``name``; its manifest must be stored already."""
        if not self.content.has(manifest_digest):
            raise NotFound(f"manifest {manifest_digest} is not in the content store")
        with self._meta.write() as tx:
            return tx.put_image(
                ImageRecord(name, str(manifest_digest), media_type, platform, source)
            )

    def find(self, ref: str) -> ImageRecord:
        """The record for ``ref`` as given or normalised (``alpine`` finds
        ``docker.io/library/alpine:latest``); NotFound otherwise."""
        with self._meta.read() as tx:
            rec = tx.find_image(ref)
            if rec is None:
                try:
                    rec = tx.find_image(str(parse_reference(ref)))
                except InvalidArgument:
                    rec = None
        if rec is None:
            raise NotFound(f"image {ref!r} (see `stratasnap image ls`)")
        return rec

    def records(self) -> list[ImageRecord]:
        with self._meta.read() as tx:
            return tx.images()

    def load(self, rec: ImageRecord) -> Image:
        """The manifest and config of ``rec``, from the content store."""
        doc = parse_document(self.content.read(rec.digest), rec.media_type)
        if not isinstance(doc, Manifest):
            raise InvalidArgument(f"image {rec.name!r} points at an index, not a manifest")
        config = parse_config(self.content.read(doc.config.digest), doc.layers)
        return Image(rec, doc, config)

    def get(self, ref: str) -> Image:
        return self.load(self.find(ref))

    # -- unpack ------------------------------------------------------------------

    def unpack(
        self,
        image: Image,
        progress: Callable[[int], None] | None = None,
    ) -> UnpackStats:
        """Unpack ``image``'s layers (those not committed yet) into the snapshotter."""
        return unpack(self.sn, self.content, image.manifest, image.config, progress)

    # -- removal and garbage collection --------------------------------------------

    def remove(self, ref: str) -> Reclaimed:
        """Delete image ``ref``, then reclaim what no image uses any more."""
        rec = self.find(ref)
        with self._meta.write() as tx:
            tx.delete_image(rec.name)
        return self.gc()

    def gc(self) -> Reclaimed:
        """Reclaim blobs and layer snapshots (made by unpack) that no image uses."""
        keep_blobs: set[str] = set()
        keep_layers: set[str] = set()
        for rec in self.records():
            keep_blobs.add(rec.digest)
            try:
                image = self.load(rec)
            except (NotFound, InvalidArgument):
                continue  # a broken record keeps its manifest, nothing else
            keep_blobs.add(str(image.manifest.config.digest))
            keep_blobs.update(str(layer.digest) for layer in image.manifest.layers)
            keep_layers.update(str(c) for c in image.chain_ids)
        reclaimed = self.content.gc(parse_digest(d) for d in keep_blobs)
        removed = [f"snapshot {key}" for key in remove_abandoned(self.sn)]
        removed += self._gc_layers(keep_layers)
        return Reclaimed(paths=reclaimed.paths + tuple(removed), size=reclaimed.size)

    def _gc_layers(self, keep: set[str]) -> list[str]:
        """Remove unused layer snapshots, top first; ones with other children stay."""
        candidates = [
            info.name
            for info in self.sn.walk(f'labels."{LAYER_LABEL}",kind==committed')
            if info.name not in keep
        ]
        removed: list[str] = []
        progress = True
        while candidates and progress:
            progress = False
            for name in list(candidates):
                try:
                    self.sn.remove(name)
                except FailedPrecondition:
                    continue  # has children (a container, a newer layer): try next pass
                except NotFound:
                    pass
                removed.append(f"snapshot {name}")
                candidates.remove(name)
                progress = True
        return removed

"""OCI and Docker schema 2 documents: media types, descriptors, manifests, indexes, configs.

Parsing is strict about what matters for unpacking (digests, sizes, media
types, ``rootfs.diff_ids``) and says which document and field is wrong.
Docker schema 1 and foreign (non-distributable) layers are refused with an
error that names them.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument, Unimplemented
from .reference import Digest, parse_digest

__all__ = [
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "Compression",
    "Descriptor",
    "ImageConfig",
    "Index",
    "Manifest",
    "Platform",
    "host_platform",
    "layer_compression",
    "parse_config",
    "parse_document",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

Compression = str  # "none", "gzip" or "zstd"

_LAYER_TYPES: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
_FOREIGN = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]`` as OCI indexes name platforms."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    @staticmethod
    def parse(text: str) -> Platform:
        parts = text.split("/")
        if len(parts) == 1 and parts[0]:  # "arm64" alone means linux/arm64
            return Platform("linux", parts[0])
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(
                f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64"
            )
        return Platform(*parts)

    def matches(self, other: Platform) -> bool:
        """Whether an image built for ``other`` is what this platform asks for."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        # No variant asked: any; arm64's default variant is v8.
        if not self.variant:
            return True
        return self.variant == (other.variant or ("v8" if other.architecture == "arm64" else ""))


def host_platform() -> Platform:
    """This machine's platform (``linux/amd64`` …)."""
    machine = _platform.machine()
    arch = _GOARCH.get(machine, machine)
    return Platform("linux", arch, "v7" if machine == "armv7l" else "")


@dataclass(frozen=True)
class Descriptor:
    """A typed pointer to a blob: media type, digest, size (and platform in an index)."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform:
            out["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Manifest:
    """An image manifest: the config blob and the layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    """An image index (or Docker manifest list): one manifest per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]

    def select(self, want: Platform) -> Descriptor:
        """The manifest for ``want``; NotFound-like InvalidArgument lists what there is."""
        for d in self.manifests:
            if d.media_type in MANIFEST_TYPES and d.platform and want.matches(d.platform):
                return d
        # Some single-platform indexes (OCI layouts) carry no platform at all.
        bare = [d for d in self.manifests if d.media_type in MANIFEST_TYPES and not d.platform]
        if len(bare) == 1 and len(self.manifests) == 1:
            return bare[0]
        have = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
        raise InvalidArgument(f"no manifest for platform {want} in the index (it has: {have})")


@dataclass(frozen=True)
class ImageConfig:
    """What unpacking needs from an image config, and the raw document for inspect."""

    diff_ids: tuple[Digest, ...]
    platform: Platform
    raw: Mapping[str, Any]


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return doc


def _descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{what}: not a descriptor object")
    try:
        media = obj.get("mediaType", "")
        digest = parse_digest(str(obj["digest"]))
        size = obj["size"]
    except KeyError as exc:
        raise InvalidArgument(f"{what}: descriptor lacks {exc.args[0]!r}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: size {size!r} is not a non-negative integer")
    plat = obj.get("platform")
    platform = None
    if isinstance(plat, dict) and plat.get("os") and plat.get("architecture"):
        platform = Platform(
            str(plat["os"]), str(plat["architecture"]), str(plat.get("variant", ""))
        )
    annotations = obj.get("annotations") or {}
    urls = tuple(str(u) for u in obj.get("urls") or ())
    return Descriptor(str(media), digest, size, platform, dict(annotations), urls)


def parse_document(data: bytes, media_type: str = "") -> Manifest | Index:
    """A manifest or index from its bytes; ``media_type`` is the transport's (may be empty)."""
    doc = _load(data, "manifest")
    media = str(doc.get("mediaType") or media_type)
    if media in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise Unimplemented(
            "Docker schema 1 manifests are not supported (the image is from before 2017): "
            "re-push it with a current docker or skopeo to convert it to schema 2"
        )
    if not media:  # OCI allows omitting it: tell by the shape
        media = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument("image index has no 'manifests' list")
        return Index(
            media, tuple(_descriptor(m, f"index entry {i}") for i, m in enumerate(entries))
        )
    if media not in MANIFEST_TYPES:
        raise Unimplemented(f"unsupported manifest media type {media!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidArgument("image manifest has no 'layers' list")
    config = _descriptor(doc.get("config"), "manifest config")
    return Manifest(
        media, config, tuple(_descriptor(layer, f"layer {i}") for i, layer in enumerate(layers))
    )


def layer_compression(desc: Descriptor) -> Compression:
    """How a layer blob is compressed; foreign and unknown layers are refused by name."""
    if desc.media_type in _FOREIGN or desc.urls:
        raise Unimplemented(
            f"layer {desc.digest} is a foreign (non-distributable) layer of type "
            f"{desc.media_type!r}: it is not in the registry and cannot be unpacked"
        )
    try:
        return _LAYER_TYPES[desc.media_type]
    except KeyError:
        raise Unimplemented(
            f"layer {desc.digest}: unsupported media type {desc.media_type!r}"
        ) from None


def parse_config(data: bytes, layers: Sequence[Descriptor] = ()) -> ImageConfig:
    """The image config; checks it has one diff ID per layer."""
    doc = _load(data, "image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidArgument("image config has no rootfs.diff_ids")
    diff_ids = tuple(parse_digest(str(d)) for d in rootfs["diff_ids"])
    if layers and len(diff_ids) != len(layers):
        raise InvalidArgument(
            f"image config lists {len(diff_ids)} diff IDs for {len(layers)} layers"
        )
    plat = Platform(
        str(doc.get("os", "linux")), str(doc.get("architecture", "")), str(doc.get("variant", ""))
    )
    return ImageConfig(diff_ids, plat, doc)


def chain_id(parent: Digest | None, diff_id: Digest) -> Digest:
    """The OCI chain ID of layer ``diff_id`` on the chain ``parent`` (None: a base layer).

    ``ChainID(L0) = DiffID(L0)``, then ``ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))``.
    """
    return diff_id if parent is None else Digest.of(f"{parent} {diff_id}".encode())


def chain_ids(diff_ids: Sequence[Digest]) -> list[Digest]:
    """The OCI chain IDs of a stack of layers, bottom first (see :func:`chain_id`)."""
    out: list[Digest] = []
    for d in diff_ids:
        out.append(chain_id(out[-1] if out else None, d))
    return out

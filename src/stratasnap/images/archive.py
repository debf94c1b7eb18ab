"""Image archives as sources: an OCI image layout (a directory or a tar of one) and
``docker save`` tars.

An OCI layout is ``oci-layout`` + ``index.json`` + ``blobs/<alg>/<hex>``;
the names come from each index entry's ``io.containerd.image.name``
annotation, else ``org.opencontainers.image.ref.name`` (a full reference,
or a tag joined to ``--name``). A ``docker save`` tar has ``manifest.json``
listing each image's config file, ``RepoTags`` and layer tars; stratasnap
writes the Docker schema 2 manifest for it. Every blob is verified as it is
copied into the content store.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import InvalidArgument, NotFound
from .content import ContentStore
from .manifest import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    host_platform,
    parse_document,
)
from .reference import Digest, parse_reference

__all__ = ["Imported", "import_archive"]

_NAME_ANNOTATION = "io.containerd.image.name"
_REF_ANNOTATION = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Imported:
    """One image an archive held: its name and the manifest chosen for the platform."""

    name: str
    manifest: Descriptor
    platform: str


class _Source(Protocol):
    def exists(self, member: str) -> bool: ...
    def open(self, member: str) -> BinaryIO: ...


class _DirSource:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, member: str) -> Path:
        p = (self.root / member).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise InvalidArgument(f"archive member {member!r} points outside {self.root}")
        return p

    def exists(self, member: str) -> bool:
        return self._path(member).is_file()

    def open(self, member: str) -> BinaryIO:
        try:
            return open(self._path(member), "rb")
        except FileNotFoundError:
            raise NotFound(f"{member} in {self.root}") from None


class _TarSource:
    def __init__(self, tar: tarfile.TarFile, path: Path) -> None:
        self.tar = tar
        self.path = path
        self.members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

    def exists(self, member: str) -> bool:
        return member.removeprefix("./") in self.members

    def open(self, member: str) -> BinaryIO:
        info = self.members.get(member.removeprefix("./"))
        f = self.tar.extractfile(info) if info else None
        if f is None:
            raise NotFound(f"{member} in {self.path}")
        return f  # type: ignore[return-value]


@contextmanager
def _open_source(path: Path) -> Iterator[_Source]:
    if path.is_dir():
        yield _DirSource(path)
        return
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.ReadError, OSError) as exc:
        raise InvalidArgument(
            f"{path}: not an OCI layout directory or an image tar ({exc})"
        ) from None
    with tar:
        yield _TarSource(tar, path)


def _read(src: _Source, member: str, limit: int = 16 << 20) -> bytes:
    with src.open(member) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidArgument(f"{member} is larger than {limit} bytes")
    return data


def _blob_member(d: Digest) -> str:
    return f"blobs/{d.algorithm}/{d.hex}"


def _copy_blob(
    src: _Source, content: ContentStore, desc: Descriptor, progress: Callable[[int], None] | None
) -> None:
    if content.has(desc.digest):
        if progress:
            progress(desc.size)
        return
    with src.open(_blob_member(desc.digest)) as f, content.writer(desc.digest, desc.size) as w:
        w.restart()
        while chunk := f.read(1 << 20):
            w.write(chunk)
            if progress:
                progress(len(chunk))


def import_archive(
    path: str | Path,
    content: ContentStore,
    *,
    name: str = "",
    platform: Platform | None = None,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> list[Imported]:
    """Copy the images of the archive at ``path`` into ``content``; return what it held.

    ``name`` names the image (or, when entries carry bare tags, is the
    repository they are joined to). ``total(bytes)`` is told how many blob
    bytes will be copied, before ``progress`` counts them.
    """
    p = Path(path)
    want = platform or host_platform()
    with _open_source(p) as src:
        if src.exists("index.json"):
            return _import_oci(src, content, name, want, progress, total)
        if src.exists("manifest.json"):
            return _import_docker(src, content, name, progress, total)
    raise InvalidArgument(f"{p}: neither an OCI image layout (index.json) nor a docker save tar")


def _import_oci(
    src: _Source,
    content: ContentStore,
    name: str,
    want: Platform,
    progress: Callable[[int], None] | None,
    total: Callable[[int], None] | None,
) -> list[Imported]:
    index = parse_document(_read(src, "index.json"))
    if not isinstance(index, Index):
        raise InvalidArgument("index.json is not an image index")
    chosen: list[tuple[str, Descriptor, Manifest]] = []
    for entry in index.manifests:
        desc = entry
        doc = parse_document(_read(src, _blob_member(desc.digest)), desc.media_type)
        if isinstance(doc, Index):
            desc = doc.select(want)
            # Keep the child index too: it is what the entry names.
            content.put(_read(src, _blob_member(entry.digest)), entry.digest)
            doc = parse_document(_read(src, _blob_member(desc.digest)), desc.media_type)
        elif entry.platform and not want.matches(entry.platform):
            continue
        assert isinstance(doc, Manifest)
        chosen.append((_oci_name(entry, name, len(index.manifests)), desc, doc))
    if not chosen:
        raise InvalidArgument(f"the archive has no image for platform {want}")
    if total:
        total(sum(m.config.size + sum(x.size for x in m.layers) for _, _, m in chosen))
    out = []
    for image_name, desc, doc in chosen:
        for blob in (doc.config, *doc.layers):
            _copy_blob(src, content, blob, progress)
        content.put(_read(src, _blob_member(desc.digest)), desc.digest)
        out.append(Imported(image_name, desc, str(want)))
    return out


def _oci_name(entry: Descriptor, given: str, entries: int) -> str:
    full = entry.annotations.get(_NAME_ANNOTATION, "")
    ref = entry.annotations.get(_REF_ANNOTATION, "")
    if given and (entries == 1 or not (full or ref)):
        if ref and "/" not in ref and ":" not in ref and ":" not in given.rpartition("/")[2]:
            return str(parse_reference(f"{given}:{ref}"))
        return str(parse_reference(given))
    if full:
        return full
    if ref and ("/" in ref or ":" in ref):
        return str(parse_reference(ref))
    if ref and given:
        return str(parse_reference(f"{given}:{ref}"))
    raise InvalidArgument(
        f"archive entry {entry.digest} has no image name"
        + (f" (only the tag {ref!r})" if ref else "")
        + ": name it with --name REPOSITORY[:TAG]"
    )


def _import_docker(
    src: _Source,
    content: ContentStore,
    name: str,
    progress: Callable[[int], None] | None,
    total: Callable[[int], None] | None,
) -> list[Imported]:
    try:
        entries = json.loads(_read(src, "manifest.json"))
        assert isinstance(entries, list)
    except (ValueError, AssertionError):
        raise InvalidArgument("manifest.json of the docker save tar is malformed") from None
    out: list[Imported] = []
    for entry in entries:
        config_data = _read(src, str(entry["Config"]))
        config_digest = content.put(config_data)
        cfg = json.loads(config_data)
        layers = []
        for member in entry["Layers"]:
            with src.open(str(member)) as f:
                head = f.read(4)
            media = "application/vnd.docker.image.rootfs.diff.tar"
            if head[:2] == b"\x1f\x8b":
                media += ".gzip"
            elif head == b"\x28\xb5\x2f\xfd":
                media += ".zstd"
            with src.open(str(member)) as f:
                digest, size = content.put_unknown(f, progress)
            layers.append({"mediaType": media, "digest": str(digest), "size": size})
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG,
                "digest": str(config_digest),
                "size": len(config_data),
            },
            "layers": layers,
        }
        data = json.dumps(manifest, indent=3).encode()
        digest = content.put(data)
        plat = Platform(str(cfg.get("os", "linux")), str(cfg.get("architecture", "")))
        desc = Descriptor(DOCKER_MANIFEST, digest, len(data), plat)
        tags = [str(t) for t in entry.get("RepoTags") or []]
        if name:
            tags = [name]
        if not tags:
            raise InvalidArgument(
                f"docker save entry {entry['Config']} has no RepoTags: name it with --name"
            )
        out.extend(Imported(str(parse_reference(t)), desc, str(plat)) for t in tags)
    return out

"""Build OCI image archives with the standard library: no registry, no network.

A :class:`Layer` is a layer tar made entry by entry (directories, files,
symlinks, whiteouts); :func:`write_oci_archive` packs layers into an OCI
image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``: manifest,
config with ``rootfs.diff_ids`` and a ``Cmd``) inside one tar, which
``ctr images import`` reads. :func:`host_rootfs_layer` makes a minimal
rootfs from this machine's own binaries (a static busybox is not at hand):
``/bin/sh`` (dash), ``cat``, ``ls`` and the shared libraries ``ldd`` names.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import random
import re
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "ImageInfo",
    "Layer",
    "chain_ids",
    "generated_layers",
    "host_rootfs_layer",
    "write_oci_archive",
]

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

#: Every entry gets this mtime: the same inputs give the same digests.
EPOCH = 1_700_000_000

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


def goarch() -> str:
    """The OCI/Go name of this machine's architecture (``amd64``…)."""
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layer:
    """A layer tar, built entry by entry. Paths are relative to the rootfs (``bin/sh``).

    Parent directories are not added implicitly: a layer that adds
    ``a/b/c`` should add ``a`` and ``a/b`` first (as image builders do).
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 (closed by tar())
            fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT
        )
        self._dirs: set[str] = set()
        self._finished = False
        self.files = 0
        self.bytes = 0

    @staticmethod
    def _info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(str(PurePosixPath(path.strip("/"))))
        ti.type = kind
        ti.mode = mode
        ti.mtime = EPOCH
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    def dir(self, path: str, mode: int = 0o755) -> Layer:
        """Add a directory (once: a second call for the same path does nothing)."""
        path = path.strip("/")
        if path not in self._dirs:
            self._dirs.add(path)
            self._tar.addfile(self._info(path, tarfile.DIRTYPE, mode))
        return self

    def dirs(self, path: str) -> Layer:
        """Add ``path`` and each of its parent directories (``a``, ``a/b``, ``a/b/c``)."""
        parts = PurePosixPath(path.strip("/")).parts
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))
        return self

    def file(
        self,
        path: str,
        data: bytes | str,
        mode: int = 0o644,
        *,
        owner: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None,
    ) -> Layer:
        """Add a regular file holding ``data`` (PAX ``SCHILY.xattr.*`` for ``xattrs``)."""
        raw = data.encode() if isinstance(data, str) else data
        ti = self._info(path, tarfile.REGTYPE, mode)
        ti.uid, ti.gid = owner
        ti.size = len(raw)
        if xattrs:
            ti.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
            }
        self._tar.addfile(ti, io.BytesIO(raw))
        self.files += 1
        self.bytes += len(raw)
        return self

    def hardlink(self, path: str, target: str) -> Layer:
        """A hard link at ``path`` to the earlier entry ``target``."""
        ti = self._info(path, tarfile.LNKTYPE, 0o644)
        ti.linkname = target.strip("/")
        self._tar.addfile(ti)
        return self

    def device(self, path: str, char: bool, major: int, minor: int, mode: int = 0o666) -> Layer:
        ti = self._info(path, tarfile.CHRTYPE if char else tarfile.BLKTYPE, mode)
        ti.devmajor, ti.devminor = major, minor
        self._tar.addfile(ti)
        return self

    def fifo(self, path: str, mode: int = 0o644) -> Layer:
        self._tar.addfile(self._info(path, tarfile.FIFOTYPE, mode))
        return self

    def raw(self, ti: tarfile.TarInfo, data: bytes = b"") -> Layer:
        """Add an entry exactly as given (hostile layers in tests)."""
        ti.size = len(data)
        self._tar.addfile(ti, io.BytesIO(data) if data else None)
        return self

    def symlink(self, path: str, target: str) -> Layer:
        ti = self._info(path, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def whiteout(self, path: str) -> Layer:
        """Delete ``path`` of a lower layer: an empty ``.wh.<name>`` next to it."""
        p = PurePosixPath(path.strip("/"))
        return self.file(str(p.parent / f".wh.{p.name}"), b"")

    def opaque(self, directory: str) -> Layer:
        """Hide everything lower layers put in ``directory`` (``.wh..wh..opq``)."""
        return self.file(str(PurePosixPath(directory.strip("/")) / ".wh..wh..opq"), b"")

    def tar(self) -> bytes:
        """The finished, uncompressed layer tar (the layer can take no more entries)."""
        if not self._finished:
            self._tar.close()
            self._finished = True
        return self._buf.getvalue()


# -- a rootfs from the host's binaries ---------------------------------------------------

_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def shared_libraries(binary: str) -> list[str]:
    """The paths ``ldd`` names for ``binary`` (libraries and the dynamic loader)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for line in out.splitlines() if (m := _LDD_PATH.search(line))]


def host_rootfs_layer(
    binaries: Sequence[str] = ("/bin/sh", "/bin/cat", "/bin/ls"),
) -> Layer:
    """A layer holding ``binaries`` (their real contents, at their usual paths) and libraries.

    ``/bin/sh`` is a symlink to dash on Debian: the layer gets dash's bytes at
    ``bin/sh``. Each library goes where ``ldd`` says the loader finds it
    (``lib/x86_64-linux-gnu/libc.so.6``, ``lib64/ld-linux-x86-64.so.2``).
    Also adds the directories a container runtime mounts on.
    """
    layer = Layer()
    for d in ("dev", "proc", "sys", "tmp", "etc", "run"):
        layer.dir(d, 0o1777 if d == "tmp" else 0o755)
    wanted: dict[str, str] = {}
    for b in binaries:
        wanted[b] = os.path.realpath(b)
        for lib in shared_libraries(b):
            wanted.setdefault(lib, os.path.realpath(lib))
    for dest in sorted(wanted):
        layer.dirs(str(PurePosixPath(dest).parent))
        data = Path(wanted[dest]).read_bytes()
        layer.file(dest, data, 0o755)
    layer.file("etc/passwd", "root:x:0:0:root:/:/bin/sh\n")
    layer.file("etc/group", "root:x:0:\n")
    return layer


# -- big generated layers (benchmarks) ---------------------------------------------------


def generated_layers(
    layers: int = 3,
    files_per_layer: int = 10_000,
    mean_size: int = 10_000,
    seed: int = 42,
) -> list[Layer]:
    """Layers of generated files: ``files_per_layer`` each, sizes averaging ``mean_size``.

    File contents are half random, half repeated bytes (compresses about 2:1,
    like real images). Directories of 100 files, 2 levels deep; each layer
    after the first also overwrites a few files of the one before.
    """
    rng = random.Random(seed)
    pool = rng.randbytes(1 << 20)
    out = []
    for n in range(layers):
        layer = Layer()
        layer.dir(f"data{n}")
        for i in range(files_per_layer):
            d = f"data{n}/d{i // 1000:03d}/e{(i // 100) % 10}"
            layer.dirs(d)
            size = min(int(rng.expovariate(1 / mean_size)), 1 << 20)
            half = size // 2
            off = rng.randrange(0, len(pool) - half) if half < len(pool) else 0
            data = pool[off : off + half] + bytes([i % 251]) * (size - half)
            layer.file(f"{d}/f{i:06d}", data)
        if n:
            for i in range(0, files_per_layer, max(files_per_layer // 50, 1)):
                d = f"data{n - 1}/d{i // 1000:03d}/e{(i // 100) % 10}"
                layer.dirs(d)
                layer.file(f"{d}/f{i:06d}", f"overwritten by layer {n}\n")
        out.append(layer)
    return out


# -- the OCI archive ---------------------------------------------------------------------


@dataclass
class ImageInfo:
    """What :func:`write_oci_archive` wrote: digests, for the tests to check against."""

    name: str
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]
    layer_digests: list[str]
    chain_ids: list[str] = field(default_factory=list)
    size: int = 0


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """The OCI chain IDs of ``diff_ids``: containerd names committed layer snapshots so."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else _digest(f"{out[-1]} {d}".encode()))
    return out


def write_oci_archive(
    path: str | Path,
    name: str,
    layers: Sequence[Layer | bytes],
    *,
    cmd: Sequence[str] = ("/bin/sh",),
    env: Sequence[str] = ("PATH=/bin:/usr/bin",),
    compress: bool | str = True,
    compresslevel: int = 6,
    arch: str = "",
    layout_dir: bool = False,
    claimed_diff_ids: Sequence[str] | None = None,
) -> ImageInfo:
    """Write an OCI image layout holding one image, as a tar at ``path``.

    ``compress`` is True/"gzip", "zstd", or False/"none"; ``arch`` overrides the
    config's architecture; ``layout_dir`` writes a directory instead of a tar
    (what ``umoci`` and ``skopeo`` read as ``oci:DIR``); ``claimed_diff_ids``
    replaces the true diff IDs in the config (an image that lies about its layers).

    ``name`` (``registry/repo:tag``) goes into the manifest's
    ``io.containerd.image.name`` annotation, which ``ctr images import`` uses
    as the image name; the tag also goes into ``org.opencontainers.image.ref.name``.
    """
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        d = _digest(data)
        blobs[d] = data
        return d, len(data)

    diff_ids, layer_descs = [], []
    for layer in layers:
        raw = layer.tar() if isinstance(layer, Layer) else layer
        diff_ids.append(_digest(raw))
        kind = compress if isinstance(compress, str) else ("gzip" if compress else "none")
        if kind == "gzip":
            stored, media = gzip.compress(raw, compresslevel, mtime=0), MEDIA_LAYER_GZIP
        elif kind == "zstd":
            import zstandard

            stored, media = zstandard.ZstdCompressor().compress(raw), MEDIA_LAYER + "+zstd"
        else:
            stored, media = raw, MEDIA_LAYER
        d, size = blob(stored)
        layer_descs.append({"mediaType": media, "digest": d, "size": size})

    arch = arch or goarch()
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Env": list(env), "Cmd": list(cmd), "WorkingDir": "/"},
        "rootfs": {
            "type": "layers",
            "diff_ids": list(claimed_diff_ids) if claimed_diff_ids else diff_ids,
        },
        "history": [
            {"created": "2023-11-14T22:13:20Z", "created_by": f"stratasnap e2e layer {i}"}
            for i in range(len(diff_ids))
        ],
    }
    config_digest, config_size = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    }
    manifest_digest, manifest_size = blob(json.dumps(manifest, sort_keys=True).encode())
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }

    if layout_dir:
        root = Path(path)
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        (root / "index.json").write_text(json.dumps(index, sort_keys=True))
        for d, data in blobs.items():
            (root / "blobs" / "sha256" / d.removeprefix("sha256:")).write_bytes(data)
    else:
        _write_tar(Path(path), index, blobs)
    return ImageInfo(
        name=name,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        diff_ids=diff_ids,
        layer_digests=[str(d["digest"]) for d in layer_descs],
        chain_ids=chain_ids(diff_ids),
        size=sum(len(b) for b in blobs.values()),
    )


def _write_tar(path: Path, index: object, blobs: dict[str, bytes]) -> None:
    def add(tar: tarfile.TarFile, member: str, data: bytes) -> None:
        ti = tarfile.TarInfo(member)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, EPOCH
        tar.addfile(ti, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        for ti_dir in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(ti_dir)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(ti)
        for d, data in blobs.items():
            add(tar, f"blobs/sha256/{d.removeprefix('sha256:')}", data)

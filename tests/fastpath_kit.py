"""The remote-snapshot fast path's test kit: containerd's content service, a layered image.

:class:`ContentServer` is a test double of containerd's content service: real
gRPC on a unix socket, real blobs.

It serves ``containerd.services.content.v1.Content`` (Info, Read, Status,
ListStatuses) from a directory, per namespace, the way containerd answers:
Info is NotFound while a blob is still being written (an "ingest", listed by
ListStatuses with ref ``layer-<digest>`` and no ``expected``), Read streams
1 MiB messages with their offsets, and a call without the
``containerd-namespace`` header is refused as containerd refuses it.

:class:`Image` is two gzip layers (the second whites out a file of the
first), :func:`fast_stacks` makes stratasnap servers whose fast path reads from a
ContentServer, and the rest what containerd sends and looks for.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from stratasnap.backends.native import NativeSnapshotter
from stratasnap.images.apply import Target, apply_tar
from stratasnap.server.api.containerd.services.content.v1 import content_pb2 as pb
from stratasnap.server.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from stratasnap.server.client import Client
from stratasnap.server.config import FastPathConfig, load_config
from stratasnap.server.daemon import Server
from stratasnap.server.fastpath import LAYER_DIGEST_LABEL, REF_LABEL, TEMP_PREFIX
from stratasnap.snapshotter import Snapshotter

CHUNK = 1 << 20


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ContentServer(pb_grpc.ContentServicer):
    """Blobs under ``root/<namespace>/<algorithm>/<hex>``, served on ``address``."""

    def __init__(self, address: Path, root: Path) -> None:
        self.address = address
        self.root = root
        self.calls: Counter[str] = Counter()
        self.namespaces: set[str] = set()
        self._ingests: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_ContentServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix:{address}")

    def __enter__(self) -> ContentServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0).wait()

    # -- the test's side -----------------------------------------------------------------

    def _path(self, namespace: str, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.root / namespace / algorithm / hexpart

    def add(self, namespace: str, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` as committed blob ``digest`` (default: its real digest)."""
        digest = digest or digest_of(data)
        path = self._path(namespace, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
        with self._lock:
            self._ingests.discard((namespace, digest))
        return digest

    def fetching(self, namespace: str, digest: str) -> None:
        """containerd has begun writing ``digest`` (not yet committed)."""
        with self._lock:
            self._ingests.add((namespace, digest))

    # -- the service ---------------------------------------------------------------------

    def _namespace(self, context: grpc.ServicerContext, method: str) -> str:
        self.calls[method] += 1
        for key, value in context.invocation_metadata() or ():
            if key == "containerd-namespace":
                ns = value if isinstance(value, str) else value.decode()
                self.namespaces.add(ns)
                return ns
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "namespace is required")
        raise AssertionError  # abort raises

    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:
        ns = self._namespace(context, "Info")
        path = self._path(ns, request.digest)
        if not path.is_file():
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
        return pb.InfoResponse(info=pb.Info(digest=request.digest, size=path.stat().st_size))

    def Read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        ns = self._namespace(context, "Read")
        path = self._path(ns, request.digest)
        if not path.is_file():
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
        with path.open("rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while chunk := f.read(CHUNK):
                yield pb.ReadContentResponse(offset=offset, data=chunk)
                offset += len(chunk)

    def ListStatuses(self, request: Any, context: grpc.ServicerContext) -> Any:
        ns = self._namespace(context, "ListStatuses")
        with self._lock:
            refs = [f"layer-{d}" for n, d in self._ingests if n == ns]
        return pb.ListStatusesResponse(statuses=[pb.Status(ref=r, offset=1) for r in refs])

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        ns = self._namespace(context, "Status")
        with self._lock:
            known = any(f"layer-{d}" == request.ref for n, d in self._ingests if n == ns)
        if not known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"ref {request.ref}: not found")
        return pb.StatusResponse(status=pb.Status(ref=request.ref))


NS = "k8s.io"


class ConvertingNative(NativeSnapshotter):
    """native plus the backend seam the fast path calls (what erofs offers)."""

    converts_layers = True

    def convert_layer(self, key: str, tar: BinaryIO) -> str:
        root = self.mounts(key)[0].source
        hasher = hashlib.sha256()

        class Hashing(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, b: Any) -> int:
                n: int = tar.readinto(b)  # type: ignore[attr-defined]
                hasher.update(memoryview(b)[:n])
                return n

        stream = Hashing()
        apply_tar(stream, Target(root))  # type: ignore[arg-type]
        while stream.read(1 << 16):
            pass
        return "sha256:" + hasher.hexdigest()


def layer_tar(files: dict[str, bytes], whiteouts: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            ti.uid, ti.gid = os.getuid(), os.getgid()
            tar.addfile(ti, io.BytesIO(data))
        for name in whiteouts:
            head, _, base = name.rpartition("/")
            ti = tarfile.TarInfo(f"{head}/.wh.{base}" if head else f".wh.{base}")
            ti.uid, ti.gid = os.getuid(), os.getgid()
            tar.addfile(ti, io.BytesIO(b""))
    return buf.getvalue()


class Image:
    """Two layers (the second deletes a file of the first), their blobs and chain IDs."""

    def __init__(self) -> None:
        self.tars = [
            layer_tar(
                {"etc/hello": b"hello\n", "etc/gone": b"old\n", "bin/big": os.urandom(3 << 20)}
            ),
            layer_tar({"etc/hello": b"hello again\n"}, whiteouts=("etc/gone",)),
        ]
        self.blobs = [gzip.compress(t, compresslevel=1) for t in self.tars]
        self.digests = [digest_of(b) for b in self.blobs]
        self.diff_ids = [digest_of(t) for t in self.tars]
        # The OCI definition, written out here rather than taken from the code under test.
        on_base = hashlib.sha256(f"{self.diff_ids[0]} {self.diff_ids[1]}".encode()).hexdigest()
        self.chains = [self.diff_ids[0], f"sha256:{on_base}"]

    def labels(self, i: int, **extra: str) -> dict[str, str]:
        return {
            REF_LABEL: self.chains[i],
            LAYER_DIGEST_LABEL: self.digests[i],
            "containerd.io/snapshot/cri.image-ref": "example.test/app:1",
            **extra,
        }


Stack = tuple[Client, ContentServer, Server]


@contextlib.contextmanager
def fast_stacks(scratch: Path) -> Iterator[Callable[..., Stack]]:
    """Makes stratasnap servers whose fast path reads from a content server double.

    ``make(backend, content=True, options=None, **fast_path settings)``:
    ``backend`` is a backend name or a Snapshotter class; without ``content``
    no content server listens (containerd is down). All stopped at the end.
    """
    started: list[Any] = []

    def make(
        backend: type[Snapshotter] | str = ConvertingNative,
        content: bool = True,
        options: dict[str, Any] | None = None,
        **fast: Any,
    ) -> Stack:
        csock = scratch / "containerd.sock"
        settings: dict[str, Any] = {
            "containerd_address": csock,
            "fetch_timeout": 5.0,
            "fetch_start_timeout": 0.3,
        }
        settings.update(fast)
        config = load_config(
            root=scratch / "root",
            address=scratch / "ss.sock",
            backend=backend if isinstance(backend, str) else None,
            options=options,
        )
        config = replace(config, fast_path=FastPathConfig(**settings))
        # Down: not even a socket at containerd_address (the double binds elsewhere).
        cs = ContentServer(csock if content else scratch / "down.sock", scratch / "blobs")
        if content:
            cs.__enter__()
            started.append(cs)
        if isinstance(backend, str):
            server = Server(config)
        else:
            server = Server(config, opener=lambda sc: backend(sc.root))  # type: ignore[call-arg]
        server.start()
        started.append(server)
        client = Client(server.address, namespace=NS, timeout=30)
        started.append(client)
        return client, cs, server

    try:
        yield make
    finally:
        _stop(started)


def _stop(started: list[Any]) -> None:
    for thing in reversed(started):
        if isinstance(thing, Server):
            thing.stop()
        elif isinstance(thing, ContentServer):
            thing.__exit__()
        else:
            thing.close()


def key(seq: int, chain: str) -> str:
    """The backend key containerd's unpacker sends for a layer."""
    return f"{NS}/{seq}/extract-{seq:09d}-abcd {chain}"


def sample(server: Server, metric: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(
        metric, {"snapshotter": "stratasnap", **labels}
    )
    return value or 0.0


def walk_like_containerd(client: Client, target: str, parent: str) -> list[Any]:
    # The exact filter of containerd's metadata createSnapshot after AlreadyExists.
    return list(client.walk(f'labels."containerd.io/snapshot.ref"=={target},parent=="{parent}"'))


def no_temporaries(client: Client) -> None:
    assert not [i.name for i in client.walk() if i.name.startswith(TEMP_PREFIX)]

"""A test double of containerd's content service: real gRPC on a unix socket, real blobs.

It serves ``containerd.services.content.v1.Content`` (Info, Read, Status,
ListStatuses) from a directory, per namespace, the way containerd answers:
Info is NotFound while a blob is still being written (an "ingest", listed by
ListStatuses with ref ``layer-<digest>`` and no ``expected``), Read streams
1 MiB messages with their offsets, and a call without the
``containerd-namespace`` header is refused as containerd refuses it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from stratasnap.server.api.containerd.services.content.v1 import content_pb2 as pb
from stratasnap.server.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc

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
        pb_grpc.add_ContentServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
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

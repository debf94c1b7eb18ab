"""A Python client of the snapshots service: the Snapshotter protocol over a socket.

It talks to stratasnap (or any containerd snapshots v1 server) the way
containerd's proxy snapshotter does, and turns gRPC statuses back into
:mod:`stratasnap.errors` classes like containerd's ``errgrpc.ToNative``
(the trailing ``": not found"`` of the message is the class, the rest the
context), so ``str(error)`` is the server's message::

    with Client("/run/stratasnap/stratasnap.sock") as sn:
        sn.prepare("k")
        for info in sn.walk("kind==active"):
            ...

Used by the server tests, the benchmarks, and anything that wants to drive
a running server from Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    Unavailable,
    Unimplemented,
)
from ..types import Info, Mount, Reclaimed, Usage
from .api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from .api.containerd.types import mount_pb2
from .service import NAMESPACE_HEADER, info_from_proto, info_to_proto

__all__ = ["Client", "error_from_rpc"]

_CLASSES: dict[int, type[SnapshotError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        FailedPrecondition,
        Unimplemented,
        Unavailable,
    )
}

_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def error_from_rpc(error: grpc.RpcError) -> SnapshotError:
    """The stratasnap error a failed call stands for (``.grpc_code`` is the status)."""
    code_obj = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or ""
    code = int(code_obj.value[0])
    cls = _CLASSES.get(code, SnapshotError)
    suffix = f": {cls.kind_text}"
    if cls is not SnapshotError and details == cls.kind_text:
        exc = cls()
    elif cls is not SnapshotError and details.endswith(suffix):
        exc = cls(details[: -len(suffix)])
    else:
        exc = cls(details)
        exc.args = (details or code_obj.name,)
    exc.grpc_code = code
    return exc


def _mounts(msgs: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options), m.target) for m in msgs]


class Client:
    """The snapshots API of the server at ``address``, as Snapshotter methods.

    ``snapshotter`` fills the request field containerd fills with its proxy
    plugin's name; ``namespace`` (if any) is sent as ``containerd-namespace``
    metadata; ``timeout`` bounds every call (seconds, None: no bound).
    """

    def __init__(
        self,
        address: str | Path,
        *,
        snapshotter: str = "stratasnap",
        namespace: str = "",
        timeout: float | None = None,
    ) -> None:
        self.address = Path(address)
        self.snapshotter = snapshotter
        self.timeout = timeout
        self._metadata = ((NAMESPACE_HEADER, namespace),) if namespace else None
        self._closed = False
        self.channel = grpc.insecure_channel(f"unix:{self.address}", options=_OPTIONS)
        # The generated stub: the method paths and (de)serialisers of every RPC.
        stub: Any = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self._prepare, self._view, self._mounts = stub.Prepare, stub.View, stub.Mounts
        self._commit, self._remove, self._stat = stub.Commit, stub.Remove, stub.Stat
        self._update, self._list, self._usage = stub.Update, stub.List, stub.Usage
        self._cleanup = stub.Cleanup

    def _call(self, rpc: grpc.UnaryUnaryMultiCallable[Any, Any], request: Any) -> Any:
        if self._closed:
            raise Unavailable(f"client of {self.address} is closed")
        try:
            return rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server accepts connections (Unavailable after ``timeout`` s)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no server on {self.address} after {timeout}s") from None

    # -- the Snapshotter protocol --------------------------------------------------------

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = pb.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
        )
        return _mounts(self._call(self._prepare, req).mounts)

    def view(self, key: str, parent: str, labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = pb.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
        )
        return _mounts(self._call(self._view, req).mounts)

    def mounts(self, key: str) -> list[Mount]:
        req = pb.MountsRequest(snapshotter=self.snapshotter, key=key)
        return _mounts(self._call(self._mounts, req).mounts)

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        req = pb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}, parent=parent
        )
        self._call(self._commit, req)

    def remove(self, key: str) -> None:
        self._call(self._remove, pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key))

    def stat(self, key: str) -> Info:
        req = pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
        return info_from_proto(self._call(self._stat, req).info)

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        req = pb.UpdateSnapshotRequest(
            snapshotter=self.snapshotter,
            info=info_to_proto(info),
            update_mask=field_mask_pb2.FieldMask(paths=list(fieldpaths)),
        )
        return info_from_proto(self._call(self._update, req).info)

    def usage(self, key: str) -> Usage:
        resp = self._call(self._usage, pb.UsageRequest(snapshotter=self.snapshotter, key=key))
        return Usage(size=resp.size, inodes=resp.inodes)

    def walk(self, *filters: str) -> Iterator[Info]:
        """Every matching snapshot; the whole List is read first (errors raise here)."""
        return iter([info for batch in self.list_batches(*filters) for info in batch])

    def list_batches(self, *filters: str) -> Iterator[list[Info]]:
        """The List stream as it arrives, one list per message."""
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=filters)
        if self._closed:
            raise Unavailable(f"client of {self.address} is closed")
        try:
            for resp in self._list(req, timeout=self.timeout, metadata=self._metadata):
                yield [info_from_proto(m) for m in resp.info]
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def cleanup(self) -> Reclaimed:
        """Run Cleanup (the wire does not say what it reclaimed: an empty Reclaimed)."""
        self._call(self._cleanup, pb.CleanupRequest(snapshotter=self.snapshotter))
        return Reclaimed()

    def close(self) -> None:
        self._closed = True
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""The servicer of ``containerd.services.snapshots.v1.Snapshots``: gRPC in, library calls out.

Each RPC resolves the request's ``snapshotter`` field to one of the served
snapshotters (:class:`Snapshotters`), calls the matching method and converts
the result. Errors become gRPC statuses once, here: a
:class:`~stratasnap.errors.SnapshotError` travels as its ``grpc_code`` with its
message (already shaped ``snapshot "k": not found`` for containerd's
``errgrpc.ToNative``); anything else is ``UNKNOWN`` and is logged with its
traceback.

``List`` reads the whole walk before it sends anything, then streams it in
batches of 100 ``Info`` (as containerd's own service does): no store lock or
read transaction stays open while a slow client drains the stream, so a Stat
(or a Remove) during a List never waits for it. A stream occupies a worker
thread while it sends, so at most ``max_streams`` stream at once (one more is
RESOURCE_EXHAUSTED, at once; an answer small enough to be sent whether or not
the client reads needs no slot) and a stream whose client reads nothing for
``send_timeout`` seconds is cancelled (:mod:`.streams`): clients that stop
reading cannot take the workers that other clients' calls need.

A Prepare of an image layer (label ``containerd.io/snapshot.ref``) may be
answered by the remote-snapshot fast path (:mod:`.fastpath`): the layer is
committed from containerd's blob and the answer is AlreadyExists, which tells
containerd to skip its unpack. Whatever goes wrong there, the Prepare goes on
the normal way.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from time import perf_counter
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ..errors import (
    AlreadyExists,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    Unavailable,
    Unimplemented,
)
from ..snapshotter import Snapshotter
from ..types import EPOCH, Info, Kind, Mount, Timestamp
from .api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .api.containerd.types import mount_pb2
from .fastpath import FastPath
from .metrics import Metrics
from .streams import StreamWatch

__all__ = [
    "LIST_BATCH",
    "MAX_STREAMS",
    "NAMESPACE_HEADER",
    "SEND_TIMEOUT",
    "SERVICE",
    "SnapshotsService",
    "Snapshotters",
    "from_timestamp",
    "info_from_proto",
    "info_to_proto",
    "mounts_to_proto",
    "to_timestamp",
]

log = logging.getLogger("stratasnap.server")

SERVICE = "containerd.services.snapshots.v1.Snapshots"
#: Infos per ListSnapshotsResponse, like containerd's snapshots service.
LIST_BATCH = 100
#: Bytes per ListSnapshotsResponse, at most (unless one Info alone is larger): 100
#: Infos with big labels would exceed what clients accept (grpc's default 4 MiB).
LIST_BATCH_BYTES = 1 << 20
#: List streams sending at once; the server's thread pool is larger (see daemon.THREADS).
MAX_STREAMS = 32
#: A List answer up to this size (encoded) takes no stream slot: it is within the
#: flow-control window HTTP/2 gives every new stream (65,535 bytes), so its send
#: completes even if the client reads nothing.
UNWATCHED_BYTES = 60_000
#: Seconds a List stream may wait for its client to read before it is cancelled.
SEND_TIMEOUT = 10.0
#: gRPC metadata containerd puts the namespace of the call in.
NAMESPACE_HEADER = "containerd-namespace"

_STATUS = {c.value[0]: c for c in grpc.StatusCode}
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]
_EMPTY = empty_pb2.Empty()

# Kind on the wire. UNKNOWN (0) is never sent: containerd reads it as COMMITTED.
_KIND_TO_PROTO = {Kind.ACTIVE: pb.ACTIVE, Kind.VIEW: pb.VIEW, Kind.COMMITTED: pb.COMMITTED}
_KIND_FROM_PROTO = {pb.ACTIVE: Kind.ACTIVE, pb.VIEW: Kind.VIEW}


# -- conversions -------------------------------------------------------------------------


def to_timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    """A datetime as a protobuf Timestamp (naive means UTC); a Timestamp keeps its nanoseconds."""
    ts = timestamp_pb2.Timestamp()
    ts.seconds, ts.nanos = divmod(_epoch_ns(when), 1_000_000_000)
    return ts


def from_timestamp(ts: timestamp_pb2.Timestamp) -> datetime:
    """A protobuf Timestamp as an aware UTC Timestamp, nanoseconds kept."""
    try:
        return Timestamp.from_epoch_ns(ts.seconds * 1_000_000_000 + ts.nanos)
    except (OverflowError, ValueError, OSError):
        return EPOCH


def info_to_proto(info: Info) -> pb.Info:
    msg = pb.Info(
        name=info.name,
        parent=info.parent,
        kind=_KIND_TO_PROTO.get(info.kind, pb.COMMITTED),
        labels=info.labels,
    )
    # Filled in place (no temporary Timestamps): this runs 10,000 times per big List.
    created = _epoch_ns(info.created)
    msg.created_at.seconds, msg.created_at.nanos = divmod(created, 1_000_000_000)
    updated = created if info.updated is info.created else _epoch_ns(info.updated)
    msg.updated_at.seconds, msg.updated_at.nanos = divmod(updated, 1_000_000_000)
    return msg


def _epoch_ns(when: datetime) -> int:
    if isinstance(when, Timestamp):
        return when.epoch_ns  # the store's nanoseconds
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    d = when - EPOCH
    return (d.days * 86400 + d.seconds) * 1_000_000_000 + d.microseconds * 1000


def info_from_proto(msg: pb.Info) -> Info:
    """What the client sent (containerd's KindFromProto: anything else is COMMITTED)."""
    return Info(
        name=msg.name,
        kind=_KIND_FROM_PROTO.get(msg.kind, Kind.COMMITTED),
        parent=msg.parent,
        labels=dict(msg.labels),
        created=from_timestamp(msg.created_at),
        updated=from_timestamp(msg.updated_at),
    )


def mounts_to_proto(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
        for m in mounts
    ]


# -- which snapshotter -------------------------------------------------------------------


class Snapshotters:
    """The snapshotters a server hands out, by name.

    With a single one, every name (the ``snapshotter`` field containerd fills
    with its proxy plugin's name) maps to it. With several, the name must be
    one of them; an empty name picks the first.
    """

    def __init__(self, snapshotters: Mapping[str, Snapshotter]) -> None:
        if not snapshotters:
            raise ValueError("no snapshotters to serve")
        self._by_name = dict(snapshotters)
        self._only = next(iter(self._by_name.items())) if len(self._by_name) == 1 else None
        self._first = next(iter(self._by_name.items()))

    def resolve(self, name: str) -> tuple[str, Snapshotter]:
        """The (name, snapshotter) serving a request for ``name``; NotFound if none."""
        if self._only is not None:
            return self._only
        if not name:
            return self._first
        sn = self._by_name.get(name)
        if sn is None:
            known = ", ".join(repr(n) for n in self._by_name)
            raise NotFound(f"snapshotter {name!r} (serving {known})")
        return name, sn

    def items(self) -> Iterable[tuple[str, Snapshotter]]:
        return self._by_name.items()

    def as_dict(self) -> dict[str, Snapshotter]:
        return dict(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


# -- the servicer ------------------------------------------------------------------------


class _Request(Protocol):
    snapshotter: str


Req = TypeVar("Req", bound=_Request)
Resp = TypeVar("Resp")


class SnapshotsService:
    """All 10 RPCs of the snapshots service over ``snapshotters``.

    :meth:`register` adds it to a ``grpc.Server``. :meth:`shut` refuses new
    calls (UNAVAILABLE) and :meth:`drain` waits for the running ones, so the
    stores can be closed without a call still inside them.
    """

    def __init__(
        self,
        snapshotters: Snapshotters | Mapping[str, Snapshotter],
        metrics: Metrics | None = None,
        *,
        list_batch: int = LIST_BATCH,
        max_streams: int = MAX_STREAMS,
        send_timeout: float = SEND_TIMEOUT,
        fastpath: FastPath | None = None,
    ) -> None:
        if not isinstance(snapshotters, Snapshotters):
            snapshotters = Snapshotters(snapshotters)
        self.snapshotters = snapshotters
        self.metrics = metrics
        self.fastpath = fastpath
        self._batch = max(1, list_batch)
        self._lock = threading.Condition()
        self._running = 0
        self._shut = False
        self._max_streams = max_streams
        self._streams = 0
        self._watch = StreamWatch(send_timeout)

    # -- registration ----------------------------------------------------------------

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        # (method, handler, request type, response type; None = google.protobuf.Empty)
        unary_methods: list[tuple[str, Callable[..., Any], Any, Any]] = [
            ("Prepare", self._prepare, pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
            ("View", self._view, pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
            ("Mounts", self._mounts, pb.MountsRequest, pb.MountsResponse),
            ("Commit", self._commit, pb.CommitSnapshotRequest, None),
            ("Remove", self._remove, pb.RemoveSnapshotRequest, None),
            ("Stat", self._stat, pb.StatSnapshotRequest, pb.StatSnapshotResponse),
            ("Update", self._update, pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
            ("Usage", self._usage, pb.UsageRequest, pb.UsageResponse),
            ("Cleanup", self._cleanup, pb.CleanupRequest, None),
        ]
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                # Prepare watches its call: the fast path may wait long for a blob.
                self._unary(name, fn, pass_context=name == "Prepare"),
                request_deserializer=req.FromString,
                response_serializer=(resp or empty_pb2.Empty).SerializeToString,
            )
            for name, fn, req, resp in unary_methods
        }
        handlers["List"] = grpc.unary_stream_rpc_method_handler(
            self._list,
            request_deserializer=pb.ListSnapshotsRequest.FromString,
            response_serializer=pb.ListSnapshotsResponse.SerializeToString,
        )
        return handlers

    def register(self, server: grpc.Server) -> None:
        """Serve this service on ``server`` (before it starts)."""
        handlers = self.method_handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        # grpcio >= 1.62 dispatches registered methods without a generic-handler lookup.
        add_registered = getattr(server, "add_registered_method_handlers", None)
        if add_registered is not None:
            add_registered(SERVICE, handlers)

    # -- lifecycle -------------------------------------------------------------------

    def shut(self) -> None:
        """Refuse every new call with UNAVAILABLE from now on."""
        with self._lock:
            self._shut = True

    def drain(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` s for running calls to finish; return how many remain."""
        with self._lock:
            self._lock.wait_for(lambda: self._running == 0, timeout)
            return self._running

    @property
    def running(self) -> int:
        """Calls currently inside a snapshotter."""
        return self._running

    @property
    def streams(self) -> int:
        """List streams currently sending."""
        return self._streams

    def close(self) -> None:
        """Stop the stream watcher (after the gRPC server has stopped)."""
        self._watch.close()

    def _enter(self) -> None:
        with self._lock:
            if self._shut:
                raise Unavailable("stratasnap is shutting down")
            self._running += 1

    def _leave(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._lock.notify_all()

    # -- the call wrapper ------------------------------------------------------------

    def _unary(
        self, method: str, body: Callable[..., Resp], *, pass_context: bool = False
    ) -> Callable[[Req, grpc.ServicerContext], Resp]:
        """``body(request, name, snapshotter)`` as a gRPC handler (``pass_context``: the
        call's context as a fourth argument)."""
        # Everything a call needs is bound here, once per method: the hot path is
        # one closure, with no attribute or dict lookups it can do without.
        resolve = self.snapshotters.resolve
        record = self.metrics.recorder(method) if self.metrics is not None else None
        enter, leave, done = self._enter, self._leave, self._done
        debug_enabled = log.isEnabledFor

        def handle(request: Req, context: grpc.ServicerContext) -> Resp:
            start = perf_counter()
            try:
                enter()
                try:
                    name, sn = resolve(request.snapshotter)
                    if pass_context:
                        response = body(request, name, sn, context)
                    else:
                        response = body(request, name, sn)
                finally:
                    leave()
            except SnapshotError as e:
                code, message = _code_of(e), str(e)
            except Exception as e:
                code, message = _UNKNOWN, _describe(e)
                self._log_crash(method, request, context, e)
            else:
                # Success: the metrics, and a debug line only when debug is on.
                elapsed = perf_counter() - start
                if record is not None:
                    record(0, elapsed)
                if debug_enabled(logging.DEBUG):
                    self._log_call(logging.DEBUG, method, request, context, 0, "", elapsed)
                return response
            done(method, request, context, code, message, start)
            context.abort(_STATUS[code], _clip(message))

        handle.__name__ = method
        return handle

    def _done(
        self,
        method: str,
        request: _Request,
        context: grpc.ServicerContext,
        code: int,
        message: str,
        start: float,
    ) -> None:
        elapsed = perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe(method, code, elapsed)
        if code == _UNKNOWN:
            return  # already logged, with the traceback
        level = logging.DEBUG if code in (0, _CANCELLED) or code in _EXPECTED else logging.WARNING
        if log.isEnabledFor(level):
            self._log_call(level, method, request, context, code, message, elapsed)

    def _log_call(
        self,
        level: int,
        method: str,
        request: _Request,
        context: grpc.ServicerContext,
        code: int,
        message: str,
        elapsed: float,
    ) -> None:
        fields = _fields(method, request, context)
        fields["duration_ms"] = round(elapsed * 1000, 3)
        if code:
            fields["code"] = _STATUS[code].name
            fields["error"] = message
        log.log(level, "rpc failed" if code else "rpc", extra=fields)

    def _log_crash(
        self, method: str, request: _Request, context: grpc.ServicerContext, e: Exception
    ) -> None:
        fields = _fields(method, request, context)
        fields["error"] = _describe(e)
        log.error("rpc crashed", exc_info=e, extra=fields)

    # -- the RPCs --------------------------------------------------------------------

    def _prepare(
        self,
        req: pb.PrepareSnapshotRequest,
        name: str,
        sn: Snapshotter,
        context: grpc.ServicerContext,
    ) -> pb.PrepareSnapshotResponse:
        labels = dict(req.labels)
        if self.fastpath is not None:

            def gone() -> bool:
                return not context.is_active()

            target = self.fastpath.prepare(name, sn, req.key, req.parent, labels, gone)
            if target is not None:
                # containerd's remote-snapshot protocol: it now Walks for the target.
                raise AlreadyExists(f"target snapshot {target!r}")
        mounts = sn.prepare(req.key, req.parent, labels=labels)
        return pb.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    def _view(
        self, req: pb.ViewSnapshotRequest, name: str, sn: Snapshotter
    ) -> pb.ViewSnapshotResponse:
        mounts = sn.view(req.key, req.parent, labels=dict(req.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    def _mounts(self, req: pb.MountsRequest, name: str, sn: Snapshotter) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=mounts_to_proto(sn.mounts(req.key)))

    def _commit(self, req: pb.CommitSnapshotRequest, name: str, sn: Snapshotter) -> empty_pb2.Empty:
        sn.commit(req.name, req.key, labels=dict(req.labels), parent=req.parent)
        return _EMPTY

    def _remove(self, req: pb.RemoveSnapshotRequest, name: str, sn: Snapshotter) -> empty_pb2.Empty:
        sn.remove(req.key)
        return _EMPTY

    def _stat(
        self, req: pb.StatSnapshotRequest, name: str, sn: Snapshotter
    ) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_to_proto(sn.stat(req.key)))

    def _update(
        self, req: pb.UpdateSnapshotRequest, name: str, sn: Snapshotter
    ) -> pb.UpdateSnapshotResponse:
        paths = tuple(req.update_mask.paths) if req.HasField("update_mask") else ()
        info = sn.update(info_from_proto(req.info), paths)
        return pb.UpdateSnapshotResponse(info=info_to_proto(info))

    def _usage(self, req: pb.UsageRequest, name: str, sn: Snapshotter) -> pb.UsageResponse:
        usage = sn.usage(req.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def _cleanup(self, req: pb.CleanupRequest, name: str, sn: Snapshotter) -> empty_pb2.Empty:
        cleanup = getattr(sn, "cleanup", None)
        if cleanup is None:
            raise Unimplemented("snapshotter does not implement Cleanup method")
        reclaimed = sn.cleanup()
        if self.metrics is not None:
            self.metrics.reclaimed(name, reclaimed.size)
        if reclaimed.paths:
            log.info(
                "cleanup reclaimed storage",
                extra={
                    "snapshotter": name,
                    "paths": len(reclaimed.paths),
                    "bytes": reclaimed.size,
                },
            )
        return _EMPTY

    def _list(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        start = perf_counter()
        code, message = 0, ""
        infos: list[Info] = []
        slot = False
        try:
            try:
                self._enter()
                try:
                    _, sn = self.snapshotters.resolve(request.snapshotter)
                    # The whole walk first: nothing of the store stays held while streaming.
                    infos = list(sn.walk(*request.filters))
                finally:
                    self._leave()
            except SnapshotError as e:
                code, message = _code_of(e), str(e)
            except Exception as e:
                code, message = _UNKNOWN, _describe(e)
                self._log_crash("List", request, context, e)
            if code:
                context.abort(_STATUS[code], _clip(message))
            batches = _batches(infos, self._batch)
            first = next(batches, [])
            second = next(batches, None)
            # A slot only for an answer whose sending may wait for the client: one
            # that fits in the window gRPC grants every new stream is sent whatever
            # the client reads. So the usual List (containerd's Walk by a filter, a
            # few snapshots) is never refused however many run at once; it was,
            # with 64 clients, while the walks themselves waited for the CPU.
            if second is not None or _wire_size(first) > UNWATCHED_BYTES:
                with self._lock:
                    if self._streams >= self._max_streams:
                        code = ResourceExhausted.grpc_code
                        message = (
                            f"{self._streams} List streams are already sending, the most at "
                            "once; retry when one has finished"
                        )
                    else:
                        self._streams += 1
                        slot = True
                if code:
                    context.abort(_STATUS[code], _clip(message))
            stream = self._watch.watch(context.cancel)
            try:
                stream.progress()
                for chunk in itertools.chain((first,), (second or (),), batches):
                    if not chunk:
                        continue
                    yield pb.ListSnapshotsResponse(info=chunk)
                    # Back here only once gRPC sent the batch: the client is reading.
                    stream.progress()
            finally:
                self._watch.done(stream)
        except GeneratorExit:  # the client went away (or the server is stopping)
            code = _CANCELLED
            raise
        finally:
            if slot:
                with self._lock:
                    self._streams -= 1
            self._done("List", request, context, code, message, start)


def _wire_size(chunk: list[pb.Info]) -> int:
    return sum(info.ByteSize() for info in chunk)


def _batches(infos: list[Info], most: int) -> Iterator[list[pb.Info]]:
    """``infos`` on the wire in groups of ``most``, each of at most LIST_BATCH_BYTES."""
    chunk: list[pb.Info] = []
    size = 0
    for info in infos:
        msg = info_to_proto(info)
        # Labels are what makes an Info big; without any it is a few dozen bytes.
        n = msg.ByteSize() if info.labels else 64
        if chunk and (len(chunk) == most or size + n > LIST_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(msg)
        size += n
    if chunk:
        yield chunk


# Errors that are part of the protocol's normal flow (containerd probes with
# Stat, GC meets busy snapshots): logged at debug, not as warnings.
_EXPECTED = frozenset(
    c.value[0]
    for c in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAVAILABLE,
    )
)


#: Characters of an error message on the wire. Messages quote what the client sent
#: (keys, labels, filters up to 16 KiB), and gRPC clients refuse trailers over 8 KiB
#: (RESOURCE_EXHAUSTED instead of the real error); the message travels
#: percent-encoded, up to 12 bytes a character.
MAX_MESSAGE_CHARS = 512


def _clip(message: str) -> str:
    """The message, its middle cut out when long: the end keeps containerd's class suffix."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    keep = MAX_MESSAGE_CHARS // 2 - 20
    return f"{message[:keep]} …({len(message) - 2 * keep} characters)… {message[-keep:]}"


def _code_of(e: SnapshotError) -> int:
    code = int(getattr(e, "grpc_code", _UNKNOWN))
    return code if code in _STATUS and code != 0 else _UNKNOWN


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _namespace(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


def _fields(method: str, request: Any, context: grpc.ServicerContext) -> dict[str, Any]:
    fields: dict[str, Any] = {"method": method, "snapshotter": request.snapshotter}
    namespace = _namespace(context)
    if namespace:
        fields["namespace"] = namespace
    # ("name" would clash with LogRecord.name: a Commit's name is logged as "commit_name".)
    for attr, field in (("key", "key"), ("name", "commit_name"), ("parent", "parent")):
        value = getattr(request, attr, "")
        if value:
            fields[field] = value
    if method == "Update":
        fields["key"] = request.info.name
    return fields

"""A client of containerd's content service (``containerd.services.content.v1.Content``).

The remote-snapshot fast path (:mod:`.fastpath`) reads layer blobs that
containerd fetched, on containerd's own socket. Every call carries the
namespace in the ``containerd-namespace`` metadata header (containerd's
content store is per namespace).

:meth:`ContentClient.wait` waits for a blob that containerd may still be
fetching: containerd calls Prepare for a layer before its blob is complete,
and (1.6's unpacker) before it even starts fetching the first layer it
unpacks. A blob that is neither committed nor being written (no ingest whose
ref names its digest) within ``start_timeout`` is not coming: waiting longer
would only delay the fallback. When nothing at all is being written in the
namespace (the first layer of a pull on containerd 1.6/1.7: the layers'
fetches begin after its Prepare returns), that is known after
:data:`IDLE_SETTLE` seconds already.

:meth:`ContentClient.open` streams a blob as a file-like reader: one Read
stream, messages taken one at a time (gRPC's flow control bounds what is
buffered), so memory does not grow with the blob.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from .api.containerd.services.content.v1 import content_pb2 as pb
from .api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc

__all__ = ["BlobInfo", "BlobReader", "ContentClient", "ContentError"]

#: The metadata header containerd reads the namespace of a call from.
NAMESPACE_HEADER = "containerd-namespace"
#: Seconds a unary call (Info, Status) may take before containerd counts as unreachable.
CALL_TIMEOUT = 10.0
#: Seconds without any ingest in the namespace after which a missing blob is not coming.
IDLE_SETTLE = 0.1
#: containerd sends Read data in 1 MiB messages; leave room.
MAX_MESSAGE = 16 << 20


class ContentError(Exception):
    """The blob cannot be read; ``reason`` is a short name for metrics and logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int


class ContentClient:
    """Calls on containerd's socket ``address``; one channel, opened at first use."""

    def __init__(self, address: str, *, call_timeout: float = CALL_TIMEOUT) -> None:
        self.address = address
        self._call_timeout = call_timeout
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def _content(self) -> Any:
        with self._lock:
            if self._stub is None:
                self._channel = grpc.insecure_channel(
                    f"unix:{self.address}",
                    options=[("grpc.max_receive_message_length", MAX_MESSAGE)],
                )
                self._stub = pb_grpc.ContentStub(self._channel)
            return self._stub

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def _unavailable(self, what: str, e: grpc.RpcError) -> ContentError:
        code = e.code() if isinstance(e, grpc.Call) else None
        detail = e.details() if isinstance(e, grpc.Call) else str(e)
        name = code.name if code is not None else "error"
        return ContentError(
            "content-unavailable", f"containerd content {what} on {self.address}: {name}: {detail}"
        )

    # -- the RPCs --------------------------------------------------------------------

    def info(self, namespace: str, digest: str) -> BlobInfo | None:
        """The committed blob ``digest``; None while it is not (yet) in the store."""
        try:
            resp = self._content().Info(
                pb.InfoRequest(digest=digest),
                metadata=((NAMESPACE_HEADER, namespace),),
                timeout=self._call_timeout,
            )
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._unavailable("Info", e) from None
        return BlobInfo(resp.info.digest, resp.info.size)

    def ingesting(self, namespace: str, digest: str) -> tuple[bool, bool]:
        """(whether containerd is writing ``digest`` now, whether it is writing anything).

        containerd's fetch names its ingests ``layer-<digest>`` (remotes.MakeRefKey),
        and its store leaves ``expected`` empty: the ref is what names the blob.
        """
        try:
            resp = self._content().ListStatuses(
                pb.ListStatusesRequest(),
                metadata=((NAMESPACE_HEADER, namespace),),
                timeout=self._call_timeout,
            )
        except grpc.RpcError as e:
            raise self._unavailable("ListStatuses", e) from None
        mine = any(s.expected == digest or s.ref.endswith(digest) for s in resp.statuses)
        return mine, bool(resp.statuses)

    def wait(
        self,
        namespace: str,
        digest: str,
        *,
        timeout: float,
        start_timeout: float,
        poll: float = 0.05,
        cancelled: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> BlobInfo:
        """The blob once committed, waiting while containerd writes it.

        Raises :class:`ContentError`: ``blob-not-fetched`` when for
        ``start_timeout`` s the blob was neither committed nor being written
        (:data:`IDLE_SETTLE` s when nothing at all was being written),
        ``blob-wait-timeout`` after ``timeout`` s in all, ``content-unavailable``
        when containerd does not answer, ``cancelled`` as soon as ``cancelled()``.
        """
        start = clock()
        last_seen = start  # when the blob was last seen being written (or we began)
        delay = poll
        while True:
            if cancelled():
                raise ContentError(
                    "cancelled", f"the Prepare waiting for blob {digest} was cancelled"
                )
            info = self.info(namespace, digest)
            if info is not None:
                return info
            now = clock()
            mine, anything = self.ingesting(namespace, digest)
            if mine:
                last_seen = now
            elif now - last_seen >= (
                start_timeout if anything else min(start_timeout, IDLE_SETTLE)
            ):
                raise ContentError(
                    "blob-not-fetched",
                    f"blob {digest} is neither in containerd's content store nor being "
                    f"fetched (waited {now - start:.1f} s)",
                )
            if now - start >= timeout:
                raise ContentError(
                    "blob-wait-timeout",
                    f"blob {digest} still being fetched after {timeout:g} s (fetch_timeout)",
                )
            sleep(delay)
            delay = min(delay * 2, 0.5)

    def open(self, namespace: str, digest: str, size: int) -> BlobReader:
        """A reader of the committed blob ``digest`` of ``size`` bytes."""
        stream = self._content().Read(
            pb.ReadContentRequest(digest=digest),
            metadata=((NAMESPACE_HEADER, namespace),),
        )
        return BlobReader(stream, digest, size, self._unavailable)


class BlobReader(io.RawIOBase):
    """The bytes of one Read stream, in order, checked to be contiguous and complete.

    A broken stream raises :class:`ContentError` (``content-unavailable``), a
    short one ``blob-truncated``; :meth:`close` cancels the stream.
    """

    def __init__(
        self,
        stream: Any,
        digest: str,
        size: int,
        unavailable: Callable[[str, grpc.RpcError], ContentError],
    ) -> None:
        super().__init__()
        self._stream = stream
        self._messages: Iterator[pb.ReadContentResponse] = iter(stream)
        self._digest = digest
        self._size = size
        self._unavailable = unavailable
        self._buf = memoryview(b"")
        self.offset = 0  # bytes handed out so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._buf:
            if not self._next():
                return 0
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.offset += n
        return n

    def _next(self) -> bool:
        try:
            msg = next(self._messages)
        except StopIteration:
            if self.offset != self._size:
                raise ContentError(
                    "blob-truncated",
                    f"blob {self._digest}: Read ended at {self.offset} of {self._size} bytes",
                ) from None
            return False
        except grpc.RpcError as e:
            raise self._unavailable("Read", e) from None
        if msg.offset != self.offset:
            raise ContentError(
                "blob-truncated",
                f"blob {self._digest}: Read sent offset {msg.offset}, expected {self.offset}",
            )
        self._buf = memoryview(msg.data)
        return True

    def close(self) -> None:
        if not self.closed:
            cancel = getattr(self._stream, "cancel", None)
            if cancel is not None:
                cancel()
        super().close()

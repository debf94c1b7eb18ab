"""Prometheus metrics of the server, on their own registry.

Exposed on ``metrics_address`` (``/metrics``) when one is configured:

- ``stratasnap_rpc_requests_total{method}``: calls handled, per RPC.
- ``stratasnap_rpc_errors_total{method,code}``: calls that failed, by gRPC code name.
- ``stratasnap_rpc_duration_seconds{method}``: latency histogram, per RPC.
- ``stratasnap_snapshots{snapshotter,kind}``: snapshots by kind, computed on scrape.
- ``stratasnap_cleanup_reclaimed_bytes_total{snapshotter}``: bytes freed by Cleanup.
- ``stratasnap_commit_batch_size{snapshotter}``: histogram of the write calls each
  metadata commit made durable (above 1: concurrent calls shared one fsync).
- ``stratasnap_fastpath_layers_total{snapshotter,how}``: layers containerd did not
  unpack because the fast path had them: ``converted`` from containerd's blob,
  or ``reused`` (already committed under that chain ID on that parent).
- ``stratasnap_fastpath_fallbacks_total{snapshotter,reason}``: layers that had
  the fast path's labels but went the normal way, by reason.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..types import Info, Kind
from .config import parse_host_port

__all__ = ["METHODS", "Metrics", "MetricsServer"]

log = logging.getLogger("stratasnap.server.metrics")

METHODS = (
    "Prepare",
    "View",
    "Mounts",
    "Commit",
    "Remove",
    "Stat",
    "Update",
    "List",
    "Usage",
    "Cleanup",
)

#: gRPC code number -> its name as Prometheus label ("NOT_FOUND").
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}

#: From 100 µs (a Stat) to a minute (a Prepare copying a big parent).
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _Walkable(Protocol):
    def walk(self, *filters: str) -> Iterator[Info]: ...


class _SnapshotsByKind(Collector):
    """Counts the snapshots of each snapshotter by kind, at scrape time."""

    def __init__(self, snapshotters: Callable[[], Mapping[str, _Walkable]]) -> None:
        self._snapshotters = snapshotters

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "stratasnap_snapshots",
            "Snapshots by kind, counted when scraped.",
            labels=["snapshotter", "kind"],
        )
        for name, sn in self._snapshotters().items():
            try:
                count_by_kind = getattr(sn, "count_by_kind", None)
                if callable(count_by_kind):  # BaseSnapshotter counts in SQL
                    counts = Tally(count_by_kind())
                else:
                    counts = Tally(info.kind for info in sn.walk())
            except Exception as e:  # a closed store while shutting down, a broken one
                log.warning("cannot count snapshots", extra={"snapshotter": name, "error": e})
                continue
            for kind in Kind:
                family.add_metric([name, kind.value], counts.get(kind, 0))
        yield family


#: Batch sizes, up to the store's largest (group_commit.MAX_BATCH).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _CommitBatches(Collector):
    """How many write calls each metadata commit carried, per snapshotter, at scrape time.

    The store keeps plain counts (it knows nothing of Prometheus); they are
    turned into a histogram here.
    """

    def __init__(self, snapshotters: Callable[[], Mapping[str, _Walkable]]) -> None:
        self._snapshotters = snapshotters

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "stratasnap_commit_batch_size",
            "Write calls made durable by one metadata commit (one fsync).",
            labels=["snapshotter"],
        )
        for name, sn in self._snapshotters().items():
            sizes_of = getattr(sn, "commit_batch_sizes", None)
            if not callable(sizes_of):
                continue
            sizes: Mapping[int, int] = sizes_of()
            buckets = [
                (str(float(le)), sum(n for size, n in sizes.items() if size <= le))
                for le in BATCH_BUCKETS
            ]
            buckets.append(("+Inf", sum(sizes.values())))
            total = sum(size * n for size, n in sizes.items())
            family.add_metric([name], buckets, total)
        yield family


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Metrics:
    """What the servicer records; always on (cheap), served only when asked."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        requests = Counter(
            "stratasnap_rpc_requests",
            "gRPC calls handled, per method.",
            ["method"],
            registry=self.registry,
        )
        self._errors = Counter(
            "stratasnap_rpc_errors",
            "gRPC calls that failed, per method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        duration = Histogram(
            "stratasnap_rpc_duration_seconds",
            "Latency of gRPC calls, per method.",
            ["method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._reclaimed = Counter(
            "stratasnap_cleanup_reclaimed_bytes",
            "Bytes of storage freed by Cleanup.",
            ["snapshotter"],
            registry=self.registry,
        )
        self._fast_layers = Counter(
            "stratasnap_fastpath_layers",
            "Layers committed by the remote-snapshot fast path (containerd skipped its unpack).",
            ["snapshotter", "how"],
            registry=self.registry,
        )
        self._fast_fallbacks = Counter(
            "stratasnap_fastpath_fallbacks",
            "Layers with the fast path's labels that fell back to a normal prepare, by reason.",
            ["snapshotter", "reason"],
            registry=self.registry,
        )
        # Children made once (so every method shows, at 0, from the start):
        # labels() takes a lock and a dict lookup per call.
        self._requests = {m: requests.labels(m) for m in METHODS}
        self._duration = {m: duration.labels(m) for m in METHODS}
        self._snapshots: Mapping[str, _Walkable] = {}
        self.registry.register(_SnapshotsByKind(lambda: self._snapshots))
        self.registry.register(_CommitBatches(lambda: self._snapshots))

    def watch(self, snapshotters: Mapping[str, _Walkable]) -> None:
        """Count these snapshotters' snapshots on scrape (replaces earlier ones)."""
        self._snapshots = dict(snapshotters)
        for name in self._snapshots:
            self._reclaimed.labels(name)

    def recorder(self, method: str) -> Callable[[int, float], None]:
        """:meth:`observe` for one method, with its children looked up once."""
        inc = self._requests[method].inc
        observe = self._duration[method].observe
        errors = self._errors

        def record(code: int, seconds: float) -> None:
            inc()
            observe(seconds)
            if code:
                errors.labels(method, CODE_NAMES.get(code, str(code))).inc()

        return record

    def observe(self, method: str, code: int, seconds: float) -> None:
        """Record one handled call; ``code`` is the numeric gRPC status (0 = OK)."""
        self._requests[method].inc()
        self._duration[method].observe(seconds)
        if code:
            self._errors.labels(method, CODE_NAMES.get(code, str(code))).inc()

    def reclaimed(self, snapshotter: str, size: int) -> None:
        self._reclaimed.labels(snapshotter).inc(max(size, 0))

    def fast_layer(self, snapshotter: str, how: str) -> None:
        self._fast_layers.labels(snapshotter, how).inc()

    def fast_fallback(self, snapshotter: str, reason: str) -> None:
        self._fast_fallbacks.labels(snapshotter, reason).inc()

    def serve(self, address: str) -> MetricsServer:
        """Start ``/metrics`` on ``host:port`` in a daemon thread (port 0: any free one)."""
        host, port = parse_host_port(address)
        server, thread = start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        return MetricsServer(server, thread)

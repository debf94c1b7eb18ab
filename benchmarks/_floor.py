"""The floor of a snapshots call through grpcio: a server whose handlers do nothing.

Run: ``python benchmarks/_floor.py SOCKET`` (chain.py starts it). It serves
``containerd.services.snapshots.v1.Snapshots`` on a unix socket the way
stratasnap's server does (the same grpc options, worker pool and polling), but
Prepare answers no mounts, Remove and Commit answer Empty and Stat says not
found, at once: what a Go client measures against it is grpcio's own cost per
call, the part of a call that no change to stratasnap's code can remove.
Stops on SIGTERM.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/concurrent.py and grpc.py would shadow the real packages.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import signal  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

from stratasnap.server.grpc_polling import poll_on_serving_thread  # noqa: E402

poll_on_serving_thread()  # as ``stratasnap serve`` does, before grpc is imported

import grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402

from stratasnap.server.api.containerd.services.snapshots.v1 import (  # noqa: E402
    snapshots_pb2 as pb,
)
from stratasnap.server.daemon import MAX_CALLS, MAX_MESSAGE_SIZE, WORKERS  # noqa: E402
from stratasnap.server.service import SERVICE  # noqa: E402


def handlers() -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    def prepare(request: Any, context: grpc.ServicerContext) -> Any:
        return pb.PrepareSnapshotResponse()

    def empty(request: Any, context: grpc.ServicerContext) -> Any:
        return empty_pb2.Empty()

    def stat(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.NOT_FOUND, f"snapshot {request.key!r}: not found")

    def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    return {
        "Prepare": unary(prepare, pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
        "Commit": unary(empty, pb.CommitSnapshotRequest, empty_pb2.Empty),
        "Remove": unary(empty, pb.RemoveSnapshotRequest, empty_pb2.Empty),
        "Stat": unary(stat, pb.StatSnapshotRequest, pb.StatSnapshotResponse),
    }


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
            ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
        ],
        maximum_concurrent_rpcs=MAX_CALLS,
    )
    methods = handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_registered_method_handlers(SERVICE, methods)
    server.add_insecure_port(f"unix:{sys.argv[1]}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main()

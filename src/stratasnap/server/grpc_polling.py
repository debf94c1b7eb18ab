"""grpcio's socket polling moved onto the thread that serves calls (fewer thread hops per call).

By default grpcio (1.6x and later) reads and writes sockets on EventEngine
threads of its own: a request is read by one of them, handed to another, and
only then, through a wakeup fd, to the server's serving thread, which hands it
to a worker. On a small, busy host each of those crossings costs tens of µs
of a call that takes a few hundred. With the two experiments below turned off,
grpc uses its older I/O path: the serving thread, which polls the completion
queue, reads the socket itself. Measured with benchmarks/chain.py (Go client,
one Prepare at a time, shared 2-core host): the trivial-handler floor and our
Prepare both drop by about 0.1 ms.

grpc reads ``GRPC_EXPERIMENTS`` once, when its core starts (on ``import
grpc``): so :func:`poll_on_serving_thread` must run before anything imports
grpc, and an operator's own ``GRPC_EXPERIMENTS`` (even empty) is left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = ["EXPERIMENTS", "VARIABLE", "poll_on_serving_thread"]

VARIABLE = "GRPC_EXPERIMENTS"
#: The experiments that put socket I/O on EventEngine threads, turned off.
EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def poll_on_serving_thread(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask grpc to poll sockets on the serving thread; whether it will.

    False when grpc is imported already (too late to change) or when the
    operator set ``GRPC_EXPERIMENTS`` (their choice stands).
    """
    env = os.environ if environ is None else environ
    if VARIABLE in env:
        return env[VARIABLE] == EXPERIMENTS
    if "grpc" in sys.modules:
        return False
    env[VARIABLE] = EXPERIMENTS
    return True

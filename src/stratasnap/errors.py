"""Typed errors of the snapshot contract.

Every error a snapshotter raises on purpose is a :class:`SnapshotError`. Each
subclass stands for one of containerd's ``errdefs`` classes, knows the gRPC
status code it travels as, and the exit code the CLI ends with::

    SnapshotError                 (gRPC UNKNOWN, exit 1)
    ├── InvalidArgument           (INVALID_ARGUMENT 3, exit 3)
    ├── NotFound                  (NOT_FOUND 5, exit 4)
    ├── AlreadyExists             (ALREADY_EXISTS 6, exit 5)
    ├── ResourceExhausted         (RESOURCE_EXHAUSTED 8, exit 6)
    ├── FailedPrecondition        (FAILED_PRECONDITION 9, exit 7)
    ├── Unimplemented             (UNIMPLEMENTED 12, exit 8)
    └── Unavailable               (UNAVAILABLE 14, exit 9)

Messages are shaped like Go's ``fmt.Errorf("<context>: %w", errdefs.ErrX)``,
``snapshot "k": not found``, because containerd's client strips exactly that
trailing ``": <class text>"`` when it turns the status back into a native error.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "SnapshotError",
    "Unavailable",
    "Unimplemented",
    "from_os_error",
]


class SnapshotError(Exception):
    """Base of every error stratasnap raises on purpose."""

    #: errdefs' text for the class, appended to the context.
    kind_text = "unknown"
    #: Numeric gRPC status code (``grpc.StatusCode.X.value[0]``).
    grpc_code = 2
    #: Exit code of the ``stratasnap`` command for this class.
    exit_code = 1

    def __init__(self, context: str = "") -> None:
        self.context = context
        super().__init__(f"{context}: {self.kind_text}" if context else self.kind_text)


class InvalidArgument(SnapshotError):
    """The request itself is malformed: a bad filter, label, fieldpath or parent kind."""

    kind_text = "invalid argument"
    grpc_code = 3
    exit_code = 3


class NotFound(SnapshotError):
    """The snapshot (or its parent) does not exist."""

    kind_text = "not found"
    grpc_code = 5
    exit_code = 4


class AlreadyExists(SnapshotError):
    """A snapshot with that key or name already exists."""

    kind_text = "already exists"
    grpc_code = 6
    exit_code = 5


class ResourceExhausted(SnapshotError):
    """Out of disk space (or another resource) while doing the work."""

    kind_text = "resource exhausted"
    grpc_code = 8
    exit_code = 6


class FailedPrecondition(SnapshotError):
    """The snapshot is in the wrong state for the call (committed, has children, busy)."""

    kind_text = "failed precondition"
    grpc_code = 9
    exit_code = 7


class Unimplemented(SnapshotError):
    """The backend does not implement the call."""

    kind_text = "not implemented"
    grpc_code = 12
    exit_code = 8


class Unavailable(SnapshotError):
    """The snapshotter cannot serve now (closed, shutting down, storage gone)."""

    kind_text = "unavailable"
    grpc_code = 14
    exit_code = 9


def from_os_error(exc: OSError, context: str) -> SnapshotError:
    """Classify an OSError met while working on storage.

    A full disk is ResourceExhausted (containerd 1.6 answers UNKNOWN there);
    a busy mount is FailedPrecondition so that containerd's GC skips it and
    goes on; everything else is the generic class with the OS message kept.
    """
    detail = f"{context}: {exc.strerror or exc}"
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return ResourceExhausted(detail)
    if exc.errno == _errno.EBUSY:
        return FailedPrecondition(detail)
    return SnapshotError(detail)

"""Why a layer tar was refused.

All are :class:`~stratasnap.errors.InvalidArgument`: the input is bad, not the
machine, so callers (and the CLI's exit code) treat them like any bad request.
"""

from __future__ import annotations

from ..errors import InvalidArgument, Unimplemented

__all__ = ["LayerTooLarge", "TarFormatError", "TruncatedTar", "UnsafeEntry", "UnsupportedEntry"]


class TarFormatError(InvalidArgument):
    """The tar stream is malformed (bad header, checksum, field, record)."""

    def __init__(self, detail: str, *, offset: int | None = None) -> None:
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"layer tar rejected{where}: {detail}")
        self.detail = detail
        self.offset = offset


class TruncatedTar(TarFormatError):
    """The stream ended inside a header or a member's data."""

    def __init__(self, detail: str, *, offset: int | None = None) -> None:
        super().__init__(f"truncated: {detail}", offset=offset)


class UnsafeEntry(TarFormatError):
    """A member's name or link is unsafe or impossible (``..``, NUL, over-long names)."""


class LayerTooLarge(TarFormatError):
    """A size is beyond what the format (or a sane layer) can hold."""


class UnsupportedEntry(TarFormatError, Unimplemented):
    """A member type layers do not use (sparse, volume, multi-volume, unknown).

    Also :class:`~stratasnap.errors.Unimplemented` for callers that ask "is this
    something we could support?"; on the wire it is InvalidArgument (the first base).
    """

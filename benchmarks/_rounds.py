"""The order of the sides in an alternated benchmark round."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["rotated"]


def rotated(names: Sequence[str], r: int) -> list[str]:
    """Round ``r``'s order: each side goes first in turn (two sides: this, ref; ref, this).

    On a shared machine the first side of a round often meets another load
    than the last; rotating spreads that over every side alike.
    """
    k = r % len(names)
    return [*names[k:], *names[:k]]

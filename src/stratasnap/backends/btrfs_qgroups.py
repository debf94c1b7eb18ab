"""The qgroups of deleted btrfs snapshots, until they can be removed."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from ..fs import btrfs

__all__ = ["StaleQgroups"]

log = logging.getLogger("stratasnap.backends.btrfs")


class StaleQgroups:
    """Ids of deleted snapshot subvolumes whose level-0 qgroups may still need removing.

    Kept in a small text file (one id a line) so that a restart does not
    forget them; losing it costs nothing but a stale qgroup. A qgroup can
    only go once btrfs has dropped the subvolume in the background (EBUSY
    until then), so each cleanup() tries again; kernels that remove it
    themselves answer ENOENT, which also settles it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, ids: Iterable[int]) -> None:
        """Remember ``ids``; on failure (a full disk) they are only logged: nothing breaks."""
        ids = list(ids)
        try:
            with self._lock, open(self.path, "a", encoding="ascii") as f:
                f.writelines(f"{i}\n" for i in ids)
        except OSError as exc:
            log.warning("qgroups %s of deleted subvolumes not recorded: %s", ids, exc)

    def pending(self) -> list[int]:
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return []
        return [int(w) for w in text.split() if w.isdigit()]

    def remove_dropped(self, fs: Path) -> list[int]:
        """Remove the qgroups btrfs is done with; return the ids still waiting."""
        with self._lock:
            pending = self.pending()
            if not pending:
                return []
            left = []
            for sid in dict.fromkeys(pending):
                try:
                    btrfs.remove_qgroup(fs, sid)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTCONN, errno.EINVAL):
                        left.append(sid)  # EBUSY: not dropped yet; anything else: later
            tmp = self.path.with_name(self.path.name + ".new")
            tmp.write_text("".join(f"{i}\n" for i in left), encoding="ascii")
            os.replace(tmp, self.path)
            return left

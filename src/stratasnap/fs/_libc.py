"""The few libc entry points the stdlib lacks, through ctypes.

Everything here raises :class:`OSError` carrying the errno and the path the
call was about, so a failed mount reads like a failed ``open``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

__all__ = ["SYSCALLS", "StrPath", "check", "fsencode", "libc", "os_error", "syscall"]

StrPath = str | os.PathLike[str]

libc = ctypes.CDLL(None, use_errno=True)

# The mount-API syscalls got the same numbers on every architecture that
# joined the unified table (5.2+), so x86_64 and aarch64 agree; the table is
# keyed anyway so that an unknown machine fails loudly instead of calling a
# random syscall.
_NUMBERS = {
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}
SYSCALLS: dict[str, dict[str, int]] = {"x86_64": _NUMBERS, "aarch64": _NUMBERS}

_MACHINE = platform.machine()
_syscall = libc.syscall
_syscall.restype = ctypes.c_long


def os_error(err: int, path: StrPath | None = None, detail: str = "") -> OSError:
    """An OSError with the errno's text, an optional detail and the path."""
    text = os.strerror(err) + (f" ({detail})" if detail else "")
    if path is None:
        return OSError(err, text)
    return OSError(err, text, os.fspath(path))


def check(ret: int, path: StrPath | None = None, detail: str = "") -> int:
    """Return ``ret``, or raise the errno of the failed libc call that gave it."""
    if ret < 0:
        raise os_error(ctypes.get_errno(), path, detail)
    return ret


def syscall(name: str, *args: int | bytes | None, path: StrPath | None = None) -> int:
    """Call a syscall by name; every integer argument travels as a ``long``.

    ``syscall(2)`` is variadic and reads each argument as a long, so passing
    a C ``int`` would leave the upper half of the register undefined (and
    ``AT_FDCWD`` is negative).
    """
    table = SYSCALLS.get(_MACHINE)
    if table is None:
        raise os_error(errno.ENOSYS, path, f"no syscall table for {_MACHINE}")
    cargs = [ctypes.c_long(a) if isinstance(a, int) else ctypes.c_char_p(a) for a in args]
    return check(int(_syscall(ctypes.c_long(table[name]), *cargs)), path, name)


def fsencode(path: StrPath) -> bytes:
    """Path to bytes for a C call (keeps undecodable names intact)."""
    return os.fsencode(path)

"""The blockfile backend's options and the labels that ask it for sizes and VM disks.

Options come from three places, so every value is accepted both typed and
as text: Python callers pass ints, bools and lists; the TOML config passes
the same; ``stratasnap -o key=value`` passes strings.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from ..fs.image import FS_TYPES

__all__ = [
    "MAX_SIZE_LABEL",
    "SIZE_BYTES_LABEL",
    "SIZE_GB_LABEL",
    "VM_SCRATCH_LABEL",
    "BlockfileConfig",
    "ScratchRequest",
    "parse_size",
]

log = logging.getLogger("stratasnap.backends.blockfile")

#: Requested scratch size in bytes (containerd's name, shared with its Windows snapshotters).
SIZE_BYTES_LABEL = "containerd.io/snapshot/windows/rootfs.sizebytes"
#: The deprecated request in GiB, honoured only when SIZE_BYTES_LABEL is absent.
SIZE_GB_LABEL = "containerd.io/snapshot/io.microsoft.container.storage.rootfs.size-gb"
#: An upper size in bytes; taken as a request too (the largest request wins).
MAX_SIZE_LABEL = "containerd.io/snapshot/max-size"
#: Present (any value): also make a VM scratch disk, ``vm/scratch.img``.
VM_SCRATCH_LABEL = "containerd.io/snapshot/io.microsoft.vm.storage.scratch"

GIB = 1 << 30
DEFAULT_SCRATCH_SIZE = 10 * GIB
# A file offset is a signed 64-bit number: no image can be larger.
_MAX_BYTES = (1 << 63) - 1
# containerd parses the GiB label as a 32-bit unsigned number.
_MAX_GB = (1 << 32) - 1
_DIGITS = re.compile(r"[0-9]+")
_SIZE_TEXT = re.compile(r"([0-9]+)\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_size(value: object, what: str) -> int:
    """A positive byte count from an int or text like ``"64M"``, ``"10GiB"``, ``"4096"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE_TEXT.fullmatch(value.strip())):
        size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise InvalidArgument(f"{what}={value!r}: expected a size such as 10G or 67108864")
    if not 0 < size <= _MAX_BYTES:
        raise InvalidArgument(f"{what}={value!r}: size out of range")
    return size


def _parse_bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidArgument(f"{what}={value!r}: expected true or false")


def _parse_words(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise InvalidArgument(f"{what}={value!r}: {exc}") from None
    if isinstance(value, list | tuple) and all(isinstance(w, str) for w in value):
        return tuple(value)
    raise InvalidArgument(f"{what}={value!r}: expected a list of strings")


def _parse_path(value: object, what: str) -> Path | None:
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        return Path(text).absolute() if text else None
    raise InvalidArgument(f"{what}={value!r}: expected a path")


@dataclass(frozen=True)
class BlockfileConfig:
    """How the blockfile backend makes images (its constructor's keyword options).

    ``scratch_size``: size of the template image made by mkfs (default 10 GiB;
    sparse, so it costs a few MB). ``fs_type``: ``ext4`` (default) or
    ``xfs``; None means ext4, or the type of ``scratch_file``.
    ``mkfs_options``: extra mkfs arguments. ``scratch_file``: copy this image
    as the template instead of running mkfs. ``recreate_scratch``: remake the
    template on open even if it exists (new size, type or options).
    ``vm_scratch_template``: the image copied for ``VM_SCRATCH_LABEL``.
    """

    scratch_size: int = DEFAULT_SCRATCH_SIZE
    fs_type: str | None = None
    mkfs_options: tuple[str, ...] = ()
    scratch_file: Path | None = None
    recreate_scratch: bool = False
    vm_scratch_template: Path | None = None

    @classmethod
    def from_options(
        cls, options: Mapping[str, object]
    ) -> tuple[BlockfileConfig, dict[str, object]]:
        """Take this backend's options out of ``options``; return them and the rest."""
        rest = dict(options)
        d = cls()
        fs_type = rest.pop("fs_type", d.fs_type)
        if fs_type is not None and fs_type not in FS_TYPES:
            raise InvalidArgument(f"fs_type={fs_type!r}: expected one of {', '.join(FS_TYPES)}")
        config = cls(
            scratch_size=(
                parse_size(rest.pop("scratch_size"), "scratch_size")
                if "scratch_size" in rest
                else d.scratch_size
            ),
            fs_type=str(fs_type) if fs_type is not None else None,
            mkfs_options=_parse_words(rest.pop("mkfs_options", ()), "mkfs_options"),
            scratch_file=_parse_path(rest.pop("scratch_file", ""), "scratch_file"),
            recreate_scratch=_parse_bool(
                rest.pop("recreate_scratch", d.recreate_scratch), "recreate_scratch"
            ),
            vm_scratch_template=_parse_path(
                rest.pop("vm_scratch_template", ""), "vm_scratch_template"
            ),
        )
        return config, rest


def _label_number(labels: Mapping[str, str], name: str, limit: int) -> int | None:
    """The label's value as a plain decimal number, None when absent.

    Strict on purpose: Python's ``int()`` would also take ``" 5"``, ``"+5"``
    and ``"5_0"``, which containerd's ParseUint refuses.
    """
    value = labels.get(name)
    if value is None:
        return None
    if not _DIGITS.fullmatch(value) or int(value) > limit:
        raise InvalidArgument(f"label {name}={value!r}: expected a non-negative whole number")
    return int(value)


@dataclass(frozen=True)
class ScratchRequest:
    """What a new writable snapshot's labels ask for.

    ``size`` is 0 when nothing is asked (the image keeps the size of the one
    it is copied from); ``size_label`` names the label that set it, for
    error messages.
    """

    size: int = 0
    size_label: str = ""
    vm_scratch: bool = False

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> ScratchRequest:
        """Parse the labels; a malformed value is InvalidArgument naming label and value.

        containerd's Windows snapshotter prefers the byte label to the GiB one
        and treats 0 as no request; so do we. The deprecated GiB label gets a
        warning naming its replacement whenever it is present.
        """
        requests: list[tuple[int, str]] = []
        size_bytes = _label_number(labels, SIZE_BYTES_LABEL, _MAX_BYTES)
        if SIZE_GB_LABEL in labels:
            if size_bytes is None:
                log.warning(
                    "label %s is deprecated: use %s (size in bytes) instead",
                    SIZE_GB_LABEL,
                    SIZE_BYTES_LABEL,
                )
                gb = _label_number(labels, SIZE_GB_LABEL, _MAX_GB)
                if gb:
                    requests.append((gb * GIB, SIZE_GB_LABEL))
            else:
                log.warning(
                    "label %s is deprecated and ignored: %s is set",
                    SIZE_GB_LABEL,
                    SIZE_BYTES_LABEL,
                )
        if size_bytes:
            requests.append((size_bytes, SIZE_BYTES_LABEL))
        max_size = _label_number(labels, MAX_SIZE_LABEL, _MAX_BYTES)
        if max_size:
            requests.append((max_size, MAX_SIZE_LABEL))
        size, label = max(requests, default=(0, ""))
        return cls(size=size, size_label=label, vm_scratch=VM_SCRATCH_LABEL in labels)

"""Options of the erofs backend that the overlay backend does not have.

The rest (``mount_options``, ``default_size``, ``slow_chown``,
``sync_remove``, ``upperdir_label``) are the overlay backend's, parsed by
:class:`~.overlay_options.OverlayOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument
from ..fs.erofs_image import COMPRESSIONS
from .overlay_options import parse_bool, parse_words

__all__ = ["DEFAULT_COMPRESSION", "ErofsOptions"]

#: lz4: on this machine's measurements (README, benchmarks/erofs.py) it halves the
#: image against none and builds faster than none (half the bytes to write), where
#: lz4hc saves another tenth for three times the build time.
DEFAULT_COMPRESSION = "lz4"


@dataclass(frozen=True)
class ErofsOptions:
    """How committed layers are built.

    ``compression``: ``none``, ``lz4`` or ``lz4hc``. ``mkfs_options``: extra
    ``mkfs.erofs`` arguments (``-T0``, ``--all-root``...), after ours.
    ``immutable``: set FS_IMMUTABLE_FL on each image where its filesystem
    supports it, so not even root can change or delete it by mistake
    (remove and cleanup clear it first). ``convert_layers``: let a whole
    layer tar become the layer's image directly, through stratasnap's own
    tar -> EROFS converter (``image pull``/``import``, containerd's fast
    path), where it writes the configured compression; false: every layer
    goes file by file into the upper and through ``mkfs.erofs`` at commit.
    """

    compression: str = DEFAULT_COMPRESSION
    mkfs_options: tuple[str, ...] = ()
    immutable: bool = False
    convert_layers: bool = True

    @classmethod
    def take(cls, options: dict[str, object]) -> ErofsOptions:
        """Parse and remove these options from ``options``."""
        compression = options.pop("compression", DEFAULT_COMPRESSION)
        if not isinstance(compression, str) or compression not in COMPRESSIONS:
            raise InvalidArgument(
                f"erofs option compression={compression!r}: expected one of "
                + ", ".join(COMPRESSIONS)
            )
        return cls(
            compression=compression,
            mkfs_options=parse_words("mkfs_options", options.pop("mkfs_options", ()), "erofs"),
            immutable=parse_bool("immutable", options.pop("immutable", False), "erofs"),
            convert_layers=parse_bool(
                "convert_layers", options.pop("convert_layers", True), "erofs"
            ),
        )

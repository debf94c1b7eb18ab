"""Layer tar -> EROFS image, in one streaming pass, without mounts or tools.

The API other parts of stratasnap (the erofs backend, image unpack, the
containerd fast path) call::

    from stratasnap.erofs import convert_tar, ImageStats, TarFormatError

    with open("layer.tar", "rb") as f:          # or any readable binary stream
        stats = convert_tar(f, "snapshots/7/layer.erofs")

``convert_tar`` reads the (already decompressed) tar once, writes an EROFS
image (uncompressed, or lz4/lz4hc-compressed with ``compression=``) with
whiteouts in overlayfs form, fsyncs it and renames it into place; a bad tar
raises :class:`TarFormatError` (an ``InvalidArgument``) and leaves no file
behind.

Modules: ``format`` (on-disk constants and records), ``tree`` (the in-memory
tree and whiteout rules), ``xattrs``, ``layout`` (metadata placement),
``datawriter`` (file data: blocks, batching, the writer thread),
``compressed_writer`` (the same for compressed images: worker threads,
blocks placed in order), ``pclusters`` (compressed extents and their index),
``lz4`` (liblz4 through ctypes), ``writer`` (``convert_tar`` and
``ImageStats``). The tar itself is read by :mod:`stratasnap.tarstream`,
shared with the layer applier.

``convert_tar(stream, out_path, *, uuid=None, volume_name=b"",
default_mtime=None, digest=False, compression="none") -> ImageStats``
(``compression`` one of ``COMPRESSIONS``, which lists "lz4" and "lz4hc"
where liblz4 >= 1.9.3 loads): with ``digest=True`` the stats carry
``tar_digest`` ("sha256:…" of the uncompressed stream: the layer's diff ID,
for chain IDs). It is thread-safe (no shared state); each call runs
short-lived threads of its own (one writer; compressing, one or two workers).
"""

from __future__ import annotations

from ..tarstream import LayerTooLarge, TarFormatError, TruncatedTar, UnsafeEntry
from .writer import COMPRESSIONS, ImageStats, convert_tar

__all__ = [
    "COMPRESSIONS",
    "ImageStats",
    "LayerTooLarge",
    "TarFormatError",
    "TruncatedTar",
    "UnsafeEntry",
    "convert_tar",
]

"""The e2e test image: three layers, the last with a whiteout and an opaque directory."""

from __future__ import annotations

from pathlib import Path

from .oci import ImageInfo, Layer, host_rootfs_layer, write_oci_archive

__all__ = ["IMAGE", "INDEX", "LAYER_FILES", "LOOK", "SEEN", "build_image"]

IMAGE = "stratasnap.test/e2e:1"
INDEX = "stratasnap.test/e2e-index:1"

#: What the test image's layers hold, and what a container must see.
LAYER_FILES = {
    "/data/keep.txt": "keep from layer 1",
    "/data/added.txt": "added by layer 2",
    "/newdir/nested/file.txt": "nested, layer 2",
    "/opaque/new.txt": "new in opaque dir, layer 3",
}

#: A shell script run in a container of the test image: its files, then the two
#: directories layer 3 changed (a whiteout, an opaque directory).
LOOK = (
    f"cat {' '.join(LAYER_FILES)}; echo '-- /data'; ls -a /data; echo '-- /opaque';"
    " ls -a /opaque; test -e /data/gone.txt && echo 'gone.txt is still there'"
)
#: The lines :data:`LOOK` prints when every layer was applied right.
SEEN = [
    *LAYER_FILES.values(),
    "-- /data",
    ".",
    "..",
    "added.txt",
    "keep.txt",
    "-- /opaque",
    ".",
    "..",
    "new.txt",
]


def build_image(path: Path, name: str = IMAGE, layout_dir: bool = False) -> ImageInfo:
    """The 3-layer test image (an OCI archive, or with ``layout_dir`` a layout directory).

    1. a rootfs from the host (sh = dash, cat, ls, libraries); ``/data/keep.txt``,
       ``/data/gone.txt``, ``/opaque/old1.txt``
    2. adds ``/data/added.txt``, the directory ``/newdir/nested`` with a file, and
       ``/opaque/old2.txt``
    3. deletes ``/data/gone.txt`` (``.wh.gone.txt``), makes ``/opaque`` opaque
       (``.wh..wh..opq``) and adds ``/opaque/new.txt`` in it
    """
    files = {k.strip("/"): v + "\n" for k, v in LAYER_FILES.items()}
    l1 = host_rootfs_layer()
    l1.dirs("data").file("data/keep.txt", files["data/keep.txt"])
    l1.file("data/gone.txt", "deleted by layer 3\n")
    l1.dirs("opaque").file("opaque/old1.txt", "hidden by layer 3\n")
    l2 = Layer().dir("data").file("data/added.txt", files["data/added.txt"])
    l2.dirs("newdir/nested").file("newdir/nested/file.txt", files["newdir/nested/file.txt"])
    l2.dir("opaque").file("opaque/old2.txt", "hidden by layer 3\n")
    l3 = Layer().dir("data").whiteout("data/gone.txt")
    l3.dir("opaque").opaque("opaque").file("opaque/new.txt", files["opaque/new.txt"])
    return write_oci_archive(
        path, name, [l1, l2, l3], cmd=["/bin/sh", "-c", "ls /"], layout_dir=layout_dir
    )

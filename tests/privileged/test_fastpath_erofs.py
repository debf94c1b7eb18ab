"""The remote-snapshot fast path on the erofs backend: containerd's layers become EROFS images.

The same containerd-shaped Prepares as tests/unit/test_server_fastpath.py
(whose content service double and image it uses), served by the real erofs
backend's ``convert_layer``: the layers are committed without the upper ever
being written, and the mounted view shows both layers with the whiteout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import need_root
from fastpath_kit import (
    NS,
    Image,
    Stack,
    fast_stacks,
    key,
    no_temporaries,
    sample,
    walk_like_containerd,
)

import stratasnap.erofs
from stratasnap.backends.erofs import IMAGE
from stratasnap.errors import AlreadyExists
from stratasnap.testing import mounted

pytestmark = pytest.mark.privileged


@pytest.fixture
def image() -> Image:
    return Image()


@pytest.fixture
def stack(scratch: Path) -> Iterator[Callable[..., Stack]]:
    need_root()
    with fast_stacks(scratch) as make:
        yield make


ERofs: dict[str, object] = {}  # the default: lz4 layers, written by the converter


def test_erofs_commits_containerds_layers_from_the_blobs(
    stack: Callable[..., Stack],
    image: Image,
    scratch: Path,
) -> None:
    client, cs, server = stack(backend="erofs", options=ERofs)
    for blob in image.blobs:
        cs.add(NS, blob)
    parent = ""
    for i in range(2):
        with pytest.raises(AlreadyExists):
            client.prepare(key(i + 1, image.chains[i]), parent, image.labels(i))
        found = walk_like_containerd(client, image.chains[i], parent)
        assert [f.name for f in found] == [image.chains[i]]
        parent = found[0].name
    assert sample(server, "stratasnap_fastpath_layers_total", how="converted") == 2
    no_temporaries(client)
    sn = server.snapshotters["stratasnap"]
    images = sorted((sn.root / "snapshots").glob(f"*/{IMAGE}"))  # type: ignore[attr-defined]
    assert len(images) == 2, "each layer is one EROFS image"
    mnt = scratch / "mnt"
    mnt.mkdir()
    with mounted(client.view("view", image.chains[1]), mnt) as root:
        assert (root / "etc/hello").read_bytes() == b"hello again\n"
        assert not (root / "etc/gone").exists()
        assert (root / "bin/big").stat().st_size == 3 << 20


def test_erofs_without_a_converter_for_its_compression_goes_the_normal_way(
    stack: Callable[..., Stack],
    image: Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As on a host whose liblz4 is too old for lz4hc: mkfs.erofs builds those layers.
    monkeypatch.setattr(stratasnap.erofs, "COMPRESSIONS", ("none", "lz4"))
    client, cs, server = stack(backend="erofs", options={"compression": "lz4hc"})
    cs.add(NS, image.blobs[0])
    assert not server.snapshotters["stratasnap"].converts_layers  # type: ignore[attr-defined]
    mounts = client.prepare(key(1, image.chains[0]), "", image.labels(0))
    assert mounts and cs.calls.total() == 0

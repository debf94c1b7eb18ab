"""The remote-snapshot fast path through the real gRPC server, against a content service double.

containerd's side is played by :mod:`fastpath_kit` (its content API on a
unix socket, serving real gzip blobs) and by the snapshots client sending the
Prepare containerd's unpacker sends: key ``<ns>/<seq>/extract-… <chain>``, the
backend key of the parent, labels ``containerd.io/snapshot.ref`` and
``containerd.io/snapshot/cri.layer-digest``. The backend is native with the
layer seam (``converts_layers``/``convert_layer``) applying the tar with
stratasnap's applier, so these tests need neither root nor erofs; the erofs
backend's own seam is exercised in tests/privileged and tests/e2e.
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from fastpath_kit import (
    NS,
    ConvertingNative,
    Image,
    Stack,
    fast_stacks,
    key,
    layer_tar,
    no_temporaries,
    sample,
    walk_like_containerd,
)

from stratasnap.backends.native import NativeSnapshotter
from stratasnap.errors import AlreadyExists, NotFound, SnapshotError
from stratasnap.server.client import Client
from stratasnap.server.config import load_config
from stratasnap.server.daemon import Server
from stratasnap.server.fastpath import LAYER_DIGEST_LABEL, REF_LABEL, TEMP_PREFIX
from stratasnap.types import Kind


@pytest.fixture
def image() -> Image:
    return Image()


@pytest.fixture
def stack(scratch: Path) -> Iterator[Callable[..., Stack]]:
    with fast_stacks(scratch) as make:
        yield make


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


# -- the fast path taken -------------------------------------------------------------------


def test_layers_are_committed_under_the_target_and_found_by_containerds_walk(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack()
    for i in range(2):
        cs.add(NS, image.blobs[i])
    parent = ""
    for i in range(2):
        with pytest.raises(AlreadyExists):
            client.prepare(key(i + 1, image.chains[i]), parent, image.labels(i))
        found = walk_like_containerd(client, image.chains[i], parent)
        assert [f.name for f in found] == [image.chains[i]]
        info = found[0]
        assert info.kind is Kind.COMMITTED
        assert info.parent == parent
        assert info.labels[LAYER_DIGEST_LABEL] == image.digests[i]
        assert info.labels["containerd.io/snapshot/cri.image-ref"] == "example.test/app:1"
        with pytest.raises(NotFound):
            client.stat(key(i + 1, image.chains[i]))  # containerd's key was never created
        parent = info.name
    assert sample(server, "stratasnap_fastpath_layers_total", how="converted") == 2
    assert cs.namespaces == {NS}
    no_temporaries(client)
    # The rootfs: layer 2 over layer 1, the whiteout applied.
    mounts = client.view("view", image.chains[1])
    files = tree(Path(mounts[0].source))
    assert files["etc/hello"] == b"hello again\n"
    assert "etc/gone" not in files
    assert len(files["bin/big"]) == 3 << 20


def test_parent_unpacked_by_containerd_gives_the_chain_from_its_key(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, _server = stack()
    # Layer 1 the normal way: containerd's backend key is "<ns>/<seq>/<chain>".
    client.prepare(key(1, image.chains[0]), "", {REF_LABEL: image.chains[0]})
    parent_key = f"{NS}/2/{image.chains[0]}"
    client.commit(parent_key, key(1, image.chains[0]))
    cs.add(NS, image.blobs[1])
    with pytest.raises(AlreadyExists):
        client.prepare(key(3, image.chains[1]), parent_key, image.labels(1))
    assert [i.name for i in walk_like_containerd(client, image.chains[1], parent_key)] == [
        image.chains[1]
    ]


def test_a_layer_already_there_is_reused_without_reading_content(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack()
    cs.add(NS, image.blobs[0])
    with pytest.raises(AlreadyExists):
        client.prepare(key(1, image.chains[0]), "", image.labels(0))
    reads = cs.calls["Read"]
    # Another namespace (or a re-pull after containerd lost track) asks again.
    with pytest.raises(AlreadyExists):
        client.prepare(f"other/7/extract-1 {image.chains[0]}", "", image.labels(0))
    assert cs.calls["Read"] == reads
    assert sample(server, "stratasnap_fastpath_layers_total", how="reused") == 1


def test_a_blob_still_being_fetched_is_waited_for(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack(fetch_start_timeout=0.2)
    cs.fetching(NS, image.digests[0])
    arrives = threading.Timer(1.0, cs.add, (NS, image.blobs[0]))
    arrives.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(AlreadyExists):
            client.prepare(key(1, image.chains[0]), "", image.labels(0))
    finally:
        arrives.join()
    assert time.monotonic() - t0 >= 0.9  # it waited past the start timeout: being fetched
    assert sample(server, "stratasnap_fastpath_layers_total", how="converted") == 1


# -- fallbacks: a normal prepare, counted by reason ----------------------------------------


def normal_prepare(
    client: Client, server: Server, image: Image, reason: str, **labels: str
) -> None:
    k = key(1, image.chains[0])
    mounts = client.prepare(k, "", labels or image.labels(0))
    assert mounts and client.stat(k).kind is Kind.ACTIVE
    assert sample(server, "stratasnap_fastpath_fallbacks_total", reason=reason) == 1
    assert sample(server, "stratasnap_fastpath_layers_total", how="converted") == 0
    with pytest.raises(NotFound):
        client.stat(image.chains[0])  # nothing committed under the target
    no_temporaries(client)


def test_with_nothing_being_fetched_it_falls_back_at_once(
    stack: Callable[..., Stack], image: Image
) -> None:
    # containerd 1.6's first layer: its fetch begins only after this Prepare returns.
    client, _cs, server = stack(fetch_start_timeout=20, fetch_timeout=30)
    t0 = time.monotonic()
    normal_prepare(client, server, image, "blob-not-fetched")
    assert time.monotonic() - t0 < 5


def test_a_blob_not_fetched_while_others_are_falls_back_after_the_start_timeout(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack(fetch_start_timeout=1.5, fetch_timeout=30)
    cs.fetching(NS, image.digests[1])  # another layer is on its way, not this one
    t0 = time.monotonic()
    normal_prepare(client, server, image, "blob-not-fetched")
    assert 1.5 <= time.monotonic() - t0 < 10


def test_a_fetch_that_never_ends_falls_back_after_fetch_timeout(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack(fetch_timeout=1.0)
    cs.fetching(NS, image.digests[0])
    t0 = time.monotonic()
    normal_prepare(client, server, image, "blob-wait-timeout")
    assert 1.0 <= time.monotonic() - t0 < 10


def test_a_blob_whose_digest_is_wrong_falls_back(stack: Callable[..., Stack], image: Image) -> None:
    client, cs, server = stack()
    # The store hands out other bytes under the layer's digest.
    tampered = gzip.compress(layer_tar({"etc/evil": b"x"}))
    cs.add(NS, tampered, digest=image.digests[0])
    normal_prepare(client, server, image, "digest-mismatch")


def test_a_layer_whose_chain_differs_falls_back(stack: Callable[..., Stack], image: Image) -> None:
    client, cs, server = stack()
    cs.add(NS, image.blobs[1])
    # Layer 2's blob where containerd expects layer 1's chain (no parent).
    labels = {**image.labels(0), LAYER_DIGEST_LABEL: image.digests[1]}
    normal_prepare(client, server, image, "chain-mismatch", **labels)


def test_containerd_unreachable_falls_back(
    stack: Callable[..., Stack], image: Image, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="stratasnap"):
        client, _cs, server = stack(content=False)
        normal_prepare(client, server, image, "content-unavailable")
    # Said once at start, then for the layer with its reason.
    assert "no containerd socket yet" in caplog.text
    fallback = [r for r in caplog.records if getattr(r, "reason", "") == "content-unavailable"]
    assert fallback and fallback[0].levelno == logging.WARNING


def test_without_the_layer_digest_label_it_falls_back(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack()
    cs.add(NS, image.blobs[0])
    normal_prepare(client, server, image, "missing-layer-digest", **{REF_LABEL: image.chains[0]})
    assert cs.calls.total() == 0


def test_prepares_without_a_target_are_left_alone(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack()
    client.prepare(f"{NS}/1/rootfs", "", {LAYER_DIGEST_LABEL: image.digests[0]})
    assert cs.calls.total() == 0
    assert (
        server.metrics.registry.get_sample_value(
            "stratasnap_fastpath_fallbacks_total", {"snapshotter": "stratasnap", "reason": "x"}
        )
        is None
    )


def test_backends_without_the_seam_never_take_it(stack: Callable[..., Stack], image: Image) -> None:
    client, cs, server = stack(backend=NativeSnapshotter)
    cs.add(NS, image.blobs[0])
    mounts = client.prepare(key(1, image.chains[0]), "", image.labels(0))
    assert mounts and cs.calls.total() == 0
    assert sample(server, "stratasnap_fastpath_layers_total", how="converted") == 0


def test_switched_off_it_is_never_taken(stack: Callable[..., Stack], image: Image) -> None:
    client, cs, _server = stack(enabled=False)
    cs.add(NS, image.blobs[0])
    client.prepare(key(1, image.chains[0]), "", image.labels(0))
    assert cs.calls.total() == 0


def test_an_abandoned_temporary_snapshot_is_removed_at_start(scratch: Path) -> None:
    # A server killed mid-layer leaves its temporary snapshot, labelled with its pid.
    sn = ConvertingNative(scratch / "root")
    sn.prepare(f"{TEMP_PREFIX}dead sha256:x", "", {"stratasnap.io/unpack.pid": "999999999:1"})
    sn.close()
    config = load_config(root=scratch / "root", address=scratch / "ss.sock")
    with Server(config, opener=lambda sc: ConvertingNative(sc.root)) as server:
        assert [i.name for i in server.snapshotters["stratasnap"].walk()] == []


class RacedNative(ConvertingNative):
    """Another Prepare of the same layer commits it while this one converts."""

    def convert_layer(self, key: str, tar: BinaryIO) -> str:
        target = key.rsplit(" ", 1)[1]
        other = f"other-{target}"
        self.prepare(other, "")
        self.commit(target, other, labels={REF_LABEL: target})
        return super().convert_layer(key, tar)


def test_a_layer_committed_meanwhile_by_another_prepare_is_used(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack(backend=RacedNative)
    cs.add(NS, image.blobs[0])
    with pytest.raises(AlreadyExists):
        client.prepare(key(1, image.chains[0]), "", image.labels(0))
    assert sample(server, "stratasnap_fastpath_layers_total", how="reused") == 1
    assert [i.name for i in client.walk()] == [image.chains[0]]
    no_temporaries(client)


def test_a_cancelled_prepare_stops_waiting_and_prepares_nothing(
    stack: Callable[..., Stack], image: Image
) -> None:
    client, cs, server = stack(fetch_timeout=60)
    cs.fetching(NS, image.digests[0])  # on its way, and never arriving
    hasty = Client(server.address, namespace=NS, timeout=1.0)
    try:
        with pytest.raises(SnapshotError):  # DEADLINE_EXCEEDED on the client's side
            hasty.prepare(key(1, image.chains[0]), "", image.labels(0))
    finally:
        hasty.close()
    deadline = time.monotonic() + 10  # the server notices at its next poll
    while not sample(server, "stratasnap_fastpath_fallbacks_total", reason="cancelled"):
        assert time.monotonic() < deadline, "still waiting for the blob of a gone client"
        time.sleep(0.1)
    with pytest.raises(NotFound):
        client.stat(key(1, image.chains[0]))

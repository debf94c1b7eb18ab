"""The decompressing, verifying layer stream under the applier."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest
from e2e.oci import Layer

from stratasnap.images.apply import Target, apply_tar
from stratasnap.images.content import DigestMismatch
from stratasnap.images.layer_stream import LayerStream
from stratasnap.images.reference import Digest


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tamper", [False, True])
def test_padding_after_the_tar_is_hashed_not_lost(scratch: Path, tamper: bool) -> None:
    """The applier stops at the end-of-archive; megabytes of padding follow (as some
    writers leave). finish() must still read them for the diff ID, and the applier
    must not close the stream under it."""
    raw = Layer().file("a", "a").tar() + bytes(8 << 20)
    blob = gzip.compress(raw, 1)
    diff_id = Digest.of(raw if not tamper else raw + b"x")
    stream = LayerStream(io.BytesIO(blob), "gzip", Digest.of(blob), diff_id)
    try:
        apply_tar(stream, Target(str(scratch)))  # type: ignore[arg-type]
        assert not stream.closed
        if tamper:
            with pytest.raises(DigestMismatch, match="diff ID"):
                stream.finish()
        else:
            stream.finish()
    finally:
        stream.close()
    assert (scratch / "a").read_text() == "a"


def test_without_the_diff_id_hash_the_blob_digest_is_still_checked() -> None:
    """hash_diff_id=False (the reader hashes what it reads itself): finish() checks the
    blob's digest only, and the bytes read are the layer's, whole."""
    raw = Layer().file("a", "a").tar()
    blob = gzip.compress(raw, 1)
    wrong = Digest.of(b"not the layer")
    stream = LayerStream(io.BytesIO(blob), "gzip", Digest.of(blob), wrong, hash_diff_id=False)
    try:
        assert stream.read() == raw
        stream.finish()  # the diff ID is the reader's to check
    finally:
        stream.close()
    stream = LayerStream(io.BytesIO(blob), "gzip", wrong, Digest.of(raw), hash_diff_id=False)
    try:
        stream.read()
        with pytest.raises(DigestMismatch, match="layer blob"):
            stream.finish()
    finally:
        stream.close()

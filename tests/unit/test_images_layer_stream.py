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

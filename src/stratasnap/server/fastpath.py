"""containerd's remote-snapshot protocol, served by converting the layer ourselves.

When containerd unpacks a layer it first calls Prepare with the label
``containerd.io/snapshot.ref`` (the layer's chain ID); clients that add image
annotations (CRI with ``disable_snapshot_annotations = false``, nerdctl,
``snapshotters.AppendInfoHandlerWrapper``) also send
``containerd.io/snapshot/cri.layer-digest``, the compressed blob's digest.
If the Prepare answers AlreadyExists, containerd Walks the backend with
``labels."containerd.io/snapshot.ref"==<chain>,parent=="<backend parent>"``,
takes the committed snapshot it finds (its name becomes containerd's backend
key for the layer) and skips its own unpack: no file-by-file write through
a mount, no walking differ.

:class:`FastPath` does that for backends that can take a whole layer tar
(``converts_layers``, ``convert_layer``: erofs): it waits for the blob in
containerd's content store (containerd may still be fetching it), streams
it through decompression into ``convert_layer`` on a temporary active
snapshot, checks the blob digest and that ``sha256(parent_chain + " " +
diff_id)`` (or the diff ID alone without a parent; the diff ID is the
digest of the uncompressed stream, which the converter hashes as it reads
every byte) is the requested chain ID, and commits it under the chain ID
with the Prepare's labels. Every problem is a :class:`Fallback`: the
temporary snapshot is removed and the caller does the normal Prepare, so a
pull never fails because of this path.

The temporary snapshot carries :func:`~stratasnap.images.unpack.in_progress_labels`
(this process' id): if the server is killed mid-layer, the next start removes
it (:func:`~stratasnap.images.unpack.remove_abandoned`); containerd's GC would
too, as it owns no such key.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import AlreadyExists, NotFound, SnapshotError, Unavailable
from ..images.compression import sniff_compression
from ..images.content import DigestMismatch
from ..images.layer_stream import LayerStream
from ..images.manifest import chain_id
from ..images.reference import Digest, parse_digest
from ..images.unpack import LayerConverter, in_progress_labels, layer_converter
from ..snapshotter import Snapshotter
from ..types import Kind
from .config import FastPathConfig
from .content_client import ContentClient, ContentError
from .metrics import Metrics

__all__ = [
    "LAYER_DIGEST_LABEL",
    "REF_LABEL",
    "TEMP_PREFIX",
    "Fallback",
    "FastPath",
]

log = logging.getLogger("stratasnap.server.fastpath")

#: The chain ID containerd wants the layer committed as (note the "." after snapshot).
REF_LABEL = "containerd.io/snapshot.ref"
#: The compressed layer blob's digest, from the image annotations.
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
#: Keys of the temporary snapshots a layer is converted in.
TEMP_PREFIX = "stratasnap-fastpath/"
#: Bytes read ahead of the converter from containerd's Read stream.
_READ_BUFFER = 1 << 20

#: Fallbacks that are the protocol's normal course, logged at info (others warn).
_EXPECTED = frozenset({"missing-layer-digest", "blob-not-fetched", "backend-refused", "cancelled"})


class Fallback(Exception):
    """This layer goes the normal way; ``reason`` is a short name for metrics and logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Request:
    """The fast path's view of one Prepare."""

    key: str
    parent: str
    target: str
    digest: str
    namespace: str
    parent_chain: Digest | None  # None: a base layer


class FastPath:
    """Answers layer Prepares with committed layers when it can (see the module doc)."""

    def __init__(
        self,
        config: FastPathConfig,
        metrics: Metrics | None = None,
        content: ContentClient | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.content = content or ContentClient(str(config.containerd_address))

    def close(self) -> None:
        self.content.close()

    def prepare(
        self,
        name: str,
        sn: Snapshotter,
        key: str,
        parent: str,
        labels: Mapping[str, str],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> str | None:
        """The chain ID committed for this Prepare (answer AlreadyExists), or None.

        None: do the normal Prepare (not a layer with the fast path's labels,
        a backend without the seam, or a fallback, already logged and counted).
        ``cancelled`` says whether the caller has gone: waiting for its blob
        stops, and the Prepare ends Unavailable.
        """
        target = labels.get(REF_LABEL, "")
        if not target or not self.config.enabled:
            return None
        # Only now: a runtime Protocol check costs 15-25 µs, a lot for every
        # container's Prepare (which has no layer label).
        converter = layer_converter(sn)
        if converter is None:
            return None
        start = time.perf_counter()
        try:
            req = self._request(key, parent, target, labels)
            how, steps = self._satisfy(sn, converter, req, labels, cancelled)
        except Fallback as fb:
            self._fell_back(name, key, target, fb, start)
            if fb.reason == "cancelled":
                # The caller is gone: nobody would learn of a snapshot prepared now.
                raise Unavailable(f"Prepare of {key!r} cancelled by the client") from None
            return None
        if self.metrics is not None:
            self.metrics.fast_layer(name, how)
        log.info(
            "layer fast path: committed, containerd skips its unpack",
            extra={
                "snapshotter": name,
                "key": key,
                "target": target,
                "how": how,
                "digest": labels.get(LAYER_DIGEST_LABEL, ""),
                "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                **steps,
            },
        )
        return target

    def _fell_back(self, name: str, key: str, target: str, fb: Fallback, start: float) -> None:
        if self.metrics is not None:
            self.metrics.fast_fallback(name, fb.reason)
        log.log(
            logging.INFO if fb.reason in _EXPECTED else logging.WARNING,
            "layer fast path: falling back to a normal prepare",
            extra={
                "snapshotter": name,
                "key": key,
                "target": target,
                "reason": fb.reason,
                "error": str(fb),
                "duration_ms": round((time.perf_counter() - start) * 1000, 1),
            },
        )

    # -- the steps ---------------------------------------------------------------------

    def _request(self, key: str, parent: str, target: str, labels: Mapping[str, str]) -> Request:
        digest = labels.get(LAYER_DIGEST_LABEL, "")
        if not digest:
            raise Fallback(
                "missing-layer-digest",
                f"no {LAYER_DIGEST_LABEL} label (CRI: disable_snapshot_annotations = false)",
            )
        for what, value in (("target", target), ("layer digest", digest)):
            try:
                parse_digest(value)
            except SnapshotError as e:
                raise Fallback("bad-label", f"{what}: {e}") from None
        # containerd's keys are "<namespace>/<seq>/<name>"; a committed parent's name
        # is its chain ID (from containerd's unpack, or ours: then the whole key).
        namespace = key.split("/", 1)[0] if "/" in key else ""
        if not namespace:
            raise Fallback("no-namespace", f"key {key!r} does not start with a namespace")
        parent_chain = None
        if parent:
            try:
                parent_chain = parse_digest(parent.rsplit("/", 1)[-1])
            except SnapshotError:
                raise Fallback(
                    "parent-not-chain", f"parent {parent!r} does not end in a chain ID"
                ) from None
        return Request(key, parent, target, digest, namespace, parent_chain)

    def _satisfy(
        self,
        sn: Snapshotter,
        converter: LayerConverter,
        req: Request,
        labels: Mapping[str, str],
        cancelled: Callable[[], bool],
    ) -> tuple[str, dict[str, float]]:
        """How the layer came to be committed, and where the time went (for the log)."""
        if self._have(sn, req):
            return "reused", {}
        t0 = time.perf_counter()
        try:
            blob = self.content.wait(
                req.namespace,
                req.digest,
                timeout=self.config.fetch_timeout,
                start_timeout=self.config.fetch_start_timeout,
                cancelled=cancelled,
            )
        except ContentError as e:
            raise Fallback(e.reason, str(e)) from None
        t1 = time.perf_counter()
        temp = f"{TEMP_PREFIX}{uuid.uuid4().hex} {req.target}"
        try:
            sn.prepare(temp, req.parent, in_progress_labels())
        except SnapshotError as e:
            raise Fallback("prepare-failed", f"temporary snapshot on {req.parent!r}: {e}") from None
        try:
            self._convert(converter, req, temp, blob.size)
            t2 = time.perf_counter()
            try:
                sn.commit(req.target, temp, labels=labels)
            except AlreadyExists:
                # Another Prepare of the same layer won the race: use its layer.
                if self._have(sn, req):
                    self._discard(sn, temp)
                    return "reused", {}
                raise
        except Fallback:
            self._discard(sn, temp)
            raise
        except Exception as e:  # anything at all: containerd must get its normal prepare
            self._discard(sn, temp)
            raise Fallback("convert-failed", f"{type(e).__name__}: {e}") from e
        t3 = time.perf_counter()
        return "converted", {
            "blob_bytes": blob.size,
            "wait_ms": round((t1 - t0) * 1000, 1),
            "convert_ms": round((t2 - t1) * 1000, 1),
            "commit_ms": round((t3 - t2) * 1000, 1),
        }

    def _have(self, sn: Snapshotter, req: Request) -> bool:
        """Whether the layer is committed already, where containerd's Walk will find it."""
        try:
            info = sn.stat(req.target)
        except NotFound:
            return False
        if (
            info.kind is Kind.COMMITTED
            and info.parent == req.parent
            and info.labels.get(REF_LABEL) == req.target
        ):
            return True
        raise Fallback(
            "target-name-taken",
            f"snapshot {req.target!r} exists with parent {info.parent!r}, not {req.parent!r}",
        )

    def _convert(self, converter: LayerConverter, req: Request, temp: str, size: int) -> None:
        reader = io.BufferedReader(self.content.open(req.namespace, req.digest, size), _READ_BUFFER)
        try:
            compression = sniff_compression(reader.peek(4)[:4])
            # The converter hashes every byte it reads (its diff ID): the stream checks
            # the blob digest only, so the uncompressed layer is hashed once.
            stream = LayerStream(
                reader, compression, parse_digest(req.digest), None, hash_diff_id=False
            )
            try:
                diff_id = converter.convert_layer(temp, stream)  # type: ignore[arg-type]
                stream.finish()
            except DigestMismatch as e:
                raise Fallback("digest-mismatch", str(e)) from None
            except ContentError as e:
                raise Fallback(e.reason, str(e)) from None
            except SnapshotError as e:
                raise Fallback("backend-refused", str(e)) from None
            finally:
                stream.close()
        finally:
            reader.close()
        got = chain_id(req.parent_chain, parse_digest(diff_id))
        if str(got) != req.target:
            raise Fallback(
                "chain-mismatch",
                f"layer {req.digest} on {req.parent_chain or 'no parent'} has chain ID {got}, "
                f"containerd asked for {req.target}",
            )

    @staticmethod
    def _discard(sn: Snapshotter, key: str) -> None:
        try:
            sn.remove(key)
        except NotFound:
            pass
        except Exception as e:
            # Left for the next start (remove_abandoned) or containerd's GC.
            log.warning(
                "cannot remove a fast-path temporary snapshot",
                extra={"key": key, "error": f"{type(e).__name__}: {e}"},
            )

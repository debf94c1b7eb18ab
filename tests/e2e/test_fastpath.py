"""containerd's remote-snapshot fast path, through a real containerd pulling from a registry.

A private containerd (1.6, Debian's) with stratasnap's erofs backend as its
proxy snapshotter; the test image (three layers, whiteouts and an opaque
directory in the last) is pushed to Debian's docker-registry, and pulled the
way CRI pulls: ``gopull`` (containerd's Go client: client.Pull with
WithPullUnpack and snapshotters.AppendInfoHandlerWrapper, so each layer's
Prepare carries ``containerd.io/snapshot/cri.layer-digest``).

What the tests read: stratasnap's metrics (layers converted, fallbacks by
reason), the backend's snapshot names (a layer the fast path committed is
named by its chain ID; one containerd unpacked is ``<ns>/<seq>/<chain ID>``),
the Commit calls stratasnap logged (containerd never committed a fast-path
layer: it did not unpack it), and a container's view of the rootfs.

containerd 1.6's unpacker starts fetching layers only after the first Prepare
of the pull has returned: that layer's blob is not on its way when it is
prepared, so it goes the normal way (reason ``blob-not-fetched``) and the
layers after it take the fast path. With the blobs already in containerd's
store (``ctr content fetch`` first), every layer does.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import need, need_root

from .conftest import stack_base, started
from .gobuild import GOPULL, build_go
from .harness import REQUIRED_TOOLS, Stack
from .oci import ImageInfo
from .registry import LocalRegistry, free_port, push
from .testimage import LAYER_FILES, LOOK, SEEN, build_image

pytestmark = pytest.mark.e2e

OPTIONS: dict[str, object] = {}  # the erofs default: lz4 layers, converted


@dataclass
class Env:
    stack: Stack
    ref: str
    info: ImageInfo
    gopull: Path
    archive: Path
    metrics: str

    def pull(self) -> dict[str, object]:
        out = self.stack.run(
            [
                str(self.gopull),
                "-address",
                str(self.stack.cd_socket),
                "-namespace",
                self.stack.namespace,
                "-snapshotter",
                self.stack.snapshotter,
                "-ref",
                self.ref,
            ],
            timeout=300,
        ).stdout
        result: dict[str, object] = json.loads(out)
        return result

    def sample(self, name: str, **labels: str) -> float:
        """A counter of stratasnap's /metrics (0 if absent)."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        want = {"snapshotter": self.stack.snapshotter, **labels}
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            head, _, value = line.rpartition(" ")
            pairs = dict(p.split("=", 1) for p in head[len(name) + 1 : -1].split(",") if "=" in p)
            if all(pairs.get(k) == f'"{v}"' for k, v in want.items()):
                total += float(value)
        return total

    def backend_names(self) -> dict[str, str]:
        """Our store's snapshots: name -> parent (read with our CLI)."""
        rows = json.loads(self.stack.stratasnap("ls", "--json").stdout)
        return {str(r["name"]): str(r["parent"]) for r in rows}

    def log_mark(self) -> int:
        """Where stratasnap's log ends now (for :meth:`committed_by_containerd`)."""
        return self.stack.stratasnapd.log.stat().st_size

    def committed_by_containerd(self, since: int) -> list[str]:
        """Names containerd gave in Commit calls logged after ``since`` (every call is
        logged at debug; other tests in this module commit the same chain IDs)."""
        names = []
        with self.stack.stratasnapd.log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if "method=Commit" in line and "commit_name=" in line:
                names.append(line.split("commit_name=", 1)[1].split()[0].strip('"'))
        return names

    def reset(self) -> None:
        """No image, no content, no snapshot left (containerd's GC, synchronously)."""
        for name in self.stack.ctr("images", "ls", "-q").stdout.split():
            self.stack.ctr("images", "rm", "--sync", name)
        deadline = time.monotonic() + 30
        while self.backend_names():
            if time.monotonic() > deadline:
                raise AssertionError(f"snapshots left after GC: {self.backend_names()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    need_root()
    for tool in (*REQUIRED_TOOLS, "docker-registry", "skopeo", "ldd"):
        need(shutil.which(tool) is not None, f"{tool} not installed")
    with stack_base("fastpath") as (base, namespace):
        gopull, why = build_go(GOPULL, base / "gopull", base / "gobuild")
        need(gopull is not None, f"gopull: {why}")
        assert gopull is not None
        metrics = f"127.0.0.1:{free_port()}"
        stack = Stack(
            base,
            "erofs",
            namespace=namespace,
            backend_options=OPTIONS,
            metrics_address=metrics,
            fast_path={"fetch_timeout": 120.0, "fetch_start_timeout": 1.0},
        )
        with LocalRegistry(base / "registry") as registry, started(stack):
            ref = f"{registry.address}/e2e/fastpath:1"
            info = build_image(base / "layout", name=ref, layout_dir=True)
            push(base / "layout", ref)
            archive = base / "image.tar"
            build_image(archive, name="stratasnap.test/fastpath-import:1")
            yield Env(stack, ref, info, gopull, archive, metrics)


def _delta(env: Env, before: dict[str, float]) -> dict[str, float]:
    now = _counts(env)
    return {k: now[k] - before.get(k, 0.0) for k in now if now[k] != before.get(k, 0.0)}


def _counts(env: Env) -> dict[str, float]:
    out = {
        f"{how}": env.sample("stratasnap_fastpath_layers_total", how=how)
        for how in ("converted", "reused")
    }
    for reason in ("blob-not-fetched", "missing-layer-digest", "blob-wait-timeout"):
        out[reason] = env.sample("stratasnap_fastpath_fallbacks_total", reason=reason)
    return out


def _container_sees_the_image(env: Env, cid: str) -> None:
    out = env.stack.ctr(
        "run",
        "--rm",
        "--snapshotter",
        env.stack.snapshotter,
        env.ref,
        cid,
        "/bin/sh",
        "-c",
        f"{LOOK}; true",
    ).stdout
    assert out.splitlines() == SEEN


def test_a_cri_pull_converts_the_layers_being_fetched(env: Env) -> None:
    env.reset()
    before, mark = _counts(env), env.log_mark()
    env.pull()
    chain = env.info.chain_ids
    # Layer 1 was prepared before containerd began fetching anything: normal path.
    # Layers 2 and 3 were on their way: converted, containerd's unpack skipped.
    assert _delta(env, before) == {"converted": 2, "blob-not-fetched": 1}
    names = env.backend_names()
    first = [n for n in names if n.endswith(f"/{chain[0]}")]
    assert len(first) == 1 and first[0].startswith(f"{env.stack.namespace}/"), names
    assert names[chain[1]] == first[0], "layer 2 sits on containerd's layer 1"
    assert names[chain[2]] == chain[1]
    assert len(names) == 3, f"nothing else left (no temporary snapshot): {names}"
    committed = env.committed_by_containerd(mark)
    assert first[0] in committed, "containerd committed the layer it unpacked"
    assert not [n for n in committed if n.endswith((chain[1], chain[2]))], committed
    # containerd's own view: three committed layers under their chain IDs.
    listed = env.stack.snapshots("ls").stdout
    for cid in chain:
        assert cid in listed
    _container_sees_the_image(env, "fastpath-cri")


def test_with_the_blobs_fetched_first_every_layer_takes_the_fast_path(env: Env) -> None:
    env.reset()
    env.stack.ctr("content", "fetch", "--plain-http", env.ref, timeout=300)
    before = _counts(env)
    env.pull()
    assert _delta(env, before) == {"converted": 3}
    chain = env.info.chain_ids
    names = env.backend_names()
    assert names == {chain[0]: "", chain[1]: chain[0], chain[2]: chain[1]}
    _container_sees_the_image(env, "fastpath-fetched")


def test_ctr_import_still_unpacks_the_normal_way(env: Env) -> None:
    env.reset()
    before = _counts(env)
    out = env.stack.ctr(
        "images", "import", "--snapshotter", env.stack.snapshotter, str(env.archive)
    ).stdout
    assert "unpacking stratasnap.test/fastpath-import:1" in out and "done" in out, out
    # ctr import labels no target on its Prepares: the fast path is not even tried.
    assert _delta(env, before) == {}
    names = env.backend_names()
    assert len(names) == 3 and all(n.startswith(f"{env.stack.namespace}/") for n in names)
    out = env.stack.ctr(
        "run",
        "--rm",
        "--snapshotter",
        env.stack.snapshotter,
        "stratasnap.test/fastpath-import:1",
        "fastpath-import",
        "cat",
        "/data/keep.txt",
    ).stdout
    assert out == LAYER_FILES["/data/keep.txt"] + "\n"

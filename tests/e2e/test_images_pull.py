"""``image pull`` from a real registry (Debian's docker-registry) the test starts itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need

from stratasnap import FailedPrecondition, NotFound, Unavailable, open_snapshotter
from stratasnap.images.manifest import Platform
from stratasnap.images.pull import PullOptions, pull
from stratasnap.images.store import ImageStore

from .oci import ImageInfo, Layer, write_oci_archive
from .registry import AuthProxy, LocalRegistry, free_port, push
from .tree import Listing, listing

USERS = {"ci": "s3cret"}


def _need_tools() -> None:
    for tool in ("docker-registry", "skopeo", "htpasswd"):
        need(shutil.which(tool) is not None, f"{tool} not installed")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    _need_tools()
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    _need_tools()
    with LocalRegistry(tmp_path_factory.mktemp("registry-auth"), USERS) as reg:
        yield reg


def _layers(tag: str) -> list[Layer]:
    return [
        Layer().dirs("etc").file("etc/os-release", f"ID={tag}\n").dirs("usr/bin"),
        Layer().file("usr/bin/tool", os.urandom(50_000), 0o755).whiteout("etc/os-release"),
    ]


def _publish(
    reg_address: str,
    work: Path,
    repo: str,
    compress: str = "gzip",
    creds: str = "",
    layers: list[Layer] | None = None,
) -> ImageInfo:
    layout = work / f"layout-{repo.replace('/', '-').replace(':', '-')}-{compress}"
    info = write_oci_archive(
        layout,
        f"{reg_address}/{repo}",
        layers or _layers(repo),
        compress=compress,
        layout_dir=True,
    )
    push(layout, f"{reg_address}/{repo}", creds)
    return info


def _store(scratch: Path) -> ImageStore:
    root = scratch / "root"
    return ImageStore(root, open_snapshotter(root, "native"))


def _rootfs(store: ImageStore, ref: str) -> Listing:
    img = store.get(ref)
    view = store.sn.view(f"check-{img.top_layer}", img.top_layer)
    try:
        return listing(view[0].source)
    finally:
        store.sn.remove(f"check-{img.top_layer}")


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_pull_each_compression(registry: LocalRegistry, scratch: Path, compress: str) -> None:
    info = _publish(registry.address, scratch, f"plain/{compress}:1", compress)
    store = _store(scratch)
    ref = f"{registry.address}/plain/{compress}:1"
    result = pull(store, ref, PullOptions(plain_http=True))
    assert result.stats is not None and result.stats.applied == 2
    assert {i.name for i in store.sn.walk()} == set(info.chain_ids)
    tree = _rootfs(store, ref)
    assert "etc/os-release" not in tree and tree["usr/bin/tool"]["mode"] == 0o755
    # Again: everything is there already, nothing is applied.
    again = pull(store, ref, PullOptions(plain_http=True))
    assert again.stats is not None and again.stats.skipped == 2


def test_pull_htpasswd_auth(
    auth_registry: LocalRegistry, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = "ci:s3cret"
    _publish(auth_registry.address, scratch, "auth/app:1", creds=creds)
    ref = f"{auth_registry.address}/auth/app:1"
    store = _store(scratch)
    monkeypatch.setenv("DOCKER_CONFIG", str(scratch / "nodocker"))
    with pytest.raises(FailedPrecondition, match=r"needs credentials.*--user"):
        pull(store, ref, PullOptions(plain_http=True))
    with pytest.raises(FailedPrecondition, match="rejected the credentials"):
        pull(store, ref, PullOptions(plain_http=True, user="ci:wrong"))
    assert pull(store, ref, PullOptions(plain_http=True, user=creds)).record.name == ref
    # Credentials from docker's config file.
    conf = scratch / "docker"
    conf.mkdir()
    auth = __import__("base64").b64encode(creds.encode()).decode()
    (conf / "config.json").write_text(
        json.dumps({"auths": {auth_registry.address: {"auth": auth}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(conf))
    store2 = _store(scratch / "two")
    assert pull(store2, ref, PullOptions(plain_http=True)).record.name == ref


def test_pull_with_credential_helper(
    auth_registry: LocalRegistry, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credsStore helper (docker's protocol, a real program on PATH) supplies the login."""
    _publish(auth_registry.address, scratch, "helper/app:1", creds="ci:s3cret")
    conf, bin_dir = scratch / "docker", scratch / "bin"
    conf.mkdir()
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-ci"
    helper.write_text(
        '#!/bin/sh\nread -r server\necho "$server" > ' + str(scratch / "asked") + "\n"
        'echo \'{"Username":"ci","Secret":"s3cret"}\'\n'
    )
    helper.chmod(0o755)
    (conf / "config.json").write_text(json.dumps({"credsStore": "ci"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(conf))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ref = f"{auth_registry.address}/helper/app:1"
    assert pull(_store(scratch), ref, PullOptions(plain_http=True)).record.name == ref
    assert (scratch / "asked").read_text().strip() == auth_registry.address


def test_pull_with_identity_token(
    registry: LocalRegistry, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An identity token is traded at the realm by OAuth2 POST, never sent as a password."""
    _publish(registry.address, scratch, "idtoken/app:1")
    proxy = AuthProxy(registry.address, {}, refresh_tokens=("refresh-abc",))
    try:
        conf = scratch / "docker"
        conf.mkdir()
        monkeypatch.setenv("DOCKER_CONFIG", str(conf))
        ref = f"{proxy.address}/idtoken/app:1"
        (conf / "config.json").write_text(
            json.dumps({"auths": {proxy.address: {"identitytoken": "wrong"}}})
        )
        with pytest.raises(FailedPrecondition, match="rejected the credentials"):
            pull(_store(scratch / "one"), ref, PullOptions(plain_http=True))
        (conf / "config.json").write_text(
            json.dumps({"auths": {proxy.address: {"identitytoken": "refresh-abc"}}})
        )
        assert pull(_store(scratch / "two"), ref, PullOptions(plain_http=True)).record.name == ref
        assert ("POST", "/token", "") in proxy.requests
    finally:
        proxy.close()


def test_pull_bearer_redirect_retries_resume(registry: LocalRegistry, scratch: Path) -> None:
    big = Layer().file("big", os.urandom(3_000_000))
    _publish(registry.address, scratch, "bearer/app:1", compress="none", layers=[big])
    proxy = AuthProxy(registry.address, USERS)
    try:
        proxy.fail_next_5xx = 2  # the first two requests get 503: retried
        proxy.drop_blob_after = 1_000_000  # the big blob breaks off after 1 MB: resumed
        store = _store(scratch)
        ref = f"{proxy.address}/bearer/app:1"
        with pytest.raises(FailedPrecondition, match="needs credentials"):
            pull(store, ref, PullOptions(plain_http=True))
        result = pull(store, ref, PullOptions(plain_http=True, user="ci:s3cret"))
        assert result.stats is not None and result.stats.applied == 1
        tree = _rootfs(store, ref)
        assert tree["big"]["size"] == 3_000_000
        ranged = [r for m, p, r in proxy.requests if p.startswith("/storage/") and r]
        assert ranged and ranged[0].startswith("bytes=1000000-")
    finally:
        proxy.close()


def test_pull_multi_platform(registry: LocalRegistry, scratch: Path) -> None:
    layout = scratch / "multi"
    arm = scratch / "arm"
    write_oci_archive(layout, "x", [Layer().file("arch", "amd64")], layout_dir=True, arch="amd64")
    write_oci_archive(arm, "x", [Layer().file("arch", "arm64")], layout_dir=True, arch="arm64")
    # Merge the arm64 image into the first layout's index: one multi-platform index.
    for blob in (arm / "blobs" / "sha256").iterdir():
        shutil.copy(blob, layout / "blobs" / "sha256" / blob.name)
    index = json.loads((layout / "index.json").read_text())
    arm_entry = json.loads((arm / "index.json").read_text())["manifests"][0]
    index["manifests"][0]["platform"] = {"os": "linux", "architecture": "amd64"}
    index["manifests"].append(arm_entry)
    nested = json.dumps(
        {"schemaVersion": 2, "mediaType": index["mediaType"], "manifests": index["manifests"]}
    ).encode()
    d = hashlib.sha256(nested).hexdigest()
    (layout / "blobs" / "sha256" / d).write_bytes(nested)
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": index["mediaType"],
                "digest": f"sha256:{d}",
                "size": len(nested),
                "annotations": {"org.opencontainers.image.ref.name": "1"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))
    push(layout, f"{registry.address}/multi/app:1", all_platforms=True)
    ref = f"{registry.address}/multi/app:1"
    for arch in ("arm64", "amd64"):
        store = _store(scratch / arch)
        rec = pull(
            store, ref, PullOptions(plain_http=True, platform=Platform("linux", arch))
        ).record
        assert rec.platform == f"linux/{arch}"
        top_layer = store.get(ref).top_layer
        path = Path(store.sn.view("v", top_layer)[0].source) / "arch"
        assert path.read_text() == arch
    with pytest.raises(Exception, match="no manifest for platform linux/s390x"):
        pull(
            _store(scratch / "s390x"),
            ref,
            PullOptions(plain_http=True, platform=Platform("linux", "s390x")),
        )


def test_pull_through_mirror(registry: LocalRegistry, scratch: Path) -> None:
    info = _publish(registry.address, scratch, "mirrored/app:1")
    hosts = scratch / "hosts.d" / "registry.invalid"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        'server = "https://registry.invalid"\n'
        f'[host."http://{registry.address}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    store = _store(scratch)
    result = pull(
        store, "registry.invalid/mirrored/app:1", PullOptions(hosts_dir=scratch / "hosts.d")
    )
    assert result.record.digest == info.manifest_digest
    assert result.record.name == "registry.invalid/mirrored/app:1"


def _all_verified(blobs: Path) -> None:
    for blob in blobs.iterdir() if blobs.exists() else ():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_pull_killed_halfway_then_repeated(registry: LocalRegistry, scratch: Path) -> None:
    big = Layer().file("big", os.urandom(4_000_000))
    _publish(registry.address, scratch, "killed/app:1", compress="none", layers=[big])
    proxy = AuthProxy(registry.address, USERS)
    proxy.blob_rate = 1_000_000  # ~4 s for the layer: time to kill it in the middle
    root = scratch / "root"
    ref = f"{proxy.address}/killed/app:1"
    cmd = [
        sys.executable,
        "-m",
        "stratasnap",
        "--root",
        str(root),
        "image",
        "pull",
        "--plain-http",
        "--user",
        "ci:s3cret",
        ref,
    ]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ingest = root / "content" / "ingest"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            partial = list(ingest.glob("sha256-*")) if ingest.exists() else []
            if any(p.stat().st_size > 1_000_000 for p in partial):
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        blobs = root / "content" / "blobs" / "sha256"
        _all_verified(blobs)  # no blob claims a digest it does not have
        proxy.blob_rate = 0
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        ranged = [r for _, p, r in proxy.requests if p.startswith("/storage/") and r]
        assert ranged, "the second pull did not resume the partial blob"
        _all_verified(blobs)
        assert list((root / "content" / "ingest").iterdir()) == []
        store = _store(scratch)
        assert _rootfs(store, ref)["big"]["size"] == 4_000_000
    finally:
        proxy.close()


def test_pull_errors_say_what_to_do(registry: LocalRegistry, scratch: Path) -> None:
    _publish(registry.address, scratch, "errors/app:1")
    store = _store(scratch)
    with pytest.raises(Exception, match="--plain-http"):
        pull(store, f"{registry.address}/errors/app:1")  # HTTPS to an HTTP registry
    with pytest.raises(NotFound, match=r"errors/missing.*HTTP 404"):
        pull(store, f"{registry.address}/errors/missing:1", PullOptions(plain_http=True))
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable, match=f"registry {closed}.*attempts"):
        pull(store, f"{closed}/x:1", PullOptions(plain_http=True))
    assert list(store.sn.walk()) == []

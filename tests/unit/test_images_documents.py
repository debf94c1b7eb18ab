"""Manifests, indexes and platforms; hosts.toml mirrors; credentials from docker's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stratasnap import InvalidArgument, Unimplemented
from stratasnap.images.hosts import hosts_for
from stratasnap.images.manifest import (
    Descriptor,
    Index,
    Manifest,
    Platform,
    layer_compression,
    parse_config,
    parse_document,
)

D = "sha256:" + "a" * 64


def _desc(media: str, **extra: object) -> dict[str, object]:
    return {"mediaType": media, "digest": D, "size": 1, **extra}


def test_schema1_and_foreign_layers_refused_by_name() -> None:
    with pytest.raises(Unimplemented, match="schema 1"):
        parse_document(json.dumps({"schemaVersion": 1, "fsLayers": []}).encode())
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    doc = parse_document(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": _desc("application/vnd.docker.container.image.v1+json"),
                "layers": [_desc(foreign, urls=["https://example/x"])],
            }
        ).encode()
    )
    assert isinstance(doc, Manifest)
    with pytest.raises(Unimplemented, match="foreign"):
        layer_compression(doc.layers[0])
    with pytest.raises(Unimplemented, match="unsupported media type"):
        layer_compression(_parse_layer("application/x-tar+lz4"))


def _parse_layer(media: str) -> Descriptor:
    doc = parse_document(
        json.dumps({"schemaVersion": 2, "config": _desc("c"), "layers": [_desc(media)]}).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    assert isinstance(doc, Manifest)
    return doc.layers[0]


def test_index_platform_choice() -> None:
    m = "application/vnd.oci.image.manifest.v1+json"
    plats = [("linux", "amd64", ""), ("linux", "arm64", "v8"), ("linux", "arm", "v7")]
    doc = parse_document(
        json.dumps(
            {
                "manifests": [
                    _desc(m, platform={"os": o, "architecture": a, "variant": v})
                    for o, a, v in plats
                ]
            }
        ).encode()
    )
    assert isinstance(doc, Index)
    assert doc.select(Platform.parse("linux/arm64")).platform == Platform("linux", "arm64", "v8")
    assert doc.select(Platform.parse("arm")).platform == Platform("linux", "arm", "v7")
    with pytest.raises(InvalidArgument, match="it has: linux/amd64, linux/arm64/v8"):
        doc.select(Platform.parse("linux/s390x"))
    with pytest.raises(InvalidArgument, match="OS/ARCH"):
        Platform.parse("a/b/c/d")


def test_config_needs_one_diff_id_per_layer() -> None:
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": [D]}})
    assert [str(d) for d in parse_config(cfg.encode()).diff_ids] == [D]
    with pytest.raises(InvalidArgument, match="1 diff IDs for 2 layers"):
        parse_config(cfg.encode(), [object(), object()])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match=r"rootfs\.diff_ids"):
        parse_config(b"{}")


def test_hosts_toml(tmp_path: Path) -> None:
    assert [h.url for h in hosts_for("r.example", "r.example")] == ["https://r.example/v2"]
    d = tmp_path / "r.example:5000"
    d.mkdir()
    (d / "hosts.toml").write_text(
        'server = "https://r.example:5000"\n'
        '[host."http://mirror:80/prefix"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  [host."http://mirror:80/prefix".header]\n'
        '    X-Token = "t"\n'
        '[host."https://raw:443/exact/v2"]\n'
        "  override_path = true\n"
        "  skip_verify = true\n"
    )
    hosts = hosts_for("r.example:5000", "r.example:5000", tmp_path)
    assert [h.url for h in hosts] == [
        "http://mirror:80/prefix/v2",
        "https://raw:443/exact/v2",
        "https://r.example:5000/v2",
    ]
    assert hosts[0].headers == {"X-Token": "t"} and hosts[0].capabilities == ("pull", "resolve")
    assert hosts[1].skip_verify and hosts[1].capabilities == ("pull",)
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."http://any"]\n')
    assert hosts_for("other", "other", tmp_path)[0].url == "http://any/v2"
    (d / "hosts.toml").write_text("server = [")
    with pytest.raises(InvalidArgument, match=r"hosts\.toml"):
        hosts_for("r.example:5000", "r.example:5000", tmp_path)

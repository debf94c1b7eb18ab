"""Image references and digests: parsing, validation and docker.io normalisation.

A reference is ``[registry/]repository[:tag][@digest]``, the grammar of the
distribution project's ``reference`` package: the first path component is a
registry only when it looks like a host (has a ``.`` or ``:``, or is
``localhost``); otherwise the image is on Docker Hub, where a one-component
repository lives under ``library/``. So ``alpine`` means
``docker.io/library/alpine:latest``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..errors import InvalidArgument

__all__ = [
    "DOCKER_HUB",
    "Digest",
    "Reference",
    "parse_digest",
    "parse_reference",
]

DOCKER_HUB = "docker.io"
#: Docker Hub's API lives elsewhere than its name.
_HUB_API_HOST = "registry-1.docker.io"

_ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_MAX_NAME = 255


@dataclass(frozen=True)
class Digest:
    """A content digest, ``algorithm:hex`` (``sha256:…``)."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    @staticmethod
    def of(data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_digest(text: str) -> Digest:
    """A validated digest; InvalidArgument says what is wrong with ``text``."""
    algorithm, sep, hexpart = text.partition(":")
    want = _ALGORITHMS.get(algorithm)
    if not sep or want is None:
        raise InvalidArgument(
            f"digest {text!r}: expected ALGORITHM:HEX with one of {', '.join(_ALGORITHMS)}"
        )
    if len(hexpart) != want or not _HEX.fullmatch(hexpart):
        raise InvalidArgument(f"digest {text!r}: {algorithm} needs {want} lowercase hex digits")
    return Digest(algorithm, hexpart)


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference."""

    registry: str
    repository: str
    tag: str = ""
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` (no tag or digest)."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host that answers the distribution API for this registry."""
        return _HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_reference(text: str, default_tag: str = "latest") -> Reference:
    """Parse ``text`` into a :class:`Reference`, normalised like docker and containerd.

    A reference without tag or digest gets ``default_tag``. InvalidArgument
    names the part that is wrong.
    """
    if not text or text != text.strip():
        raise InvalidArgument(f"image reference {text!r}: empty or surrounded by spaces")
    rest, at, digest_text = text.partition("@")
    digest = parse_digest(digest_text) if at else None
    # A tag is after the last ":" that follows the last "/" (a host may have a port).
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = ""
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"image reference {text!r}: invalid tag {tag!r}")
    first, sep, remainder = rest.partition("/")
    if sep and _looks_like_host(first):
        registry, path = first, remainder
        if not _HOST.fullmatch(registry):
            raise InvalidArgument(f"image reference {text!r}: invalid registry {registry!r}")
        if registry == "index.docker.io":
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, rest
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise InvalidArgument(
                f"image reference {text!r}: invalid repository component {component!r} "
                "(lowercase letters, digits and separators . _ __ -)"
            )
    if len(path) > _MAX_NAME:
        raise InvalidArgument(f"image reference {text!r}: repository longer than {_MAX_NAME}")
    if not tag and digest is None:
        tag = default_tag
    return Reference(registry, path, tag, digest)

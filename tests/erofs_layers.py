"""Test helpers for the tar -> EROFS converter: layer specs, tars, expected trees.

A layer is a list of :class:`Member`; ``build_tar`` writes it with Python's
``tarfile`` (PAX format: an independent writer), ``expected_tree`` says what a
correct image must contain after OCI whiteout rules (an oracle written apart
from the converter), and ``snapshot`` reads a mounted or extracted tree the
same shape, so tests compare dicts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import need
from hypothesis import strategies as st

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True)
class Member:
    path: str
    kind: str  # file dir symlink hardlink chr blk fifo
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    mtime_nsec: int = 0
    data: bytes = b""
    target: str = ""  # symlink target, or the hard link's target path
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)


def libarchive_tar() -> bytes:
    """A member with xattrs as bsdtar writes them: URL-encoded names, base64 values."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {
            "LIBARCHIVE.xattr.user.with%20space": "AP9iaW4",  # b"\x00\xffbin", unpadded
            "LIBARCHIVE.xattr.trusted.t": "dg==",
        }
        tf.addfile(ti)
    return buf.getvalue()


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def build_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            ti = tarfile.TarInfo(m.path)
            ti.type = _TYPES[m.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = m.mode, m.uid, m.gid, m.mtime
            ti.uname = ti.gname = ""
            pax = {f"SCHILY.xattr.{k}": v for k, v in m.xattrs.items()}
            if m.mtime_nsec:
                pax["mtime"] = f"{m.mtime}.{m.mtime_nsec:09d}"
            ti.pax_headers = pax
            if m.kind in ("symlink", "hardlink"):
                ti.linkname = m.target
            if m.kind in ("chr", "blk"):
                ti.devmajor, ti.devminor = m.dev
            if m.kind == "file":
                ti.size = len(m.data)
                tf.addfile(ti, io.BytesIO(m.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


@dataclass(frozen=True)
class Attrs:
    kind: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime_ns: int
    size: int
    digest: str  # sha256 of file content, "" for others
    target: str
    rdev: tuple[int, int]
    nlink: int
    xattrs: tuple[tuple[str, bytes], ...]


def _norm(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def expected_tree(members: list[Member], default_mtime: int | None = None) -> dict[str, Attrs]:
    """What the image must hold. Assumes unique paths (no member replaces another).

    Unlisted parent directories get ``default_mtime``, else the newest time of
    the members that become inodes (not hard links, not opaque markers).
    """
    if default_mtime is None:
        times = [
            (m.mtime, m.mtime_nsec)
            for m in members
            if m.kind != "hardlink" and not m.path.endswith(OPAQUE)
        ]
        implicit_ns = max((s * 10**9 + ns for s, ns in times), default=0)
    else:
        implicit_ns = default_mtime * 10**9
    nodes: dict[str, dict[str, object]] = {}
    links: dict[str, str] = {}  # hard link path -> the path of its inode's first name

    def implicit(path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            nodes.setdefault(
                parent,
                dict(kind="dir", mode=0o755, uid=0, gid=0, mtime_ns=implicit_ns, xattrs={}),
            )

    nodes[""] = dict(kind="dir", mode=0o755, uid=0, gid=0, mtime_ns=implicit_ns, xattrs={})
    for m in members:
        path = _norm(m.path)
        base = path.rsplit("/", 1)[-1]
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        implicit(path)
        if base == OPAQUE:
            nodes[parent]["xattrs"]["trusted.overlay.opaque"] = b"y"  # type: ignore[index]
            continue
        mtime_ns = m.mtime * 10**9 + m.mtime_nsec
        if base.startswith(WHITEOUT):
            hidden = (parent + "/" if parent else "") + base[len(WHITEOUT) :]
            nodes[hidden] = dict(
                kind="chr", mode=0, uid=m.uid, gid=m.gid, mtime_ns=mtime_ns, xattrs={}, rdev=(0, 0)
            )
            continue
        if m.kind == "hardlink":
            target = _norm(m.target)
            links[path] = links.get(target, target)
            continue
        xattrs = {k: v.encode() for k, v in m.xattrs.items()}
        if path == "":
            nodes[""].update(mode=m.mode, uid=m.uid, gid=m.gid, mtime_ns=mtime_ns)
            nodes[""]["xattrs"].update(xattrs)  # type: ignore[attr-defined]
            continue
        nodes[path] = dict(
            kind=m.kind,
            mode=m.mode,
            uid=m.uid,
            gid=m.gid,
            mtime_ns=mtime_ns,
            xattrs=xattrs,
            data=m.data,
            target=m.target,
            rdev=m.dev,
        )
    out: dict[str, Attrs] = {}
    nlinks = {p: 1 for p in nodes}
    for target in links.values():
        nlinks[target] += 1
    for p, n in nodes.items():
        if n["kind"] == "dir":
            nlinks[p] = 2 + sum(
                1
                for q, c in nodes.items()
                if c["kind"] == "dir" and q and (q.rsplit("/", 1)[0] if "/" in q else "") == p
            )
    for p, n in {**nodes, **{k: nodes[v] for k, v in links.items()}}.items():
        first = links.get(p, p)
        data = n.get("data", b"")
        assert isinstance(data, bytes)
        is_file = n["kind"] == "file"
        out[p] = Attrs(
            kind=str(n["kind"]),
            mode=0o777 if n["kind"] == "symlink" else int(n["mode"]),  # type: ignore[call-overload]
            uid=int(n["uid"]),  # type: ignore[call-overload]
            gid=int(n["gid"]),  # type: ignore[call-overload]
            mtime_ns=int(n["mtime_ns"]),  # type: ignore[call-overload]
            size=len(data)
            if is_file
            else (len(str(n["target"]).encode()) if n["kind"] == "symlink" else -1),
            digest=hashlib.sha256(data).hexdigest() if is_file else "",
            target=str(n["target"]) if n["kind"] == "symlink" else "",
            rdev=tuple(n.get("rdev", (0, 0))) if n["kind"] in ("chr", "blk") else (0, 0),  # type: ignore[arg-type]
            nlink=nlinks[first],
            xattrs=tuple(sorted(n["xattrs"].items())),  # type: ignore[attr-defined]
        )
    return out


_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
}


def snapshot(root: Path, *, with_xattrs: bool = True) -> dict[str, Attrs]:
    """The tree under ``root`` as :class:`Attrs` by relative path ("" is the root)."""
    out: dict[str, Attrs] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        full = root / rel if rel else root
        st_ = os.lstat(full)
        kind = _KINDS[stat.S_IFMT(st_.st_mode)]
        digest, target, size = "", "", -1
        if kind == "file":
            digest = hashlib.sha256(full.read_bytes()).hexdigest()
            size = st_.st_size
        elif kind == "symlink":
            target = os.readlink(full)
            size = st_.st_size
        elif kind == "dir":
            stack.extend(f"{rel}/{n}" if rel else n for n in os.listdir(full))
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if with_xattrs:
            names = os.listxattr(full, follow_symlinks=False)
            xattrs = tuple(sorted((n, os.getxattr(full, n, follow_symlinks=False)) for n in names))
        out[rel] = Attrs(
            kind=kind,
            mode=stat.S_IMODE(st_.st_mode),
            uid=st_.st_uid,
            gid=st_.st_gid,
            mtime_ns=st_.st_mtime_ns,
            size=size,
            digest=digest,
            target=target,
            rdev=(os.major(st_.st_rdev), os.minor(st_.st_rdev))
            if kind in ("chr", "blk")
            else (0, 0),
            nlink=st_.st_nlink,
            xattrs=xattrs,
        )
    return out


@contextlib.contextmanager
def mounted_image(image: Path, mountpoint: Path, *, loop: bool = False) -> Iterator[Path]:
    """Mount an EROFS image read-only: file-backed if the kernel can, else (or if
    ``loop``) through a loop device, which ``umount`` detaches again."""
    mountpoint.mkdir(exist_ok=True)
    cmd = ["mount", "-t", "erofs", "-o", "ro", str(image), str(mountpoint)]
    r = subprocess.run(cmd, capture_output=True, text=True) if not loop else None
    if r is None or r.returncode != 0:  # kernels before 6.12 need a block device
        cmd[4] = "ro,loop"
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


_LZ4_PROBE: list[bool] = []


def kernel_reads_lz4(work: Path) -> bool:
    """Whether this kernel mounts and reads an lz4 image made by ``mkfs.erofs -zlz4``.

    A probe, not a version check (CONFIG_EROFS_FS_ZIP may be off); the image
    comes from erofs-utils, so a bug of ours cannot make the probe say no.
    """
    if not _LZ4_PROBE:
        need(shutil.which("mkfs.erofs") is not None, "mkfs.erofs (erofs-utils) not installed")
        src = work / "lz4-probe-src"
        src.mkdir()
        (src / "f").write_bytes(b"compressible " * 5000)
        subprocess.run(["mkfs.erofs", "--quiet", "-zlz4", str(work / "probe.erofs"), str(src)])
        try:
            with mounted_image(work / "probe.erofs", work / "lz4-probe-mnt") as mnt:
                _LZ4_PROBE.append((mnt / "f").read_bytes() == b"compressible " * 5000)
        except (subprocess.CalledProcessError, OSError):
            _LZ4_PROBE.append(False)
    return _LZ4_PROBE[0]


def extract_image(image: Path, dest: Path) -> dict[str, tuple[str, str, str]]:
    """``fsck.erofs --extract`` (no root, no kernel): path -> (kind, sha256, link target)."""
    need(shutil.which("fsck.erofs") is not None, "fsck.erofs (erofs-utils) not installed")
    r = subprocess.run(
        ["fsck.erofs", f"--extract={dest}", str(image)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return {p: (a.kind, a.digest, a.target) for p, a in snapshot(dest, with_xattrs=False).items()}


def contents(members: list[Member]) -> dict[str, tuple[str, str, str]]:
    """What :func:`extract_image` must find: ``expected_tree`` without metadata."""
    return {p: (a.kind, a.digest, a.target) for p, a in expected_tree(members).items()}


# -- file contents for compression -------------------------------------------

KIB, MIB = 1 << 10, 1 << 20
#: Sizes where compressed layouts change: one block, logical clusters, the
#: converter's small-file batch (256 KiB), an extent's input window (1 MiB),
#: the read buffer a large file is cut into (4 MiB).
BOUNDARY_SIZES = (
    *(0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 12289, 65535, 65536, 65537),
    *(256 * KIB - 1, 256 * KIB, 256 * KIB + 1, MIB - 1, MIB, MIB + 4097),
    *(4 * MIB - 1, 4 * MIB, 4 * MIB + 1),
)
KINDS = ("zeros", "text", "random", "mixed")
_WORDS = (b"the", b"layer", b"of", b"a", b"file", b"system", b"holds", b"usr", b"0", b"42")


def content(kind: str, size: int, seed: int = 0) -> bytes:
    """``size`` bytes: "zeros", "text" (lz4 halves it or better), "random"
    (incompressible), or "mixed" (runs of all three of odd lengths, so compressed
    and stored extents alternate and start anywhere inside a block)."""
    rng = random.Random(seed)
    if kind == "zeros":
        return bytes(size)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "text":
        out = bytearray()
        while len(out) < size:
            out += b" ".join(rng.choices(_WORDS, k=4096)) + b"\n"
        return bytes(out[:size])
    assert kind == "mixed"
    out = bytearray()
    while len(out) < size:
        run = rng.randrange(1, 30000)
        out += content(rng.choice(("zeros", "text", "random")), run, rng.randrange(1 << 30))
    return bytes(out[:size])


@st.composite
def file_contents(draw: st.DrawFn) -> bytes:
    """Data for compression tests: boundary or arbitrary sizes, every kind."""
    size = draw(st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 200_000)))
    return content(draw(st.sampled_from(KINDS)), size, draw(st.integers(0, 1 << 30)))


# -- hypothesis strategies ---------------------------------------------------

_name = st.text(alphabet="abcxyz-_.é", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)
_xattrs = st.dictionaries(
    st.sampled_from(["user.a", "user.b", "trusted.t", "security.s"]),
    st.sampled_from(["", "1", "shared-value", "v" * 300]),
    max_size=3,
)
_mtime = st.sampled_from([0, 1_700_000_000, 1_600_000_000, 2_000_000_000])
_ids = st.sampled_from([0, 1, 1000, 65535, 70000, 2**31])


@st.composite
def layers(draw: st.DrawFn) -> list[Member]:
    """A layer with unique paths: dirs, files, symlinks, hard links, devices, whiteouts."""
    dirs = [""]
    taken: set[str] = {""}
    members: list[Member] = []
    files: list[str] = []
    if draw(st.booleans()):
        members.append(
            Member(
                ".", "dir", mode=draw(st.sampled_from([0o755, 0o700, 0o1777])), mtime=draw(_mtime)
            )
        )
    for _ in range(draw(st.integers(1, 14))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_name)
        path = f"{parent}/{name}" if parent else name
        if path in taken:
            continue
        taken.add(path)
        kind = draw(
            st.sampled_from(
                [
                    "file",
                    "file",
                    "dir",
                    "dir",
                    "symlink",
                    "hardlink",
                    "chr",
                    "blk",
                    "fifo",
                    "whiteout",
                    "opaque",
                ]
            )
        )
        common = dict(
            uid=draw(_ids),
            gid=draw(_ids),
            mtime=draw(_mtime),
            mtime_nsec=draw(st.sampled_from([0, 0, 5, 999_999_999])),
        )
        if kind == "whiteout":
            wpath = f"{parent}/{WHITEOUT}{name}" if parent else f"{WHITEOUT}{name}"
            members.append(Member(wpath, "file", **common))  # type: ignore[arg-type]
        elif kind == "opaque":
            opath = f"{parent}/{OPAQUE}" if parent else OPAQUE
            if opath not in taken:
                taken.add(opath)
                members.append(Member(opath, "file"))
        elif kind == "hardlink":
            if files:
                members.append(Member(path, "hardlink", target=draw(st.sampled_from(files))))
        else:
            mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o2750, 0o600, 0o1777, 0o000]))
            data = draw(
                st.one_of(
                    st.binary(max_size=64),
                    st.sampled_from([b"", b"x" * 4096, b"y" * 4097, bytes(range(256)) * 40]),
                    # compressible, across several blocks (for compressed images)
                    st.sampled_from([b"ab" * 10_000, content("mixed", 50_000, 3)]),
                )
            )
            members.append(
                Member(
                    path,
                    kind,
                    mode=mode,
                    data=data if kind == "file" else b"",
                    target=draw(_name) if kind == "symlink" else "",
                    dev=(draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1)))
                    if kind in ("chr", "blk")
                    else (0, 0),
                    # Linux keeps user.* xattrs to files and directories.
                    xattrs=draw(_xattrs) if kind in ("file", "dir") else {},
                    **common,
                )
            )
            if kind == "dir":
                dirs.append(path)
            if kind == "file":
                files.append(path)
    return members


def counting_mkfs(directory: Path) -> Path:
    """Put a ``mkfs.erofs`` in ``directory`` that logs each run, then runs the real one.

    Put ``directory`` first on PATH before a store opens: the returned log then
    has one line per image built with mkfs.erofs (none for converted layers).
    """
    real = subprocess.run(
        ["sh", "-c", "command -v mkfs.erofs || ls /usr/sbin/mkfs.erofs /sbin/mkfs.erofs"],
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    log = directory / "mkfs-runs.log"
    log.write_text("")
    wrapper = directory / "mkfs.erofs"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return log

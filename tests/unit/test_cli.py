"""The ``stratasnap`` command, run as the installed console script on the native backend."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "stratasnap"
VERBS = (
    "prepare",
    "view",
    "commit",
    "rm",
    "mounts",
    "label",
    "ls",
    "info",
    "usage",
    "tree",
    "cleanup",
)


def stratasnap(
    root: Path | None, *args: str, ok: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "stratasnap"]
    if root is not None:
        cmd += ["--root", str(root)]
    r = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert "Traceback" not in r.stderr, r.stderr
    if ok:
        assert r.returncode == 0, (args, r.returncode, r.stderr)
    return r


def fails(root: Path, code: int, *args: str) -> str:
    """Run, expect exit ``code`` and exactly one ``stratasnap: …`` line on stderr; return it."""
    r = stratasnap(root, *args, ok=False)
    assert r.returncode == code, (args, r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stratasnap: "), r.stderr
    return lines[0]


def source(out: str) -> Path:
    """The source of the single ``mount -t T SRC TARGET -o OPTS`` line printed."""
    lines = out.splitlines()
    assert len(lines) == 1, out
    argv = shlex.split(lines[0])
    assert argv[:2] == ["mount", "-t"], out
    return Path(argv[3])


@pytest.fixture
def root(scratch: Path) -> Path:
    return scratch / "store"


@pytest.fixture
def chain(root: Path) -> Path:
    """base (committed) <- mid (committed) <- {ctr (active), look (view)}; other (active)."""
    stratasnap(root, "prepare", "l1")
    stratasnap(root, "commit", "base", "l1")
    stratasnap(root, "prepare", "l2", "base")
    stratasnap(root, "commit", "mid", "l2", "--label", "stage=mid")
    stratasnap(root, "prepare", "ctr", "mid")
    stratasnap(root, "view", "look", "mid")
    stratasnap(root, "prepare", "other")
    return root


# --- help -----------------------------------------------------------------------------


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_explains_itself_without_opening_a_store(root: Path, verb: str) -> None:
    r = stratasnap(root, verb, "--help")
    assert r.stdout.startswith(f"Usage: stratasnap {verb} ")
    summary = r.stdout.split("\n\n")[1].strip()
    assert summary and "\n" not in summary, summary
    assert "Example" in r.stdout
    assert not root.exists()


def test_top_level_help_lists_every_verb(root: Path) -> None:
    out = stratasnap(root, "--help").stdout
    for verb in VERBS:
        assert f"\n  {verb} " in out
    assert "STRATASNAP_ROOT" in out


def test_python_dash_m_runs_the_same_command() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "stratasnap", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.startswith("Usage: stratasnap ")


# --- prepare / view / commit / mounts ---------------------------------------------------


def test_prepare_prints_a_writable_mount_and_commit_keeps_its_data(root: Path) -> None:
    out = stratasnap(root, "prepare", "l1", "--label", "a=1").stdout
    assert out.startswith("mount -t bind ")
    argv = shlex.split(out)
    assert argv[4:] == ["TARGET", "-o", "rbind,rw"]
    src = source(out)
    assert src.is_dir() and str(src).startswith(str(root))
    (src / "hello").write_text("hi")
    assert stratasnap(root, "commit", "base", "l1").stdout == ""
    child = source(stratasnap(root, "prepare", "c1", "base").stdout)
    assert (child / "hello").read_text() == "hi"
    view = stratasnap(root, "view", "v1", "base").stdout
    assert shlex.split(view)[-1].split(",")[-1] == "ro"


def test_mounts_prints_the_mount_command_for_a_target(chain: Path) -> None:
    out = stratasnap(chain, "mounts", "ctr", "/mnt/my ctr").stdout
    argv = shlex.split(out)
    assert argv[:3] == ["mount", "-t", "bind"] and argv[4] == "/mnt/my ctr"
    assert "rw" in argv[-1].split(",")
    look = shlex.split(stratasnap(chain, "mounts", "look", "/mnt/x").stdout)
    assert "ro" in look[-1].split(",")


def test_keys_are_opaque_text(root: Path) -> None:
    key = "ns/12/extract-123 sha256:abc/../../x"
    stratasnap(root, "prepare", key)
    stratasnap(root, "commit", "sha256:abc", key)
    assert json.loads(stratasnap(root, "info", "sha256:abc").stdout)["kind"] == "committed"


# --- errors ---------------------------------------------------------------------------


def test_expected_errors_are_one_line_with_the_error_exit_code(chain: Path) -> None:
    assert fails(chain, 4, "info", "nope") == 'stratasnap: snapshot "nope": not found'
    line = fails(chain, 4, "prepare", "x", "nope")
    assert '"nope"' in line and line.endswith("not found")
    assert fails(chain, 5, "prepare", "ctr").endswith("already exists")
    assert fails(chain, 5, "commit", "base", "other").endswith("already exists")
    assert fails(chain, 3, "prepare", "x", "ctr").endswith("invalid argument")
    assert fails(chain, 3, "view", "x", "look").endswith("invalid argument")
    assert fails(chain, 7, "rm", "mid").endswith("failed precondition")
    assert fails(chain, 7, "mounts", "base", "/mnt").endswith("failed precondition")
    assert fails(chain, 7, "commit", "x", "look").endswith("failed precondition")
    assert fails(chain, 3, "ls", "--filter", "name==").endswith("invalid argument")
    assert fails(chain, 4, "label", "nope", "a=b").endswith("not found")
    assert fails(chain, 4, "mounts", "nope", "/mnt").endswith("not found")
    assert fails(chain, 4, "usage", "nope").endswith("not found")


@pytest.mark.parametrize(
    "args",
    [
        ("prepare", "k", "--label", "novalue"),
        ("prepare", "k", "--label", "=v"),
        ("commit", "n", "k", "-l", "x"),
        ("label", "k", "oops"),
        ("--option", "bad", "ls"),
        ("--backend", "no-such-backend", "ls"),
        ("rm",),
        ("view", "k"),
    ],
)
def test_malformed_arguments_are_usage_errors(root: Path, args: tuple[str, ...]) -> None:
    r = stratasnap(root, *args, ok=False)
    assert r.returncode == 2, r.stderr
    assert "Usage: stratasnap" in r.stderr and "Error:" in r.stderr
    assert not root.exists()  # nothing was opened, let alone created


def test_rm_tries_every_key_and_exits_with_the_first_failure(chain: Path) -> None:
    r = stratasnap(chain, "rm", "ctr", "nope", "mid", "look", ok=False)
    assert r.returncode == 4
    errs = r.stderr.splitlines()
    assert errs[0] == 'stratasnap: snapshot "nope": not found'
    assert errs[1].startswith("stratasnap: ") and errs[1].endswith("failed precondition")
    assert len(errs) == 2
    left = {i["name"] for i in json.loads(stratasnap(chain, "ls", "--json").stdout)}
    assert left == {"base", "mid", "other"}
    stratasnap(chain, "rm", "mid", "base", "other")
    assert json.loads(stratasnap(chain, "ls", "--json").stdout) == []


# --- ls / info ------------------------------------------------------------------------


def test_ls_prints_a_table_sorted_by_key(chain: Path) -> None:
    lines = stratasnap(chain, "ls").stdout.splitlines()
    assert lines[0].split() == ["KEY", "PARENT", "KIND"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["base", "committed"],
        ["ctr", "mid", "active"],
        ["look", "mid", "view"],
        ["mid", "base", "committed"],
        ["other", "active"],
    ]
    # columns line up under their headers
    col = lines[0].index("KIND")
    assert all(line[col:].strip() in ("committed", "active", "view") for line in lines[1:])


def _when(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


def test_ls_json_has_every_field_and_filters_work(chain: Path) -> None:
    out = stratasnap(chain, "ls", "--json").stdout
    items = json.loads(out)
    assert len(out.splitlines()) == len(items) + 2  # one snapshot a line
    by = {i["name"]: i for i in items}
    assert set(by) == {"base", "mid", "ctr", "look", "other"}
    assert by["mid"]["labels"] == {"stage": "mid"}
    assert by["mid"]["parent"] == "base" and by["base"]["parent"] == ""
    for i in items:
        assert set(i) == {"name", "parent", "kind", "labels", "created", "updated"}
        assert _when(i["updated"]) >= _when(i["created"])
    committed = json.loads(stratasnap(chain, "ls", "--json", "-f", "kind==committed").stdout)
    assert [i["name"] for i in committed] == ["base", "mid"]
    either = stratasnap(chain, "ls", "-f", "labels.stage", "-f", 'name~="^o"').stdout
    assert [line.split()[0] for line in either.splitlines()[1:]] == ["mid", "other"]
    both = stratasnap(chain, "ls", "-f", "parent==mid,kind==view").stdout
    assert [line.split()[0] for line in both.splitlines()[1:]] == ["look"]
    assert stratasnap(chain, "ls", "--json", "-f", "name==zzz").stdout.strip() == "[]"


def test_info_is_json_with_rfc3339_times(chain: Path) -> None:
    info = json.loads(stratasnap(chain, "info", "ctr").stdout)
    assert info["name"] == "ctr" and info["parent"] == "mid" and info["kind"] == "active"
    assert info["labels"] == {}
    created = _when(info["created"])
    assert created.tzinfo is not None and created.utcoffset() is not None
    assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 600
    frac = info["created"].rstrip("Z").partition(".")[2]
    assert frac == "" or (frac.isdigit() and len(frac) <= 9 and not frac.endswith("0"))


# --- label ----------------------------------------------------------------------------


def test_label_sets_and_deletes_and_prints_the_result(chain: Path) -> None:
    out = stratasnap(chain, "label", "mid", "owner=alice", "x.y/z=1").stdout
    assert out.splitlines() == ["owner=alice", "stage=mid", "x.y/z=1"]
    out = stratasnap(chain, "label", "mid", "stage=", "owner=bob").stdout
    assert out.splitlines() == ["owner=bob", "x.y/z=1"]
    assert json.loads(stratasnap(chain, "info", "mid").stdout)["labels"] == {
        "owner": "bob",
        "x.y/z": "1",
    }
    assert stratasnap(chain, "label", "mid").stdout.splitlines() == ["owner=bob", "x.y/z=1"]
    assert stratasnap(chain, "label", "mid", "never=").stdout.splitlines() == [
        "owner=bob",
        "x.y/z=1",
    ]
    assert stratasnap(chain, "label", "ctr", "v=a=b").stdout == "v=a=b\n"


# --- tree -----------------------------------------------------------------------------


def test_tree_shows_children_under_their_parents(chain: Path) -> None:
    stratasnap(chain, "prepare", "ctr2", "base")
    assert stratasnap(chain, "tree").stdout.splitlines() == [
        "base",
        "  \\_ ctr2",
        "  \\_ mid",
        "    \\_ ctr",
        "    \\_ look",
        "other",
    ]


def test_tree_of_an_empty_store_is_empty(root: Path) -> None:
    assert stratasnap(root, "tree").stdout == ""


# --- usage ----------------------------------------------------------------------------


def _du(path: Path) -> tuple[int, int]:
    """Allocated bytes (st_blocks*512) and inodes below ``path``, each inode once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return size, len(seen)


def _usage_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    assert lines[0].split() == ["KEY", "SIZE", "INODES"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_usage_bytes_matches_the_real_allocation(root: Path) -> None:
    src = source(stratasnap(root, "prepare", "w").stdout)
    (src / "big").write_bytes(os.urandom(300_000))
    (src / "d").mkdir()
    (src / "d" / "small").write_bytes(b"x" * 10)
    os.link(src / "big", src / "d" / "big-again")
    size, inodes = _du(src)
    rows = _usage_rows(stratasnap(root, "usage", "--bytes", "w").stdout)
    assert rows == {"w": [str(size), str(inodes)]}
    stratasnap(root, "commit", "c", "w")
    rows = _usage_rows(stratasnap(root, "usage", "-b", "c").stdout)
    assert rows == {"c": [str(size), str(inodes)]}


def test_usage_without_keys_lists_every_snapshot_in_human_units(chain: Path) -> None:
    src = source(stratasnap(chain, "mounts", "other", "/t").stdout)
    (src / "f").write_bytes(b"\1" * (3 * 1024 * 1024))
    out = stratasnap(chain, "usage").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert set(rows) == {"base", "mid", "ctr", "look", "other"}
    value, unit, inodes = rows["other"]
    assert unit == "MiB" and 3.0 <= float(value) < 3.2 and int(inodes) >= 2
    for _value, unit, _ in rows.values():
        assert unit in ("B", "KiB", "MiB")


def test_usage_of_several_keys_reports_each_failure(chain: Path) -> None:
    r = stratasnap(chain, "usage", "-b", "ctr", "nope", "base", ok=False)
    assert r.returncode == 4
    assert r.stderr == 'stratasnap: snapshot "nope": not found\n'
    assert set(_usage_rows(r.stdout)) == {"ctr", "base"}


# --- cleanup, root selection ----------------------------------------------------------


def test_cleanup_reports_what_it_reclaimed(chain: Path) -> None:
    assert stratasnap(chain, "cleanup").stdout.splitlines()[-1].startswith("reclaimed 0 paths")
    leftover = chain / "snapshots" / "rm-999999"
    leftover.mkdir()
    (leftover / "junk").write_bytes(b"j" * 5000)
    out = stratasnap(chain, "cleanup").stdout.splitlines()
    assert any(line.endswith("rm-999999") for line in out[:-1])
    assert out[-1].startswith("reclaimed 1 path, ") and not leftover.exists()
    assert len(json.loads(stratasnap(chain, "ls", "--json").stdout)) == 5


def test_root_comes_from_the_environment(root: Path) -> None:
    env = {"STRATASNAP_ROOT": str(root)}
    stratasnap(None, "prepare", "k", env=env)
    assert (root / "metadata.db").exists()
    assert "k" in stratasnap(root, "ls").stdout
    other = root.parent / "elsewhere"
    assert "k" not in stratasnap(other, "ls", env=env).stdout  # --root wins


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from stratasnap.cli import default_root

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_root() == Path("/var/lib/stratasnap")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_root() == tmp_path / "stratasnap"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".local" / "share" / "stratasnap"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_root() == tmp_path / ".local" / "share" / "stratasnap"


def test_storage_and_option_problems_are_one_line_too(scratch: Path) -> None:
    afile = scratch / "afile"
    afile.write_text("")
    line = fails(afile / "store", 1, "ls")
    assert "Not a directory" in line and str(afile) in line
    line = fails(scratch / "store", 3, "--option", "no-such-option=1", "ls")
    assert "no-such-option" in line and line.endswith("invalid argument")


def test_rfc3339_keeps_nanoseconds() -> None:
    from datetime import UTC, datetime

    from stratasnap.cli._format import rfc3339
    from stratasnap.types import Timestamp

    ns = 1_764_420_000_123_456_789
    assert rfc3339(Timestamp.from_epoch_ns(ns)) == "2025-11-29T12:40:00.123456789Z"
    assert rfc3339(Timestamp.from_epoch_ns(ns - 456_789)) == "2025-11-29T12:40:00.123Z"
    assert rfc3339(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2025-01-02T03:04:05Z"

"""Regular expressions for ``~=`` filters: Go's syntax, RE2's engine, a bounded cost.

containerd matches ``~=`` with Go's ``regexp``, which is RE2: linear time in
the text, no back-references or look-arounds. Patterns here are compiled by
RE2 itself (PyPI ``google-re2``), so they mean what they mean in containerd and
no pattern can backtrack for ever.

Bounds, each InvalidArgument naming the problem:

* a pattern is at most :data:`MAX_PATTERN_BYTES` bytes (UTF-8);
* a repeat count is at most 1000 (``a{1001}``: Go's and RE2's limit);
* groups nest at most :data:`MAX_NESTING` deep (Go's limit on the parse tree);
* the compiled program fits in :data:`MAX_PROGRAM_MEMORY` bytes (``(a{999}){999}``
  and friends are "pattern too large");
* ``\\C`` (one byte, whatever the encoding) is RE2's but not Go's: refused.

What one whole filter request may spend is bounded in :mod:`stratasnap.filters`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import re2

__all__ = [
    "MAX_NESTING",
    "MAX_PATTERN_BYTES",
    "MAX_PROGRAM_MEMORY",
    "Pattern",
    "PatternError",
    "compile_pattern",
]

#: Bytes in one pattern. Compiling the costliest shapes (``\pL{1000}`` repeated)
#: takes about 11 ms per KiB on a quiet 2-CPU machine; a filter request allows
#: less (``filters.MAX_PATTERNS_BYTES``), a library caller this much.
MAX_PATTERN_BYTES = 2048
#: How deep groups may nest: Go's regexp/syntax limit (maxHeight).
MAX_NESTING = 1000
#: RE2's memory budget per pattern (program plus DFA cache); RE2's default is
#: 8 MiB, which lets a 4 KiB pattern compile for 140 ms before it is refused.
MAX_PROGRAM_MEMORY = 1 << 20


class PatternError(ValueError):
    """A ``~=`` pattern that does not compile or exceeds a bound; the message says which."""


def _options() -> Any:
    options = re2.Options()
    # Only "does it match" is ever asked: without captures RE2 answers with its
    # DFA. With captures it runs the NFA and copies every group per step, and
    # 2,500 groups against a 4 KiB key take minutes.
    options.never_capture = True
    options.log_errors = False  # RE2 would print every refused pattern on stderr
    options.max_mem = MAX_PROGRAM_MEMORY
    return options


_OPTIONS = _options()
_UNANCHORED = re2._re2.RE2.Anchor.UNANCHORED


@dataclass(frozen=True, eq=False)
class Pattern:
    """A compiled pattern; :meth:`search` tells whether it matches anywhere in a text."""

    text: str
    _program: Any

    def search(self, value: str) -> bool:
        return self.search_bytes(value.encode("utf-8", "surrogatepass"))

    def search_bytes(self, data: bytes) -> bool:
        """:meth:`search` on UTF-8 already encoded (scans encode each text once)."""
        # The binding's own search() decodes every match offset back to
        # characters; asking RE2 directly costs a third of that.
        span = self._program.Match(_UNANCHORED, data, 0, len(data))[0]
        return bool(span[0] >= 0)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Pattern:
    """The compiled ``~=`` pattern (cached); PatternError says what is wrong with it."""
    try:
        data = pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise PatternError("pattern is not valid UTF-8") from None
    if len(data) > MAX_PATTERN_BYTES:
        raise PatternError(f"pattern is {len(data)} bytes long, more than {MAX_PATTERN_BYTES}")
    depth, any_byte = _scan(pattern)
    if depth > MAX_NESTING:
        raise PatternError(f"groups nest {depth} deep, more than {MAX_NESTING}")
    if any_byte:
        raise PatternError(r"invalid escape sequence: \C (not in Go's syntax)")
    program = re2._re2.RE2(data, _OPTIONS)
    if not program.ok():
        problem = program.error()  # bytes from the binding
        if isinstance(problem, bytes):
            problem = problem.decode(errors="replace")
        raise PatternError(str(problem))
    return Pattern(pattern, program)


def _scan(pattern: str) -> tuple[int, bool]:
    """How deep groups nest, and whether ``\\C`` appears outside a class.

    Only the lexical structure is followed (escapes, ``\\Q…\\E``, classes);
    RE2 reports every other syntax error itself.
    """
    depth = deepest = 0
    any_byte = False
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt == "Q":
                end = pattern.find("\\E", i + 2)
                i = n if end < 0 else end + 2
                continue
            any_byte = any_byte or nxt == "C"
            i += 2
        elif ch == "[":
            i = _class_end(pattern, i)
        else:
            if ch == "(":
                depth += 1
                deepest = max(deepest, depth)
            elif ch == ")" and depth:
                depth -= 1
            i += 1
    return deepest, any_byte


def _class_end(pattern: str, start: int) -> int:
    """The index after the class opened at ``start`` (the end when unterminated)."""
    i, n = start + 1, len(pattern)
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):
        i += 1  # a "]" first in the class is a literal
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
        elif pattern.startswith("[:", i):
            end = pattern.find(":]", i + 2)
            i = i + 1 if end < 0 else end + 2
        elif ch == "]":
            return i + 1
        else:
            i += 1
    return n

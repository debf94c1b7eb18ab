"""containerd's filter language (``pkg/filters``), parsed into a small AST.

``Walk``/``List`` take filter strings such as::

    kind==committed
    labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def"
    name~=/^extract-/

A filter string is an AND of selectors separated by ``,``; several strings
are an OR of those ANDs; no strings, or ``""``, match everything::

    selector  := fieldpath [operator value]      no operator: "is present"
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | run of anything but "," and whitespace
    quoted    := Go string literal in "…"; after ~= also /…/ or |…|

The AST is plain frozen dataclasses (:class:`Filter` of :class:`Selector`)
so that the metadata store can turn it into SQL; :meth:`Filter.match` is the
reference meaning that any such translation must agree with.

Where we deliberately differ from containerd (a filter containerd accepts
never means something else here):

* A ``~=`` pattern that does not compile is InvalidArgument at parse time.
  containerd logs it and lets the selector match nothing, which turns a typo
  into a silently empty listing.
* Whitespace is skipped between any two tokens. containerd's parser peeks at
  the raw next character, so it rejects a space right before ``,``, ``.`` or
  the end (``name==a , kind==view``); we accept it.
* Patterns run on Python's :mod:`re`, not RE2: the RE2-only spellings are
  translated (``\\z``, ``(?<name>…)``, ``\\Q…\\E``, ``[[:alpha:]]``) and
  ``\\d \\w \\s \\b`` are ASCII-only as in RE2. Constructs only Python knows
  (look-arounds, back-references) are accepted; RE2-only ones we do not
  translate (``\\pL``, ``(?U)``) are InvalidArgument.
* ``\\xHH`` and octal escapes that leave invalid UTF-8 are InvalidArgument
  (containerd keeps the bytes, and they can never equal a protobuf string).
* Error positions count characters, not UTF-8 bytes.
"""

from __future__ import annotations

import enum
import functools
import re
import string
import unicodedata
from dataclasses import dataclass, field

from stratasnap.errors import InvalidArgument
from stratasnap.types import Info

__all__ = ["Filter", "Operator", "Selector", "compile_pattern", "field_value", "parse"]


class Operator(enum.Enum):
    """How a selector compares its field; the value is the operator's spelling."""

    PRESENT = ""
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


def field_value(info: Info, fieldpath: tuple[str, ...]) -> str | None:
    """The value a snapshot has at ``fieldpath``, or ``None`` when not present.

    Mirrors containerd's snapshot adaptor: only the first segment is looked
    at for ``kind``, ``name`` and ``parent`` (so ``name.x`` is the name), and
    ``parent`` is present even when empty. Under ``labels`` the remaining
    segments joined with ``.`` are the key, so ``labels.a.b`` and
    ``labels."a.b"`` name the same label.
    """
    if not fieldpath:
        return None
    head = fieldpath[0]
    if head == "kind":
        return info.kind.value
    if head == "name":
        return info.name
    if head == "parent":
        return info.parent
    if head == "labels":
        return info.labels.get(".".join(fieldpath[1:]))
    return None


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath [operator value]`` test.

    Absent fields follow containerd: ``==`` never matches them, ``!=``
    compares them as ``""`` (so an absent field matches ``!=x``), and ``~=``
    searches ``""``. A ``~=`` pattern is compiled here, once; a bad one is
    InvalidArgument.
    """

    fieldpath: tuple[str, ...]
    op: Operator
    value: str = ""
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The parser never builds the next two shapes; refusing them keeps
        # every Selector meaningful for code (such as SQL translation) that
        # builds or consumes them directly.
        if not self.fieldpath:
            raise InvalidArgument("filters: selector without a fieldpath")
        if self.op is Operator.PRESENT and self.value:
            raise InvalidArgument(
                f"filters: presence test on {self} cannot have value {_go_quote(self.value)}"
            )
        if self.op is Operator.MATCHES:
            try:
                regex = compile_pattern(self.value)
            except (re.error, ValueError) as exc:
                raise InvalidArgument(
                    f"filters: invalid regular expression {_go_quote(self.value)}: {exc}"
                ) from None
            object.__setattr__(self, "_regex", regex)

    def match(self, info: Info) -> bool:
        """Whether the snapshot satisfies this selector."""
        found = field_value(info, self.fieldpath)
        if self.op is Operator.PRESENT:
            return found is not None
        if self.op is Operator.EQUAL:
            return found is not None and found == self.value
        if self.op is Operator.NOT_EQUAL:
            return (found or "") != self.value
        assert self._regex is not None  # compiled in __post_init__
        return self._regex.search(found or "") is not None

    def __str__(self) -> str:
        """The selector in filter syntax; parsing it gives this selector back."""
        path = ".".join(f if _is_plain_field(f) else _go_quote(f) for f in self.fieldpath)
        if self.op is Operator.PRESENT:
            return path
        value = self.value if _is_plain_value(self.value) else _go_quote(self.value)
        return f"{path}{self.op.value}{value}"


@dataclass(frozen=True)
class Filter:
    """An OR of alternatives, each an AND of selectors.

    An empty alternative accepts everything; an empty ``alternatives`` tuple
    accepts nothing (``parse`` never returns that).
    """

    alternatives: tuple[tuple[Selector, ...], ...]

    @property
    def matches_everything(self) -> bool:
        """True when some alternative has no selectors, so no snapshot needs testing."""
        return any(not selectors for selectors in self.alternatives)

    def match(self, info: Info) -> bool:
        """Whether the snapshot satisfies any alternative."""
        return any(
            all(selector.match(info) for selector in selectors) for selectors in self.alternatives
        )


def parse(*filters: str) -> Filter:
    """Parse filter strings into their OR; raise InvalidArgument if one is malformed.

    The message shows where parsing stopped, like containerd's:
    ``filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated``.
    """
    if not filters:
        return Filter(((),))
    # "" is special-cased by containerd (Parse returns Always); a string of
    # only whitespace is not, and fails with "expected field or quoted".
    return Filter(tuple(_Parser(text).selectors() if text else () for text in filters))


# --- lexical classes (containerd's scanner.go) ----------------------------

_QUOTES = frozenset('"/|')
_OPERATOR_RUNES = frozenset("=!~")
_SEPARATORS = frozenset(",.")
_FIELD_RUNES = frozenset(string.ascii_letters + string.digits + "_")
# Go's unicode.IsSpace: Latin-1 spaces plus the White_Space property. It
# differs from str.isspace() on \x1c-\x1f, which Go does not skip.
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_OPERATORS = {op.value: op for op in Operator if op is not Operator.PRESENT}
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_ESCAPED_AS = {chr(code): letter for letter, code in _SIMPLE_ESCAPES.items()}
_ESCAPE_WIDTHS = {"x": 2, "u": 4, "U": 8}


def _is_value_rune(ch: str) -> bool:
    # Go: letter, digit, number, graphic or punctuation, minus "," and
    # spaces; i.e. Unicode categories L, M, N, P, S.
    return ch != "," and ch not in _SPACES and unicodedata.category(ch)[0] in "LMNPS"


def _illegal(ch: str) -> str:
    """Why containerd's scanner refuses this character anywhere, or ""."""
    if ch == "\0":
        return "unexpected null"
    if "\ud800" <= ch <= "\udfff":  # what Go sees as invalid UTF-8
        return "rune error"
    return ""


def _digit_value(ch: str) -> int:
    return int(ch, 16) if ch in string.hexdigits else 16


class _Parser:
    """Recursive descent over one filter string; ``pos`` indexes ``text``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, pos: int, msg: str) -> InvalidArgument:
        text = self.text
        where = f"{text[:pos]} >|{text[pos]}|< {text[pos + 1 :]}" if pos < len(text) else text
        return InvalidArgument(f"filters: parse error: [{where}]: {msg}")

    def unexpected(self, pos: int, msg: str) -> InvalidArgument:
        ch = self.text[pos : pos + 1]
        return self.error(pos, (ch and _illegal(ch)) or msg)

    def peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end."""
        text = self.text
        while self.pos < len(text) and text[self.pos] in _SPACES:
            self.pos += 1
        return text[self.pos] if self.pos < len(text) else ""

    def selectors(self) -> tuple[Selector, ...]:
        found = [self.selector()]
        while (ch := self.peek()) != "":
            if ch != ",":
                raise self.unexpected(self.pos, f"unexpected input: {ch}")
            self.pos += 1
            found.append(self.selector())
        return tuple(found)

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.peek() in ("", ","):
            return Selector(fieldpath, Operator.PRESENT)
        op = self.operator()
        value_pos, value = self.value(op)
        if op is Operator.MATCHES:
            # Compiled (and cached) here only to point at the pattern when it
            # is bad; Selector.__post_init__ then gets it from the cache.
            try:
                compile_pattern(value)
            except (re.error, ValueError) as exc:
                raise self.error(
                    value_pos, f"invalid regular expression {_go_quote(value)}: {exc}"
                ) from None
        return Selector(fieldpath, op, value)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        ch = self.peek()
        start = self.pos
        if ch in _QUOTES:
            return self.quoted(alternatives=False)
        if ch in _FIELD_RUNES:
            end = start
            while end < len(self.text) and self.text[end] in _FIELD_RUNES:
                end += 1
            self.pos = end
            return self.text[start:end]
        raise self.unexpected(start, "expected field or quoted")

    def operator(self) -> Operator:
        ch = self.peek()
        start = self.pos
        if ch in _OPERATOR_RUNES:
            end = start
            while end < len(self.text) and self.text[end] in _OPERATOR_RUNES:
                end += 1
            self.pos = end
            spelled = self.text[start:end]
            if spelled not in _OPERATORS:
                raise self.error(start, f"unsupported operator {_go_quote(spelled)}")
            return _OPERATORS[spelled]
        if ch in _QUOTES:
            # containerd scans a quoted literal before noticing it is not an
            # operator, so `labels.ns/key==value` reports the unterminated
            # "/…" quote; that message is the hint to quote the label key.
            _, problem = self.scan_quoted(start)
            if problem:
                raise self.error(start, problem)
        raise self.unexpected(start, 'expected an operator ("=="|"!="|"~=")')

    def value(self, op: Operator) -> tuple[int, str]:
        """Where the value starts, and the value."""
        ch = self.peek()
        start = self.pos
        if ch == "" or ch in _SEPARATORS or ch in _OPERATOR_RUNES:
            raise self.error(start, "expected value or quoted")
        if ch in _QUOTES:
            return start, self.quoted(alternatives=op is Operator.MATCHES)
        if _illegal(ch):
            raise self.unexpected(start, "")
        # Like containerd, the first character is taken whatever it is; the
        # rest of the run stops at "," or whitespace.
        end = start + 1
        while end < len(self.text) and _is_value_rune(self.text[end]):
            end += 1
        self.pos = end
        return start, self.text[start:end]

    def quoted(self, *, alternatives: bool) -> str:
        start = self.pos
        quote = self.text[start]
        end, problem = self.scan_quoted(start)
        if problem:
            raise self.error(start, problem)
        # /…/ and |…| exist so a regex need not escape its quotes; anywhere
        # else only "…" quotes, which keeps `==/x` from looking like a regex.
        if quote != '"' and not alternatives:
            raise self.error(start, "invalid quote encountered")
        try:
            unquoted = _unquote(self.text[start + 1 : end - 1], quote)
        except ValueError as exc:
            raise self.error(start, f"unquoting failed: {exc}") from None
        self.pos = end
        return unquoted

    def scan_quoted(self, start: int) -> tuple[int, str]:
        """Find the end of the literal opened at ``start``.

        Returns the index after the closing quote and the first problem met
        ("" if none). Like containerd's scanner it keeps going after a bad
        escape, so the first problem is the one reported.
        """
        text = self.text
        quote = text[start]
        problems: list[str] = []
        i = start + 1
        while True:
            ch = text[i] if i < len(text) else ""
            if ch == quote:
                return i + 1, problems[0] if problems else ""
            if ch in ("", "\n"):
                problems.append("quoted literal not terminated")
                return i, problems[0]
            if _illegal(ch):
                problems.append(_illegal(ch))
                return i, problems[0]
            if ch != "\\":
                i += 1
                continue
            i += 1
            esc = text[i] if i < len(text) else ""
            if esc and _illegal(esc):
                problems.append(_illegal(esc))
            elif esc in _SIMPLE_ESCAPES or esc == quote:
                i += 1
            elif esc in _ESCAPE_WIDTHS or (esc and esc in "01234567"):
                # Octal counts its first digit; \x \u \U count after the letter.
                if esc in _ESCAPE_WIDTHS:
                    base, width = 16, _ESCAPE_WIDTHS[esc]
                    i += 1
                else:
                    base, width = 8, 3
                while width and i < len(text) and _digit_value(text[i]) < base:
                    i += 1
                    width -= 1
                if width:
                    problems.append("illegal numeric escape sequence")
            else:
                # The character after "\" is not consumed: it may be the
                # closing quote.
                problems.append("illegal escape sequence")


def _unquote(body: str, quote: str) -> str:
    """Decode the inside of a literal ``scan_quoted`` found well-formed.

    Escapes are Go's; ``\\xHH`` and octal give bytes, ``\\u``/``\\U`` give
    code points, and the result must be UTF-8.
    """
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        esc = body[i + 1]
        i += 2
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
        elif esc == quote:
            out += quote.encode()
        elif esc in _ESCAPE_WIDTHS:
            width = _ESCAPE_WIDTHS[esc]
            code = int(body[i : i + width], 16)
            i += width
            if esc == "x":
                out.append(code)
            elif code > 0x10FFFF:
                raise ValueError("quote syntax error")
            else:
                # Go encodes a surrogate half as U+FFFD; so do we, rather
                # than make a str that cannot be encoded.
                out += chr(0xFFFD if 0xD800 <= code <= 0xDFFF else code).encode()
        else:  # octal, three digits, the first being esc
            code = int(body[i - 1 : i + 2], 8)
            i += 2
            if code > 0xFF:
                raise ValueError("quote syntax error")
            out.append(code)
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ValueError("escapes do not form valid UTF-8") from None


def _go_quote(text: str) -> str:
    """``text`` as a "…" literal that ``_unquote`` turns back into ``text``."""
    parts = ['"']
    for ch in text:
        if ch in _ESCAPED_AS:
            parts.append("\\" + _ESCAPED_AS[ch])
        elif ch == '"':
            parts.append('\\"')
        elif ch.isprintable():
            parts.append(ch)
        elif ord(ch) < 0x80:
            parts.append(f"\\x{ord(ch):02x}")  # a byte, which is the character only below 0x80
        elif ord(ch) <= 0xFFFF:
            parts.append(f"\\u{ord(ch):04x}")
        else:
            parts.append(f"\\U{ord(ch):08x}")
    parts.append('"')
    return "".join(parts)


def _is_plain_field(name: str) -> bool:
    return bool(name) and all(ch in _FIELD_RUNES for ch in name)


def _is_plain_value(value: str) -> bool:
    # A value that the scanner would read back unchanged without quotes.
    return (
        bool(value)
        and value[0] not in _QUOTES | _OPERATOR_RUNES | _SEPARATORS
        and all(_is_value_rune(ch) for ch in value)
    )


# --- RE2 spellings that Python's re needs translated -----------------------

# Inside brackets only; each maps to what it stands for in ASCII, as in RE2.
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_POSIX_CLASS = re.compile(r"\[:(\^?)([a-z]*):\]")


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The Python regex for a ``~=`` pattern (RE2 spelling); cached.

    Public so that the metadata store's SQL REGEXP matches exactly as
    :meth:`Selector.match` does. Raises ``re.error`` or ValueError.
    """
    # re.ASCII: RE2's \d \w \s \b are ASCII-only. The price is that (?i)
    # folds only ASCII letters, where RE2 folds all of Unicode.
    return re.compile(_translate_re2(pattern), re.ASCII)


def _translate_re2(pattern: str) -> str:
    """Rewrite the RE2 spellings Python's re reads differently or not at all.

    Raises ValueError for RE2 syntax with no simple equivalent.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            esc = pattern[i + 1]
            if esc == "Q" and not in_class:
                # \Q…\E: literal text, up to \E or the end of the pattern.
                end = pattern.find("\\E", i + 2)
                out.append(re.escape(pattern[i + 2 : n if end < 0 else end]))
                i = n if end < 0 else end + 2
                continue
            # RE2's \z is "end of text", Python's \Z (Python's \z is 3.14+).
            out.append("\\Z" if esc == "z" and not in_class else pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
            elif ch == "[":
                posix = _POSIX_CLASS.match(pattern, i)
                if posix:
                    negated, name = posix.groups()
                    if name not in _POSIX_CLASSES:
                        raise ValueError(f"invalid character class range {posix.group()}")
                    if negated:
                        raise ValueError(f"negated class {posix.group()} is not supported")
                    out.append(_POSIX_CLASSES[name])
                    i = posix.end()
                    continue
                # A literal "[" in RE2; escaped so re does not warn about
                # future nested sets.
                ch = "\\["
            elif ch in "&~|" and out and out[-1] == ch:
                # Literal in RE2; doubled, re warns of future set operations.
                ch = "\\" + ch
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = True
            # "^" and then a "]" straight after "[" are part of the class
            # in both dialects, not its end.
            head = 2 if pattern.startswith("[^", i) else 1
            if pattern.startswith("]", i + head):
                head += 1
            out.append(pattern[i : i + head])
            i += head
            continue
        if pattern.startswith("(?<", i) and pattern[i + 3 : i + 4] not in ("=", "!"):
            out.append("(?P<")  # RE2 (Go 1.22) named group; re only knows (?P<…>
            i += 3
            continue
        out.append(ch)
        i += 1
    return "".join(out)

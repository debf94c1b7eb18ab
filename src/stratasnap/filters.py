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
* ``~=`` patterns are compiled by RE2 itself (:mod:`stratasnap.regex`), as
  Go's regexp would, except that ``\\C`` is refused (RE2 has it, Go not).
* ``\\xHH`` and octal escapes that leave invalid UTF-8 are InvalidArgument
  (containerd keeps the bytes, and they can never equal a protobuf string).
* Error positions count characters, not UTF-8 bytes.
* What one request may cost is bounded, so that any request is answered
  quickly with matches or InvalidArgument (containerd has no bounds):

  ========================================  =====================================
  bound                                     value
  ========================================  =====================================
  filter strings (OR-ed alternatives)       :data:`MAX_ALTERNATIVES` (4096)
  bytes of all filter strings together      :data:`MAX_FILTER_BYTES` (16 KiB)
  selectors in all alternatives together    :data:`MAX_SELECTORS` (4096)
  bytes of all ``~=`` patterns together     :data:`MAX_PATTERNS_BYTES` (1 KiB)
  ``~=`` selectors                          :data:`MAX_PATTERNS` (16)
  one pattern                               see :mod:`stratasnap.regex`
  ========================================  =====================================
"""

from __future__ import annotations

import enum
import string
import unicodedata
from dataclasses import dataclass, field

from stratasnap.errors import InvalidArgument
from stratasnap.regex import Pattern, PatternError, compile_pattern
from stratasnap.types import Info

__all__ = [
    "MAX_ALTERNATIVES",
    "MAX_FILTER_BYTES",
    "MAX_PATTERNS",
    "MAX_PATTERNS_BYTES",
    "MAX_SELECTORS",
    "Filter",
    "Operator",
    "Selector",
    "compile_pattern",
    "field_value",
    "parse",
]

#: Filter strings in one request (each is one alternative of the OR).
MAX_ALTERNATIVES = 4096
#: Bytes (UTF-8) of one request's filter strings together.
MAX_FILTER_BYTES = 16 * 1024
#: Selectors in one request, all alternatives together.
MAX_SELECTORS = 4096
#: Bytes of one request's ``~=`` patterns together: compiling is the costly part
#: (up to about 11 ms per KiB for the costliest shapes on a quiet 2-CPU machine).
MAX_PATTERNS_BYTES = 1024
#: ``~=`` selectors in one request: a pattern on a name or a label is tried on
#: every snapshot (or every snapshot with that label), one pass each.
MAX_PATTERNS = 16


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
    _regex: Pattern | None = field(default=None, init=False, repr=False, compare=False)

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
            except PatternError as exc:
                raise InvalidArgument(
                    f"filters: invalid regular expression {_quote_pattern(self.value)}: {exc}"
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
        return self._regex.search(found or "")

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
    if len(filters) > MAX_ALTERNATIVES:
        raise InvalidArgument(
            f"filters: {len(filters)} filters in one request, more than {MAX_ALTERNATIVES}"
        )
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in filters)
    if size > MAX_FILTER_BYTES:
        raise InvalidArgument(
            f"filters: {size} bytes of filters in one request, more than {MAX_FILTER_BYTES}"
        )
    budget = _Budget()
    # "" is special-cased by containerd (Parse returns Always); a string of
    # only whitespace is not, and fails with "expected field or quoted".
    return Filter(tuple(_Parser(text, budget).selectors() if text else () for text in filters))


class _Budget:
    """What the filters of one request have spent so far (see the bounds above)."""

    def __init__(self) -> None:
        self.selectors = 0
        self.patterns = 0
        self.pattern_bytes = 0


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

    def __init__(self, text: str, budget: _Budget) -> None:
        self.text = text
        self.pos = 0
        self.budget = budget

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
        self.peek()
        start = self.pos
        budget = self.budget
        budget.selectors += 1
        if budget.selectors > MAX_SELECTORS:
            raise self.error(start, f"more than {MAX_SELECTORS} selectors in one request")
        fieldpath = self.fieldpath()
        if self.peek() in ("", ","):
            return Selector(fieldpath, Operator.PRESENT)
        op = self.operator()
        value_pos, value = self.value(op)
        if op is Operator.MATCHES:
            # Counted before compiling: the budget is there to bound compile time.
            budget.patterns += 1
            if budget.patterns > MAX_PATTERNS:
                raise self.error(
                    value_pos, f"more than {MAX_PATTERNS} regular expressions in one request"
                )
            budget.pattern_bytes += len(value.encode())
            if budget.pattern_bytes > MAX_PATTERNS_BYTES:
                raise self.error(
                    value_pos,
                    f"regular expressions of one request total more than "
                    f"{MAX_PATTERNS_BYTES} bytes",
                )
            # Compiled (and cached) here only to point at the pattern when it
            # is bad; Selector.__post_init__ then gets it from the cache.
            try:
                compile_pattern(value)
            except PatternError as exc:
                raise self.error(
                    value_pos, f"invalid regular expression {_quote_pattern(value)}: {exc}"
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


def _quote_pattern(pattern: str, limit: int = 80) -> str:
    """A pattern for an error message: quoted, and cut short when long."""
    if len(pattern) <= limit:
        return _go_quote(pattern)
    return f"{_go_quote(pattern[:limit])}… ({len(pattern)} characters)"


def _is_plain_field(name: str) -> bool:
    return bool(name) and all(ch in _FIELD_RUNES for ch in name)


def _is_plain_value(value: str) -> bool:
    # A value that the scanner would read back unchanged without quotes.
    return (
        bool(value)
        and value[0] not in _QUOTES | _OPERATOR_RUNES | _SEPARATORS
        and all(_is_value_rune(ch) for ch in value)
    )

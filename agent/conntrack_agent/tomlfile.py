"""TOML parsing: the only module that imports a TOML library.

Python 3.11+ ships tomllib; below that the identical tomli package is used.
Files are handed over as bytes because both libraries insist on binary input.

A policy file is read by root-owned code from an admin's directory, but a typo,
a stray symlink or a generated file must still give an error, never a hang, a
traceback or a runaway: `parse_document` bounds the input before tomllib sees
it (size, nesting depth, number length), turns every failure into a
`TomlSyntaxError` with a line where one is known, and maps each key to its line
in one pass that is linear in the input.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Dict, List, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - exercised on Debian 12's 3.11 only through tomllib
    import tomli as _toml

# The shipped policy is 7 KiB; a megabyte is far beyond any real one, and
# reading stops there (a symlink to /dev/zero or a runaway generator).
MAX_BYTES = 1 << 20
# The deepest real key is rule[i].set_timeouts.values.NAME: 4 levels. tomllib
# recurses per nested array or inline table and would raise RecursionError
# near 300 levels; comparing or printing a deep value recurses too.
MAX_DEPTH = 32
# 2**64 has 20 digits; no value of the policy needs more. Python refuses to
# convert integers past 4300 digits (ValueError) and takes quadratic time below.
MAX_INT_DIGITS = 20
# Bare values are numbers, booleans and dates: the longest sensible one is an
# offset date-time with fractions, ~35 characters.
MAX_BARE_VALUE = 64


KeyPathType = Tuple[Any, ...]


class TomlSyntaxError(ValueError):
    """The document is not TOML, or (`limit` true) is TOML beyond this module's limits."""

    def __init__(self, message: str, line: Optional[int], limit: bool = False, key: KeyPathType = ()):
        super().__init__(message)
        self.line = line
        self.limit = limit
        self.key = key  # the path of the key whose value broke a limit, when known


KeyPath = KeyPathType

_AT_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def parse(data: bytes) -> Dict[str, Any]:
    """The document's values. Raises TomlSyntaxError."""
    return parse_document(data)[0]


def parse_document(data: bytes) -> Tuple[Dict[str, Any], Dict[KeyPath, int]]:
    """(values, key path -> line). Raises TomlSyntaxError, and nothing else."""
    if len(data) > MAX_BYTES:
        raise TomlSyntaxError(f"larger than {MAX_BYTES} bytes (1 MiB): not a policy file", None, limit=True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TomlSyntaxError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", line) from None
    lines = _Scanner(text).run()  # limits first: tomllib must never see an over-deep document
    try:
        values = _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)  # 3.14+
        match = _AT_LINE.search(str(exc))
        if line is None and match:
            line = int(match.group(1))
        raise TomlSyntaxError(_AT_LINE.sub("", str(exc)).strip(), line) from None
    except RecursionError:  # the scanner's limits should make this unreachable
        raise TomlSyntaxError(f"nested too deeply (the limit is {MAX_DEPTH} levels)", None, limit=True) from None
    except Exception as exc:  # a library bug or a limit of Python's (int digits): still a policy error
        raise TomlSyntaxError(f"cannot be parsed: {type(exc).__name__}: {str(exc)[:200]}", None) from None
    path = _deeper_than(values, MAX_DEPTH)
    if path is not None:
        raise TomlSyntaxError(f"nested deeper than {MAX_DEPTH} levels", _line_of(lines, path), limit=True,
                              key=path)
    return values, lines


def key_lines(data: bytes) -> Dict[KeyPath, int]:
    """Map each key path to the line that sets it, for error messages.

    TOML libraries do not report positions of values, so this scans the text
    for table headers and `key =` lines. Paths use the array index for `[[x]]`
    tables, e.g. ("rule", 0, "trigger", "usage_at_least"). Keys inside inline
    tables map to the line of their parent key; a missing path is harmless
    (the message then has no line). Raises TomlSyntaxError past the limits.
    """
    return _Scanner(data.decode("utf-8", "replace")).run()


def _line_of(lines: Dict[KeyPath, int], path: KeyPath) -> Optional[int]:
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def _deeper_than(values: Any, limit: int) -> Optional[KeyPath]:
    """The path of a container nested deeper than `limit`, or None. Iterative."""
    stack: List[Tuple[Any, KeyPath]] = [(values, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > limit:
            return path[:limit + 1]
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(child, (dict, list)):
                stack.append((child, path + (key,)))
    return None


# --------------------------------------------------------------------------- the scanner

_WS = re.compile(r"[ \t\r]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# One-line strings, in the unrolled form: linear, no backtracking.
_BASIC = re.compile(r'"([^"\\\n]*(?:\\.[^"\\\n]*)*)"')
_LITERAL = re.compile(r"'([^'\n]*)'")
# A bare run inside a value: a number, boolean or date, or an inline table's key.
_BARE_VALUE = re.compile(r"""[^\s"'\[\]{},=#]+""")
# Outside an inline table's keys: everything up to a character that changes state.
_PLAIN_RUN = re.compile(r"""[^"'\[\]{}#\n=]+""")
_PLAIN_IN_TABLE = re.compile(r"""[^"'\[\]{}#\n=,]+""")
# Tokens that may break MAX_INT_DIGITS or MAX_BARE_VALUE (both need more than 20).
_LONG_TOKEN = re.compile(r"""[^\s"'\[\]{},=#]{%d,}""" % (MAX_INT_DIGITS + 1))
_INTEGER = re.compile(r"[+-]?(?:0x[0-9A-Fa-f_]+|0o[0-7_]+|0b[01_]+|[0-9_]+)")
_ESCAPE = re.compile(r"\\(u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b", '"': '"', "\\": "\\"}


def _unescape(raw: str) -> str:
    if "\\" not in raw:
        return raw

    def one(match: "re.Match[str]") -> str:
        code = match.group(1)
        if len(code) > 1:
            try:
                return chr(int(code[1:], 16))
            except ValueError:  # beyond U+10FFFF: tomllib reports it
                return match.group(0)
        return _ESCAPES.get(code, match.group(0))
    return _ESCAPE.sub(one, raw)


class _Scanner:
    """One pass over the text: key lines, nesting depth, number sizes.

    Not a TOML parser: it only follows what decides lines and depth (headers,
    keys, strings, brackets, comments) and leaves every other check to tomllib,
    which runs next. Every step moves forward, and nothing is rescanned except
    the backslashes before a quote, so the time is linear in the input.

    Depth counts containers from the root: `[a.b]` is 2, `[[rule]]` is 2 (the
    array, then its table), each dotted-key part, `[` and `{` one more.
    """

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: Dict[KeyPath, int] = {}
        self.array_counts: Dict[KeyPath, int] = {}
        self.prefix: KeyPath = ()
        self.key: KeyPath = ()  # the header or key being read, for messages

    def run(self) -> Dict[KeyPath, int]:
        text, n = self.text, len(self.text)
        while True:
            self.pos = _WS.match(text, self.pos).end()
            if self.pos >= n:
                return self.lines
            c = text[self.pos]
            if c == "\n":
                self.pos += 1
                self.line += 1
            elif c == "#":
                self._to_line_end()
            elif c == "[":
                self._header()
            else:
                self._key_value()

    # ------------------------------------------------------------------ pieces

    def _fail(self, message: str) -> None:
        raise TomlSyntaxError(message, self.line, limit=True, key=self.key)

    def _too_deep(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            self._fail(f"nested deeper than {MAX_DEPTH} levels (tables, arrays, inline tables and "
                       "dotted keys each count)")

    def _to_line_end(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end

    def _key(self, depth: int, base: KeyPath) -> Optional[List[str]]:
        """A dotted key at pos; None if there is none (tomllib will say why).
        depth: that of the table the key starts in; base: that table's path."""
        text, n = self.text, len(self.text)
        parts: List[str] = []
        while True:
            self.pos = _WS.match(text, self.pos).end()
            c = text[self.pos] if self.pos < n else ""
            if c == '"':
                match = _BASIC.match(text, self.pos)
                part = _unescape(match.group(1)) if match else None
            elif c == "'":
                match = _LITERAL.match(text, self.pos)
                part = match.group(1) if match else None
            else:
                match = _BARE_KEY.match(text, self.pos)
                part = match.group(0) if match else None
            if match is None or part is None:
                return None
            parts.append(part)
            self.key = base + tuple(parts)
            self._too_deep(depth + len(parts))
            self.pos = _WS.match(text, match.end()).end()
            if self.pos < n and text[self.pos] == ".":
                self.pos += 1
                continue
            return parts

    def _header(self) -> None:
        text = self.text
        is_array = text.startswith("[[", self.pos)
        self.pos += 2 if is_array else 1
        names = self._key(1 if is_array else 0, ())
        if names is None or not text.startswith("]]" if is_array else "]", self.pos):
            self._to_line_end()
            return
        self.pos += 2 if is_array else 1
        resolved: KeyPath = ()
        for position, name in enumerate(names):
            resolved = resolved + (name,)
            last = position == len(names) - 1
            # A name that is an array of tables refers to its latest element,
            # except where this very header appends a new element.
            if resolved in self.array_counts and not (last and is_array):
                resolved = resolved + (self.array_counts[resolved] - 1,)
        if is_array:
            index = self.array_counts.get(resolved, 0)
            self.array_counts[resolved] = index + 1
            resolved = resolved + (index,)
        self._too_deep(len(resolved))
        self.prefix = resolved
        self.lines.setdefault(resolved, self.line)
        self._to_line_end()  # a comment, or junk tomllib reports

    def _key_value(self) -> None:
        line = self.line
        names = self._key(len(self.prefix), self.prefix)
        if names is None or not self.text.startswith("=", self.pos):
            self._to_line_end()
            return
        self.pos += 1
        path = self.prefix + tuple(names)
        self.lines[path] = line
        self._value(len(path) - 1)

    def _value(self, base: int) -> None:
        """Skip one value, which may span lines (arrays, multi-line strings).

        base: the depth of the table holding the value; each `[` or `{` opens
        one level more, and in an inline table each dot of a key does too.
        """
        text, n = self.text, len(self.text)
        stack: List[Tuple[str, int]] = []  # (bracket, depth before it)
        key_mode = False  # at an inline table's key: dots nest
        while True:
            self.pos = _WS.match(text, self.pos).end()
            if self.pos >= n:
                return
            c = text[self.pos]
            if c == "\n":
                if not stack:
                    return
                self.pos += 1
                self.line += 1
            elif c == "#":
                self._to_line_end()
            elif c == '"' or c == "'":
                self._string(c)
            elif c == "[" or c == "{":
                stack.append((c, base))
                base += 1
                self._too_deep(base)
                key_mode = c == "{"
                self.pos += 1
            elif c == "]" or c == "}":
                if stack:
                    base = stack.pop()[1]
                key_mode = False
                self.pos += 1
            elif c == ",":
                if stack and stack[-1][0] == "{":
                    key_mode = True
                    base = stack[-1][1] + 1
                self.pos += 1
            elif c == "=":
                key_mode = False
                self.pos += 1
            elif not key_mode:
                # Scalars, commas and blanks up to the next bracket, quote, comment
                # or line end, in one step: only tokens long enough to break a
                # limit are looked at one by one.
                in_table = stack and stack[-1][0] == "{"  # where a comma starts a key
                match = (_PLAIN_IN_TABLE if in_table else _PLAIN_RUN).match(text, self.pos)
                if match is None:  # a character no rule covers: let tomllib name it
                    self.pos += 1
                    continue
                for long in _LONG_TOKEN.finditer(match.group(0)):
                    self._bare_value(long.group(0))
                self.pos = match.end()
            else:
                match = _BARE_VALUE.match(text, self.pos)
                if match is None:
                    self.pos += 1
                    continue
                base += match.group(0).count(".")
                self._too_deep(base)
                self.pos = match.end()

    def _bare_value(self, token: str) -> None:
        if _INTEGER.fullmatch(token):
            digits = token.lstrip("+-")
            if digits[:2] in ("0x", "0o", "0b"):
                digits = digits[2:]
            count = len(digits) - digits.count("_")
            if count > MAX_INT_DIGITS:
                self._fail(f"an integer of {count} digits: the limit is {MAX_INT_DIGITS}")
        if len(token) > MAX_BARE_VALUE:
            self._fail(f"a value of {len(token)} characters: numbers, booleans and dates are "
                       f"at most {MAX_BARE_VALUE}")

    def _string(self, quote: str) -> None:
        text, start = self.text, self.pos
        if text.startswith(quote * 3, start):
            end = self._multiline_end(quote, start + 3)
            self.line += text.count("\n", start, end)
            self.pos = end
            return
        match = (_BASIC if quote == '"' else _LITERAL).match(text, start)
        if match is None:  # unterminated: tomllib reports it
            self._to_line_end()
        else:
            self.pos = match.end()

    def _multiline_end(self, quote: str, pos: int) -> int:
        text, n = self.text, len(self.text)
        closing = quote * 3
        while True:
            end = text.find(closing, pos)
            if end < 0:
                return n
            if quote == '"':
                slashes = 0
                while end - 1 - slashes >= pos and text[end - 1 - slashes] == "\\":
                    slashes += 1
                if slashes % 2:  # an escaped quote: look further
                    pos = end + 1
                    continue
            end += 3
            for _ in range(2):  # up to two quotes before the closing three are content
                if end < n and text[end] == quote:
                    end += 1
            return end

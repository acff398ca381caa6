"""TOML parsing: the only module that imports a TOML library.

Python 3.11+ ships tomllib; below that the identical tomli package is used.
Files are handed over as bytes because both libraries insist on binary input.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Dict, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - exercised on Debian 12's 3.11 only through tomllib
    import tomli as _toml


class TomlSyntaxError(ValueError):
    def __init__(self, message: str, line: Optional[int]):
        super().__init__(message)
        self.line = line


_AT_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def parse(data: bytes) -> Dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TomlSyntaxError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", None) from None
    try:
        return _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        match = _AT_LINE.search(str(exc))
        message = _AT_LINE.sub("", str(exc)).strip()
        raise TomlSyntaxError(message, int(match.group(1)) if match else None) from None


KeyPath = Tuple[Any, ...]

_TABLE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\.\"' ]+?)\s*=")


def _split_dotted(text: str) -> Tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


def key_lines(data: bytes) -> Dict[KeyPath, int]:
    """Map each key path to the line that sets it, for error messages.

    TOML libraries do not report positions of values, so this scans the text
    for table headers and `key =` lines. Paths use the array index for `[[x]]`
    tables, e.g. ("rule", 0, "trigger", "usage_at_least"). Keys inside inline
    tables map to the line of their parent key; a missing path is harmless
    (the message then has no line).
    """
    lines: Dict[KeyPath, int] = {}
    array_counts: Dict[KeyPath, int] = {}
    prefix: KeyPath = ()
    in_multiline = None
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if in_multiline:
            if in_multiline in raw:
                in_multiline = None
            continue
        header = _TABLE.match(raw)
        if header and not _KEY.match(raw):
            names = _split_dotted(header.group(2))
            resolved: KeyPath = ()
            is_array = header.group(1) == "[["
            for position, name in enumerate(names):
                resolved = resolved + (name,)
                last = position == len(names) - 1
                # A name that is an array of tables refers to its latest element,
                # except where this very header appends a new element.
                if resolved in array_counts and not (last and is_array):
                    resolved = resolved + (array_counts[resolved] - 1,)
            if is_array:
                index = array_counts.get(resolved, 0)
                array_counts[resolved] = index + 1
                resolved = resolved + (index,)
            prefix = resolved
            lines.setdefault(prefix, number)
            continue
        key = _KEY.match(raw)
        if key:
            path = prefix + _split_dotted(key.group(1))
            lines[path] = number
            for quote in ('"""', "'''"):
                if raw.count(quote) == 1:
                    in_multiline = quote
    return lines

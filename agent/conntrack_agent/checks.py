"""Value kinds of the policy: one check per kind of value, pure.

A check takes a value as TOML gives it (str, int, float, bool, list, dict) and
returns it in the form the agent uses (a duration string becomes seconds), or
raises `Invalid` saying what was expected and what was found; the caller adds
the file, the line and the key. The policy schema (config.py) and the eviction
selectors (evictspec.py) are built from these, so a kind is defined once.

tests/unit/test_manpages.py reads the ranges back out of the checks (the
closure variables `low`, `high` and `integer` of `duration` and `number`, the
options of `choice`), so the man page states the ranges the code enforces.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any, Callable, Tuple

Check = Callable[[Any], Any]


class Invalid(ValueError):
    """A single value is wrong; the caller adds file, line and key."""


# Values end up in error messages: a 1 MiB string or a 10000-element array must
# not become a 1 MiB message, so they are shown cut short.
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = 6
_REPR.maxdict = 6
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """repr(value), shortened for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # repr() of a huge int is slow, and refused past 4300 digits on 3.11+
        return f"an integer of {value.bit_length()} bits"
    return _REPR.repr(value)


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", tuple: "an array", dict: "a table"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- durations

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# "1h30m" is 5 characters; no sensible duration needs more than this, and a cap
# keeps float() away from megabyte-long digit strings.
MAX_DURATION_TEXT = 64


def parse_duration(text: str) -> float:
    """'250ms', '5s', '1h30m' -> seconds. Raises ValueError."""
    if len(text) > MAX_DURATION_TEXT:
        raise ValueError(f"duration longer than {MAX_DURATION_TEXT} characters")
    compact = text.replace(" ", "")
    if not compact:
        raise ValueError("empty duration")
    position, total = 0, 0.0
    for match in _DURATION.finditer(compact):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise ValueError(f"not a duration: {text!r}")
    return total


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --------------------------------------------------------------------------- checks


def duration(low: float = 0.0, high: float = 30 * 86400.0) -> Check:
    def check(value: Any) -> float:
        if not isinstance(value, str):
            raise Invalid(f'expected a duration string such as "250ms", "5s" or "1h", '
                          f"got {type_name(value)} {shown(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise Invalid(f'expected a duration such as "250ms", "5s" or "1h", got {shown(value)}') from None
        if not low <= seconds <= high:
            raise Invalid(f"expected a duration from {format_duration(low)} to {format_duration(high)}, "
                          f"got {shown(value)}")
        return seconds
    return check


def number(low: float, high: float, integer: bool = False, also: Tuple[Any, ...] = ()) -> Check:
    """A number from low to high; `also`: values accepted outside the range (0 for "auto")."""
    kind = "an integer" if integer else "a number"
    alternatives = "".join(f"{a:g} or " for a in also)

    def check(value: Any) -> Any:
        ok_types = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            raise Invalid(f"expected {alternatives}{kind} from {low:g} to {high:g}, "
                          f"got {type_name(value)} {shown(value)}")
        if value not in also and not low <= value <= high:  # NaN fails both comparisons
            raise Invalid(f"expected {alternatives}a value from {low:g} to {high:g}, got {shown(value)}")
        return value if integer else float(value)
    return check


def ratio(value: Any) -> float:
    return number(0.0, 1.0)(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {type_name(value)} {shown(value)}")
    return value


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise Invalid(f"expected one of {', '.join(repr(o) for o in options)}, got {shown(value)}")
        return value
    return check


def string_list(item: Check, most: int = 1024) -> Check:
    def check(value: Any) -> Tuple[Any, ...]:
        if not isinstance(value, list):
            raise Invalid(f"expected an array, got {type_name(value)} {shown(value)}")
        if len(value) > most:
            raise Invalid(f"expected an array of at most {most} items, got {len(value)}")
        return tuple(item(v) for v in value)
    return check


def text(pattern: str = r".+", what: str = "a non-empty string") -> Check:
    compiled = re.compile(pattern)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise Invalid(f"expected {what}, got {shown(value)}")
        return value
    return check


def optional(inner: Check) -> Check:
    """TOML has no null: an optional value is simply left out; "" also means unset."""
    def check(value: Any) -> Any:
        if value == "":
            return None
        return inner(value)
    return check


# The longest address text is an IPv4-mapped IPv6 address with a prefix (~50).
_MAX_CIDR_TEXT = 64


def cidr(value: Any) -> str:
    import ipaddress  # ~1 MB of RSS, paid only by policies that name addresses

    if not isinstance(value, str):
        raise Invalid(f"expected an address or CIDR such as \"10.0.0.0/8\", got {type_name(value)} {shown(value)}")
    try:
        if len(value) > _MAX_CIDR_TEXT:
            raise ValueError(value)
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise Invalid(f"expected an address or CIDR such as \"10.0.0.0/8\" or \"fd00::/8\", got {shown(value)}") from None


def read_at_most(fd: int, limit: int) -> bytes:
    """At most `limit` + 1 bytes of an open file: one byte more than allowed tells the
    caller the file is too large, without reading a /dev/zero or a huge file to its end."""
    import os

    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(fd, limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)

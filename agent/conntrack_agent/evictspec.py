"""The eviction selectors, defined once: names, kinds, ranges, help; and EvictSpec.

Pure (no I/O, no netlink). Three readers share these definitions, so they
cannot drift apart:

- the policy's `[rule.evict]` table (config.py): `SCHEMA`, one TOML check per key;
- the eviction engine (evict.py): `EvictSpec`, which validates a spec built in
  Python with the same ranges;
- the command line (`conntrack-agent evict`, cli.py): one option per `FIELDS`
  entry that has one, its text read by `Field.from_text` (and `parse_mark`).

The protocol and TCP-state names are those conntrack-tools prints; the netlink
codec (ctnetlink.py) takes its tables from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from . import checks
from .checks import Check, Invalid, format_duration, parse_duration, shown

__all__ = [
    "PROTO_NUMBERS", "PROTO_NAMES", "PROTOCOLS", "TCP_STATES", "SELECTABLE_TCP_STATES",
    "MODES", "STATUSES", "FIELDS", "FIELDS_BY_NAME", "SCHEMA", "Field", "EvictSpec",
    "parse_mark", "narrowing", "KERNEL_TCP_TIMEOUT_ESTABLISHED",
]

# --------------------------------------------------------------------------- names

PROTO_NUMBERS = {
    "icmp": 1, "tcp": 6, "udp": 17, "dccp": 33, "gre": 47, "icmpv6": 58,
    "ipv6-icmp": 58, "sctp": 132, "udplite": 136,
}
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 58: "icmpv6",
               132: "sctp", 136: "udplite"}
# The names a selector accepts: one per protocol (not the "ipv6-icmp" alias).
PROTOCOLS = tuple(sorted(set(PROTO_NAMES.values())))
# enum tcp_conntrack, names as conntrack-tools prints them (index = state number).
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
# NONE is the state of an entry being set up, never one to select.
SELECTABLE_TCP_STATES = tuple(s for s in TCP_STATES if s != "NONE")
MODES = ("delete", "age")
STATUSES = ("any", "unreplied", "not_assured", "assured")

# nf_conntrack_tcp_timeout_established's kernel default (5 days): the longest
# remaining timeout an entry has unless someone raised a sysctl.
KERNEL_TCP_TIMEOUT_ESTABLISHED = 5 * 86400.0


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Field:
    """One key of `[rule.evict]`, one EvictSpec field, at most one command-line option.

    kind: "choice", "names" (an array of choices), "integer", "duration"
    (seconds in Python, a duration string in TOML and on the command line),
    "ratio", "cidr" or "flag". `low`/`high` bound integers, durations and
    ratios, inclusive. `optional`: None (TOML: the key left out) is allowed.
    `option`: the command-line flag, None when the field has none of its own.
    """

    name: str
    kind: str
    help: str
    low: float = 0
    high: float = 0
    options: Tuple[str, ...] = ()
    optional: bool = False
    option: Optional[str] = None
    metavar: Optional[str] = None
    what: str = ""  # "a port", "a zone": how a message names one value

    def toml_check(self) -> Check:
        """The check of the TOML value (a duration string becomes seconds)."""
        kind = self.kind
        if kind == "choice":
            return checks.choice(*self.options)
        if kind == "names":
            return checks.string_list(checks.choice(*self.options), most=len(self.options))
        if kind == "integer":
            return checks.number(self.low, self.high, integer=True)
        if kind == "duration":
            return checks.duration(self.low, self.high)
        if kind == "ratio":
            return checks.number(self.low, self.high)
        if kind == "cidr":
            return checks.optional(checks.cidr)
        if kind == "flag":
            return checks.boolean
        raise AssertionError(kind)

    def range_text(self) -> str:
        if self.kind == "duration":
            return f"from {format_duration(self.low)} to {format_duration(self.high)}"
        if self.kind == "integer":
            high = f"{int(self.high):#x}" if self.high >= 0xFFFFFF else str(int(self.high))
            return f"from {int(self.low)} to {high}"
        return f"from {self.low:g} to {self.high:g}"

    def validate(self, value: Any, given: Optional[str] = None) -> Any:
        """A Python value (seconds for durations, a tuple of names): raises Invalid.
        given: the text the value was read from, which a message then shows."""
        if value is None and self.optional:
            return None
        kind = self.kind
        if kind == "names":
            if not isinstance(value, (tuple, list)):
                raise Invalid(f"expected a tuple of names, got {shown(value)}")
            for item in value:
                if not isinstance(item, str) or item not in self.options:
                    raise Invalid(f"unknown {self.what} {shown(item)}; known: {', '.join(self.options)}")
            return tuple(value)
        if kind == "choice":
            if not isinstance(value, str) or value not in self.options:
                raise Invalid(f"expected one of {', '.join(self.options)}, got {shown(value)}")
            return value
        if kind == "flag":
            if not isinstance(value, bool):
                raise Invalid(f"expected true or false, got {shown(value)}")
            return value
        if kind == "cidr":
            return _net_text(value)
        ok_types = (int,) if kind == "integer" else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types) or not self.low <= value <= self.high:
            got = shown(value if given is None else given)
            if given is None and kind == "duration" and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                got += " seconds"
            raise Invalid(f"expected {self.what or 'a value'} {self.range_text()}, got {got}")
        return value

    def from_text(self, text: str) -> Any:
        """A command-line value: raises Invalid naming what was expected."""
        kind = self.kind
        try:
            if kind == "integer":
                value: Any = int(text, 0)
            elif kind == "duration":
                value = parse_duration(text)
            elif kind == "ratio":
                value = float(text)
            else:
                value = text
        except ValueError:
            example = {"integer": "an integer", "duration": 'a duration such as "10s"',
                       "ratio": "a number such as 0.8"}[kind]
            raise Invalid(f"expected {example} {self.range_text()}, got {shown(text)}") from None
        if kind == "names":
            value = (value,)
        return self.validate(value, text)


def _net_text(value: Any) -> str:
    """An address or CIDR, as text (kept as given); raises Invalid."""
    try:
        checks.cidr(value)
    except Invalid:
        raise Invalid(f"expected an address or CIDR such as 10.0.0.0/8 or fd00::/8, got {shown(value)}") from None
    return value


# The one list of selectors and budgets, in the order the man pages present them.
FIELDS: Tuple[Field, ...] = (
    Field("mode", "choice", "delete the entries, or age them: shorten their remaining timeout",
          options=MODES, option="--mode"),
    # 0 would be a delete by another name; a day is longer than any idle entry
    # needs to expire, while a live one refreshes its timeout with its next packet.
    Field("age_timeout", "duration", "remaining timeout given in age mode",
          low=1.0, high=86400.0, option="--age-timeout", metavar="DURATION", what="a timeout"),
    Field("protocols", "names", "protocol (repeatable)", options=PROTOCOLS, option="--proto",
          metavar="PROTO", what="protocol"),
    Field("tcp_states", "names", "TCP state (repeatable)", options=SELECTABLE_TCP_STATES,
          option="--state", metavar="STATE", what="TCP state"),
    Field("status", "choice", "any entry, unreplied ones (never saw a reply), not_assured or assured ones",
          options=STATUSES, option="--status"),
    Field("mark", "integer", "conntrack mark, compared under the mask", low=0, high=0xFFFFFFFF,
          optional=True, option="--mark", metavar="MARK[/MASK]", what="a mark"),
    # A zero mask compares no bit: it would select every entry while looking like a selector.
    Field("mark_mask", "integer", "the bits of the mark compared", low=1, high=0xFFFFFFFF, what="a mask"),
    Field("zone", "integer", "conntrack zone", low=0, high=0xFFFF, optional=True, option="--zone",
          metavar="ZONE", what="a zone"),
    Field("src", "cidr", "original source address or CIDR", optional=True, option="--src", metavar="CIDR"),
    Field("dst", "cidr", "original destination address or CIDR", optional=True, option="--dst",
          metavar="CIDR"),
    # Port 0 is no port: conntrack never tracks a flow to or from it.
    Field("sport", "integer", "original source port", low=1, high=65535, optional=True, option="--sport",
          metavar="PORT", what="a port"),
    Field("dport", "integer", "original destination port", low=1, high=65535, optional=True, option="--dport",
          metavar="PORT", what="a port"),
    Field("timeout_below", "duration", "remaining timeout below this (idle for long)",
          low=1.0, high=30 * 86400.0, optional=True, option="--timeout-below", metavar="DURATION",
          what="a timeout"),
    Field("include_established", "flag", "also select assured ESTABLISHED TCP entries (live connections)",
          option="--include-established"),
    Field("budget_entries", "integer", "at most N entries (0: no bound)", low=0, high=10_000_000,
          option="--budget-entries", metavar="N", what="an entry count"),
    Field("budget_time", "duration", 'at most this long ("0s": no bound)', low=0.0, high=60.0,
          option="--budget-time", metavar="DURATION", what="a time"),
    # Above 0.99 a sweep would stop at once (usage never exceeds 1); below 0.01
    # it could never stop early, which budget_entries = 0 says more plainly.
    Field("target_usage", "ratio", "stop once usage is at or below this", low=0.01, high=0.99,
          optional=True, option="--target-usage", metavar="RATIO", what="a usage ratio"),
)
FIELDS_BY_NAME: Dict[str, Field] = {f.name: f for f in FIELDS}
# The `[rule.evict]` table of the policy: key -> TOML check.
SCHEMA: Dict[str, Check] = {f.name: f.toml_check() for f in FIELDS}


def parse_mark(text: str) -> Tuple[int, Optional[int]]:
    """'0x10' -> (16, None); '0x10/0xff' -> (16, 255). Raises Invalid."""
    mark_text, slash, mask_text = text.partition("/")
    if slash and not mask_text:
        raise Invalid(f"expected MARK or MARK/MASK such as 0x10/0xff, got {shown(text)} (an empty mask)")
    mark = FIELDS_BY_NAME["mark"].from_text(mark_text)
    mask = FIELDS_BY_NAME["mark_mask"].from_text(mask_text) if slash else None
    return mark, mask


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class EvictSpec:
    """What to evict and how far to go. Validated on construction (ValueError).

    Field meanings, kinds and ranges: `FIELDS`. ``tcp_states`` constrains TCP
    entries and, alone, implies tcp; ``src``/``dst`` and the ports are those
    of the original direction; ``timeout_below`` and ``age_timeout`` are
    seconds; ``budget_entries``/``budget_time`` bound one sweep (0: no bound);
    ``target_usage`` (count/max) stops a sweep once reached.
    """

    mode: str = "delete"
    age_timeout: float = 10.0
    protocols: Tuple[str, ...] = ()
    tcp_states: Tuple[str, ...] = ()
    status: str = "any"
    mark: Optional[int] = None
    mark_mask: int = 0xFFFFFFFF
    zone: Optional[int] = None
    src: Optional[str] = None
    dst: Optional[str] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    timeout_below: Optional[float] = None
    include_established: bool = False
    budget_entries: int = 50_000
    budget_time: float = 0.5
    target_usage: Optional[float] = None

    def __post_init__(self) -> None:
        for f in FIELDS:
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, f.validate(value))
            except Invalid as exc:
                raise ValueError(f"evict.{f.name}: {exc}") from None
        if self.tcp_states and self.protocols and "tcp" not in self.protocols:
            raise ValueError("evict.tcp_states: TCP states given but tcp is not among the protocols")
        if self.src and self.dst and _version(self.src) != _version(self.dst):
            raise ValueError("evict.src/dst: mixed IPv4 and IPv6 select nothing")

    def effective_protocols(self) -> Tuple[int, ...]:
        names = self.protocols or (("tcp",) if self.tcp_states else ())
        return tuple(sorted({PROTO_NUMBERS[p] for p in names}))


def _version(text: str) -> int:
    import ipaddress  # ~1 MB of RSS: paid for by rules that name addresses, not by every agent

    return ipaddress.ip_network(text, strict=False).version


def _prefixlen(text: str) -> int:
    import ipaddress

    return ipaddress.ip_network(text, strict=False).prefixlen


def narrowing(spec: EvictSpec, established_timeout: float = KERNEL_TCP_TIMEOUT_ESTABLISHED,
              live_connections: bool = False) -> Tuple[str, ...]:
    """The selectors of `spec` that leave some entries out; () when it selects every entry.

    A selector counts by what it excludes, not by being given: "0.0.0.0/0" and
    "::/0" leave out no address of their family; a `timeout_below` at or above
    `established_timeout` (the longest remaining timeout a live TCP connection
    can have: the kernel's default for nf_conntrack_tcp_timeout_established, or
    less if the policy shortens it) leaves out no entry that just saw a packet.
    The mark's mask is never 0 (refused), so a mark always narrows.

    live_connections: count only what leaves out some assured ESTABLISHED TCP
    entries, the check behind include_established: protocols with tcp, states
    with ESTABLISHED and status "assured" keep every live connection selected.
    """
    out = []
    if spec.protocols and (("tcp" not in spec.protocols) if live_connections
                           else set(PROTOCOLS) - set(spec.protocols)):
        out.append("protocols")
    if spec.tcp_states and (("ESTABLISHED" not in spec.tcp_states) if live_connections
                            else set(SELECTABLE_TCP_STATES) - set(spec.tcp_states)):
        out.append("tcp_states")
    if spec.status != "any" and not (live_connections and spec.status == "assured"):
        out.append("status")
    for name in ("mark", "zone", "sport", "dport"):
        if getattr(spec, name) is not None:
            out.append(name)
    for name in ("src", "dst"):
        value = getattr(spec, name)
        if value is not None and _prefixlen(value) > 0:
            out.append(name)
    if spec.timeout_below is not None and spec.timeout_below < established_timeout:
        out.append("timeout_below")
    return tuple(out)

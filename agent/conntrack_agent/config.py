"""The policy: its schema, validation and layering. Pure apart from reading files.

A policy is built in layers, as systemd does with its own configuration:

1. the built-in defaults (`DEFAULT_RULES` and the field defaults below);
2. the main file: `--config PATH`, else the first of /etc/conntrack-agent/policy.toml
   and /usr/lib/conntrack-agent/policy.toml that exists;
3. drop-ins `*.toml` from `policy.d/` beside the main file (and, when no --config was
   given, from /usr/lib/conntrack-agent/policy.d too), in file-name order, a name
   in /etc masking the same name in /usr/lib.

Tables merge key by key; `[[rule]]` entries merge by `name`, so a drop-in can tune
or disable (`enabled = false`) one shipped rule without copying the others. An
empty file therefore means the built-in defaults.

Every key is checked: unknown keys (typos), wrong types and out-of-range values
are errors naming the file, the line, the key path and the expected and actual
value. Nothing partial is ever returned: a policy is whole or it is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import ctnetlink, tomlfile
from .evict import EvictSpec
from .model import DEFAULT_OVERHEAD_BYTES

# Paths are strings: pathlib pulls in urllib.parse and ipaddress (~2 MB of RSS).
ETC_DIR = "/etc/conntrack-agent"
VENDOR_DIR = "/usr/lib/conntrack-agent"
MAIN_NAME = "policy.toml"
DROPIN_DIR = "policy.d"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    file: str
    line: Optional[int]
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class PolicyError(Exception):
    """One or more problems; str() lists every one, one per line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- value kinds

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'250ms', '5s', '1h30m' -> seconds. Raises ValueError."""
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


class Invalid(ValueError):
    """A single value is wrong; the caller adds file, line and key."""


Check = Callable[[Any], Any]


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def duration(low: float = 0.0, high: float = 30 * 86400.0) -> Check:
    def check(value: Any) -> float:
        if not isinstance(value, str):
            raise Invalid(f'expected a duration string such as "250ms", "5s" or "1h", got {_type_name(value)} {value!r}')
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise Invalid(f'expected a duration such as "250ms", "5s" or "1h", got {value!r}') from None
        if not low <= seconds <= high:
            raise Invalid(f"expected a duration from {format_duration(low)} to {format_duration(high)}, got {value!r}")
        return seconds
    return check


def number(low: float, high: float, integer: bool = False) -> Check:
    def check(value: Any) -> Any:
        ok_types = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            kind = "an integer" if integer else "a number"
            raise Invalid(f"expected {kind} from {low:g} to {high:g}, got {_type_name(value)} {value!r}")
        if not low <= value <= high:
            raise Invalid(f"expected a value from {low:g} to {high:g}, got {value!r}")
        return value if integer else float(value)
    return check


def ratio(value: Any) -> float:
    return number(0.0, 1.0)(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {_type_name(value)} {value!r}")
    return value


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise Invalid(f"expected one of {', '.join(repr(o) for o in options)}, got {value!r}")
        return value
    return check


def string_list(item: Check) -> Check:
    def check(value: Any) -> Tuple[Any, ...]:
        if not isinstance(value, list):
            raise Invalid(f"expected an array, got {_type_name(value)} {value!r}")
        return tuple(item(v) for v in value)
    return check


def text(pattern: str = r".+", what: str = "a non-empty string") -> Check:
    compiled = re.compile(pattern)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise Invalid(f"expected {what}, got {value!r}")
        return value
    return check


def optional(inner: Check) -> Check:
    """TOML has no null: an optional value is simply left out; "" also means unset."""
    def check(value: Any) -> Any:
        if value == "":
            return None
        return inner(value)
    return check


def cidr(value: Any) -> str:
    import ipaddress  # ~1 MB of RSS, paid only by policies that name addresses

    if not isinstance(value, str):
        raise Invalid(f"expected an address or CIDR such as \"10.0.0.0/8\", got {_type_name(value)} {value!r}")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise Invalid(f"expected an address or CIDR such as \"10.0.0.0/8\" or \"fd00::/8\", got {value!r}") from None


def path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise Invalid(f"expected an absolute path, got {value!r}")
    return value


def optional_path(value: Any) -> str:
    """An absolute path, or "" for off."""
    return "" if value == "" else path(value)


def listen_address(value: Any) -> str:
    """"" (no port), or "host:port" with an IPv4/IPv6 literal host and a port 1-65535."""
    if value == "":
        return ""
    if not isinstance(value, str):
        raise Invalid(f'expected "host:port" or "", got {_type_name(value)}')
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    import ipaddress
    try:
        ipaddress.ip_address(host)
        number_ok = sep and port.isdigit() and 1 <= int(port) <= 65535
    except ValueError:
        number_ok = False
    if not number_ok:
        raise Invalid(f'expected "host:port" with an IP address, e.g. "127.0.0.1:9469", got {value!r}')
    return value


NETNS_NAME = text(r"[A-Za-z0-9_.\-]{1,64}", "a network namespace name from /run/netns")
RULE_NAME = text(r"[A-Za-z0-9_.\-]{1,64}", "a rule name of letters, digits, '-', '_' or '.'")

# --------------------------------------------------------------------------- schema

# Timeouts the policy may shorten, with the floor below which a policy is rejected.
# Floors keep a typo ("1s" for established TCP) from tearing down live connections:
# each is at least the longest interval a healthy peer may stay silent in that state.
TIMEOUT_FLOORS: Dict[str, float] = {
    "tcp_timeout_established": 300.0,   # keepalive probes are commonly 75s-2h apart
    "tcp_timeout_syn_sent": 10.0,       # SYN retransmits: 1s, 3s, 7s
    "tcp_timeout_syn_recv": 10.0,
    "tcp_timeout_fin_wait": 10.0,
    "tcp_timeout_close_wait": 10.0,
    "tcp_timeout_last_ack": 10.0,
    "tcp_timeout_time_wait": 5.0,       # only absorbs stray segments after close
    "tcp_timeout_close": 1.0,
    "tcp_timeout_unacknowledged": 30.0,
    "tcp_timeout_max_retrans": 30.0,
    "udp_timeout": 5.0,                 # unreplied or one-off datagrams
    "udp_timeout_stream": 30.0,         # DNS over UDP retries within 5s; streams re-arm
    "icmp_timeout": 5.0,
    "icmpv6_timeout": 5.0,
    "generic_timeout": 60.0,
}

# The names conntrack-tools prints, as the eviction engine matches them.
TCP_STATES = tuple(s for s in ctnetlink.TCP_STATES if s != "NONE")
PROTOCOLS = tuple(sorted(set(ctnetlink.PROTO_NAMES.values())))
DROP_COUNTERS = ("drop", "early_drop", "insert_failed")


@dataclass(frozen=True)
class AgentSettings:
    interval: float = 1.0
    fast_interval: float = 0.05
    storm_rate: int = 100_000
    fast_usage: float = 0.5
    fast_time_to_full: float = 60.0
    fill_rate_window: float = 0.5
    dry_run: bool = False
    max_actions_per_tick: int = 2
    namespaces: Tuple[str, ...] = ()
    state_file: str = "/var/lib/conntrack-agent/state.json"
    on_external_change: str = "back_off"
    log_format: str = "auto"


@dataclass(frozen=True)
class Limits:
    memory_share: float = 0.05
    entry_bytes: int = 0
    entry_overhead_bytes: int = DEFAULT_OVERHEAD_BYTES
    max_ceiling: int = 4_194_304


@dataclass(frozen=True)
class Metrics:
    # node-exporter's textfile directory on Debian; "" turns the textfile off.
    textfile: str = "/var/lib/prometheus/node-exporter/conntrack_agent.prom"
    # "host:port" for an HTTP /metrics endpoint; "" (the default) opens no port.
    listen: str = ""


@dataclass(frozen=True)
class Trigger:
    match: str = "any"
    usage_at_least: Optional[float] = None
    sustained: float = 0.0
    sustained_samples: int = 1
    time_to_full_below: Optional[float] = None
    time_to_full_min_usage: float = 0.25
    counters_increasing: Tuple[str, ...] = ()

    def conditions(self) -> List[str]:
        names = []
        if self.usage_at_least is not None:
            names.append("usage")
        if self.time_to_full_below is not None:
            names.append("time_to_full")
        if self.counters_increasing:
            names.append("counters")
        return names


@dataclass(frozen=True)
class RaiseMax:
    factor: float = 2.0
    step: int = 0
    # At least enough room for this long at the current fill rate: a storm adding
    # more entries a second than the table holds outruns any fixed factor.
    headroom: float = 10.0
    buckets_ratio: float = 1.0
    buckets_cooldown: float = 60.0
    raise_only: bool = True
    # Only with raise_only = false: max returns to its original after this calm.
    restore_after: float = 3600.0
    restore_below: float = 0.5


@dataclass(frozen=True)
class SetTimeouts:
    values: Tuple[Tuple[str, float], ...] = ()
    restore_after: float = 300.0
    restore_below: float = 0.6


# The `[rule.evict]` table is the eviction engine's own spec: one definition of the
# selectors and budgets, validated by the engine when the policy is read.
Evict = EvictSpec


ACTIONS = ("raise_max", "set_timeouts", "evict")


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    enabled: bool = True
    dry_run: bool = False
    cooldown: float = 5.0
    trigger: Trigger = field(default_factory=Trigger)
    raise_max: RaiseMax = field(default_factory=RaiseMax)
    set_timeouts: SetTimeouts = field(default_factory=SetTimeouts)
    evict: Evict = field(default_factory=Evict)


@dataclass(frozen=True)
class Policy:
    agent: AgentSettings = field(default_factory=AgentSettings)
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    rules: Tuple[Rule, ...] = ()
    sources: Tuple[str, ...] = ()

    def active_rules(self) -> Tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.enabled)


# Built-in rules; config/policy.toml spells out exactly these (a test keeps them equal).
DEFAULT_RULES: Tuple[Rule, ...] = (
    Rule(
        name="grow-table",
        action="raise_max",
        cooldown=0.5,
        trigger=Trigger(
            match="any",
            usage_at_least=0.75,
            time_to_full_below=10.0,
            time_to_full_min_usage=0.25,
            counters_increasing=("drop", "early_drop"),
        ),
        raise_max=RaiseMax(factor=2.0, headroom=10.0, buckets_ratio=1.0, buckets_cooldown=60.0),
    ),
    Rule(
        name="shorten-timeouts",
        action="set_timeouts",
        cooldown=30.0,
        trigger=Trigger(match="any", usage_at_least=0.9, sustained=5.0, counters_increasing=("drop",)),
        set_timeouts=SetTimeouts(
            values=(  # sorted by name, as merged policies hold them
                ("tcp_timeout_close_wait", 30.0),
                ("tcp_timeout_established", 3600.0),
                ("tcp_timeout_fin_wait", 30.0),
                ("tcp_timeout_time_wait", 30.0),
                ("udp_timeout", 10.0),
                ("udp_timeout_stream", 60.0),
            ),
            restore_after=600.0,
            restore_below=0.6,
        ),
    ),
    Rule(
        name="evict-stale",
        action="evict",
        enabled=False,
        cooldown=30.0,
        trigger=Trigger(match="any", usage_at_least=0.95, counters_increasing=("drop",)),
        evict=Evict(mode="delete", status="unreplied", budget_entries=50_000, budget_time=0.5, target_usage=0.85),
    ),
)


# Per table: key -> check. The key names are the TOML names and the dataclass fields.
_SCHEMA: Dict[str, Dict[str, Check]] = {
    "agent": {
        "interval": duration(0.01, 60.0),
        "fast_interval": duration(0.01, 60.0),
        "storm_rate": number(100, 100_000_000, integer=True),
        "fast_usage": ratio,
        "fast_time_to_full": duration(0.0, 86400.0),
        "fill_rate_window": duration(0.01, 600.0),
        "dry_run": boolean,
        "max_actions_per_tick": number(1, 16, integer=True),
        "namespaces": string_list(NETNS_NAME),
        "state_file": path,
        "on_external_change": choice("back_off", "reassert"),
        "log_format": choice("auto", "console", "json", "journal"),
    },
    "limits": {
        "memory_share": number(0.001, 0.5),
        "entry_bytes": number(0, 65536, integer=True),
        "entry_overhead_bytes": number(0, 65536, integer=True),
        "max_ceiling": number(1024, 1 << 30, integer=True),
    },
    "metrics": {
        "textfile": optional_path,
        "listen": listen_address,
    },
    "trigger": {
        "match": choice("any", "all"),
        "usage_at_least": ratio,
        "sustained": duration(0.0, 86400.0),
        "sustained_samples": number(1, 10000, integer=True),
        "time_to_full_below": duration(0.01, 86400.0),
        "time_to_full_min_usage": ratio,
        "counters_increasing": string_list(choice(*DROP_COUNTERS)),
    },
    "raise_max": {
        "factor": number(1.0, 16.0),
        "step": number(0, 1 << 26, integer=True),
        "headroom": duration(0.0, 3600.0),
        "buckets_ratio": number(0.25, 64.0),
        "buckets_cooldown": duration(0.0, 86400.0),
        "raise_only": boolean,
        "restore_after": duration(0.0, 30 * 86400.0),
        "restore_below": ratio,
    },
    "set_timeouts": {
        "restore_after": duration(0.0, 7 * 86400.0),
        "restore_below": ratio,
        # "values" is a table of timeout names, checked separately.
    },
    "evict": {
        "mode": choice("delete", "age"),
        "age_timeout": duration(1.0, 86400.0),
        "protocols": string_list(choice(*PROTOCOLS)),
        "tcp_states": string_list(choice(*TCP_STATES)),
        "status": choice("any", "unreplied", "not_assured", "assured"),
        "mark": number(0, 0xFFFFFFFF, integer=True),
        "mark_mask": number(0, 0xFFFFFFFF, integer=True),
        "zone": number(0, 0xFFFF, integer=True),
        "src": optional(cidr),
        "dst": optional(cidr),
        "sport": number(1, 65535, integer=True),
        "dport": number(1, 65535, integer=True),
        "timeout_below": duration(1.0, 30 * 86400.0),
        "include_established": boolean,
        "budget_entries": number(0, 10_000_000, integer=True),
        "budget_time": duration(0.0, 60.0),
        "target_usage": ratio,
    },
}
_RULE_KEYS: Dict[str, Check] = {
    "name": RULE_NAME,
    "action": choice(*ACTIONS),
    "enabled": boolean,
    "dry_run": boolean,
    "cooldown": duration(0.0, 86400.0),
}
_RULE_TABLES = ("trigger", "raise_max", "set_timeouts", "evict")


# --------------------------------------------------------------------------- one file


class _Layer:
    """One file's validated values, with where each came from."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self.problems: List[Problem] = []
        self.values: Dict[str, Dict[str, Any]] = {}
        self.rules: List[Dict[str, Any]] = []
        try:
            raw = tomlfile.parse(data)
        except tomlfile.TomlSyntaxError as exc:
            self.problems.append(Problem(name, exc.line, "", f"TOML syntax error: {exc}"))
            return
        self._lines = tomlfile.key_lines(data)
        self._read(raw)

    def _problem(self, path: Tuple[Any, ...], message: str, display: Optional[str] = None) -> None:
        line = None
        for cut in range(len(path), 0, -1):
            line = self._lines.get(tuple(path[:cut]))
            if line is not None:
                break
        self.problems.append(Problem(self.name, line, display or _display(path), message))

    def _table(self, path: Tuple[Any, ...], raw: Any, schema: Dict[str, Check],
               display_prefix: str) -> Dict[str, Tuple[Any, Optional[int], str]]:
        out: Dict[str, Tuple[Any, Optional[int], str]] = {}
        if not isinstance(raw, dict):
            self._problem(path, f"expected a table, got {_type_name(raw)}", display_prefix)
            return out
        for key, value in raw.items():
            display = f"{display_prefix}.{key}"
            if key not in schema:
                self._problem(path + (key,), f"unknown key (known: {', '.join(sorted(schema))})", display)
                continue
            try:
                out[key] = (schema[key](value), self._lines.get(path + (key,)), display)
            except Invalid as exc:
                self._problem(path + (key,), str(exc), display)
        return out

    def _read(self, raw: Dict[str, Any]) -> None:
        for top, value in raw.items():
            if top in ("agent", "limits", "metrics"):
                self.values[top] = self._table((top,), value, _SCHEMA[top], top)
            elif top == "rule":
                if not isinstance(value, list):
                    self._problem(("rule",), "expected [[rule]] tables (an array of tables)", "rule")
                    continue
                for index, entry in enumerate(value):
                    self._read_rule(index, entry)
            else:
                self._problem((top,), "unknown table or key (known: agent, limits, metrics, rule)", top)

    def _read_rule(self, index: int, raw: Any) -> None:
        base = ("rule", index)
        if not isinstance(raw, dict):
            self._problem(base, "expected a table", f"rule[{index}]")
            return
        name = raw.get("name")
        label = f"rule[{name}]" if isinstance(name, str) else f"rule[{index}]"
        if "name" not in raw:
            self._problem(base, 'missing key "name": every rule needs a name (drop-ins match rules by it)', label)
            return
        rule: Dict[str, Any] = {"_line": self._lines.get(base), "_label": label}
        rule.update(self._table(base, {k: v for k, v in raw.items() if k not in _RULE_TABLES},
                                _RULE_KEYS, label))
        for table in _RULE_TABLES:
            if table not in raw:
                continue
            sub = raw[table]
            if table == "set_timeouts" and isinstance(sub, dict) and "values" in sub:
                sub = dict(sub)
                rule["timeout_values"] = self._timeout_values(base + ("set_timeouts", "values"),
                                                              sub.pop("values"), f"{label}.set_timeouts.values")
            rule[table] = self._table(base + (table,), sub, _SCHEMA[table], f"{label}.{table}")
        self.rules.append(rule)

    def _timeout_values(self, path: Tuple[Any, ...], raw: Any, display: str):
        out: Dict[str, Tuple[float, Optional[int], str]] = {}
        if not isinstance(raw, dict):
            self._problem(path, f"expected a table of timeout names, got {_type_name(raw)}", display)
            return out
        check = duration(0.0, 30 * 86400.0)
        for key, value in raw.items():
            key_display = f"{display}.{key}"
            name = key[len("nf_conntrack_"):] if key.startswith("nf_conntrack_") else key
            if name not in TIMEOUT_FLOORS:
                self._problem(path + (key,), f"unknown timeout (known: {', '.join(TIMEOUT_FLOORS)})", key_display)
                continue
            try:
                seconds = check(value)
            except Invalid as exc:
                self._problem(path + (key,), str(exc), key_display)
                continue
            floor = TIMEOUT_FLOORS[name]
            if seconds < floor:
                self._problem(path + (key,), f"{value!r} is below the floor of {format_duration(floor)} for "
                              f"nf_conntrack_{name}: so short a timeout would cut live connections", key_display)
                continue
            out[name] = (seconds, self._lines.get(path + (key,)), key_display)
        return out


def _display(path: Tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- merging


def _merge(layers: Sequence[_Layer]) -> Policy:
    problems: List[Problem] = []
    tables: Dict[str, Any] = {"agent": AgentSettings(), "limits": Limits(), "metrics": Metrics()}
    where: Dict[str, Tuple[str, Optional[int], str]] = {}
    for layer in layers:
        for table, values in layer.values.items():
            for key, (value, line, display) in values.items():
                where[f"{table}.{key}"] = (layer.name, line, display)
                tables[table] = replace(tables[table], **{key: value})
    agent, limits = tables["agent"], tables["limits"]

    rules: Dict[str, Rule] = {r.name: r for r in DEFAULT_RULES}
    order: List[str] = [r.name for r in DEFAULT_RULES]
    for layer in layers:
        for raw in layer.rules:
            name = raw.get("name", (None,))[0]
            if name is None:
                continue
            current = rules.get(name)
            if current is None:
                if "action" not in raw:
                    problems.append(Problem(layer.name, raw["_line"], raw["_label"],
                                            f'missing key "action": a new rule needs one of {", ".join(ACTIONS)}'))
                    continue
                current = Rule(name=name, action=raw["action"][0])
                order.append(name)
            updates = {k: v[0] for k, v in raw.items() if k in _RULE_KEYS and k != "name"}
            for table in _RULE_TABLES:
                if table in raw:
                    sub = {k: v[0] for k, v in raw[table].items()}
                    try:
                        updates[table] = replace(getattr(current, table), **sub)
                    except ValueError as exc:  # the eviction engine's own checks on the whole table
                        problems.append(_engine_problem(exc, layer.name, raw, table))
                        updates[table] = getattr(current, table)
            if "timeout_values" in raw:
                merged = dict(current.set_timeouts.values)
                merged.update({k: v[0] for k, v in raw["timeout_values"].items()})
                base = updates.get("set_timeouts", current.set_timeouts)
                updates["set_timeouts"] = replace(base, values=tuple(sorted(merged.items())))
            rule = replace(current, **updates)
            rules[name] = rule
            problems.extend(_check_rule(rule, layer.name, raw))

    policy = Policy(agent=agent, limits=limits, metrics=tables["metrics"], rules=tuple(rules[n] for n in order),
                    sources=tuple(layer.name for layer in layers))
    problems.extend(_check_policy(policy, where))
    if problems:
        raise PolicyError(problems)
    return policy


def _check_rule(rule: Rule, file: str, raw: Dict[str, Any]) -> List[Problem]:
    """Cross-field checks of one rule, reported against the layer that touched it."""
    out: List[Problem] = []

    def problem(key: str, message: str, table: Optional[str] = None) -> None:
        line = raw["_line"]
        if table and table in raw and key in raw[table]:
            line = raw[table][key][1]
        elif key in raw and isinstance(raw[key], tuple):
            line = raw[key][1]
        shown = f"{raw['_label']}.{table}.{key}" if table else f"{raw['_label']}.{key}"
        out.append(Problem(file, line, shown, message))

    # Disabled rules are checked too: enabling one later must not reveal old mistakes.
    if not rule.trigger.conditions():
        problem("trigger", "a rule needs at least one trigger: usage_at_least, time_to_full_below "
                "or counters_increasing")
    if rule.action == "raise_max":
        if rule.raise_max.factor <= 1.0 and rule.raise_max.step == 0:
            problem("factor", "raise_max needs factor > 1 or step > 0, else it never grows", "raise_max")
    if rule.action == "set_timeouts":
        if not rule.set_timeouts.values:
            problem("values", "set_timeouts needs at least one timeout in [rule.set_timeouts.values]",
                    "set_timeouts")
        usage = rule.trigger.usage_at_least
        if usage is not None and rule.set_timeouts.restore_below >= usage:
            problem("restore_below", f"must be below the trigger's usage_at_least ({usage:g}), "
                    "or the timeouts would be restored while the rule still fires", "set_timeouts")
    if rule.action == "evict":
        ev = rule.evict
        if ev.include_established and not ev.protocols and not ev.tcp_states and ev.status == "any" \
                and ev.mark is None and ev.src is None and ev.dst is None and ev.sport is None \
                and ev.dport is None and ev.timeout_below is None:
            problem("include_established", "selects every entry, live connections included: "
                    "narrow it with a selector", "evict")
        usage = rule.trigger.usage_at_least
        if ev.target_usage is not None and usage is not None and ev.target_usage >= usage:
            problem("target_usage", f"must be below the trigger's usage_at_least ({usage:g})", "evict")
    return out


def _engine_problem(exc: ValueError, file: str, raw: Dict[str, Any], table: str) -> Problem:
    """An EvictSpec error ("evict.src/dst: why") placed at its key's line."""
    head, _, why = str(exc).partition(": ")
    key = head.replace("evict.", "").split("/")[0].split(" ")[0]
    entry = raw[table].get(key)
    line = entry[1] if entry else raw["_line"]
    return Problem(file, line, f"{raw['_label']}.{table}.{key}", why or str(exc))


def _check_policy(policy: Policy, where: Dict[str, Tuple[str, Optional[int], str]]) -> List[Problem]:
    out: List[Problem] = []
    agent = policy.agent
    if agent.fast_interval > agent.interval:
        file, line, display = where.get("agent.fast_interval", where.get("agent.interval", ("<built-in>", None, "")))
        out.append(Problem(file, line, "agent.fast_interval",
                           f"the fast tick ({format_duration(agent.fast_interval)}) must not be slower than "
                           f"the calm tick ({format_duration(agent.interval)})"))
    if len(set(agent.namespaces)) != len(agent.namespaces):
        file, line, _ = where["agent.namespaces"]
        out.append(Problem(file, line, "agent.namespaces", "lists a namespace twice"))
    return out


# --------------------------------------------------------------------------- loading


PathLike = Union[str, "os.PathLike[str]"]


def policy_files(config: Optional[PathLike] = None, etc_dir: PathLike = ETC_DIR,
                 vendor_dir: PathLike = VENDOR_DIR) -> List[str]:
    """The files that make up the policy, lowest priority first."""
    if config is not None:
        main: Optional[str] = os.fspath(config)
        dropin_dirs = [os.path.join(os.path.dirname(main), DROPIN_DIR)]
    else:
        candidates = (os.path.join(os.fspath(d), MAIN_NAME) for d in (etc_dir, vendor_dir))
        main = next((c for c in candidates if os.path.exists(c)), None)
        dropin_dirs = [os.path.join(os.fspath(d), DROPIN_DIR) for d in (vendor_dir, etc_dir)]
    dropins: Dict[str, str] = {}
    for directory in dropin_dirs:
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if name.endswith(".toml"):
                    dropins[name] = os.path.join(directory, name)  # later directories mask earlier ones
    return ([main] if main is not None else []) + [dropins[name] for name in sorted(dropins)]


def load(config: Optional[PathLike] = None, etc_dir: PathLike = ETC_DIR,
         vendor_dir: PathLike = VENDOR_DIR) -> Policy:
    """Read and validate the whole policy. Raises PolicyError; never returns half a policy."""
    if config is not None and (not os.path.exists(config) or os.path.isdir(config)):
        raise PolicyError([Problem(os.fspath(config), None, "", "no such policy file")])
    layers = []
    problems: List[Problem] = []
    for file in policy_files(config, etc_dir, vendor_dir):
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as exc:
            problems.append(Problem(file, None, "", f"cannot read: {exc.strerror}"))
            continue
        layer = _Layer(file, data)
        problems.extend(layer.problems)
        layers.append(layer)
    if problems:
        raise PolicyError(problems)
    return _merge(layers)


def loads(data: bytes, name: str = "<policy>") -> Policy:
    """Validate one document on its own (tests, `check -`)."""
    layer = _Layer(name, data)
    if layer.problems:
        raise PolicyError(layer.problems)
    return _merge([layer])


def describe(policy: Policy) -> List[str]:
    """A short human summary of the effective rules, for `check` and the start-up log."""
    lines = []
    for rule in policy.rules:
        state = "on" if rule.enabled else "off"
        if rule.enabled and (rule.dry_run or policy.agent.dry_run):
            state = "dry-run"
        lines.append(f"{rule.name}: {rule.action} [{state}] when {_describe_trigger(rule.trigger)}, "
                     f"cooldown {format_duration(rule.cooldown)}")
    return lines


def _describe_trigger(trigger: Trigger) -> str:
    parts = []
    if trigger.usage_at_least is not None:
        held = ""
        if trigger.sustained:
            held = f" for {format_duration(trigger.sustained)}"
        elif trigger.sustained_samples > 1:
            held = f" for {trigger.sustained_samples} samples"
        parts.append(f"usage >= {trigger.usage_at_least:.0%}{held}")
    if trigger.time_to_full_below is not None:
        parts.append(f"time-to-full < {format_duration(trigger.time_to_full_below)} "
                     f"(usage >= {trigger.time_to_full_min_usage:.0%})")
    if trigger.counters_increasing:
        parts.append(f"{'/'.join(trigger.counters_increasing)} increasing")
    return (" or " if trigger.match == "any" else " and ").join(parts)

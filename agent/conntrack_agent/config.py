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
empty file therefore means the built-in defaults. Within one file a rule is named
once, and a later file changes a rule's action only with that action's table.

Every file must be a regular file of at most 1 MiB (read_policy_file), TOML within
tomlfile's limits. Every key is checked: unknown keys (typos), wrong types and
out-of-range values are errors naming the file, the line, the key path and the
expected and actual value; then the checks across keys (_check_rule,
_check_policy). Nothing partial is ever returned: a policy is whole or it is a
PolicyError, and loading raises nothing else.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import tomlfile
from .checks import read_at_most
from .checks import (  # noqa: F401 (the value kinds are part of this module's API)
    Check,
    Invalid,
    boolean,
    choice,
    cidr,
    duration,
    format_duration,
    number,
    optional,
    parse_duration,
    ratio,
    shown,
    string_list,
    text,
    type_name,
)
from .evictspec import PROTOCOLS  # noqa: F401 (re-exported: the policy's protocol names)
from .evictspec import KERNEL_TCP_TIMEOUT_ESTABLISHED, SELECTABLE_TCP_STATES, EvictSpec, narrowing
from .evictspec import SCHEMA as EVICT_SCHEMA
from .model import DEFAULT_OVERHEAD_BYTES

# Paths are strings: pathlib pulls in urllib.parse and ipaddress (~2 MB of RSS).
ETC_DIR = "/etc/conntrack-agent"
VENDOR_DIR = "/usr/lib/conntrack-agent"
MAIN_NAME = "policy.toml"
DROPIN_DIR = "policy.d"

# A file beyond this size is refused, and reading stops one byte past it.
MAX_FILE_BYTES = tomlfile.MAX_BYTES
# One file with a thousand mistakes is reported by its first ones, not a screenful each.
MAX_PROBLEMS_PER_FILE = 50
PATH_MAX = 4096  # bytes, the terminating NUL included (linux/limits.h)


# --------------------------------------------------------------------------- errors


def printable(text: str, limit: int = PATH_MAX) -> str:
    """Text fit for a terminal line: control characters (a quoted TOML key may hold
    an escape sequence) and undecodable file-name bytes escaped, length bounded."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return cut + ("..." if len(text) > limit else "")


@dataclass(frozen=True)
class Problem:
    file: str
    line: Optional[int]
    key: str
    message: str

    def __str__(self) -> str:
        file = printable(self.file)
        where = file if self.line is None else f"{file}:{self.line}"
        key = f" {printable(self.key, 120)}:" if self.key else ""
        return f"{where}:{key} {printable(self.message, 1000)}"


class PolicyError(Exception):
    """One or more problems; str() lists every one, one per line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- names and paths

_NETNS_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def valid_netns_name(name: Any) -> bool:
    """A name of an entry in /run/netns: never a path, never "." or ".."."""
    return isinstance(name, str) and _NETNS_NAME.fullmatch(name) is not None and name not in (".", "..")


_NETNS_PATTERN = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]{1,64}")


def valid_netns_pattern(pattern: Any) -> bool:
    """An agent.namespaces entry: a /run/netns name, a glob over those names
    ("cni-*"), "host" (the agent's own namespace) or "*" (every namespace on the
    node, named or not). Never a path, never "." or ".."."""
    return (isinstance(pattern, str) and _NETNS_PATTERN.fullmatch(pattern) is not None
            and pattern not in (".", "..") and pattern.count("[") == pattern.count("]"))


def NETNS_PATTERN(value: Any) -> str:  # noqa: N802 (a check, named like the other constants of the schema)
    if not valid_netns_pattern(value):
        raise Invalid(f"expected a namespace name from /run/netns, a glob over them (\"cni-*\"), \"host\" or "
                      f"\"*\" (letters, digits, '-', '_', '.', '*', '?', '[', ']', '!', at most 64; not a path, "
                      f"not '.' or '..'), got {shown(value)}")
    return value


def NETNS_NAME(value: Any) -> str:  # noqa: N802 (a check, named like the other constants of the schema)
    if not valid_netns_name(value):
        raise Invalid(f"expected a network namespace name from /run/netns (letters, digits, '-', '_', "
                      f"'.', at most 64, not '.' or '..'), got {shown(value)}")
    return value


_RULE_NAME_TEXT = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
RULE_NAME = text(_RULE_NAME_TEXT.pattern, "a rule name of letters, digits, '-', '_' or '.' (at most 64)")

# Kernel file systems: a state file there is no storage, and the journal's atomic
# rename over e.g. /dev/null would replace the device node.
_PSEUDO_FS = ("/proc", "/sys", "/dev")


def state_path(value: Any) -> str:
    """The state file: an absolute path naming a file on real storage."""
    if not isinstance(value, str):
        raise Invalid(f"expected an absolute path, got {type_name(value)} {shown(value)}")
    if "\0" in value:
        raise Invalid(f"contains a NUL character: {shown(value)}")
    if len(value.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise Invalid(f"longer than PATH_MAX ({PATH_MAX - 1} bytes)")
    if not value.startswith("/"):
        raise Invalid(f"expected an absolute path, got {shown(value)}")
    if value.endswith("/") or os.path.basename(value) in (".", ".."):
        raise Invalid(f"names a directory; expected the path of a file, such as "
                      f"/var/lib/conntrack-agent/state.json, got {shown(value)}")
    normal = "/" + os.path.normpath(value).lstrip("/")
    for top in _PSEUDO_FS:
        if normal == top or normal.startswith(top + "/"):
            raise Invalid(f"is under {top}, a kernel file system, not storage: got {shown(value)}")
    return value


def optional_path(value: Any) -> str:
    """An absolute path, or "" for off."""
    return "" if value == "" else state_path(value)


def listen_address(value: Any) -> str:
    """"" (no port), or "host:port" with an IPv4/IPv6 literal host and a port 1-65535."""
    if value == "":
        return ""
    if not isinstance(value, str):
        raise Invalid(f'expected "host:port" or "", got {type_name(value)}')
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    import ipaddress
    try:
        ipaddress.ip_address(host)
        number_ok = sep and port.isdigit() and 1 <= int(port) <= 65535
    except ValueError:
        number_ok = False
    if not number_ok:
        raise Invalid(f'expected "host:port" with an IP address, e.g. "127.0.0.1:9469", got {shown(value)}')
    return value


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

# The names conntrack-tools prints, as the eviction engine matches them (evictspec.py).
TCP_STATES = SELECTABLE_TCP_STATES
# The kernel's per-CPU counters a trigger may watch: drop (a packet dropped, the
# table full), early_drop (an unreplied entry evicted for room), insert_failed and
# clash_resolve (insertion races, not fullness), chaintoolong (an insert refused
# for a too long hash chain: more buckets are needed; Linux 5.15+).
DROP_COUNTERS = ("drop", "early_drop", "insert_failed", "clash_resolve", "chaintoolong")


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
    # At most this many namespaces are watched (one kept-open socket and file each);
    # more matching ones are logged once and left out.
    max_namespaces: int = 256
    state_file: str = "/var/lib/conntrack-agent/state.json"
    on_external_change: str = "back_off"
    log_format: str = "auto"
    # Reload when the policy files change (a Kubernetes ConfigMap's update), as SIGHUP does.
    watch_policy: bool = False


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
class Baseline:
    """Values the node should have from the start (the admin's, not the agent's: never
    recorded, never restored). 0 leaves a value alone; max and buckets only go up."""

    nf_conntrack_max: int = 0
    nf_conntrack_buckets: int = 0
    timeouts: Tuple[Tuple[str, float], ...] = ()
    # Read the net.netfilter.nf_conntrack_* lines of sysctl.d as the baseline (the
    # values above win): what systemd-sysctl could not apply before the module loaded.
    from_sysctl_d: bool = False

    @property
    def empty(self) -> bool:
        return not (self.nf_conntrack_max or self.nf_conntrack_buckets or self.timeouts or self.from_sysctl_d)


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


# The `[rule.evict]` table is the eviction engine's own spec, defined once with its
# selectors' names, ranges and help in evictspec.py (the CLI's options too).
Evict = EvictSpec


@dataclass(frozen=True)
class ResizeBuckets:
    # Buckets × factor on each action (never above the max's memory ceiling): the
    # kernel refuses inserts into a hash chain that is too long (chaintoolong,
    # Linux 5.15+), which more buckets shorten.
    factor: float = 2.0


ACTIONS = ("raise_max", "set_timeouts", "evict", "resize_buckets")

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
    resize_buckets: ResizeBuckets = field(default_factory=ResizeBuckets)


@dataclass(frozen=True)
class Policy:
    agent: AgentSettings = field(default_factory=AgentSettings)
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    baseline: Baseline = field(default_factory=Baseline)
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
    Rule(
        name="grow-buckets",
        action="resize_buckets",
        # A resize rehashes the whole table under the global conntrack lock: rarely.
        cooldown=60.0,
        trigger=Trigger(match="any", counters_increasing=("chaintoolong",)),
        resize_buckets=ResizeBuckets(factor=2.0),
    ),
)


# The memory ceiling is memory_share x MemTotal / (entry_bytes + entry_overhead_bytes
# + bucket bytes). Each term is bounded so no combination can size the table past
# a sane share of RAM (entry_bytes = 1, overhead 0 and a share of 0.5 once gave a
# ceiling 18 times the RAM):
# - entry_bytes: the nf_conntrack slab object is 256 bytes on x86_64 (measured in
#   /proc/slabinfo on 6.1-6.18), and its two tuple hashes (112 bytes), pointers,
#   status and TCP state put any 64-bit kernel's above 192: a smaller figure is a
#   mistake, not a measurement. A 32-bit kernel's may be smaller: 0 (read the
#   slab) measures it, and 192 errs on the safe side. A page (4096) covers debug
#   kernels whose objects carry red zones.
# - entry_overhead_bytes: extensions live in their own kmalloc allocation; the
#   smallest holding the header and one extension (NAT, acct) is 64 bytes, and
#   counting less than that undercounts any table with one extension enabled.
# - memory_share: conntrack memory is unswappable kernel memory; beyond a quarter
#   of RAM the node runs out of memory for its workload before the table fills.
MIN_ENTRY_BYTES = 192
MIN_OVERHEAD_BYTES = 64
MAX_MEMORY_SHARE = 0.25
# A trigger at usage 0 holds on every tick, an empty table included.
MIN_USAGE_TRIGGER = 0.05

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
        "namespaces": string_list(NETNS_PATTERN),
        "max_namespaces": number(1, 4096, integer=True),
        "state_file": state_path,
        "on_external_change": choice("back_off", "reassert"),
        "log_format": choice("auto", "console", "json", "journal"),
        "watch_policy": boolean,
    },
    "limits": {
        "memory_share": number(0.001, MAX_MEMORY_SHARE),
        "entry_bytes": number(MIN_ENTRY_BYTES, 4096, integer=True, also=(0,)),
        "entry_overhead_bytes": number(MIN_OVERHEAD_BYTES, 4096, integer=True),
        "max_ceiling": number(1024, 1 << 30, integer=True),
    },
    "metrics": {
        "textfile": optional_path,
        "listen": listen_address,
    },
    "baseline": {
        "nf_conntrack_max": number(0, 1 << 30, integer=True),
        "nf_conntrack_buckets": number(0, 1 << 28, integer=True),
        "from_sysctl_d": boolean,
        # "timeouts" is a table of timeout names, checked like set_timeouts.values.
    },
    "trigger": {
        "match": choice("any", "all"),
        "usage_at_least": number(MIN_USAGE_TRIGGER, 1.0),
        "sustained": duration(0.0, 86400.0),
        "sustained_samples": number(1, 10000, integer=True),
        "time_to_full_below": duration(0.01, 86400.0),
        "time_to_full_min_usage": ratio,
        "counters_increasing": string_list(choice(*DROP_COUNTERS), most=len(DROP_COUNTERS)),
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
    # The selectors and budgets: evictspec.FIELDS, shared with the engine and the CLI.
    "evict": EVICT_SCHEMA,
    "resize_buckets": {
        "factor": number(1.1, 16.0),
    },
}
_RULE_KEYS: Dict[str, Check] = {
    "name": RULE_NAME,
    "action": choice(*ACTIONS),
    "enabled": boolean,
    "dry_run": boolean,
    "cooldown": duration(0.0, 86400.0),
}
_RULE_TABLES = ("trigger", "raise_max", "set_timeouts", "evict", "resize_buckets")


# --------------------------------------------------------------------------- one file


class _Layer:
    """One file's validated values, with where each came from."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self.problems: List[Problem] = []
        self.values: Dict[str, Dict[str, Any]] = {}
        self.rules: List[Dict[str, Any]] = []
        self.baseline_timeouts: Dict[str, Tuple[float, Optional[int], str]] = {}
        self._lines: Dict[Tuple[Any, ...], int] = {}
        self._rule_lines: Dict[str, Optional[int]] = {}  # rule name -> line, to refuse a second one
        self._unreported = 0
        try:
            raw, self._lines = tomlfile.parse_document(data)
        except tomlfile.TomlSyntaxError as exc:
            what = "refused" if exc.limit else "TOML syntax error"
            self.problems.append(Problem(name, exc.line, _display(exc.key), f"{what}: {exc}"))
            return
        self._read(raw)
        if self._unreported:
            self.problems.append(Problem(name, None, "", f"and {self._unreported} more problems in this file"))

    def _problem(self, path: Tuple[Any, ...], message: str, display: Optional[str] = None) -> None:
        if len(self.problems) >= MAX_PROBLEMS_PER_FILE:
            self._unreported += 1
            return
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
            self._problem(path, f"expected a table, got {type_name(raw)}", display_prefix)
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
            if top == "baseline" and isinstance(value, dict) and "timeouts" in value:
                value = dict(value)
                self.baseline_timeouts = self._timeout_values(("baseline", "timeouts"), value.pop("timeouts"),
                                                              "baseline.timeouts")
            if top in ("agent", "limits", "metrics", "baseline"):
                self.values[top] = self._table((top,), value, _SCHEMA[top], top)
            elif top == "rule":
                if not isinstance(value, list):
                    self._problem(("rule",), "expected [[rule]] tables (an array of tables)", "rule")
                    continue
                for index, entry in enumerate(value):
                    self._read_rule(index, entry)
            else:
                self._problem((top,), "unknown table or key (known: agent, limits, metrics, baseline, rule)", top)

    def _read_rule(self, index: int, raw: Any) -> None:
        base = ("rule", index)
        if not isinstance(raw, dict):
            self._problem(base, "expected a table", f"rule[{index}]")
            return
        name = raw.get("name")
        valid_name = isinstance(name, str) and _RULE_NAME_TEXT.fullmatch(name) is not None
        label = f"rule[{name}]" if valid_name else f"rule[{index}]"
        if "name" not in raw:
            self._problem(base, 'missing key "name": every rule needs a name (drop-ins match rules by it)', label)
            return
        if valid_name and name in self._rule_lines:
            first = self._rule_lines[name]
            self._problem(base + ("name",), f"a second rule named {name!r} in this file (the first is at line "
                          f"{first}): a file names each rule once; drop-ins, in other files, change a rule "
                          "by naming it", f"{label}.name")
            return
        if valid_name:
            self._rule_lines[name] = self._lines.get(base + ("name",), self._lines.get(base))
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
            self._problem(path, f"expected a table of timeout names, got {type_name(raw)}", display)
            return out
        check = duration(0.0, 30 * 86400.0)
        spelled: Dict[str, str] = {}  # timeout -> the key that set it
        for key, value in raw.items():
            key_display = f"{display}.{key}"
            name = key[len("nf_conntrack_"):] if key.startswith("nf_conntrack_") else key
            if name not in TIMEOUT_FLOORS:
                self._problem(path + (key,), f"unknown timeout (known: {', '.join(TIMEOUT_FLOORS)})", key_display)
                continue
            if name in spelled:
                # TOML refuses a key twice, but not the same sysctl under both spellings.
                self._problem(path + (key,), f"sets nf_conntrack_{name} a second time (also set as "
                              f"{spelled[name]!r}, line {self._lines.get(path + (spelled[name],))}); "
                              "one of them would be ignored", key_display)
                continue
            spelled[name] = key
            try:
                seconds = check(value)
            except Invalid as exc:
                self._problem(path + (key,), str(exc), key_display)
                continue
            floor = TIMEOUT_FLOORS[name]
            if seconds < floor:
                self._problem(path + (key,), f"{shown(value)} is below the floor of {format_duration(floor)} for "
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


_ACTION_TABLES = {"raise_max": RaiseMax, "set_timeouts": SetTimeouts, "evict": Evict,
                  "resize_buckets": ResizeBuckets}


def _merge(layers: Sequence[_Layer]) -> Policy:
    problems: List[Problem] = []
    tables: Dict[str, Any] = {"agent": AgentSettings(), "limits": Limits(), "metrics": Metrics(),
                              "baseline": Baseline()}
    where: Dict[str, Tuple[str, Optional[int], str]] = {}
    baseline_timeouts: Dict[str, float] = {}
    for layer in layers:
        for table, values in layer.values.items():
            for key, (value, line, display) in values.items():
                where[f"{table}.{key}"] = (layer.name, line, display)
                tables[table] = replace(tables[table], **{key: value})
        baseline_timeouts.update({k: v[0] for k, v in layer.baseline_timeouts.items()})
    tables["baseline"] = replace(tables["baseline"], timeouts=tuple(sorted(baseline_timeouts.items())))
    agent, limits = tables["agent"], tables["limits"]

    established = _established_timeout(layers)
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
            elif "action" in raw and raw["action"][0] != current.action:
                # A drop-in naming a shipped rule with another action would otherwise
                # act with whatever defaults that action has (a `grow-table` turned
                # into an eviction of every entry). The new action's table must come
                # with it, and it starts from the defaults, not from earlier files.
                action, line, display = raw["action"]
                if action not in raw:
                    problems.append(Problem(layer.name, line, display,
                                            f"changes rule {name!r} from {current.action} to {action}: give "
                                            f"[rule.{action}] in this entry too (its settings start from the "
                                            "defaults, not from earlier files)"))
                    continue
                current = replace(current, **{action: _ACTION_TABLES[action]()})
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
                merged = dict(updates.get("set_timeouts", current.set_timeouts).values)
                merged.update({k: v[0] for k, v in raw["timeout_values"].items()})
                base = updates.get("set_timeouts", current.set_timeouts)
                updates["set_timeouts"] = replace(base, values=tuple(sorted(merged.items())))
            rule = replace(current, **updates)
            rules[name] = rule
            problems.extend(_check_rule(rule, layer.name, raw, established))

    policy = Policy(agent=agent, limits=limits, metrics=tables["metrics"], baseline=tables["baseline"],
                    rules=tuple(rules[n] for n in order),
                    sources=tuple(layer.name for layer in layers))
    problems.extend(_check_policy(policy, where))
    if problems:
        raise PolicyError(problems)
    return policy


def established_timeout(policy: Policy) -> float:
    """The shortest nf_conntrack_tcp_timeout_established `policy` may set, or the
    kernel's default: a `timeout_below` under it spares some live connections."""
    values = [dict(r.set_timeouts.values).get("tcp_timeout_established") for r in policy.rules]
    return min([KERNEL_TCP_TIMEOUT_ESTABLISHED] + [v for v in values if v is not None])


def _established_timeout(layers: Sequence[_Layer]) -> float:
    """The shortest nf_conntrack_tcp_timeout_established this policy may leave in force.

    A live TCP connection's remaining timeout restarts at that value with each
    packet, so only a `timeout_below` under it spares some live connections.
    Every value any file gives counts, even one a later file overrides: the
    check errs towards refusing.
    """
    shortest = KERNEL_TCP_TIMEOUT_ESTABLISHED
    for rule in DEFAULT_RULES:
        shortest = min(shortest, dict(rule.set_timeouts.values).get("tcp_timeout_established", shortest))
    for layer in layers:
        for raw in layer.rules:
            value = raw.get("timeout_values", {}).get("tcp_timeout_established")
            if value is not None:
                shortest = min(shortest, value[0])
    return shortest


def _check_rule(rule: Rule, file: str, raw: Dict[str, Any], established: float) -> List[Problem]:
    """Cross-field checks of one rule, reported against the layer that touched it."""
    out: List[Problem] = []

    def problem(key: str, message: str, table: Optional[str] = None) -> None:
        line = raw["_line"]
        if table and table in raw and key in raw[table]:
            line = raw[table][key][1]
        elif key in raw and isinstance(raw[key], tuple):
            line = raw[key][1]
        display = f"{raw['_label']}.{table}.{key}" if table else f"{raw['_label']}.{key}"
        out.append(Problem(file, line, display, message))

    # Disabled rules are checked too: enabling one later must not reveal old mistakes.
    usage = rule.trigger.usage_at_least
    if not rule.trigger.conditions():
        problem("trigger", "a rule needs at least one trigger: usage_at_least, time_to_full_below "
                "or counters_increasing")
    if rule.action == "raise_max":
        if rule.raise_max.factor <= 1.0 and rule.raise_max.step == 0:
            problem("factor", "raise_max needs factor > 1 or step > 0, else it never grows", "raise_max")
        if not rule.raise_max.raise_only and usage is not None and rule.raise_max.restore_below >= usage:
            # Restored while the trigger still holds, max is raised again on the next
            # tick, restored again...: a simulation wrote it 27 times in 10 s.
            key = "restore_below" if "restore_below" in raw.get("raise_max", {}) else "raise_only"
            problem(key, f"with raise_only = false, restore_below ({rule.raise_max.restore_below:g}) must be "
                    f"below the trigger's usage_at_least ({usage:g}), or max would be restored while the "
                    "rule still fires, and raised again: it would flap", "raise_max")
    if rule.action == "set_timeouts":
        if not rule.set_timeouts.values:
            problem("values", "set_timeouts needs at least one timeout in [rule.set_timeouts.values]",
                    "set_timeouts")
        if usage is not None and rule.set_timeouts.restore_below >= usage:
            problem("restore_below", f"must be below the trigger's usage_at_least ({usage:g}), "
                    "or the timeouts would be restored while the rule still fires", "set_timeouts")
    if rule.action == "evict":
        ev = rule.evict
        if ev.include_established and not narrowing(ev, established, live_connections=True):
            problem("include_established", "selects every entry, live connections included: narrow it with a "
                    "selector that leaves some live TCP connections out: src or dst narrower than /0, sport, "
                    "dport, mark, zone, protocols without tcp, tcp_states without ESTABLISHED, status "
                    f"unreplied or not_assured, or timeout_below under {format_duration(established)} (the "
                    "shortest established-TCP timeout this policy may leave in force)", "evict")
        if "mark_mask" in raw.get("evict", {}) and ev.mark is None:
            problem("mark_mask", "a mask without a mark compares nothing: set mark too", "evict")
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

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> Optional[str]:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return f"is {kind}, not a regular file: policy files and drop-ins must be regular files"


def _cannot(exc: OSError) -> str:
    return f"cannot read: {exc.strerror or exc}"


def read_policy_file(file: str) -> bytes:
    """The bytes of one policy file. Raises Invalid saying why not.

    Symlinks are followed (an admin may link a drop-in), but what they lead to
    must be a regular file: it is checked before opening, so a device is never
    opened (opening some has effects), and again on the opened descriptor.
    O_NONBLOCK keeps the open of a FIFO swapped in meanwhile from waiting for a
    writer; reading stops one byte past the size limit.
    """
    try:
        info = os.stat(file)
    except OSError as exc:
        raise Invalid(_cannot(exc)) from None
    except ValueError:  # os functions refuse NUL in a path
        raise Invalid("cannot read: the path contains a NUL character") from None
    refused = _not_regular(info.st_mode)
    if refused:
        raise Invalid(refused)
    too_large = f"larger than {MAX_FILE_BYTES} bytes (1 MiB): not a policy file"
    if info.st_size > MAX_FILE_BYTES:
        raise Invalid(too_large)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise Invalid(_cannot(exc)) from None
    try:
        refused = _not_regular(os.fstat(fd).st_mode)
        if refused:
            raise Invalid(refused)
        data = read_at_most(fd, MAX_FILE_BYTES)
    except OSError as exc:
        raise Invalid(_cannot(exc)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise Invalid(too_large)
    return data


def _present(file: str) -> bool:
    """Whether a name exists, as the loader decides which main file to read. A
    dangling symlink or an entry the agent may not look at is present: reading it
    then says what is wrong, rather than silently falling back to another file."""
    try:
        os.lstat(file)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    except OSError:
        return True
    return True


def policy_files(config: Optional[PathLike] = None, etc_dir: PathLike = ETC_DIR,
                 vendor_dir: PathLike = VENDOR_DIR) -> List[str]:
    """The files that make up the policy, lowest priority first.

    Raises PolicyError when a drop-in directory exists but cannot be listed
    (the agent's user may not read it): a policy missing its drop-ins is not
    the admin's policy.
    """
    if config is not None:
        main: Optional[str] = os.fspath(config)
        dropin_dirs = [os.path.join(os.path.dirname(main), DROPIN_DIR)]
    else:
        candidates = (os.path.join(os.fspath(d), MAIN_NAME) for d in (etc_dir, vendor_dir))
        main = next((c for c in candidates if _present(c)), None)
        dropin_dirs = [os.path.join(os.fspath(d), DROPIN_DIR) for d in (vendor_dir, etc_dir)]
    dropins: Dict[str, str] = {}
    problems: List[Problem] = []
    for directory in dropin_dirs:
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue  # no drop-ins there
        except OSError as exc:
            problems.append(Problem(directory, None, "", f"cannot list the drop-ins: {exc.strerror or exc}"))
            continue
        for name in names:
            if name.endswith(".toml"):
                dropins[name] = os.path.join(directory, name)  # later directories mask earlier ones
    if problems:
        raise PolicyError(problems)
    return ([main] if main is not None else []) + [dropins[name] for name in sorted(dropins)]


def load(config: Optional[PathLike] = None, etc_dir: PathLike = ETC_DIR,
         vendor_dir: PathLike = VENDOR_DIR) -> Policy:
    """Read and validate the whole policy. Raises PolicyError, and nothing else;
    never returns half a policy."""
    if config is not None and not _present(os.fspath(config)):
        raise PolicyError([Problem(os.fspath(config), None, "", "no such policy file")])
    layers = []
    problems: List[Problem] = []
    for file in policy_files(config, etc_dir, vendor_dir):
        try:
            data = read_policy_file(file)
        except Invalid as exc:
            problems.append(Problem(file, None, "", str(exc)))
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

"""Prometheus metrics: the agent's view in the text exposition format.

By default the exposition goes to node-exporter's textfile directory
(/var/lib/prometheus/node-exporter on Debian), rewritten atomically at most once
a second and after every action: no port is opened and the unit keeps
IPAddressDeny=any. With `[metrics] listen` a loopback HTTP endpoint serves the
same text (metrics_http.py, imported only then).

The format is written by hand rather than with prometheus_client: the agent's
whole idle budget is ~25 MB of RSS, and importing prometheus_client costs ~3.3 MB
(http.server another ~2.7 MB), for a few dozen lines of text a second.

Counters (actions, evictions, external changes) are counted in one place,
`Counters.after`, from the executor's outcomes; the kernel's own counters
(drop, early_drop, ...) come from ctnetlink per namespace, so they exist where
/proc/net/stat is compiled out.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

DEFAULT_TEXTFILE = "/var/lib/prometheus/node-exporter/conntrack_agent.prom"
# The kernel's per-CPU counters exported as conntrack_agent_stat_<name>_total.
STAT_COUNTERS = ("drop", "early_drop", "insert_failed", "clash_resolve", "chaintoolong")

HELP = {
    "conntrack_agent_info": ("gauge", "The agent's version (always 1)."),
    "conntrack_agent_entries": ("gauge", "Conntrack entries in the namespace."),
    "conntrack_agent_entries_limit": ("gauge", "nf_conntrack_max now (global)."),
    "conntrack_agent_entries_limit_original": (
        "gauge", "nf_conntrack_max before the agent raised it; equal to the limit when the agent owns nothing."),
    "conntrack_agent_entries_ceiling": ("gauge", "The highest max the policy lets the agent set."),
    "conntrack_agent_buckets": ("gauge", "nf_conntrack_buckets now (global)."),
    "conntrack_agent_fill_rate": ("gauge", "Entries per second the namespace's table grows by (EWMA)."),
    "conntrack_agent_time_to_full_seconds": ("gauge", "Seconds until the namespace is full at its fill rate; "
                                                      "+Inf when not filling."),
    "conntrack_agent_pressure": ("gauge", "1 while the namespace is busy, filling fast or dropping."),
    "conntrack_agent_timeout_seconds": ("gauge", "A conntrack timeout the agent changed, as it is now."),
    "conntrack_agent_last_action_timestamp_seconds": ("gauge", "Unix time of the agent's last action; 0: none."),
    "conntrack_agent_stat_drop_total": ("counter", "Packets dropped because the table was full."),
    "conntrack_agent_stat_early_drop_total": ("counter", "Unreplied entries evicted to make room."),
    "conntrack_agent_stat_insert_failed_total": ("counter", "Entry insertions that lost a race."),
    "conntrack_agent_stat_clash_resolve_total": ("counter", "Insertion clashes the kernel resolved."),
    "conntrack_agent_stat_chaintoolong_total": ("counter", "Insertions refused for a too long hash chain."),
    "conntrack_agent_actions_total": ("counter", "Actions carried out, by rule, action and result."),
    "conntrack_agent_evicted_entries_total": ("counter", "Entries removed or aged by evict rules."),
    "conntrack_agent_external_changes_total": ("counter", "Values the agent owned that another writer changed."),
}


class Counters:
    """The agent's own counters, fed from the executor's outcomes."""

    def __init__(self) -> None:
        self.actions: Dict[Tuple[str, str, str], int] = {}
        self.evicted: Dict[str, int] = {}
        self.external: Dict[str, int] = {}

    def after(self, decision: Any, outcome: Any) -> None:
        """Every decision the executor carried out, with its outcome."""
        if not decision.is_action:
            return
        result = "dry_run" if decision.dry_run else ("failed" if outcome.failed else "ok")
        key = (decision.rule, decision.kind, result)
        self.actions[key] = self.actions.get(key, 0) + 1

    def event(self, kind: str, dry_run: bool, fields: Dict[str, Any]) -> None:
        """Every event the executor logged: external changes and eviction counts."""
        if dry_run:
            return
        if kind == "external_change":
            sysctl = fields.get("name") or "nf_conntrack_max"
            self.external[sysctl] = self.external.get(sysctl, 0) + 1
        elif kind == "evict":
            rule = fields.get("rule", "")
            self.evicted[rule] = self.evicted.get(rule, 0) + int(fields.get("done") or 0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if math.isnan(value):
            return "NaN"
        return repr(value)
    return str(int(value))


def render(families: Dict[str, List[Tuple[Dict[str, str], float]]]) -> str:
    """Families in HELP order, each with its HELP and TYPE lines."""
    out: List[str] = []
    for name, (kind, text) in HELP.items():
        series = families.get(name)
        if series is None:
            continue
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in series:
            out.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(out) + "\n"


def families_of(view: Dict[str, Any], counters: Counters) -> Dict[str, List[Tuple[Dict[str, str], float]]]:
    """The metric families from the agent's metrics view (Agent.metrics_view)."""
    f: Dict[str, List[Tuple[Dict[str, str], float]]] = {name: [] for name in HELP}
    f["conntrack_agent_info"].append(({"version": view["version"]}, 1))
    if view.get("max") is not None:
        f["conntrack_agent_entries_limit"].append(({}, view["max"]))
        f["conntrack_agent_entries_limit_original"].append(({}, view["max_original"]))
        f["conntrack_agent_entries_ceiling"].append(({}, view["ceiling"]))
        f["conntrack_agent_buckets"].append(({}, view["buckets"]))
    for ns in view.get("namespaces", ()):
        label = {"netns": ns["netns"]}
        f["conntrack_agent_entries"].append((label, ns["count"]))
        f["conntrack_agent_fill_rate"].append((label, float(ns["fill_rate"])))
        ttf = ns["time_to_full"]
        f["conntrack_agent_time_to_full_seconds"].append((label, math.inf if ttf is None else float(ttf)))
        f["conntrack_agent_pressure"].append((label, 1 if ns["pressure"] else 0))
        for stat in STAT_COUNTERS:
            if stat in ns["counters"]:
                f[f"conntrack_agent_stat_{stat}_total"].append((label, ns["counters"][stat]))
    for netns, name, seconds in view.get("timeouts", ()):
        f["conntrack_agent_timeout_seconds"].append(({"netns": netns, "name": name}, seconds))
    f["conntrack_agent_last_action_timestamp_seconds"].append(({}, float(view.get("last_action_at") or 0.0)))
    for (rule, action, result), n in sorted(counters.actions.items()):
        f["conntrack_agent_actions_total"].append(({"rule": rule, "action": action, "result": result}, n))
    for rule, n in sorted(counters.evicted.items()):
        f["conntrack_agent_evicted_entries_total"].append(({"rule": rule}, n))
    for sysctl, n in sorted(counters.external.items()):
        f["conntrack_agent_external_changes_total"].append(({"sysctl": sysctl}, n))
    return {k: v for k, v in f.items() if v or HELP[k][0] == "counter"}


def write_textfile(path: str, text: str) -> None:
    """Atomically replace `path`: node-exporter must never read half a file. The
    temporary name does not end in .prom, so the collector never picks it up."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def directory_ready(path: str) -> bool:
    return bool(path) and os.path.isdir(os.path.dirname(path) or ".")


def names(text: str) -> Iterable[str]:
    for line in text.splitlines():
        if line and not line.startswith("#"):
            yield line.split("{", 1)[0].split(" ", 1)[0]

"""The baseline: values a node should have from the moment nf_conntrack exists.

systemd-sysctl applies sysctl.d at boot, before anything loads nf_conntrack on a
stock Debian 12 node (it is a module there): the net.netfilter.nf_conntrack_*
lines are then silently lost (measured on a Debian 12 VM: after `modprobe
nf_conntrack` the max stayed 7680 and the established timeout 432000). The agent
applies the `[baseline]` table (or those sysctl.d lines, with `from_sysctl_d`)
at start, the moment the module loads, and in each watched namespace as it
appears.

Baseline values are the admin's configuration, not the agent's reaction: they
are not recorded in the state file and `restore` leaves them. The max and the
buckets only ever go up (never below a larger value someone set); timeouts are
set as given. A value the agent owns (it raised the max under pressure) is left
to the agent. Pure: the service reads and writes.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

from .config import Baseline

GLOBALS = ("nf_conntrack_max", "nf_conntrack_buckets")


class Write(NamedTuple):
    name: str       # sysctl, e.g. "nf_conntrack_max"
    value: int
    current: int
    source: str     # "policy" or "file:line" of the sysctl.d line


def wanted(spec: Baseline, from_files: Optional[Mapping[str, Tuple[int, str]]] = None) -> Dict[str, Tuple[int, str]]:
    """{sysctl: (value, source)}: the sysctl.d lines (when from_sysctl_d), then the
    policy's own values on top."""
    out: Dict[str, Tuple[int, str]] = {}
    if spec.from_sysctl_d and from_files:
        out.update(from_files)
    if spec.nf_conntrack_max:
        out["nf_conntrack_max"] = (spec.nf_conntrack_max, "policy")
    if spec.nf_conntrack_buckets:
        out["nf_conntrack_buckets"] = (spec.nf_conntrack_buckets, "policy")
    for timeout, seconds in spec.timeouts:
        out["nf_conntrack_" + timeout] = (int(seconds), "policy")
    return out


def plan(values: Mapping[str, Tuple[int, str]], current: Mapping[str, int], owned: frozenset,
         global_scope: bool) -> List[Write]:
    """The writes that bring a namespace to the baseline. `current` holds what could be
    read; `owned` the sysctls the agent owns there; `global_scope`: max and buckets are
    global, written once, from the initial namespace."""
    out: List[Write] = []
    for name, (value, source) in sorted(values.items()):
        if name in GLOBALS and not global_scope:
            continue
        if name in owned or name not in current:
            continue
        now = current[name]
        if name in GLOBALS and now >= value:
            continue  # only up: never below what the node (or kube-proxy) already has
        if now == value:
            continue
        out.append(Write(name, value, now, source))
    return out

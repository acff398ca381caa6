"""An in-memory kernel behind the agent's seam (conntrack_agent.kernel.Kernel).

It behaves as the real one does where the agent's promises depend on it (the
kernel tests check those facts on a real table): nf_conntrack_max and buckets
are global and writable only from the initial namespace (EACCES elsewhere);
timeouts are per namespace; a namespace that is gone cannot be entered; a
sysctl the kernel lacks is ENOENT. Failure injection: refuse a write with an
errno (once or always), "kill" the process between the journal record and the
write, remove a namespace, unload the module.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from conntrack_agent import model
from conntrack_agent import kernel as kernel_module
from conntrack_agent.kernel import ConntrackMissing, Kernel, NamespaceMissing, Probe

BUCKETS_PER_PAGE = 512
GLOBALS = ("nf_conntrack_max", "nf_conntrack_buckets")
DEFAULT_TIMEOUTS = {
    "nf_conntrack_tcp_timeout_established": 432000,
    "nf_conntrack_tcp_timeout_time_wait": 120,
    "nf_conntrack_tcp_timeout_close_wait": 60,
    "nf_conntrack_tcp_timeout_fin_wait": 120,
    "nf_conntrack_udp_timeout": 30,
    "nf_conntrack_udp_timeout_stream": 120,
}


class Killed(BaseException):
    """The process died here (kill -9): nothing after it runs, no handler catches it."""


@dataclass
class FakeNamespace:
    count: int = 0
    # Counts the next reads return, one each, before `count` again: a table that
    # changes between two reads of one tick.
    script: List[int] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=lambda: {"drop": 0, "early_drop": 0, "insert_failed": 0,
                                                              "clash_resolve": 0, "chaintoolong": 0})
    sysctls: Dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))


@dataclass
class FakeEvictReport:
    matched: int
    done: int
    dry_run: bool
    scanned: int = 0
    path: str = "userspace"
    detailed: bool = True
    by_category: Dict[str, int] = field(default_factory=dict)
    top_sources: List[Tuple[str, int]] = field(default_factory=list)
    top_destinations: List[Tuple[str, int]] = field(default_factory=list)
    duration_s: float = 0.001
    usage_before: float = 0.0
    usage_after: float = 0.0
    stopped: str = "complete"
    gone: int = 0
    errors: Dict[str, int] = field(default_factory=dict)

    def log_fields(self) -> Dict[str, Any]:
        return {"reason": "fake", "dry_run": self.dry_run, "max": 0, "matched": self.matched,
                "scanned": self.scanned}


class FakeProbe(Probe):
    def __init__(self, kernel: "FakeKernel", name: str):
        self.kernel, self.name = kernel, name
        self.source, self.fallback_reason = "ctnetlink", None
        self.reads = 0            # count + max requests
        self.counter_reads = 0    # per-CPU counter dumps
        self._counters: Optional[Dict[str, int]] = None

    def read(self, now: Callable[[], float], counters: bool = False) -> model.Reading:
        ns = self.kernel._namespace(self.name, probe=True)
        count = ns.script.pop(0) if ns.script else ns.count
        maximum = self.kernel.globals["nf_conntrack_max"]
        self.reads += 1
        # With cached_counters the fake reads the counters when LinuxProbe would (asked,
        # a first read, a table near full); otherwise every read sees them fresh.
        if (not self.kernel.cached_counters or counters or self._counters is None
                or kernel_module.counters_needed(count, maximum)):
            self._counters = dict(ns.counters)
            self.counter_reads += 1
        return model.Reading(self.name, now(), count, maximum, self.kernel.globals["nf_conntrack_buckets"],
                             self._counters)

    def close(self) -> None:
        pass


class FakeKernel(Kernel):
    def __init__(self, maximum: int = 65536, buckets: Optional[int] = None, mem_total: int = 16 << 30,
                 entry_bytes: Optional[int] = 256, cached_counters: bool = False):
        self.cached_counters = cached_counters
        self.globals = {"nf_conntrack_max": maximum, "nf_conntrack_buckets": buckets or maximum}
        self.namespaces: Dict[str, FakeNamespace] = {"": FakeNamespace()}
        self.loaded = True
        self._mem_total, self._entry_bytes = mem_total, entry_bytes
        self.refusals: Dict[Tuple[str, str], Tuple[int, bool]] = {}   # (netns, name) -> (errno, once)
        self.kill_on_write: Optional[Tuple[str, str]] = None
        self.writes: List[Tuple[str, str, int]] = []
        self.evictions: List[Tuple[str, bool]] = []
        self.probes_opened = 0
        self.attributions: List[str] = []

    # ------------------------------------------------------------------ set-up and injection

    def add_namespace(self, name: str, count: int = 0) -> FakeNamespace:
        self.namespaces[name] = FakeNamespace(count=count)
        return self.namespaces[name]

    def remove_namespace(self, name: str) -> None:
        del self.namespaces[name]

    def refuse(self, netns: str, name: str, code: int, once: bool = False) -> None:
        self.refusals[(netns, name)] = (code, once)

    def value(self, netns: str, name: str) -> int:
        return self.globals[name] if name in GLOBALS else self.namespaces[netns].sysctls[name]

    # ------------------------------------------------------------------ the seam

    def _namespace(self, name: str, probe: bool = False) -> FakeNamespace:
        if not self.loaded:
            raise ConntrackMissing(errno.ENOENT, "nf_conntrack is not loaded")
        if name not in self.namespaces:
            if probe:
                raise OSError(errno.ENOENT, "No such file or directory")
            raise NamespaceMissing(errno.ENOENT, f"network namespace {name!r} does not exist in /run/netns")
        return self.namespaces[name]

    def read_sysctl(self, netns_name: str, name: str) -> int:
        ns = self._namespace(netns_name)
        if name in GLOBALS:
            return self.globals[name]
        if name not in ns.sysctls:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", self.sysctl_path(name))
        return ns.sysctls[name]

    def write_sysctl(self, netns_name: str, name: str, value: int) -> None:
        ns = self._namespace(netns_name)
        refusal = self.refusals.get((netns_name, name))
        if refusal is not None:
            code, once = refusal
            if once:
                del self.refusals[(netns_name, name)]
            raise OSError(code, errno.errorcode.get(code, "error"), self.sysctl_path(name))
        if self.kill_on_write == (netns_name, name):
            raise Killed()
        if name in GLOBALS:
            if netns_name:
                raise PermissionError(errno.EACCES, "Permission denied", self.sysctl_path(name))
            if name == "nf_conntrack_buckets":
                # As the kernel: nf_ct_alloc_hashtable rounds the size up to whole pages of
                # bucket heads (4096 / 8 = 512 on x86_64), and that is what reads back.
                value = -(-value // BUCKETS_PER_PAGE) * BUCKETS_PER_PAGE
            self.globals[name] = value
        elif name in ns.sysctls:
            ns.sysctls[name] = value
        else:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", self.sysctl_path(name))
        self.writes.append((netns_name, name, value))

    def open_probe(self, netns_name: str) -> Probe:
        self.probes_opened += 1
        self._namespace(netns_name)
        return FakeProbe(self, netns_name)

    def sysctl_names(self, netns_name: str) -> List[str]:
        return sorted(set(GLOBALS) | set(self._namespace(netns_name).sysctls))

    def namespace_exists(self, netns_name: str) -> bool:
        return netns_name in self.namespaces

    def mem_total(self) -> int:
        return self._mem_total

    def entry_bytes(self) -> Optional[int]:
        return self._entry_bytes

    def attribute(self, netns_name: str, count: Optional[int] = None) -> Any:
        ns = self._namespace(netns_name)
        self.attributions.append(netns_name)
        return fake_attribution(ns.count, ns.count * 3 // 4)

    def evict(self, spec: Any, netns_name: str, dry_run: bool, usage: Callable[[], float], log: Any) -> Any:
        ns = self._namespace(netns_name)
        self.evictions.append((netns_name, dry_run))
        matched = min(ns.count, spec.budget_entries or ns.count)
        before = usage()
        if not dry_run:
            ns.count -= matched
        return FakeEvictReport(matched=matched, done=0 if dry_run else matched, dry_run=dry_run,
                               scanned=matched, usage_before=before, usage_after=usage())


def fake_attribution(total: int, unreplied: int) -> Any:
    from conntrack_agent.attribution import Attribution
    return Attribution(total=total, expected=total, sampled=total, scale=1.0, complete=True, closed=False,
                       seconds=0.01, decode_seconds=0.005,
                       states={"unreplied": unreplied, "assured": total - unreplied}, protocols={"udp": total},
                       sources=[("10.1.2.0/24", total)], destinations=[("udp 10.0.0.1:53", total)],
                       hosts=[("udp 10.0.0.1", total)])


def written(kernel: FakeKernel) -> Set[Tuple[str, str]]:
    return {(ns, name) for ns, name, _ in kernel.writes}

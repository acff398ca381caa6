"""The kernel seam: every read and write the agent makes of the kernel, behind one interface.

The executor, the actions and the service see only `Kernel`: sysctl reads and
writes in a namespace, a probe per watched namespace (count, max, buckets and
the per-CPU counters), the node's memory, and an eviction sweep. `LinuxKernel`
is the real thing (procfs, ctnetlink, setns); the unit tests give the same
calls to an in-memory fake (tests/fakekernel.py), so the tick, recovery, reload
and every failure path run without root in milliseconds. The kernel tests keep
checking `LinuxKernel` against the real table.

Errors are OSErrors as the kernel gives them, with two named kinds that are
never permanent: `NamespaceMissing` (the namespace is not there now) and
`ConntrackMissing` (nf_conntrack is not loaded now). `is_permanent` tells an
error that will keep coming for that target (a read-only /proc/sys, the global
max outside the initial namespace) from one worth retrying.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import ctnetlink, model, netns, procfs

NamespaceMissing = netns.NamespaceMissing
ConntrackMissing = procfs.ConntrackMissing

# A write refused for one of these reasons will keep being refused for that sysctl
# in that namespace (containers: EACCES/EROFS; a global sysctl written from outside
# the initial namespace: EOPNOTSUPP or EACCES; a timeout this kernel does not have:
# ENOENT on the sysctl file itself).
PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EOPNOTSUPP, errno.ENOENT})

# The per-CPU counters cost more than the count (a dump of one message per CPU: ~12 µs
# against ~4 µs). Drops and early drops only happen when a namespace's table is full,
# so a probe reads them every tick once this tick's count shows usage at or above
# COUNTERS_EVERY_TICK_FROM (counters_needed), and otherwise when the caller asks: the
# sampler asks at least every COUNTERS_REFRESH seconds, spread over the ticks (so 250
# namespaces never all pay theirs in the same tick); counters are cumulative, so a
# skipped tick only moves its delta to the next read.
COUNTERS_EVERY_TICK_FROM = 0.5
COUNTERS_REFRESH = 1.0


def counters_needed(count: int, maximum: int) -> bool:
    """Whether this count alone calls for fresh per-CPU counters (a table near full)."""
    return count >= COUNTERS_EVERY_TICK_FROM * maximum


# Unnamed namespaces (no /run/netns name) go by this prefix and their nsfs inode,
# "net-4026532281": a name the state file can record, resolved to a process in it.
UNNAMED_PREFIX = "net-"


def unnamed_name(inode: int) -> str:
    return f"{UNNAMED_PREFIX}{inode}"


def unnamed_inode(name: str) -> Optional[int]:
    if name.startswith(UNNAMED_PREFIX) and name[len(UNNAMED_PREFIX):].isdigit():
        return int(name[len(UNNAMED_PREFIX):])
    return None


def is_permanent(error: BaseException) -> bool:
    if isinstance(error, (NamespaceMissing, ConntrackMissing)):
        return False
    return isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS


class Probe:
    """What the sampler needs from one watched namespace."""

    name: str
    source: str                       # "ctnetlink" or "procfs"
    fallback_reason: Optional[str]    # why /proc stands in for ctnetlink

    def read(self, now: Callable[[], float], counters: bool = False) -> model.Reading:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Kernel:
    """The interface; LinuxKernel and the tests' FakeKernel implement it."""

    def is_permanent(self, error: BaseException) -> bool:
        return is_permanent(error)

    def is_missing(self, error: BaseException) -> bool:
        """The namespace is not there (now): retried, and dropped once gone for good."""
        return isinstance(error, NamespaceMissing)

    def sysctl_path(self, name: str) -> str:
        return procfs.sysctl_path(name)

    def read_sysctl(self, netns_name: str, name: str) -> int:
        raise NotImplementedError

    def write_sysctl(self, netns_name: str, name: str, value: int) -> None:
        raise NotImplementedError

    def open_probe(self, netns_name: str) -> Probe:
        raise NotImplementedError

    def sysctl_names(self, netns_name: str) -> List[str]:
        """The netfilter sysctls present (for sysctl.d globs)."""
        raise NotImplementedError

    def namespace_exists(self, netns_name: str) -> bool:
        raise NotImplementedError

    def mem_total(self) -> int:
        raise NotImplementedError

    def entry_bytes(self) -> Optional[int]:
        """The slab's bytes per conntrack entry; None when unreadable."""
        raise NotImplementedError

    def evict(self, spec: Any, netns_name: str, dry_run: bool, usage: Callable[[], float], log: Any) -> Any:
        raise NotImplementedError

    def attribute(self, netns_name: str, count: Optional[int] = None) -> Any:
        raise NotImplementedError


class LinuxProbe(Probe):
    """Per namespace, opened once inside it: a ctnetlink socket (count and max in one
    ~5 µs request, the per-CPU counters in one dump) and the buckets sysctl. Where
    ctnetlink cannot be used, the /proc files stand in (count, max, and the per-CPU
    counters from /proc/net/stat/nf_conntrack at ~18 µs)."""

    def __init__(self, name: str, enter: Callable[[str], Any] = netns.entered):
        self.name = name
        self.source = "ctnetlink"
        self.fallback_reason = None
        self._counters: Optional[Dict[str, int]] = None
        self._buckets_value = 0
        self._sock: Optional[ctnetlink.CtnetlinkSocket] = None
        self._count = self._max = None
        self._stat: Optional[procfs.StatFile] = None
        self._buckets = None
        with enter(name):
            if not procfs.conntrack_loaded():
                raise ConntrackMissing(errno.ENOENT, "nf_conntrack is not loaded",
                                       procfs.sysctl_path("nf_conntrack_count"))
            self._buckets = procfs.IntFile(procfs.sysctl_path("nf_conntrack_buckets"))
            try:
                self._sock = ctnetlink.CtnetlinkSocket(recv_buffer=ctnetlink.COUNTERS_RECV_BUFFER)
                self._sock.stats()
            except OSError as exc:
                self.fallback_reason = str(exc)
                if self._sock is not None:
                    self._sock.close()
                self._sock = None
                self.source = "procfs"
                self._count = procfs.IntFile(procfs.sysctl_path("nf_conntrack_count"))
                self._max = procfs.IntFile(procfs.sysctl_path("nf_conntrack_max"))
                self._stat = procfs.StatFile()

    def read(self, now: Callable[[], float], counters: bool = False) -> model.Reading:
        if self._sock is not None:
            count, maximum = self._sock.stats()
        else:
            count, maximum = self._count.read(), self._max.read()
        t = now()
        if counters or self._counters is None or counters_needed(count, maximum):
            self._counters = self._sock.cpu_stats() if self._sock is not None else self._stat.read()
            # Buckets change only when someone resizes the table (the agent at most once
            # per buckets_cooldown): no need to read them more often than the counters.
            self._buckets_value = self._buckets.read()
        return model.Reading(self.name, t, count, maximum, self._buckets_value, self._counters)

    def close(self) -> None:
        for handle in (self._sock, self._count, self._max, self._stat, self._buckets):
            if handle is not None:
                handle.close()


class LinuxKernel(Kernel):
    def __init__(self) -> None:
        # Unnamed namespaces the agent discovered: name -> (nsfs key, a pid in it).
        self.unnamed: Dict[str, Tuple[Tuple[int, int], Optional[int]]] = {}

    def entered(self, netns_name: str) -> Any:
        """Enter a namespace by the agent's name for it: "" (its own), a /run/netns
        name, or "net-INODE" for an unnamed one (through a process in it, checked to
        still be that namespace; found by a /proc scan when the agent did not
        discover it itself, as for `conntrack-agent restore`)."""
        inode = unnamed_inode(netns_name)
        if inode is None:
            return netns.entered(netns_name)
        from . import discovery

        key, pid = self.unnamed.get(netns_name, (None, None))
        if pid is None:
            pid = discovery.find_pid_of(inode)
            if pid is None:
                raise NamespaceMissing(errno.ENOENT, f"network namespace {netns_name}: no process is in it")
            key = (discovery.own_key()[0], inode)
        return discovery.entered_path(f"/proc/{pid}/ns/net", key)

    def read_sysctl(self, netns_name: str, name: str) -> int:
        with self.entered(netns_name):
            return self._checked(procfs.read_sysctl, name)

    def write_sysctl(self, netns_name: str, name: str, value: int) -> None:
        with self.entered(netns_name):
            self._checked(procfs.write_sysctl, name, value)

    @staticmethod
    def _checked(call: Callable[..., Any], name: str, *args: Any) -> Any:
        try:
            return call(name, *args)
        except FileNotFoundError:
            # A missing sysctl file is permanent for that sysctl (a timeout this kernel
            # lacks), unless the whole module is gone: that one comes back by itself.
            if not procfs.conntrack_loaded():
                raise ConntrackMissing(errno.ENOENT, "nf_conntrack is not loaded", procfs.sysctl_path(name)) from None
            raise

    def open_probe(self, netns_name: str) -> Probe:
        return LinuxProbe(netns_name, self.entered)

    def sysctl_names(self, netns_name: str) -> List[str]:
        import os
        with self.entered(netns_name):
            return sorted(os.listdir(procfs.SYSCTL_DIR))

    def namespace_exists(self, netns_name: str) -> bool:
        if unnamed_inode(netns_name) is not None:
            try:
                with self.entered(netns_name):
                    return True
            except OSError:
                return False
        return netns.exists(netns_name)

    def mem_total(self) -> int:
        return procfs.mem_total()

    def entry_bytes(self) -> Optional[int]:
        return procfs.slab_object_size()

    def evict(self, spec: Any, netns_name: str, dry_run: bool, usage: Callable[[], float], log: Any) -> Any:
        from . import evict  # the engine and its codec load only when a sweep runs

        # A socket of its own: a dump owns its socket's receive queue until read to the end.
        with self.entered(netns_name):
            sock = ctnetlink.CtnetlinkSocket()
        try:
            return evict.evict(sock, spec, dry_run=dry_run, usage=usage, log=log)
        finally:
            sock.close()

    def attribute(self, netns_name: str, count: Optional[int] = None) -> Any:
        """One bounded pass over a namespace's table: who fills it (attribution.py)."""
        from . import attribution

        with self.entered(netns_name):
            sock = ctnetlink.CtnetlinkSocket()
        try:
            # Not drained: the socket is closed right after the pass, so reading the rest of
            # the dump once decoding stops (its 50 ms budget) would only cost CPU, up to the
            # drain budget of 100 ms (bench/namespaces.py: 79 ms for a pass over 10,000
            # entries, drained; 54 ms over 100,000, closed once the drain was predicted long).
            return attribution.attribute(sock, expected=count, drain_budget=0.0)
        finally:
            sock.close()

"""Reads each watched namespace every tick and turns the readings into a Sample.

Per namespace, opened once inside it: a ctnetlink socket (count and max in one
~5 µs request, the per-CPU counters in one dump) and the buckets sysctl. Where
ctnetlink cannot be used, the /proc files stand in (count, max, and the per-CPU
counters from /proc/net/stat/nf_conntrack at ~18 µs).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

from . import ctnetlink, model, netns, procfs


# The per-CPU counters cost more than the count (a dump of one message per CPU: ~12 µs
# against ~4 µs). Drops and early drops only happen when a namespace's table is full,
# so they are read every tick once this tick's count shows usage at or above
# COUNTERS_EVERY_TICK_FROM, and at least every COUNTERS_REFRESH seconds otherwise;
# counters are cumulative, so a skipped tick only moves its delta to the next read.
COUNTERS_EVERY_TICK_FROM = 0.5
COUNTERS_REFRESH = 1.0


class NamespaceProbe:
    def __init__(self, name: str):
        self.name = name
        self.source = "ctnetlink"
        self.fallback_reason: Optional[str] = None   # why /proc stands in for ctnetlink
        self._counters: Optional[Dict[str, int]] = None
        self._buckets_value = 0
        self._counters_at = 0.0
        self._sock: Optional[ctnetlink.CtnetlinkSocket] = None
        self._count = self._max = None
        self._stat: Optional[procfs.StatFile] = None
        with netns.entered(name):
            if not procfs.conntrack_loaded():
                raise procfs.ConntrackMissing(2, "nf_conntrack is not loaded", procfs.sysctl_path("nf_conntrack_count"))
            self._buckets = procfs.IntFile(procfs.sysctl_path("nf_conntrack_buckets"))
            try:
                self._sock = ctnetlink.CtnetlinkSocket()
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
        """One reading; `counters` forces a fresh read of the per-CPU counters."""
        if self._sock is not None:
            count, maximum = self._sock.stats()
        else:
            count, maximum = self._count.read(), self._max.read()
        t = now()
        if (counters or self._counters is None or count >= COUNTERS_EVERY_TICK_FROM * maximum
                or t - self._counters_at >= COUNTERS_REFRESH):
            self._counters = self._sock.cpu_stats() if self._sock is not None else self._stat.read()
            # Buckets change only when someone resizes the table (the agent at most once
            # per buckets_cooldown): no need to read them more often than the counters.
            self._buckets_value = self._buckets.read()
            self._counters_at = t
        return model.Reading(self.name, t, count, maximum, self._buckets_value, self._counters)

    def close(self) -> None:
        for handle in (self._sock, self._count, self._max, self._stat, self._buckets):
            if handle is not None:
                handle.close()


class Sampler:
    """All watched namespaces. `sample()` returns None while none can be read."""

    def __init__(self, namespaces: Tuple[str, ...], window: float, clock: Callable[[], float] = time.monotonic):
        self.namespaces = namespaces or ("",)
        self.clock = clock
        self.tracker = model.FillTracker(window)
        self.probes: Dict[str, NamespaceProbe] = {}
        self.unavailable: Dict[str, str] = {}   # namespace -> why, for the log

    def open_missing(self) -> Tuple[List[str], Dict[str, str]]:
        """(Re)try the namespaces not open yet. Returns (newly opened, newly failed)."""
        opened, failed = [], {}
        for name in self.namespaces:
            if name in self.probes:
                continue
            try:
                self.probes[name] = NamespaceProbe(name)
                self.unavailable.pop(name, None)
                opened.append(name)
            except OSError as exc:
                why = exc.strerror or str(exc)
                if self.unavailable.get(name) != why:
                    failed[name] = why
                self.unavailable[name] = why
        return opened, failed

    def sample(self, counters: bool = False) -> Optional[model.Sample]:
        """A reading of every open namespace; `counters` forces fresh per-CPU counters
        (otherwise they are read as NamespaceProbe.read decides)."""
        readings, views = [], []
        for name, probe in list(self.probes.items()):
            try:
                reading = probe.read(self.clock, counters)
            except OSError as exc:
                # The module was unloaded or the namespace deleted: drop the probe
                # and let open_missing() find it again.
                probe.close()
                del self.probes[name]
                self.tracker.forget(name)
                self.unavailable[name] = exc.strerror or str(exc)
                continue
            readings.append(reading)
            views.append(self.tracker.update(reading))
        if not readings:
            return None
        return model.combine(tuple(readings), tuple(views))

    def close(self) -> None:
        for probe in self.probes.values():
            probe.close()
        self.probes.clear()

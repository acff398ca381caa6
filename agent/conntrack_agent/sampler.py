"""Reads each watched namespace every tick and turns the readings into a Sample.

One probe per namespace, opened once through the kernel seam (kernel.py: a
ctnetlink socket and the buckets sysctl, opened inside the namespace) and kept:
nothing is re-entered per tick.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

from . import model
from .kernel import Kernel, Probe


class Sampler:
    """All watched namespaces. `sample()` returns None while none can be read."""

    def __init__(self, namespaces: Tuple[str, ...], window: float, clock: Callable[[], float] = time.monotonic,
                 kernel: Optional[Kernel] = None):
        if kernel is None:
            from .kernel import LinuxKernel
            kernel = LinuxKernel()
        self.kernel = kernel
        self.namespaces = namespaces or ("",)
        self.clock = clock
        self.tracker = model.FillTracker(window)
        self.probes: Dict[str, Probe] = {}
        self.unavailable: Dict[str, str] = {}   # namespace -> why, for the log
        self.last_readings: Dict[str, model.Reading] = {}   # the cumulative counters, for the metrics

    def set_namespaces(self, namespaces: Tuple[str, ...]) -> List[str]:
        """Watch these from now on (discovery's answer): probes of namespaces no longer
        wanted are closed at once (an open socket keeps a deleted namespace alive, with
        its entries); new ones open at the next open_missing(). Returns those dropped."""
        dropped = [name for name in self.probes if name not in namespaces]
        for name in dropped:
            self.probes.pop(name).close()
            self.tracker.forget(name)
            self.last_readings.pop(name, None)
        for name in list(self.unavailable):
            if name not in namespaces:
                del self.unavailable[name]
        self.namespaces = namespaces or ("",)
        return dropped

    def open_missing(self) -> Tuple[List[str], Dict[str, str]]:
        """(Re)try the namespaces not open yet. Returns (newly opened, newly failed)."""
        opened, failed = [], {}
        for name in self.namespaces:
            if name in self.probes:
                continue
            try:
                self.probes[name] = self.kernel.open_probe(name)
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
        (otherwise they are read as the probe decides)."""
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
                self.last_readings.pop(name, None)
                self.unavailable[name] = exc.strerror or str(exc)
                continue
            readings.append(reading)
            self.last_readings[name] = reading
            views.append(self.tracker.update(reading))
        if not readings:
            return None
        return model.combine(tuple(readings), tuple(views))

    def close(self) -> None:
        for probe in self.probes.values():
            probe.close()
        self.probes.clear()

"""Reads each watched namespace every tick and turns the readings into a Sample.

One probe per namespace, opened once through the kernel seam (kernel.py: a
ctnetlink socket and the buckets sysctl, opened inside the namespace) and kept:
nothing is re-entered per tick.

With a `pace` (the service gives decisions.namespace_interval), a namespace is read
again once its own interval has passed (the tick the agent would pick were it the
only one watched) or its counters fall due, not at every tick the busiest one asks
for: a storm in one of 250 namespaces costs fast ticks that read that one, not all
250. The others' last views stand meanwhile (their counter deltas go to the next read).

With `urgent` as well (the service gives decisions.namespace_busy), `sample(defer=True)`
reads first only the namespaces under pressure when any of them is due, and leaves the
calm ones that are due for `catch_up()`, which the service calls once it has decided
and acted: reading 250 calm namespaces cost the storming one's tick 3-17 ms before its
decision (bench/whole_node.py, 2 vCPUs shared with the storm). What catch_up() reads is
in the next sample, counter deltas included: a calm namespace's news is decided on at
most one tick later (a fast tick: another namespace is under pressure). When the next
tick is a predicted crossing, the service calls catch_up() after that one instead, for
a fast tick at most (`deferred_since`).

Each read takes count and max. The per-CPU counters (a dump,
~3× a count's cost) are read every tick where the table is near full (the probe sees
that from the count), else when a namespace's refresh falls due: at most
kernel.COUNTERS_REFRESH after its last read, with the namespaces' phases spread over
that period so that with hundreds of them no single tick pays all their dumps (at
the 50 ms fast tick a 1 s refresh is 1/20 of them a tick, not all of them every 20th).
"""

from __future__ import annotations

import time
from typing import Callable, Collection, Dict, List, Optional, Set, Tuple

from . import model
from .kernel import COUNTERS_REFRESH, Kernel, Probe

# Phases: the k-th namespace opened is first due at the fractional part of k × the
# golden ratio of the refresh period, a sequence that stays evenly spread however many
# namespaces come and go. After a read the next one is due a period after the last
# due time (its phase kept), or, when the read came late (ticks longer than its slack
# allows), a period after the read less a slack of up to a quarter period (the same
# fraction): ticks as long as the period read every namespace every tick, and without
# the slack they would all leave such a stretch in step, then fall due on the same
# fast tick; with it, they fall due over a quarter period. So a namespace's counters
# are never older than a period plus a tick, and read at most 4/3 as often as with a
# plain "a period since the last read" (no more often at the default calm tick).
_PHASE_STEP = 0.6180339887498949
_SLACK = 0.25
# A namespace's next read is due this much before its interval has passed: the tick
# that should read it starts a little early or its previous read came late in a long
# loop, and missing it by a millisecond would cost a whole tick.
_PACE_SLACK = 0.005


class Sampler:
    """All watched namespaces. `sample()` returns None while none can be read."""

    def __init__(self, namespaces: Tuple[str, ...], window: float, clock: Callable[[], float] = time.monotonic,
                 kernel: Optional[Kernel] = None,
                 pace: Optional[Callable[[model.NamespaceView, int], float]] = None,
                 urgent: Optional[Callable[[model.NamespaceView], bool]] = None):
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
        self._views: Dict[str, model.NamespaceView] = {}     # the last view of each, for sample(only=...)
        self._carried: Dict[str, model.NamespaceView] = {}   # the same without its deltas, while it stands
        self._phase: Dict[str, float] = {}                   # namespace -> its fraction of the period
        self._counters_due: Dict[str, float] = {}            # namespace -> when its counters are due
        self._opened = 0
        self.pace = pace                                     # (view, max) -> seconds until its next read
        self._next_read: Dict[str, float] = {}
        self.urgent = urgent                                 # view -> under pressure (read first)
        self._deferred: List[str] = []                       # due, calm: for catch_up()
        self.deferred_since: Optional[float] = None           # when the oldest of them was left
        self._pending: Set[str] = set()                      # read by catch_up(), not yet in a sample

    def set_namespaces(self, namespaces: Tuple[str, ...]) -> List[str]:
        """Watch these from now on (discovery's answer): probes of namespaces no longer
        wanted are closed at once (an open socket keeps a deleted namespace alive, with
        its entries); new ones open at the next open_missing(). Returns those dropped."""
        dropped = [name for name in self.probes if name not in namespaces]
        for name in dropped:
            self.probes.pop(name).close()
            self._forget(name)
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
                # Its first read takes the counters (a probe has none yet); the next
                # refresh comes at its phase within the period.
                self._opened += 1
                phase = (self._opened * _PHASE_STEP) % 1.0
                self._phase[name] = phase
                self._counters_due[name] = self.clock() + phase * COUNTERS_REFRESH
            except OSError as exc:
                why = exc.strerror or str(exc)
                if self.unavailable.get(name) != why:
                    failed[name] = why
                self.unavailable[name] = why
        return opened, failed

    def sample(self, counters: bool = False, only: Optional[Collection[str]] = None,
               defer: bool = False) -> Optional[model.Sample]:
        """A reading of every open namespace; `counters` forces fresh per-CPU counters
        (otherwise they are read when near full or due). `only`: re-read just these
        (the re-read before acting: the namespaces acted on must be fresh, the others'
        views of this tick's first read stand, instead of ~30 ms more with 250 of them).
        `defer`: the calm namespaces due are left to catch_up() when one under pressure
        is due (see the module's docstring)."""
        readings, views = [], []
        now = self.clock()
        due = self._counters_due
        # One namespace is read at every tick: the tick is its own pace then.
        paced = self.pace is not None and only is None and not counters and len(self.probes) > 1
        next_read = self._next_read
        known = self._views
        to_read: Collection[str]
        if only is None and not paced:
            to_read = self.probes   # every one (one namespace watched: each sample)
        else:
            to_read = {name for name in self.probes
                       if name not in known
                       or not ((only is not None and name not in only)
                               or (paced and now < next_read.get(name, 0.0) and now < due.get(name, 0.0)))}
        if defer and paced and self.urgent is not None and len(to_read) > 1:
            hot = {name for name in to_read if name not in known or self.urgent(known[name])}
            if hot and len(hot) < len(to_read):
                if not self._deferred:
                    self.deferred_since = now
                self._deferred = [name for name in self.probes if name in to_read and name not in hot]
                to_read = hot
        if defer and self._deferred and all(name in to_read for name in self._deferred):
            self._deferred, self.deferred_since = [], None   # read now after all
        fresh = 0
        for name, probe in list(self.probes.items()):
            if name not in to_read:
                if name in self._pending:
                    # Read by catch_up() after the last decision: shown once with its deltas.
                    self._pending.discard(name)
                    readings.append(self.last_readings[name])
                    views.append(known[name])
                    continue
                # Not read now: its last view stands, without its counter deltas (counted
                # once already: for a re-read, model.carrying_deltas adds them back).
                carried = self._carried.get(name)
                if carried is None:   # made once per read, not at every tick it stands
                    carried = self._carried[name] = known[name]._replace(deltas={})
                readings.append(self.last_readings[name])
                views.append(carried)
                continue
            read = self._read(name, probe, now, counters)
            if read is None:
                continue
            readings.append(read[0])
            views.append(read[1])
            fresh += 1
        if paced and not fresh and readings:
            # Nothing was due (the fast tick held on after a storm): the fullest is read all
            # the same, so that the sample's time and max (a max the agent may just have
            # raised) are this tick's, not those of the last read.
            i = max(range(len(views)), key=lambda k: views[k].count)
            again = self.sample(only=(views[i].netns,))
            return again
        if not readings:
            return None
        return model.combine(tuple(readings), tuple(views))

    def catch_up(self) -> None:
        """Read the calm namespaces the last sample(defer=True) left; the next sample
        shows them with their counter deltas."""
        names, self._deferred, self.deferred_since = self._deferred, [], None
        now = self.clock()
        for name in names:
            probe = self.probes.get(name)
            if probe is not None and self._read(name, probe, now, False) is not None:
                self._pending.add(name)

    def _read(self, name: str, probe: Probe, now: float,
              counters: bool) -> Optional[Tuple[model.Reading, model.NamespaceView]]:
        """Read one namespace and keep its view; None (and the probe dropped) if it is gone."""
        due = self._counters_due
        refresh = counters or now >= due.get(name, 0.0)
        try:
            reading = probe.read(self.clock, refresh)
        except OSError as exc:
            # The module was unloaded or the namespace deleted: drop the probe
            # and let open_missing() find it again.
            probe.close()
            del self.probes[name]
            self._forget(name)
            self.unavailable[name] = exc.strerror or str(exc)
            return None
        if refresh:
            due[name] = max(due.get(name, now) + COUNTERS_REFRESH,
                            now + COUNTERS_REFRESH * (1.0 - _SLACK * self._phase.get(name, 0.0)))
        self.last_readings[name] = reading
        view = self.tracker.update(reading)
        if name in self._pending:
            # catch_up() read it and no sample has shown that yet: keep those deltas too.
            self._pending.discard(name)
            unshown = self._views[name].deltas
            if unshown:
                view = view._replace(deltas={k: view.deltas.get(k, 0) + unshown.get(k, 0)
                                             for k in set(view.deltas) | set(unshown)})
        self._views[name] = view
        self._carried.pop(name, None)
        if self.pace is not None and len(self.probes) > 1:
            # One namespace alone is read at every tick: its pace would go unused (with the
            # prediction it cost 0.1 ms of a 1.6 ms tick under cProfile in a storm). A second
            # one appearing reads it at once (no pace yet), then paces it.
            self._next_read[name] = now + self.pace(view, reading.max) - _PACE_SLACK
        return reading, view

    def _forget(self, name: str) -> None:
        self.tracker.forget(name)
        self.last_readings.pop(name, None)
        self._views.pop(name, None)
        self._carried.pop(name, None)
        self._phase.pop(name, None)
        self._counters_due.pop(name, None)
        self._next_read.pop(name, None)
        self._pending.discard(name)

    def close(self) -> None:
        for probe in self.probes.values():
            probe.close()
        self.probes.clear()

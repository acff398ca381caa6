"""Readings and the arithmetic on them. Pure: no I/O, no clock.

The sampler (a shell module) produces a `Reading` per watched namespace each tick;
`FillTracker` turns consecutive readings into a fill rate and a time-to-full; a
`Sample` is one tick's view over all watched namespaces. The kernel checks every
namespace's own count against the one global nf_conntrack_max, so the pressure
on the node is that of its fullest namespace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, NamedTuple, Optional, Tuple

# Readings and views are NamedTuples, not dataclasses: immutable all the same, and
# built several times faster; they are made on every tick, in the sampling hot path.
class Reading(NamedTuple):
    """Raw values read from the kernel for one namespace at one instant."""

    netns: str
    time: float               # monotonic seconds
    count: int
    max: int
    buckets: int
    counters: Dict[str, int]  # cumulative, summed over CPUs; the same object until re-read


class NamespaceView(NamedTuple):
    netns: str
    count: int
    usage: float
    fill_rate: float                  # entries per second, EWMA of the slope
    time_to_full: Optional[float]     # seconds; None while not filling
    deltas: Dict[str, int]            # counter increases since the previous tick
    slope: float = 0.0                # entries per second over the latest interval alone


@dataclass(frozen=True)
class Sample:
    time: float
    max: int
    buckets: int
    namespaces: Tuple[NamespaceView, ...]
    deltas: Dict[str, int] = field(default_factory=dict)  # summed over namespaces

    # Computed once per sample: the decision core asks for them many times a tick.
    @cached_property
    def fullest(self) -> NamespaceView:
        return max(self.namespaces, key=lambda ns: ns.count)

    @cached_property
    def soonest(self) -> NamespaceView:
        """The namespace predicted to fill first (the fullest when none is filling)."""
        filling = [ns for ns in self.namespaces if ns.time_to_full is not None]
        if not filling:
            return self.fullest
        return min(filling, key=lambda ns: ns.time_to_full)

    @property
    def count(self) -> int:
        return self.fullest.count

    @property
    def usage(self) -> float:
        return self.fullest.usage

    @property
    def fill_rate(self) -> float:
        return self.soonest.fill_rate

    @property
    def time_to_full(self) -> Optional[float]:
        return self.soonest.time_to_full

    def busiest_dropper(self, counters: Tuple[str, ...]) -> NamespaceView:
        # Asked several times a tick: with 250 namespaces the walk was ~0.7 ms of a 2.1 ms
        # tick (the tick's Python alone, on the unit tests' fake kernel).
        # Deltas are never negative: a zero total means none rose, and max() would
        # return the first namespace, as here.
        if not any(self.deltas.get(c, 0) for c in counters):
            return self.namespaces[0]
        return max(self.namespaces, key=lambda ns: sum(ns.deltas.get(c, 0) for c in counters))


def usage_of(count: int, maximum: int) -> float:
    return count / maximum if maximum > 0 else 1.0


def time_to_full(count: int, maximum: int, fill_rate: float) -> Optional[float]:
    if fill_rate <= 0:
        return None
    return max(0.0, (maximum - count) / fill_rate)


# A slope measured over less time than this is mostly noise (the reading taken just
# before acting comes microseconds after the tick's own): keep the previous one.
MIN_SLOPE_INTERVAL = 0.02


class _Previous(NamedTuple):
    time: float
    count: int
    rate: float
    slope: float
    counters: Dict[str, int]


# Shared, never mutated: the deltas of a tick whose counters were not re-read.
_NO_DELTAS: Dict[str, int] = {}


class FillTracker:
    """EWMA of each namespace's count slope over irregular tick intervals.

    alpha = 1 - exp(-dt / window) weighs a reading by the time it covers, so the
    estimate means the same at a 250 ms calm tick and a 50 ms fast tick, and an
    extra reading taken just before acting (dt ~ 0) barely moves it.

    The time-to-full uses the smaller of the EWMA and the latest slope: at a
    storm's onset the EWMA is the smaller (it is still catching up) and the
    prediction is as early as the EWMA allows; once the storm stops the latest
    slope drops to zero at once, so a lagging average does not keep predicting a
    fill that is no longer happening (and raising max again for nothing).
    """

    def __init__(self, window: float):
        self.window = window
        self._previous: Dict[str, _Previous] = {}

    def forget(self, netns: str) -> None:
        self._previous.pop(netns, None)

    def update(self, reading: Reading) -> NamespaceView:
        previous = self._previous.get(reading.netns)
        counters = reading.counters
        if previous is None or reading.time <= previous.time:
            rate = previous.rate if previous else 0.0
            slope = previous.slope if previous else 0.0
            deltas = _NO_DELTAS
        else:
            dt = reading.time - previous.time
            measured = (reading.count - previous.count) / dt
            slope = measured if dt >= MIN_SLOPE_INTERVAL else previous.slope
            rate = previous.rate + (1.0 - math.exp(-dt / self.window)) * (measured - previous.rate)
            if counters is previous.counters:
                deltas = _NO_DELTAS   # not re-read this tick: the next read carries the change
            else:
                # A counter that went backwards was reset (module reloaded): count from zero.
                before = previous.counters
                deltas = {name: (value - before.get(name, value) if value >= before.get(name, value) else value)
                          for name, value in counters.items()}
        self._previous[reading.netns] = _Previous(reading.time, reading.count, rate, slope, counters)
        return NamespaceView(reading.netns, reading.count, usage_of(reading.count, reading.max), rate,
                             time_to_full(reading.count, reading.max, min(rate, slope)), deltas, slope)


def combine(readings: Tuple[Reading, ...], views: Tuple[NamespaceView, ...]) -> Sample:
    # max and buckets are global: the freshest reading has the current values.
    latest = readings[0] if len(readings) == 1 else max(readings, key=lambda r: r.time)
    if len(views) == 1:
        total = views[0].deltas
    else:
        total = {}
        for view in views:
            for name, value in view.deltas.items():
                total[name] = total.get(name, 0) + value
    return Sample(time=latest.time, max=latest.max, buckets=latest.buckets, namespaces=views, deltas=total)


def carrying_deltas(fresh: Sample, earlier: Sample) -> Sample:
    """`fresh` (a re-read just before acting) with the counter increases `earlier` saw
    added: the re-read measures only the microseconds since `earlier`, and a trigger on
    rising counters would otherwise never survive the re-check."""
    if not any(view.deltas for view in earlier.namespaces):
        return fresh
    before = {view.netns: view.deltas for view in earlier.namespaces}
    views = []
    for view in fresh.namespaces:
        seen = before.get(view.netns)
        if seen:
            merged = dict(seen)
            for name, value in view.deltas.items():
                merged[name] = merged.get(name, 0) + value
            view = view._replace(deltas=merged)
        views.append(view)
    total: Dict[str, int] = {}
    for view in views:
        for name, value in view.deltas.items():
            total[name] = total.get(name, 0) + value
    return Sample(time=fresh.time, max=fresh.max, buckets=fresh.buckets, namespaces=tuple(views), deltas=total)


def with_max(sample: Sample, maximum: int) -> Sample:
    """The same readings seen against a new max (just written by the agent), so the
    status line and the D-Bus properties do not show the old, full table until the
    next tick."""
    views = tuple(view._replace(usage=usage_of(view.count, maximum),
                                time_to_full=None if view.time_to_full is None
                                else time_to_full(view.count, maximum, view.fill_rate))
                  for view in sample.namespaces)
    return Sample(time=sample.time, max=maximum, buckets=sample.buckets, namespaces=views, deltas=sample.deltas)


# ----------------------------------------------------------------------------- memory

# Used when /proc/slabinfo cannot be read (it is root-only; the service runs without
# CAP_DAC_READ_SEARCH): the nf_conntrack slab object measured on 6.1-6.18 x86_64.
DEFAULT_ENTRY_BYTES = 256
# Per entry on top of the slab object: conntrack extensions (acct, timestamp, labels,
# NAT, helper: up to ~120 bytes in their own allocation) rounded up to 128.
DEFAULT_OVERHEAD_BYTES = 128
BUCKET_BYTES = 8  # one hlist_nulls_head pointer per hash bucket


def bytes_per_entry(entry_bytes: int, overhead_bytes: int, buckets_ratio: float) -> float:
    return entry_bytes + overhead_bytes + BUCKET_BYTES / buckets_ratio


def memory_ceiling(mem_total: int, share: float, entry_bytes: int, overhead_bytes: int,
                   buckets_ratio: float) -> int:
    """The most entries `share` of RAM can hold, hash buckets included."""
    return int(mem_total * share // bytes_per_entry(entry_bytes, overhead_bytes, buckets_ratio))

"""Eviction engine: remove or age out stale conntrack entries, fast and safely.

selection -> plan -> act -> report. The engine receives an ``EvictSpec``
(evictspec.py: the selectors, defined once for the policy, the engine and the
command line) and a CtnetlinkSocket opened in the
namespace to sweep; it returns an ``EvictReport`` and leaves logging to the
caller.

Two paths (measurements in bench/results/evict.md):

- kernel-side: one IPCTNL_MSG_CT_DELETE carrying a filter and no tuple; the
  kernel walks the table and deletes what matches (~1.2M entries/s). Only
  used when the spec is expressible *exactly* by the kernel's filter (mark,
  status, and from 6.12 exact tuple fields) and nothing needs to stop the
  sweep part-way (entry budget covers the table, no usage target), because
  the kernel cannot stop early or skip assured ESTABLISHED TCP by state.
- userspace: a streaming dump, a per-entry check, and deletes or timeout
  updates in batches of 256 without acks. The dump is pre-filtered by the
  kernel where it can (mark, status) and always read to its end.

Safety: assured ESTABLISHED TCP is never selected unless the spec says
``include_established``; hardware/flowtable-offloaded entries are never
touched (their timers are not the kernel's to shorten); every delete is
guarded by CTA_ID; a sweep is bounded by an entry and a time budget and
stops once usage is at or below the target.
"""

from __future__ import annotations

import errno as _errno
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from conntrack_agent.ctnetlink import (
    AF_INET,
    AF_INET6,
    IPS_ASSURED,
    IPS_OFFLOAD,
    IPS_SEEN_REPLY,
    TCP_ESTABLISHED,
    CtEntry,
    CtnetlinkError,
    CtnetlinkSocket,
    TupleFilter,
)
from conntrack_agent.evictspec import PROTO_NAMES, TCP_STATES, EvictSpec

__all__ = ["EvictSpec", "EvictReport", "EvictPlan", "plan", "evict", "compile_matcher"]

BATCH = 256
# Kernel-side flush speed used to check a time budget before choosing it
# (measured ~1.2-1.3M entries/s on kernel 6.18; each request walks the table once).
KERNEL_WALK_RATE = 1.0e6
# More requests than this and one userspace sweep is cheaper than N walks.
MAX_KERNEL_REQUESTS = 4
_PORT_PROTOS = (6, 17)  # the only protocols whose ports the kernel's tuple filter compares


def status_filter(spec: EvictSpec) -> Tuple[int, int]:
    """(value, mask) on ct->status for spec.status; offloaded entries are always excluded."""
    val, mask = {
        "any": (0, 0),
        "unreplied": (0, IPS_SEEN_REPLY),
        "not_assured": (0, IPS_ASSURED),
        "assured": (IPS_ASSURED, IPS_ASSURED),
    }[spec.status]
    return val, mask | IPS_OFFLOAD


def _net(text: str):
    import ipaddress  # ~1 MB of RSS: paid for by rules that name addresses, not by every agent

    return ipaddress.ip_network(text, strict=False)


# ---------------------------------------------------------------------------
# selection


def compile_matcher(spec: EvictSpec) -> Callable[[CtEntry], bool]:
    """The userspace predicate for ``spec``, with everything precomputed."""
    protos = frozenset(spec.effective_protocols()) or None
    states = frozenset(TCP_STATES.index(s) for s in spec.tcp_states) or None
    sval, smask = status_filter(spec)
    mval = None if spec.mark is None else spec.mark & spec.mark_mask
    mmask = spec.mark_mask
    zone = spec.zone
    sport, dport = spec.sport, spec.dport
    below = spec.timeout_below
    keep_established = not spec.include_established
    age_floor = spec.age_timeout if spec.mode == "age" else None

    def net_test(text: Optional[str]):
        if text is None:
            return None
        n = _net(text)
        return (4 if n.version == 4 else 16, int(n.network_address), int(n.netmask))

    src_net, dst_net = net_test(spec.src), net_test(spec.dst)
    from_bytes = int.from_bytes

    def match(e: CtEntry) -> bool:
        if e.status & smask != sval:
            return False
        proto = e.proto
        if protos is not None and proto not in protos:
            return False
        if proto == 6:
            if states is not None and e.state not in states:
                return False
            if keep_established and e.state == TCP_ESTABLISHED and e.status & IPS_ASSURED:
                return False
        if mval is not None and e.mark & mmask != mval:
            return False
        if zone is not None and e.zone != zone:
            return False
        if sport is not None and e.sport != sport:
            return False
        if dport is not None and e.dport != dport:
            return False
        if src_net is not None:
            a = e.src
            if len(a) != src_net[0] or from_bytes(a, "big") & src_net[2] != src_net[1]:
                return False
        if dst_net is not None:
            a = e.dst
            if len(a) != dst_net[0] or from_bytes(a, "big") & dst_net[2] != dst_net[1]:
                return False
        if below is not None and (e.timeout is None or e.timeout >= below):
            return False
        # Ageing an entry that would expire sooner anyway would extend it.
        if age_floor is not None and (e.timeout is None or e.timeout <= age_floor):
            return False
        return True

    return match


# ---------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class EvictPlan:
    """``kernel_requests``: filtered deletes (kernel path). ``dumps``: the
    dump requests of the userspace path, pre-filtered by the kernel as far as
    it can; their union covers every entry the spec can select."""

    path: str  # "kernel" or "userspace"
    reason: str
    kernel_requests: Tuple[Dict[str, Any], ...] = ()
    dumps: Tuple[Dict[str, Any], ...] = ({},)


def _kernel_requests(spec: EvictSpec, features: frozenset) -> Tuple[Optional[List[Dict[str, Any]]], str]:
    """The filtered-delete requests equal to ``spec``, or (None, why not)."""
    if spec.mode != "delete":
        return None, "age mode updates entries one by one"
    for name in ("tcp_states", "zone", "timeout_below"):
        if getattr(spec, name) not in (None, ()):
            return None, "the kernel cannot filter on %s" % name
    protos = spec.effective_protocols()
    if not spec.include_established and spec.status not in ("unreplied", "not_assured") \
            and (not protos or 6 in protos):
        # Only a status that excludes assured entries, or no TCP at all,
        # keeps assured ESTABLISHED TCP out without looking at the state.
        return None, "keeping assured ESTABLISHED TCP needs the TCP state"
    needs_tuple = bool(protos or spec.src or spec.dst or spec.sport is not None
                       or spec.dport is not None)
    nets = [_net(a) for a in (spec.src, spec.dst) if a]
    if any(n.num_addresses != 1 for n in nets):
        return None, "the kernel matches single addresses, not CIDR ranges"
    if (spec.sport is not None or spec.dport is not None) and \
            (not protos or any(p not in _PORT_PROTOS for p in protos)):
        return None, "the kernel compares ports of TCP and UDP only"
    need = {"status"} | ({"mark"} if spec.mark is not None else set()) | \
        ({"tuple"} if needs_tuple else set())
    missing = need - features
    if missing:
        return None, "this kernel lacks filtered delete by " + ", ".join(sorted(missing))

    sval, smask = status_filter(spec)
    base: Dict[str, Any] = {"status": sval, "status_mask": smask}
    if spec.mark is not None:
        base.update(mark=spec.mark, mark_mask=spec.mark_mask)
    if not needs_tuple:
        return [base], "kernel filter: mark/status"
    requests = [dict(base, tuple_filter=tf) for tf in _tuple_filters(spec, protos)]
    if not requests:
        return None, "no protocol/family combination can match"
    if len(requests) > MAX_KERNEL_REQUESTS:
        return None, "%d kernel walks would cost more than one sweep" % len(requests)
    return requests, "kernel filter: tuple + status%s" % ("/mark" if spec.mark is not None else "")


def _dump_requests(spec: EvictSpec, features: frozenset) -> Tuple[Dict[str, Any], ...]:
    """Dumps for the userspace path, narrowed by the kernel where that is cheap.

    mark/status ride along on one dump. A single protocol (or exact address)
    also becomes a tuple filter, which needs one dump per family; every dump
    walks the whole table, so more protocols stay a single unfiltered-by-
    tuple dump. Parsing is the sweep's main cost: a TCP-state rule on a
    table that is half UDP parses half as much.
    """
    base: Dict[str, Any] = {}
    if spec.mark is not None:
        base.update(mark=spec.mark, mark_mask=spec.mark_mask)
    if "status" in features:
        sval, smask = status_filter(spec)
        base.update(status=sval, status_mask=smask)
    protos = spec.effective_protocols()
    if "dump_tuple" not in features or len(protos) > 1:
        return (base,)
    exact = [a for a in (spec.src, spec.dst) if a and _net(a).num_addresses == 1]
    if not protos and not exact:
        return (base,)
    return tuple(dict(base, tuple_filter=tf) for tf in _tuple_filters(spec, protos))


def _tuple_filters(spec: EvictSpec, protos: Tuple[int, ...]) -> List[TupleFilter]:
    """One exact-match tuple filter per family x protocol that can exist.

    Single addresses and (TCP/UDP) ports go in; CIDR ranges cannot, the
    kernel compares whole addresses.
    """
    nets = [_net(a) for a in (spec.src, spec.dst) if a]
    families = [AF_INET if nets[0].version == 4 else AF_INET6] if nets else [AF_INET, AF_INET6]

    def host(text: Optional[str]) -> Optional[bytes]:
        n = _net(text) if text else None
        return n.network_address.packed if n is not None and n.num_addresses == 1 else None

    src, dst = host(spec.src), host(spec.dst)
    out = []
    for fam in families:
        for proto in (protos or (None,)):
            if (proto == 1 and fam == AF_INET6) or (proto == 58 and fam == AF_INET):
                continue  # cannot exist; spare the walk
            ports = proto in _PORT_PROTOS
            out.append(TupleFilter(family=fam, proto=proto, src=src, dst=dst,
                                   sport=spec.sport if ports else None,
                                   dport=spec.dport if ports else None))
    return out


def plan(ct: CtnetlinkSocket, spec: EvictSpec, count: int,
         kernel_filter: Optional[bool] = None) -> EvictPlan:
    """Choose the path. ``kernel_filter``: None auto, False never, True required (ValueError)."""
    features = ct.filter_features()
    dumps = _dump_requests(spec, features)
    if kernel_filter is False:
        return EvictPlan("userspace", "kernel filter disabled by the caller", (), dumps)
    requests, reason = _kernel_requests(spec, features)
    if requests is not None:
        if spec.budget_entries and count > spec.budget_entries:
            requests, reason = None, "the table is larger than the entry budget"
        elif spec.budget_time and len(requests) * count / KERNEL_WALK_RATE > spec.budget_time:
            requests, reason = None, "kernel walks would exceed the time budget"
        elif spec.target_usage is not None:
            requests, reason = None, "a usage target needs a sweep that can stop early"
    if requests is None:
        if kernel_filter:
            raise ValueError("kernel-side filter required but not possible: " + reason)
        return EvictPlan("userspace", reason, (), dumps)
    return EvictPlan("kernel", reason, tuple(requests), dumps)


# ---------------------------------------------------------------------------
# report


class _TopTalkers:
    """Heavy hitters in bounded memory (Misra-Gries): a table of a million
    distinct sources must not become a million-key dict. Counts are exact
    while fewer than ``capacity`` keys were seen, lower bounds after."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.counts: Dict[bytes, int] = {}
        self.exact = True

    def add(self, key: bytes) -> None:
        c = self.counts
        if key in c:
            c[key] += 1
        elif len(c) < self.capacity:
            c[key] = 1
        else:
            self.exact = False
            for k in list(c):
                v = c[k] - 1
                if v:
                    c[k] = v
                else:
                    del c[k]

    def top(self, n: int) -> List[Tuple[str, int]]:
        items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [(_ntop(k), v) for k, v in items]


def _ntop(addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


def _category(proto: int, state: int) -> str:
    name = PROTO_NAMES.get(proto, str(proto))
    return "%s/%s" % (name, TCP_STATES[state]) if proto == 6 and 0 <= state < len(TCP_STATES) else name


@dataclass
class EvictReport:
    """What a sweep did (or, dry-run, would do).

    ``matched``: entries selected (within budget/target); ``done``: deleted
    or aged (dry-run: 0); ``gone``: selected but already gone when acted on
    (ENOENT: expired, or its CTA_ID no longer matched). On the kernel path
    ``done`` is the drop in the namespace's count and the per-category
    summary is not available (``detailed`` False).
    """

    mode: str
    dry_run: bool
    path: str
    reason: str
    stopped: str = "complete"  # complete | budget_entries | budget_time | target
    scanned: int = 0
    matched: int = 0
    done: int = 0
    gone: int = 0
    errors: Dict[str, int] = field(default_factory=dict)
    errors_lost: int = 0
    by_category: Dict[str, int] = field(default_factory=dict)
    top_sources: List[Tuple[str, int]] = field(default_factory=list)
    top_destinations: List[Tuple[str, int]] = field(default_factory=list)
    talkers_exact: bool = True
    detailed: bool = True
    fallback: Optional[str] = None
    count_before: int = 0
    count_after: int = 0
    max: int = 0
    usage_before: float = 0.0
    usage_after: float = 0.0
    duration_s: float = 0.0

    def log_fields(self) -> Dict[str, Any]:
        """Flat fields for one structlog event."""
        out = {k: getattr(self, k) for k in (
            "mode", "dry_run", "path", "reason", "stopped", "scanned", "matched", "done",
            "gone", "errors", "errors_lost", "by_category", "top_sources", "top_destinations",
            "count_before", "count_after", "max", "usage_before", "usage_after", "duration_s")}
        if self.fallback:
            out["fallback"] = self.fallback
        return out


# ---------------------------------------------------------------------------
# act


def evict(ct: CtnetlinkSocket, spec: EvictSpec, *, dry_run: bool = False,
          usage: Optional[Callable[[], float]] = None, kernel_filter: Optional[bool] = None,
          log: Any = None, top: int = 10,
          clock: Callable[[], float] = time.monotonic) -> EvictReport:
    """Run one sweep of ``spec`` over ``ct``'s namespace and report it.

    ``usage``: a probe returning the usage ratio to compare with
    ``spec.target_usage`` (e.g. the fullest watched namespace); it must not
    use ``ct`` (a dump owns that socket's receive queue while it runs).
    Without one, usage is ``ct``'s count/max, projected during the sweep.
    ``log``: optional structlog-style logger, only used for a kernel filter
    that fails at run time.
    """
    start = clock()
    count_before, ct_max = ct.stats()
    usage_before = usage() if usage is not None else count_before / ct_max
    chosen = plan(ct, spec, count_before, kernel_filter)
    report = EvictReport(mode=spec.mode, dry_run=dry_run, path=chosen.path, reason=chosen.reason,
                         count_before=count_before, max=ct_max, usage_before=usage_before)

    target = spec.target_usage
    if target is not None and usage_before <= target:
        report.stopped = "target"
    elif chosen.path == "kernel" and not dry_run:
        if not _run_kernel(ct, chosen, report, log):
            report.path = "userspace"
            _run_userspace(ct, spec, chosen, report, dry_run, usage, top, clock, start)
    else:
        _run_userspace(ct, spec, chosen, report, dry_run, usage, top, clock, start)

    report.count_after, _ = ct.stats()
    report.usage_after = usage() if usage is not None else report.count_after / ct_max
    report.duration_s = clock() - start
    return report


def _run_kernel(ct: CtnetlinkSocket, chosen: EvictPlan, report: EvictReport, log: Any) -> bool:
    before = report.count_before
    for i, request in enumerate(chosen.kernel_requests):
        try:
            ct.filtered_delete(**request)
        except CtnetlinkError as exc:
            if exc.errno not in (_errno.EOPNOTSUPP, _errno.EINVAL):
                raise
            # The socket has struck the feature off; the userspace sweep
            # finishes the job (entries already deleted are simply not seen).
            report.fallback = "kernel filter rejected (%s) after %d of %d requests" % (
                _errno.errorcode.get(exc.errno, exc.errno), i, len(chosen.kernel_requests))
            if log is not None:
                log.warning("evict_kernel_filter_fallback", reason=report.fallback)
            return False
    after, _ = ct.stats()
    report.done = report.matched = max(0, before - after)
    report.detailed = False
    return True


def _entries(ct: CtnetlinkSocket, dumps: Tuple[Dict[str, Any], ...], report: EvictReport):
    """Entries of every planned dump in turn; each dump is read to its end.

    Leaving the loop early closes this generator, which closes the current
    dump's generator, which reads the rest of that dump unparsed: an
    abandoned dump would make the next request fail with EBUSY.
    """
    for i, request in enumerate(dumps):
        dump = iter(ct.dump(**request))
        first = True
        try:
            for e in dump:
                first = False
                yield e
        except CtnetlinkError as exc:
            # A kernel that rejects the tuple pre-filter: strike it and dump
            # unfiltered-by-tuple instead (only before anything was seen).
            if not (first and i == 0 and "tuple_filter" in request
                    and exc.errno in (_errno.EOPNOTSUPP, _errno.EINVAL)):
                raise
            ct.strike_feature("dump_tuple")
            report.fallback = "dump tuple filter rejected (%s)" % _errno.errorcode.get(exc.errno)
            request = {k: v for k, v in request.items() if k != "tuple_filter"}
            yield from _entries(ct, (request,), report)
            return
        finally:
            dump.close()  # type: ignore[attr-defined]


def _run_userspace(ct: CtnetlinkSocket, spec: EvictSpec, chosen: EvictPlan, report: EvictReport,
                   dry_run: bool, usage: Optional[Callable[[], float]], top: int,
                   clock: Callable[[], float], start: float) -> None:
    match = compile_matcher(spec)
    categories: Counter = Counter()
    sources, destinations = _TopTalkers(), _TopTalkers()
    budget = spec.budget_entries or float("inf")
    deadline = start + spec.budget_time if spec.budget_time else float("inf")
    target = spec.target_usage
    ct_max = report.max
    age = int(-(-spec.age_timeout // 1))  # whole seconds, rounded up
    act_delete = spec.mode == "delete" and not dry_run
    act_age = spec.mode == "age" and not dry_run
    writer = ct.writer(BATCH)
    ct.collect_errors()  # start from a clean tally
    lost_before = ct.errors_lost
    scanned = matched = 0
    stopped = "complete"

    entries = _entries(ct, chosen.dumps, report)
    try:
        for e in entries:
            scanned += 1
            if not scanned & 1023 and clock() > deadline:
                stopped = "budget_time"
                break
            if not match(e):
                continue
            matched += 1
            categories[(e.proto, e.state)] += 1
            sources.add(e.src)
            destinations.add(e.dst)
            if act_delete:
                writer.delete(e)
            elif act_age:
                writer.set_timeout(e, age)
            if matched >= budget:
                stopped = "budget_entries"
                break
            if target is not None and not matched % BATCH:
                if act_delete and usage is not None:
                    now = usage()
                else:
                    # Deletes are done by the time send() returns; aged and
                    # dry-run entries are counted as if already gone, so a
                    # dry run stops where the real one would.
                    now = report.usage_before - (matched - sum(ct.errors.values())) / ct_max
                if now <= target:
                    stopped = "target"
                    break
            if not matched % BATCH and clock() > deadline:
                stopped = "budget_time"
                break
    finally:
        entries.close()  # drains the current dump to its end
        writer.flush()
    errors = ct.collect_errors()
    gone = errors.pop(_errno.ENOENT, 0)
    report.stopped = stopped
    report.scanned = scanned
    report.matched = matched
    report.gone = gone
    report.errors = {_errno.errorcode.get(k, str(k)): v for k, v in errors.items()}
    report.errors_lost = ct.errors_lost - lost_before
    report.done = 0 if dry_run else max(0, writer.sent - gone - sum(errors.values()))
    report.by_category = {_category(p, s): n for (p, s), n in categories.most_common()}
    report.top_sources = sources.top(top)
    report.top_destinations = destinations.top(top)
    report.talkers_exact = sources.exact and destinations.exact


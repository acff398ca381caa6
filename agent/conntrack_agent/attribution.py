"""Who fills the table: one bounded pass over a namespace's conntrack entries.

``attribute(ct)`` reads one ctnetlink dump of the namespace ``ct`` was opened in
and says what the table is made of: the state mix (assured, unreplied, other;
unreplied entries are the ones the kernel's early_drop may reclaim when the
table is full), per-protocol counts, the top sources aggregated to /24 (IPv4)
and /64 (IPv6), and the top destination:port per protocol.

Bounded, because the table can hold millions of entries:

- an entry budget: at most ``entry_budget`` entries are decoded. The stride is
  chosen from the count the kernel reports just before the dump (every k-th
  message is decoded, the others only counted) and doubled if the table grows
  past it meanwhile. The kernel walks its hash table in hash order, which has
  nothing to do with the tuple (the hash is keyed with a boot-time random
  seed), so every k-th entry is a uniform sample; the result says so and gives
  the scale factor (entries seen / entries decoded);
- a time budget for the decoding (``time_budget``): past it the rest of the
  dump is only counted, never decoded, and the sample is what was decoded;
- the dump is read to its end (a half-read dump makes the socket's next
  request fail), unparsed, which costs the kernel's walk and the copy only. The
  kernel walks the whole global table for every dump, whatever the namespace
  (~94 ms at 250k entries elsewhere), so draining can take long: when it would
  not end within ``drain_budget`` more seconds (predicted from the rate so far,
  or simply over), the socket is closed instead, and the result says so
  (``closed``); the caller opens a new one for the next pass. A caller that
  closes the socket after the pass anyway (the agent's, kernel.py) passes a
  ``drain_budget`` of 0: the socket is closed as soon as decoding stops.

The aggregation (``Tally``, ``aggregate``) is pure and separate from the dump
loop; ``render_top`` draws one frame of the node view (pure, for
``conntrack-agent top``).
"""

from __future__ import annotations

import errno
import heapq
import math
import os
import socket
import struct
import time
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .ctnetlink import (
    AF_INET,
    AF_INET6,
    IPCTNL_MSG_CT_NEW,
    IPS_ASSURED,
    IPS_SEEN_REPLY,
    NFNL_SUBSYS_CTNETLINK,
    NLMSG_DONE,
    NLMSG_ERROR,
    PROTO_NAMES,
    CtEntry,
    CtnetlinkError,
    CtnetlinkSocket,
    decode_entries,
    encode_dump_request,
)

__all__ = ["Tally", "Attribution", "aggregate", "attribute", "TopRow", "render_top",
           "format_source", "format_destination"]

ENTRY_BUDGET = 20000     # entries decoded per pass, at most (~0.2-0.4 s of decoding at 54-97k/s ...
TIME_BUDGET = 0.05       # ... so the time budget usually binds first: seconds of decoding per pass)
# Seconds more to read the rest of the dump unparsed, else the socket is closed (reopening one
# costs an entry into the namespace, ~0.1 ms; measured draining: ~125k entries/s on 2 vCPUs).
DRAIN_BUDGET = 0.1
TOP = 10

STATES = ("assured", "unreplied", "other")

_MSG_CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_HDR = struct.Struct("=IHHII")   # nlmsghdr: len, type, flags, seq, pid
_ERRNO = struct.Struct("=i")

SourceKey = Tuple[int, bytes]                  # (family, /24 or /64 prefix bytes)
DestKey = Tuple[int, int, bytes, Optional[int]]  # (family, proto, address, port)


def state_of(status: int) -> str:
    """assured; unreplied (no reply seen: what early_drop may evict); other
    (replied, not assured yet)."""
    if status & IPS_ASSURED:
        return "assured"
    if not status & IPS_SEEN_REPLY:
        return "unreplied"
    return "other"


class Tally:
    """Counts over decoded entries (pure). Memory is bounded by the entries added,
    which the pass bounds by its entry budget. Keys stay raw (bytes, ints) while
    counting; only the top ones are formatted."""

    __slots__ = ("n", "assured", "unreplied", "protocols", "sources", "destinations")

    def __init__(self) -> None:
        self.n = 0
        self.assured = 0
        self.unreplied = 0
        self.protocols: Dict[int, int] = {}
        self.sources: Dict[SourceKey, int] = {}
        self.destinations: Dict[DestKey, int] = {}

    def add(self, e: CtEntry) -> None:
        self.n += 1
        status = e.status
        if status & IPS_ASSURED:
            self.assured += 1
        elif not status & IPS_SEEN_REPLY:
            self.unreplied += 1
        family, proto = e.family, e.proto
        p = self.protocols
        p[proto] = p.get(proto, 0) + 1
        src = (family, e.src[:3] if family == AF_INET else e.src[:8])
        s = self.sources
        s[src] = s.get(src, 0) + 1
        dst = (family, proto, e.dst, e.dport)
        d = self.destinations
        d[dst] = d.get(dst, 0) + 1

    def add_all(self, entries: Iterable[CtEntry]) -> "Tally":
        for e in entries:
            self.add(e)
        return self

    @property
    def states(self) -> Dict[str, int]:
        return {"assured": self.assured, "unreplied": self.unreplied,
                "other": self.n - self.assured - self.unreplied}

    def hosts(self) -> Dict[DestKey, int]:
        """Destinations whatever the port."""
        out: Dict[DestKey, int] = {}
        for (family, proto, addr, _port), n in self.destinations.items():
            key = (family, proto, addr, None)
            out[key] = out.get(key, 0) + n
        return out


def format_source(key: SourceKey) -> str:
    family, prefix = key
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, prefix + bytes(4 - len(prefix))) + "/24"
    if family == AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, prefix + bytes(16 - len(prefix))) + "/64"
    return "family %d" % family


def format_destination(key: DestKey) -> str:
    family, proto, addr, port = key
    name = PROTO_NAMES.get(proto, str(proto))
    try:
        text = socket.inet_ntop(socket.AF_INET if family == AF_INET else socket.AF_INET6, addr)
    except (ValueError, OSError):
        text = addr.hex() or "?"
    if port is None:
        return "%s %s" % (name, text)
    if family == AF_INET6:
        return "%s [%s]:%d" % (name, text, port)
    return "%s %s:%d" % (name, text, port)


def _order(item: Tuple[tuple, int]) -> tuple:
    # Most first; ties in address order (IPv4 before IPv6, then by protocol, address,
    # port), so a frame does not reorder between passes for nothing. None (no port)
    # sorts before every port.
    key, n = item
    return (-n,) + tuple(-1 if k is None else k for k in key)


def _top(counts: Mapping, n: int, fmt: Callable) -> List[Tuple[str, int]]:
    return [(fmt(k), v) for k, v in heapq.nsmallest(n, counts.items(), key=_order)]


class Attribution(NamedTuple):
    """One pass's answer. Counts are of the decoded sample; ``scale`` turns them into
    estimates for the whole table (``estimate``), 1.0 when nothing was skipped."""

    total: int                      # entries the dump returned (all when complete), else seen so far
    expected: int                   # the count the kernel reported just before the pass
    sampled: int                    # entries decoded
    scale: float                    # total / sampled (1.0: every entry decoded)
    complete: bool                  # the dump was read to its end
    closed: bool                    # the socket was closed, its dump unfinished (drain over budget)
    seconds: float                  # wall time of the whole pass
    decode_seconds: float           # of which decoding and counting
    states: Dict[str, int]          # assured / unreplied / other, of the sample
    protocols: Dict[str, int]       # "udp" -> sampled entries
    sources: List[Tuple[str, int]]  # ("10.1.2.0/24", sampled entries), most first
    destinations: List[Tuple[str, int]]  # ("udp 10.0.0.1:53", sampled entries), most first
    hosts: List[Tuple[str, int]]    # ("udp 10.0.0.1", sampled entries): destinations, any port
    note: str = ""                  # why it was sampled or cut short, for the log

    @property
    def sampled_pass(self) -> bool:
        return self.sampled < self.total

    def estimate(self, n: int) -> int:
        return int(round(n * self.scale))

    def share(self, n: int) -> float:
        return n / self.sampled if self.sampled else 0.0


def aggregate(entries: Iterable[CtEntry], total: Optional[int] = None, top: int = TOP, **extra) -> Attribution:
    """The pure part: an Attribution from decoded entries. ``total``: how many
    entries they were sampled from (default: exactly these)."""
    tally = Tally().add_all(entries)
    return _result(tally, tally.n if total is None else total, top, **extra)


def _result(tally: Tally, total: int, top: int, expected: Optional[int] = None, complete: bool = True,
            closed: bool = False, seconds: float = 0.0, decode_seconds: float = 0.0, note: str = "") -> Attribution:
    total = max(total, tally.n)
    # Nothing decoded (the budget ran out before the first entry of this namespace): no
    # estimate to scale; say 0 rather than infinity.
    scale = total / tally.n if tally.n else 0.0
    protocols: Dict[str, int] = {}
    for proto, n in sorted(tally.protocols.items(), key=lambda kv: -kv[1]):
        name = PROTO_NAMES.get(proto, str(proto))
        protocols[name] = protocols.get(name, 0) + n
    return Attribution(
        total=total, expected=total if expected is None else expected, sampled=tally.n, scale=scale,
        complete=complete, closed=closed, seconds=seconds, decode_seconds=decode_seconds,
        states=tally.states, protocols=protocols,
        sources=_top(tally.sources, top, format_source),
        destinations=_top(tally.destinations, top, format_destination),
        hosts=_top(tally.hosts(), top, format_destination), note=note)


# --------------------------------------------------------------------------- the pass

def _recv(sock: socket.socket, buf: bytearray) -> int:
    while True:
        try:
            return sock.recv_into(buf)
        except OSError as exc:
            # ENOBUFS only drops unicast error replies; a dump waits for room.
            if exc.errno != errno.ENOBUFS:
                raise


def attribute(ct: CtnetlinkSocket, entry_budget: int = ENTRY_BUDGET, time_budget: float = TIME_BUDGET,
              drain_budget: float = DRAIN_BUDGET, top: int = TOP, family: int = 0,
              expected: Optional[int] = None, clock: Callable[[], float] = time.perf_counter) -> Attribution:
    """One bounded pass over the table of the namespace ``ct`` was opened in.

    ``ct`` must be a socket of its own, not the sampler's: the pass owns its
    receive queue until the dump ends. ``expected``: the count if the caller
    just read it (else one GET_STATS request asks). When the result says
    ``closed``, ``ct`` is closed and the caller opens a new socket.
    """
    if entry_budget < 1:
        raise ValueError("entry_budget must be at least 1")
    start = clock()
    if expected is None:
        expected = ct.stats()[0]
    stride = max(1, math.ceil(expected / entry_budget))
    sock = ct.sock
    seq = ct.next_seq()
    sock.send(encode_dump_request(seq, family))
    buf = bytearray(65536)
    unpack_hdr = _HDR.unpack_from
    tally = Tally()
    add = tally.add
    seen = 0                # CT_NEW messages received
    next_pick = 0           # index of the next message to decode
    decoding = True
    decode_seconds = 0.0
    decode_deadline = start + time_budget
    drain_started: Optional[float] = None   # when only counting began
    drain_seen = 0
    drain_deadline = float("inf")
    notes: List[str] = []
    complete = closed = False
    try:
        while True:
            n = _recv(sock, buf)
            decoded_chunk = decoding
            t0 = clock() if decoded_chunk else 0.0
            off = 0
            while off + 16 <= n:
                mlen, mtype, _flags, mseq, _pid = unpack_hdr(buf, off)
                if mlen < 16:
                    break
                if mseq == seq:
                    if mtype == _MSG_CT_NEW:
                        if decoding and seen == next_pick:
                            for e in decode_entries(buf[off:off + mlen]):
                                add(e)
                            next_pick += stride
                            if tally.n >= entry_budget:
                                # More entries than the count promised (the table grew meanwhile):
                                # what was decoded is already a uniform sample, stop there.
                                decoding = False
                                notes.append("decoding stopped at the entry budget (%d)" % entry_budget)
                        seen += 1
                    elif mtype == NLMSG_DONE:
                        complete = True
                        break
                    elif mtype == NLMSG_ERROR:
                        err = -_ERRNO.unpack_from(buf, off + 16)[0]
                        complete = True   # an error reply ends the dump too
                        if err:
                            raise CtnetlinkError(err, "ctnetlink dump: %s" % os.strerror(err))
                        break
                off += (mlen + 3) & ~3
            if complete:
                break
            now = clock()
            if decoded_chunk:
                decode_seconds += now - t0
                if decoding and now >= decode_deadline:
                    decoding = False
                    notes.append("decoding stopped after %.0f ms (time budget)" % (time_budget * 1e3))
            if decoding:
                continue
            if drain_budget <= 0:
                notes.append("socket closed with ~%d entries unread (not drained)" % max(0, expected - seen))
                ct.close()
                closed = True
                break
            if drain_started is None:
                drain_started, drain_seen = now, seen
                drain_deadline = now + drain_budget
            else:
                # Predicted from the rate since counting began (after 1000 entries, so one
                # slow chunk does not decide), or simply over.
                left = max(0, expected - seen)
                counted = seen - drain_seen
                rate = counted / (now - drain_started) if now > drain_started else 0.0
                if now >= drain_deadline or (counted >= 1000 and rate > 0
                                             and now + left / rate > drain_deadline):
                    notes.append("socket closed with ~%d entries unread: draining them would take over "
                                 "%.0f ms more" % (left, drain_budget * 1e3))
                    ct.close()
                    closed = True
                    break
    except BaseException:
        if not complete and not closed:
            ct.close()   # a dump in an unknown state: nobody can use this socket again
        raise
    if stride > 1:
        notes.insert(0, "sampled 1 in %d (%d entries expected)" % (stride, expected))
    return _result(tally, seen if complete else max(seen, expected), top, expected=expected,
                   complete=complete, closed=closed, seconds=clock() - start,
                   decode_seconds=decode_seconds, note="; ".join(notes))


# --------------------------------------------------------------------------- top

class TopRow(NamedTuple):
    """One namespace's line in the node view."""

    name: str                       # /run/netns name, "host", or net:[INODE]
    inode: int
    count: int
    max: int
    fill_rate: float                # entries/s (EWMA)
    time_to_full: Optional[float]   # seconds, None when not filling
    drops: int                      # drop + early_drop since the view started
    labels: Mapping[str, str]

    @property
    def usage(self) -> float:
        return self.count / self.max if self.max > 0 else 1.0


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return "%.0fs" % seconds if seconds >= 10 else "%.1fs" % seconds
    if seconds < 3600:
        return "%.0fm" % (seconds / 60)
    if seconds < 86400:
        return "%.1fh" % (seconds / 3600)
    return ">1d"


def _labels_text(labels: Mapping[str, str]) -> str:
    parts = []
    if labels.get("pod_uid"):
        parts.append("pod=" + labels["pod_uid"])
    if labels.get("container"):
        parts.append("%s=%s" % (labels.get("runtime") or "container", labels["container"][:12]))
    if labels.get("unit") and not labels.get("container"):
        parts.append("unit=" + labels["unit"])
    return " ".join(parts)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "~"


def render_top(rows: Sequence[TopRow], selected: Optional[str] = None,
               attribution: Optional[Attribution] = None, width: int = 100, limit: int = 20,
               header: str = "", left_out: int = 0) -> str:
    """One frame of ``conntrack-agent top`` as text (pure).

    Namespaces fullest first (ties: fastest filling), at most ``limit`` rows, then
    the top talkers of ``selected`` from ``attribution`` when given.
    """
    ordered = sorted(rows, key=lambda r: (-r.count, -r.fill_rate, r.name))
    lines = []
    title = "conntrack-agent top"
    if header:
        title += " - " + header
    shown = min(len(ordered), limit)
    title += "   %d namespace%s" % (len(rows), "" if len(rows) == 1 else "s")
    if left_out:
        title += " (+%d not watched: cap)" % left_out
    lines.append(_cut(title, width))
    cols = "%-24s %9s %6s %9s %8s %7s  %s" % ("NAMESPACE", "COUNT", "USE", "FILL/s", "FULL IN", "DROPS", "LABELS")
    lines.append(_cut(cols, width))
    for r in ordered[:shown]:
        mark = ">" if selected is not None and r.name == selected else " "
        name = mark + _cut(r.name, 23)
        line = "%-24s %9d %5.1f%% %+9.0f %8s %7d  %s" % (
            name, r.count, 100 * r.usage, r.fill_rate, _duration(r.time_to_full), r.drops,
            _labels_text(r.labels))
        lines.append(_cut(line.rstrip(), width))
    if shown < len(ordered):
        rest = ordered[shown:]
        lines.append(" ... %d more, %d entries" % (len(rest), sum(r.count for r in rest)))
    if attribution is not None:
        lines.append("")
        lines.extend(_cut(line, width) for line in render_attribution(attribution, selected or "?"))
    return "\n".join(lines) + "\n"


def render_attribution(a: Attribution, name: str, rows: int = 5) -> List[str]:
    """The talkers part of a frame: mix, protocols, then the top sources, destination
    addresses and destination:ports, ``rows`` each, estimated for the whole table."""
    head = "top talkers in %s: %d entries" % (name, a.total)
    if a.sampled_pass:
        head += ", sampled %d (x%.1f)" % (a.sampled, a.scale)
    head += ", %.0f ms" % (a.seconds * 1e3)
    if not a.complete:
        head += ", dump cut short"
    out = [head]
    if a.note:
        out.append("  " + a.note)
    if not a.sampled:
        out.append("  (no entries)")
        return out
    mix = ", ".join("%s %.0f%%" % (s, 100 * a.share(a.states.get(s, 0))) for s in STATES)
    out.append("  state: %s (unreplied: what early_drop can reclaim)" % mix)
    out.append("  proto: " + ", ".join("%s %d" % (p, a.estimate(n)) for p, n in a.protocols.items()))
    for title, items in (("sources", a.sources), ("destinations", a.hosts), ("destination:port", a.destinations)):
        if not items:
            continue
        out.append("  %-40s %9s %6s" % (title.upper(), "ENTRIES", "SHARE"))
        for key, n in items[:rows]:
            out.append("    %-38s %9d %5.0f%%" % (_cut(key, 38), a.estimate(n), 100 * a.share(n)))
    return out

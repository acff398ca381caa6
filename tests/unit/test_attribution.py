"""attribution.py without a kernel: the pure aggregation on CtEntry lists, the
bounded dump loop on a scripted socket replaying ctnetlink messages, and the
`top` frame.

The messages are encoded here from the wire format (nlmsghdr, nfgenmsg, nested
big-endian attributes) independently of ctnetlink.py's own encoders, so the
loop is fed what a kernel sends, and the decoder is checked on the way.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from typing import List, Optional

import pytest

from conntrack_agent import attribution as A
from conntrack_agent.ctnetlink import (AF_INET, AF_INET6, IPS_ASSURED, IPS_SEEN_REPLY, CtEntry, CtnetlinkError,
                                       CtnetlinkSocket)

UNREPLIED, REPLIED, ASSURED = 0, IPS_SEEN_REPLY, IPS_SEEN_REPLY | IPS_ASSURED


def ip(text: str) -> bytes:
    return socket.inet_pton(AF_INET6 if ":" in text else AF_INET, text)


def entry(src: str, dst: str, proto: int = 17, sport: Optional[int] = 40000, dport: Optional[int] = 53,
          status: int = UNREPLIED, eid: int = 1) -> CtEntry:
    fam = AF_INET6 if ":" in src else AF_INET
    return CtEntry(fam, proto, ip(src), ip(dst), sport, dport, status, 0, 0, 30, -1, eid, b"")


# --------------------------------------------------------------------------- pure aggregation

def test_state_mix_protocols_and_prefixes():
    entries = (
        [entry("10.1.2.%d" % i, "10.96.0.10", dport=53) for i in range(1, 7)]          # 6 unreplied udp
        + [entry("10.1.3.9", "10.96.0.1", proto=6, dport=443, status=ASSURED)] * 3   # 3 assured tcp
        + [entry("10.1.3.200", "10.96.0.1", proto=6, dport=443, status=REPLIED)]     # 1 replied, not assured
        + [entry("fd00:1:2:3::5", "fd00::53", dport=53), entry("fd00:1:2:3:ffff::1", "fd00::53", dport=53)]
        + [entry("10.9.9.9", "10.96.0.10", proto=1, sport=None, dport=None)]
    )
    a = A.aggregate(entries)
    assert (a.total, a.sampled, a.scale, a.complete, a.closed) == (13, 13, 1.0, True, False)
    assert a.states == {"assured": 3, "unreplied": 9, "other": 1}
    assert a.protocols == {"udp": 8, "tcp": 4, "icmp": 1}
    assert a.sources == [("10.1.2.0/24", 6), ("10.1.3.0/24", 4), ("fd00:1:2:3::/64", 2), ("10.9.9.0/24", 1)]
    assert a.destinations[:3] == [("udp 10.96.0.10:53", 6), ("tcp 10.96.0.1:443", 4), ("udp [fd00::53]:53", 2)]
    assert ("icmp 10.96.0.10", 1) in a.destinations
    assert a.hosts[:2] == [("udp 10.96.0.10", 6), ("tcp 10.96.0.1", 4)]


def test_top_is_cut_and_ties_break_in_address_order():
    entries = [entry("10.0.%d.1" % i, "1.1.1.1") for i in (10, 5, 9)] + [entry("10.0.200.1", "1.1.1.1")] * 2
    a = A.aggregate(entries, top=3)
    assert a.sources == [("10.0.200.0/24", 2), ("10.0.5.0/24", 1), ("10.0.9.0/24", 1)]
    ports = [entry("10.0.0.1", "1.1.1.1", dport=p) for p in (1000, 53, 200)]
    assert [k for k, _ in A.aggregate(ports).destinations] == [
        "udp 1.1.1.1:53", "udp 1.1.1.1:200", "udp 1.1.1.1:1000"]


def test_a_sample_scales_to_the_table():
    a = A.aggregate([entry("10.0.0.1", "1.1.1.1")] * 3 + [entry("10.0.1.1", "1.1.1.1")], total=40)
    assert a.scale == 10.0 and a.sampled_pass
    assert a.estimate(a.sources[0][1]) == 30 and a.share(a.sources[0][1]) == 0.75


def test_nothing_to_count():
    a = A.aggregate([])
    assert (a.total, a.sampled, a.scale, a.sources) == (0, 0, 0.0, [])
    assert not a.sampled_pass


# --------------------------------------------------------------------------- the wire, for the loop

NLM_F_MULTI = 2
CT_NEW = (1 << 8) | 0
NESTED = 0x8000


def attr(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, atype) + payload + bytes((-length) % 4)


def ct_message(e: CtEntry, seq: int) -> bytes:
    v6 = e.family == AF_INET6
    ipn = attr(NESTED | 1, attr(3 if v6 else 1, e.src) + attr(4 if v6 else 2, e.dst))
    proto = attr(1, bytes([e.proto]))
    if e.sport is not None:
        proto += attr(2, struct.pack(">H", e.sport)) + attr(3, struct.pack(">H", e.dport))
    tup = attr(NESTED | 1, ipn + attr(NESTED | 2, proto))
    body = (tup + attr(3, struct.pack(">I", e.status)) + attr(7, struct.pack(">I", 30))
            + attr(12, struct.pack(">I", e.id)))
    payload = bytes([e.family, 0, 0, 0]) + body
    return struct.pack("=IHHII", 16 + len(payload), CT_NEW, NLM_F_MULTI, seq, 0) + payload


def done(seq: int) -> bytes:
    return struct.pack("=IHHII", 20, 3, NLM_F_MULTI, seq, 0) + bytes(4)


def error(seq: int, err: int) -> bytes:
    return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -err) + bytes(16)


class ScriptedSocket:
    """What a netlink socket does during a dump, replayed: the dump request is
    checked, then each recv_into returns the next chunk of messages carrying the
    request's sequence number."""

    def __init__(self, entries: List[CtEntry], per_chunk: int = 50, extra=None, end="done",
                 clock=None, recv_cost: float = 0.0) -> None:
        self.entries = entries
        self.per_chunk = per_chunk
        self.extra = extra or []
        self.end = end
        self.chunks: List[bytes] = []
        self.recvs = 0
        self.closed = False
        self.clock = clock
        self.recv_cost = recv_cost

    def send(self, data: bytes) -> int:
        length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", data)
        assert mtype == (1 << 8) | 1 and flags & 0x300, "not a ctnetlink dump request"
        msgs = [ct_message(e, seq) for e in self.entries]
        chunks = [b"".join(msgs[i:i + self.per_chunk]) for i in range(0, len(msgs), self.per_chunk)]
        chunks = [c for c in chunks] or [b""]
        chunks[0] = b"".join(x(seq) for x in self.extra) + chunks[0]
        end = done(seq) if self.end == "done" else error(seq, self.end)
        self.chunks = chunks[:-1] + [chunks[-1] + end] if chunks[-1] else chunks[:-1] + [end]
        return len(data)

    def recv_into(self, buf, nbytes=0, flags=0):
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.recvs >= len(self.chunks):
            raise AssertionError("recv after the dump ended: would block forever")
        chunk = self.chunks[self.recvs]
        self.recvs += 1
        if self.clock is not None:
            self.clock.t += self.recv_cost
        buf[:len(chunk)] = chunk
        return len(chunk)

    def close(self):
        self.closed = True


class Clock:
    def __init__(self, step: float = 0.0) -> None:
        self.t = 0.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def population(n: int) -> List[CtEntry]:
    # 60% from 10.0.1.0/24, 30% from 10.0.2.0/24, 10% from fd00::/64; a fifth assured tcp
    out = []
    for i in range(n):
        r = i % 10
        src = "10.0.1.%d" % (i % 250 + 1) if r < 6 else ("10.0.2.7" if r < 9 else "fd00::%x" % (i + 1))
        dst = "fd00::53" if ":" in src else "10.96.0.10"
        if i % 5 == 0:
            out.append(entry(src, dst, proto=6, dport=443, status=ASSURED, eid=i + 1))
        else:
            out.append(entry(src, dst, dport=53, eid=i + 1))
    return out


def test_a_pass_within_budget_reads_everything_and_matches_the_pure_aggregate():
    entries = population(500)
    fake = ScriptedSocket(entries)
    ct = CtnetlinkSocket.from_socket(fake)
    a = A.attribute(ct, expected=500)
    assert a.complete and not a.closed and not a.sampled_pass and a.note == ""
    pure = A.aggregate(entries)
    assert (a.total, a.states, a.protocols, a.sources, a.destinations) == (
        pure.total, pure.states, pure.protocols, pure.sources, pure.destinations)
    assert fake.recvs == len(fake.chunks) and not fake.closed


def test_over_the_entry_budget_every_kth_entry_is_decoded():
    entries = population(1000)
    ct = CtnetlinkSocket.from_socket(ScriptedSocket(entries))
    a = A.attribute(ct, entry_budget=100, expected=1000)
    assert a.complete and a.total == 1000 and a.sampled == 100 and a.scale == 10.0
    assert a.note.startswith("sampled 1 in 10")
    # every 10th of population(): i % 10 == 0, i.e. 10.0.1.0/24 and, i % 5 == 0, assured tcp
    assert a.sources == [("10.0.1.0/24", 100)] and a.states["assured"] == 100


def test_sampled_shares_stay_close_to_the_truth():
    import random

    # The kernel dumps in hash order, which a keyed hash makes unrelated to the tuple:
    # a shuffled population stands for it (population() itself is periodic).
    entries = population(1000)
    random.Random(7).shuffle(entries)
    ct = CtnetlinkSocket.from_socket(ScriptedSocket(entries))
    a = A.attribute(ct, entry_budget=300, expected=1000)   # stride 4
    shares = {k: a.share(n) for k, n in a.sources}
    assert shares == pytest.approx({"10.0.1.0/24": 0.6, "10.0.2.0/24": 0.3, "fd00::/64": 0.1}, abs=0.06)


def test_a_table_that_grew_past_the_count_stops_decoding_at_the_budget():
    entries = population(1000)
    ct = CtnetlinkSocket.from_socket(ScriptedSocket(entries))
    a = A.attribute(ct, entry_budget=100, expected=200)   # stride 2, but 1000 entries came
    assert a.sampled == 100 and a.total == 1000 and a.complete
    assert "entry budget" in a.note


def test_past_the_time_budget_the_rest_is_drained_unparsed():
    entries = population(1000)
    clock = Clock()
    fake = ScriptedSocket(entries, per_chunk=100, clock=clock, recv_cost=0.01)
    ct = CtnetlinkSocket.from_socket(fake)
    a = A.attribute(ct, time_budget=0.025, drain_budget=10.0, expected=1000, clock=clock)
    # three chunks (30 ms) decoded, then only counted to NLMSG_DONE
    assert a.sampled == 300 and a.total == 1000 and a.complete and not a.closed
    assert "time budget" in a.note
    assert fake.recvs == len(fake.chunks)
    ct.stats  # the socket is still usable: not closed
    assert not fake.closed


def closed_pass(drain_budget: float):
    """A pass over 5000 entries, 100 a chunk at 10 ms a chunk, whose decoding stops after
    15 ms (two chunks) and whose socket is closed unfinished. Returns (result, socket)."""
    clock = Clock()
    fake = ScriptedSocket(population(5000), per_chunk=100, clock=clock, recv_cost=0.01)
    ct = CtnetlinkSocket.from_socket(fake)
    a = A.attribute(ct, time_budget=0.015, drain_budget=drain_budget, expected=5000, clock=clock)
    assert a.closed and not a.complete and fake.closed
    assert a.total == 5000 and a.sampled == 200 and a.scale == 25.0
    with pytest.raises(ValueError):
        ct.fileno()
    return a, fake


def test_a_drain_over_budget_closes_the_socket_and_says_so():
    a, fake = closed_pass(drain_budget=0.1)
    assert "socket closed" in a.note
    # Predicted, not waited for: 100 entries per 10 ms cannot drain 4800 in 100 ms.
    assert fake.recvs < 20


def test_messages_of_another_request_are_not_counted():
    entries = population(20)
    stray = lambda seq: ct_message(entry("192.0.2.1", "192.0.2.2"), seq + 1000)  # noqa: E731
    ct = CtnetlinkSocket.from_socket(ScriptedSocket(entries, extra=[stray]))
    a = A.attribute(ct, expected=20)
    assert a.total == 20 and "192.0.2.0/24" not in dict(a.sources)


def test_an_error_reply_ends_the_dump_and_is_raised():
    fake = ScriptedSocket(population(10), end=errno.EPERM)
    ct = CtnetlinkSocket.from_socket(fake)
    with pytest.raises(CtnetlinkError) as info:
        A.attribute(ct, expected=10)
    assert info.value.errno == errno.EPERM
    assert not fake.closed   # the dump ended: the socket is fine


def test_a_failure_mid_dump_closes_the_socket():
    class Broken(ScriptedSocket):
        def recv_into(self, buf, nbytes=0, flags=0):
            if self.recvs == 1:
                raise OSError(errno.EIO, "boom")
            return super().recv_into(buf, nbytes, flags)

    fake = Broken(population(200))
    ct = CtnetlinkSocket.from_socket(fake)
    with pytest.raises(OSError):
        A.attribute(ct, expected=200)
    assert fake.closed


def test_budgets_are_checked():
    with pytest.raises(ValueError):
        A.attribute(CtnetlinkSocket.from_socket(ScriptedSocket([])), entry_budget=0, expected=0)


# --------------------------------------------------------------------------- top

def rows():
    return [
        A.TopRow("host", 1, 1200, 262144, 5.0, None, 0, {"netns": "host"}),
        A.TopRow("cni-1f2e", 2, 180000, 262144, 20261.0, 4.1, 37,
                 {"pod_uid": "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d", "container": "ab" * 32,
                  "runtime": "containerd", "unit": "cri-containerd-x.scope"}),
        A.TopRow("net:[4026532999]", 3, 1200, 262144, 50.0, 5000.0, 0, {"unit": "foo.service"}),
    ]


def test_frame_sorts_by_usage_then_fill_rate_and_shows_labels():
    text = A.render_top(rows(), width=140)
    lines = text.splitlines()
    assert lines[0].startswith("conntrack-agent top") and "3 namespaces" in lines[0]
    assert lines[1].split()[:6] == ["NAMESPACE", "COUNT", "USE", "FILL/s", "FULL", "IN"]
    names = [ln.split()[0] for ln in lines[2:5]]
    assert names == ["cni-1f2e", "net:[4026532999]", "host"]
    cni = lines[2]
    assert "180000" in cni and "68.7%" in cni and "+20261" in cni and "4.1s" in cni and " 37 " in cni
    assert "pod=1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d" in cni and "containerd=abababababab" in cni
    assert "unit=" not in cni           # the container says more than its scope
    assert "unit=foo.service" in lines[3] and "1.4h" in lines[3]


def test_frame_limits_rows_and_cuts_to_width():
    text = A.render_top(rows(), limit=1, width=60, left_out=4)
    lines = text.splitlines()
    assert all(len(ln) <= 60 for ln in lines)
    assert "(+4 not watched: cap)" in lines[0] or lines[0].endswith("~")
    assert lines[-1] == " ... 2 more, 2400 entries"


def test_frame_with_the_selected_namespaces_talkers():
    a = A.aggregate([entry("10.0.1.1", "10.96.0.10")] * 3 + [entry("10.0.2.1", "10.96.0.10", proto=6,
                                                                    dport=443, status=ASSURED)], total=40)
    text = A.render_top(rows(), selected="cni-1f2e", attribution=a, width=120)
    assert ">cni-1f2e" in text
    assert "top talkers in cni-1f2e: 40 entries, sampled 4 (x10.0)" in text
    assert "state: assured 25%, unreplied 75%, other 0%" in text
    assert "proto: udp 30, tcp 10" in text
    src = [ln for ln in text.splitlines() if "10.0.1.0/24" in ln][0]
    assert src.split()[1:] == ["30", "75%"]
    assert any(ln.split()[:3] == ["udp", "10.96.0.10:53", "30"] for ln in text.splitlines())


def test_frame_of_an_incomplete_pass_says_so():
    a = A.aggregate([entry("10.0.1.1", "10.96.0.10")], total=100)._replace(
        complete=False, closed=True, note="socket closed with ~99 entries unread")
    text = "\n".join(A.render_attribution(a, "x"))
    assert "dump cut short" in text and "socket closed" in text


def test_with_no_drain_budget_the_socket_is_closed_as_soon_as_decoding_stops():
    a, fake = closed_pass(drain_budget=0.0)
    assert fake.recvs == 2                               # the two chunks decoding had time for
    assert "4800 entries unread" in a.note


def test_the_agents_pass_does_not_drain_the_socket_it_closes(monkeypatch):
    from conntrack_agent import kernel

    asked = {}

    class Socket:
        closed = False

        def close(self):
            self.closed = True

    sock = Socket()
    monkeypatch.setattr(kernel.ctnetlink, "CtnetlinkSocket", lambda: sock)
    monkeypatch.setattr(A, "attribute", lambda ct, **kw: asked.update(kw) or "result")
    linux = kernel.LinuxKernel()
    monkeypatch.setattr(linux, "entered", lambda name: contextlib.nullcontext())
    assert linux.attribute("", 1234) == "result"
    assert asked == {"expected": 1234, "drain_budget": 0.0} and sock.closed

"""attribution.py on real conntrack tables, checked against `conntrack -L`.

Populations are built in rig namespaces on loopback: unreplied UDP from a few
source addresses (bound explicitly: on lo every 127/8 address is local), IPv6
UDP from ::1, assured TCP (an echo session, TIME_WAIT leftovers) and unreplied
SYNs. The namespace's UDP timeout is raised (a per-namespace sysctl) so nothing
expires between the two reads. The big table takes rig.global_lock().
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import pytest

import rig
from conntrack_agent import attribution as A
from conntrack_agent.ctnetlink import CtnetlinkSocket

_FROM = r"""
import socket, sys
src, n, first_port, last_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
ports = last_port - first_port + 1
sent = 0
while sent < n:
    a, p = divmod(sent, ports)
    s.sendto(b"x", ("127.0.%d.%d" % (100 + a // 250, 2 + a % 250), first_port + p))
    sent += 1
print(sent)
"""


def flood_from(ns: rig.Namespace, src: str, n: int) -> None:
    """n unreplied UDP entries from ``src`` (dropped on input, like rig.flood_udp's)."""
    lo, hi = rig.FLOOD_PORTS
    out = ns.python(_FROM, src, str(n), str(lo), str(hi))
    assert int(out) == n


def slow_udp_timeout(ns: rig.Namespace) -> None:
    ns.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=600"])


def state(e: Dict) -> str:
    if "ASSURED" in e["flags"]:
        return "assured"
    if "UNREPLIED" in e["flags"]:
        return "unreplied"
    return "other"


def prefix(e: Dict) -> str:
    if e["family"] == 4:
        return ".".join(str(e["src"]).split(".")[:3]) + ".0/24"
    import ipaddress

    return str(ipaddress.ip_network(str(e["src"]) + "/64", strict=False))


def truth(entries: List[Dict]) -> Tuple[Counter, Counter, Counter, Counter]:
    states = Counter(state(e) for e in entries)
    protos = Counter(str(e["proto"]) for e in entries)
    sources = Counter(prefix(e) for e in entries)

    def dest(e):
        addr = str(e["dst"])
        if e["dport"] is None:
            return "%s %s" % (e["proto"], addr)
        return ("%s [%s]:%d" if e["family"] == 6 else "%s %s:%d") % (e["proto"], addr, e["dport"])

    dests = Counter(dest(e) for e in entries)
    return states, protos, sources, dests


def test_an_unsampled_pass_matches_conntrack_L(ns):
    slow_udp_timeout(ns)
    for src, n in (("127.0.1.1", 600), ("127.0.2.1", 300), ("127.0.3.1", 100)):
        flood_from(ns, src, n)
    rig.flood_udp(ns, 200, family=6)                 # from ::1
    session = rig.EchoSession(ns, port=7000)          # one assured ESTABLISHED
    assert session.ping()
    rig.make_time_wait(ns, 25, port=7100)             # 25 assured TIME_WAIT to :7100
    rig.flood_tcp_syn(ns, 40)                         # 40 unreplied SYN_SENT
    listed = rig.conntrack_list(ns)
    with CtnetlinkSocket(ns.name) as ct:
        a = A.attribute(ct, time_budget=30.0, drain_budget=30.0, top=1000)
    again = rig.conntrack_list(ns)
    assert len(again) == len(listed), "the population moved during the test"
    states, protos, sources, dests = truth(listed)

    assert a.complete and not a.closed and not a.sampled_pass and a.scale == 1.0
    assert a.total == len(listed) >= 1266
    assert a.states == {s: states.get(s, 0) for s in A.STATES}
    assert a.states["assured"] >= 26 and a.states["unreplied"] >= 1240
    assert a.protocols == dict(protos)
    assert dict(a.sources) == dict(sources)
    assert [k for k, _ in a.sources[:4]] == ["127.0.1.0/24", "127.0.2.0/24", "::/64", "127.0.3.0/24"]
    assert dict(a.destinations) == dict(dests)
    assert a.destinations[0] == ("tcp 127.0.0.1:7100", 25)


def test_a_sampled_pass_estimates_the_big_table(ns):
    slow_udp_timeout(ns)
    shares = {"127.0.11.1": 0.5, "127.0.12.1": 0.25, "127.0.13.1": 0.15, "127.0.14.1": 0.10}
    total = 40000
    with rig.global_lock():   # a table of more than ~20k entries
        for src, share in shares.items():
            flood_from(ns, src, int(total * share))
        count = rig.conntrack_count(ns)
        assert count == total

        with CtnetlinkSocket(ns.name) as ct:
            # The entry budget binds (stride 10); time budgets out of the way.
            a = A.attribute(ct, entry_budget=4000, time_budget=30.0, drain_budget=30.0)
            assert a.complete and a.total == total
            assert a.sampled == 4000 and a.scale == 10.0
            assert "sampled 1 in 10" in a.note
            got = {k: a.share(n) for k, n in a.sources}
            want = {".".join(s.split(".")[:3]) + ".0/24": v for s, v in shares.items()}
            # binomial sd at n=4000 is <= 0.8 points: 3 points is ~4 sd
            assert got == pytest.approx(want, abs=0.03)
            assert a.estimate(a.states["unreplied"]) == total
            # Read to its end: the same socket answers the next request.
            assert ct.stats()[0] == total

            # Default budgets: bounded whatever the table, and honest about it.
            started = time.perf_counter()
            b = A.attribute(ct)
            took = time.perf_counter() - started
            assert took < A.TIME_BUDGET + A.DRAIN_BUDGET + 0.5
            assert b.sampled <= A.ENTRY_BUDGET and b.sampled > 0
            if b.closed:
                assert not b.complete and "socket closed" in b.note
            else:
                assert b.complete and b.total == total
                assert ct.stats()[0] == total


def test_a_drain_over_budget_closes_the_socket_and_a_new_one_works(ns):
    slow_udp_timeout(ns)
    with rig.global_lock():
        flood_from(ns, "127.0.21.1", 30000)
        ct = CtnetlinkSocket(ns.name)
        try:
            a = A.attribute(ct, time_budget=0.0, drain_budget=0.0)
        finally:
            ct.close()
        assert a.closed and not a.complete and a.total == 30000
        assert 0 < a.sampled < 30000 and "socket closed" in a.note
        with pytest.raises(ValueError):
            ct.fileno()
        # Closing mid-dump leaves nothing behind: a fresh socket dumps the whole table.
        with CtnetlinkSocket(ns.name) as fresh:
            full = A.attribute(fresh, entry_budget=10 ** 6, time_budget=30.0, drain_budget=30.0)
        assert full.complete and full.total == 30000 == full.sampled
        assert full.sources == [("127.0.21.0/24", 30000)]

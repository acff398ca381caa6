"""ctnetlink encoding and decoding on recorded kernel bytes; no root, no kernel.

The *_HEX blobs were recorded from kernel 6.18 in a test namespace (see
tests/rig.py) holding: an ICMP echo (replied), unreplied UDP marked 0x42,
an assured ESTABLISHED TCP session, unreplied UDP in conntrack zone 5, plain
unreplied UDP over IPv4 and over IPv6. `conntrack -L -o extended,id` said:

ipv4 2 icmp 1 29 src=127.0.0.1 dst=127.0.0.9 type=8 code=0 id=1 ... mark=0 use=1 id=2665500528
ipv4 2 udp 17 29 src=127.0.0.1 dst=127.0.9.1 sport=40002 dport=30000 [UNREPLIED] ... mark=66 id=857018175
ipv4 2 tcp 6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=58742 dport=7000 ... [ASSURED] id=2598836620
ipv4 2 udp 17 29 src=127.0.0.1 dst=127.0.10.1 sport=40003 dport=31000 [UNREPLIED] ... zone=5 id=2323801786
ipv4 2 udp 17 29 src=127.0.0.1 dst=127.0.0.2 sport=40000 dport=20000 [UNREPLIED] ... id=1906501443
ipv6 10 udp 17 29 src=::1 dst=fd00:c7a::1 sport=40001 dport=20000 [UNREPLIED] ... id=2513624783
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Optional

import pytest

from conntrack_agent import ctnetlink as C
from conntrack_agent.ctnetlink import (
    CPU_STAT_KEYS,
    ConntrackUnavailable,
    CtnetlinkError,
    CtnetlinkSocket,
    MalformedMessage,
    TupleFilter,
    decode_entries,
    encode_delete,
    encode_dump_request,
    encode_filtered_delete,
    encode_set_timeout,
    kernel_version,
)
from conntrack_agent.evict import EvictSpec, _TopTalkers, compile_matcher

DUMP_HEX = (
    "b4000000000102004d0000001d610000020000003c00018014000180080001007f000001080002007f00000924000280"
    "05000100010000000600040000010000050005000800000005000600000000003c00028014000180080001007f000009"
    "080002007f00000124000280050001000100000006000400000100000500050000000000050006000000000008000300"
    "0000000a080008000000000008000c009ee04f7008000b0000000001080007000000001da4000000000102004d000000"
    "1d610000020000003400018014000180080001007f000001080002007f0009011c000280050001001100000006000200"
    "9c42000006000300753000003400028014000180080001007f000901080002007f0000011c0002800500010011000000"
    "0600020075300000060003009c4200000800030000000008080008000000004208000c0033150f3f08000b0000000001"
    "080007000000001dd4000000000102004d0000001d610000020000003400018014000180080001007f00000108000200"
    "7f0000011c000280050001000600000006000200e5760000060003001b5800003400028014000180080001007f000001"
    "080002007f0000011c0002800500010006000000060002001b58000006000300e5760000080003000000000e08000800"
    "0000000008000c009ae7198c08000b0000000001080007000006977f300004802c000180050001000300000005000200"
    "0a000000050003000a00000006000400230000000600050023000000ac000000000102004d0000001d61000002000000"
    "3400018014000180080001007f000001080002007f000a011c0002800500010011000000060002009c43000006000300"
    "791800003400028014000180080001007f000a01080002007f0000011c00028005000100110000000600020079180000"
    "060003009c43000006001200000500000800030000000008080008000000000008000c008a8266ba08000b0000000001"
    "080007000000001da4000000000102004d0000001d610000020000003400018014000180080001007f00000108000200"
    "7f0000021c0002800500010011000000060002009c400000060003004e2000003400028014000180080001007f000002"
    "080002007f0000011c0002800500010011000000060002004e200000060003009c400000080003000000000808000800"
    "0000000008000c0071a2e74308000b0000000001080007000000001dd4000000000102004d0000001d6100000a000000"
    "4c0001802c000180140003000000000000000000000000000000000114000400fd000c7a000000000000000000000001"
    "1c0002800500010011000000060002009c410000060003004e2000004c0002802c00018014000300fd000c7a00000000"
    "000000000000000114000400000000000000000000000000000000011c0002800500010011000000060002004e200000"
    "060003009c4100000800030000000008080008000000000008000c0095d2decf08000b0000000001080007000000001d"
    "14000000030002004d0000001d61000000000000"
)
STATS_HEX = (
    "24000000050102004e0000001d6100000000000008000100000000060800020000040000"
)
CPU_HEX = (
    "64000000040102004f0000001d6100000000000008000200000000000800040000000000080008000000000008000900"
    "0000000008000a000000000008000b000000000008000c000000000008000d000000000008000e000000000008000f00"
    "0000000064000000040102004f0000001d61000000000001080002000000000008000400000000000800080000000000"
    "080009000000000008000a000000000008000b000000000008000c000000000008000d000000000008000e0000000000"
    "08000f000000000014000000030002004f0000001d61000000000000"
)

DUMP = bytes.fromhex("".join(DUMP_HEX))
STATS = bytes.fromhex("".join(STATS_HEX))
CPU = bytes.fromhex("".join(CPU_HEX))

HDR = struct.Struct("=IHHII")
ATTR = struct.Struct("=HH")


def attrs(data: bytes, off: int, end: int):
    """(type, payload) of each attribute between off and end."""
    out = []
    while off + 4 <= end:
        length, atype = ATTR.unpack_from(data, off)
        out.append((atype & 0x3FFF, data[off + 4:off + length]))
        off += (length + 3) & ~3
    return out


@pytest.fixture
def fresh_layouts(monkeypatch):
    """An empty layout cache, so a test sees learning happen."""
    monkeypatch.setattr(C, "_SHAPES", {})
    monkeypatch.setattr(C, "_shape_count", 0)


def by_id(entries):
    return {e.id: e for e in entries}


# ----------------------------------------------------------------------- decoding

def test_decode_recorded_dump(fresh_layouts):
    entries = by_id(decode_entries(DUMP))
    assert len(entries) == 6
    lo = socket.inet_aton("127.0.0.1")

    icmp = entries[2665500528]
    assert (icmp.family, icmp.proto, icmp.sport, icmp.dport) == (2, 1, None, None)
    assert icmp.dst == socket.inet_aton("127.0.0.9") and icmp.src == lo
    assert icmp.status & C.IPS_SEEN_REPLY and icmp.state == -1

    marked = entries[857018175]
    assert (marked.proto, marked.sport, marked.dport, marked.mark) == (17, 40002, 30000, 0x42)
    assert marked.dst == socket.inet_aton("127.0.9.1")
    assert not marked.status & C.IPS_SEEN_REPLY

    tcp = entries[2598836620]
    assert (tcp.proto, tcp.sport, tcp.dport) == (6, 58742, 7000)
    assert C.TCP_STATES[tcp.state] == "ESTABLISHED"
    assert tcp.status & C.IPS_ASSURED and tcp.timeout == 431999

    zoned = entries[2323801786]
    assert (zoned.zone, zoned.dport) == (5, 31000)
    # the zone travels with the key, so a delete addresses the right table
    assert zoned.key.endswith(struct.pack("=HH", 6, C.CTA_ZONE) + struct.pack(">H", 5) + b"\0\0")

    plain = entries[1906501443]
    assert (plain.sport, plain.dport, plain.mark, plain.zone, plain.timeout) == (40000, 20000, 0, 0, 29)

    v6 = entries[2513624783]
    assert v6.family == 10 and v6.src == socket.inet_pton(socket.AF_INET6, "::1")
    assert v6.dst == socket.inet_pton(socket.AF_INET6, "fd00:c7a::1")
    assert (v6.sport, v6.dport) == (40001, 20000)

    for e in entries.values():
        # key = the raw CTA_TUPLE_ORIG attribute (+ CTA_ZONE): starts with its header
        length, atype = ATTR.unpack_from(e.key, 0)
        assert atype == C.NLA_F_NESTED | C.CTA_TUPLE_ORIG
        assert len(e.key) == length + (8 if e.zone else 0)


def test_compiled_layouts_agree_with_the_attribute_walk(fresh_layouts, monkeypatch):
    first = decode_entries(DUMP)  # walks every message and learns layouts
    assert C._SHAPES, "plain messages must be learnt"
    walked = []
    real_walk = C._parse_entry

    def counting_walk(buf, off, end):
        walked.append(off)
        return real_walk(buf, off, end)

    monkeypatch.setattr(C, "_parse_entry", counting_walk)
    second = decode_entries(DUMP)
    assert second == first
    # Only the zoned entry (never compiled) still needs the walk.
    assert len(walked) == 1


def test_a_layout_that_differs_in_one_header_is_not_misread(fresh_layouts):
    decode_entries(DUMP)  # learn
    data = bytearray(DUMP)
    # Rename the marked UDP entry's CTA_MARK attribute to an unknown type:
    # same length, same offsets, but the mark must no longer be read.
    off = 0
    while True:
        length = HDR.unpack_from(data, off)[0]
        entry = decode_entries(bytes(data[off:off + length]))
        if entry and entry[0].mark == 0x42:
            break
        off += (length + 3) & ~3
    a = off + 20
    while True:
        alen, atype = ATTR.unpack_from(data, a)
        if atype == C.CTA_MARK:
            struct.pack_into("=HH", data, a, alen, 31)
            break
        a += (alen + 3) & ~3
    patched = by_id(decode_entries(bytes(data)))
    assert patched[857018175].mark == 0
    assert patched[857018175].dport == 30000


def test_a_learnt_tcp_layout_reads_no_state_for_another_protocol(fresh_layouts, monkeypatch):
    # Found by the fuzz: the walk reports a TCP state only for TCP; a layout
    # learnt from a TCP entry must not read one from a same-shaped UDP entry.
    off = 0
    while True:
        length = HDR.unpack_from(DUMP, off)[0]
        tcp = DUMP[off:off + length]
        if decode_entries(tcp)[0].proto == 6:
            break
        off += (length + 3) & ~3
    patched = bytearray(tcp)
    assert patched[52] == 6  # ORIG { IP {src, dst}, PROTO { PROTO_NUM: here
    patched[52] = 17
    (learnt,) = decode_entries(bytes(patched))
    monkeypatch.setattr(C, "_SHAPES", {})
    (walked,) = decode_entries(bytes(patched))  # and learnt from the UDP entry itself
    (learnt_from_it,) = decode_entries(bytes(patched))
    assert learnt == walked == learnt_from_it and walked.state == -1 and walked.proto == 17


def test_foreign_messages_are_skipped_and_truncated_ones_refused():
    done = HDR.pack(20, 3, 2, 1, 0) + bytes(4)
    assert decode_entries(done) == []
    with pytest.raises(MalformedMessage, match="offset 0: 10 byte"):
        decode_entries(DUMP[:10])


# ----------------------------------------------------------------------- encoding

def test_encode_delete_copies_the_tuple_and_guards_with_the_id():
    e = by_id(decode_entries(DUMP))[1906501443]
    msg = encode_delete(e, seq=1234)
    length, mtype, flags, seq, pid = HDR.unpack_from(msg, 0)
    assert length == len(msg)
    assert mtype == (1 << 8) | 2  # CTNETLINK / IPCTNL_MSG_CT_DELETE
    assert flags == 1  # NLM_F_REQUEST only: no per-message ack
    assert seq == 1234 and pid == 0
    assert msg[16:20] == bytes((2, 0, 0, 0))
    top = attrs(msg, 20, len(msg))
    assert [t for t, _ in top] == [C.CTA_TUPLE_ORIG, C.CTA_ID]
    assert msg[20:20 + len(e.key)] == e.key
    assert struct.unpack(">I", top[1][1])[0] == 1906501443


def test_encode_delete_of_a_zoned_entry_carries_the_zone():
    e = by_id(decode_entries(DUMP))[2323801786]
    top = attrs(encode_delete(e, 1), 20, len(encode_delete(e, 1)))
    assert [t for t, _ in top] == [C.CTA_TUPLE_ORIG, C.CTA_ZONE, C.CTA_ID]
    assert struct.unpack(">H", top[1][1][:2])[0] == 5


def test_encode_set_timeout_updates_without_creating():
    e = by_id(decode_entries(DUMP))[2513624783]
    msg = encode_set_timeout(e, 7, seq=9)
    length, mtype, flags, seq, _ = HDR.unpack_from(msg, 0)
    assert length == len(msg) and seq == 9
    assert mtype == (1 << 8) | 0  # IPCTNL_MSG_CT_NEW
    assert flags == 1 and not flags & 0x400  # no NLM_F_CREATE: a vanished entry stays gone
    assert msg[16] == 10
    top = attrs(msg, 20, len(msg))
    assert [t for t, _ in top] == [C.CTA_TUPLE_ORIG, C.CTA_TIMEOUT]
    assert struct.unpack(">I", top[1][1])[0] == 7


def test_filtered_delete_without_a_filter_is_refused():
    with pytest.raises(ValueError, match="flush the whole table"):
        encode_filtered_delete(1)
    with pytest.raises(ValueError):
        encode_filtered_delete(1, status=0, status_mask=0)


def test_filtered_delete_by_mark_and_status():
    msg = encode_filtered_delete(5, mark=0x142, mark_mask=0xFF, status=0, status_mask=0x4002)
    length, mtype, flags, _, _ = HDR.unpack_from(msg, 0)
    assert length == len(msg) and mtype == (1 << 8) | 2
    assert flags == 1 | 4  # acked: the one reply says whether the kernel accepted the filter
    assert msg[16:20] == bytes(4)  # AF_UNSPEC, version 0: both families
    top = dict(attrs(msg, 20, len(msg)))
    assert struct.unpack(">I", top[C.CTA_MARK])[0] == 0x42  # value pre-masked
    assert struct.unpack(">I", top[C.CTA_MARK_MASK])[0] == 0xFF
    assert struct.unpack(">I", top[C.CTA_STATUS])[0] == 0
    assert struct.unpack(">I", top[C.CTA_STATUS_MASK])[0] == 0x4002
    assert C.CTA_TUPLE_ORIG not in top and C.CTA_FILTER not in top


def test_filtered_delete_by_tuple():
    tf = TupleFilter(family=C.AF_INET, proto=17, dst=socket.inet_aton("127.0.9.1"), dport=30000)
    msg = encode_filtered_delete(5, status=0, status_mask=2, tuple_filter=tf)
    assert msg[16] == C.AF_INET
    top = dict(attrs(msg, 20, len(msg)))
    (flags,) = struct.unpack("=I", dict(attrs(top[C.CTA_FILTER], 0, len(top[C.CTA_FILTER])))[1])
    assert flags == C.CTA_FILTER_F_CTA_IP_DST | C.CTA_FILTER_F_CTA_PROTO_NUM | C.CTA_FILTER_F_CTA_PROTO_DST_PORT
    orig = dict(attrs(top[C.CTA_TUPLE_ORIG], 0, len(top[C.CTA_TUPLE_ORIG])))
    ip = dict(attrs(orig[C.CTA_TUPLE_IP], 0, len(orig[C.CTA_TUPLE_IP])))
    proto = dict(attrs(orig[C.CTA_TUPLE_PROTO], 0, len(orig[C.CTA_TUPLE_PROTO])))
    assert ip == {C.CTA_IP_V4_DST: socket.inet_aton("127.0.9.1")}
    assert proto[C.CTA_PROTO_NUM][:1] == bytes((17,))
    assert struct.unpack(">H", proto[C.CTA_PROTO_DST_PORT][:2])[0] == 30000
    with pytest.raises(ValueError, match="protocol"):
        encode_filtered_delete(1, tuple_filter=TupleFilter(family=C.AF_INET, dport=1))
    with pytest.raises(ValueError):
        encode_filtered_delete(1, tuple_filter=TupleFilter(family=C.AF_UNSPEC, proto=6))


def test_dump_request():
    msg = encode_dump_request(3, mark=1, status=0, status_mask=C.IPS_OFFLOAD)
    length, mtype, flags, seq, _ = HDR.unpack_from(msg, 0)
    assert (length, mtype, flags, seq) == (len(msg), (1 << 8) | 1, 0x301, 3)
    assert msg[16] == 0
    assert [t for t, _ in attrs(msg, 20, len(msg))] == [C.CTA_MARK, C.CTA_MARK_MASK, C.CTA_STATUS,
                                                         C.CTA_STATUS_MASK]
    v6 = encode_dump_request(4, tuple_filter=TupleFilter(family=C.AF_INET6, proto=6))
    assert v6[16] == C.AF_INET6


def test_kernel_version_parsing():
    assert kernel_version("6.18.44-fc-v669") == (6, 18)
    assert kernel_version("6.1.0-27-amd64") == (6, 1)
    assert kernel_version("garbage") == (0, 0)


# ------------------------------------------------------- counters on recorded replies

class FakeNetlink:
    """Answers every request with recorded replies, re-stamped with its seq.

    A reply of None stands for an empty receive queue: EAGAIN to a
    non-blocking read. A blocking read with nothing left fails the test
    (it would wait for ever).
    """

    def __init__(self, *replies: Optional[bytes], stale: bytes = b"") -> None:
        self.replies = list(replies)
        self.stale = stale
        self.sent = []
        self.flags = []

    def send(self, data) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def recv_into(self, buf, nbytes=0, flags=0) -> int:
        self.flags.append(flags)
        seq = HDR.unpack_from(self.sent[-1], 0)[3]
        if self.stale:
            data, self.stale = self.stale, b""
        else:
            if not self.replies or self.replies[0] is None:
                if self.replies:
                    self.replies.pop(0)
                if flags & socket.MSG_DONTWAIT:
                    raise BlockingIOError(errno.EAGAIN, "nothing queued")
                raise AssertionError("a blocking read with nothing left to receive would wait for ever")
            data = bytearray(self.replies.pop(0))
            off = 0
            while off + 16 <= len(data):
                length = HDR.unpack_from(data, off)[0]
                struct.pack_into("=I", data, off + 8, seq)
                if length < 16:
                    break
                off += (length + 3) & ~3
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def error_reply(err: int) -> bytes:
    return HDR.pack(36, 2, 0, 0, 0) + struct.pack("=i", -err) + HDR.pack(20, 0, 0, 0, 0)


def test_stats_on_a_recorded_reply():
    ct = CtnetlinkSocket.from_socket(FakeNetlink(STATS))
    assert ct.stats() == (6, 262144)


def test_stats_skips_a_stale_reply_of_an_earlier_request():
    stale = bytearray(STATS)
    struct.pack_into(">I", stale, 24, 999)  # count 999, seq 78 (not ours)
    ct = CtnetlinkSocket.from_socket(FakeNetlink(STATS, stale=bytes(stale)))
    assert ct.stats() == (6, 262144)


def test_cpu_stats_sums_cpus_and_maps_the_numbering():
    data = bytearray(CPU)
    # The recorded counters are all zero; give each CPU distinct values at
    # the recorded offsets: value = cpu * 100 + attribute number.
    off = 0
    while off + 16 <= len(data):
        length, mtype = HDR.unpack_from(data, off)[:2]
        if mtype == (1 << 8) | 4:
            cpu = struct.unpack_from(">H", data, off + 18)[0]
            a = off + 20
            while a < off + length:
                alen, atype = ATTR.unpack_from(data, a)
                struct.pack_into(">I", data, a + 4, cpu * 100 + atype)
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    ct = CtnetlinkSocket.from_socket(FakeNetlink(bytes(data)))
    stats = ct.cpu_stats()
    assert set(stats) == set(CPU_STAT_KEYS)
    numbering = {"found": 2, "invalid": 4, "insert": 8, "insert_failed": 9, "drop": 10,
                 "early_drop": 11, "error": 12, "search_restart": 13, "clash_resolve": 14,
                 "chaintoolong": 15}
    for key, number in numbering.items():
        assert stats[key] == (0 * 100 + number) + (1 * 100 + number), key


def test_error_replies_are_classified():
    ct = CtnetlinkSocket.from_socket(FakeNetlink(error_reply(errno.EINVAL)))
    with pytest.raises(ConntrackUnavailable):
        ct.stats()
    ct = CtnetlinkSocket.from_socket(FakeNetlink(error_reply(errno.EPERM)))
    with pytest.raises(CtnetlinkError) as exc:
        ct.stats()
    assert exc.value.errno == errno.EPERM and not isinstance(exc.value, ConntrackUnavailable)
    assert issubclass(ConntrackUnavailable, OSError)


# ------------------------------------------------------- selection on decoded entries

def select(**kw):
    match = compile_matcher(EvictSpec(**kw))
    return sorted(e.id for e in decode_entries(DUMP) if match(e))


def test_selectors_on_recorded_entries():
    udp4 = [857018175, 1906501443, 2323801786]
    assert select(protocols=("udp",)) == sorted(udp4 + [2513624783])
    assert select(status="unreplied") == sorted(udp4 + [2513624783])
    assert select(mark=0x42) == [857018175]
    assert select(mark=0x40, mark_mask=0xF0) == [857018175]
    assert select(zone=5) == [2323801786]
    assert select(dst="127.0.9.0/24") == [857018175]
    assert select(dst="fd00:c7a::/64") == [2513624783]
    assert select(src="::1") == [2513624783]
    assert select(dport=20000) == sorted([1906501443, 2513624783])
    assert select(timeout_below=30) == sorted(udp4 + [2513624783, 2665500528])
    # The assured ESTABLISHED session is only selected when asked for.
    assert 2598836620 not in select()
    assert select(protocols=("tcp",)) == []
    assert select(protocols=("tcp",), include_established=True) == [2598836620]
    assert select(tcp_states=("ESTABLISHED",), include_established=True) == [2598836620]
    # Ageing never extends: 29 s left is not shortened "to" 60 s.
    assert select(mode="age", age_timeout=60, protocols=("udp",)) == []
    assert select(mode="age", age_timeout=5, protocols=("udp",)) == sorted(udp4 + [2513624783])


@pytest.mark.parametrize("kw, fragment", [
    (dict(mode="drop"), "mode"),
    (dict(status="half"), "status"),
    (dict(protocols=("tcpp",)), "unknown protocol"),
    (dict(protocols="tcp"), "tuple"),
    (dict(tcp_states=("ESTABLISHED_ISH",)), "unknown TCP state"),
    (dict(protocols=("udp",), tcp_states=("TIME_WAIT",)), "tcp is not among"),
    (dict(mark=-1), "mark"),
    (dict(mark=1, mark_mask=0), "mark_mask"),
    (dict(zone=70000), "zone"),
    (dict(dport=70000), "dport"),
    (dict(src="10.0.0.0/33"), "src"),
    (dict(src="10.0.0.0/8", dst="::1"), "mixed"),
    (dict(timeout_below=0), "timeout_below"),
    (dict(budget_entries=-1), "budget_entries"),
    (dict(target_usage=1.5), "target_usage"),
])
def test_spec_validation(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        EvictSpec(**kw)


def test_top_talkers_stay_bounded_and_keep_heavy_hitters():
    talkers = _TopTalkers(capacity=64)
    heavy = socket.inet_aton("10.0.0.1")
    for i in range(20000):
        talkers.add(struct.pack(">I", 0x0B000000 + i))  # 20000 distinct one-offs
        if i % 4 == 0:
            talkers.add(heavy)
    assert len(talkers.counts) <= 64
    top = talkers.top(3)
    assert top[0][0] == "10.0.0.1"
    assert 0 < top[0][1] <= 5000
    assert not talkers.exact
    exact = _TopTalkers()
    for a in (heavy, heavy, socket.inet_pton(socket.AF_INET6, "::1")):
        exact.add(a)
    assert exact.top(5) == [("10.0.0.1", 2), ("::1", 1)] and exact.exact


# ------------------------------------------------ malformed input: one test per length check
#
# Hand-built messages, each broken in one way. Without the check it names, the
# decoder would read past what holds the field (neighbouring or stale bytes),
# crash with struct.error / IndexError / OverflowError, or wait for ever.

BE32 = struct.Struct(">I")
BE16 = struct.Struct(">H")
CT_NEW, STATS_TYPE, CPU_TYPE = 0x100, 0x105, 0x104


def nla(atype: int, payload: bytes = b"", length: Optional[int] = None, pad: bool = True) -> bytes:
    n = 4 + len(payload)
    return ATTR.pack(n if length is None else length, atype) + payload + (bytes(-n & 3) if pad else b"")


def nest(atype: int, *parts: bytes, pad: bool = True) -> bytes:
    return nla(C.NLA_F_NESTED | atype, b"".join(parts), pad=pad)


def message(mtype: int, body: bytes = b"", family: int = 2, seq: int = 0, length: Optional[int] = None) -> bytes:
    data = bytes((family, 0, 0, 0)) + body
    return HDR.pack(16 + len(data) if length is None else length, mtype, 2, seq, 0) + data


def tuple_v4(src=b"\x7f\0\0\1", dst=b"\x7f\0\0\2", proto=(nla(1, b"\x11"), nla(2, BE16.pack(40000)),
                                                           nla(3, BE16.pack(20000))), extra=b"") -> bytes:
    return nest(C.CTA_TUPLE_ORIG, nest(C.CTA_TUPLE_IP, nla(1, src), nla(2, dst)), nest(C.CTA_TUPLE_PROTO, *proto),
                extra)


def entry(*attrs: bytes, family: int = 2, orig: Optional[bytes] = None) -> bytes:
    return message(CT_NEW, (tuple_v4() if orig is None else orig) + b"".join(attrs) + nla(C.CTA_ID, BE32.pack(7)),
                   family=family)


def stats_reply(*attrs: bytes, length: Optional[int] = None) -> bytes:
    body = b"".join(attrs) if attrs else nla(1, BE32.pack(6)) + nla(2, BE32.pack(262144))
    return message(STATS_TYPE, body, family=0, length=length)


def refused(data: bytes, fragment: str) -> MalformedMessage:
    with pytest.raises(MalformedMessage, match=fragment) as exc:
        decode_entries(data)
    assert isinstance(exc.value, CtnetlinkError) and exc.value.errno == errno.EBADMSG
    return exc.value


def test_a_valid_hand_built_entry_decodes():
    (e,) = decode_entries(entry(nla(C.CTA_STATUS, BE32.pack(8))))
    assert (e.src, e.dst, e.proto, e.sport, e.dport, e.status, e.id) == (
        b"\x7f\0\0\1", b"\x7f\0\0\2", 17, 40000, 20000, 8, 7)


# -- message headers

def test_bytes_after_the_last_message_too_few_for_a_header():
    assert refused(DUMP + bytes(8), "8 byte.s. left, a message header needs 16").offset == len(DUMP)


def test_nlmsg_len_shorter_than_the_header():
    refused(HDR.pack(12, 3, 0, 0, 0) + bytes(8), "nlmsg_len 12 is shorter")


def test_nlmsg_len_past_the_bytes_received():
    refused(DUMP[:100], "nlmsg_len 180 runs past the 100 byte.s. received")


def test_nfnetlink_message_too_short_for_its_nfgenmsg():
    refused(HDR.pack(18, CT_NEW, 2, 0, 0) + bytes(2), "no room for its nfgenmsg")


def test_error_reply_too_short_for_its_errno():
    refused(HDR.pack(16, 2, 0, 0, 0), "no room for its errno")
    # Over a socket the errno would otherwise be read from whatever the buffer held.
    ct = CtnetlinkSocket.from_socket(FakeNetlink(HDR.pack(16, 2, 0, 0, 0)))
    with pytest.raises(MalformedMessage, match="errno"):
        ct.stats()


@pytest.mark.parametrize("field", [-(1 << 31), 5, -5000])
def test_error_reply_whose_errno_is_no_errno(field):
    reply = HDR.pack(36, 2, 0, 0, 0) + struct.pack("=i", field) + HDR.pack(20, 0, 0, 0, 0)
    ct = CtnetlinkSocket.from_socket(FakeNetlink(reply))
    with pytest.raises(MalformedMessage, match="not a negative errno"):
        ct.stats()


def test_a_short_read_is_not_completed_from_an_earlier_reply():
    # The receive buffer is reused: a reply cut short must not be parsed
    # from what the previous, complete one left behind.
    ct = CtnetlinkSocket.from_socket(FakeNetlink(STATS, STATS[:28]))
    assert ct.stats() == (6, 262144)
    with pytest.raises(MalformedMessage, match="nlmsg_len 36 runs past the 28 byte"):
        ct.stats()


# -- attributes: GET_STATS

@pytest.mark.parametrize("reply, fragment", [
    (stats_reply(nla(1, BE32.pack(6)), ATTR.pack(2, 2) + bytes(2)), "nla_len 2 of attribute type 2 is shorter"),
    (stats_reply(nla(1, BE32.pack(6)), nla(2, BE32.pack(9)), nla(9, bytes(4), length=12)),
     "attribute type 9 .nla_len 12. runs 4 byte.s. past"),
    (stats_reply(nla(1, b"\0\6"), nla(2, BE32.pack(9))), "attribute type 1 has 2 payload byte.s., expected 4"),
    (stats_reply(nla(1, BE32.pack(6)), nla(2, BE32.pack(9)), b"\0\0", length=38) + b"\0\0",
     "2 byte.s. left before the end"),
    (stats_reply(nla(1, BE32.pack(6))), "lacks entries/max"),
])
def test_stats_attribute_checks(reply, fragment):
    ct = CtnetlinkSocket.from_socket(FakeNetlink(reply))
    with pytest.raises(MalformedMessage, match=fragment):
        ct.stats()


def test_stats_skips_unknown_attributes():
    reply = stats_reply(nla(9, bytes(8)), nest(7, nla(1, b"x")), nla(1, BE32.pack(6)), nla(2, BE32.pack(9)))
    assert CtnetlinkSocket.from_socket(FakeNetlink(reply)).stats() == (6, 9)


# -- attributes: GET_STATS_CPU

def cpu_reply(*attrs: bytes) -> bytes:
    return message(CPU_TYPE, b"".join(attrs), family=0) + HDR.pack(20, 3, 2, 0, 0) + bytes(4)


@pytest.mark.parametrize("attrs, fragment", [
    ((nla(10, b"\0\1"),), "attribute type 10 has 2 payload byte.s., expected 4"),
    ((nla(10, BE32.pack(1)), nla(11, BE32.pack(1), length=40)), "runs 32 byte.s. past"),
    ((nla(10, BE32.pack(1)), ATTR.pack(0, 11) + bytes(4)), "nla_len 0"),
    ((nla(10, BE32.pack(1)), b"\0\0\0"), "3 byte.s. left before the end"),
])
def test_cpu_stats_attribute_checks(attrs, fragment):
    ct = CtnetlinkSocket.from_socket(FakeNetlink(cpu_reply(*attrs)))
    with pytest.raises(MalformedMessage, match=fragment):
        ct.cpu_stats()


def test_cpu_stats_skips_unknown_and_retired_counters():
    reply = cpu_reply(nla(1, BE32.pack(5)), nla(99, bytes(12)), nla(10, BE32.pack(3)))
    assert CtnetlinkSocket.from_socket(FakeNetlink(reply)).cpu_stats() == {"drop": 3}


# -- attributes: conntrack entries

@pytest.mark.parametrize("data, fragment", [
    # top level
    (entry(nla(C.CTA_STATUS, b"\0\0")), "attribute type 3 has 2 payload byte.s., expected 4"),
    (entry(nla(C.CTA_MARK, b"")), "attribute type 8 has 0 payload"),
    (entry(nla(C.CTA_TIMEOUT, b"\0")), "attribute type 7 has 1 payload"),
    (message(CT_NEW, tuple_v4() + nla(C.CTA_ID, b"\0\0\0")), "attribute type 12 has 3 payload"),
    (entry(nla(C.CTA_ZONE, b"\5")), "attribute type 18 has 1 payload byte.s., expected 2"),
    (entry(nla(31, bytes(4), length=64)), "attribute type 31 .nla_len 64. runs"),
    (entry(ATTR.pack(3, 31) + bytes(4)), "nla_len 3 of attribute type 31"),
    (message(CT_NEW, tuple_v4() + nla(C.CTA_ID, BE32.pack(7)) + b"\0\0"), "2 byte.s. left before the end"),
    # nests and what is in them
    (entry(orig=nest(C.CTA_TUPLE_ORIG, nest(C.CTA_TUPLE_IP, nla(1, b"\x7f\0\0\1"), nla(2, b"\x7f\0\0\2", length=12)))),
     "attribute type 2 .nla_len 12. runs 4 byte.s. past the end of its message or nest"),
    (entry(orig=nest(C.CTA_TUPLE_ORIG, nest(C.CTA_TUPLE_IP, nla(1, b"\x7f\0\0\1"), nla(2, b"\x7f\0\0\2")) + b"\0\0")),
     "2 byte.s. left before the end"),
    (entry(orig=nest(C.CTA_TUPLE_ORIG, nest(C.CTA_TUPLE_IP, nla(1, b"\x7f\0\0\1"), nla(2, b"\x7f\0\0\2"), b"\0\0"))),
     "2 byte.s. left before the end"),
    (entry(orig=nest(C.CTA_TUPLE_ORIG, nest(C.CTA_TUPLE_IP, nla(1, b"\x7f\0\0\1"), nla(2, b"\x7f\0\0\2")),
                     nla(C.NLA_F_NESTED | C.CTA_TUPLE_PROTO, nla(1, b"\x11"), length=20))),
     "attribute type 2 .nla_len 20. runs 8 byte.s. past"),
    (entry(orig=tuple_v4(proto=(nla(1, b"\x11"), nla(3, BE16.pack(1), length=24)))), "attribute type 3 .nla_len 24. runs"),
    (entry(orig=tuple_v4(proto=(nla(1), nla(3, BE16.pack(1))))), "attribute type 1 has 0 payload byte.s., expected 1"),
    (entry(orig=tuple_v4(proto=(nla(1, b"\6"), nla(3, b"\1")))), "attribute type 3 has 1 payload byte.s., expected 2"),
    (entry(orig=tuple_v4(extra=nla(C.CTA_TUPLE_ZONE, b"\1"))), "attribute type 3 has 1 payload byte.s., expected 2"),
    (entry(nest(C.CTA_PROTOINFO, nest(1, nla(1, b"\3", length=12)))), "attribute type 1 .nla_len 12. runs"),
    (entry(nest(C.CTA_PROTOINFO, nest(1, nla(1)))), "attribute type 1 has 0 payload byte.s., expected 1"),
    (entry(nest(C.CTA_PROTOINFO, nla(1, b"\3", length=16))), "attribute type 1 .nla_len 16. runs"),
    (entry(nla(C.NLA_F_NESTED | C.CTA_PROTOINFO, b"\0\0", pad=False) + b"\0\0"), "2 byte.s. left before"),
    # what the sweeps rely on: both addresses, of the entry's family
    (entry(orig=tuple_v4(src=b"\x7f\0\1")), "lacks its 4-byte source and destination"),
    (entry(orig=nest(C.CTA_TUPLE_ORIG, nest(C.CTA_TUPLE_PROTO, nla(1, b"\x11")))), "lacks its 4-byte"),
    (entry(family=10), "lacks its 16-byte source"),
    (entry(family=7), "family 7, neither AF_INET nor AF_INET6"),
])
def test_entry_attribute_checks(fresh_layouts, data, fragment):
    refused(data, fragment)


@pytest.mark.parametrize("first_attr, at, length, fragment", [
    (nla(C.CTA_STATUS, BE32.pack(8)), 0, 64, "attribute type 3 .nla_len 64. runs"),
    # a protoinfo that is not TCP: its first header is checked, so it must be matched
    (nest(C.CTA_PROTOINFO, nla(2, b"\1")), 4, 12, "attribute type 2 .nla_len 12. runs"),
])
def test_entry_attribute_checks_hold_behind_a_learnt_layout(fresh_layouts, first_attr, at, length, fragment):
    # Same length, same family, one header changed: the compiled layout must
    # send it to the checking walk, not read it.
    good = entry(first_attr)
    decode_entries(good)
    assert C._SHAPES
    bad = bytearray(good)
    struct.pack_into("=H", bad, 20 + len(tuple_v4()) + at, length)
    refused(bytes(bad), fragment)


def test_entries_skip_unknown_attributes(fresh_layouts):
    (e,) = decode_entries(entry(nla(31, bytes(5)), nest(30, nla(1, b"x")), nla(C.CTA_MARK, BE32.pack(0x42))))
    assert (e.mark, e.dport, e.id) == (0x42, 20000, 7)


def test_a_key_without_padding_is_padded(fresh_layouts):
    # The original tuple's last attribute unpadded: the nest ends off a
    # 4-byte boundary. The key goes into requests with CTA_ID after it.
    orig = nest(C.CTA_TUPLE_ORIG, nest(C.CTA_TUPLE_IP, nla(1, b"\x7f\0\0\1"), nla(2, b"\x7f\0\0\2")),
                nest(C.CTA_TUPLE_PROTO, nla(1, b"\x11"), nla(3, BE16.pack(20000), pad=False), pad=False), pad=False)
    assert len(orig) % 4 == 2
    (e,) = decode_entries(message(CT_NEW, orig + b"\0\0" + nla(C.CTA_ID, BE32.pack(7))))
    assert len(e.key) % 4 == 0 and e.dport == 20000
    top = attrs(encode_delete(e, 1), 20, len(encode_delete(e, 1)))
    assert [t for t, _ in top] == [C.CTA_TUPLE_ORIG, C.CTA_ID]


# -- dumps

def test_a_malformed_dump_chunk_raises_and_frees_the_socket(fresh_layouts):
    bad = bytearray(DUMP)
    struct.pack_into("=I", bad, 180, 5000)  # the second message claims more than was received
    fake = FakeNetlink(bytes(bad), None, STATS)
    ct = CtnetlinkSocket.from_socket(fake)
    seen = []
    with pytest.raises(MalformedMessage, match="offset 180: nlmsg_len 5000 runs past"):
        for e in ct.dump():
            seen.append(e)
    assert len(seen) == 1
    # The NLMSG_DONE may have been in the unreadable rest: the drain must not wait for one.
    assert fake.flags[-1] & socket.MSG_DONTWAIT
    assert not ct._dump_active
    assert ct.stats() == (6, 262144)


def test_a_dump_left_in_its_last_chunk_does_not_wait_for_another(fresh_layouts):
    fake = FakeNetlink(DUMP)  # every entry and the NLMSG_DONE in one chunk
    ct = CtnetlinkSocket.from_socket(fake)
    dump = ct.dump()
    entries = iter(dump)
    next(entries)
    entries.close()  # FakeNetlink fails a blocking read of nothing
    assert dump.done and not ct._dump_active
    assert len(fake.flags) == 1


def test_evict_fails_on_a_malformed_dump_as_on_any_ctnetlink_error(fresh_layouts):
    from conntrack_agent import evict

    bad = bytearray(DUMP)
    struct.pack_into("=H", bad, 20, 2)  # the first entry's first attribute: nla_len 2
    # stats, collect_errors (nothing queued), the dump (read to its NLMSG_DONE
    # past the bad entry, whose length is intact), stats again.
    fake = FakeNetlink(STATS, None, bytes(bad), STATS)
    ct = CtnetlinkSocket.from_socket(fake)
    with pytest.raises(CtnetlinkError) as exc:
        evict.evict(ct, evict.EvictSpec(protocols=("udp",)), dry_run=True, kernel_filter=False)
    # An OSError the executor reports, not a rejected dump filter to fall back from.
    assert isinstance(exc.value, (OSError, MalformedMessage))
    assert exc.value.errno not in (errno.EOPNOTSUPP, errno.EINVAL)
    assert ct.stats() == (6, 262144)


def test_the_sampler_drops_a_namespace_whose_replies_are_malformed():
    from conntrack_agent.sampler import Sampler

    class Probe:
        closed = False

        def read(self, now, counters=False):
            raise MalformedMessage(0, "nlmsg_len 3 is shorter than the message header")

        def close(self):
            self.closed = True

    sampler = Sampler(("",), 1.0)
    probe = sampler.probes[""] = Probe()
    assert sampler.sample() is None
    assert probe.closed and "" not in sampler.probes
    assert "nlmsg_len 3" in sampler.unavailable[""]

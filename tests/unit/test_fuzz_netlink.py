"""Fuzzing the ctnetlink decoder: nothing the kernel (or anyone) sends may crash it.

Recorded kernel replies (test_ctnetlink_codec) are mutated -- cut at every
length, bits flipped, length fields set to 0, 3, past their container or
huge, bytes inserted and deleted, random bytes -- and fed to every public
decoding entry point: decode_entries, and over a scripted socket stats(),
cpu_stats(), dumps (read to the end or abandoned), collect_errors() and
filtered_delete(). Every case must end in a result or MalformedMessage (or,
over a socket, an error the message itself reports, or the script running
dry because the mutated reply never finished the request), within
CASE_BOUND seconds. Entries returned must hold what the sweeps rely on.
Over a socket each case runs three times, into receive buffers exactly as
long as the bytes received (reading past them raises), holding zeros, and
holding a valid reply: the outcome must be the same, so it cannot depend on
bytes beyond those received.

Seeded: CTA_FUZZ_SEED=N reproduces or varies a run; failures print the
seed, the case and its bytes.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import struct
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import pytest

from conntrack_agent import ctnetlink as C
from conntrack_agent.ctnetlink import (
    ConntrackUnavailable,
    CtnetlinkError,
    CtnetlinkSocket,
    MalformedMessage,
    decode_entries,
)
from test_ctnetlink_codec import CPU, DUMP, STATS

SEED = int(os.environ.get("CTA_FUZZ_SEED", "20261130"))
MAX_CASES = 2000        # per entry point (8 of them), truncations included
TIME_BUDGET = 1.0       # seconds per entry point; the cases stop at whichever comes first
MIN_CASES = 500         # fewer: the machine was too slow for the test to say much
CASE_BOUND = 0.05       # seconds: no single case may take longer (best of three when over)
HARD_STOP = 1.0         # seconds: a case still running then is stopped (a loop that never ends)

HDR = struct.Struct("=IHHII")
ATTR = struct.Struct("=HH")
ENOENT_REPLY = HDR.pack(36, 2, 0, 0, 0) + struct.pack("=i", -errno.ENOENT) + HDR.pack(28, 0x102, 1, 0, 0)


class Runaway(BaseException):
    """Raised into a case that ran past HARD_STOP; no ``except Exception`` swallows it."""


def _stop_runaway(signum, frame):
    raise Runaway()


class ScriptDry(Exception):
    """The scripted socket has nothing left and the caller would block for ever."""


class ScriptedSocket:
    """Hands out the given datagrams, then behaves as an empty netlink socket."""

    def __init__(self, datagrams: Sequence[bytes]) -> None:
        self.datagrams = list(datagrams)

    def send(self, data) -> int:
        return len(data)

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        if not self.datagrams:
            if flags & socket.MSG_DONTWAIT:
                raise BlockingIOError(errno.EAGAIN, "nothing queued")
            raise ScriptDry()
        data = self.datagrams.pop(0)
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def stamped(data: bytes, seq: int) -> bytes:
    out = bytearray(data)
    off = 0
    while off + 16 <= len(out):
        length = HDR.unpack_from(out, off)[0]
        struct.pack_into("=I", out, off + 8, seq)
        off += (length + 3) & ~3
    return bytes(out)


# ------------------------------------------------------------------------ mutations

def length_fields(data: bytes) -> List[Tuple[int, int, int, int]]:
    """(offset, width, value, end of its container) of every length field of valid ``data``."""
    out = []

    def attrs(a: int, end: int) -> None:
        while a + 4 <= end:
            alen, atype = ATTR.unpack_from(data, a)
            if alen < 4 or a + alen > end:
                return
            out.append((a, 2, alen, end))
            if atype & C.NLA_F_NESTED:
                attrs(a + 4, a + alen)
            a += (alen + 3) & ~3

    off = 0
    while off + 16 <= len(data):
        mlen = HDR.unpack_from(data, off)[0]
        out.append((off, 4, mlen, len(data)))
        if mlen >= 20:
            attrs(off + 20, off + mlen)
        off += (mlen + 3) & ~3
    return out


def set_length(data: bytes, where: Tuple[int, int, int, int], value: int) -> bytes:
    off, width, _, _ = where
    out = bytearray(data)
    struct.pack_into("=I" if width == 4 else "=H", out, off, value & (0xFFFFFFFF if width == 4 else 0xFFFF))
    return bytes(out)


def mutations(template: bytes, rng: random.Random, seq: int) -> Iterator[Tuple[str, bytes]]:
    """(description, bytes): every truncation first, then random mutations for ever."""
    for k in range(len(template)):
        yield "truncated to %d bytes" % k, template[:k]
    fields = length_fields(template)
    nests = [f for f in fields if f[1] == 2 and ATTR.unpack_from(template, f[0])[1] & C.NLA_F_NESTED]
    while True:
        kind = rng.randrange(7)
        if kind == 0:
            out = bytearray(template)
            flips = [rng.randrange(len(out) * 8) for _ in range(rng.randint(1, 4))]
            for bit in flips:
                out[bit // 8] ^= 1 << (bit % 8)
            yield "bits %s flipped" % flips, bytes(out)
        elif kind == 1:
            where = rng.choice(fields)
            off, width, value, end = where
            new = rng.choice([0, 1, 3, 4, 5, value - 1, value + 1, value + 4, end - off + rng.randint(1, 8),
                              0xFFFF, 0xFFFFFFFF, rng.getrandbits(8 * width)])
            yield "length at %d set to %d" % (off, new), set_length(template, where, new)
        elif kind == 2 and nests:
            where = rng.choice(nests)
            off, _, _, end = where
            new = end - off + 4 * rng.randint(1, 4)
            yield "nest at %d made to end %d bytes past its container" % (off, new - (end - off)), \
                set_length(template, where, new)
        elif kind == 3:
            at = rng.randrange(len(template) + 1)
            junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
            yield "%d byte(s) inserted at %d" % (len(junk), at), template[:at] + junk + template[at:]
        elif kind == 4:
            at = rng.randrange(len(template))
            cut = rng.randint(1, 8)
            yield "%d byte(s) deleted at %d" % (cut, at), template[:at] + template[at + cut:]
        elif kind == 5:
            yield "random bytes", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 96)))
        else:
            # A plausible header (right seq, a type the readers act on) over random bytes.
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            mtype = rng.choice([0x100, 0x104, 0x105, 2, 3, 1, 4, 0x10])
            head = HDR.pack(rng.choice([16 + len(body), 20, 16, 36, len(body)]), mtype, 2, seq, 0)
            yield "header of type 0x%x over %d random bytes" % (mtype, len(body)), head + body


# ------------------------------------------------------------------------ entry points

@pytest.fixture
def decoder(monkeypatch):
    """A private layout cache warmed on the valid dump, so mutations also meet compiled
    layouts; and a kernel recent enough for filtered_delete to send its request."""
    monkeypatch.setattr(C, "_SHAPES", {})
    monkeypatch.setattr(C, "_shape_count", 0)
    decode_entries(DUMP)
    monkeypatch.setattr(C, "kernel_version", lambda release=None: (6, 18))


class OverSocket:
    """An entry point run over a scripted socket whose receive buffers hold ``leftover``,
    or (None) are exactly as long as the bytes received, so reading past them raises.

    One CtnetlinkSocket serves every case, as one serves the agent for its
    lifetime: what a case leaves behind must not change the next one's
    outcome (the buffers are put back to ``leftover``, nothing else is).
    """

    def __init__(self, method: Callable[[CtnetlinkSocket], object], seq: int, leftover: Optional[bytes],
                 then: Sequence[bytes] = ()):
        self.method, self.seq, self.leftover, self.then = method, seq, leftover, then
        self.ct = CtnetlinkSocket.from_socket(ScriptedSocket([]))
        if leftover is not None:
            for buf in (self.ct._buf, self.ct._dump_buf):
                buf[:] = leftover[:len(buf)]
        self.dirty = 0

    def __call__(self, data: bytes):
        ct = self.ct
        ct._sock = ScriptedSocket([data, *self.then])
        ct._seq = self.seq - 1  # the request goes out with the recorded replies' seq
        ct._broken_features.clear()
        if self.leftover is None:
            size = max(len(d) for d in (data, *self.then))
            ct._buf, ct._dump_buf = bytearray(size), bytearray(size)
        else:
            for buf in (ct._buf, ct._dump_buf):
                buf[:self.dirty] = self.leftover[:self.dirty]
            self.dirty = len(data)
        try:
            return checked(self.method(ct))
        finally:
            assert not ct._dump_active, "a dump left its socket marked busy"


def checked(result):
    """``result``, after checking what callers rely on in any entry it holds."""
    entries = result if isinstance(result, list) else [result]
    for e in entries:
        if isinstance(e, C.CtEntry):
            width = {C.AF_INET: 4, C.AF_INET6: 16}[e.family]
            assert len(e.src) == len(e.dst) == width, e
            assert len(e.key) % 4 == 0, e
            C.encode_delete(e, 1)
            C.encode_set_timeout(e, 10, 1)
    return result


def dump_all(ct: CtnetlinkSocket):
    return list(ct.dump())


def dump_first_then_stop(ct: CtnetlinkSocket):
    entries = iter(ct.dump())
    try:
        return next(entries, None)
    finally:
        entries.close()  # drains the rest, as evict does when its budget runs out


def collect_errors(ct: CtnetlinkSocket):
    return ct.collect_errors()


def filtered_delete(ct: CtnetlinkSocket):
    return ct.filtered_delete(mark=0x42)


ACK = HDR.pack(36, 2, 0x100, 0, 0) + struct.pack("=i", 0) + HDR.pack(40, 0x102, 5, 0, 0)
ERRORS = b"".join(stamped(ENOENT_REPLY, s) for s in (11, 12, 13))

# The kernel sends a dump's NLMSG_DONE on its own after the last entries.
DUMP_DONE = stamped(DUMP[-20:], 77)

# (name, valid reply, seq of the request, what runs over the socket, datagrams after the reply)
TARGETS = [
    ("stats", stamped(STATS, 78), 78, CtnetlinkSocket.stats, ()),
    ("cpu_stats", stamped(CPU, 79), 79, CtnetlinkSocket.cpu_stats, ()),
    ("dump", stamped(DUMP, 77), 77, dump_all, ()),
    ("dump_done_apart", stamped(DUMP[:-20], 77), 77, dump_all, (DUMP_DONE,)),
    ("dump_abandoned", stamped(DUMP, 77), 77, dump_first_then_stop, ()),
    ("collect_errors", ERRORS, 5, collect_errors, ()),
    ("filtered_delete", stamped(ACK, 5), 5, filtered_delete, ()),
]


def outcome(run: Callable[[bytes], object], data: bytes, allowed: tuple) -> Tuple[str, object]:
    try:
        return "value", run(data)
    except allowed as exc:
        return type(exc).__name__, getattr(exc, "errno", None)


def run_case(name: str, runs: Sequence[Callable[[bytes], object]], data: bytes, allowed: tuple,
             where: str) -> list:
    results = []
    signal.setitimer(signal.ITIMER_REAL, HARD_STOP)
    try:
        for run in runs:
            try:
                results.append(outcome(run, data, allowed))
            except Exception as exc:  # noqa: BLE001 - the point of the test
                raise AssertionError("%s raised %r (%s)" % (name, exc, where)) from exc
    except Runaway:
        raise AssertionError("%s still running after %.1f s (%s)" % (name, HARD_STOP, where)) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return results


def fuzz(name: str, template: bytes, seq: int, runs: Sequence[Callable[[bytes], object]],
         allowed: tuple) -> int:
    rng = random.Random("%d/%s" % (SEED, name))
    start = time.perf_counter()
    cases = 0
    slowest = (0.0, "")
    previous_handler = signal.signal(signal.SIGALRM, _stop_runaway)
    try:
        for cases, (what, data) in enumerate(mutations(template, rng, seq), 1):
            where = "seed %d, %s case %d: %s: %s" % (SEED, name, cases, what, data.hex())
            t = time.perf_counter()
            results = run_case(name, runs, data, allowed, where)
            took = time.perf_counter() - t
            if took > CASE_BOUND:
                # Slow once may be the shared machine; slow three times is the decoder.
                for _ in range(2):
                    t = time.perf_counter()
                    run_case(name, runs, data, allowed, where)
                    took = min(took, time.perf_counter() - t)
            if took > slowest[0]:
                slowest = (took, where)
            assert all(r == results[0] for r in results), \
                "outcome depends on the bytes beyond those received: %r (%s)" % (results, where)
            if cases >= MAX_CASES or time.perf_counter() - start > TIME_BUDGET:
                break
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
    assert slowest[0] < CASE_BOUND, "slowest case took %.1f ms (%s)" % (slowest[0] * 1e3, slowest[1])
    assert cases >= min(MIN_CASES, MAX_CASES), "only %d cases in %.1f s (seed %d)" % (cases, TIME_BUDGET, SEED)
    return cases


def test_decode_entries_survives_mutated_dumps(decoder):
    fuzz("decode_entries", DUMP, 77, [lambda data: checked(decode_entries(data))], (MalformedMessage,))


@pytest.mark.parametrize("name, template, seq, method, then", TARGETS, ids=[t[0] for t in TARGETS])
def test_socket_readers_survive_mutated_replies(decoder, name, template, seq, method, then):
    # Kernel-reported errors are answers, not crashes: a flipped bit can turn
    # a reply into a well-formed error reply.
    allowed = (MalformedMessage, CtnetlinkError, ConntrackUnavailable, ScriptDry)
    runs = [OverSocket(method, seq, None, then), OverSocket(method, seq, bytes(65536), then),
            OverSocket(method, seq, template * (65536 // len(template) + 1), then)]
    fuzz(name, template, seq, runs, allowed)


def test_the_mutations_cover_every_length_field():
    # The length mutations only mean something if they find the fields.
    fields = length_fields(DUMP)
    messages = [f for f in fields if f[1] == 4]
    assert len(messages) == 7
    nested = [f for f in fields if ATTR.unpack_from(DUMP, f[0])[1] & C.NLA_F_NESTED and f[1] == 2]
    assert len(nested) >= 6 * 5  # per entry: two tuples of two nests each, and more

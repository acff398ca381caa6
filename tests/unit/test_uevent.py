"""The uevent parser and listener on recorded and constructed datagrams.

The recorded ones are what the kernel sent: 6.18 on the development machines
(net devices, a synthetic "change" written to /sys/class/net/lo/uevent) and
Debian 12's 6.1 under qemu for `modprobe nf_conntrack` (tests/system/test_boot_vm.py).
The listener runs on a fake socket here, to drive the paths a real socket rarely
takes (ENOBUFS, truncation, forged senders); tests/kernel/test_uevent_kernel.py
checks it on the real socket.

The fuzz is seeded and bounded in time; reproduce a failure with its seed:
    UEVENT_FUZZ_SEED=<seed> pytest tests/unit/test_uevent.py
"""

from __future__ import annotations

import errno
import os
import random
import socket
import time
from typing import List

import pytest

from conntrack_agent import uevent
from conntrack_agent.uevent import Uevent, UeventError, UeventListener

# Debian 12's 6.1.0-50-amd64 under qemu: `modprobe nf_conntrack` (after add@ for libcrc32c,
# nf_defrag_ipv4 and nf_defrag_ipv6, its dependencies), then `modprobe -r nf_conntrack`.
MODULE_ADD = b"add@/module/nf_conntrack\0ACTION=add\0DEVPATH=/module/nf_conntrack\0SUBSYSTEM=module\0SEQNUM=1615\0"
MODULE_REMOVE = (b"remove@/module/nf_conntrack\0ACTION=remove\0DEVPATH=/module/nf_conntrack\0"
                 b"SUBSYSTEM=module\0SEQNUM=1616\0")
DEPENDENCY_ADD = b"add@/module/nf_defrag_ipv4\0ACTION=add\0DEVPATH=/module/nf_defrag_ipv4\0SUBSYSTEM=module\0SEQNUM=1613\0"
# 6.18: `ip link add ctatest-uev type veth peer name ctatest-uevp`, and `echo change > /sys/class/net/lo/uevent`.
NET_ADD = (b"add@/devices/virtual/net/ctatest-uev\0ACTION=add\0DEVPATH=/devices/virtual/net/ctatest-uev\0"
           b"SUBSYSTEM=net\0INTERFACE=ctatest-uev\0IFINDEX=6\0SEQNUM=1183\0")
LO_CHANGE = (b"change@/devices/virtual/net/lo\0ACTION=change\0DEVPATH=/devices/virtual/net/lo\0SUBSYSTEM=net\0"
             b"SYNTH_UUID=0\0INTERFACE=lo\0IFINDEX=1\0SEQNUM=1177\0")
# udev's re-broadcast on group 2: a binary header after the magic, then properties.
UDEV = b"libudev\0\xfe\xed\xca\xfe" + bytes(28) + b"ACTION=add\0DEVPATH=/module/nf_conntrack\0SUBSYSTEM=module\0"

SEED = int(os.environ.get("UEVENT_FUZZ_SEED", "20261129"))
BUDGET = float(os.environ.get("UEVENT_FUZZ_SECONDS", "1.0"))


# ------------------------------------------------------------------ parsing


def test_parses_the_module_load_the_kernel_sends():
    event = uevent.parse(MODULE_ADD)
    assert event.action == "add" and event.devpath == "/module/nf_conntrack"
    assert event.subsystem == "module" and event.seqnum == 1615
    assert event.env == {"ACTION": "add", "DEVPATH": "/module/nf_conntrack", "SUBSYSTEM": "module", "SEQNUM": "1615"}
    assert uevent.is_conntrack_load(event)


@pytest.mark.parametrize("data", [MODULE_REMOVE, DEPENDENCY_ADD, NET_ADD, LO_CHANGE,
                                  MODULE_ADD.replace(b"nf_conntrack", b"nf_conntrack_ftp"),
                                  MODULE_ADD.replace(b"nf_conntrack", b"nf_nat"),
                                  MODULE_ADD.replace(b"SUBSYSTEM=module", b"SUBSYSTEM=drivers")])
def test_only_the_load_of_nf_conntrack_itself_counts(data):
    event = uevent.parse(data)
    assert not uevent.is_conntrack_load(event)


def test_net_device_fields():
    event = uevent.parse(NET_ADD)
    assert (event.action, event.subsystem, event.env["INTERFACE"]) == ("add", "net", "ctatest-uev")
    assert uevent.parse(LO_CHANGE).env["SYNTH_UUID"] == "0"


def test_missing_final_nul_and_missing_action_fields_are_tolerated():
    assert uevent.parse(MODULE_ADD[:-1]) == uevent.parse(MODULE_ADD)
    bare = uevent.parse(b"add@/module/nf_conntrack\0SUBSYSTEM=module\0")
    assert uevent.is_conntrack_load(bare)
    assert bare.env["ACTION"] == "add" and bare.seqnum is None


def test_bytes_that_are_not_utf8_survive_in_a_printable_form():
    event = uevent.parse(b"add@/devices/virtual/net/e\xff0\0INTERFACE=e\xff0\0")
    assert event.env["INTERFACE"] == "e\\xff0"
    assert event.devpath.encode("utf-8")  # nothing a log or journal field would choke on


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (b"\0", "header"),
    (b"add/module/nf_conntrack\0SUBSYSTEM=module\0", "header"),
    (b"@/module/nf_conntrack\0", "header"),
    (b"add@module/nf_conntrack\0", "header"),
    (b"add@/module/nf_conntrack\0SUBSYSTEM\0", "KEY=VALUE"),
    (b"add@/module/nf_conntrack\0=module\0", "KEY=VALUE"),
    (b"add@/module/nf_conntrack\0\0SUBSYSTEM=module\0", "KEY=VALUE"),
    (b"add@/module/nf_conntrack\0SUBSYSTEM=module\0SUBSYSTEM=net\0", "repeated"),
    (b"add@/module/nf_conntrack\0ACTION=remove\0SUBSYSTEM=module\0", "disagrees"),
    (b"add@/module/nf_conntrack\0DEVPATH=/module/nf_nat\0SUBSYSTEM=module\0", "disagrees"),
    (UDEV, "udev"),
])
def test_malformed_datagrams_raise_the_modules_error(data, why):
    with pytest.raises(UeventError, match=why):
        uevent.parse(data)


def test_not_bytes_is_the_modules_error_too():
    with pytest.raises(UeventError):
        uevent.parse("add@/module/nf_conntrack")  # type: ignore[arg-type]


def _mutations(rng: random.Random) -> bytes:
    base = rng.choice([MODULE_ADD, MODULE_REMOVE, NET_ADD, LO_CHANGE, UDEV])
    kind = rng.randrange(7)
    data = bytearray(base)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
    if kind == 1:  # flip bytes
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
    elif kind == 2:  # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 3:  # shuffle the fields
        fields = bytes(data).split(b"\0")
        rng.shuffle(fields)
        data = bytearray(b"\0".join(fields))
    elif kind == 4:  # separators in odd places
        for _ in range(rng.randrange(1, 6)):
            data.insert(rng.randrange(len(data) + 1), rng.choice(b"\0=@/"))
    elif kind == 5:  # huge: many fields, long values
        data += b"".join(b"K%d=%s\0" % (i, b"v" * rng.randrange(0, 2000)) for i in range(rng.randrange(1, 200)))
    else:  # splice two messages
        other = rng.choice([MODULE_ADD, NET_ADD, UDEV])
        cut = rng.randrange(len(data))
        data = data[:cut] + other[rng.randrange(len(other)):]
    return bytes(data)


def test_fuzz_never_raises_anything_but_uevent_error_and_stays_fast():
    rng = random.Random(SEED)
    deadline = time.monotonic() + BUDGET
    cases = parsed = 0
    while time.monotonic() < deadline or cases < 2000:
        data = _mutations(rng)
        started = time.thread_time()  # CPU time: a loaded machine's preemption does not count
        try:
            event = uevent.parse(data)
        except UeventError:
            pass
        except Exception as exc:  # noqa: BLE001 - that is the finding
            pytest.fail("seed %d case %d: %r raised %r" % (SEED, cases, data[:200], exc))
        else:
            parsed += 1
            # What it returns is consistent: the header agrees with the fields.
            assert event.env["ACTION"] == event.action and event.env["DEVPATH"] == event.devpath
            assert event.devpath.startswith("/") and event.action
            uevent.is_conntrack_load(event)
            event.seqnum  # noqa: B018 - must not raise either
        elapsed = time.thread_time() - started
        assert elapsed < 0.05, "seed %d case %d took %.3fs of CPU (%d bytes)" % (SEED, cases, elapsed, len(data))
        cases += 1
        if cases > 200000:
            break
    assert parsed > 0 and parsed < cases  # the mutations reach both outcomes


# ------------------------------------------------------------------ the listener, on a fake socket


class FakeSocket:
    """recvmsg() answers from a script: (data, sender port id, flags) or an errno."""

    def __init__(self, script: List[object]):
        self.script = list(script)
        self.closed = False

    def recvmsg(self, bufsize: int):
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "nothing pending")
        item = self.script.pop(0)
        if isinstance(item, int):
            raise OSError(item, os.strerror(item))
        data, sender, flags = item
        return data[:bufsize], [], flags, (sender, 1)

    def fileno(self) -> int:
        return 42

    def close(self) -> None:
        self.closed = True


def test_read_events_drains_what_is_pending_and_keeps_the_kernels_only():
    sock = FakeSocket([(NET_ADD, 0, 0), (MODULE_ADD, 0, 0),
                       (MODULE_ADD, 4242, 0),      # forged: sent by a process, not the kernel
                       (UDEV, 0, 0),               # udev's format, whoever sent it
                       (b"garbage", 0, 0),
                       (MODULE_ADD, 0, socket.MSG_TRUNC),
                       (LO_CHANGE, 0, 0)])
    listener = UeventListener(sock)
    events = listener.read_events()
    assert [e.devpath for e in events] == ["/devices/virtual/net/ctatest-uev", "/module/nf_conntrack",
                                           "/devices/virtual/net/lo"]
    assert [uevent.is_conntrack_load(e) for e in events] == [False, True, False]
    assert (listener.ignored, listener.malformed) == (2, 2)
    assert "longer than" in listener.last_error
    assert listener.read_events() == []  # drained; EAGAIN ends a read without raising
    assert listener.fileno() == 42


def test_an_overrun_is_counted_and_the_events_after_it_still_come():
    listener = UeventListener(FakeSocket([(NET_ADD, 0, 0), errno.ENOBUFS, (MODULE_ADD, 0, 0)]))
    events = listener.read_events()
    assert [uevent.is_conntrack_load(e) for e in events] == [False, True]
    assert listener.overruns == 1


def test_other_socket_errors_propagate():
    listener = UeventListener(FakeSocket([errno.EBADF]))
    with pytest.raises(OSError) as info:
        listener.read_events()
    assert info.value.errno == errno.EBADF


def test_limit_leaves_the_rest_for_the_next_read():
    listener = UeventListener(FakeSocket([(NET_ADD, 0, 0)] * 5))
    assert len(listener.read_events(limit=3)) == 3
    assert len(listener.read_events()) == 2


def test_context_manager_closes():
    sock = FakeSocket([])
    with UeventListener(sock) as listener:
        assert listener.read_events() == []
    assert sock.closed


def test_uevent_is_a_plain_value():
    a = uevent.parse(MODULE_ADD)
    assert a == Uevent("add", "/module/nf_conntrack", dict(a.env)) and a == uevent.parse(MODULE_ADD)

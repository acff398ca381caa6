"""UeventListener on the real NETLINK_KOBJECT_UEVENT socket.

These machines' kernel has nf_conntrack built in, so no module load can be made
here (tests/system/test_boot_vm.py does that in a Debian 12 VM). What the kernel
does emit on demand, without touching the host: net device events. Each test
makes its own throw-away namespace (tests/rig.py) and triggers events only
there, because a net device's uevent is delivered only to uevent sockets in
the device's own namespace (the first test checks exactly that):

- `ip link add ctatest-uvN type veth peer name ...` inside the namespace,
- writing "change" to the namespace's /sys/class/net/lo/uevent (a synthetic
  event the kernel marks with SYNTH_UUID).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import time
from typing import Callable, Iterator, List

import pytest

from conntrack_agent import netns, uevent
from conntrack_agent.uevent import Uevent, UeventListener


@contextlib.contextmanager
def listener_in(ns_name: str, sock: socket.socket = None) -> Iterator[UeventListener]:
    """A listener whose socket was opened inside namespace `ns_name` ("" = ours)."""
    with netns.entered(ns_name):
        listener = UeventListener(sock() if callable(sock) else sock)
    try:
        yield listener
    finally:
        listener.close()


def wait_for(listener: UeventListener, predicate: Callable[[Uevent], bool], timeout: float = 5.0) -> List[Uevent]:
    """Poll the listener's fd as the agent's main loop will; every event read until one matches."""
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    seen: List[Uevent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            seen += listener.read_events()
            if any(predicate(e) for e in seen):
                return seen
    raise AssertionError("no matching uevent within %ss; saw %s" % (timeout, [(e.action, e.devpath) for e in seen]))


def test_a_veth_made_in_a_namespace_is_heard_there_and_only_there(ns):
    name = "ctatest-u" + secrets.token_hex(2)  # with the peer's "p": 14 of IFNAMSIZ's 15 characters
    with listener_in("") as home, listener_in(ns.name) as there:
        home.read_events()  # whatever the host was doing before
        ns.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"])
        seen = wait_for(there, lambda e: e.action == "add" and e.env.get("INTERFACE") == name)
        added = [e for e in seen if e.env.get("INTERFACE") == name][0]
        assert added.subsystem == "net" and added.devpath == "/devices/virtual/net/" + name
        assert added.seqnum is not None and not uevent.is_conntrack_load(added)

        ns.run(["ip", "link", "del", name])
        wait_for(there, lambda e: e.action == "remove" and e.env.get("INTERFACE") == name)
        # The kernel had delivered both to every socket that gets them by the time `there`
        # read them: the initial namespace's listener got none of this namespace's devices.
        leaked = [e for e in home.read_events() if name in e.devpath]
        assert leaked == []
        assert (there.malformed, there.overruns) == (0, 0)


def test_a_synthetic_change_on_lo_carries_its_uuid(ns):
    with listener_in(ns.name) as listener:
        # `ip netns exec` mounts a /sys of the namespace's own, so this is its lo.
        ns.run(["sh", "-c", "echo 'change 5b4b1d6e-0000-4000-8000-00000000c7a0 CTATEST=1' > /sys/class/net/lo/uevent"])
        seen = wait_for(listener, lambda e: e.action == "change" and e.env.get("INTERFACE") == "lo")
        event = [e for e in seen if e.env.get("INTERFACE") == "lo"][0]
        assert event.env["SYNTH_UUID"] == "5b4b1d6e-0000-4000-8000-00000000c7a0"
        assert event.env["SYNTH_ARG_CTATEST"] == "1"


def test_nothing_pending_reads_empty_without_blocking(ns):
    with listener_in(ns.name) as listener:
        started = time.monotonic()
        assert listener.read_events() == []
        assert time.monotonic() - started < 0.5
        assert select.select([listener.fileno()], [], [], 0)[0] == []


def test_the_socket_asks_for_a_large_receive_buffer(ns):
    with listener_in(ns.name) as listener:
        got = socket.socket(fileno=os.dup(listener.fileno()))
        try:
            # Root holds CAP_NET_ADMIN: SO_RCVBUFFORCE passes rmem_max (the kernel doubles the value).
            assert got.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= uevent.RCVBUF
        finally:
            got.detach()


def test_an_overflowing_socket_counts_the_overrun_and_keeps_working(ns):
    def tiny() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             uevent.NETLINK_KOBJECT_UEVENT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum: a couple of events
        sock.bind((0, uevent.KERNEL_GROUP))
        return sock

    with listener_in(ns.name, tiny) as listener:
        ns.run(["sh", "-c", "for i in $(seq 40); do echo change > /sys/class/net/lo/uevent; done"])
        events = listener.read_events()
        assert listener.overruns >= 1, "40 events fitted into the minimum buffer?"
        assert 0 < len(events) < 40
        # Still usable afterwards: the next event arrives.
        ns.run(["sh", "-c", "echo 'change 00000000-0000-4000-8000-0000000000aa' > /sys/class/net/lo/uevent"])
        wait_for(listener, lambda e: e.env.get("SYNTH_UUID") == "00000000-0000-4000-8000-0000000000aa")


def test_opening_needs_no_privilege(ns):
    # The agent runs as its own user: binding the kernel's group must work without root.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            with UeventListener() as listener:
                listener.read_events()
                code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    # EPERM here would mean the kernel no longer lets any user listen (NL_CFG_F_NONROOT_RECV).
    assert os.waitstatus_to_exitcode(status) == 0, message

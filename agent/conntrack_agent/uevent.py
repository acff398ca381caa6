"""Kernel uevents (NETLINK_KOBJECT_UEVENT): to hear nf_conntrack being loaded.

The only module that opens a uevent socket. On a kernel where nf_conntrack is a
module (Debian's 6.1 has CONFIG_NF_CONNTRACK=m) nothing may load it at boot,
and it can arrive at any time later: loading it makes the kernel send
"add@/module/nf_conntrack" to group 1 of every uevent socket. The agent's main
loop polls `UeventListener.fileno()` and calls `read_events()` when it is
readable; `is_conntrack_load()` picks the one event that matters.

What the kernel sends (checked on 6.18 and on Debian 12's 6.1 under qemu):
one datagram per event, "ACTION@DEVPATH\\0" then "KEY=VALUE\\0" pairs, among them
ACTION, DEVPATH, SUBSYSTEM and SEQNUM; from port id 0 (the kernel). A module's
"add" is sent from do_init_module after the module's init function has run
(kernels since 2021, Debian 12's 6.1 among them; the VM test checks that the
sysctls exist when the event arrives), so nf_conntrack's sysctls are there to
write. Older kernels sent it before init: a caller should still treat a missing
sysctl right after the event as "not yet" and look again.

What is not here:
- udev's re-broadcasts (group 2, starting with "libudev\\0"): not bound, and
  dropped if they came anyway; so are datagrams not sent by the kernel (port id
  != 0), which any root process could otherwise forge.
- network namespaces appearing: no uevent (watch /run/netns with inotify).
- net devices of other namespaces: a uevent for a device is delivered only in
  the device's own namespace. Module events are not tied to a namespace: the
  kernel sends them to every uevent socket in namespaces owned by the initial
  user namespace, so an agent in a container's network namespace (without a
  user namespace of its own) still hears them.

The socket needs no privilege to receive (the kernel lets any user bind group 1)
and is an AF_NETLINK socket, which conntrack-agent.service's
RestrictAddressFamilies=AF_UNIX AF_NETLINK allows. If events come faster than
they are read (a boot's coldplug, `udevadm trigger`), the kernel drops the
overflow and the next read fails with ENOBUFS: `overruns` counts that, and the
caller should then look at /proc/sys/net/netfilter itself, since the load may
have been among the lost events.
"""

from __future__ import annotations

import errno
import socket
from typing import Dict, List, NamedTuple, Optional

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1          # udev's own re-broadcasts go to group 2
UDEV_MAGIC = b"libudev\0"
# The kernel builds a uevent in a 2048-byte buffer (UEVENT_BUFFER_SIZE); 8 KiB is what
# udev reads with. A datagram longer than the read is reported truncated (MSG_TRUNC).
RECV_SIZE = 8192
# Room for a burst: a boot's coldplug sends hundreds of events at once. Raising past
# net.core.rmem_max needs CAP_NET_ADMIN (SO_RCVBUFFORCE), which the agent holds; without
# it the kernel's cap applies.
RCVBUF = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
CONNTRACK_MODULE_DEVPATH = "/module/nf_conntrack"


class UeventError(ValueError):
    """A datagram that is not a well-formed kernel uevent."""


class Uevent(NamedTuple):
    action: str
    devpath: str
    env: Dict[str, str]       # every KEY=VALUE, ACTION and DEVPATH included

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def seqnum(self) -> Optional[int]:
        value = self.env.get("SEQNUM", "")
        return int(value) if value.isdigit() else None


def parse(data: bytes) -> Uevent:
    """One kernel uevent datagram -> Uevent; UeventError for anything else
    (udev's messages included), never another exception."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UeventError("expected bytes, got %s" % type(data).__name__)
    data = bytes(data)
    if data.startswith(UDEV_MAGIC):
        raise UeventError("a udev message, not the kernel's")
    if not data:
        raise UeventError("empty datagram")
    fields = data.split(b"\0")
    if fields[-1] == b"":
        fields.pop()  # the terminating NUL
    header = _text(fields[0])
    action, at, devpath = header.partition("@")
    if not at or not action or not devpath.startswith("/"):
        raise UeventError("header is not ACTION@/DEVPATH: %r" % header[:80])
    env: Dict[str, str] = {}
    for raw in fields[1:]:
        key, eq, value = _text(raw).partition("=")
        if not eq or not key:
            raise UeventError("field is not KEY=VALUE: %r" % raw[:80])
        if key in env:
            raise UeventError("field %r repeated" % key[:80])
        env[key] = value
    # The kernel repeats the header as ACTION= and DEVPATH=: a disagreement is not its message.
    if env.get("ACTION", action) != action or env.get("DEVPATH", devpath) != devpath:
        raise UeventError("header %r disagrees with ACTION/DEVPATH" % header[:80])
    env.setdefault("ACTION", action)
    env.setdefault("DEVPATH", devpath)
    return Uevent(action, devpath, env)


def _text(raw: bytes) -> str:
    # Device names may hold any byte but NUL and '/': keep them, in a form any log takes.
    return raw.decode("utf-8", "backslashreplace")


def is_conntrack_load(event: Uevent) -> bool:
    """nf_conntrack was just loaded (and initialised: its sysctls exist)."""
    return (event.action == "add" and event.subsystem == "module"
            and event.devpath == CONNTRACK_MODULE_DEVPATH)


class UeventListener:
    """A non-blocking uevent socket bound to the kernel's group; poll fileno()."""

    def __init__(self, sock: Optional[socket.socket] = None) -> None:
        # `sock`: for the tests, anything with recvmsg/fileno/close. The real one:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                                 NETLINK_KOBJECT_UEVENT)
            try:
                _grow_rcvbuf(sock)
                sock.bind((0, KERNEL_GROUP))  # port id 0: the kernel assigns one
            except BaseException:
                sock.close()
                raise
        self._sock = sock
        self.overruns = 0      # reads that failed with ENOBUFS: events were lost
        self.malformed = 0     # datagrams from the kernel's port that did not parse
        self.ignored = 0       # datagrams from anyone else, or udev's
        self.last_error: Optional[str] = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_events(self, limit: int = 10000) -> List[Uevent]:
        """Every uevent pending now (at most `limit`), without blocking."""
        events: List[Uevent] = []
        while len(events) < limit:
            try:
                data, _anc, flags, address = self._sock.recvmsg(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue  # the socket stays usable; what was queued after the overflow follows
                raise
            sender = address[0] if isinstance(address, tuple) and address else None
            if sender != 0 or data.startswith(UDEV_MAGIC):
                self.ignored += 1
                continue
            if flags & socket.MSG_TRUNC:
                self.malformed += 1
                self.last_error = "datagram longer than %d bytes" % RECV_SIZE
                continue
            try:
                events.append(parse(data))
            except UeventError as exc:
                self.malformed += 1
                self.last_error = str(exc)
        return events

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "UeventListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _grow_rcvbuf(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:  # EPERM without CAP_NET_ADMIN: up to net.core.rmem_max then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)

"""Lean ctnetlink (NETLINK_NETFILTER, subsystem CTNETLINK) over the stdlib only.

This is the agent's one door to ctnetlink. It uses ``socket`` and ``struct``
directly instead of pyroute2 because the hot path is measured in
microseconds: a kept-open socket answering IPCTNL_MSG_CT_GET_STATS costs
~5 µs here, pyroute2's ``Conntrack.count()`` ~470 µs, and pyroute2 dumps and
deletes run at 1-12k entries/s against 100k+ for the code below (see
../shared/FACTS.md). pyroute2 also builds a full object per message, which
is what makes big-table sweeps cost gigabytes elsewhere; here a dump is
parsed straight out of a reused receive buffer and only the attributes a
caller asks for are decoded.

A socket stays bound to the network namespace it was created in, so the
caller opens it inside the namespace to watch (``netns=`` does that for a
named namespace without ever creating one) and keeps it open.

Wire format reminders (include/uapi/linux/netfilter/nfnetlink*.h): every
message is nlmsghdr (16 bytes) + nfgenmsg (4 bytes) + attributes. Attribute
payloads of ctnetlink are big-endian; nlmsghdr and nlattr headers are host
order.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Dict, Optional, Tuple

__all__ = [
    "ConntrackUnavailable",
    "CtnetlinkError",
    "CtnetlinkSocket",
    "CPU_STAT_KEYS",
]

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1

# nlmsghdr flags and control types.
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33

# enum cntl_msg_types
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_CT_GET_STATS_CPU = 4
IPCTNL_MSG_CT_GET_STATS = 5

# enum ctattr_stats_global
CTA_STATS_GLOBAL_ENTRIES = 1
CTA_STATS_GLOBAL_MAX_ENTRIES = 2

# enum ctattr_stats_cpu. Numbers 1, 3, 5, 6 and 7 (searched, new, ignore,
# delete, delete_list) are marked "no longer used" in the uapi header and
# the kernel no longer emits them, so they are deliberately absent.
_CPU_STAT_NAMES = {
    2: "found",
    4: "invalid",
    8: "insert",
    9: "insert_failed",
    10: "drop",
    11: "early_drop",
    12: "error",
    13: "search_restart",
    14: "clash_resolve",
    15: "chaintoolong",
}
CPU_STAT_KEYS = tuple(_CPU_STAT_NAMES.values())

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ATTR = struct.Struct("=HH")  # nlattr: len, type
_BE32 = struct.Struct(">I")
_ERRNO = struct.Struct("=i")

_MSG_STATS = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS
_MSG_STATS_CPU = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS_CPU

# Errors meaning "ctnetlink is not there" rather than "you may not" or
# "this request is wrong": no nfnetlink protocol (EPROTONOSUPPORT), or no
# ctnetlink subsystem registered (nfnetlink answers EINVAL/EOPNOTSUPP for an
# unknown subsystem once its own module request has failed).
_UNAVAILABLE_SOCKET = (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT)
_UNAVAILABLE_REPLY = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT)


class ConntrackUnavailable(OSError):
    """nf_conntrack / nf_conntrack_netlink is not loaded, or ctnetlink is unreachable.

    An OSError subclass so code that already handles socket errors stays
    correct, while callers that care (the sampler's /proc fallback, the
    "wait and re-probe" loop) can catch it specifically. The agent never
    runs modprobe; the kernel may autoload nf_conntrack_netlink when the
    socket is first used, which is its own business.
    """


class CtnetlinkError(OSError):
    """The kernel answered a ctnetlink request with an error (errno set)."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _open_netns_fd(netns: str) -> int:
    # A bare name means /run/netns/NAME (what `ip netns` manages); a path is
    # used as is, so /proc/PID/ns/net works too. Opening never creates.
    path = netns if "/" in netns else os.path.join("/run/netns", netns)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2) for the calling thread (os.setns only exists from Python 3.12)."""
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    import ctypes  # only paid for when a named namespace is watched

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class CtnetlinkSocket:
    """A kept-open ctnetlink socket bound to one network namespace.

    ``netns``: None for the caller's namespace, a name under /run/netns, or a
    path to a namespace file. The socket is created inside that namespace
    and the thread switches straight back; the socket keeps answering for
    the namespace it was born in. A missing namespace raises
    FileNotFoundError: it is never created.
    """

    def __init__(self, netns: Optional[str] = None, rcvbuf: int = 1 << 20) -> None:
        self._sock: Optional[socket.socket] = None
        if netns is None:
            self._sock = self._open(rcvbuf)
        else:
            target = _open_netns_fd(netns)
            try:
                home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(target, 0)
                    try:
                        self._sock = self._open(rcvbuf)
                    finally:
                        setns(home, 0)
                finally:
                    os.close(home)
            finally:
                os.close(target)
        self._seq = 1
        # One receive buffer for every request: a stats reply is ~48 bytes,
        # a dump chunk at most a page-sized skb per recv (the kernel fills up
        # to ~32 KiB with NLM_F_DUMP when the buffer allows), so 64 KiB never
        # truncates and is never reallocated.
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self._stats_req = bytearray(
            _HDR.pack(20, _MSG_STATS, NLM_F_REQUEST, 0, 0) + bytes(4)
        )
        self._cpu_req = bytearray(
            _HDR.pack(20, _MSG_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, 0, 0) + bytes(4)
        )

    @staticmethod
    def _open(rcvbuf: int) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_NETFILTER)
        except OSError as exc:
            if exc.errno in _UNAVAILABLE_SOCKET:
                raise ConntrackUnavailable(exc.errno, "nfnetlink is not available: %s"
                                           % os.strerror(exc.errno)) from exc
            raise
        try:
            sock.bind((0, 0))
            # Error replies to batched no-ack requests would otherwise carry
            # a copy of every failed request; capped they are 36 bytes each.
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass
            # Dumps and batched-error bursts need room; FORCE lifts the
            # rmem_max cap when we hold CAP_NET_ADMIN, plain SO_RCVBUF is the
            # best effort otherwise.
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- plumbing -----------------------------------------------------------

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise ValueError("ctnetlink socket is closed")
        return self._sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "CtnetlinkSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def _raise_reply_error(err: int, what: str) -> None:
        if err in _UNAVAILABLE_REPLY:
            raise ConntrackUnavailable(err, "ctnetlink %s: %s (nf_conntrack_netlink "
                                       "not loaded?)" % (what, os.strerror(err)))
        raise CtnetlinkError(err, "ctnetlink %s: %s" % (what, os.strerror(err)))

    # -- counters -------------------------------------------------------------

    def stats(self) -> Tuple[int, int]:
        """(entry count of this namespace, global nf_conntrack_max)."""
        sock = self.sock
        seq = self.next_seq()
        req = self._stats_req
        _HDR.pack_into(req, 0, 20, _MSG_STATS, NLM_F_REQUEST, seq, 0)
        sock.send(req)
        buf = self._buf
        unpack_hdr = _HDR.unpack_from
        while True:
            n = sock.recv_into(buf)
            off = 0
            while off + 16 <= n:
                mlen, mtype, _flags, mseq, _pid = unpack_hdr(buf, off)
                if mlen < 16:
                    break
                if mseq == seq:
                    if mtype == _MSG_STATS:
                        return self._parse_stats(buf, off + 20, off + mlen)
                    if mtype == NLMSG_ERROR:
                        err = -_ERRNO.unpack_from(buf, off + 16)[0]
                        if err:
                            self._raise_reply_error(err, "GET_STATS")
                # Anything else is a stale reply to an interrupted request.
                off += _align4(mlen)

    @staticmethod
    def _parse_stats(buf: bytearray, off: int, end: int) -> Tuple[int, int]:
        count = maximum = -1
        while off + 4 <= end:
            alen, atype = _ATTR.unpack_from(buf, off)
            if alen < 4:
                break
            atype &= 0x3FFF
            if atype == CTA_STATS_GLOBAL_ENTRIES:
                count = _BE32.unpack_from(buf, off + 4)[0]
            elif atype == CTA_STATS_GLOBAL_MAX_ENTRIES:
                maximum = _BE32.unpack_from(buf, off + 4)[0]
            off += _align4(alen)
        if count < 0 or maximum < 0:
            raise CtnetlinkError(errno.EPROTO, "GET_STATS reply lacks entries/max")
        return count, maximum

    def cpu_stats(self) -> Dict[str, int]:
        """Per-CPU conntrack counters of this namespace, summed over CPUs.

        Only the counters the kernel reports appear (older kernels lack
        clash_resolve and chaintoolong).
        """
        sock = self.sock
        seq = self.next_seq()
        req = self._cpu_req
        _HDR.pack_into(req, 0, 20, _MSG_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        sock.send(req)
        totals: Dict[str, int] = {}
        buf = self._buf
        names = _CPU_STAT_NAMES
        while True:
            n = sock.recv_into(buf)
            off = 0
            while off + 16 <= n:
                mlen, mtype, _flags, mseq, _pid = _HDR.unpack_from(buf, off)
                if mlen < 16:
                    break
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return totals
                    if mtype == NLMSG_ERROR:
                        err = -_ERRNO.unpack_from(buf, off + 16)[0]
                        if err:
                            self._raise_reply_error(err, "GET_STATS_CPU")
                    elif mtype == _MSG_STATS_CPU:
                        a = off + 20
                        end = off + mlen
                        while a + 8 <= end:
                            alen, atype = _ATTR.unpack_from(buf, a)
                            if alen < 4:
                                break
                            name = names.get(atype & 0x3FFF)
                            if name is not None:
                                totals[name] = totals.get(name, 0) + _BE32.unpack_from(buf, a + 4)[0]
                            a += _align4(alen)
                off += _align4(mlen)


"""Entering named network namespaces (/run/netns/NAME) for a moment.

The agent opens its per-namespace sockets and /proc files inside each watched
namespace once, then returns home; those descriptors keep reporting the
namespace they were opened in. Writes of per-namespace sysctls enter again.

pyroute2 offers `netns.setns`, but importing pyroute2 costs ~26 MB of RSS
(measured: 8 MB -> 34 MB on Debian 12's Python 3.11), more than the agent's whole
idle budget, and its setns() *creates* a missing namespace unless flags=0.
setns(2) is one syscall: os.setns on Python 3.12+, libc through ctypes before.
Entering another namespace needs CAP_SYS_ADMIN (the unit's drop-in for named
namespaces says so).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


class NamespaceMissing(OSError):
    pass


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    import ctypes  # only on Python < 3.12, and only when a namespace is named

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def exists(name: str) -> bool:
    """Whether a namespace can be entered by this name ("" = ours, always)."""
    return not name or os.path.exists(os.path.join(NETNS_DIR, name))


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body inside namespace `name` ("" = stay where we are).

    Never creates a namespace: a missing one raises NamespaceMissing.
    """
    if not name:
        yield
        return
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceMissing(2, f"network namespace {name!r} does not exist in {NETNS_DIR}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)

"""The /proc files: netfilter sysctls, per-CPU conntrack stats, meminfo, slabinfo.

The only module that touches /proc. Hot-path reads go through file descriptors
opened once and read with os.pread (~1 µs): a /proc file opened inside a network
namespace keeps reporting that namespace after the process leaves it, which is
how one agent watches several namespaces without entering them every tick.
"""

from __future__ import annotations

import errno
import os
from typing import Dict, Optional

SYSCTL_DIR = "/proc/sys/net/netfilter"
STAT_FILE = "/proc/net/stat/nf_conntrack"

class ConntrackMissing(OSError):
    """nf_conntrack is not loaded (no sysctls): wait for it, never modprobe."""


def sysctl_path(name: str) -> str:
    """'nf_conntrack_max' or 'tcp_timeout_established' -> its /proc/sys path."""
    if not name.startswith("nf_conntrack"):
        name = "nf_conntrack_" + name
    return f"{SYSCTL_DIR}/{name}"


def conntrack_loaded() -> bool:
    return os.path.exists(sysctl_path("nf_conntrack_count"))


class IntFile:
    """A kept-open /proc file holding one integer."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConntrackMissing(errno.ENOENT, "nf_conntrack is not loaded", path) from None

    def read(self) -> int:
        return int(os.pread(self.fd, 32, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_sysctl(name: str) -> int:
    with open(sysctl_path(name), "rb") as f:
        return int(f.read())


def write_sysctl(name: str, value: int) -> None:
    """Write one sysctl in the current namespace. Raises OSError as the kernel does."""
    fd = os.open(sysctl_path(name), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"%d\n" % value)
    finally:
        os.close(fd)


# /proc/net/stat/nf_conntrack column -> the counter names used everywhere else
# (the same names ctnetlink's CTA_STATS_* use).
_STAT_COLUMNS = {"found": "found", "invalid": "invalid", "insert": "insert", "insert_failed": "insert_failed",
                 "drop": "drop", "early_drop": "early_drop", "icmp_error": "error",
                 "search_restart": "search_restart", "clashres": "clash_resolve", "chaintoolong": "chaintoolong"}


class StatFile:
    """Per-CPU counters from /proc/net/stat/nf_conntrack, summed (the fallback
    when ctnetlink is unavailable; ~18 µs against the netlink path's few µs)."""

    def __init__(self) -> None:
        try:
            self.fd = os.open(STAT_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConntrackMissing(errno.ENOENT, "nf_conntrack is not loaded", STAT_FILE) from None

    def read(self) -> Dict[str, int]:
        chunks = []
        offset = 0
        while True:
            chunk = os.pread(self.fd, 65536, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return parse_stat(b"".join(chunks).decode())

    def close(self) -> None:
        os.close(self.fd)


def parse_stat(text: str) -> Dict[str, int]:
    lines = text.split("\n")
    header = lines[0].split()
    totals = {ours: 0 for column, ours in _STAT_COLUMNS.items() if column in header}
    for line in lines[1:]:
        values = line.split()
        if len(values) != len(header):
            continue
        for column, value in zip(header, values):
            ours = _STAT_COLUMNS.get(column)
            if ours is not None:
                totals[ours] += int(value, 16)
    return totals


def mem_total() -> int:
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError(errno.ENOENT, "MemTotal missing from /proc/meminfo")


def slab_object_size(name: str = "nf_conntrack") -> Optional[int]:
    """The kernel's object size for a slab cache; None when unreadable (root only)."""
    try:
        with open("/proc/slabinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == name.encode():
                    return int(fields[3])
    except (OSError, ValueError, IndexError):
        return None
    return None

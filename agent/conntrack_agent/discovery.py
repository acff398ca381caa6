"""The node's network namespaces, discovered live: which exist, which to watch, what runs in them.

A namespace is identified by its nsfs inode, (st_dev, st_ino) of the file that
stands for it: names and processes come and go, the inode is the namespace.
Two sources find them:

- named ones, /run/netns/NAME (ip netns, CNI plugins, CRI-O's pinns), through an
  inotify watch on the directory. ``ip netns add`` creates an empty file and only
  then bind-mounts the new namespace on it, with no inotify event for the mount:
  a name whose file is not (yet) an nsfs mount is re-checked for a while
  (``timeout()`` tells the caller's loop when) before it counts as a namespace;
- unnamed ones (docker, rootless tools, systemd's PrivateNetwork=, unshare -n),
  by a bounded scan of /proc/PID/ns/net: at most ``max_pids`` processes and
  ``max_seconds`` per scan, resumed where it stopped, a namespace declared gone
  only by a sweep that visited every process.

``Discovery`` combines both behind one fd for the agent's poll loop; ``select``
applies the policy's ``agent.namespaces`` patterns and the cap on how many are
watched (pure); ``parse_cgroup`` names what runs in a namespace (systemd unit,
container id, Kubernetes pod UID) from a process's cgroup (pure).

Privileges: reading another user's /proc/PID/ns/net needs CAP_SYS_PTRACE (the
kernel's ptrace read check; root has it), entering a namespace CAP_SYS_ADMIN.
A scan without the first counts what it could not read (``ScanResult.denied``).

Namespaces are never kept open here: an open nsfs fd (or a socket created inside)
keeps a deleted namespace alive with all its conntrack entries, so a caller that
keeps a probe open must close it when the namespace is reported vanished.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import time
from typing import (Callable, Collection, Dict, Iterable, Iterator, List, NamedTuple, Optional,
                    Sequence, Set, Tuple)

from . import netns as _netns
from .inotify import (IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_MOVE_SELF, IN_MOVED_FROM,
                      IN_MOVED_TO, IN_ONLYDIR, IN_Q_OVERFLOW)
from .inotify import Inotify as _Inotify

__all__ = [
    "NsKey", "Netns", "Changes", "NamedWatcher", "ProcScanner", "ScanResult", "Discovery",
    "HOST", "ALL", "matches", "wanted", "needs_unnamed", "is_valid_pattern", "select",
    "Labels", "cgroup_path", "parse_cgroup", "labels_of", "entered_path", "entered_ns",
    "own_key",
]

NETNS_DIR = _netns.NETNS_DIR
PROC = "/proc"

NsKey = Tuple[int, int]   # (st_dev, st_ino) of the namespace's nsfs file

# Patterns of agent.namespaces with a meaning of their own.
HOST = "host"   # the agent's own network namespace (the node's, for a host-network agent)
ALL = "*"       # every namespace on the node, named or not, the agent's own included


class Netns(NamedTuple):
    """One network namespace as last seen; immutable, replaced when it changes."""

    key: NsKey
    names: Tuple[str, ...] = ()   # its /run/netns names, sorted (usually none or one)
    pid: Optional[int] = None     # one process in it (the lowest pid seen), if any
    host: bool = False            # the agent's own namespace

    @property
    def inode(self) -> int:
        return self.key[1]

    @property
    def name(self) -> str:
        """What logs call it: its /run/netns name, "host", or net:[INODE]."""
        if self.host:
            return HOST
        if self.names:
            return self.names[0]
        return "net:[%d]" % self.key[1]

    def path(self, proc: str = PROC, netns_dir: str = NETNS_DIR) -> Optional[str]:
        """A file to enter it by: the /run/netns name if it has one (stable), else
        /proc/PID/ns/net (valid while that process lives: check the inode after
        opening, entered_ns does). None for the host namespace (nothing to enter)."""
        if self.host:
            return None
        if self.names:
            return os.path.join(netns_dir, self.names[0])
        if self.pid is not None:
            return "%s/%d/ns/net" % (proc, self.pid)
        return None


class Changes(NamedTuple):
    appeared: List[Netns]
    vanished: List[Netns]
    renamed: List[Netns]   # still there, but its /run/netns names changed (re-match the patterns)


def own_key(proc: str = PROC) -> NsKey:
    """The agent's own namespace (the main thread's, not a setns-ed worker's)."""
    st = os.stat(proc + "/self/ns/net")
    return (st.st_dev, st.st_ino)


def _nsfs_dev(proc: str = PROC) -> int:
    # Every network namespace file lives on the one nsfs superblock; an empty
    # placeholder file in /run/netns (before ip netns add mounts it) does not.
    return os.stat(proc + "/self/ns/net").st_dev


# --------------------------------------------------------------------------- inotify

_DIR_MASK = IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
# While the directory does not exist (no ip netns add yet since boot): its parent,
# for the directory appearing.
_PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR


# A name whose file is not an nsfs mount yet is re-checked after these delays
# (seconds since its event), then dropped until the next rescan: `ip netns add`
# mounts within milliseconds, a busy node may take longer to create a namespace.
PENDING_RECHECKS = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


class NamedWatcher:
    """/run/netns watched with inotify: names and the namespace each stands for.

    ``fileno()`` becomes readable on a change; ``poll()`` then returns the names
    that appeared and vanished, each with its namespace key. ``timeout()`` is when
    poll() must run again even without an event (a name still waiting for its
    mount). ``rescan()`` re-reads the whole directory: the safety net for a
    queue overflow, or a mount or unmount without create or delete.
    """

    def __init__(self, directory: str = NETNS_DIR, clock: Callable[[], float] = time.monotonic,
                 stat: Callable[[str], os.stat_result] = os.stat, nsfs_dev: Optional[int] = None) -> None:
        self.directory = directory.rstrip("/") or "/"
        self.clock = clock
        self._stat = stat
        self.nsfs_dev = _nsfs_dev() if nsfs_dev is None else nsfs_dev
        self.names: Dict[str, NsKey] = {}
        self._pending: Dict[str, Tuple[float, int]] = {}   # name -> (first seen, recheck index)
        self._inotify = _Inotify()
        self._dir_wd: Optional[int] = None
        self._parent_wd: Optional[int] = None
        self._arm()
        self._initial = self._rescan_changes()

    # -- watches

    def _arm(self) -> None:
        """Watch the directory, or its parent while the directory is missing."""
        try:
            self._dir_wd = self._inotify.add(self.directory, _DIR_MASK)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            self._dir_wd = None
        if self._dir_wd is None and self._parent_wd is None:
            try:
                self._parent_wd = self._inotify.add(os.path.dirname(self.directory) or "/", _PARENT_MASK)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
                # No parent either: nothing to watch; rescan() retries arming.
        elif self._dir_wd is not None and self._parent_wd is not None:
            self._inotify.rm(self._parent_wd)
            self._parent_wd = None

    def fileno(self) -> int:
        return self._inotify.fd

    def close(self) -> None:
        self._inotify.close()

    # -- what a name is

    def _key(self, name: str) -> Optional[NsKey]:
        """The namespace behind /run/netns/NAME, or None (gone, or not mounted yet)."""
        try:
            st = self._stat(os.path.join(self.directory, name))
        except OSError:
            return None
        if st.st_dev != self.nsfs_dev:
            return None
        return (st.st_dev, st.st_ino)

    def _check(self, name: str, appeared: Dict[str, NsKey], vanished: Dict[str, NsKey]) -> bool:
        """Look at one name; returns whether it is (now) a namespace."""
        key = self._key(name)
        old = self.names.get(name)
        if key == old:
            return key is not None
        if old is not None:
            vanished[name] = old
            del self.names[name]
        if key is not None:
            self.names[name] = key
            appeared[name] = key
            return True
        return False

    # -- polling

    def timeout(self) -> Optional[float]:
        """Seconds until poll() has a re-check due (0: now), None when nothing waits."""
        if not self._pending:
            return None
        now = self.clock()
        due = min(first + PENDING_RECHECKS[i] for first, i in self._pending.values())
        return max(0.0, due - now)

    def poll(self) -> Tuple[Dict[str, NsKey], Dict[str, NsKey]]:
        """(appeared, vanished): name -> key, since the last poll. Never blocks."""
        appeared: Dict[str, NsKey] = dict(self._initial[0])
        vanished: Dict[str, NsKey] = dict(self._initial[1])
        self._initial = ({}, {})
        touched: Set[str] = set()
        rescan = False
        for wd, mask, name in self._inotify.read():
            if mask & IN_Q_OVERFLOW:
                rescan = True
            elif wd == self._dir_wd and wd is not None:
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    # The directory itself went away (or moved): every name with it.
                    if mask & IN_MOVE_SELF:
                        self._inotify.rm(wd)
                    self._dir_wd = None
                    rescan = True
                elif name and not mask & IN_ISDIR:
                    touched.add(name)
            elif wd == self._parent_wd and wd is not None:
                if name == os.path.basename(self.directory):
                    rescan = True
        if rescan:
            a, v = self._rescan_changes()
            _merge(appeared, vanished, a, v)
        else:
            for name in touched:
                if not self._check(name, appeared, vanished) and os.path.lexists(
                        os.path.join(self.directory, name)):
                    # Created, not mounted yet (or a stray file): look again shortly.
                    self._pending[name] = (self.clock(), 0)
                else:
                    self._pending.pop(name, None)
        self._recheck_pending(appeared, vanished)
        return appeared, vanished

    def _recheck_pending(self, appeared: Dict[str, NsKey], vanished: Dict[str, NsKey]) -> None:
        if not self._pending:
            return
        now = self.clock()
        for name, (first, i) in list(self._pending.items()):
            if now < first + PENDING_RECHECKS[i]:
                continue
            if self._check(name, appeared, vanished) or not os.path.lexists(os.path.join(self.directory, name)):
                del self._pending[name]
            elif i + 1 < len(PENDING_RECHECKS):
                self._pending[name] = (first, i + 1)
            else:
                del self._pending[name]   # a plain file after all; rescan() looks again

    def rescan(self) -> Tuple[Dict[str, NsKey], Dict[str, NsKey]]:
        """Re-read the whole directory (and re-arm a lost watch); (appeared, vanished)."""
        appeared, vanished = self.poll()
        a, v = self._rescan_changes()
        _merge(appeared, vanished, a, v)
        return appeared, vanished

    def _rescan_changes(self) -> Tuple[Dict[str, NsKey], Dict[str, NsKey]]:
        if self._dir_wd is None:
            self._arm()
        appeared: Dict[str, NsKey] = {}
        vanished: Dict[str, NsKey] = {}
        try:
            present = set(os.listdir(self.directory))
        except OSError:
            present = set()
        for name in list(self.names):
            if name not in present:
                vanished[name] = self.names.pop(name)
        for name in present:
            self._check(name, appeared, vanished)
        for name in list(self._pending):
            if name not in present or name in self.names:
                del self._pending[name]
        return appeared, vanished


def _merge(appeared: Dict[str, NsKey], vanished: Dict[str, NsKey],
           more_appeared: Dict[str, NsKey], more_vanished: Dict[str, NsKey]) -> None:
    """Fold a later batch of changes into an earlier one: a name that appeared and
    then vanished (with the same key) within one poll is no change at all."""
    for name, key in more_vanished.items():
        if appeared.get(name) == key:
            del appeared[name]
        else:
            vanished[name] = key
    for name, key in more_appeared.items():
        if vanished.get(name) == key:
            del vanished[name]
        else:
            appeared[name] = key


# --------------------------------------------------------------------------- /proc scan

_NS_LINK = re.compile(r"net:\[(\d+)\]\Z")


def read_ns_inode(path: str) -> Optional[int]:
    """The inode in a /proc/PID/ns/net link ("net:[4026531840]"), None if gone.
    Raises PermissionError when the process is not ours to inspect."""
    try:
        link = os.readlink(path)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    m = _NS_LINK.match(link)
    return int(m.group(1)) if m else None


class ScanResult(NamedTuple):
    found: Dict[int, int]   # inode -> lowest pid seen in it (this scan, or the whole sweep when complete)
    complete: bool          # a sweep over every process ended with this scan: `found` is all of them
    visited: int            # processes looked at by this scan
    denied: int             # ... of which unreadable (no CAP_SYS_PTRACE over them)
    seconds: float          # time this scan took


class ProcScanner:
    """Bounded, resumable scan of /proc/*/ns/net.

    A sweep is a walk over the process list as it was when the sweep began, in
    pid order; each ``scan()`` visits at most ``max_pids`` of them and stops
    after ``max_seconds``, and the next scan resumes there. Only a completed
    sweep knows every namespace that has a process in it, so only a completed
    sweep may say one is gone.
    """

    def __init__(self, proc: str = PROC, max_pids: int = 4096, max_seconds: float = 0.02,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_pids < 1:
            raise ValueError("max_pids must be at least 1")
        self.proc = proc
        self.max_pids = max_pids
        self.max_seconds = max_seconds
        self.clock = clock
        self._pids: List[int] = []
        self._at = 0
        self._sweep: Dict[int, int] = {}
        self._denied = 0

    def _start_sweep(self) -> None:
        pids = []
        with os.scandir(self.proc) as it:
            for entry in it:
                if entry.name.isdigit():
                    pids.append(int(entry.name))
        pids.sort()
        self._pids = pids
        self._at = 0
        self._sweep = {}
        self._denied = 0

    def scan(self) -> ScanResult:
        start = self.clock()
        if self._at >= len(self._pids):
            self._start_sweep()
        stop_at = start + self.max_seconds
        end = min(len(self._pids), self._at + self.max_pids)
        sweep = self._sweep
        fmt = self.proc + "/%d/ns/net"
        visited = denied = 0
        found: Dict[int, int] = {}
        i = self._at
        while i < end:
            pid = self._pids[i]
            i += 1
            visited += 1
            try:
                inode = read_ns_inode(fmt % pid)
            except PermissionError:
                denied += 1
                inode = None
            if inode is not None:
                if inode not in sweep:
                    sweep[inode] = pid   # pids are visited in order: the first is the lowest
                if inode not in found:
                    found[inode] = pid
            # A clock read every 64 processes: readlink costs ~2 µs, the clock ~0.1.
            if not visited & 63 and self.clock() >= stop_at:
                break
        self._at = i
        self._denied += denied
        complete = self._at >= len(self._pids)
        if complete:
            found = dict(sweep)
        return ScanResult(found, complete, visited, denied, self.clock() - start)


# --------------------------------------------------------------------------- both

class Discovery:
    """Every network namespace on the node, kept up to date by poll().

    ``fileno()`` (the inotify fd) is readable when /run/netns changed; the
    caller's loop waits on it at most ``timeout()`` seconds and then calls
    ``poll()``, which reads the events, re-checks names waiting for their mount
    and, at most every ``scan_interval`` seconds, runs one bounded /proc scan.
    The scan finds the unnamed namespaces and a process in each named one (for
    its labels); ``scan_processes=False`` leaves both out. ``namespaces`` is the
    current view, keyed by NsKey; the agent's own namespace is always in it
    (``host`` True).
    """

    def __init__(self, netns_dir: str = NETNS_DIR, proc: str = PROC, scan_processes: bool = True,
                 scan_interval: float = 10.0, max_pids: int = 4096, max_scan_seconds: float = 0.02,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = proc
        self.clock = clock
        self.scan_processes = scan_processes
        self.scan_interval = scan_interval
        self.host_key = own_key(proc)
        self.named = NamedWatcher(netns_dir, clock=clock, nsfs_dev=self.host_key[0])
        self.scanner = ProcScanner(proc, max_pids, max_scan_seconds, clock)
        self.namespaces: Dict[NsKey, Netns] = {}
        self._pids: Dict[int, int] = {}      # inode -> representative pid
        self._next_scan = clock()            # the first poll scans
        self.last_scan: Optional[ScanResult] = None

    def fileno(self) -> int:
        return self.named.fileno()

    def close(self) -> None:
        self.named.close()

    def timeout(self) -> Optional[float]:
        """Longest wait before poll() must run even if fileno() stays quiet."""
        waits = [w for w in (self.named.timeout(),) if w is not None]
        if self.scan_processes:
            waits.append(max(0.0, self._next_scan - self.clock()))
        return min(waits) if waits else None

    def poll(self, rescan: bool = False) -> Changes:
        """Apply what changed since the last poll; ``rescan`` also re-reads /run/netns."""
        appeared_names, vanished_names = self.named.rescan() if rescan else self.named.poll()
        dev = self.host_key[0]
        scanned = False
        if self.scan_processes and self.clock() >= self._next_scan:
            scanned = True
            scan = self.scanner.scan()
            self.last_scan = scan
            # A cut-short scan resumes at the next poll; a completed sweep waits for the interval.
            self._next_scan = self.clock() + (self.scan_interval if scan.complete else 0.0)
            if scan.complete:
                self._pids = dict(scan.found)
            else:
                for inode, pid in scan.found.items():
                    self._pids.setdefault(inode, pid)
        if not (scanned or appeared_names or vanished_names) and self.namespaces:
            # Nothing happened (the fd woke the loop for an event that changed nothing,
            # or a re-check found a name still unmounted): the view stands.
            return Changes([], [], [])
        # A name went: its namespace lives on (unnamed) only if a process still holds it,
        # one readlink to know without waiting for the next sweep.
        for key in set(vanished_names.values()):
            pid = self._pids.get(key[1])
            if pid is not None and read_ns_inode_quiet("%s/%d/ns/net" % (self.proc, pid)) != key[1]:
                del self._pids[key[1]]
        names_by_key: Dict[NsKey, List[str]] = {}
        for name, key in self.named.names.items():
            names_by_key.setdefault(key, []).append(name)
        current: Dict[NsKey, Netns] = {}
        current[self.host_key] = Netns(self.host_key, tuple(sorted(names_by_key.get(self.host_key, ()))),
                                       self._pids.get(self.host_key[1]), True)
        for key, names in names_by_key.items():
            if key not in current:
                current[key] = Netns(key, tuple(sorted(names)), self._pids.get(key[1]))
        for inode, pid in self._pids.items():
            key = (dev, inode)
            if key not in current:
                current[key] = Netns(key, (), pid)
        before = self.namespaces
        appeared = [ns for key, ns in current.items() if key not in before]
        vanished = [ns for key, ns in before.items() if key not in current]
        renamed = [ns for key, ns in current.items() if key in before and before[key].names != ns.names]
        self.namespaces = current
        return Changes(appeared, vanished, renamed)


def find_pid_of(inode: int, proc: str = PROC, max_pids: int = 100000) -> Optional[int]:
    """A process in the network namespace with this inode (the lowest pid), or None:
    one full walk of /proc, for a caller that only has a recorded inode."""
    try:
        pids = sorted(int(n) for n in os.listdir(proc) if n.isdigit())
    except OSError:
        return None
    for pid in pids[:max_pids]:
        if read_ns_inode_quiet("%s/%d/ns/net" % (proc, pid)) == inode:
            return pid
    return None


def read_ns_inode_quiet(path: str) -> Optional[int]:
    try:
        return read_ns_inode(path)
    except OSError:
        return None


# --------------------------------------------------------------------------- patterns

_GLOB_CHARS = frozenset("*?[")
def is_valid_pattern(pattern: str) -> bool:
    """Whether a policy entry is a namespace pattern this module understands: a
    /run/netns name, a glob over them, "host" or "*" (the policy's own check)."""
    from .config import valid_netns_pattern
    return valid_netns_pattern(pattern)


def _is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def matches(pattern: str, ns: Netns) -> bool:
    """One agent.namespaces entry against one namespace.

    "*": every namespace, named or not, the agent's own included; "host": the
    agent's own; a glob ("cni-*"): any of its /run/netns names (fnmatchcase, so
    never an unnamed namespace); anything else: exactly one of its names. A
    namespace named "host" in /run/netns is reachable by a glob ("hos[t]") only.
    """
    if pattern == ALL:
        return True
    if pattern == HOST:
        return ns.host
    if _is_glob(pattern):
        return any(fnmatch.fnmatchcase(name, pattern) for name in ns.names)
    return pattern in ns.names


def wanted(patterns: Sequence[str], ns: Netns) -> bool:
    """Any pattern matches; no patterns at all means the agent's own namespace,
    as the agent has always watched by default."""
    if not patterns:
        return ns.host
    return any(matches(p, ns) for p in patterns)


def needs_unnamed(patterns: Sequence[str]) -> bool:
    """Only "*" reaches namespaces without a name: the /proc scan runs for it alone."""
    return ALL in patterns


def _rank(patterns: Sequence[str], ns: Netns, keep: Collection[NsKey]) -> Tuple[int, str, int]:
    # Who gets a place first when there are more than the cap: the agent's own,
    # those already watched (a newcomer never displaces a watched namespace), those
    # named exactly, those matched by a glob, then the unnamed; by name, then inode.
    if ns.host:
        group = 0
    elif ns.key in keep:
        group = 1
    elif any(not _is_glob(p) and p not in (ALL, HOST) and p in ns.names for p in patterns):
        group = 2
    elif ns.names:
        group = 3
    else:
        group = 4
    return (group, ns.names[0] if ns.names else "", ns.key[1])


def select(patterns: Sequence[str], namespaces: Iterable[Netns], limit: int,
           keep: Collection[NsKey] = ()) -> Tuple[List[Netns], List[Netns]]:
    """(watched, left_out): the namespaces the patterns want, at most ``limit`` of
    them, and those that matched but found no place (for the caller to log once)."""
    chosen = sorted((ns for ns in namespaces if wanted(patterns, ns)), key=lambda ns: _rank(patterns, ns, keep))
    limit = max(0, limit)
    return chosen[:limit], chosen[limit:]


# --------------------------------------------------------------------------- labels

class Labels(NamedTuple):
    unit: Optional[str] = None        # the systemd unit (last *.service / *.scope component)
    container: Optional[str] = None   # a 64-hex container id
    runtime: Optional[str] = None     # docker, containerd, cri-o, podman (from the scope prefix)
    pod_uid: Optional[str] = None     # the Kubernetes pod UID, dashed
    cgroup: Optional[str] = None      # the path they came from


def cgroup_path(text: str) -> Optional[str]:
    """The path a /proc/PID/cgroup file gives: the cgroup v2 line ("0::/…"), else
    (cgroup v1) the name=systemd hierarchy, else the first non-root path."""
    v2 = systemd = other = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif controllers == "name=systemd":
            systemd = path
        elif other is None and path not in ("", "/"):
            other = path
    for path in (v2, systemd, other):
        if path and path != "/":
            return path
    return v2 or systemd


_HEX64 = r"[0-9a-f]{64}"
# Container scopes (systemd cgroup driver) and directories (cgroupfs driver).
_RUNTIMES = (
    (re.compile(r"docker-(%s)\.scope\Z" % _HEX64), "docker"),
    (re.compile(r"cri-containerd-(%s)\.scope\Z" % _HEX64), "containerd"),
    (re.compile(r"crio-(%s)(?:\.scope)?\Z" % _HEX64), "cri-o"),
    (re.compile(r"libpod-(%s)\.scope\Z" % _HEX64), "podman"),
)
_BARE_ID = re.compile(r"(%s)\Z" % _HEX64)
# kubepods-burstable-pod<UID with _>.slice (systemd driver), pod<UID> (cgroupfs driver).
_POD = re.compile(r"(?:^|-)pod([0-9a-f]{8}[_-][0-9a-f]{4}[_-][0-9a-f]{4}[_-][0-9a-f]{4}[_-][0-9a-f]{12})(?:\.slice)?\Z")
_UNIT = re.compile(r".+\.(?:service|scope)\Z")


def parse_cgroup(path: Optional[str]) -> Labels:
    """Labels from one cgroup path (pure). Understands the kubelet's layouts for both
    cgroup drivers and the docker/containerd/CRI-O/podman container scopes."""
    if not path:
        return Labels()
    parts = [p for p in path.split("/") if p]
    unit = container = runtime = pod_uid = None
    in_kubepods = False
    for part in parts:
        if part.startswith("kubepods"):
            in_kubepods = True
        if _UNIT.match(part):
            unit = part
        m = _POD.search(part)
        if m and (in_kubepods or part.endswith(".slice")):
            pod_uid = m.group(1).replace("_", "-")
        for regex, name in _RUNTIMES:
            m = regex.match(part)
            if m:
                container, runtime = m.group(1), name
                break
        else:
            m = _BARE_ID.match(part)
            if m:
                # cgroupfs driver: /kubepods/<qos>/pod<UID>/<id>, /docker/<id>, /system.slice/... never.
                container = m.group(1)
                runtime = "docker" if "docker" in parts else runtime
    return Labels(unit, container, runtime, pod_uid, path)


def labels_of(ns: Netns, proc: str = PROC) -> Dict[str, str]:
    """What to show next to a namespace: its name, and what its representative
    process's cgroup says. A process that left the namespace meanwhile (or a reused
    pid) gives no labels rather than wrong ones."""
    out: Dict[str, str] = {}
    if ns.names:
        out["netns"] = ns.names[0]
    if ns.host:
        out["netns"] = HOST
    if ns.pid is None:
        return out
    try:
        with open("%s/%d/cgroup" % (proc, ns.pid)) as f:
            text = f.read()
    except OSError:
        return out
    if read_ns_inode_quiet("%s/%d/ns/net" % (proc, ns.pid)) != ns.inode:
        return out
    labels = parse_cgroup(cgroup_path(text))
    for field in ("unit", "container", "runtime", "pod_uid"):
        value = getattr(labels, field)
        if value:
            out[field] = value
    return out


# --------------------------------------------------------------------------- entering

@contextlib.contextmanager
def entered_path(path: str, expect: Optional[NsKey] = None) -> Iterator[None]:
    """Run the body inside the network namespace of nsfs file ``path`` (a
    /run/netns name or /proc/PID/ns/net), then come back; never creates anything.

    ``expect``: the key the caller discovered; a file that now stands for another
    namespace (the pid was reused) raises NamespaceMissing instead of entering it.
    Needs CAP_SYS_ADMIN. Only the calling thread moves.
    """
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise _netns.NamespaceMissing(errno.ENOENT, "network namespace %s does not exist" % path) from None
    try:
        if expect is not None:
            st = os.fstat(target)
            if (st.st_dev, st.st_ino) != tuple(expect):
                raise _netns.NamespaceMissing(
                    errno.ENOENT, "%s is no longer network namespace net:[%d]" % (path, expect[1]))
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _netns._setns(target)
            try:
                yield
            finally:
                _netns._setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


@contextlib.contextmanager
def entered_ns(ns: Netns, proc: str = PROC, netns_dir: str = NETNS_DIR) -> Iterator[None]:
    """entered_path for a discovered namespace, checking it is still that one; the
    host namespace is where the agent already is."""
    path = ns.path(proc, netns_dir)
    if path is None:
        if not ns.host:
            raise _netns.NamespaceMissing(errno.ENOENT, "no way into %s left" % ns.name)
        yield
        return
    with entered_path(path, ns.key):
        yield

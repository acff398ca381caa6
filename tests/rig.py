"""The real-kernel test rig shared by every kernel test and benchmark.

Real conntrack entries, made in throw-away network namespaces, cross-checked
with conntrack-tools. Nothing here mocks the kernel.

Why it looks like this (measured on the project's 2-vCPU Debian 12 test VMs, kernel 6.18):
- conntrack only tracks a namespace once something there uses it, hence the
  nft table with ``ct state new counter`` in an output chain.
- Flood datagrams are dropped on input so no ICMP unreachable comes back;
  each datagram leaves exactly one UNREPLIED entry behind.
- nf_conntrack_max and nf_conntrack_buckets are global, and every namespace
  is checked against the one max: several engineers run kernel tests on the
  same VM at once, so whoever changes them or builds a big table holds
  ``global_lock()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Union

PYTHON = "/usr/bin/python3"
PREFIX = "ctatest-"
LOCK_PATH = "/run/lock/conntrack-agent-tests.lock"
NETFILTER = "/proc/sys/net/netfilter"
# UDP and TCP destination ports reserved for flood traffic; the namespace's
# input chain drops them so no ICMP port-unreachable or RST comes back. Only
# in the original direction: replies to ephemeral ports (32768-60999 overlap
# this range) must get through, or no test TCP connection could complete.
FLOOD_PORTS = (20000, 59999)
# Extra IPv6 destinations: a local (AnyIP) route makes the whole prefix
# reachable on lo without adding 10^5 addresses.
V6_PREFIX = "fd00:c7a::"

Cmd = Union[str, Sequence[str]]


def _argv(cmd: Cmd) -> List[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def sh(cmd: Cmd, check: bool = True, input: Optional[str] = None,
       timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(_argv(cmd), input=input, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s%s" % (
            " ".join(_argv(cmd)), proc.returncode, proc.stdout, proc.stderr))
    return proc


# --------------------------------------------------------------------------
# namespaces

_RULESET = """
table inet ctatest {{
    chain out {{
        type filter hook output priority 0; policy accept;
        ct state new counter
    }}
    chain in {{
        type filter hook input priority 0; policy accept;
        ct direction original udp dport {lo}-{hi} drop
        ct direction original tcp dport {lo}-{hi} drop
    }}
}}
"""


class Namespace:
    """A uniquely named network namespace with conntrack active on lo.

    Removed on exit, also when the body raises. Entries die with it.
    """

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = name or "%s%d-%s" % (PREFIX, os.getpid(), secrets.token_hex(3))
        self._created = False
        self._procs: List[subprocess.Popen] = []

    # lifecycle ------------------------------------------------------------
    def __enter__(self) -> "Namespace":
        sh(["ip", "netns", "add", self.name])
        self._created = True
        try:
            self.run("ip link set lo up")
            self.run(["ip", "-6", "route", "add", "local", V6_PREFIX + "/64", "dev", "lo"])
            self.nft(_RULESET.format(lo=FLOOD_PORTS[0], hi=FLOOD_PORTS[1]))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self._created:
            sh(["ip", "netns", "del", self.name], check=False)
            self._created = False

    @property
    def path(self) -> str:
        return "/run/netns/" + self.name

    # running things inside --------------------------------------------------
    def argv(self, cmd: Cmd) -> List[str]:
        return ["ip", "netns", "exec", self.name] + _argv(cmd)

    def run(self, cmd: Cmd, check: bool = True, input: Optional[str] = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return sh(self.argv(cmd), check=check, input=input, timeout=timeout)

    def python(self, code: str, *args: str, check: bool = True, timeout: float = 300) -> str:
        """Run ``code`` with /usr/bin/python3 inside the namespace; return stdout."""
        return self.run([PYTHON, "-c", textwrap.dedent(code)] + list(args), check=check,
                        timeout=timeout).stdout

    def popen(self, cmd: Cmd, **kw: object) -> subprocess.Popen:
        """Start a long-lived process inside; it is killed when the namespace closes."""
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("text", True)
        proc = subprocess.Popen(self.argv(cmd), **kw)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def nft(self, ruleset: str) -> None:
        self.run(["nft", "-f", "-"], input=ruleset)

    def mark_ports(self, lo: int, hi: int, mark: int, proto: str = "udp") -> None:
        """Give new entries to destination ports lo..hi the conntrack mark ``mark``."""
        self.run(["nft", "add", "rule", "inet", "ctatest", "out", proto, "dport",
                  "%d-%d" % (lo, hi), "ct", "mark", "set", "0x%x" % mark])


def cleanup_stale() -> List[str]:
    """Delete ctatest namespaces whose creating process is gone (killed runs)."""
    removed = []
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return removed
    for name in names:
        m = re.match(re.escape(PREFIX) + r"(\d+)-", name)
        if not m:
            continue
        if os.path.exists("/proc/%s" % m.group(1)):
            continue
        sh(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


# --------------------------------------------------------------------------
# traffic

_FLOOD = r"""
import socket, sys, ipaddress
n, family, dst, first_port, last_port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sport = int(sys.argv[6])
ports = last_port - first_port + 1
af = socket.AF_INET if family == 4 else socket.AF_INET6
base = int(ipaddress.ip_address(dst))
socks = {}
def sock_for(k):
    s = socks.get(k)
    if s is None:
        s = socket.socket(af, socket.SOCK_DGRAM)
        if sport:
            s.bind(("127.0.0.1" if family == 4 else "::1", sport + k))
        socks[k] = s
    return s
s = sock_for(0)
sent = 0
i = 0
ntoa = (lambda v: socket.inet_ntop(af, v.to_bytes(4 if family == 4 else 16, "big")))
addr_cache = {}
while sent < n:
    a, p = divmod(i, ports)
    i += 1
    addr = addr_cache.get(a)
    if addr is None:
        addr = addr_cache[a] = ntoa(base + a)
    try:
        s.sendto(b"x", (addr, first_port + p))
        sent += 1
    except (BlockingIOError, InterruptedError):
        continue
    except OSError:
        # EPERM when the table is full and the packet was dropped: the
        # caller asked for n attempts, count them.
        sent += 1
print(sent)
"""


def flood_udp(ns: Namespace, n: int, dst: Optional[str] = None, family: int = 4,
              ports: Sequence[int] = FLOOD_PORTS, sport: int = 0) -> int:
    """Create about ``n`` UNREPLIED UDP entries in ``ns``; return datagrams sent.

    Destinations walk ``ports`` then the next address (127.0.0.2, 127.0.0.3...
    or fd00:c7a::1, ::2...), so every datagram is a new tuple. ``sport`` binds
    a fixed source port (handy for selector tests), else the kernel picks one.
    Uses ports inside FLOOD_PORTS so the input chain drops them.
    """
    if dst is None:
        dst = "127.0.0.2" if family == 4 else V6_PREFIX + "1"
    out = ns.python(_FLOOD, str(n), str(family), dst, str(ports[0]), str(ports[1]),
                    str(sport), timeout=600)
    return int(out.strip())


_SYN = r"""
import socket, sys, ipaddress
n, family, dst, first_port, last_port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
af = socket.AF_INET if family == 4 else socket.AF_INET6
base = int(ipaddress.ip_address(dst))
ports = last_port - first_port + 1
width = 4 if family == 4 else 16
sent = 0
while sent < n:
    a, p = divmod(sent, ports)
    s = socket.socket(af, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect((socket.inet_ntop(af, (base + a).to_bytes(width, "big")), first_port + p))
    except BlockingIOError:
        pass
    except OSError:
        pass  # table full: the SYN was dropped, the attempt still counts
    # Closing a socket in SYN_SENT sends nothing: the entry stays SYN_SENT.
    s.close()
    sent += 1
print(sent)
"""


def flood_tcp_syn(ns: Namespace, n: int, dst: Optional[str] = None, family: int = 4,
                  ports: Sequence[int] = FLOOD_PORTS) -> int:
    """Create about ``n`` TCP entries in SYN_SENT (unreplied) state; return SYNs sent.

    Non-blocking connects whose SYN the input chain drops (~60k/s).
    """
    if dst is None:
        dst = "127.0.0.2" if family == 4 else V6_PREFIX + "1"
    out = ns.python(_SYN, str(n), str(family), dst, str(ports[0]), str(ports[1]), timeout=900)
    return int(out.strip())


_SERVER = r"""
import socket, sys, threading, time
family, port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
af = socket.AF_INET if family == 4 else socket.AF_INET6
host = "127.0.0.1" if family == 4 else "::1"
srv = socket.socket(af, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(512)
def echo(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
def serve():
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
if mode == "session":
    cli = socket.socket(af, socket.SOCK_STREAM)
    cli.connect((host, port))
    print(cli.getsockname()[1], flush=True)
    for line in sys.stdin:
        msg = line.strip().encode() or b"ping"
        cli.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = cli.recv(65536)
            if not chunk:
                break
            got += chunk
        print("ok" if got == msg else "bad:" + got.decode(errors="replace"), flush=True)
elif mode == "timewait":
    n = int(sys.argv[4])
    for _ in range(n):
        c = socket.socket(af, socket.SOCK_STREAM)
        c.connect((host, port))
        c.sendall(b"x")
        c.recv(1)
        c.close()
    time.sleep(0.3)
    print(n, flush=True)
"""


class EchoSession:
    """A live, assured ESTABLISHED TCP connection inside ``ns``.

    One helper process holds an echo server on ``port`` and a client
    connected to it. ``ping()`` pushes a message through and checks the echo;
    the connection stays open until the namespace closes.
    """

    def __init__(self, ns: Namespace, port: int = 7000, family: int = 4) -> None:
        self.ns = ns
        self.port = port
        self.family = family
        self.proc = ns.popen([PYTHON, "-c", _SERVER, str(family), str(port), "session"])
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            raise RuntimeError("echo session did not start")
        self.sport = int(line)
        self._lock = threading.Lock()

    def ping(self, msg: str = "ping") -> bool:
        with self._lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(msg + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline().strip() == "ok"

    def entry(self) -> Optional[Dict[str, object]]:
        """This session's conntrack entry as conntrack -L reports it, or None."""
        for e in conntrack_list(self.ns):
            if e["proto"] == "tcp" and e["sport"] == self.sport and e["dport"] == self.port:
                return e
        return None


def make_time_wait(ns: Namespace, n: int, port: int = 7100, family: int = 4) -> int:
    """Open and close ``n`` TCP connections; each leaves an assured TIME_WAIT entry."""
    out = ns.python(_SERVER, str(family), str(port), "timewait", str(n), timeout=300)
    return int(out.strip())


# --------------------------------------------------------------------------
# cross-checks with conntrack-tools

def conntrack_count(ns: Namespace) -> int:
    return int(ns.run("conntrack -C").stdout.strip())


_KV = re.compile(r"(\w+)=(\S+)")


def parse_conntrack_line(line: str) -> Optional[Dict[str, object]]:
    """One line of ``conntrack -L -o extended,id`` as a dict.

    Keys: family, proto, protonum, timeout, state (TCP, else None), src, dst,
    sport, dport (original direction), rsrc, rdst, rsport, rdport (reply),
    flags (set of the bracketed words), mark, zone, id.
    """
    parts = line.split()
    if len(parts) < 5 or parts[0] not in ("ipv4", "ipv6"):
        return None
    e: Dict[str, object] = {
        "family": 4 if parts[0] == "ipv4" else 6,
        "proto": parts[2],
        "protonum": int(parts[3]),
        "timeout": int(parts[4]),
        "state": None,
        "flags": set(),
        "mark": 0,
        "zone": 0,
        "id": None,
    }
    rest = parts[5:]
    if rest and "=" not in rest[0] and not rest[0].startswith("["):
        e["state"] = rest[0]
        rest = rest[1:]
    tuples: List[Dict[str, str]] = [{}, {}]
    which = 0
    for tok in rest:
        if tok.startswith("["):
            e["flags"].add(tok.strip("[]"))  # type: ignore[union-attr]
            continue
        m = _KV.match(tok)
        if not m:
            continue
        k, v = m.group(1), m.group(2)
        if k in ("src", "dst", "sport", "dport", "type", "code"):
            if k in tuples[which] and which == 0:
                which = 1
            tuples[which][k] = v
        elif k == "id":
            e["id"] = int(v)
        elif k in ("mark", "zone", "use"):
            e[k] = int(v)
    o, r = tuples
    e["src"], e["dst"] = o.get("src"), o.get("dst")
    e["sport"] = int(o["sport"]) if "sport" in o else None
    e["dport"] = int(o["dport"]) if "dport" in o else None
    e["rsrc"], e["rdst"] = r.get("src"), r.get("dst")
    e["rsport"] = int(r["sport"]) if "sport" in r else None
    e["rdport"] = int(r["dport"]) if "dport" in r else None
    return e


def conntrack_list(ns: Namespace) -> List[Dict[str, object]]:
    """Every entry of ``ns`` (both families), parsed; see parse_conntrack_line."""
    out = ns.run(["conntrack", "-L", "-o", "extended,id"], timeout=600).stdout
    entries = []
    for line in out.splitlines():
        e = parse_conntrack_line(line)
        if e is not None:
            entries.append(e)
    return entries


# --------------------------------------------------------------------------
# global state guards

_lock_depth = 0
_lock_fd: Optional[int] = None
_lock_mutex = threading.RLock()


@contextlib.contextmanager
def global_lock(timeout: float = 1800) -> Iterator[None]:
    """Exclusive flock shared by all engineers' tests on this VM.

    Hold it while changing nf_conntrack_max/buckets or while building tables
    of more than ~20k entries. Re-entrant within one process.
    """
    global _lock_depth, _lock_fd
    with _lock_mutex:
        if _lock_depth == 0:
            os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
            fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise TimeoutError("%s held for more than %ss" % (LOCK_PATH, timeout))
                    time.sleep(0.05)
            _lock_fd = fd
        _lock_depth += 1
    try:
        yield
    finally:
        with _lock_mutex:
            _lock_depth -= 1
            if _lock_depth == 0 and _lock_fd is not None:
                fcntl.flock(_lock_fd, fcntl.LOCK_UN)
                os.close(_lock_fd)
                _lock_fd = None


def read_sysctl(name: str) -> int:
    with open(os.path.join(NETFILTER, name)) as f:
        return int(f.read().split()[0])


def write_sysctl(name: str, value: int) -> None:
    with open(os.path.join(NETFILTER, name), "w") as f:
        f.write("%d\n" % value)


@contextlib.contextmanager
def saved_global_sysctls() -> Iterator[Dict[str, int]]:
    """Save nf_conntrack_max and nf_conntrack_buckets; restore them on exit.

    Restores also when the body fails. Writes only what changed, because a
    buckets write rehashes the whole table. Takes global_lock() itself.
    Run from the initial network namespace (that is where they are writable).
    """
    with global_lock():
        saved = {n: read_sysctl(n) for n in ("nf_conntrack_max", "nf_conntrack_buckets")}
        try:
            yield dict(saved)
        finally:
            errors = []
            for name in ("nf_conntrack_buckets", "nf_conntrack_max"):
                try:
                    if read_sysctl(name) != saved[name]:
                        write_sysctl(name, saved[name])
                except OSError as exc:  # keep restoring the others
                    errors.append("%s: %s" % (name, exc))
            if errors:
                raise RuntimeError("could not restore: " + "; ".join(errors))


def require_root() -> None:
    """Skip a kernel test when not root; in CI (env CI set) fail instead."""
    if os.geteuid() == 0:
        return
    import pytest

    reason = "needs root and a real conntrack table"
    if os.environ.get("CI"):
        pytest.fail("kernel test cannot run in CI: " + reason, pytrace=False)
    pytest.skip(reason)


def require_tools() -> None:
    """Same policy as require_root for the conntrack/nft/ip binaries."""
    import shutil

    missing = [t for t in ("ip", "nft", "conntrack") if shutil.which(t) is None]
    if not missing:
        return
    import pytest

    reason = "missing tools: " + ", ".join(missing) + " (apt-get install nftables conntrack iproute2)"
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def in_netns(ns: Namespace, code: str, *args: str) -> str:
    """Run agent code inside ``ns`` with this interpreter (venv, editable install)."""
    return ns.run([sys.executable, "-c", textwrap.dedent(code)] + list(args), timeout=600).stdout

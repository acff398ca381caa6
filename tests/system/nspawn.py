"""Boot a throw-away Debian 12 (or 13) under systemd-nspawn with the agent installed.

The root file system is built once with debootstrap and cached under
CACHE_DIR, keyed on the suite (bookworm by default; trixie for Debian 13),
mirror and package list (a changed list builds a new one). Each run boots an overlayfs on top of the cache, so a run never
changes the cache and its writes vanish with the overlay.

The container shares the host's network namespace and, with
SYSTEMD_NSPAWN_API_VFS_WRITABLE=1, may write /proc/sys: nf_conntrack_max and
nf_conntrack_buckets are global and writable only from the initial namespace,
and the agent's raise of max has to be real to be tested (a container with its own
network namespace gets EACCES writing them: checked on kernel 6.18).
Callers hold tests/rig.py's global_lock() while such a container runs, and
restore the global values afterwards.

Commands run inside with nsenter on the container's PID 1, as root, with a
clean environment. ``--register=no --keep-unit``: the host's PID 1 may not be
systemd, so nothing is registered with machined or run in a new scope.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

SUITE = "bookworm"  # the default: Debian 12, what the agent is developed on
# Debian releases the package is installed on by tests/system/test_deb_install.py:
# suite -> version. The .deb built on Debian 12 must install and run on each.
SUITES = {"bookworm": "12", "trixie": "13"}
MIRROR = os.environ.get("CONNTRACK_AGENT_TEST_MIRROR", "http://deb.debian.org/debian")
CACHE_DIR = Path(os.environ.get("CONNTRACK_AGENT_TEST_CACHE", "/var/cache/conntrack-agent-tests"))
RUN_DIR = Path("/var/tmp/conntrack-agent-tests")
# What the agent needs at run time on Debian 12, plus what the tests drive it with
# (systemd brings systemctl, journalctl, busctl and systemd-analyze; util-linux setpriv).
# procps: /bin/kill for the unit's ExecReload; minbase leaves it out, real systems have it.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "python3-gi", "python3-pydbus",
            "python3-structlog", "python3-pyroute2", "util-linux")
REQUIRED_TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "mount", "umount")

REPO = Path(__file__).resolve().parents[2]
PYTHON_DIR = "usr/lib/python3/dist-packages"
INSTALL = {
    # working tree path -> path inside the container
    "systemd/conntrack-agent.service": "usr/lib/systemd/system/conntrack-agent.service",
    "systemd/io.github.conntrack_agent1.conf": "usr/share/dbus-1/system.d/io.github.conntrack_agent1.conf",
    "systemd/conntrack-agent.catalog": "usr/lib/systemd/catalog/conntrack-agent.catalog",
    "systemd/sysusers.d/conntrack-agent.conf": "usr/lib/sysusers.d/conntrack-agent.conf",
    "systemd/tmpfiles.d/conntrack-agent.conf": "usr/lib/tmpfiles.d/conntrack-agent.conf",
    "config/policy.toml": "usr/lib/conntrack-agent/policy.toml",
}
LAUNCHER = "#!/usr/bin/python3\nfrom conntrack_agent.cli import main\nraise SystemExit(main())\n"
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}


class HarnessError(RuntimeError):
    pass


def missing_tools() -> List[str]:
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def _run(argv: Sequence[str], timeout: float = 600, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise HarnessError("%s failed (%d):\n%s%s" % (" ".join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc


# ------------------------------------------------------------------ the cached root


def image_key(packages: Iterable[str] = PACKAGES, suite: str = SUITE) -> str:
    text = json.dumps({"suite": suite, "mirror": MIRROR, "variant": "minbase",
                       "packages": sorted(set(packages))}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_image(packages: Iterable[str] = PACKAGES, suite: str = SUITE) -> Path:
    """The cached root of ``suite`` with this package list, built on first use (~1 minute)."""
    if suite not in SUITES:
        raise HarnessError("unknown suite %r (known: %s)" % (suite, ", ".join(SUITES)))
    packages = sorted(set(packages))
    root = CACHE_DIR / ("%s-%s" % (suite, image_key(packages, suite))) / "root"
    if (root.parent / "complete").exists():
        return root
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first build
        if (root.parent / "complete").exists():
            return root
        building = root.parent / "building"
        shutil.rmtree(building, ignore_errors=True)
        building.parent.mkdir(parents=True, exist_ok=True)
        _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), suite,
              str(building), MIRROR], timeout=1800)
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
        (root.parent / "complete").write_text(json.dumps({"suite": suite, "packages": packages,
                                                          "built": time.time()}))
    return root


# ------------------------------------------------------------------ installing the agent


def install_from_tree(root: Path, repo: Path = REPO) -> None:
    """Install the agent the way the .deb will: package, launcher, unit, bus policy,
    catalog, sysusers; then the two steps the package's scripts run."""
    target = root / PYTHON_DIR / "conntrack_agent"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(repo / "agent" / "conntrack_agent", target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    launcher = root / "usr/bin/conntrack-agent"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    for source, dest in INSTALL.items():
        if not (repo / source).exists():
            continue  # e.g. config/policy.toml before it lands: built-in defaults apply
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / source, root / dest)
    _run(["chroot", str(root), "systemd-sysusers", "conntrack-agent.conf"])
    _run(["chroot", str(root), "journalctl", "--update-catalog"])


# ------------------------------------------------------------------ the container


class Container:
    """A booted container; use as a context manager. Everything is undone on exit."""

    def __init__(self, image: Path, binds: Sequence[str] = (), name: Optional[str] = None,
                 install_tree: bool = True) -> None:
        self.image = image
        # False: boot the image as it is (the package test installs the .deb itself).
        self.install_tree = install_tree
        self.binds = list(binds)
        self.name = name or "ctatest-%d" % os.getpid()
        self.dir = RUN_DIR / self.name
        self.root = self.dir / "merged"
        self.console = self.dir / "console.log"
        self.proc: Optional[subprocess.Popen] = None
        self.leader: Optional[int] = None
        self._mounted = False

    # life -------------------------------------------------------------------

    def __enter__(self) -> "Container":
        try:
            self._mount()
            if self.install_tree:
                install_from_tree(self.root)
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mount(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for sub in ("upper", "work", "merged"):
            (self.dir / sub).mkdir(parents=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              "lowerdir=%s,upperdir=%s,workdir=%s" % (self.image, self.dir / "upper", self.dir / "work"),
              str(self.root)])
        self._mounted = True

    def _boot(self, timeout: float = 90) -> None:
        argv = ["systemd-nspawn", "--quiet", "--directory", str(self.root), "--machine", self.name,
                "--boot", "--register=no", "--keep-unit", "--link-journal=no", "--console=pipe",
                # nspawn keeps CAP_NET_ADMIN from a container that shares the host's
                # network; the agent's unit grants it, so the container must hold it.
                "--capability=CAP_NET_ADMIN"]
        argv += ["--bind-ro=%s" % b for b in self.binds]
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="1")
        with open(self.console, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None:
                raise HarnessError("systemd-nspawn exited with %s:\n%s" % (self.proc.returncode, self.console_text()))
            if time.monotonic() > deadline:
                raise HarnessError("the container's init did not appear:\n" + self.console_text())
            self.leader = _find_init(self.proc.pid)
            time.sleep(0.1)
        while True:
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise HarnessError("boot did not finish (state %r):\n%s" % (state, self.console_text()))
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # nspawn turns SIGTERM into an orderly poweroff of the container.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None
        self.leader = None
        if self._mounted:
            if _run(["umount", str(self.root)], check=False).returncode != 0:
                _run(["umount", "--lazy", str(self.root)], check=False)
            self._mounted = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # inside -------------------------------------------------------------------

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 120, input: Optional[str] = None,
            user: Optional[int] = None) -> subprocess.CompletedProcess:
        """Run a command inside the container; as root, or as ``user`` (a uid, groups cleared)."""
        if self.leader is None:
            raise HarnessError("container not running")
        inner = list(argv)
        if user is not None:
            inner = ["setpriv", "--reuid=%d" % user, "--regid=%d" % user, "--clear-groups", "--"] + inner
        full = ["nsenter", "--target", str(self.leader), "--all", "--", "env", "-i"]
        full += ["%s=%s" % kv for kv in CLEAN_ENV.items()] + inner
        return _run(full, check=check, timeout=timeout, input=input)

    def write(self, path: str, text: str) -> None:
        self.run(["mkdir", "-p", os.path.dirname(path)])
        self.run(["tee", path], input=text)

    def remove(self, path: str) -> None:
        self.run(["rm", "-rf", path])

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager"] + list(args), check=check)

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> List[Dict[str, object]]:
        """journalctl -o json lines as dicts (fields that repeat come as lists)."""
        out = self.run(["journalctl", "--no-pager", "-o", "json"] + list(args)).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for(self, predicate, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise HarnessError("timed out after %ss waiting for %s" % (timeout, what))
            time.sleep(interval)


def _find_init(nspawn_pid: int) -> Optional[int]:
    """The container's PID 1 among nspawn's descendants (NSpid ends in 1)."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        try:
            children = Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                status = Path("/proc/%d/status" % child).read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                    return child
            todo.append(child)
    return None


@contextlib.contextmanager
def booted(binds: Sequence[str] = (), packages: Iterable[str] = PACKAGES,
           install_tree: bool = True, suite: str = SUITE) -> Iterator[Container]:
    with Container(ensure_image(packages, suite), binds=binds, install_tree=install_tree) as container:
        yield container

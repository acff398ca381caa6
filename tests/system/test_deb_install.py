"""The .deb on a clean Debian 12 and 13 under real systemd: install, act, upgrade, remove, purge.

A debootstrapped Debian (minbase with systemd and dbus, cached by
tests/system/nspawn.py) boots under systemd-nspawn *without* the agent from the
tree (install_tree=False); the .deb built by packaging/build-deb.sh (on the
host, Debian 12) is installed with apt, which fetches its dependencies from the
Debian archive of the container's release. The whole sequence runs once on
Debian 12 (bookworm: systemd 252, Python 3.11) and once on Debian 13 (trixie:
systemd 257, Python 3.13, merged /usr): one package for both.

Like tests/system/test_systemd.py, the container shares the host's network
namespace, so the agent's raise of the global nf_conntrack_max is real: the
module holds the rig's global lock, lowers max so a small flood in a watched
namespace fills it, and restores max and buckets afterwards, also on failure.

The tests run in file order on one container per release, as an admin's
session would: install -> flood -> upgrade -> remove -> reinstall -> purge
(pytest runs every test on the first release's container, then on the next).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import nspawn  # noqa: E402
import pkgbuild  # noqa: E402
import rig  # noqa: E402

sys.path.insert(0, str(HERE.parent / "unit"))
import test_daemon_imports as daemon_imports  # noqa: E402

pytestmark = pytest.mark.system

UNIT = "conntrack-agent.service"
POLICY = "/etc/conntrack-agent/policy.toml"
STATE_DIR = "/var/lib/conntrack-agent"
DROPIN = "/etc/systemd/system/conntrack-agent.service.d/watch-named-netns.conf"
EXAMPLE_DROPIN = "/usr/share/doc/conntrack-agent/examples/watch-named-netns.conf"
# A clean Debian 12 as a node has it: systemd as init and the system bus. Nothing
# of the agent's: apt must bring python3, python3-structlog, python3-gi, ...
CLEAN_IMAGE = ("systemd", "systemd-sysv", "dbus")
# What apt must resolve from the archive (Depends and the default-installed Recommends).
FROM_ARCHIVE = ("python3", "python3-structlog", "python3-gi", "python3-pydbus")
MONITORING = {"/usr/share/conntrack-agent/prometheus/conntrack-agent.rules.yml":
              nspawn.REPO / "packaging/prometheus/conntrack-agent.rules.yml",
              "/usr/share/conntrack-agent/prometheus/RUNBOOK.md":
              nspawn.REPO / "packaging/prometheus/RUNBOOK.md",
              "/usr/share/conntrack-agent/grafana/conntrack-agent.json":
              nspawn.REPO / "packaging/grafana/conntrack-agent.json"}
RAISE_MAX_ID = "5c4a891b4b874fd1ad5a285521dab566"  # events.EVENTS["raise_max"], never changes

LOW_MAX = 16384
FLOOD = int(LOW_MAX * 0.8)  # above the shipped grow-table rule's 75%
SETTLE = 3.0  # seconds without a change: longer than grow-table's cooldown and the fill-rate window
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-o", "Dpkg::Use-Pty=0"]


def _require() -> None:
    rig.require_root()
    rig.require_tools()
    missing = nspawn.missing_tools() + pkgbuild.missing(pkgbuild.DEB_TOOLS)
    if missing:
        reason = ("missing tools: %s (apt-get install debootstrap systemd-container dpkg-dev "
                  "debhelper dh-python pybuild-plugin-pyproject lintian)" % ", ".join(missing))
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


class Env:
    def __init__(self, box: nspawn.Container, ns: rig.Namespace, debs: Dict[str, str], versions: Dict[str, str],
                 suite: str):
        self.suite = suite
        self.box = box
        self.ns = ns
        self.debs = debs          # "first"/"upgrade" -> path inside the container
        self.versions = versions  # "first"/"upgrade" -> Debian version
        self.before: Dict[str, object] = {}
        self.raised_to = 0

    def apt(self, *args: str, check: bool = True):
        proc = self.box.run(APT + list(args), check=False, timeout=600)
        if check:
            assert proc.returncode == 0, "apt-get %s failed:\n%s%s" % (" ".join(args), proc.stdout, proc.stderr)
        return proc

    def show(self, *props: str) -> Dict[str, str]:
        return self.box.show(UNIT, *props)

    def installed_version(self, package: str) -> str:
        proc = self.box.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", package], check=False)
        status, _, version = proc.stdout.partition(" ")
        return version.strip() if proc.returncode == 0 and status.startswith("ii") else ""

    def exists(self, path: str) -> bool:
        return self.box.run(["test", "-e", path], check=False).returncode == 0

    def agent_processes(self) -> List[str]:
        """PIDs of processes running as the agent's user (the user outlives the package)."""
        out = self.box.run(["find", "/proc", "-mindepth", "1", "-maxdepth", "1", "-regex", "/proc/[0-9]+",
                            "-user", "conntrack-agent"], check=False).stdout
        return out.split()

    def log_text(self) -> str:
        return self.box.run(["journalctl", "--no-pager", "-u", UNIT, "-n", "80"], check=False).stdout

    def ns_timeouts(self) -> Dict[str, str]:
        out = self.ns.run(["sh", "-c", "grep -H . /proc/sys/net/netfilter/nf_conntrack_*timeout*"]).stdout
        return dict(line.rsplit(":", 1) for line in out.splitlines())

    def globals(self) -> Dict[str, int]:
        return {n: rig.read_sysctl(n) for n in ("nf_conntrack_max", "nf_conntrack_buckets")}

    def flood_until_raised(self) -> int:
        """Empty the namespace's table, set max low, flood: return the max the agent raised it to."""
        self.ns.run(["conntrack", "-F"], check=False)  # exit 1 when it was already empty
        rig.write_sysctl("nf_conntrack_max", LOW_MAX)
        self.before = {"globals": self.globals(), "timeouts": self.ns_timeouts()}
        assert rig.flood_udp(self.ns, FLOOD) >= FLOOD
        try:
            self.box.wait_for(lambda: rig.read_sysctl("nf_conntrack_max") > LOW_MAX, timeout=30,
                              what="the agent to raise nf_conntrack_max")
            # The fill rate may still predict a full table right after the first raise
            # (a second one follows, 1s cooldown): wait until max holds still.
            last = {"max": 0, "since": time.monotonic()}

            def settled() -> bool:
                now = rig.read_sysctl("nf_conntrack_max")
                if now != last["max"]:
                    last.update(max=now, since=time.monotonic())
                return time.monotonic() - last["since"] >= SETTLE
            self.box.wait_for(settled, timeout=30, what="nf_conntrack_max to settle")
        except nspawn.HarnessError as exc:
            raise AssertionError("%s\n--- journal:\n%s" % (exc, self.log_text())) from None
        return rig.read_sysctl("nf_conntrack_max")

    def assert_restored(self) -> None:
        assert self.before, "needs a flood first"
        assert self.globals() == self.before["globals"]
        assert self.ns_timeouts() == self.before["timeouts"]


@pytest.fixture(scope="module", params=sorted(nspawn.SUITES, key=nspawn.SUITES.get),
                ids=lambda suite: "debian%s-%s" % (nspawn.SUITES[suite], suite))
def env(request) -> Iterator[Env]:
    suite = request.param
    _require()
    # Both packages first (cached per tree), before taking the global lock.
    first = pkgbuild.build_deb()
    base = pkgbuild.changelog_version()
    upgrade_version = base + pkgbuild.UPGRADE_SUFFIX
    upgrade = pkgbuild.build_deb(upgrade_version)
    rig.cleanup_stale()
    with contextlib.ExitStack() as stack:
        # Exits in reverse: the container stops before the namespace goes and
        # before max and buckets are restored.
        stack.enter_context(rig.saved_global_sysctls())
        ns = stack.enter_context(rig.Namespace())
        binds = [ns.path, "%s:/srv/deb/first" % first.parent, "%s:/srv/deb/upgrade" % upgrade.parent]
        box = stack.enter_context(nspawn.booted(binds=binds, packages=CLEAN_IMAGE, install_tree=False,
                                                suite=suite))
        yield Env(box, ns,
                  {"first": "/srv/deb/first/" + first.name, "upgrade": "/srv/deb/upgrade/" + upgrade.name},
                  {"first": base, "upgrade": upgrade_version}, suite)


def test_container_runs_the_release_under_test(env: Env) -> None:
    # the parametrization is real: each run boots the release it names
    release = env.box.run(["cat", "/etc/os-release"]).stdout
    assert 'VERSION_ID="%s"' % nspawn.SUITES[env.suite] in release, release
    assert "VERSION_CODENAME=%s" % env.suite in release, release


def test_clean_system_has_none_of_the_agent(env: Env) -> None:
    for package in ("conntrack-agent",) + FROM_ARCHIVE[1:]:
        assert env.installed_version(package) == "", package
    assert not env.exists("/usr/bin/conntrack-agent")


def test_apt_installs_the_deb_resolving_dependencies_from_the_archive(env: Env) -> None:
    sources = env.box.run(["sh", "-c", "cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null"],
                          check=False).stdout
    assert "deb.debian.org/debian %s" % env.suite in sources, sources
    env.apt("update")
    proc = env.apt("install", env.debs["first"])
    for package in FROM_ARCHIVE:
        assert env.installed_version(package), "%s not installed:\n%s" % (package, proc.stdout)
    fetched = re.findall(r"^Get:\d+ \S+ \S+ \S+ (\S+) ", proc.stdout, re.M)
    assert "python3-structlog" in fetched, proc.stdout  # from the archive, not preinstalled
    assert env.installed_version("python3-pyroute2") == ""  # a test dependency only
    assert env.installed_version("conntrack-agent") == env.versions["first"]

    conffiles = env.box.run(["dpkg-query", "-W", "-f", "${Conffiles}", "conntrack-agent"]).stdout
    assert [line.split()[0] for line in conffiles.strip().splitlines()] == [POLICY]
    # systemd's dpkg trigger compiled the journal catalog
    assert RAISE_MAX_ID in env.box.run(["journalctl", "--list-catalog"]).stdout
    for path in ("/usr/share/man/man8/conntrack-agent.8.gz", "/usr/share/man/man5/conntrack-agent.toml.5.gz",
                 "/usr/share/dbus-1/system.d/io.github.conntrack_agent1.conf", EXAMPLE_DROPIN):
        assert env.exists(path), path
    # the alert rules and the dashboard, for the admin to load, as they are in the tree
    for path, source in MONITORING.items():
        shipped = env.box.run(["sha256sum", path], check=False).stdout.split()[:1]
        assert shipped == [hashlib.sha256(source.read_bytes()).hexdigest()], path


def test_service_is_enabled_active_and_unprivileged(env: Env) -> None:
    assert env.box.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "enabled"
    env.box.wait_for(lambda: env.show("ActiveState")["ActiveState"] == "active", timeout=20, what="active")
    props = env.show("ActiveState", "SubState", "MainPID", "FragmentPath")
    assert props["SubState"] == "running", env.log_text()
    assert props["FragmentPath"].endswith("/lib/systemd/system/" + UNIT), props  # from the package
    status = env.box.run(["cat", "/proc/%s/status" % props["MainPID"]]).stdout
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
    assert env.box.run(["id", "-un", uid]).stdout.strip() == "conntrack-agent"
    # the D-Bus API is up, with the package's bus policy
    names = env.box.run(["busctl", "--system", "--no-pager", "list", "--acquired"]).stdout
    assert "io.github.conntrack_agent1" in names
    check = env.box.run(["conntrack-agent", "check"])
    assert check.stdout.startswith("policy ok: " + POLICY)


def test_the_daemon_leaves_asyncio_out_with_the_d_bus_api(env: Env) -> None:
    """PyGObject 3.50 (Debian 13) imports asyncio for its own asyncio support
    (+1.6 MB); dbus_service answers it without: checked on the release's own
    PyGObject, in the running unit and on the daemon's import path."""
    pid = env.show("MainPID")["MainPID"]
    maps = env.box.run(["cat", "/proc/%s/maps" % pid]).stdout
    assert re.search(r"/gi/_gi\.cpython-\S+\.so$", maps, re.M), "the unit has no gi: no D-Bus API?"
    assert not re.search(r"/_asyncio\.cpython-\S+\.so$", maps, re.M), "the unit loaded asyncio"

    # unit/test_daemon_imports.py's daemon path, with the installed package
    work = env.box.run(["mktemp", "-d"]).stdout.strip()
    env.box.write(work + "/tests/fakekernel.py", (HERE.parent / "fakekernel.py").read_text())
    env.box.write(work + "/daemon.py", daemon_imports._DAEMON)
    env.box.run(["mkdir", work + "/run"])
    proc = env.box.run(["python3", work + "/daemon.py", work + "/run", work + "/tests"], check=False)
    env.box.remove(work)
    assert proc.returncode == 0, proc.stderr
    data = daemon_imports.parse(proc.stdout)
    assert data["gi"], "PyGObject not importable in the container"
    back = daemon_imports._back(data["core"] + data["bus"])
    assert not back, "PyGObject %s: the daemon imports modules kept out of it: %s" % (data["gi"], back)
    assert data["asyncio"] == "_DeferredAsyncio", data["asyncio"]


def test_agent_acts_on_a_flood_and_journals_it(env: Env) -> None:
    # The admin's edit of the conffile: watch the flood namespace. Named namespaces
    # need the drop-in the package ships as an example.
    text = env.box.run(["cat", POLICY]).stdout
    assert "\nnamespaces = []\n" in text
    env.box.write(POLICY, text.replace("\nnamespaces = []\n", '\nnamespaces = ["%s"]\n' % env.ns.name))
    env.box.run(["mkdir", "-p", os.path.dirname(DROPIN)])
    env.box.run(["cp", EXAMPLE_DROPIN, DROPIN])
    env.box.systemctl("daemon-reload")
    env.box.systemctl("restart", UNIT)
    assert env.show("ActiveState")["ActiveState"] == "active", env.log_text()

    env.raised_to = env.flood_until_raised()
    assert env.raised_to > LOW_MAX
    def raised():
        return [e for e in env.box.journal("-u", UNIT, "MESSAGE_ID=" + RAISE_MAX_ID)
                if e.get("CT_MAX_OLD") == str(LOW_MAX)]
    event = env.box.wait_for(raised, timeout=10, what="the raise_max event")[0]
    assert event["NETNS"] == env.ns.name and event["RULE"] == "grow-table"
    assert LOW_MAX < int(event["CT_MAX_NEW"]) <= env.raised_to
    text = env.box.run(["journalctl", "--no-pager", "-u", UNIT]).stdout
    assert "raised nf_conntrack_max from %d to %s" % (LOW_MAX, event["CT_MAX_NEW"]) in text, text


def test_upgrade_keeps_the_edited_policy_and_restarts_the_service(env: Env) -> None:
    assert env.raised_to, "needs the flood test"
    edited = env.box.run(["cat", POLICY]).stdout
    assert env.ns.name in edited
    before = env.show("InvocationID", "MainPID")

    proc = env.apt("install", env.debs["upgrade"])
    assert env.installed_version("conntrack-agent") == env.versions["upgrade"]
    assert "Configuration file '%s'" % POLICY not in proc.stdout  # no conffile prompt: nothing changed upstream
    assert env.box.run(["cat", POLICY]).stdout == edited
    leftovers = env.box.run(["sh", "-c", "ls /etc/conntrack-agent"]).stdout.split()
    assert sorted(leftovers) == ["policy.d", "policy.toml"], leftovers

    after = env.show("InvocationID", "MainPID", "ActiveState")
    assert after["ActiveState"] == "active", env.log_text()
    assert after["InvocationID"] != before["InvocationID"] and after["MainPID"] != before["MainPID"]
    started = env.box.journal("-u", UNIT, "_SYSTEMD_INVOCATION_ID=" + after["InvocationID"], "EVENT=agent_started")
    assert started and env.ns.name in str(started[0].get("NAMESPACES")), env.log_text()
    # The upgrade did not undo the agent's work: the state file carries over.
    assert rig.read_sysctl("nf_conntrack_max") == env.raised_to
    state = json.loads(env.box.run(["cat", STATE_DIR + "/state.json"]).stdout)
    owned = {c["name"]: c for c in state["changes"] if c["netns"] == ""}
    assert owned["nf_conntrack_max"]["original"] == LOW_MAX


def test_remove_stops_the_service_and_restores_the_sysctls(env: Env) -> None:
    proc = env.apt("remove", "conntrack-agent")
    assert "nf_conntrack_max: %d -> %d" % (env.raised_to, LOW_MAX) in proc.stdout + proc.stderr, proc.stdout
    assert env.installed_version("conntrack-agent") == ""
    assert env.show("ActiveState")["ActiveState"] in ("inactive", "failed")
    assert env.agent_processes() == []
    env.assert_restored()
    # remove keeps the admin's configuration and the state directory; purge removes them
    assert env.exists(POLICY) and env.exists(STATE_DIR)


def test_purge_restores_and_removes_state_and_configuration(env: Env) -> None:
    # Installed again (the edited conffile is still there), the agent acts again...
    env.apt("install", env.debs["upgrade"])
    assert env.show("ActiveState")["ActiveState"] == "active", env.log_text()
    env.raised_to = env.flood_until_raised()
    # ...and a purge from the installed state undoes it and leaves nothing behind.
    env.box.run(["rm", "-rf", os.path.dirname(DROPIN)])  # the admin's own file
    env.apt("purge", "conntrack-agent")
    assert env.box.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "conntrack-agent"],
                       check=False).stdout.strip() in ("", "pn")
    env.assert_restored()
    for path in (STATE_DIR, "/etc/conntrack-agent", "/lib/systemd/system/" + UNIT,
                 "/etc/systemd/system/multi-user.target.wants/" + UNIT, "/usr/bin/conntrack-agent"):
        assert not env.exists(path), path
    env.box.systemctl("daemon-reload")
    assert env.show("LoadState")["LoadState"] == "not-found"
    assert env.agent_processes() == []
    leftovers = env.box.run(["sh", "-c", "find /usr/lib/python3/dist-packages -name 'conntrack_agent*'"]).stdout
    assert leftovers == ""

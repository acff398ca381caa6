"""discovery.py against the real kernel: ip netns add/del seen through inotify, an
unnamed namespace (unshare -n) found by the /proc scan with its inode and the
labels of its cgroup, and namespaces vanishing.

Every namespace and process here is the test's own, named with rig.PREFIX and
the test's pid (rig.cleanup_stale removes leftovers of a killed run); no
global sysctl is touched.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import rig
from conntrack_agent import discovery as D
from conntrack_agent.ctnetlink import CtnetlinkSocket


def unique_name() -> str:
    return "%s%d-%s" % (rig.PREFIX, os.getpid(), secrets.token_hex(3))


def key_of(path: str):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def wait_for(disc: D.Discovery, predicate, seconds: float) -> List[D.Changes]:
    """Poll as the agent's loop would (select on the fd, at most timeout() long) until
    predicate(changes) holds or `seconds` pass; every Changes seen, in order."""
    seen = []
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return seen
        wait = disc.timeout()
        select.select([disc], [], [], left if wait is None else min(wait, left))
        changes = disc.poll()
        seen.append(changes)
        if predicate(changes):
            return seen


@pytest.fixture
def netns_name() -> Iterator[str]:
    name = unique_name()
    yield name
    rig.sh(["ip", "netns", "del", name], check=False)


def test_a_named_namespace_created_later_is_reported_within_2s_by_inotify(netns_name):
    # No /proc scan: only the inotify watch can report it (Discovery never re-reads
    # /run/netns by itself unless asked to).
    disc = D.Discovery(scan_processes=False)
    try:
        disc.poll()
        started = time.monotonic()
        rig.sh(["ip", "netns", "add", netns_name])
        seen = wait_for(disc, lambda c: any(netns_name in ns.names for ns in c.appeared), 2.0)
        took = time.monotonic() - started
        appeared = [ns for c in seen for ns in c.appeared if netns_name in ns.names]
        assert appeared, "not reported within 2 s: %r" % seen
        ns = appeared[0]
        assert ns.key == key_of("/run/netns/" + netns_name)
        assert ns.key != disc.host_key and not ns.host
        assert took < 2.0
        # It is a namespace one can enter and open a ctnetlink socket in.
        with D.entered_ns(ns):
            assert key_of("/proc/thread-self/ns/net") == ns.key
            CtnetlinkSocket().close()
        assert key_of("/proc/thread-self/ns/net") == disc.host_key

        rig.sh(["ip", "netns", "del", netns_name])
        seen = wait_for(disc, lambda c: bool(c.vanished), 2.0)
        assert [ns.key for c in seen for ns in c.vanished] == [ns.key]
        assert ns.key not in disc.namespaces
    finally:
        disc.close()


def _cgroup2_root() -> Optional[Path]:
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, where, fstype = line.split()[:3]
            if fstype == "cgroup2":
                return Path(where.replace("\\040", " "))
    return None


UID = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"


@pytest.fixture
def pod_like_cgroup() -> Iterator[Path]:
    """A throw-away cgroup v2 path laid out as the kubelet's systemd driver does."""
    root = _cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy to put a test process in")
    top = root / unique_name()
    container = "%064x" % secrets.randbits(256)
    leaf = (top / "kubepods.slice" / "kubepods-besteffort.slice"
            / ("kubepods-besteffort-pod%s.slice" % UID.replace("-", "_"))
            / ("cri-containerd-%s.scope" % container))
    leaf.mkdir(parents=True)
    try:
        yield leaf
    finally:
        # Leaf first: a cgroup with children cannot be removed.
        path = leaf
        while True:
            try:
                path.rmdir()
            except OSError:
                pass
            if path == top:
                break
            path = path.parent


def test_an_unnamed_namespace_is_found_by_the_proc_scan_with_labels_and_vanishes(pod_like_cgroup):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) missing")
    # unshare execs sleep: the pid is the only process in the new namespace.
    proc = subprocess.Popen(["unshare", "-n", "sleep", "60"])
    try:
        (pod_like_cgroup / "cgroup.procs").write_text("%d\n" % proc.pid)
        expected = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            expected = key_of("/proc/%d/ns/net" % proc.pid)
            if expected != key_of("/proc/self/ns/net"):
                break          # unshare has switched namespaces
            time.sleep(0.01)
        disc = D.Discovery(scan_interval=0.0)   # every poll scans: the test controls the pace
        try:
            found = [ns for ns in disc.poll().appeared if ns.key == expected]
            assert found, "pid %d's namespace net:[%d] not found; last scan %r" % (
                proc.pid, expected[1], disc.last_scan)
            ns = found[0]
            assert disc.last_scan.complete
            assert ns.names == () and ns.pid == proc.pid and not ns.host
            assert ns.name == "net:[%d]" % expected[1]
            assert D.matches("*", ns) and not D.matches("host", ns)
            labels = D.labels_of(ns)
            assert labels["pod_uid"] == UID
            assert labels["runtime"] == "containerd"
            assert labels["container"] == pod_like_cgroup.name[len("cri-containerd-"):-len(".scope")]
            assert labels["unit"] == pod_like_cgroup.name
            # Entering by /proc/PID/ns/net, as a probe in an unnamed namespace would.
            with D.entered_ns(ns):
                assert key_of("/proc/thread-self/ns/net") == expected

            proc.kill()
            proc.wait(timeout=10)
            seen = wait_for(disc, lambda c: bool(c.vanished), 5.0)
            assert [v.key for c in seen for v in c.vanished] == [expected]
            assert expected not in disc.namespaces
            # Once gone, entering by the old pid's path refuses rather than entering another.
            with pytest.raises(OSError):
                with D.entered_ns(ns):
                    pass
        finally:
            disc.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_a_named_namespace_with_a_process_in_it_outlives_its_name(netns_name):
    rig.sh(["ip", "netns", "add", netns_name])
    key = key_of("/run/netns/" + netns_name)
    proc = subprocess.Popen(["ip", "netns", "exec", netns_name, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while key_of("/proc/%d/ns/net" % proc.pid) != key and time.monotonic() < deadline:
            time.sleep(0.01)
        disc = D.Discovery(scan_interval=0.0)
        try:
            ns = disc.poll() and disc.namespaces[key]
            assert ns.names == (netns_name,) and ns.pid == proc.pid
            rig.sh(["ip", "netns", "del", netns_name])
            seen = wait_for(disc, lambda c: bool(c.renamed or c.vanished), 2.0)
            assert [c.vanished for c in seen if c.vanished] == []
            assert disc.namespaces[key].names == () and disc.namespaces[key].pid == proc.pid
            proc.kill()
            proc.wait(timeout=10)
            seen = wait_for(disc, lambda c: bool(c.vanished), 5.0)
            assert [v.key for c in seen for v in c.vanished] == [key]
        finally:
            disc.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

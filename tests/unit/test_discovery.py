"""discovery.py without root: patterns and the cap, cgroup labels, the /proc scan on
a fake /proc tree, and the /run/netns watcher on a temporary directory.

The watcher is the real thing (inotify on a tmp directory). Namespace files are
stood in for by symlinks to this process's own nsfs files (/proc/self/ns/uts,
ipc, net ...): stat() follows them onto nsfs, which is all the watcher asks of a
namespace file, and each gives a distinct inode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest

from conntrack_agent import discovery as D
from conntrack_agent.discovery import Netns

NSFS = os.stat("/proc/self/ns/net").st_dev


def key_of(path: str):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


HOST = Netns((NSFS, 1), (), 10, True)
CNI_A = Netns((NSFS, 2), ("cni-aaaa",), 20)
CNI_B = Netns((NSFS, 3), ("cni-bbbb",), None)
BLUE = Netns((NSFS, 4), ("blue",), None)
ANON = Netns((NSFS, 5), (), 50)
ANON2 = Netns((NSFS, 6), (), 60)
ALL_NS = [ANON2, BLUE, CNI_B, ANON, CNI_A, HOST]


# --------------------------------------------------------------------------- patterns

@pytest.mark.parametrize("pattern, expected", [
    ("*", {HOST, CNI_A, CNI_B, BLUE, ANON, ANON2}),
    ("host", {HOST}),
    ("cni-*", {CNI_A, CNI_B}),
    ("cni-?aaa", {CNI_A}),
    ("[bc]*", {BLUE, CNI_A, CNI_B}),
    ("blue", {BLUE}),
    ("blu", set()),            # a plain name is exact, not a prefix
    ("cni-aaaa", {CNI_A}),
    ("*a", {CNI_A}),           # a glob never matches an unnamed namespace, nor the host by "host"
])
def test_matches(pattern, expected):
    assert {ns for ns in ALL_NS if D.matches(pattern, ns)} == expected


def test_glob_is_case_sensitive_like_namespace_names():
    assert not D.matches("CNI-*", CNI_A)


def test_no_patterns_means_the_agents_own_namespace():
    assert [ns for ns in ALL_NS if D.wanted((), ns)] == [HOST]


def test_a_netns_literally_named_host_is_reachable_by_glob_only():
    named_host = Netns((NSFS, 9), ("host",))
    assert not D.matches("host", named_host)
    assert D.matches("hos[t]", named_host)


def test_only_star_needs_the_proc_scan():
    assert D.needs_unnamed(["cni-*", "*"])
    assert not D.needs_unnamed(["cni-*", "host", "blue"])


@pytest.mark.parametrize("pattern, ok", [
    ("*", True), ("host", True), ("cni-*", True), ("ns_1.a-b", True), ("[ab]x", True), ("[!a]*", True),
    ("", False), ("..", False), ("a/b", False), ("a b", False), ("[ab", False), ("x" * 65, False),
])
def test_is_valid_pattern(pattern, ok):
    assert D.is_valid_pattern(pattern) is ok


def test_select_orders_host_kept_exact_glob_unnamed_and_caps():
    watched, left = D.select(["*", "blue"], ALL_NS, limit=4)
    # host first, then the exact name, then glob/any named by name, then unnamed by inode.
    assert watched == [HOST, BLUE, CNI_A, CNI_B]
    assert left == [ANON, ANON2]


def test_select_never_lets_a_newcomer_displace_a_watched_namespace():
    watched, left = D.select(["*"], ALL_NS, limit=2, keep={ANON2.key})
    assert watched == [HOST, ANON2]
    assert ANON2 not in left and CNI_A in left


def test_select_without_cap_trouble_leaves_nothing_out():
    watched, left = D.select(["cni-*"], ALL_NS, limit=100)
    assert watched == [CNI_A, CNI_B] and left == []
    assert D.select(["cni-*"], ALL_NS, limit=0) == ([], [CNI_A, CNI_B])


# --------------------------------------------------------------------------- cgroup labels

UID = "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d"
UID_ = UID.replace("-", "_")
CID = "4f3c2b1a" * 8


@pytest.mark.parametrize("path, unit, container, runtime, pod", [
    # containerd, systemd cgroup driver (kubeadm's default since 1.22)
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope" % (UID_, CID),
     "cri-containerd-%s.scope" % CID, CID, "containerd", UID),
    # guaranteed QoS: no QoS slice level
    ("/kubepods.slice/kubepods-pod%s.slice/cri-containerd-%s.scope" % (UID_, CID),
     "cri-containerd-%s.scope" % CID, CID, "containerd", UID),
    # containerd, cgroupfs driver
    ("/kubepods/besteffort/pod%s/%s" % (UID, CID), None, CID, None, UID),
    # CRI-O, systemd driver
    ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod%s.slice/crio-%s.scope" % (UID_, CID),
     "crio-%s.scope" % CID, CID, "cri-o", UID),
    # CRI-O, cgroupfs driver
    ("/kubepods/burstable/pod%s/crio-%s" % (UID, CID), None, CID, "cri-o", UID),
    # docker, systemd driver and cgroupfs driver
    ("/system.slice/docker-%s.scope" % CID, "docker-%s.scope" % CID, CID, "docker", None),
    ("/docker/%s" % CID, None, CID, "docker", None),
    # podman
    ("/machine.slice/libpod-%s.scope/container" % CID, "libpod-%s.scope" % CID, CID, "podman", None),
    # plain services and sessions
    ("/system.slice/systemd-resolved.service", "systemd-resolved.service", None, None, None),
    ("/user.slice/user-0.slice/session-3.scope", "session-3.scope", None, None, None),
    ("/", None, None, None, None),
])
def test_parse_cgroup_layouts(path, unit, container, runtime, pod):
    labels = D.parse_cgroup(path)
    assert (labels.unit, labels.container, labels.runtime, labels.pod_uid) == (unit, container, runtime, pod)


def test_crio_conmon_is_not_the_container():
    # conmon runs next to the container in a scope of its own, in the host namespace
    labels = D.parse_cgroup("/kubepods.slice/kubepods-pod%s.slice/crio-conmon-%s.scope" % (UID_, CID))
    assert labels.container is None and labels.pod_uid == UID


def test_a_pod_like_word_outside_kubepods_is_not_a_pod():
    assert D.parse_cgroup("/system.slice/pod%s.service" % UID).pod_uid is None


def test_cgroup_path_prefers_v2_then_systemd_v1():
    v2 = "0::/system.slice/foo.service\n"
    hybrid = "12:memory:/system.slice/foo.service\n1:name=systemd:/system.slice/bar.service\n0::/\n"
    v1 = "3:cpu,cpuacct:/docker/%s\n2:memory:/docker/%s\n" % (CID, CID)
    assert D.cgroup_path(v2) == "/system.slice/foo.service"
    assert D.cgroup_path(hybrid) == "/system.slice/bar.service"
    assert D.cgroup_path(v1) == "/docker/%s" % CID
    assert D.cgroup_path("0::/\n") == "/"
    assert D.cgroup_path("") is None


# --------------------------------------------------------------------------- fake /proc

def make_proc(root: Path, pids: Dict[int, int], own: str = "/proc/self/ns/net") -> Path:
    """A /proc lookalike: PID/ns/net links reading net:[INODE], PID/cgroup, and self/ns/net
    pointing at a real nsfs file (for the host key and the nsfs device)."""
    root.mkdir(exist_ok=True)
    (root / "self" / "ns").mkdir(parents=True, exist_ok=True)
    if not (root / "self" / "ns" / "net").is_symlink():
        os.symlink(own, root / "self" / "ns" / "net")
    (root / "not-a-pid").mkdir(exist_ok=True)
    for pid, inode in pids.items():
        add_pid(root, pid, inode)
    return root


def add_pid(root: Path, pid: int, inode: int, cgroup: str = "0::/\n") -> None:
    (root / str(pid) / "ns").mkdir(parents=True, exist_ok=True)
    link = root / str(pid) / "ns" / "net"
    if link.is_symlink():
        link.unlink()
    os.symlink("net:[%d]" % inode, link)
    (root / str(pid) / "cgroup").write_text(cgroup)


def remove_pid(root: Path, pid: int) -> None:
    (root / str(pid) / "ns" / "net").unlink()
    (root / str(pid) / "cgroup").unlink()
    (root / str(pid) / "ns").rmdir()
    (root / str(pid)).rmdir()


def test_scan_dedupes_by_inode_keeping_the_lowest_pid(tmp_path):
    proc = make_proc(tmp_path / "proc", {30: 100, 7: 100, 12: 200, 99: 300})
    result = D.ProcScanner(str(proc)).scan()
    assert result.complete
    assert result.found == {100: 7, 200: 12, 300: 99}
    assert result.visited == 4 and result.denied == 0


def test_scan_is_bounded_and_resumes_where_it_stopped(tmp_path):
    proc = make_proc(tmp_path / "proc", {1: 100, 2: 100, 3: 200, 4: 300, 5: 300})
    scanner = D.ProcScanner(str(proc), max_pids=2)
    first = scanner.scan()
    assert (first.visited, first.complete, first.found) == (2, False, {100: 1})
    second = scanner.scan()
    assert (second.visited, second.complete, second.found) == (2, False, {200: 3, 300: 4})
    third = scanner.scan()
    # The sweep ends: `found` is now everything the sweep saw.
    assert (third.visited, third.complete) == (1, True)
    assert third.found == {100: 1, 200: 3, 300: 4}
    # The next scan starts a new sweep, seeing processes added since.
    add_pid(proc, 6, 400)
    results = [scanner.scan() for _ in range(3)]
    assert [r.complete for r in results] == [False, False, True]
    assert results[-1].found == {100: 1, 200: 3, 300: 4, 400: 6}


def test_scan_stops_at_its_time_budget(tmp_path):
    proc = make_proc(tmp_path / "proc", {pid: 100 + pid % 3 for pid in range(1, 301)})
    ticks = iter(range(10 ** 6))
    scanner = D.ProcScanner(str(proc), max_pids=10_000, max_seconds=2.0, clock=lambda: next(ticks))
    result = scanner.scan()
    # the clock is read every 64 processes and advances 1 s a read: the second check stops it
    assert not result.complete and result.visited == 128


def test_scan_counts_processes_it_may_not_inspect(tmp_path, monkeypatch):
    proc = make_proc(tmp_path / "proc", {1: 100, 2: 200})
    real = os.readlink

    def readlink(path, *a, **kw):
        if str(path).endswith("/1/ns/net"):
            raise PermissionError(13, "Permission denied", path)
        return real(path, *a, **kw)

    monkeypatch.setattr(D.os, "readlink", readlink)
    result = D.ProcScanner(str(proc)).scan()
    assert result.found == {200: 2} and result.denied == 1


def test_scan_survives_processes_exiting_mid_scan(tmp_path):
    proc = make_proc(tmp_path / "proc", {1: 100, 2: 200, 3: 300})
    scanner = D.ProcScanner(str(proc), max_pids=1)
    scanner.scan()
    remove_pid(proc, 2)   # listed at sweep start, gone when visited
    scanner.scan()
    assert scanner.scan().found == {100: 1, 300: 3}


# --------------------------------------------------------------------------- the watcher

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_watcher_reports_existing_then_created_then_deleted_names(tmp_path):
    d = tmp_path / "netns"
    d.mkdir()
    os.symlink("/proc/self/ns/uts", d / "old")
    w = D.NamedWatcher(str(d), nsfs_dev=NSFS)
    try:
        assert w.poll() == ({"old": key_of("/proc/self/ns/uts")}, {})
        assert w.poll() == ({}, {})
        os.symlink("/proc/self/ns/ipc", d / "new")
        assert w.poll() == ({"new": key_of("/proc/self/ns/ipc")}, {})
        os.unlink(d / "old")
        os.rename(d / "new", d / "renamed")
        appeared, vanished = w.poll()
        assert appeared == {"renamed": key_of("/proc/self/ns/ipc")}
        assert vanished == {"old": key_of("/proc/self/ns/uts"), "new": key_of("/proc/self/ns/ipc")}
        assert w.names == {"renamed": key_of("/proc/self/ns/ipc")}
    finally:
        w.close()


def test_watcher_fd_becomes_readable_on_a_change(tmp_path):
    import select

    w = D.NamedWatcher(str(tmp_path), nsfs_dev=NSFS)
    try:
        w.poll()
        assert select.select([w], [], [], 0)[0] == []
        os.symlink("/proc/self/ns/uts", tmp_path / "x")
        assert select.select([w], [], [], 1.0)[0] == [w]
    finally:
        w.close()


def test_a_file_not_yet_mounted_is_rechecked_until_it_is(tmp_path):
    """ip netns add: the file is created (IN_CREATE), the namespace mounted on it
    afterwards without any event; the watcher looks again on its own schedule."""
    mounted = set()

    def stat(path):
        if os.path.basename(path) in mounted:
            return os.stat("/proc/self/ns/uts")
        return os.stat(path)

    clock = Clock()
    w = D.NamedWatcher(str(tmp_path), clock=clock, stat=stat, nsfs_dev=NSFS)
    try:
        w.poll()
        assert w.timeout() is None
        (tmp_path / "ns1").write_text("")
        assert w.poll() == ({}, {})
        assert w.timeout() == pytest.approx(D.PENDING_RECHECKS[0])
        clock.t += D.PENDING_RECHECKS[0]
        assert w.poll() == ({}, {})          # still a plain file: wait longer
        assert w.timeout() == pytest.approx(D.PENDING_RECHECKS[1] - D.PENDING_RECHECKS[0])
        mounted.add("ns1")
        clock.t += 1.0
        assert w.poll() == ({"ns1": key_of("/proc/self/ns/uts")}, {})
        assert w.timeout() is None
    finally:
        w.close()


def test_a_stray_plain_file_is_given_up_on(tmp_path):
    clock = Clock()
    w = D.NamedWatcher(str(tmp_path), clock=clock, nsfs_dev=NSFS)
    try:
        (tmp_path / "junk").write_text("")
        w.poll()
        for _ in D.PENDING_RECHECKS:
            clock.t += 10
            assert w.poll() == ({}, {})
        assert w.timeout() is None
    finally:
        w.close()


def test_watcher_follows_the_directory_appearing_and_going(tmp_path):
    d = tmp_path / "netns"
    w = D.NamedWatcher(str(d), nsfs_dev=NSFS)
    try:
        assert w.poll() == ({}, {})
        d.mkdir()                       # the first `ip netns add` since boot
        os.symlink("/proc/self/ns/uts", d / "a")
        assert w.poll() == ({"a": key_of("/proc/self/ns/uts")}, {})
        os.unlink(d / "a")
        os.symlink("/proc/self/ns/ipc", d / "b")
        w.poll()
        os.unlink(d / "b")
        d.rmdir()
        appeared, vanished = w.poll()
        assert w.names == {}
        d.mkdir()
        os.symlink("/proc/self/ns/uts", d / "c")
        assert w.poll() == ({"c": key_of("/proc/self/ns/uts")}, {})
    finally:
        w.close()


def test_rescan_catches_a_change_without_an_event(tmp_path):
    w = D.NamedWatcher(str(tmp_path), nsfs_dev=NSFS)
    try:
        os.symlink("/proc/self/ns/uts", tmp_path / "a")
        w.poll()
        # A namespace unmounted from under its name (umount /run/netns/a): no event.
        os.unlink(tmp_path / "a")
        w._inotify.read()               # swallow the event, as if it had been lost
        (tmp_path / "a").write_text("")
        w._inotify.read()
        assert w.rescan() == ({}, {"a": key_of("/proc/self/ns/uts")})
    finally:
        w.close()


# --------------------------------------------------------------------------- Discovery

def test_discovery_merges_names_and_processes(tmp_path):
    uts, ipc = key_of("/proc/self/ns/uts"), key_of("/proc/self/ns/ipc")
    host = key_of("/proc/self/ns/net")
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    os.symlink("/proc/self/ns/uts", netns_dir / "cni-1")
    proc = make_proc(tmp_path / "proc", {1: host[1], 40: uts[1], 41: uts[1], 50: 777})
    clock = Clock()
    d = D.Discovery(str(netns_dir), str(proc), scan_interval=5.0, clock=clock)
    try:
        changes = d.poll()
        got = {ns.key: ns for ns in changes.appeared}
        assert got[host] == Netns(host, (), 1, True)
        assert got[uts] == Netns(uts, ("cni-1",), 40)
        assert got[(host[0], 777)] == Netns((host[0], 777), (), 50)
        assert len(got) == 3 and changes.vanished == []
        assert d.timeout() == pytest.approx(5.0)

        # The name goes while a process still holds the namespace: it stays, unnamed.
        os.unlink(netns_dir / "cni-1")
        changes = d.poll()
        assert changes.appeared == [] and changes.vanished == []
        assert changes.renamed == [Netns(uts, (), 40)]

        # The unnamed one's process exits: gone only once a full sweep has not seen it.
        remove_pid(proc, 50)
        assert d.poll().vanished == []          # no scan due yet
        clock.t += 5.0
        changes = d.poll()
        assert [ns.key for ns in changes.vanished] == [(host[0], 777)]

        # A named namespace nobody is in: deleting the name is its end, reported at once.
        os.symlink("/proc/self/ns/ipc", netns_dir / "blue")
        assert [ns.names for ns in d.poll().appeared] == [("blue",)]
        os.unlink(netns_dir / "blue")
        assert [ns.key for ns in d.poll().vanished] == [ipc]
    finally:
        d.close()


def test_discovery_without_the_scan_sees_names_and_host_only(tmp_path):
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    os.symlink("/proc/self/ns/uts", netns_dir / "a")
    proc = make_proc(tmp_path / "proc", {50: 777})
    d = D.Discovery(str(netns_dir), str(proc), scan_processes=False)
    try:
        names = sorted(ns.name for ns in d.poll().appeared)
        assert names == ["a", "host"]
        assert d.timeout() is None
    finally:
        d.close()


def test_labels_of_reads_the_representative_and_checks_it_is_still_inside(tmp_path):
    proc = make_proc(tmp_path / "proc", {})
    cg = "0::/kubepods.slice/kubepods-pod%s.slice/cri-containerd-%s.scope\n" % (UID_, CID)
    add_pid(proc, 40, 555, cg)
    ns = Netns((NSFS, 555), ("cni-x",), 40)
    assert D.labels_of(ns, str(proc)) == {"netns": "cni-x", "unit": "cri-containerd-%s.scope" % CID,
                                          "container": CID, "runtime": "containerd", "pod_uid": UID}
    add_pid(proc, 40, 556, cg)   # pid 40 now belongs to another namespace (reused)
    assert D.labels_of(ns, str(proc)) == {"netns": "cni-x"}


def test_netns_paths_and_names():
    assert HOST.path() is None and HOST.name == "host"
    assert CNI_A.path("/p", "/run/netns") == "/run/netns/cni-aaaa" and CNI_A.name == "cni-aaaa"
    assert ANON.path("/p") == "/p/50/ns/net" and ANON.name == "net:[5]"
    assert Netns((NSFS, 7)).path() is None


def test_entered_path_refuses_a_file_that_is_now_another_namespace():
    other = (NSFS, key_of("/proc/self/ns/net")[1] + 1)
    with pytest.raises(D._netns.NamespaceMissing):
        with D.entered_path("/proc/self/ns/net", expect=other):
            pytest.fail("entered the wrong namespace")
    with pytest.raises(D._netns.NamespaceMissing):
        with D.entered_path("/nonexistent/ns/net"):
            pytest.fail("entered a namespace that does not exist")

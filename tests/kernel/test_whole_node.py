"""The whole node (agent.namespaces = ["*"]): namespaces that appear after the agent
started are watched within 2 s, named or not; a storm in an unnamed one (a "pod":
a process in a kubelet-like cgroup, no /run/netns name) is answered, and its
events carry the namespace's inode and the pod's labels; a namespace that
vanishes is dropped without an error. Also `conntrack-agent top --once`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rig
from test_agent_kernel import AgentProcess, policy_at

pytestmark = pytest.mark.kernel

UNIFIED = Path("/sys/fs/cgroup/unified")


class UnnamedNamespace:
    """A rig namespace (conntrack on lo, the flood rules) whose /run/netns name is
    removed once a process holds it: reachable only through /proc, like a pod's."""

    def __init__(self, ns: rig.Namespace, cgroup: Path) -> None:
        self.ns = ns
        self.holder = ns.popen(["sleep", "600"])
        self.pid = self.holder.pid
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{self.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline:
                raise AssertionError("the holder never entered the namespace")
            time.sleep(0.01)   # ip netns exec has not switched yet
        self.inode = os.stat(f"/proc/{self.pid}/ns/net").st_ino
        cgroup.mkdir(parents=True, exist_ok=True)
        (cgroup / "cgroup.procs").write_text(str(self.pid))
        subprocess.run(["umount", ns.path], check=True)
        os.unlink(ns.path)

    def python(self, code: str, *args: str, check: bool = True, timeout: float = 300) -> str:
        import textwrap
        return subprocess.run(["nsenter", "-t", str(self.pid), "-n", rig.PYTHON, "-c", textwrap.dedent(code)]
                              + list(args), check=check, capture_output=True, text=True, timeout=timeout).stdout

    def kill(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)


def test_appearing_namespaces_are_watched_and_a_pod_storm_is_answered_with_its_labels(tmp_path):
    if not UNIFIED.is_dir() and not Path("/sys/fs/cgroup/cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy to put the fake pod in")
    base = UNIFIED if UNIFIED.is_dir() else Path("/sys/fs/cgroup")
    pod = "1f2e3d4c_5b6a_4789_8a7b_" + secrets.token_hex(6)
    container = secrets.token_hex(32)
    slices = base / "kubepods.slice" / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{pod}.slice"
    scope = slices / f"cri-containerd-{container}.scope"
    policy_file = policy_at(tmp_path, namespaces=["*"], agent='interval = "250ms"')
    low = 20000
    unnamed = None
    with rig.saved_global_sysctls(), rig.Namespace() as named, rig.Namespace() as to_hide:
        rig.write_sysctl("nf_conntrack_max", low)
        agent = AgentProcess(policy_file)
        try:
            agent.wait_for(lambda e: e.get("event") == "namespace_watched" and e.get("netns") == named.name)
            with rig.Namespace() as late:
                appeared = time.monotonic()
                agent.wait_for(lambda e: e.get("event") == "namespace_watched" and e.get("netns") == late.name,
                               timeout=5)
                assert time.monotonic() - appeared <= 2.0
            agent.wait_for(lambda e: e.get("event") == "namespace_dropped" and e.get("netns") == late.name,
                           timeout=10)

            unnamed = UnnamedNamespace(to_hide, scope)
            name = f"net-{unnamed.inode}"
            hidden = time.monotonic()
            watched = agent.wait_for(lambda e: e.get("event") == "namespace_watched" and e.get("netns") == name,
                                     timeout=10)
            assert time.monotonic() - hidden <= 2.5
            assert watched["pod_uid"] == pod.replace("_", "-") and watched["container"] == container

            for chunk in range(8):                   # the pod's storm: to 80% of the max, in steps
                rig.flood_udp(unnamed, 2000, ports=(20000 + chunk * 2000, 20000 + chunk * 2000 + 1999))
            raised = agent.wait_for(lambda e: e.get("event") == "raise_max")
            assert raised["netns"] == name and raised["netns_inode"] == unnamed.inode
            assert raised["pod_uid"] == pod.replace("_", "-")
            seen = [e for e in agent.events() if e.get("event") == "pressure_attribution"]
            attributed = seen[0] if seen else agent.wait_for(lambda e: e.get("event") == "pressure_attribution")
            assert attributed["netns"] == name and attributed["unreplied"] > 1000

            unnamed.kill()
            agent.wait_for(lambda e: e.get("event") == "namespace_dropped" and e.get("netns") == name, timeout=10)
            top = subprocess.run([sys.executable, "-m", "conntrack_agent", "top", "--once", "--namespaces", "*",
                                  "--config", str(policy_file)], capture_output=True, text=True, timeout=60)
        finally:
            if unnamed is not None:
                unnamed.kill()
            code = agent.stop()
            for directory in (scope, slices, slices.parent, slices.parent.parent):
                try:
                    directory.rmdir()
                except OSError:
                    pass
    assert code == 0
    kinds = [e.get("event") for e in agent.events()]
    assert "tick_failed" not in kinds and "internal_error" not in kinds, kinds
    drops = [e for e in agent.events() if e.get("event") == "pressure" and e.get("drop")]
    assert not drops, drops
    assert top.returncode == 0, top.stderr
    assert named.name in top.stdout and "host" in top.stdout and "top talkers in" in top.stdout

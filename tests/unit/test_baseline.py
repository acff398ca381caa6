"""The [baseline]: applied at start and as namespaces appear; only up for max and
buckets; the admin's values, never recorded or restored."""

from __future__ import annotations

import json

from conntrack_agent import baseline, config

from fakekernel import FakeKernel
from test_failure_paths import Rig

UDP = "nf_conntrack_udp_timeout"


def policy(rig, body: str, namespaces=()) -> None:
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\nnamespaces = {json.dumps(list(namespaces))}\n'
                          f'[baseline]\n{body}\n')


def test_applied_at_start_and_never_recorded(tmp_path):
    kernel = FakeKernel(maximum=7680, buckets=7680)
    rig = Rig(tmp_path, kernel)
    policy(rig, 'nf_conntrack_max = 262144\nnf_conntrack_buckets = 65536\ntimeouts = { udp_timeout = "20s" }')
    rig.start()
    assert kernel.globals == {"nf_conntrack_max": 262144, "nf_conntrack_buckets": 65536}
    assert rig.udp() == 20
    assert rig.journal().entries() == []                 # not the agent's: nothing for restore to undo
    applied = rig.events.of("baseline_applied")
    assert len(applied) == 1 and "max 7680→262144 (policy)" in applied[0]["changes"]


def test_max_and_buckets_only_go_up(tmp_path):
    kernel = FakeKernel(maximum=500000, buckets=131072)   # kube-proxy sized it larger
    rig = Rig(tmp_path, kernel)
    policy(rig, 'nf_conntrack_max = 262144\nnf_conntrack_buckets = 65536\ntimeouts = { udp_timeout = "60s" }')
    rig.start()
    assert kernel.globals == {"nf_conntrack_max": 500000, "nf_conntrack_buckets": 131072}
    assert rig.udp() == 60                               # timeouts are set as given, longer too


def test_a_namespace_that_appears_gets_its_timeouts_and_not_the_globals(tmp_path):
    kernel = FakeKernel(maximum=7680)
    rig = Rig(tmp_path, kernel, namespaces=("web",))
    kernel.remove_namespace("web")
    policy(rig, 'nf_conntrack_max = 262144\ntimeouts = { udp_timeout = "20s" }', namespaces=["web"])
    rig.start()
    assert kernel.globals["nf_conntrack_max"] == 7680    # max is global: written from the initial namespace only
    kernel.add_namespace("web")
    rig.run_for(6, step=1.0)                             # the reprobe finds it
    assert rig.udp("web") == 20 and rig.udp("") == 30


def test_a_value_the_agent_owns_is_left_to_the_agent(tmp_path):
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    journal_text = {"version": 2, "changes": [{"netns": "", "name": "nf_conntrack_max", "action": "raise_max",
                                               "original": 900, "applied": 1000, "rule": "grow-table",
                                               "since": 1.0, "restore_after": None, "restore_below": None,
                                               "pending": False}]}
    rig.state.write_text(json.dumps(journal_text))
    policy(rig, "nf_conntrack_max = 5000")
    rig.start()
    assert kernel.globals["nf_conntrack_max"] == 1000


def test_a_refused_baseline_write_is_logged_and_the_rest_applied(tmp_path):
    import errno
    kernel = FakeKernel(maximum=1000)
    kernel.refuse("", "nf_conntrack_max", errno.EACCES)
    rig = Rig(tmp_path, kernel)
    policy(rig, 'nf_conntrack_max = 5000\ntimeouts = { udp_timeout = "20s" }')
    rig.start()
    assert rig.udp() == 20
    event = rig.events.of("baseline_applied")[0]
    assert "nf_conntrack_max" in event["failed"]


def test_dry_run_only_says(tmp_path):
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    policy(rig, "nf_conntrack_max = 5000")
    from conntrack_agent import service
    agent = service.Agent(str(rig.policy), True, rig.events, clock=rig.clock, kernel=kernel)
    agent.start()
    assert kernel.writes == [] and rig.events.of("baseline_applied")[0]["dry_run"] is True


def test_plan_is_pure_and_prefers_the_policy_over_sysctl_d():
    spec = config.Baseline(nf_conntrack_max=200, from_sysctl_d=True)
    values = baseline.wanted(spec, {"nf_conntrack_max": (100, "/etc/sysctl.d/a.conf:3"),
                                    UDP: (15, "/etc/sysctl.d/a.conf:4")})
    assert values == {"nf_conntrack_max": (200, "policy"), UDP: (15, "/etc/sysctl.d/a.conf:4")}
    writes = baseline.plan(values, {"nf_conntrack_max": 150, UDP: 30}, frozenset(), global_scope=True)
    assert [(w.name, w.value, w.current) for w in writes] == [("nf_conntrack_max", 200, 150), (UDP, 15, 30)]
    assert baseline.plan(values, {"nf_conntrack_max": 150}, frozenset(), global_scope=False) == []


def test_from_sysctl_d_applies_the_lines_systemd_sysctl_could_not(tmp_path, monkeypatch):
    """The lines of sysctl.d (read in systemd-sysctl's order) become the baseline; the
    policy's own values win; globs name the sysctls present."""
    from conntrack_agent import sysctld
    root = tmp_path / "root"
    (root / "etc/sysctl.d").mkdir(parents=True)
    (root / "usr/lib/sysctl.d").mkdir(parents=True)
    (root / "usr/lib/sysctl.d/50-vendor.conf").write_text("net.netfilter.nf_conntrack_max = 100000\n")
    (root / "etc/sysctl.d/90-admin.conf").write_text(
        "net.netfilter.nf_conntrack_max = 131072\nnet/netfilter/nf_conntrack_udp_timeout = 25\n"
        "net.netfilter.nf_conntrack_tcp_timeout_*_wait = 40\n")
    real_read = sysctld.read
    monkeypatch.setattr(sysctld, "read", lambda root_=str(root), order="systemd": real_read(root_, order))
    kernel = FakeKernel(maximum=7680)
    rig = Rig(tmp_path, kernel)
    policy(rig, 'from_sysctl_d = true\ntimeouts = { udp_timeout = "20s" }')
    rig.start()
    assert kernel.globals["nf_conntrack_max"] == 131072
    assert rig.udp() == 20                                           # the policy wins
    ns = kernel.namespaces[""].sysctls
    assert ns["nf_conntrack_tcp_timeout_time_wait"] == 40 and ns["nf_conntrack_tcp_timeout_close_wait"] == 40
    changes = rig.events.of("baseline_applied")[0]["changes"]
    assert "90-admin.conf:1" in changes


def test_a_baseline_edited_at_reload_applies_at_once(tmp_path):
    kernel = FakeKernel(maximum=7680)
    rig = Rig(tmp_path, kernel)
    policy(rig, "nf_conntrack_max = 0")
    rig.start()
    assert kernel.writes == []
    policy(rig, "nf_conntrack_max = 65536")
    assert rig.agent.reload()
    assert kernel.globals["nf_conntrack_max"] == 65536

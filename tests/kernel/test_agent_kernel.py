"""The agent against the real kernel: sampler, executor, degradation, end to end.

Every entry here is real, made in namespaces these tests create; global values
(nf_conntrack_max, buckets) are restored on the way out, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conntrack_agent import config, kernel, procfs, sampler
from conntrack_agent.executor import Executor, owned_records
from conntrack_agent.decisions import Decision
from conntrack_agent.journal import ChangeJournal

import rig

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


class ListLogger:
    """Collects emitted events (kind + fields) the way structlog would pass them on."""

    def __init__(self):
        self.events: List[Dict] = []

    def log(self, level, event, **fields):
        self.events.append(dict(fields, event=event, level=level))

    def kinds(self):
        return [e["event"] for e in self.events]


def policy_at(tmp_path: Path, rules: str = "", namespaces=(), agent: str = "") -> Path:
    """A policy file for one test: its own state file, the given namespaces, extra
    [agent] keys and rules (TOML text) on top of the built-in defaults."""
    path = tmp_path / "policy.toml"
    listed = ", ".join('"%s"' % n for n in namespaces)
    path.write_text(f'[agent]\nstate_file = "{tmp_path}/state.json"\nnamespaces = [{listed}]\n{agent}\n{rules}')
    return path


def ns_sysctl(ns: rig.Namespace, name: str) -> int:
    return int(ns.run(["cat", procfs.sysctl_path(name)]).stdout)


# ---------------------------------------------------------------------------- sampling


def test_sampler_count_matches_conntrack_in_a_namespace(ns):
    rig.flood_udp(ns, 3000)
    rig.flood_udp(ns, 1000, family=6)
    s = sampler.Sampler((ns.name,), window=0.5)
    opened, failed = s.open_missing()
    assert opened == [ns.name] and failed == {}
    assert s.probes[ns.name].source == "ctnetlink"
    sample = s.sample()
    s.close()
    expected = rig.conntrack_count(ns)
    assert expected >= 4000
    assert sample.count == expected
    assert sample.max == procfs.read_sysctl("nf_conntrack_max")
    assert sample.buckets == procfs.read_sysctl("nf_conntrack_buckets")
    assert sample.fullest.netns == ns.name


def test_procfs_fallback_reads_the_same(ns, monkeypatch):
    rig.flood_udp(ns, 2000)

    def refuse(*_a, **_k):
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(kernel.ctnetlink, "CtnetlinkSocket", refuse)
    s = sampler.Sampler((ns.name,), window=0.5)
    s.open_missing()
    assert s.probes[ns.name].source == "procfs"
    assert "Protocol not supported" in s.probes[ns.name].fallback_reason
    sample = s.sample()
    counters = s.probes[ns.name].read(time.monotonic, counters=True).counters
    s.close()
    assert sample.count == rig.conntrack_count(ns)
    assert {"drop", "early_drop", "insert_failed"} <= set(counters)


def test_fill_rate_follows_a_real_flood(ns):
    s = sampler.Sampler((ns.name,), window=0.2)
    s.open_missing()
    s.sample()
    rig.flood_udp(ns, 5000)
    time.sleep(0.05)
    sample = s.sample()
    s.close()
    assert sample.fill_rate > 0 and sample.time_to_full is not None


def test_missing_namespace_is_never_created():
    s = sampler.Sampler(("ctatest-does-not-exist",), window=0.5)
    opened, failed = s.open_missing()
    assert opened == [] and "ctatest-does-not-exist" in failed
    assert s.sample() is None
    assert not os.path.exists("/run/netns/ctatest-does-not-exist")
    # asking again does not report the same failure twice
    assert s.open_missing() == ([], {})


def test_drop_and_early_drop_deltas_when_a_namespace_overfills():
    with rig.Namespace() as assured_ns, rig.Namespace() as unreplied_ns, rig.saved_global_sysctls():
        rig.make_time_wait(assured_ns, 300)                  # assured: early_drop never evicts them
        rig.flood_udp(unreplied_ns, 600)                      # unreplied: early_drop's prey
        s = sampler.Sampler((assured_ns.name, unreplied_ns.name), window=0.5)
        s.open_missing()
        s.sample()
        rig.write_sysctl("nf_conntrack_max", 250)             # both namespaces are now over the max
        # early_drop scans only a few buckets next to the new entry's: a dense table lets it find prey.
        rig.write_sysctl("nf_conntrack_buckets", 64)
        rig.flood_udp(assured_ns, 100, ports=(30000, 30099))  # nothing evictable: dropped
        rig.flood_udp(unreplied_ns, 100, ports=(31000, 31099))  # evicts unreplied entries
        sample = s.sample()
        s.close()
    views = {v.netns: v for v in sample.namespaces}
    assert views[assured_ns.name].deltas["drop"] >= 90
    assert views[unreplied_ns.name].deltas["early_drop"] >= 50
    assert sample.deltas["drop"] >= 90


# ---------------------------------------------------------------------------- acting


def executor_for(tmp_path):
    log = ListLogger()
    journal = ChangeJournal(str(tmp_path / "state.json"))
    journal.load()
    return Executor(log, journal, kernel.LinuxKernel()), log, journal


def sample_now(namespaces=()):
    s = sampler.Sampler(tuple(namespaces), window=0.5)
    s.open_missing()
    sample = s.sample()
    s.close()
    return sample


def test_timeouts_set_and_restored_inside_the_namespace(ns, tmp_path):
    host_before = procfs.read_sysctl("nf_conntrack_udp_timeout")
    original = ns_sysctl(ns, "nf_conntrack_udp_timeout")
    executor, log, journal = executor_for(tmp_path)
    policy = config.loads(b"")
    values = (("udp_timeout", 7.0), ("tcp_timeout_time_wait", 9999.0))   # the second would lengthen: skipped
    set_it = Decision("set_timeouts", "shorten-timeouts", "test", ns.name, timeouts=values, action="set_timeouts",
                      targets=(ns.name,))
    outcome = executor.execute(set_it, sample_now([ns.name]), policy)
    assert outcome.applied and outcome.done == {ns.name}
    assert ns_sysctl(ns, "nf_conntrack_udp_timeout") == 7
    assert ns_sysctl(ns, "nf_conntrack_tcp_timeout_time_wait") == 120
    assert procfs.read_sysctl("nf_conntrack_udp_timeout") == host_before   # per namespace
    saved = json.loads((tmp_path / "state.json").read_text())["changes"]
    assert [(c["netns"], c["name"], c["original"], c["applied"], c["pending"]) for c in saved] == [
        (ns.name, "nf_conntrack_udp_timeout", original, 7, False)]
    event = next(e for e in log.events if e["event"] == "set_timeouts")
    assert "udp_timeout 30s→7s" in event["changes"] and event["netns"] == ns.name

    restore = Decision("restore_timeouts", "shorten-timeouts", "calm", ns.name, action="set_timeouts", undo=True,
                       restores=owned_records(journal))
    assert executor.execute(restore, sample_now([ns.name]), policy).applied
    assert ns_sysctl(ns, "nf_conntrack_udp_timeout") == original
    assert json.loads((tmp_path / "state.json").read_text())["changes"] == []


def test_restore_leaves_a_value_another_writer_changed(ns, tmp_path):
    executor, log, journal = executor_for(tmp_path)
    policy = config.loads(b"")
    executor.execute(Decision("set_timeouts", "r", "t", ns.name, timeouts=(("udp_timeout", 8.0),),
                              action="set_timeouts", targets=(ns.name,)), sample_now([ns.name]), policy)
    ns.run(["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=11"])
    executor.execute(Decision("restore_timeouts", "r", "calm", ns.name, action="set_timeouts", undo=True,
                              restores=owned_records(journal)), sample_now([ns.name]), policy)
    assert ns_sysctl(ns, "nf_conntrack_udp_timeout") == 11
    assert "external_change" in log.kinds() and journal.entries() == []


SHORTEN_RULE = """
[[rule]]
name = "{name}"
action = "set_timeouts"
enabled = {enabled}
cooldown = "1s"
[rule.trigger]
usage_at_least = 0.5
[rule.set_timeouts]
values = {{ udp_timeout = "10s" }}
restore_after = "2s"
restore_below = 0.3

[[rule]]
name = "shorten-timeouts"   # the built-in one sets udp_timeout too: it would adopt the changes
enabled = false

[[rule]]
name = "grow-table"         # a raised max would take the table out of the rule's trigger
enabled = false
"""


def _shorten_policy(tmp_path, ns, name="shorten", enabled=True) -> Path:
    return policy_at(tmp_path, SHORTEN_RULE.format(name=name, enabled=str(enabled).lower()), namespaces=[ns.name],
                     agent='interval = "200ms"')


def _wait_value(ns, name, value, timeout=15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = ns_sysctl(ns, name)
        if current == value:
            return current
        time.sleep(0.1)
    return ns_sysctl(ns, name)


def test_a_rule_disabled_by_reload_has_its_timeouts_restored_in_a_real_namespace(tmp_path):
    """The trust issue's first finding, end to end: a reload disables the rule that shortened
    udp_timeout; once the table is calm, the original comes back."""
    with rig.Namespace() as ns, rig.saved_global_sysctls():
        rig.write_sysctl("nf_conntrack_max", 4000)
        original = ns_sysctl(ns, "nf_conntrack_udp_timeout")
        policy_file = _shorten_policy(tmp_path, ns)
        agent = AgentProcess(policy_file)
        try:
            agent.wait_for(lambda e: e.get("event") == "conntrack_available")
            rig.flood_udp(ns, 2800)                               # 70% of 4000
            agent.wait_for(lambda e: e.get("event") == "set_timeouts")
            assert ns_sysctl(ns, "nf_conntrack_udp_timeout") == 10
            _shorten_policy(tmp_path, ns, enabled=False)
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_for(lambda e: e.get("event") == "policy_loaded")
            ns.run(["conntrack", "-F"], check=False)              # the table empties
            agent.wait_for(lambda e: e.get("event") == "restore_timeouts")
            assert _wait_value(ns, "nf_conntrack_udp_timeout", original) == original
        finally:
            assert agent.stop() == 0
    assert json.loads((tmp_path / "state.json").read_text())["changes"] == []


def test_a_rule_renamed_after_a_kill_has_its_timeouts_restored_in_a_real_namespace(tmp_path):
    """kill -9, then a start with the rule renamed: the journal, not the rule name, drives the undo."""
    with rig.Namespace() as ns, rig.saved_global_sysctls():
        rig.write_sysctl("nf_conntrack_max", 4000)
        original = ns_sysctl(ns, "nf_conntrack_udp_timeout")
        agent = AgentProcess(_shorten_policy(tmp_path, ns))
        try:
            agent.wait_for(lambda e: e.get("event") == "conntrack_available")
            rig.flood_udp(ns, 2800)
            agent.wait_for(lambda e: e.get("event") == "set_timeouts")
        finally:
            agent.proc.kill()                                      # SIGKILL: no clean-up of any kind
            agent.proc.wait(timeout=10)
        assert ns_sysctl(ns, "nf_conntrack_udp_timeout") == 10
        ns.run(["conntrack", "-F"], check=False)
        again = AgentProcess(_shorten_policy(tmp_path, ns, name="shorten-renamed"))
        try:
            # The renamed rule shortens the same timeout: it takes the change over and
            # restores it by its own calm condition (restoring, then shortening again, would flap).
            adopted = again.wait_for(lambda e: e.get("event") == "change_adopted")
            assert adopted["rule"] == "shorten-renamed" and "from rule 'shorten'" in adopted["reason"]
            again.wait_for(lambda e: e.get("event") == "restore_timeouts")
            assert _wait_value(ns, "nf_conntrack_udp_timeout", original) == original
        finally:
            assert again.stop() == 0
    assert json.loads((tmp_path / "state.json").read_text())["changes"] == []


def test_max_and_buckets_raised_then_restored_by_the_cli(tmp_path):
    policy_file = policy_at(tmp_path)
    with rig.saved_global_sysctls() as saved:
        executor, log, journal = executor_for(tmp_path)
        policy = config.load(policy_file)
        old_max, old_buckets = saved["nf_conntrack_max"], saved["nf_conntrack_buckets"]
        sample = sample_now()
        assert executor.execute(Decision("raise_max", "grow-table", "t", "", old=old_max, new=old_max + 4096,
                                         action="raise_max"), sample, policy).applied
        assert executor.execute(Decision("resize_buckets", "grow-table", "t", "", old=old_buckets,
                                         new=old_buckets + 1024, action="resize_buckets"), sample, policy).applied
        assert procfs.read_sysctl("nf_conntrack_max") == old_max + 4096
        assert procfs.read_sysctl("nf_conntrack_buckets") == old_buckets + 1024
        raised = next(e for e in log.events if e["event"] == "raise_max")
        assert (raised["old"], raised["new"], raised["rule"]) == (old_max, old_max + 4096, "grow-table")
        # A second agent life must keep the true original, not the raised value.
        again = ChangeJournal(str(tmp_path / "state.json"))
        again.load()
        assert again.get("", "nf_conntrack_max").original == old_max

        out = subprocess.run([sys.executable, "-m", "conntrack_agent", "restore", "--config", str(policy_file)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert procfs.read_sysctl("nf_conntrack_max") == old_max
        assert procfs.read_sysctl("nf_conntrack_buckets") == old_buckets
        assert "nf_conntrack_max" in out.stdout
        again = subprocess.run([sys.executable, "-m", "conntrack_agent", "restore", "--config", str(policy_file)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "nothing to restore" in again.stdout


def test_buckets_the_kernel_rounds_up_are_owned_as_kept(tmp_path):
    """The kernel rounds nf_conntrack_buckets up to whole pages of bucket heads: the
    journal owns what stuck, the event says it, and restore puts back the original."""
    policy_file = policy_at(tmp_path)
    with rig.saved_global_sysctls() as saved:
        executor, log, journal = executor_for(tmp_path)
        old_buckets = saved["nf_conntrack_buckets"]
        asked = old_buckets + 1000
        outcome = executor.execute(Decision("resize_buckets", "grow-table", "t", "", old=old_buckets, new=asked,
                                            action="resize_buckets"), sample_now(), config.load(policy_file))
        assert outcome.applied
        kept = procfs.read_sysctl("nf_conntrack_buckets")
        assert kept > asked, "this kernel kept the value as asked: nothing to round"
        again = ChangeJournal(str(tmp_path / "state.json"))
        again.load()
        record = again.get("", "nf_conntrack_buckets")
        assert (record.original, record.applied, record.pending) == (old_buckets, kept, False)
        resized = next(e for e in log.events if e["event"] == "resize_buckets")
        assert (resized["old"], resized["new"]) == (old_buckets, kept)
        out = subprocess.run([sys.executable, "-m", "conntrack_agent", "restore", "--config", str(policy_file)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert procfs.read_sysctl("nf_conntrack_buckets") == old_buckets


def test_dry_run_changes_nothing(tmp_path):
    executor, log, journal = executor_for(tmp_path)
    before = procfs.read_sysctl("nf_conntrack_max")
    decision = Decision("raise_max", "grow-table", "t", "", dry_run=True, old=before, new=before * 2,
                        action="raise_max")
    assert not executor.execute(decision, sample_now(), config.loads(b"")).applied
    assert procfs.read_sysctl("nf_conntrack_max") == before
    assert not (tmp_path / "state.json").exists()
    event = log.events[-1]
    assert event["dry_run"] is True and event["message"].startswith("would raise nf_conntrack_max")
    assert event["priority"] == 5


# ---------------------------------------------------------------------------- the agent process


class AgentProcess:
    """`conntrack-agent run` as a user runs it, JSON log lines collected."""

    # Errors no test here provokes: stop() fails the test on any (a tick that raised at
    # every resize of the buckets went unnoticed while the flows were all fine).
    UNEXPECTED = ("tick_failed", "internal_error", "dbus_method_failed")

    def __init__(self, policy_file: Path, *args: str, netns: str = "", env: Optional[Dict[str, str]] = None):
        cmd = [sys.executable, "-m", "conntrack_agent", "run", "--config", str(policy_file),
               "--log-format", "json", "--no-dbus", *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=dict(os.environ, **(env or {})))
        self._fd = self.proc.stderr.fileno()
        self._pending = b""
        self.lines: List[Dict] = []

    def events(self) -> List[Dict]:
        return self.lines

    def wait_for(self, predicate, timeout: float = 20.0) -> Dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self._readline(deadline)
            if line is None:
                break
            if predicate(line):
                return line
        raise AssertionError(f"no matching event within {timeout}s; got {[e.get('event') for e in self.lines]}"
                             f"; unparsed: {self._pending[-2000:]!r}")

    def _readline(self, deadline):
        """One JSON event from stderr. Reads the raw fd: a buffered text reader would
        swallow lines that select() then no longer sees."""
        import select
        while time.monotonic() < deadline:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                self.lines.append(event)
                return event
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    return None
                self._pending += chunk
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rest, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, err = self.proc.communicate()
        for raw in (self._pending + err).splitlines():
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                pass
        failures = [e for e in self.lines if e.get("event") in self.UNEXPECTED]
        assert not failures, failures
        return self.proc.returncode


def test_default_policy_raises_max_before_drops_in_a_flooded_namespace(ns, tmp_path):
    """The issue's 'done': the shipped policy, a namespace flooding past 80% of a lowered max."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text((REPO / "config" / "policy.toml").read_text()
                           .replace('namespaces = []', f'namespaces = ["{ns.name}"]')
                           .replace('/var/lib/conntrack-agent/state.json', f'{tmp_path}/state.json'))
    low = 20000
    with rig.saved_global_sysctls():
        rig.write_sysctl("nf_conntrack_max", low)
        agent = AgentProcess(policy_file)
        try:
            agent.wait_for(lambda e: e.get("event") == "conntrack_available")
            s = sampler.Sampler((ns.name,), window=0.5)
            s.open_missing()
            drops_before = s.probes[ns.name].read(time.monotonic, counters=True).counters
            sent = 0
            for chunk in range(9):            # to 90% of the lowered max, in steps the agent can see
                sent += rig.flood_udp(ns, 2000, ports=(20000 + chunk * 2000, 20000 + chunk * 2000 + 1999))
                time.sleep(0.1)
            raised = agent.wait_for(lambda e: e.get("event") == "raise_max")
            rig.flood_udp(ns, 12000, dst="127.0.1.1")   # past the old max: 32000 > 20000
            drops_after = s.probes[ns.name].read(time.monotonic, counters=True).counters
            s.close()
            count = rig.conntrack_count(ns)
        finally:
            code = agent.stop()
        assert procfs.read_sysctl("nf_conntrack_max") > low   # still raised until restored
    assert code == 0
    assert raised["old"] == low and raised["new"] >= 2 * low   # doubled, or room for 10s of the flood
    assert raised["rule"] == "grow-table" and raised["netns"] == ns.name
    for key in ("count", "max", "usage", "fill_rate", "time_to_full", "drop", "early_drop", "reason",
                "message", "message_id", "priority", "dry_run"):
        assert key in raised, key
    assert raised["usage"] < 0.9 and raised["drop"] == 0
    assert count > low                                           # the table really went past the old max
    assert drops_after["drop"] == drops_before["drop"]           # and nothing was dropped
    assert drops_after["early_drop"] == drops_before["early_drop"]
    kinds = [e.get("event") for e in agent.events()]
    assert kinds[0] == "agent_started" and kinds[-1] == "agent_stopping"
    assert "pressure" in kinds
    state = json.loads((tmp_path / "state.json").read_text())["changes"]
    assert any(c["name"] == "nf_conntrack_max" and c["original"] == low for c in state)


def test_unwritable_max_degrades_to_what_still_works(ns, tmp_path):
    """Inside a non-initial namespace the global max is read-only; timeouts still work."""
    # A usage the triggers below accept (they start at 5%): 6% of the global max.
    rig.flood_udp(ns, int(0.06 * rig.read_sysctl("nf_conntrack_max")) + 1)
    policy_file = policy_at(tmp_path, agent='interval = "50ms"', rules="""
[[rule]]
name = "grow-table"
cooldown = "0s"
[rule.trigger]
usage_at_least = 0.05
[[rule]]
name = "shorten-timeouts"
[rule.trigger]
usage_at_least = 0.05
sustained = "0s"
[rule.set_timeouts]
restore_below = 0.01
""")
    agent = AgentProcess(policy_file, netns=ns.name)
    try:
        failed = agent.wait_for(lambda e: e.get("event") == "action_failed")
        agent.wait_for(lambda e: e.get("event") == "set_timeouts")
        time.sleep(0.5)   # ten more ticks with the trigger still true
    finally:
        code = agent.stop()
    assert code == 0
    assert failed["action"] == "raise_max" and failed["priority"] == 3
    assert "nf_conntrack_max" in failed["error"]
    assert [e.get("event") for e in agent.events()].count("action_failed") == 1   # logged once, then degraded
    assert ns_sysctl(ns, "nf_conntrack_udp_timeout") == 10


def test_a_namespace_that_appears_later_is_picked_up(tmp_path):
    name = f"ctatest-{os.getpid()}-later"
    policy_file = policy_at(tmp_path, namespaces=[name])
    agent = AgentProcess(policy_file)
    try:
        missing = agent.wait_for(lambda e: e.get("event") == "conntrack_unavailable")
        time.sleep(1.0)
        assert not os.path.exists(f"/run/netns/{name}")   # waiting never creates it
        with rig.Namespace(name) as ns:
            rig.flood_udp(ns, 50)
            found = agent.wait_for(lambda e: e.get("event") == "conntrack_available", timeout=15)
    finally:
        code = agent.stop()
    assert code == 0
    assert missing["netns"] == name and missing["priority"] == 4
    assert found["netns"] == name
    assert [e.get("event") for e in agent.events()].count("conntrack_unavailable") == 1   # said once


def test_another_writer_lowering_max_is_logged_and_left_alone(tmp_path, ns):
    policy_file = policy_at(tmp_path, namespaces=[ns.name], rules="""
[[rule]]
name = "grow-table"
cooldown = "1h"
[rule.trigger]
usage_at_least = 0.05
""")
    with rig.saved_global_sysctls() as saved:
        rig.write_sysctl("nf_conntrack_max", 4000)
        saved = dict(saved, nf_conntrack_max=4000)
        rig.flood_udp(ns, 400)                                 # 10%: the trigger holds
        agent = AgentProcess(policy_file)
        try:
            raised = agent.wait_for(lambda e: e.get("event") == "raise_max")
            outsider = saved["nf_conntrack_max"] + 1024      # e.g. kube-proxy sizing the table at start
            rig.write_sysctl("nf_conntrack_max", outsider)
            change = agent.wait_for(lambda e: e.get("event") == "external_change")
            time.sleep(0.5)
            still = procfs.read_sysctl("nf_conntrack_max")
        finally:
            code = agent.stop()
    assert code == 0
    assert (change["old"], change["new"]) == (raised["new"], outsider)
    assert "backing off" in change["reason"] and change["priority"] == 4
    assert still == outsider                                  # back_off: the agent did not fight


# ---------------------------------------------------------------------------- eviction through the agent


def test_an_evict_rule_removes_stale_entries_and_spares_live_ones(ns, tmp_path):
    session = rig.EchoSession(ns, port=7000)
    rig.flood_udp(ns, 3000)
    assert session.ping()
    before = rig.conntrack_count(ns)
    policy_file = policy_at(tmp_path, namespaces=[ns.name], rules="""
[[rule]]
name = "grow-table"
enabled = false
[[rule]]
name = "shorten-timeouts"
enabled = false
[[rule]]
name = "sweep-unreplied"
action = "evict"
cooldown = "1h"
[rule.trigger]
usage_at_least = 0.05
[rule.evict]
status = "unreplied"
""")
    with rig.saved_global_sysctls():
        rig.write_sysctl("nf_conntrack_max", 20000)            # 3000 entries: 15%, the trigger holds
        agent = AgentProcess(policy_file)
        try:
            event = agent.wait_for(lambda e: e.get("event") == "evict")
        finally:
            code = agent.stop()
    assert code == 0
    after = rig.conntrack_count(ns)
    assert event["done"] == 3000 and event["rule"] == "sweep-unreplied" and event["netns"] == ns.name
    assert event["count_before"] == before and event["count_after"] == after == before - 3000
    # Nothing stops this sweep part-way (no budget, no target): where the kernel can filter
    # by status, one request does it; otherwise the userspace path counts by category.
    assert ("3000 removed by the kernel" in event["summary"] or "udp 3000" in event["summary"]), event["summary"]
    assert event["priority"] == 6
    assert session.ping()                      # the live connection was not touched
    assert session.entry() is not None


def test_evict_cli_dry_run_previews_without_changing(ns):
    rig.flood_udp(ns, 500)
    rig.flood_udp(ns, 200, family=6)
    before = rig.conntrack_count(ns)
    cmd = [sys.executable, "-m", "conntrack_agent", "evict", "--netns", ns.name, "--status", "unreplied"]
    out = subprocess.run(cmd + ["--dry-run", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["done"] == 700 and report["dry_run"] is True
    assert rig.conntrack_count(ns) == before
    assert report["top_destinations"][0][1] > 0
    real = subprocess.run(cmd + ["--proto", "udp", "--dst", "127.0.0.0/8"], capture_output=True, text=True,
                          timeout=60)
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith("removed 500 entries")
    assert rig.conntrack_count(ns) == before - 500


def test_plan_and_status_show_what_the_running_agent_owns_without_dbus(ns, tmp_path):
    """After the agent raised the max, plan and status name the original and what restore
    would do, and plan shows the rule's cooldown, from the agent's own report."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {"RUNTIME_DIRECTORY": str(runtime)}
    policy_file = policy_at(tmp_path, namespaces=[ns.name], agent='interval = "200ms"')
    low = 1009
    with rig.saved_global_sysctls():
        rig.write_sysctl("nf_conntrack_max", low)
        agent = AgentProcess(policy_file, env=env)
        try:
            agent.wait_for(lambda e: e.get("event") == "conntrack_available")
            rig.flood_udp(ns, 900)
            raised = agent.wait_for(lambda e: e.get("event") == "raise_max")
            deadline = time.monotonic() + 10
            while not (runtime / "report.json").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            cli = [sys.executable, "-m", "conntrack_agent"]
            run_env = dict(os.environ, **env)
            status = subprocess.run(cli + ["status", "--config", str(policy_file), "--json"], capture_output=True,
                                    text=True, timeout=60, env=run_env)
            plan = subprocess.run(cli + ["plan", "--config", str(policy_file)], capture_output=True, text=True,
                                  timeout=60, env=run_env)
        finally:
            assert agent.stop() == 0
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["source"].startswith("agent (")
    owned = {o["name"]: o for o in data["owned"]}
    assert owned["nf_conntrack_max"]["original"] == low
    assert owned["nf_conntrack_max"]["applied"] == raised["new"]
    assert plan.returncode == 0, plan.stderr
    assert f"nf_conntrack_max: {raised['new']} (original {low}, rule grow-table)" in plan.stdout
    assert "restore:" in plan.stdout and "source: agent (" in plan.stdout
    assert "grow-table (raise_max):" in plan.stdout


def test_a_configmap_update_is_reloaded_without_a_restart_and_a_bad_one_kept_out(ns, tmp_path):
    """agent.watch_policy with the kubelet's layout: a new `..data` is loaded as SIGHUP
    would load it; a broken one is refused and the running policy stays."""
    import sys as _sys
    _sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_policywatch import configmap

    mount = tmp_path / "configmap"
    mount.mkdir()
    base = (f'[agent]\nstate_file = "{tmp_path}/state.json"\nnamespaces = ["{ns.name}"]\n'
            'watch_policy = true\n')
    configmap(mount, "1", base)
    agent = AgentProcess(mount / "policy.toml")
    try:
        agent.wait_for(lambda e: e.get("event") == "policy_watched")
        configmap(mount, "2", base + 'interval = "2s"\n')
        loaded = agent.wait_for(lambda e: e.get("event") == "policy_loaded", timeout=10)
        assert "interval 2s" in loaded.get("rules", "") or loaded["policy"]
        configmap(mount, "3", base + 'interval = "two seconds"\n')
        refused = agent.wait_for(lambda e: e.get("event") == "policy_invalid", timeout=10)
        assert "agent.interval" in refused["error"]
        assert agent.proc.poll() is None                     # still running, old policy kept
    finally:
        assert agent.stop() == 0

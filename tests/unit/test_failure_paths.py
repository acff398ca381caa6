"""The agent's promises on the failure paths, on the in-memory fake kernel (no root).

Each test drives the real Agent (sampler, decision core, executor, actions,
change journal on disk) through the kernel seam; only the kernel is fake.
"""

from __future__ import annotations

import errno
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from conntrack_agent import config, service
from conntrack_agent.journal import ChangeJournal

from fakekernel import Killed, FakeKernel

UDP = "nf_conntrack_udp_timeout"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Events:
    """A logger that keeps (kind, fields) for every event."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, Dict[str, Any]]] = []

    def log(self, _level: int, kind: str, **fields: Any) -> None:
        self.items.append((kind, fields))

    def kinds(self) -> List[str]:
        return [k for k, _ in self.items]

    def of(self, kind: str) -> List[Dict[str, Any]]:
        return [f for k, f in self.items if k == kind]


SHORTEN_RULES = """
[[rule]]
name = "{name}"
action = "set_timeouts"
enabled = {enabled}
cooldown = "1s"
[rule.trigger]
usage_at_least = 0.5
[rule.set_timeouts]
values = {{ udp_timeout = "10s" }}
restore_after = "3s"
restore_below = 0.3

[[rule]]
name = "shorten-timeouts"   # the built-in one sets udp_timeout too: it would adopt the changes
enabled = false
"""
SHORTEN = """
[agent]
namespaces = {namespaces}
state_file = "{state}"
fast_interval = "50ms"
""" + SHORTEN_RULES


class Rig:
    def __init__(self, tmp_path: Path, kernel: Optional[FakeKernel] = None, namespaces: Tuple[str, ...] = ()):
        self.tmp = tmp_path
        self.kernel = kernel or FakeKernel(maximum=1000)
        for name in namespaces:
            if name not in self.kernel.namespaces:
                self.kernel.add_namespace(name)
        self.namespaces = namespaces
        self.state = tmp_path / "state.json"
        self.policy = tmp_path / "policy.toml"
        self.clock = Clock()
        self.events = Events()
        self.agent: Optional[service.Agent] = None

    def write_policy(self, name: str = "shorten", enabled: bool = True, text: Optional[str] = None) -> None:
        ns = json.dumps(list(self.namespaces))
        self.policy.write_text(text if text is not None else
                               SHORTEN.format(namespaces=ns, state=self.state, name=name,
                                              enabled=str(enabled).lower()))

    def start(self) -> service.Agent:
        self.agent = service.Agent(str(self.policy), False, self.events, clock=self.clock, kernel=self.kernel)
        self.agent.start()
        return self.agent

    def set_count(self, count: int, netns: str = "") -> None:
        self.kernel.namespaces[netns].count = count

    def run_for(self, seconds: float, step: float = 0.25) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.agent.tick()
            self.clock.now += step

    def journal(self) -> ChangeJournal:
        journal = ChangeJournal(str(self.state))
        journal.load(quarantine=False)
        return journal

    def udp(self, netns: str = "") -> int:
        return self.kernel.value(netns, UDP)


# ---------------------------------------------------------------------- rules that go away


def test_a_rule_disabled_by_reload_has_its_timeouts_restored_once_calm(tmp_path):
    rig = Rig(tmp_path)
    rig.write_policy()
    rig.start()
    rig.set_count(700)                      # 70%: the rule fires
    rig.run_for(1)
    assert rig.udp() == 10
    rig.write_policy(enabled=False)
    assert rig.agent.reload()
    rig.set_count(0)                        # the table empties
    rig.run_for(2)
    assert rig.udp() == 10, "restored before the recorded calm period (3s)"
    rig.run_for(2)
    assert rig.udp() == 30
    assert rig.journal().entries() == []
    restored = rig.events.of("restore_timeouts")
    assert restored and "no longer stands behind" in restored[-1]["reason"]


def test_a_rule_renamed_while_the_agent_was_killed_has_its_timeouts_restored(tmp_path):
    rig = Rig(tmp_path)
    rig.write_policy(name="shorten")
    rig.start()
    rig.set_count(700)
    rig.run_for(1)
    assert rig.udp() == 10
    # kill -9: no stop(), no restore; the journal on disk is all that survives.
    rig.write_policy(name="shorten-renamed")
    rig.start()
    rig.set_count(0)
    rig.run_for(4)
    assert rig.udp() == 30
    assert rig.journal().entries() == []


def test_a_change_recorded_without_a_restore_condition_is_restored_at_once(tmp_path):
    rig = Rig(tmp_path)
    journal = ChangeJournal(str(rig.state))
    journal.load()
    token = journal.begin("", UDP, "set_timeouts", 30, 10, "gone-rule")
    journal.confirm(token, 10)
    rig.kernel.namespaces[""].sysctls[UDP] = 10
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n[[rule]]\nname = "shorten-timeouts"\n'
                          'enabled = false\n')
    rig.start()
    rig.set_count(900)                     # even under pressure: nothing says wait
    rig.run_for(0.25)
    assert rig.udp() == 30


def test_an_orphaned_timeout_another_rule_also_shortens_is_adopted_not_flapped(tmp_path):
    rig = Rig(tmp_path)
    journal = ChangeJournal(str(rig.state))
    journal.load()
    journal.confirm(journal.begin("", UDP, "set_timeouts", 30, 10, "gone-rule", 60.0, 0.1), 10)
    rig.kernel.namespaces[""].sysctls[UDP] = 10
    rig.write_policy(name="other")          # sets udp_timeout 10s too, restore_after 3s below 30%
    rig.start()
    rig.run_for(0.5)
    assert rig.udp() == 10 and UDP not in {name for _, name, _ in rig.kernel.writes}
    owner = rig.journal().get("", UDP)
    assert (owner.rule, owner.restore_after, owner.restore_below, owner.original) == ("other", 3.0, 0.3, 30)
    assert rig.events.of("change_adopted")
    rig.run_for(4)                          # calm by the new owner's condition
    assert rig.udp() == 30


def test_a_raised_max_whose_rule_is_gone_waits_until_the_count_fits_the_original(tmp_path):
    kernel = FakeKernel(maximum=2000)
    rig = Rig(tmp_path, kernel)
    journal = ChangeJournal(str(rig.state))
    journal.load()
    journal.confirm(journal.begin("", "nf_conntrack_max", "raise_max", 1000, 2000, "old-grow"), 2000)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n[[rule]]\nname = "grow-table"\nenabled = false\n')
    rig.start()
    rig.set_count(800)                     # 80% of the original: lowering it would drop connections
    rig.run_for(1)
    assert kernel.globals["nf_conntrack_max"] == 2000
    rig.set_count(100)
    rig.run_for(1)
    assert kernel.globals["nf_conntrack_max"] == 1000
    assert [(f["old"], f["new"]) for f in rig.events.of("restore_max")] == [(2000, 1000)]


# ---------------------------------------------------------------------- retries and capabilities


def test_a_failed_set_timeouts_is_retried_after_the_cooldown(tmp_path):
    rig = Rig(tmp_path)
    rig.write_policy()
    rig.kernel.refuse("", UDP, errno.EIO, once=True)
    rig.start()
    rig.set_count(700)
    rig.run_for(0.5)
    assert rig.udp() == 30
    failed = rig.events.of("action_failed")
    assert len(failed) == 1 and "will retry" in failed[0]["consequence"]
    rig.run_for(1.0)                       # the rule's cooldown is 1s
    assert rig.udp() == 10


def test_a_missing_namespace_never_turns_timeouts_off_elsewhere(tmp_path):
    rig = Rig(tmp_path, namespaces=("a", "b"))
    rig.write_policy()
    rig.kernel.remove_namespace("b")       # watched, but gone
    rig.start()
    rig.set_count(700, "a")
    rig.run_for(1)
    assert rig.udp("a") == 10
    rig.kernel.add_namespace("b", count=700)
    rig.run_for(6)                          # re-probed (every 5s) and retried after the cooldown
    assert rig.udp("b") == 10


def test_a_permanent_refusal_is_lost_for_that_namespace_only(tmp_path):
    rig = Rig(tmp_path, namespaces=("a", "b"))
    rig.write_policy()
    rig.kernel.refuse("a", UDP, errno.EROFS)
    rig.start()
    rig.set_count(700, "b")
    rig.run_for(3)
    assert rig.udp("b") == 10 and rig.udp("a") == 30
    failed = rig.events.of("action_failed")
    assert len(failed) == 1 and "netns a" in failed[0]["consequence"]   # logged once, not every cooldown


def test_a_restore_failing_in_one_namespace_restores_the_others(tmp_path):
    rig = Rig(tmp_path, namespaces=("a", "b"))
    rig.write_policy()
    rig.start()
    rig.set_count(700, "a")
    rig.run_for(1)
    assert rig.udp("a") == 10 and rig.udp("b") == 10
    rig.kernel.refuse("a", UDP, errno.EIO, once=True)
    rig.set_count(0, "a")
    rig.run_for(4)
    assert rig.udp("b") == 30
    rig.run_for(6)                          # the failed one is retried
    assert rig.udp("a") == 30
    assert rig.journal().entries() == []


def test_a_vanished_namespace_is_logged_once_and_its_records_dropped_when_gone_for_good(tmp_path):
    rig = Rig(tmp_path, namespaces=("a", "b"))
    rig.write_policy()
    rig.start()
    rig.set_count(700, "a")
    rig.run_for(1)
    rig.kernel.remove_namespace("b")
    rig.set_count(0, "a")
    rig.run_for(5)
    assert rig.udp("a") == 30
    assert [c.netns for c in rig.journal().entries()] == ["b"]
    assert len(rig.events.of("namespace_missing")) == 1
    rig.run_for(service.NAMESPACE_GONE_AFTER + 10, step=1.0)
    assert rig.journal().entries() == []
    assert len(rig.events.of("namespace_gone")) == 1
    assert len(rig.events.of("namespace_missing")) == 1


# ---------------------------------------------------------------------- the journal around a write


def test_a_failed_write_keeps_the_original(tmp_path):
    rig = Rig(tmp_path)
    rig.write_policy(text=SHORTEN.format(namespaces="[]", state=rig.state, name="shorten", enabled="true")
                     .replace('udp_timeout = "10s"', 'udp_timeout = "10s", udp_timeout_stream = "1m"'))
    rig.kernel.refuse("", "nf_conntrack_udp_timeout_stream", errno.EIO, once=True)
    rig.start()
    rig.set_count(700)
    rig.run_for(0.25)
    records = {c.name: (c.original, c.applied, c.pending) for c in rig.journal().entries()}
    assert records == {UDP: (30, 10, False)}   # the refused one left no record behind
    rig.run_for(1.5)
    records = {c.name: (c.original, c.applied, c.pending) for c in rig.journal().entries()}
    assert records == {UDP: (30, 10, False), "nf_conntrack_udp_timeout_stream": (120, 60, False)}


def test_a_refused_rewrite_of_an_owned_value_keeps_its_first_original(tmp_path):
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')   # the default policy: grow-table
    rig.start()
    rig.set_count(800)
    rig.run_for(0.1, step=0.05)
    first = rig.journal().get("", "nf_conntrack_max")
    assert first.original == 1000 and first.applied == kernel.globals["nf_conntrack_max"] > 1000
    kernel.refuse("", "nf_conntrack_max", errno.EIO)
    rig.set_count(kernel.globals["nf_conntrack_max"] - 10)
    rig.run_for(1, step=0.05)
    again = rig.journal().get("", "nf_conntrack_max")
    assert (again.original, again.applied, again.pending) == (1000, first.applied, False)
    # A restart still knows the original.
    kernel.refusals.clear()
    rig.start()
    assert rig.journal().get("", "nf_conntrack_max").original == 1000


@pytest.mark.parametrize("written", [False, True])
def test_a_kill_between_the_record_and_the_write_is_settled_at_the_next_start(tmp_path, written):
    rig = Rig(tmp_path)
    rig.write_policy()
    rig.kernel.kill_on_write = ("", UDP)
    rig.start()
    rig.set_count(700)
    with pytest.raises(Killed):
        rig.agent.tick()
    pending = rig.journal().get("", UDP)
    assert (pending.original, pending.applied, pending.pending) == (30, 10, True)
    rig.kernel.kill_on_write = None
    if written:                             # the write made it before the kill
        rig.kernel.namespaces[""].sysctls[UDP] = 10
    rig.set_count(0)
    rig.start()
    if written:
        settled = rig.journal().get("", UDP)
        assert (settled.original, settled.applied, settled.pending) == (30, 10, False)
        rig.run_for(4)                      # and it is restored once calm, as any owned value
        assert rig.udp() == 30
    else:
        assert rig.journal().entries() == []
    assert rig.udp() == 30


def test_a_global_write_outside_the_initial_namespace_is_a_permanent_refusal(tmp_path):
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')
    kernel.refuse("", "nf_conntrack_max", errno.EACCES)
    rig.start()
    rig.set_count(900)
    rig.run_for(3, step=0.05)
    failed = rig.events.of("action_failed")
    assert len(failed) == 1 and "will not try" in failed[0]["consequence"]
    assert rig.journal().entries() == []
    kernel.refusals.clear()
    rig.agent.reload()                      # the operator's "try again"
    rig.run_for(0.5, step=0.05)
    assert kernel.globals["nf_conntrack_max"] > 1000


def test_dry_run_walks_the_same_path_and_writes_nothing(tmp_path):
    rig = Rig(tmp_path)
    rig.write_policy()
    rig.agent = service.Agent(str(rig.policy), True, rig.events, clock=rig.clock, kernel=rig.kernel)
    rig.agent.start()
    rig.set_count(700)
    rig.run_for(1)
    rig.set_count(0)
    rig.run_for(4)
    assert rig.kernel.writes == [] and not rig.state.exists()
    would = [(k, f["dry_run"]) for k, f in rig.events.items if k in ("set_timeouts", "restore_timeouts")]
    assert would == [("set_timeouts", True), ("restore_timeouts", True)]


# ---------------------------------------------------------------------- before acting, and before conntrack


def test_the_table_is_read_again_just_before_acting(tmp_path):
    """A reading that looked like pressure is not acted on if the fresh one says otherwise."""
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')
    rig.start()
    kernel.namespaces[""].script = [900, 100]     # the first read says 90%, the fresh one 10%
    rig.agent.tick()
    assert kernel.writes == [] and "raise_max" not in rig.events.kinds()
    kernel.namespaces[""].script = [900, 900]
    rig.clock.now += 1
    rig.agent.tick()
    assert kernel.globals["nf_conntrack_max"] > 1000


def test_the_tick_after_a_raise_is_paced_by_the_new_max(tmp_path):
    """The next tick is predicted from the thresholds of the max the tick just set: from
    the old one, shorten-timeouts' 90% (27 ms away at this rate) would call a tick for
    nothing."""
    rig = Rig(tmp_path, FakeKernel(maximum=10_000))
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')   # the built-in rules
    rig.start()
    rig.set_count(5000)
    rig.agent.tick()
    rig.clock.now += 0.05
    rig.set_count(7600)                     # 52,000 entries/s: grow-table fires at 76%
    interval = rig.agent.tick()
    assert rig.kernel.globals["nf_conntrack_max"] >= 20_000
    assert interval == rig.agent.policy.agent.fast_interval


def test_conntrack_not_loaded_is_logged_once_and_probed_every_5s(tmp_path):
    kernel = FakeKernel(maximum=1000)
    kernel.loaded = False
    rig = Rig(tmp_path, kernel)
    rig.write_policy()
    rig.start()
    rig.run_for(4.5, step=0.5)
    assert rig.events.kinds().count("conntrack_unavailable") == 1 and "conntrack_available" not in rig.events.kinds()
    opened = kernel.probes_opened
    assert opened == 1                              # waits REPROBE_INTERVAL between probes
    kernel.loaded = True                            # an operator loads it; the agent never does
    rig.run_for(1.5, step=0.5)
    assert "conntrack_available" in rig.events.kinds() and kernel.probes_opened == 2


# ---------------------------------------------------------------------- the kernel's other signals


def test_chaintoolong_grows_the_buckets_and_never_the_max(tmp_path):
    kernel = FakeKernel(maximum=100000, buckets=1024)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')      # the shipped rules
    rig.start()
    rig.set_count(100)
    rig.run_for(1.2)
    kernel.namespaces[""].counters["chaintoolong"] = 5
    rig.run_for(1.2)
    assert kernel.globals == {"nf_conntrack_max": 100000, "nf_conntrack_buckets": 2048}
    record = rig.journal().get("", "nf_conntrack_buckets")
    assert (record.original, record.applied, record.rule) == (1024, 2048, "grow-buckets")
    kernel.namespaces[""].counters["chaintoolong"] = 9
    rig.run_for(30)
    assert kernel.globals["nf_conntrack_buckets"] == 2048          # the 1 min cooldown holds
    rig.run_for(31)
    assert kernel.globals["nf_conntrack_buckets"] == 2048          # quiet counter: nothing more


def test_buckets_the_kernel_rounds_up_are_owned_as_kept(tmp_path):
    """The kernel rounds nf_conntrack_buckets up to whole pages of bucket heads: the
    agent owns the value that stuck and logs it (owning it twice once failed every
    such tick with 'already confirmed', so the buckets never followed a raised max)."""
    kernel = FakeKernel(maximum=1000, buckets=1024)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')      # the shipped rules
    rig.start()
    rig.set_count(900)                       # 90%: grow-table raises the max, the buckets follow
    rig.run_for(1.2)
    raised = kernel.globals["nf_conntrack_max"]
    assert raised > 1024 and raised % 512, "the test needs a max that is not a whole page of buckets"
    buckets = kernel.globals["nf_conntrack_buckets"]
    assert buckets == -(-raised // 512) * 512 and buckets != raised
    record = rig.journal().get("", "nf_conntrack_buckets")
    assert (record.original, record.applied, record.pending) == (1024, buckets, False)
    resized = rig.events.of("resize_buckets")
    assert len(resized) == 1 and (resized[0]["old"], resized[0]["new"]) == (1024, buckets)
    assert not rig.events.of("tick_failed") and not rig.events.of("internal_error")


def test_insert_races_without_pressure_are_explained_once_and_never_raise_the_max(tmp_path):
    kernel = FakeKernel(maximum=10000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')
    rig.start()
    rig.set_count(100)
    counters = kernel.namespaces[""].counters
    for _ in range(10):                          # races keep happening, second after second
        counters["insert_failed"] += 3
        counters["clash_resolve"] += 2
        rig.run_for(1.0)
    races = rig.events.of("insert_race")
    assert len(races) == 1 and "a larger max would not help" in races[0]["reason"]
    assert kernel.writes == []
    rig.run_for(310, step=5.0)                   # the episode ends after 5 quiet minutes
    counters["insert_failed"] += 1
    rig.run_for(1.5)
    assert len(rig.events.of("insert_race")) == 2


def test_rising_drop_counters_survive_the_re_read_before_acting(tmp_path):
    """The re-read just before acting measures only microseconds: the counter increases
    the first read saw must still count, or a drop-only trigger could never act."""
    kernel = FakeKernel(maximum=10000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n[[rule]]\nname = "grow-table"\n'
                          '[rule.trigger]\nusage_at_least = 0.99\ntime_to_full_below = "1s"\n')
    rig.start()
    rig.set_count(100)                               # 1%: only the drop counter can fire grow-table
    rig.run_for(1.0)
    kernel.namespaces[""].counters["drop"] += 4
    rig.run_for(0.5)
    assert kernel.globals["nf_conntrack_max"] > 10000
    assert "kernel counters rising: drop +4" in rig.events.of("raise_max")[0]["reason"]


# ---------------------------------------------------------------------- the whole node


def test_the_attribution_pass_waits_for_the_episodes_first_action(tmp_path):
    """A pass started with the pressure episode ran beside the ticks that raise the max
    and made the first raise late: it starts once the agent has acted, or after
    ATTRIBUTION_DELAY if nothing needed doing."""
    import time as _time
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel, namespaces=("web",))
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\nnamespaces = ["web"]\n')
    rig.start()
    rig.set_count(600, "web")                 # 60%: pressure (the fast tick), no raise yet
    rig.run_for(0.5, step=0.05)
    assert "pressure" in rig.events.kinds() and not rig.events.of("raise_max")
    _time.sleep(0.05)
    assert kernel.attributions == [], "a pass started before the episode's first action"
    rig.set_count(800, "web")                 # 80%: grow-table raises the max in this tick
    rig.run_for(0.05, step=0.05)
    assert rig.events.of("raise_max")
    deadline = _time.monotonic() + 5
    while not kernel.attributions and _time.monotonic() < deadline:
        _time.sleep(0.01)                     # the pass runs in a thread of its own
    assert kernel.attributions == ["web"]

    quiet = Rig(tmp_path / "quiet", FakeKernel(maximum=1000), namespaces=("web",))
    quiet.tmp.mkdir()
    quiet.write_policy(text=f'[agent]\nstate_file = "{quiet.state}"\nnamespaces = ["web"]\n'
                            '[[rule]]\nname = "grow-table"\nenabled = false\n')
    quiet.start()
    quiet.set_count(600, "web")               # pressure, and no rule that acts on it
    quiet.run_for(service.ATTRIBUTION_DELAY - 0.2, step=0.05)
    _time.sleep(0.05)
    assert quiet.kernel.attributions == []
    quiet.run_for(0.4, step=0.05)
    deadline = _time.monotonic() + 5
    while not quiet.kernel.attributions and _time.monotonic() < deadline:
        _time.sleep(0.01)
    assert quiet.kernel.attributions == ["web"]


def test_a_pressure_episode_says_who_fills_the_table_once(tmp_path):
    import time as _time
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel, namespaces=("web",))
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\nnamespaces = ["web"]\n'
                          '[[rule]]\nname = "grow-table"\nenabled = false\n')
    rig.start()
    rig.set_count(800, "web")
    rig.run_for(0.5)
    deadline = _time.monotonic() + 5
    while not rig.events.of("pressure_attribution") and _time.monotonic() < deadline:
        _time.sleep(0.01)                      # the pass runs in a thread of its own
        rig.run_for(0.05, step=0.05)
    event, = rig.events.of("pressure_attribution")
    assert event["netns"] == "web" and event["unreplied"] == 600
    assert "75% unreplied" in event["summary"] and "10.1.2.0/24" in event["summary"]
    rig.run_for(5)
    assert kernel.attributions == ["web"]      # once per episode start (and per minute at most)
    report = rig.agent.report()
    assert report["headroom"] == {"free": 200, "early_droppable": 600, "effective": 800,
                                  "measured_at": report["headroom"]["measured_at"]}


# ---------------------------------------------------------------------- a reload that fails half-way

RELOAD_POLICY = """
[agent]
namespaces = {namespaces}
state_file = "{state}"
interval = "{interval}"
fast_interval = "{fast}"
watch_policy = {watch}

[metrics]
textfile = "{textfile}"
""" + SHORTEN_RULES.replace("{name}", "shorten")


class ReloadNotifier:
    def __init__(self) -> None:
        self.sent: List[str] = []

    def reloading(self) -> None: self.sent.append("RELOADING")
    def ready(self) -> None: self.sent.append("READY")
    def status(self, text: str) -> None: self.sent.append("STATUS")


class ReloadLoop:
    on_error = None

    def __init__(self) -> None:
        self.readers: Dict[int, Any] = {}

    def on_readable(self, fd: int, callback: Any) -> None: self.readers[fd] = callback
    def remove_readable(self, fd: int) -> None: self.readers.pop(fd, None)


def _reload_policy(rig: Rig, new: bool) -> None:
    rig.policy.write_text(RELOAD_POLICY.format(
        namespaces='["a", "b"]' if new else '["a"]', state=rig.state, interval="2s" if new else "1s",
        fast="100ms" if new else "50ms", watch="true" if new else "false",
        textfile=rig.tmp / ("new.prom" if new else "old.prom"), enabled="false" if new else "true"))


@pytest.mark.parametrize("step", ["_start_discovery", "_probe", "describe"])
def test_a_reload_that_raises_after_taking_the_policy_leaves_the_old_one_in_force_in_full(tmp_path, monkeypatch,
                                                                                            step):
    """The new policy is swapped in, then a later step raises: the agent must run on the
    old policy in every piece derived from it, not on a mix, and say so."""
    from conntrack_agent import mainloop, sampler as sampler_module

    rig = Rig(tmp_path, namespaces=("a", "b"))
    _reload_policy(rig, new=False)
    agent = rig.start()
    sup = mainloop.Supervisor(agent, ReloadNotifier(), ReloadLoop(), clock=rig.clock)
    old_policy, old_sampler = agent.policy, agent.sampler
    agent.memory = replace(agent.memory, lost=frozenset({("timeouts", "b")}))
    opened: List[Any] = []

    class Recorded(sampler_module.Sampler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(service, "Sampler", Recorded)

    def boom(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(f"{step} broke")

    if step == "describe":
        monkeypatch.setattr(config, "describe", boom)
    else:
        monkeypatch.setattr(agent, step, boom)
    _reload_policy(rig, new=True)

    assert sup.reload() is False
    failed = rig.events.of("reload_failed")
    assert len(failed) == 1 and f"{step} broke" in failed[0]["error"]
    assert failed[0]["policy"] == str(rig.policy)
    assert not rig.events.of("policy_loaded")
    # Every piece as before: the policy, what the memory forgets at a reload, the
    # watched namespaces and their sampler (still open), the policy watcher.
    assert agent.policy is old_policy
    assert agent.memory.lost == {("timeouts", "b")}
    assert agent.env.namespaces == ("a",)
    assert agent.sampler is old_sampler and set(old_sampler.probes) == {"a"}
    assert all(not s.probes for s in opened), "the sampler opened for the new policy was left open"
    assert agent.discovery is None and agent.watched == {}
    assert sup._policy_watch is None and sup.loop.readers == {}
    # ... and it acts on it: the old tick intervals, the old rule, the old metrics file.
    monkeypatch.undo()
    assert agent.tick() == pytest.approx(0.05)
    rig.set_count(700, "a")
    rig.run_for(1, step=0.05)
    assert rig.udp("a") == 10 and rig.udp("b") == 30
    agent.publish_metrics()
    assert (tmp_path / "old.prom").exists() and not (tmp_path / "new.prom").exists()

    # The same file, once nothing breaks, is taken in full.
    rig.set_count(0, "a")
    assert sup.reload() is True
    assert agent.env.namespaces == ("a", "b") and set(agent.sampler.probes) == {"a", "b"}
    assert not old_sampler.probes, "the replaced sampler was left open"
    assert agent.memory.lost == frozenset()
    assert sup._policy_watch is not None
    assert agent.tick() == pytest.approx(0.1)
    sup._policy_watch.close()

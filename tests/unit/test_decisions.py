"""The decision core on synthetic samples: storms, cooldowns, hysteresis, ceilings."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from conntrack_agent import config, model
from conntrack_agent import decisions as core
from conntrack_agent.config import Policy, Rule, Trigger
from conntrack_agent.decisions import Decision, Environment, Memory, Outcome, Owned, decide

GiB = 1 << 30
ENV = Environment(mem_total=16 * GiB, entry_bytes=256)


class Table:
    """A fake kernel table: feeds readings through the real FillTracker."""

    def __init__(self, maximum: int, buckets: Optional[int] = None, window: float = 0.5, netns: str = ""):
        self.max = maximum
        self.buckets = buckets or maximum
        self.netns = netns
        self.tracker = model.FillTracker(window)
        self.counters: Dict[str, int] = {"drop": 0, "early_drop": 0, "insert_failed": 0}

    def sample(self, t: float, count: int, **bumps: int) -> model.Sample:
        for name, n in bumps.items():
            self.counters[name] += n
        reading = model.Reading(self.netns, t, count, self.max, self.buckets, dict(self.counters))
        return model.combine((reading,), (self.tracker.update(reading),))


class Ledger:
    """What the executor and the journal would make of decisions, for the pure core:
    the owned records, kept as the journal keeps them (first original wins)."""

    def __init__(self, table: Optional[Table] = None, owned: Sequence[Owned] = ()):
        self.table = table
        self.owned: Dict[Tuple[str, str], Owned] = {(o.netns, o.name): o for o in owned}

    def apply(self, d: Decision, pol: Policy) -> Outcome:
        if not d.is_action:
            for o in d.restores:
                self.owned.pop((o.netns, o.name), None)
            return Outcome(applied=False)
        if d.dry_run:
            return Outcome(applied=False)
        if d.undo:
            for o in d.restores:
                self.owned.pop((o.netns, o.name), None)
                if o.name == "nf_conntrack_max" and self.table is not None:
                    self.table.max = o.original
            return Outcome(applied=True)
        rule = next((r for r in pol.rules if r.name == d.rule), None)
        if d.kind in ("raise_max", "resize_buckets"):
            name = "nf_conntrack_max" if d.kind == "raise_max" else "nf_conntrack_buckets"
            spec = rule.raise_max if rule is not None else None
            keep = not (spec is None or spec.raise_only)
            self._record("", name, d.kind, d.old, d.new, d.rule, spec.restore_after if keep else None,
                         spec.restore_below if keep else None)
            if self.table is not None:
                setattr(self.table, "max" if d.kind == "raise_max" else "buckets", d.new)
        elif d.kind == "set_timeouts":
            spec = rule.set_timeouts
            for ns in d.targets:
                for timeout, value in d.timeouts:
                    self._record(ns, "nf_conntrack_" + timeout, d.kind, 10 ** 6, int(value), d.rule,
                                 spec.restore_after, spec.restore_below)
        return Outcome(applied=True, done=frozenset(d.targets))

    def _record(self, netns, name, action, original, applied, rule, after, below) -> None:
        existing = self.owned.get((netns, name))
        if existing is not None:
            original = existing.original
        self.owned[(netns, name)] = Owned(netns, name, action, original, applied, rule, after, below)

    def records(self) -> Tuple[Owned, ...]:
        return tuple(self.owned.values())


def run(pol: Policy, samples: Sequence[model.Sample], state: Optional[Memory] = None, env: Environment = ENV,
        apply: Optional[Table] = None, ledger: Optional[Ledger] = None) -> Tuple[List[Tuple[float, Decision]], Memory]:
    """Decide on each sample; actions change the ledger (and with `apply`, the fake table)
    as the executor would."""
    state = state or Memory()
    acting = apply is not None or ledger is not None
    ledger = ledger or Ledger(apply)
    out = []
    for sample in samples:
        decisions, state = decide(sample, pol, state, env, ledger.records())
        for d in decisions:
            out.append((sample.time, d))
            outcome = ledger.apply(d, pol) if acting else Outcome(applied=False)
            state = core.after_outcome(state, d, outcome, sample.time)
    return out, state


def only(rule: Rule, **agent) -> Policy:
    return Policy(agent=replace(config.AgentSettings(), **agent), rules=(rule,))


GROW_THRESHOLD = Rule(name="t", action="raise_max", cooldown=1.0, trigger=Trigger(usage_at_least=0.75))
DEFAULT = config.loads(b"")


def ramp(table: Table, start: float, end: float, seconds: float, tick: float, t0: float = 0.0):
    """Count rising linearly from start to end (fractions of the table's max at t0)."""
    maximum = table.max
    steps = int(seconds / tick)
    for i in range(steps + 1):
        yield t0 + i * tick, int(maximum * (start + (end - start) * i / steps))


# ---------------------------------------------------------------------------- storms


def test_predictive_trigger_fires_before_the_threshold_in_a_storm():
    """Half to full in two seconds: the default policy acts while usage is still under 75%."""
    table = Table(100_000)
    table.sample(0.0, 50_000)      # calm: seeds the fill-rate tracker
    table.sample(0.25, 50_000)
    fired = None
    for t, count in ramp(table, 0.5, 1.0, 2.0, 0.05, t0=0.5):
        sample = table.sample(t, count)
        decisions, _ = decide(sample, DEFAULT, Memory(), ENV)
        if any(d.kind == "raise_max" for d in decisions):
            fired = sample
            break
    assert fired is not None
    assert fired.usage < 0.75, f"fired only at {fired.usage:.1%}"
    decision = next(d for d in decide(fired, DEFAULT, Memory(), ENV)[0] if d.kind == "raise_max")
    assert "predicted full" in decision.reason and decision.rule == "grow-table"


def test_threshold_only_policy_waits_for_the_threshold():
    table = Table(100_000)
    pol = only(GROW_THRESHOLD)
    first = None
    for t, count in ramp(table, 0.5, 1.0, 2.0, 0.05):
        decisions, _ = decide(table.sample(t, count), pol, Memory(), ENV)
        if decisions:
            first = count / table.max
            break
    assert first is not None and first >= 0.75


def test_storm_with_growth_never_reaches_full():
    """Applying the raises as the executor would: the table never fills."""
    table = Table(100_000)
    peak = 0.0
    state = Memory()
    ledger = Ledger(table)
    count = 50_000.0
    t = 0.0
    while t < 4.0:
        count += 25_000 * 0.05                      # +25k entries/s against an initial max of 100k
        sample = table.sample(t, int(count))
        peak = max(peak, sample.usage)
        decisions, state = decide(sample, DEFAULT, state, ENV, ledger.records())
        for d in decisions:
            state = core.after_outcome(state, d, ledger.apply(d, DEFAULT), sample.time)
        t += core.next_interval(sample, DEFAULT, state)
    assert peak < 0.9
    assert table.max > 100_000


def test_fast_tick_while_filling_calm_tick_when_idle():
    table = Table(100_000)
    idle = table.sample(0.0, 1000)
    idle = table.sample(0.25, 1000)
    # A quarter of the free room at the storm rate: 99000 / 4 / 100000 per second.
    assert core.next_interval(idle, DEFAULT, Memory()) == pytest.approx(0.2475)
    assert not core.under_pressure(idle, DEFAULT)     # a shorter calm tick is not pressure
    busy = table.sample(0.5, 60_000)
    assert core.next_interval(busy, DEFAULT, Memory()) == DEFAULT.agent.fast_interval
    assert core.under_pressure(busy, DEFAULT)


@pytest.mark.parametrize("maximum, count, expected", [
    (262_144, 0, 0.65536),      # the kernel's default max, empty: wakes ~1.5 times a second
    (4_194_304, 0, 1.0),        # a huge table: capped at agent.interval
    (8_192, 0, 0.05),           # a small table: never slower than needed, never faster than fast_interval
    (262_144, 120_000, 0.35536),
])
def test_calm_tick_follows_the_free_room(maximum, count, expected):
    table = Table(maximum)
    table.sample(0.0, count)
    sample = table.sample(1.0, count)
    assert core.next_interval(sample, DEFAULT, Memory()) == pytest.approx(expected)


def test_the_tick_after_a_busy_one_comes_when_the_next_threshold_is_crossed():
    # grow-table fires from 25% usage when the time to full is short: 8192 of 32768.
    fast = DEFAULT.agent.fast_interval
    table = Table(32_768)
    table.sample(0.0, 0)
    table.sample(0.05, 2560)                       # 51,200 entries/s
    far = table.sample(0.10, 5120)                 # the threshold 60 ms away: the fast tick
    assert core.under_pressure(far, DEFAULT)
    assert core.next_interval(far, DEFAULT, Memory()) == fast
    near = table.sample(0.15, 7680)                # 10 ms away: then, plus the margin
    assert core.next_interval(near, DEFAULT, Memory()) == pytest.approx(0.01 + core.PREDICTED_TICK_MARGIN)
    at = table.sample(0.16, 8150)                  # under a millisecond away: never sooner than the floor
    assert core.next_interval(at, DEFAULT, Memory()) == core.PREDICTED_TICK_FLOOR
    # The same count with the storm stopped (the latest slope is zero, though the average
    # still says filling): nothing will be crossed, the fast tick (the pressure's hold).
    stopped = table.sample(0.21, 8150)
    assert stopped.fill_rate > 0 and core.fast_interval(stopped, DEFAULT) == fast
    # The next threshold is the next rule's: shorten-timeouts' 90%, 5 ms away.
    toward_90 = table.sample(0.26, 27_500)
    assert core.next_interval(toward_90, DEFAULT, Memory()) == core.PREDICTED_TICK_FLOOR
    # Past every rule's threshold (usage 97%): nothing left to predict.
    past = table.sample(0.31, 31_800)
    assert core.next_interval(past, DEFAULT, Memory()) == fast


def test_a_namespace_near_a_threshold_is_read_again_when_it_is_crossed():
    # The sampler's pace for one of many namespaces predicts as the tick does.
    table = Table(32_768, netns="ns1")
    for t, count in ((0.0, 0), (0.05, 2560), (0.10, 5120)):
        view = table.sample(t, count).namespaces[0]
    assert core.namespace_interval(view, 32_768, DEFAULT) == DEFAULT.agent.fast_interval
    view = table.sample(0.15, 7680).namespaces[0]
    assert core.namespace_interval(view, 32_768, DEFAULT) == pytest.approx(0.01 + core.PREDICTED_TICK_MARGIN)


def test_a_storm_is_acted_on_close_after_its_threshold_whatever_the_tick_phase(monkeypatch):
    """The lag from the crossing to the raise, with the storm starting at every phase
    of the ticks: within the floor with the prediction, up to a fast tick without."""
    rate, maximum = 51_200.0, 32_768

    def lag(phase: float) -> float:
        crossing = 0.25 * maximum / rate + phase   # grow-table's 25% with a short time to full
        table, ledger, memory, t = Table(maximum), Ledger(), Memory(), 0.0
        while True:
            sample = table.sample(t, int(max(0.0, t - phase) * rate))
            found, memory = decide(sample, DEFAULT, memory, ENV, ledger.records())
            if any(d.kind == "raise_max" for d in found):
                return t - crossing
            t += core.next_interval(sample, DEFAULT, memory)

    phases = [i * 0.0025 for i in range(40)]       # over two fast ticks
    predicted = [lag(p) for p in phases]
    assert min(predicted) >= 0 and max(predicted) <= core.PREDICTED_TICK_FLOOR + core.PREDICTED_TICK_MARGIN
    monkeypatch.setattr(core, "_until_threshold", lambda view, maximum, rules: None)
    waited = [lag(p) for p in phases]
    assert min(waited) >= 0 and max(waited) > 0.8 * DEFAULT.agent.fast_interval


def test_a_storm_from_empty_is_seen_before_a_quarter_of_the_room_is_gone():
    """At the storm rate, the calm tick's first look comes before 25% of the room is used."""
    for maximum in (32_768, 262_144, 1_048_576):
        table = Table(maximum)
        idle = table.sample(0.0, 0)
        tick = core.next_interval(idle, DEFAULT, Memory())
        assert 100_000 * tick <= 0.25 * maximum + 1e-6


# ---------------------------------------------------------------------------- triggers


def test_sustained_duration_and_samples():
    rule = Rule(name="s", action="raise_max", cooldown=0,
                trigger=Trigger(usage_at_least=0.8, sustained=1.0, sustained_samples=3))
    table = Table(1000)
    fired_at = [t for t, d in run(only(rule), [table.sample(i * 0.25, 900) for i in range(8)])[0]]
    assert fired_at[0] == 1.0  # held for 1s (and >= 3 samples) since t=0


def test_a_dip_resets_sustained():
    rule = Rule(name="s", action="raise_max", cooldown=0, trigger=Trigger(usage_at_least=0.8, sustained=1.0))
    table = Table(1000)
    counts = [900, 900, 900, 500, 900, 900, 900, 900, 900]
    fired = run(only(rule), [table.sample(i * 0.25, c) for i, c in enumerate(counts)])[0]
    assert [t for t, _ in fired][0] == 2.0  # the dip at 0.75 restarted the clock at 1.0


def test_drop_counters_trigger_and_name_the_namespace():
    rule = Rule(name="d", action="raise_max", trigger=Trigger(counters_increasing=("drop",)))
    table = Table(1000, netns="web")
    samples = [table.sample(0, 10), table.sample(0.25, 10), table.sample(0.5, 10, drop=7)]
    fired = run(only(rule), samples)[0]
    assert len(fired) == 1
    _, decision = fired[0]
    assert "drop +7" in decision.reason and decision.netns == "web"


def test_match_all_needs_every_condition():
    rule = Rule(name="a", action="raise_max", cooldown=0,
                trigger=Trigger(match="all", usage_at_least=0.5, counters_increasing=("drop",)))
    table = Table(1000)
    fired = run(only(rule), [table.sample(0, 600), table.sample(0.25, 600), table.sample(0.5, 600, drop=1),
                             table.sample(0.75, 100, drop=1)])[0]
    assert [t for t, _ in fired] == [0.5]


def test_fullest_namespace_counts():
    a, b = Table(1000, netns="a"), Table(1000, netns="b")
    ra = model.Reading("a", 1.0, 100, 1000, 1000, {})
    rb = model.Reading("b", 1.0, 800, 1000, 1000, {})
    sample = model.combine((ra, rb), (a.tracker.update(ra), b.tracker.update(rb)))
    decisions, _ = decide(sample, only(GROW_THRESHOLD), Memory(), ENV)
    assert decisions[0].netns == "b" and "netns b" in decisions[0].reason


# ---------------------------------------------------------------------------- raise_max


def test_cooldown_limits_actions():
    table = Table(1000)
    samples = [table.sample(i * 0.1, 990) for i in range(25)]  # 2.4s of constant high usage
    fired = run(only(GROW_THRESHOLD), samples)[0]
    assert [round(t, 1) for t, _ in fired] == [0.0, 1.0, 2.0]


def test_raise_is_capped_by_the_absolute_ceiling():
    pol = replace(only(GROW_THRESHOLD), limits=replace(config.Limits(), max_ceiling=1500))
    table = Table(1000)
    (t, d), = run(pol, [table.sample(0, 900)])[0]
    assert (d.old, d.new) == (1000, 1500) and "limits.max_ceiling" in d.reason


def test_raise_is_capped_by_the_memory_budget():
    env = Environment(mem_total=64 << 20, entry_bytes=256)   # 64 MiB node, 5%: 3.2 MiB / 392 B
    expected = model.memory_ceiling(64 << 20, 0.05, 256, 128, 1.0)
    table = Table(6000)
    (t, d), = run(only(GROW_THRESHOLD), [table.sample(0, 5000)], env=env)[0]
    assert d.new == expected and expected < 12000 and "memory budget" in d.reason


def test_entry_bytes_override_from_policy():
    pol = replace(only(GROW_THRESHOLD), limits=replace(config.Limits(), entry_bytes=1000, memory_share=0.01))
    env = Environment(mem_total=GiB, entry_bytes=256)
    limit, _ = core.ceiling(pol, GROW_THRESHOLD, env)
    assert limit == int(GiB * 0.01 // (1000 + 128 + 8))


def test_at_ceiling_gives_one_notice_per_episode():
    pol = replace(only(GROW_THRESHOLD), limits=replace(config.Limits(), max_ceiling=1024))
    table = Table(1024)
    fired = run(pol, [table.sample(i * 1.0, 1000) for i in range(5)])[0]
    assert [d.kind for _, d in fired] == ["max_at_ceiling"]
    assert not fired[0][1].is_action


def test_raise_only_never_lowers_and_never_goes_below_count():
    pol = replace(only(replace(GROW_THRESHOLD, raise_max=config.RaiseMax(factor=1.1))),
                  limits=replace(config.Limits(), max_ceiling=1024))
    table = Table(2000)
    fired = run(pol, [table.sample(0, 1900)])[0]
    assert [d.kind for _, d in fired] == ["max_at_ceiling"]   # ceiling below current max: no lowering


def test_step_growth():
    rule = replace(GROW_THRESHOLD, raise_max=config.RaiseMax(factor=1.0, step=5000))
    table = Table(10_000)
    (t, d), = run(only(rule), [table.sample(0, 9000)])[0]
    assert d.new == 15_000


def test_action_cap_per_tick():
    rules = tuple(replace(GROW_THRESHOLD, name=f"r{i}") for i in range(3))
    pol = Policy(agent=replace(config.AgentSettings(), max_actions_per_tick=2), rules=rules)
    table = Table(1000)
    fired = run(pol, [table.sample(0, 900)])[0]
    assert len([d for _, d in fired if d.is_action]) == 2


def test_lost_capability_is_not_proposed():
    table = Table(1000)
    fired = run(only(GROW_THRESHOLD), [table.sample(0, 900)], state=Memory(lost=frozenset({("max", "")})))[0]
    assert fired == []


def test_buckets_follow_the_owned_max_with_their_own_cooldown():
    rule = replace(GROW_THRESHOLD, cooldown=0.0,
                   raise_max=config.RaiseMax(buckets_ratio=2.0, buckets_cooldown=10.0, headroom=0.0))
    table = Table(1000, buckets=500)
    fired = run(only(rule, max_actions_per_tick=4), (table.sample(i, int(table.max * 0.9)) for i in range(4)),
                apply=table)[0]
    kinds = [(t, d.kind, d.new) for t, d in fired]
    assert [k for k in kinds if k[1] == "raise_max"] == [(0, "raise_max", 2000), (1, "raise_max", 4000),
                                                         (2, "raise_max", 8000), (3, "raise_max", 16000)]
    resizes = [k for k in kinds if k[1] == "resize_buckets"]
    # Buckets follow the max the agent owns from the next tick; later raises wait for the 10s cooldown.
    assert resizes == [(1, "resize_buckets", 1000)]


def test_buckets_untouched_when_the_agent_owns_no_max():
    """kube-proxy's max = 4 × buckets is not the agent's business until it raises max."""
    rule = replace(GROW_THRESHOLD, raise_max=config.RaiseMax(buckets_ratio=1.0))
    table = Table(4000, buckets=1000)
    assert run(only(rule), [table.sample(0, 10)])[0] == []


# ---------------------------------------------------------------------------- external writers


OWNED_MAX = Owned("", "nf_conntrack_max", "raise_max", 4000, 8000, "t")


def test_external_change_backs_off_by_default():
    table = Table(5000)
    ledger = Ledger(owned=[OWNED_MAX])
    fired, state = run(only(GROW_THRESHOLD), [table.sample(0, 10)], ledger=ledger)
    assert [d.kind for _, d in fired] == ["external_change"]
    assert "8000 to 5000" in fired[0][1].reason and ledger.records() == ()


def test_external_change_reasserted_when_asked():
    table = Table(5000, buckets=8000)
    pol = only(GROW_THRESHOLD, on_external_change="reassert")
    ledger = Ledger(table, owned=[OWNED_MAX])
    fired, state = run(pol, [table.sample(0, 10)], ledger=ledger)
    assert [(d.kind, d.new) for _, d in fired] == [("external_change", 5000), ("raise_max", 8000)]
    assert [(o.applied, o.original) for o in ledger.records()] == [(8000, 4000)]


# ---------------------------------------------------------------------------- timeouts


TIMEOUTS = Rule(name="to", action="set_timeouts", cooldown=1.0,
                trigger=Trigger(usage_at_least=0.9),
                set_timeouts=config.SetTimeouts(values=(("udp_timeout", 10.0),), restore_after=60.0,
                                                restore_below=0.6))


def test_timeouts_set_once_then_restored_after_calm_hysteresis():
    table = Table(1000)
    samples = [table.sample(0, 950), table.sample(5, 950),      # pressure: set once
               table.sample(10, 500), table.sample(40, 500),    # calm for 30s
               table.sample(45, 700),                           # a blip above restore_below resets calm
               table.sample(50, 500), table.sample(100, 500), table.sample(110, 500)]
    fired = run(only(TIMEOUTS), samples, ledger=Ledger())[0]
    assert [(t, d.kind) for t, d in fired] == [(0, "set_timeouts"), (110, "restore_timeouts")]
    assert fired[0][1].timeouts == (("udp_timeout", 10.0),)


def test_drops_keep_timeouts_shortened():
    table = Table(1000)
    samples = [table.sample(0, 950), table.sample(10, 100), table.sample(100, 100, drop=3),
               table.sample(150, 100)]
    fired = run(only(TIMEOUTS), samples, ledger=Ledger())[0]
    assert [d.kind for _, d in fired] == ["set_timeouts"]  # drops at 100 restarted the calm clock


def test_max_restored_only_when_not_raise_only():
    rule = replace(GROW_THRESHOLD, raise_max=config.RaiseMax(raise_only=False, restore_after=10.0,
                                                             restore_below=0.5))
    env = ENV
    table = Table(1000)
    fired = run(only(rule), (table.sample(t, c) for t, c in ((0, 900), (5, 100), (16, 100))),
                env=env, apply=table)[0]
    assert [(d.kind, d.old, d.new) for _, d in fired if d.kind != "resize_buckets"] == [
        ("raise_max", 1000, 2000), ("restore_max", 2000, 1000)]
    table2 = Table(1000)
    fired = run(only(GROW_THRESHOLD), (table2.sample(t, c) for t, c in ((0, 900), (5, 100), (16, 100))),
                env=env, apply=table2)[0]
    assert [d.kind for _, d in fired if d.kind != "resize_buckets"] == ["raise_max"]


# ---------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("global_dry", [True, False])
def test_dry_run_makes_the_same_decisions(global_dry):
    table_a, table_b = Table(100_000), Table(100_000)
    real = DEFAULT
    dry = replace(DEFAULT, agent=replace(DEFAULT.agent, dry_run=True)) if global_dry else \
        replace(DEFAULT, rules=tuple(replace(r, dry_run=True) for r in DEFAULT.rules))
    counts = [50_000, 50_000, 60_000, 70_000, 80_000, 92_000, 95_000, 99_000]
    # The kernel is left as it is in both runs: the same readings must give the same decisions.
    real_out = run(real, [table_a.sample(i * 0.25, c, drop=1 if i == 6 else 0) for i, c in enumerate(counts)])[0]
    dry_out = run(dry, [table_b.sample(i * 0.25, c, drop=1 if i == 6 else 0) for i, c in enumerate(counts)])[0]
    strip = [(t, replace(d, dry_run=False)) for t, d in dry_out]
    assert strip == real_out and real_out
    assert all(d.dry_run for _, d in dry_out)


def test_decisions_name_rule_and_reason():
    table = Table(1000)
    fired = run(DEFAULT, [table.sample(0, 800)])[0]
    for _, d in fired:
        assert d.rule and d.reason


# ---------------------------------------------------------------------------- model


def test_fill_rate_ewma_and_time_to_full():
    tracker = model.FillTracker(window=0.5)
    view = None
    for i in range(40):  # 1000 entries/s for 2s
        view = tracker.update(model.Reading("", i * 0.05, 1000 + 50 * i, 100_000, 100_000, {}))
    assert view.fill_rate == pytest.approx(1000, rel=0.05)
    assert view.time_to_full == pytest.approx((100_000 - view.count) / view.fill_rate)


def test_counter_reset_counts_from_zero():
    tracker = model.FillTracker(window=0.5)
    tracker.update(model.Reading("", 0, 0, 10, 10, {"drop": 100}))
    view = tracker.update(model.Reading("", 1, 0, 10, 10, {"drop": 3}))
    assert view.deltas["drop"] == 3


def test_emptying_table_has_no_time_to_full():
    tracker = model.FillTracker(window=0.5)
    tracker.update(model.Reading("", 0, 1000, 2000, 2000, {}))
    view = tracker.update(model.Reading("", 1, 500, 2000, 2000, {}))
    assert view.fill_rate < 0 and view.time_to_full is None


def test_prediction_stops_when_the_storm_stops():
    """The EWMA lags a burst that has ended; the latest slope does not."""
    table = Table(100_000)
    for t, count in ramp(table, 0.1, 0.5, 1.0, 0.05):
        busy = table.sample(t, count)
    assert busy.time_to_full is not None and busy.time_to_full < 10
    still = table.sample(1.1, 50_000)          # the flood stopped
    assert still.fill_rate > 1000              # the average still remembers it...
    assert still.time_to_full is None          # ...but nothing predicts a fill any more
    decisions, _ = decide(still, DEFAULT, Memory(), ENV)
    assert decisions == []


def test_a_reading_just_before_acting_keeps_the_prediction():
    table = Table(100_000)
    for t, count in ramp(table, 0.3, 0.6, 1.0, 0.05):
        table.sample(t, count)
    again = table.sample(1.0 + 1e-5, 60_000)   # the re-read before acting, microseconds later
    assert again.time_to_full is not None and again.time_to_full < 10


def test_a_storm_faster_than_the_table_gets_room_for_the_headroom():
    """100k new entries/s against a max of 32768: doubling once per cooldown cannot keep up."""
    table = Table(32_768)
    table.sample(0.0, 1000)
    sample = table.sample(0.25, 26_000)                      # the calm tick that first sees the storm
    (decision,) = [d for d in decide(sample, DEFAULT, Memory(), ENV)[0] if d.kind == "raise_max"]
    rate = sample.fill_rate
    assert decision.new == math.ceil(26_000 + rate * 10.0) > 4 * 32_768
    assert "room for 10s" in decision.reason


def test_headroom_never_passes_the_ceiling():
    pol = replace(DEFAULT, limits=replace(config.Limits(), max_ceiling=50_000))
    table = Table(32_768)
    table.sample(0.0, 1000)
    (decision,) = [d for d in decide(table.sample(0.25, 26_000), pol, Memory(), ENV)[0] if d.kind == "raise_max"]
    assert decision.new == 50_000 and "limits.max_ceiling" in decision.reason


def test_a_sample_seen_against_a_raised_max():
    table = Table(10_000)
    table.sample(0.0, 5_000)
    sample = table.sample(0.5, 9_000)            # filling at ~8000/s (EWMA), nearly full
    raised = model.with_max(sample, 40_000)
    assert raised.max == 40_000 and raised.count == 9_000
    assert raised.usage == pytest.approx(0.225)
    assert raised.time_to_full == pytest.approx(31_000 / sample.fill_rate)
    assert raised.deltas is sample.deltas


def test_the_memory_ceiling_counts_every_namespace():
    """Entries in every namespace are kernel memory under the one budget: a raise is sized
    to what the others leave."""
    a, b = Table(10_000, netns="a"), Table(10_000, netns="b")
    ra = model.Reading("a", 1.0, 9_000, 10_000, 10_000, {})
    rb = model.Reading("b", 1.0, 8_000, 10_000, 10_000, {})
    sample = model.combine((ra, rb), (a.tracker.update(ra), b.tracker.update(rb)))
    env = Environment(mem_total=1 << 30, entry_bytes=256)        # 1 GiB: memory binds at ~140k
    pol = only(GROW_THRESHOLD)
    alone, _ = core.ceiling(pol, GROW_THRESHOLD, env)
    decision = next(d for d in decide(sample, pol, Memory(), env)[0] if d.kind == "raise_max")
    assert alone < 1_000_000                                      # the memory budget, not max_ceiling
    assert decision.new == 20_000                                  # ×2: well within what is left
    c, d = Table(100_000, netns="a"), Table(100_000, netns="b")
    big_a = model.Reading("a", 2.0, 30_000, 100_000, 100_000, {})
    big_b = model.Reading("b", 2.0, 80_000, 100_000, 100_000, {})
    crowded = model.combine((big_a, big_b), (c.tracker.update(big_a), d.tracker.update(big_b)))
    raise_for_b = next(x for x in decide(crowded, pol, Memory(), env)[0] if x.kind == "raise_max")
    # b is the fullest and ×2 would pass the budget; a's 30000 entries come off what b may have.
    assert raise_for_b.new == alone - 30_000 and "30000 entries held in other namespaces" in raise_for_b.reason

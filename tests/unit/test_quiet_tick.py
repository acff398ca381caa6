"""decide()'s quiet-tick shortcut (decisions.quiet) against the full loop (decisions._decide).

The shortcut returns ([], memory) without walking the rules; it is only allowed
where the full loop would return exactly that. These tests compare the two on
thousands of random samples, memories, owned records and policies, single ticks
and whole trajectories, and check that the comparison can catch a shortcut that
is taken where it must not be.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import List, Optional, Tuple

import pytest

from conntrack_agent import actions, config, model
from conntrack_agent import decisions as core
from conntrack_agent.config import Policy
from conntrack_agent.decisions import Environment, Memory, Owned, RuleMemory

ENV = Environment(mem_total=16 << 30, entry_bytes=256, namespaces=("", "web"))
DEFAULT = config.loads(b"")
COUNTERS = ("drop", "early_drop", "insert_failed", "clash_resolve", "chaintoolong")
# Values at, just under and just over every threshold of the shipped policy.
USAGES = (0.0, 0.1, 0.2499, 0.25, 0.2501, 0.4, 0.4999, 0.5, 0.6, 0.7499, 0.75, 0.8, 0.8999, 0.9, 0.95, 1.0)
TTFS = (None, None, None, 0.0, 5.0, 9.999, 10.0, 10.001, 59.0, 60.0, 61.0, 3600.0)


def policies() -> List[Policy]:
    rules = {r.name: r for r in DEFAULT.rules}
    evict_on = replace(rules["evict-stale"], enabled=True)
    all_match = replace(rules["grow-table"], trigger=replace(rules["grow-table"].trigger, match="all"))
    not_only = replace(rules["grow-table"], raise_max=replace(rules["grow-table"].raise_max, raise_only=False))
    no_usage = replace(rules["shorten-timeouts"], trigger=replace(rules["shorten-timeouts"].trigger,
                                                                    usage_at_least=None))
    swap = lambda *new: tuple(next((n for n in new if n.name == r.name), r) for r in DEFAULT.rules)  # noqa: E731
    return [
        DEFAULT,
        replace(DEFAULT, agent=replace(DEFAULT.agent, dry_run=True)),
        replace(DEFAULT, rules=swap(evict_on)),
        replace(DEFAULT, rules=swap(all_match, no_usage)),
        replace(DEFAULT, rules=swap(not_only)),
        replace(DEFAULT, rules=()),
    ]


def random_sample(rng: random.Random) -> model.Sample:
    maximum = rng.choice((1000, 262144))
    views = []
    for netns in rng.sample(ENV.namespaces, rng.randint(1, 2)):
        usage = rng.choice(USAGES)
        ttf = rng.choice(TTFS)
        deltas = {}
        if rng.random() < 0.4:
            deltas = {c: rng.choice((0, 0, 0, -1, 1, 7)) for c in rng.sample(COUNTERS, rng.randint(1, 3))}
        views.append(model.NamespaceView(netns, int(usage * maximum), usage, rng.choice((0.0, 10.0, 5000.0)),
                                         ttf, deltas))
    total = {}
    for v in views:
        for c, n in v.deltas.items():
            total[c] = total.get(c, 0) + n
    return model.Sample(time=rng.uniform(0, 10000), max=maximum, buckets=maximum, namespaces=tuple(views),
                        deltas=total)


def random_rule_memory(rng: random.Random, t: float) -> RuleMemory:
    rm = RuleMemory(last_fired=rng.choice((None, t - 1, t - 100, t - 5000)))
    if rng.random() < 0.5:   # at rest: only last_fired
        return rm
    field = rng.choice(("held_since", "held_samples", "active_since", "calm_since", "covered", "undo_retry_at"))
    value = {"held_samples": rng.randint(1, 3), "covered": frozenset({rng.choice(ENV.namespaces)})}.get(
        field, t - rng.choice((0.0, 1.0, 10.0, 4000.0)))
    return replace(rm, **{field: value})


def random_memory(rng: random.Random, policy: Policy, t: float) -> Memory:
    if rng.random() < 0.3:
        return Memory()
    names = [r.name for r in policy.rules] + ["renamed-away"]
    memory = Memory(rules={n: random_rule_memory(rng, t) for n in rng.sample(names, rng.randint(0, len(names)))})
    if rng.random() < 0.15:
        extra = rng.choice(("at_ceiling", "race_since", "race_quiet_since", "orphan_calm", "orphan_retry_at",
                            "lost", "buckets_changed"))
        value = {"at_ceiling": True, "orphan_calm": {("", "nf_conntrack_max"): t - 10},
                 "orphan_retry_at": {("", "nf_conntrack_max"): t + 1},
                 "lost": frozenset({("max", "")})}.get(extra, t - 10)
        memory = replace(memory, **{extra: value})
    return memory


def random_owned(rng: random.Random, t: float) -> Tuple[Owned, ...]:
    if rng.random() < 0.7:
        return ()
    choices = [
        Owned("", "nf_conntrack_max", "raise_max", 1000, 2000, "grow-table"),
        Owned("", "nf_conntrack_max", "raise_max", 1000, 2000, "grow-table", 3600.0, 0.5),
        Owned("", "nf_conntrack_buckets", "resize_buckets", 1000, 2000, "grow-table"),
        Owned("web", "nf_conntrack_udp_timeout", "set_timeouts", 30, 10, "shorten-timeouts", 600.0, 0.6),
        Owned("", "nf_conntrack_udp_timeout", "set_timeouts", 30, 10, "gone-rule", 600.0, 0.6),
        Owned("", "nf_conntrack_max", "raise_max", 1000, 2000, "grow-table", pending=True),
    ]
    return tuple(rng.sample(choices, rng.randint(1, 2)))


def compare(seed: int, cases: int) -> Tuple[int, int]:
    """(cases the shortcut took, cases it declined); asserts both paths agree on every one."""
    rng = random.Random(seed)
    pols = policies()
    took = declined = 0
    for i in range(cases):
        policy = rng.choice(pols)
        sample = random_sample(rng)
        memory = random_memory(rng, policy, sample.time)
        owned = random_owned(rng, sample.time)
        fast = core.decide(sample, policy, memory, ENV, owned)
        full = core._decide(sample, policy, memory, ENV, owned)
        assert fast == full, f"case {i} (seed {seed}): shortcut {fast} != full loop {full}\n{sample}\n{memory}"
        if core.quiet(sample, policy, memory, owned):
            took += 1
        else:
            declined += 1
    return took, declined


@pytest.mark.parametrize("seed", range(4))
def test_the_shortcut_returns_what_the_full_loop_returns(seed):
    took, declined = compare(seed, 2500)
    # Not vacuous: both paths are exercised, the shortcut on a good share of cases.
    assert took >= 250 and declined >= 250, (took, declined)


def test_the_comparison_catches_a_shortcut_taken_where_the_loop_acts(monkeypatch):
    monkeypatch.setattr(core, "quiet", lambda *args: True)
    with pytest.raises(AssertionError, match="shortcut"):
        compare(0, 2500)


def test_the_comparison_catches_a_shortcut_that_ignores_held_timers(monkeypatch):
    """A subtler mistake: forgetting that a trigger's held_since comes back to None."""
    real = core.quiet

    def careless(sample, policy, memory, owned):
        rest = Memory(rules={n: RuleMemory(last_fired=rm.last_fired) for n, rm in memory.rules.items()},
                      at_ceiling=memory.at_ceiling, race_since=memory.race_since,
                      orphan_calm=memory.orphan_calm, orphan_retry_at=memory.orphan_retry_at)
        return real(sample, policy, rest, owned)

    monkeypatch.setattr(core, "quiet", careless)
    with pytest.raises(AssertionError, match="shortcut"):
        compare(1, 2500)


def test_every_registered_action_declares_whether_it_may_be_skipped():
    # A new action inherits quiet_unowned = False: the shortcut then never skips its
    # rules until someone checks its watch/settle/follow_up and says so.
    assert {a.kind: a.quiet_unowned for a in actions.REGISTRY.values()} == {
        "set_timeouts": True, "raise_max": True, "resize_buckets": True, "evict": True}
    assert actions.base.Action.quiet_unowned is False


@pytest.mark.parametrize("seed", range(6))
def test_whole_trajectories_decide_the_same_with_and_without_the_shortcut(seed):
    """Storms and calm spells in turn, through the executor's bookkeeping (the ledger of
    test_decisions), the two cores side by side: same decisions, same memory, every tick."""
    from test_decisions import Ledger, Table

    rng = random.Random(100 + seed)
    policy = rng.choice(policies())
    table_a, table_b = Table(1000), Table(1000)
    ledger_a, ledger_b = Ledger(table_a), Ledger(table_b)
    mem_a = mem_b = Memory()
    t, count, quiet_ticks = 0.0, 0, 0
    for _ in range(1500):
        t += rng.choice((0.05, 0.25, 0.655, 1.0, 30.0, 700.0))
        count = max(0, min(table_a.max, count + rng.choice((0, 0, -50, 50, 200, -400, 600))))
        bumps = {c: 1 for c in COUNTERS[:3] if rng.random() < 0.03}
        sample_a = table_a.sample(t, count, **bumps)
        sample_b = table_b.sample(t, count, **bumps)
        assert sample_a == sample_b
        if core.quiet(sample_a, policy, mem_a, ledger_a.records()):
            quiet_ticks += 1
        found_a, mem_a = core.decide(sample_a, policy, mem_a, ENV, ledger_a.records())
        found_b, mem_b = core._decide(sample_b, policy, mem_b, ENV, ledger_b.records())
        assert found_a == found_b and mem_a == mem_b
        for d in found_a:
            mem_a = core.after_outcome(mem_a, d, ledger_a.apply(d, policy), t)
        for d in found_b:
            mem_b = core.after_outcome(mem_b, d, ledger_b.apply(d, policy), t)
    assert quiet_ticks > 0

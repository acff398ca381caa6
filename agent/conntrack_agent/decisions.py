"""The decision core: (sample, policy, memory, environment, owned) -> (decisions, new memory).

Theory of operation
-------------------
Each tick the service hands `decide` the newest `Sample` and the changes the
agent owns (its change journal, as `Owned` records). Then:

1. every action kind watches what it owns (the max someone else rewrote);
2. for every enabled rule, in policy order, its trigger is evaluated: each
   configured condition (usage held high, predicted time-to-full short, drop
   counters rising) yields a reason or nothing, and the rule's `match`
   ("any"/"all") combines them;
3. a rule that fired and is out of cooldown asks its action (actions/, one
   registry) for what to do, computed from the sample (raise max within the
   ceiling, shorten timeouts, evict);
4. a rule that did not fire may *settle*: its timeouts (and max when raise_only
   is off) come back to their originals once usage stayed below `restore_below`
   for `restore_after` with no drops — hysteresis, so a flapping load does not
   flap the settings;
5. changes that no enabled rule stands behind any more (the rule was disabled,
   renamed, removed or edited, at reload or while the agent was down) are
   *orphans*: each comes back once the table has been calm for the restore
   condition recorded with it (at once if none was recorded), the max only when
   the count fits the original.

Undo is driven by the journal, not by rule names: what is put back is exactly
what was recorded. At most `max_actions_per_tick` actions leave one tick; the
rest wait for the next. Notices (an owned value changed by someone else, the
ceiling reached) are not actions. Nothing here does I/O or reads a clock: time
is `sample.time`, so scenarios replay exactly in tests, and a dry run walks this
same path with only the executor declining to write.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

from . import actions
from .actions.base import (GLOBAL, Context, Decision, Environment, Memory, Outcome, Owned, RuleMemory,  # noqa: F401
                           calm)
from .actions.table_max import ceiling  # noqa: F401 - part of the core's API (tests, plan)
from .config import AgentSettings, Policy, Rule, Trigger, format_duration
from .model import NamespaceView, Sample

# ----------------------------------------------------------------------------- triggers


def _usage_holds(trigger: Trigger, fullest: NamespaceView) -> bool:
    return trigger.usage_at_least is not None and fullest.usage >= trigger.usage_at_least


def _filling_holds(trigger: Trigger, soonest: NamespaceView) -> bool:
    ttf = soonest.time_to_full
    return (trigger.time_to_full_below is not None and ttf is not None and ttf < trigger.time_to_full_below
            and soonest.usage >= trigger.time_to_full_min_usage)


def _evaluate_trigger(rule: Rule, sample: Sample, rule_memory: RuleMemory) -> Tuple[List[str], str, RuleMemory]:
    """Returns (reasons, netns named by the first reason, updated rule memory)."""
    trigger = rule.trigger
    results: List[Optional[str]] = []
    netns = sample.fullest.netns

    held_since, held_samples = rule_memory.held_since, rule_memory.held_samples
    if trigger.usage_at_least is not None:
        fullest = sample.fullest
        if _usage_holds(trigger, fullest):
            held_since = sample.time if held_since is None else held_since
            held_samples += 1
            held_for = sample.time - held_since
            if held_for >= trigger.sustained and held_samples >= trigger.sustained_samples:
                sustained = f" for {format_duration(round(held_for, 3))}" if trigger.sustained else ""
                results.append(f"usage {fullest.usage:.1%} >= {trigger.usage_at_least:.0%}{sustained} "
                               f"in {_ns(fullest.netns)}")
            else:
                results.append(None)
        else:
            held_since, held_samples = None, 0
            results.append(None)

    if trigger.time_to_full_below is not None:
        soonest = sample.soonest
        ttf = soonest.time_to_full
        if _filling_holds(trigger, soonest):
            if not any(results):
                netns = soonest.netns
            results.append(f"predicted full in {ttf:.1f}s < {format_duration(trigger.time_to_full_below)} "
                           f"(filling at {soonest.fill_rate:+.0f}/s, usage {soonest.usage:.1%}) "
                           f"in {_ns(soonest.netns)}")
        else:
            results.append(None)

    if trigger.counters_increasing:
        dropper = sample.busiest_dropper(trigger.counters_increasing)
        rising = {c: dropper.deltas.get(c, 0) for c in trigger.counters_increasing if dropper.deltas.get(c, 0) > 0}
        if rising:
            if not any(results):
                netns = dropper.netns
            results.append("kernel counters rising: " + ", ".join(f"{c} +{n}" for c, n in rising.items())
                           + f" in {_ns(dropper.netns)}")
        else:
            results.append(None)

    fired = all(results) if trigger.match == "all" else any(results)
    reasons = [r for r in results if r] if fired else []
    if held_since == rule_memory.held_since and held_samples == rule_memory.held_samples:
        return reasons, netns, rule_memory   # unchanged: no copy (this runs for every rule, every tick)
    return reasons, netns, replace(rule_memory, held_since=held_since, held_samples=held_samples)


def _ns(netns: str) -> str:
    return f"netns {netns}" if netns else "the agent's netns"


# ----------------------------------------------------------------------------- decide


def decide(sample: Sample, policy: Policy, memory: Memory, env: Environment,
           owned: Sequence[Owned] = ()) -> Tuple[List[Decision], Memory]:
    owned = tuple(owned)
    if quiet(sample, policy, memory, owned):
        # Most ticks of a node that needs no help: what the loop below would return
        # (tests/unit/test_decisions.py compares the two on random inputs).
        return [], memory
    return _decide(sample, policy, memory, env, owned)


def quiet(sample: Sample, policy: Policy, memory: Memory, owned: Tuple[Owned, ...]) -> bool:
    """Whether the full decide() provably proposes nothing and returns `memory` as it
    is: nothing owned, every timer at rest, and no condition of any enabled rule's
    trigger (nor of the insertion-race notice) holding.

    Then no watcher has a record to watch; every trigger yields no reason and leaves
    held_since/held_samples at None/0; every rule settles, with nothing owned and its
    memory at rest, to nothing (the contract of Action.quiet_unowned, which each rule's
    action must declare); orphans need records; the race notice needs a counter rising.
    last_fired may be anything: only a firing rule reads it. A quiet tick costs a few
    attribute reads instead of a Context, a trigger and a settle per rule (measured:
    the idle tick's largest part, BENCHMARKS.md)."""
    if (owned or memory.at_ceiling or memory.race_since is not None or memory.orphan_calm
            or memory.orphan_retry_at):
        return False
    for rm in memory.rules.values():
        if (rm.held_since is not None or rm.held_samples or rm.active_since is not None
                or rm.calm_since is not None or rm.covered or rm.undo_retry_at is not None):
            return False
    for action in actions.WATCHERS:
        if not action.quiet_unowned:
            return False
    fullest = sample.fullest
    soonest = sample.soonest
    counters = RACE_COUNTERS
    for rule in policy.active_rules():
        if not actions.get(rule.action).quiet_unowned:
            return False
        trigger = rule.trigger
        if _usage_holds(trigger, fullest) or _filling_holds(trigger, soonest):
            return False
        if trigger.counters_increasing:
            counters = counters + trigger.counters_increasing
    # Whichever namespace busiest_dropper() would pick, no counter of its rises.
    for ns in sample.namespaces:
        deltas = ns.deltas
        if deltas:
            for c in counters:
                if deltas.get(c, 0) > 0:
                    return False
    return True


def _decide(sample: Sample, policy: Policy, memory: Memory, env: Environment,
            owned: Tuple[Owned, ...]) -> Tuple[List[Decision], Memory]:
    """decide() without the quiet-tick shortcut: every action's watch, every rule."""
    decisions: List[Decision] = []
    actions_taken = 0
    budget = policy.agent.max_actions_per_tick

    def take(proposed: Sequence[Decision]) -> bool:
        """Adds what fits in this tick's budget; False if an action had to wait."""
        nonlocal actions_taken
        for d in proposed:
            if d.is_action:
                if actions_taken >= budget:
                    return False
                actions_taken += 1
            decisions.append(d)
        return True

    def context(**extra) -> Context:
        return Context(sample, policy, memory, env, owned, **extra)

    for action in actions.WATCHERS:
        proposed, memory = action.watch(context(dry_run=policy.agent.dry_run))
        take(proposed)
        # A backed-off change is no longer owned by the time the rules look.
        disowned = {(o.netns, o.name) for d in proposed if not d.is_action for o in d.restores}
        owned = tuple(o for o in owned if (o.netns, o.name) not in disowned)

    if memory.at_ceiling and sample.usage < 0.5:
        memory = replace(memory, at_ceiling=False)  # the episode is over; notice again next time

    for rule in policy.active_rules():
        action = actions.get(rule.action)
        before_trigger = memory.rule(rule.name)
        reasons, netns, rule_memory = _evaluate_trigger(rule, sample, before_trigger)
        if rule_memory is not before_trigger:
            memory = memory.with_rule(rule.name, rule_memory)
        dry_run = policy.agent.dry_run or rule.dry_run
        cooled = rule_memory.last_fired is None or sample.time - rule_memory.last_fired >= rule.cooldown
        if reasons:
            if cooled and actions_taken < budget:
                before = memory
                proposed, memory = action.fire(rule, context(dry_run=dry_run, reason="; ".join(reasons),
                                                             netns=netns))
                if not take(proposed):
                    memory = before
                elif any(d.is_action for d in proposed):
                    rule_memory = replace(memory.rule(rule.name), last_fired=sample.time, calm_since=None)
                    memory = memory.with_rule(rule.name, rule_memory)
            if memory.rule(rule.name).calm_since is not None:
                memory = memory.with_rule(rule.name, replace(memory.rule(rule.name), calm_since=None))
        else:
            current = memory.rule(rule.name)
            proposed, rule_memory = action.settle(rule, context(dry_run=dry_run), current)
            if take(proposed) and rule_memory is not current:
                memory = memory.with_rule(rule.name, rule_memory)
        follower = actions.FOLLOWERS.get(rule.action)
        if follower is not None:
            before = memory
            proposed, memory = follower.follow_up(rule, context(dry_run=dry_run))
            if not take(proposed):
                memory = before

    race, memory = _insert_races(sample, policy, memory)
    decisions.extend(race)
    orphan_decisions, memory = _orphans(sample, policy, memory, env, owned)
    for d in orphan_decisions:
        take([d])
    return decisions, memory


def _orphans(sample: Sample, policy: Policy, memory: Memory, env: Environment,
             owned: Tuple[Owned, ...]) -> Tuple[List[Decision], Memory]:
    """Changes no enabled rule stands behind: put back once their recorded calm holds."""
    if not owned and not memory.orphan_calm and not memory.orphan_retry_at:
        return [], memory
    rules = policy.active_rules()
    calm_since = dict(memory.orphan_calm)
    due: Dict[str, List[Owned]] = {}
    adopted: List[Decision] = []
    orphan_keys = set()
    for o in owned:
        if o.pending:
            continue
        action = actions.REGISTRY.get(o.action)
        if action is None or any(action.claims(rule, o, env) for rule in rules):
            continue
        key = (o.netns, o.name)
        adopter = action.adopter(o, rules, env)
        if adopter is not None:
            adopted.append(Decision(
                "change_adopted", adopter.name, f"rule {adopter.name!r} shortens {o.name} too; it takes the change "
                f"over from rule {o.rule!r}, which no longer stands behind it", o.netns, policy.agent.dry_run,
                o.applied, o.original, is_action=False, action=o.action, restores=(o,)))
            continue
        orphan_keys.add(key)
        if o.restore_below is not None and not calm(sample, o.restore_below):
            calm_since.pop(key, None)
            continue
        since = calm_since.setdefault(key, sample.time)
        if o.restore_after is not None and sample.time - since < o.restore_after:
            continue
        retry_at = memory.orphan_retry_at.get(key)
        if retry_at is not None and sample.time < retry_at:
            continue
        ctx = Context(sample, policy, memory, env, owned, dry_run=policy.agent.dry_run)
        if action.orphan_ready(o, ctx):
            due.setdefault(o.action, []).append(o)
    orphan_calm = {k: v for k, v in calm_since.items() if k in orphan_keys}
    orphan_retry_at = {k: v for k, v in memory.orphan_retry_at.items() if k in orphan_keys}
    # Most ticks (every tick of a storm, with the max owned) change neither: no new memory.
    if orphan_calm != memory.orphan_calm or orphan_retry_at != memory.orphan_retry_at:
        memory = replace(memory, orphan_calm=orphan_calm, orphan_retry_at=orphan_retry_at)
    if not due:
        return adopted, memory
    out: List[Decision] = adopted
    ctx = Context(sample, policy, memory, env, owned, dry_run=policy.agent.dry_run)
    for kind, records in due.items():
        out += actions.get(kind).undo_orphans(records, ctx)
    return out, memory


# An insertion-race episode ends after this long without insert_failed/clash_resolve.
RACE_EPISODE_GAP = 300.0
RACE_COUNTERS = ("insert_failed", "clash_resolve")


def _insert_races(sample: Sample, policy: Policy, memory: Memory) -> Tuple[List[Decision], Memory]:
    """insert_failed/clash_resolve rising while the table is not under pressure: the UDP
    insertion race (two packets of a new flow racing to insert it, e.g. the A and AAAA
    DNS queries glibc sends at once from one socket; Kubernetes issue #56903: 5 s DNS
    delays). A capacity change cannot help, so no rule acts on it by default; one
    notice per episode says what it is and what does help."""
    t = sample.time
    dropper = sample.busiest_dropper(RACE_COUNTERS)
    rising = {c: dropper.deltas.get(c, 0) for c in RACE_COUNTERS if dropper.deltas.get(c, 0) > 0}
    if rising and not under_pressure(sample, policy):
        if memory.race_since is not None:
            return [], replace(memory, race_quiet_since=None)
        counts = ", ".join(f"{c} +{n}" for c, n in rising.items())
        reason = (f"{counts} in {_ns(dropper.netns)} with the table at {dropper.usage:.1%}: conntrack "
                  "insertions are racing, the table is not full, and a larger max would not help. Typical cause: "
                  "two packets of one new UDP flow at once (glibc sends the A and AAAA DNS queries together from "
                  "one socket; Kubernetes #56903, 5 s DNS timeouts). Remedies: `options single-request-reopen` "
                  "(or use-vc) in resolv.conf, NodeLocal DNSCache, TCP for DNS")
        return ([Decision("insert_race", "", reason, dropper.netns, policy.agent.dry_run, is_action=False)],
                replace(memory, race_since=t, race_quiet_since=None))
    if memory.race_since is None:
        return [], memory
    quiet = memory.race_quiet_since if memory.race_quiet_since is not None else t
    if t - quiet >= RACE_EPISODE_GAP:
        return [], replace(memory, race_since=None, race_quiet_since=None)
    return [], replace(memory, race_quiet_since=quiet)


# ----------------------------------------------------------------------------- outcomes

# A failed undo (a namespace that cannot be entered, a refused write) is tried again after this.
UNDO_RETRY = 5.0


def after_outcome(memory: Memory, decision: Decision, outcome: Outcome, now: float) -> Memory:
    """Fold what the executor did back into the memory."""
    if outcome.lost:
        memory = replace(memory, lost=memory.lost | outcome.lost)
    if not decision.is_action or not decision.rule and not decision.undo:
        return memory
    rule_memory = memory.rule(decision.rule)
    if decision.undo:
        if outcome.failed:
            retry_at = now + UNDO_RETRY
            rule_memory = replace(rule_memory, undo_retry_at=retry_at)
            orphan_retry = dict(memory.orphan_retry_at)
            for o in decision.restores:
                orphan_retry[(o.netns, o.name)] = retry_at
            memory = replace(memory, orphan_retry_at=orphan_retry)
        else:
            rule_memory = replace(rule_memory, active_since=None, calm_since=None, covered=frozenset(),
                                  undo_retry_at=None)
        return memory.with_rule(decision.rule, rule_memory)
    done = outcome.done if not decision.dry_run else frozenset(decision.targets)
    if (outcome.applied or decision.dry_run) and decision.kind == "set_timeouts":
        rule_memory = replace(rule_memory, covered=rule_memory.covered | done,
                              active_since=rule_memory.active_since if rule_memory.active_since is not None
                              else now)
    return memory.with_rule(decision.rule, rule_memory)


# The calm tick lasts at most the time a storm at agent.storm_rate would need to fill
# this share of the free room: the first sample of a storm then still finds room to
# act in, on a small table as on a large one.
STORM_ROOM_SHARE = 0.25


def under_pressure(sample: Sample, policy: Policy) -> bool:
    """Busy, filling fast or dropping: what the fast tick (and the pressure event) is for."""
    return _busy(sample.usage, sample.time_to_full, sample.deltas, policy.agent)


def _busy(usage: float, ttf: Optional[float], deltas: Dict[str, int], agent: AgentSettings) -> bool:
    return (usage >= agent.fast_usage or (ttf is not None and ttf < agent.fast_time_to_full)
            or any(deltas.get(c, 0) for c in ("drop", "early_drop")))


# While the table fills, the fast tick's period is most of the reaction: a trigger
# crossed just after a tick waited for the next one, up to a whole fast tick (in
# bench/storm.py's runs the wait was 1-50 ms of a 6-60 ms reaction). The latest
# slope says when the next trigger threshold will be crossed, so the tick after a
# busy one comes then (plus a margin for the slope's noise) when that is sooner than
# the fast tick. The slope, not the averaged fill rate: at a storm's onset the
# average lags far behind (11,800/s against a real 51,000/s 135 ms into a storm), and
# once the storm stops the slope drops to zero at once where the average would keep
# predicting crossings. Never sooner than PREDICTED_TICK_FLOOR: a slope that
# over-predicts costs a few extra reads (at most one per floor), not a busy loop.
PREDICTED_TICK_FLOOR = 0.01
PREDICTED_TICK_MARGIN = 0.002


def _until_threshold(view: NamespaceView, maximum: int, rules: Sequence[Rule]) -> Optional[float]:
    """Seconds until, at the view's latest slope, the next usage or time-to-full threshold
    of these rules not yet crossed is crossed; None if none will be (or not filling)."""
    rate = view.slope
    if rate <= 0:
        return None
    ahead = []   # the counts at which a threshold not yet crossed will be
    for rule in rules:
        trigger = rule.trigger
        if trigger.usage_at_least is not None:
            ahead.append(trigger.usage_at_least * maximum)
        if trigger.time_to_full_below is not None:
            # ttf = (max - count) / rate < bound once count > max - bound x rate
            ahead.append(max(trigger.time_to_full_min_usage * maximum, maximum - trigger.time_to_full_below * rate))
    waits = [(at - view.count) / rate for at in ahead if at > view.count]
    return min(waits) if waits else None


def _fast(views: Sequence[NamespaceView], maximum: int, policy: Policy) -> float:
    """The fast tick, or sooner when the latest slope says a threshold is crossed sooner."""
    agent = policy.agent
    rules = policy.active_rules()
    waits = [w for w in (_until_threshold(v, maximum, rules) for v in views) if w is not None]
    if not waits:
        return agent.fast_interval
    return min(agent.fast_interval, max(min(PREDICTED_TICK_FLOOR, agent.fast_interval),
                                        min(waits) + PREDICTED_TICK_MARGIN))


def fast_interval(sample: Sample, policy: Policy) -> float:
    """The tick while under pressure: the fast tick, or the predicted crossing of the
    next threshold by the namespace filling soonest or the fullest, if sooner."""
    views = (sample.soonest,) if sample.soonest is sample.fullest else (sample.soonest, sample.fullest)
    return _fast(views, sample.max, policy)


def _calm(count: int, maximum: int, agent: AgentSettings) -> float:
    """A calm tick sized to the free room (see next_interval)."""
    calm = max(0, maximum - count) * STORM_ROOM_SHARE / agent.storm_rate
    return min(agent.interval, max(agent.fast_interval, calm))


def next_interval(sample: Optional[Sample], policy: Policy, memory: Memory) -> float:
    """The fast tick while the table is busy, filling fast or dropping. Otherwise a
    calm tick sized to the free room: a node with room for seconds of storm wakes
    rarely (the idle cost is per wake-up), a nearly full or small table is watched
    as closely as the fast tick. Restores wait minutes and need no fast tick."""
    agent = policy.agent
    if sample is None:
        return agent.interval
    if under_pressure(sample, policy):
        return fast_interval(sample, policy)
    return calm_interval(sample, policy)


def calm_interval(sample: Sample, policy: Policy) -> float:
    """next_interval() for a sample known not to be under pressure."""
    return _calm(sample.count, sample.max, policy.agent)


def namespace_busy(view: NamespaceView, policy: Policy) -> bool:
    """under_pressure() for one namespace's view: the sampler reads these first."""
    return _busy(view.usage, view.time_to_full, view.deltas, policy.agent)


def namespace_interval(view: NamespaceView, maximum: int, policy: Policy) -> float:
    """How soon one namespace needs reading again: the tick next_interval would pick were
    it the only one watched. The sampler reads a namespace no more often (unless its
    counters fall due), so with hundreds watched and one storming the fast tick re-reads
    the busy one every time and each calm one as often as its own free room asks."""
    if namespace_busy(view, policy):
        return _fast((view,), maximum, policy)
    return _calm(view.count, maximum, policy.agent)

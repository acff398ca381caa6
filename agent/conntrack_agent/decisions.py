"""The decision core: (sample, policy, state, environment) -> (decisions, new state).

Theory of operation
-------------------
Each tick the service hands `decide` the newest `Sample`. For every enabled rule,
in policy order:

1. its trigger is evaluated: each configured condition (usage held high, predicted
   time-to-full short, drop counters rising) yields a reason or nothing, and the
   rule's `match` ("any"/"all") combines them;
2. a rule that fired and is out of cooldown proposes one action, computed from the
   sample (raise max within the ceiling, shorten timeouts, evict);
3. rules that did not fire may still *undo*: timeouts (and max when raise_only is
   off) come back to their originals once usage stayed below `restore_below` for
   `restore_after` with no drops — hysteresis, so a flapping load does not flap
   the settings.

At most `max_actions_per_tick` actions leave one tick; the rest wait for the next.
Conditions worth telling an operator (an owned value changed by someone else, the
ceiling reached) come out as notices. Nothing here does I/O or reads a clock: time
is `sample.time`, so scenarios replay exactly in tests, and a dry run walks this
same path with only the executor declining to write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, FrozenSet, List, Optional, Tuple

from .config import Policy, Rule, format_duration
from .model import Sample, memory_ceiling

# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    kind: str            # see events.EVENTS for the kinds
    rule: str
    reason: str
    netns: str
    dry_run: bool = False
    old: Optional[int] = None
    new: Optional[int] = None
    timeouts: Tuple[Tuple[str, float], ...] = ()
    is_action: bool = True

    def describe(self) -> str:
        if self.old is not None and self.new is not None:
            return f"{self.kind} {self.old}→{self.new}"
        return self.kind


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RuleMemory:
    last_fired: Optional[float] = None
    held_since: Optional[float] = None    # usage condition true continuously since
    held_samples: int = 0
    active_since: Optional[float] = None  # temporary change in force (timeouts, max)
    calm_since: Optional[float] = None


@dataclass(frozen=True)
class Memory:
    rules: Dict[str, RuleMemory] = field(default_factory=dict)
    owned_max: Optional[int] = None       # the max the agent last wrote
    buckets_changed: Optional[float] = None
    at_ceiling: bool = False              # notice given for this pressure episode
    lost: FrozenSet[str] = frozenset()    # capabilities found unavailable: "max", "buckets", "timeouts", "evict"

    def rule(self, name: str) -> RuleMemory:
        return self.rules.get(name, RuleMemory())

    def with_rule(self, name: str, rule_state: RuleMemory) -> "Memory":
        rules = dict(self.rules)
        rules[name] = rule_state
        return replace(self, rules=rules)


@dataclass(frozen=True)
class Environment:
    """Facts about the node that the shell reads once and the core only uses."""

    mem_total: int                  # bytes
    entry_bytes: int                # per-entry slab object size
    originals: Dict[str, int] = field(default_factory=dict)  # sysctl name -> original (global ones)


CAPABILITY_OF = {"raise_max": "max", "restore_max": "max", "resize_buckets": "buckets",
                 "set_timeouts": "timeouts", "restore_timeouts": "timeouts", "evict": "evict"}


# ----------------------------------------------------------------------------- triggers


def _evaluate_trigger(rule: Rule, sample: Sample, rule_state: RuleMemory) -> Tuple[List[str], str, RuleMemory]:
    """Returns (reasons, netns named by the first reason, updated rule state)."""
    trigger = rule.trigger
    results: List[Optional[str]] = []
    netns = sample.fullest.netns

    held_since, held_samples = rule_state.held_since, rule_state.held_samples
    if trigger.usage_at_least is not None:
        fullest = sample.fullest
        if fullest.usage >= trigger.usage_at_least:
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
        if ttf is not None and ttf < trigger.time_to_full_below and soonest.usage >= trigger.time_to_full_min_usage:
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
    return reasons, netns, replace(rule_state, held_since=held_since, held_samples=held_samples)


def _ns(netns: str) -> str:
    return f"netns {netns}" if netns else "the agent's netns"


def _calm(rule: Rule, sample: Sample, restore_below: float) -> bool:
    counters = rule.trigger.counters_increasing or ("drop",)
    return sample.usage < restore_below and not any(sample.deltas.get(c, 0) for c in counters)


# ----------------------------------------------------------------------------- actions


def ceiling(policy: Policy, rule: Rule, env: Environment) -> Tuple[int, str]:
    """The highest max allowed, and which limit sets it."""
    limits = policy.limits
    entry = limits.entry_bytes or env.entry_bytes
    by_memory = memory_ceiling(env.mem_total, limits.memory_share, entry, limits.entry_overhead_bytes,
                               rule.raise_max.buckets_ratio)
    if by_memory < limits.max_ceiling:
        return by_memory, (f"memory budget {limits.memory_share:.1%} of {env.mem_total >> 20} MiB at "
                           f"{entry + limits.entry_overhead_bytes} B/entry")
    return limits.max_ceiling, "limits.max_ceiling"


def _raise_max(rule: Rule, policy: Policy, sample: Sample, env: Environment, state: Memory,
               reason: str, netns: str, dry_run: bool) -> Tuple[Optional[Decision], Memory]:
    spec = rule.raise_max
    current = sample.max
    target = max(math.ceil(current * spec.factor), current + spec.step)
    rate = sample.fill_rate
    room_for_storm = math.ceil(sample.count + rate * spec.headroom) if rate > 0 else 0
    limit, limited_by = ceiling(policy, rule, env)
    new = max(min(max(target, room_for_storm), limit), sample.count)
    if new <= current:
        if state.at_ceiling:
            return None, state
        notice = Decision("max_at_ceiling", rule.name, f"{reason}; but max {current} is already at or above "
                          f"the ceiling {limit} ({limited_by})", netns, dry_run, current, limit, is_action=False)
        return notice, replace(state, at_ceiling=True)
    if room_for_storm > target:
        why = f"{reason}; room for {format_duration(spec.headroom)} at {rate:+.0f}/s"
        target = room_for_storm
    else:
        why = f"{reason}; max ×{spec.factor:g}" + (f" +{spec.step}" if spec.step else "")
    if new < target:
        why += f", capped at {new} by {limited_by}"
    return Decision("raise_max", rule.name, why, netns, dry_run, current, new), state


def _buckets(rule: Rule, sample: Sample, state: Memory, dry_run: bool) -> Optional[Decision]:
    """Buckets follow the max the agent set, never shrink, and change rarely: a
    resize rehashes the whole table under the global lock."""
    if state.owned_max is None or "buckets" in state.lost:
        return None
    spec = rule.raise_max
    wanted = math.ceil(state.owned_max / spec.buckets_ratio)
    if wanted <= sample.buckets:
        return None
    if state.buckets_changed is not None and sample.time - state.buckets_changed < spec.buckets_cooldown:
        return None
    reason = (f"max {state.owned_max} over {sample.buckets} buckets is {state.owned_max / sample.buckets:.1f} "
              f"entries a bucket; the policy wants {spec.buckets_ratio:g}")
    return Decision("resize_buckets", rule.name, reason, "", dry_run, sample.buckets, wanted)


# ----------------------------------------------------------------------------- decide


def decide(sample: Sample, policy: Policy, state: Memory, env: Environment) -> Tuple[List[Decision], Memory]:
    decisions: List[Decision] = []
    actions = 0
    budget = policy.agent.max_actions_per_tick

    def room() -> bool:
        return actions < budget

    # Someone else wrote a max the agent owns (kube-proxy at start, `sysctl --system`).
    if state.owned_max is not None and sample.max != state.owned_max:
        reassert = policy.agent.on_external_change == "reassert" and sample.max < state.owned_max
        note = (f"nf_conntrack_max changed from {state.owned_max} to {sample.max} by another writer; "
                + ("re-asserting the agent's value" if reassert else "backing off: the agent no longer owns it"))
        decisions.append(Decision("external_change", "", note, "", policy.agent.dry_run, state.owned_max,
                                  sample.max, is_action=False))
        if reassert and "max" not in state.lost:
            decisions.append(Decision("raise_max", "", "re-asserting the max the agent set", "",
                                      policy.agent.dry_run, sample.max, state.owned_max))
            actions += 1
        else:
            state = replace(state, owned_max=None)

    if state.at_ceiling and sample.usage < 0.5:
        state = replace(state, at_ceiling=False)  # the episode is over; notice again next time

    for rule in policy.active_rules():
        rule_state = state.rule(rule.name)
        reasons, netns, rule_state = _evaluate_trigger(rule, sample, rule_state)
        dry_run = policy.agent.dry_run or rule.dry_run
        capability = CAPABILITY_OF[rule.action]
        cooled = rule_state.last_fired is None or sample.time - rule_state.last_fired >= rule.cooldown
        reason = "; ".join(reasons)

        if reasons and cooled and room() and capability not in state.lost:
            decision: Optional[Decision] = None
            if rule.action == "raise_max":
                decision, state = _raise_max(rule, policy, sample, env, state, reason, netns, dry_run)
            elif rule.action == "set_timeouts":
                already = rule_state.active_since is not None
                if not already:
                    decision = Decision("set_timeouts", rule.name, reason, netns, dry_run,
                                        timeouts=rule.set_timeouts.values)
            elif rule.action == "evict":
                decision = Decision("evict", rule.name, reason, netns, dry_run)
            if decision is not None:
                decisions.append(decision)
                if decision.is_action:
                    actions += 1
                    rule_state = replace(rule_state, last_fired=sample.time)
                    if decision.kind in ("set_timeouts", "raise_max") and rule_state.active_since is None:
                        rule_state = replace(rule_state, active_since=sample.time)
            if rule_state.active_since is not None:
                rule_state = replace(rule_state, calm_since=None)
        elif rule_state.active_since is not None and not reasons:
            decision, rule_state = _maybe_restore(rule, sample, rule_state, env, dry_run, room())
            if decision is not None:
                decisions.append(decision)
                actions += 1

        if rule.action == "raise_max" and room():
            resize = _buckets(rule, sample, state, dry_run)
            if resize is not None:
                decisions.append(resize)
                actions += 1
                state = replace(state, buckets_changed=sample.time)
        state = state.with_rule(rule.name, rule_state)
    return decisions, state


def _maybe_restore(rule: Rule, sample: Sample, rule_state: RuleMemory, env: Environment, dry_run: bool,
                   room: bool) -> Tuple[Optional[Decision], RuleMemory]:
    if rule.action == "set_timeouts":
        after, below = rule.set_timeouts.restore_after, rule.set_timeouts.restore_below
    elif rule.action == "raise_max" and not rule.raise_max.raise_only:
        after, below = rule.raise_max.restore_after, rule.raise_max.restore_below
    else:
        return None, replace(rule_state, active_since=None)
    if not _calm(rule, sample, below):
        return None, replace(rule_state, calm_since=None)
    calm_since = rule_state.calm_since if rule_state.calm_since is not None else sample.time
    rule_state = replace(rule_state, calm_since=calm_since)
    calm_for = sample.time - calm_since
    if calm_for < after or not room:
        return None, rule_state
    reason = (f"usage {sample.usage:.1%} below {below:.0%} with no drops for {format_duration(round(calm_for))}; "
              f"restoring the originals")
    if rule.action == "set_timeouts":
        decision = Decision("restore_timeouts", rule.name, reason, sample.fullest.netns, dry_run,
                            timeouts=rule.set_timeouts.values)
    else:
        original = env.originals.get("nf_conntrack_max")
        if original is None or original >= sample.max:
            return None, replace(rule_state, active_since=None, calm_since=None)
        if sample.count >= below * original:
            return None, rule_state  # the original would be too tight for today's table
        decision = Decision("restore_max", rule.name, reason, "", dry_run, sample.max, original)
    return decision, replace(rule_state, active_since=None, calm_since=None, last_fired=sample.time)


# ----------------------------------------------------------------------------- outcomes


def after_outcome(state: Memory, decision: Decision, applied: bool, lost_capability: bool) -> Memory:
    """Fold what the executor did back into the state."""
    if lost_capability:
        state = replace(state, lost=state.lost | {CAPABILITY_OF.get(decision.kind, decision.kind)})
    if not applied:
        return state
    if decision.kind == "raise_max":
        return replace(state, owned_max=decision.new)
    if decision.kind == "restore_max":
        return replace(state, owned_max=None)
    return state


# The calm tick lasts at most the time a storm at agent.storm_rate would need to fill
# this share of the free room: the first sample of a storm then still finds room to
# act in, on a small table as on a large one.
STORM_ROOM_SHARE = 0.25


def under_pressure(sample: Sample, policy: Policy) -> bool:
    """Busy, filling fast or dropping: what the fast tick (and the pressure event) is for."""
    agent = policy.agent
    ttf = sample.time_to_full
    return (sample.usage >= agent.fast_usage
            or (ttf is not None and ttf < agent.fast_time_to_full)
            or any(sample.deltas.get(c, 0) for c in ("drop", "early_drop")))


def next_interval(sample: Optional[Sample], policy: Policy, state: Memory) -> float:
    """The fast tick while the table is busy, filling fast or dropping. Otherwise a
    calm tick sized to the free room: a node with room for seconds of storm wakes
    rarely (the idle cost is per wake-up), a nearly full or small table is watched
    as closely as the fast tick. Restores wait minutes and need no fast tick."""
    agent = policy.agent
    if sample is None:
        return agent.interval
    if under_pressure(sample, policy):
        return agent.fast_interval
    room = max(0, sample.max - sample.count)
    calm = room * STORM_ROOM_SHARE / agent.storm_rate
    return min(agent.interval, max(agent.fast_interval, calm))

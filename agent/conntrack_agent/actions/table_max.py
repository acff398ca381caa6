"""raise_max: raise nf_conntrack_max within the memory ceiling; put it back when allowed.

The max only grows while a rule with `raise_only = true` (the default) stands
behind it. With `raise_only = false` it returns to its original after the calm
period, and a raised max whose rule is gone returns once the count fits the
original with room to spare. Never above the ceiling, never below the count.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from .. import events
from ..config import Policy, Rule, format_duration
from ..model import memory_ceiling
from . import register
from .base import (GLOBAL, Action, Context, Decision, Environment, Memory, Outcome, Owned, RuleMemory, Shell,
                   calm_long_enough)
from .sysctl_change import put_back, write

NAME = "nf_conntrack_max"

# A raised max whose rule is gone goes back only once the count is below this share
# of the original (when its record carries no restore_below): the original must
# still leave room for today's table.
ORPHAN_RESTORE_BELOW = 0.5

events.register("raise_max", events.EventKind(
    "5c4a891b4b874fd1ad5a285521dab566", events.INFO, "{verb} nf_conntrack_max from {old} to {new}: {reason}",
    verbs=("raised", "would raise"), old_new=("CT_MAX_OLD", "CT_MAX_NEW")))
events.register("restore_max", events.EventKind(
    "0e312ff4c36e472cae1acf66c797d837", events.INFO,
    "{verb} nf_conntrack_max from {old} back to its original {new}: {reason}",
    verbs=("restored", "would restore"), old_new=("CT_MAX_OLD", "CT_MAX_NEW")))
events.register("max_at_ceiling", events.EventKind(
    "db5ce1d24afd4b1fb34c74aa64c4df8b", events.WARNING, "cannot raise nf_conntrack_max any further: {reason}"))


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


class RaiseMax(Action):
    kind = "raise_max"
    capability = "max"
    undo_kind = "restore_max"
    sysctls = (NAME,)
    quiet_unowned = True   # watch, settle and the buckets' follow-up all start from the owned max

    # ------------------------------------------------------------------ pure

    def watch(self, ctx: Context) -> Tuple[List[Decision], Memory]:
        """Someone else wrote a max the agent owns (kube-proxy at start, `sysctl --system`)."""
        owned = ctx.owned_value(GLOBAL, NAME)
        sample, agent = ctx.sample, ctx.policy.agent
        if owned is None or sample.max == owned.applied:
            return [], ctx.memory
        reassert = agent.on_external_change == "reassert" and sample.max < owned.applied
        note = (f"nf_conntrack_max changed from {owned.applied} to {sample.max} by another writer; "
                + ("re-asserting the agent's value" if reassert else "backing off: the agent no longer owns it"))
        if reassert and not ctx.memory.has_lost(self.capability):
            return [Decision("external_change", "", note, "", agent.dry_run, owned.applied, sample.max,
                             is_action=False),
                    Decision("raise_max", owned.rule, "re-asserting the max the agent set", "", agent.dry_run,
                             sample.max, owned.applied, action=self.kind)], ctx.memory
        # Backing off: the record goes, and with it any claim to restore it.
        return [Decision("external_change", "", note, "", agent.dry_run, owned.applied, sample.max,
                         is_action=False, restores=(owned,))], ctx.memory

    def fire(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        spec, sample, memory = rule.raise_max, ctx.sample, ctx.memory
        if memory.has_lost(self.capability):
            return [], memory
        current = sample.max
        target = max(math.ceil(current * spec.factor), current + spec.step)
        rate = sample.fill_rate
        room_for_storm = math.ceil(sample.count + rate * spec.headroom) if rate > 0 else 0
        limit, limited_by = ceiling(ctx.policy, rule, ctx.env)
        others = sum(ns.count for ns in sample.namespaces) - sample.count
        if others > 0 and limited_by.startswith("memory"):
            # Every namespace's entries are kernel memory under the one budget: what the
            # others hold is not there for the fullest one to grow into.
            limit = max(sample.count, limit - others)
            limited_by += f", {others} entries held in other namespaces"
        new = max(min(max(target, room_for_storm), limit), sample.count)
        if new <= current:
            if memory.at_ceiling:
                return [], memory
            notice = Decision("max_at_ceiling", rule.name, f"{ctx.reason}; but max {current} is already at or "
                              f"above the ceiling {limit} ({limited_by})", ctx.netns, ctx.dry_run, current, limit,
                              is_action=False)
            return [notice], replace(memory, at_ceiling=True)
        if room_for_storm > target:
            why = f"{ctx.reason}; room for {format_duration(spec.headroom)} at {rate:+.0f}/s"
            target = room_for_storm
        else:
            why = f"{ctx.reason}; max ×{spec.factor:g}" + (f" +{spec.step}" if spec.step else "")
        if new < target:
            why += f", capped at {new} by {limited_by}"
        return [Decision("raise_max", rule.name, why, ctx.netns, ctx.dry_run, current, new, action=self.kind)], memory

    def settle(self, rule: Rule, ctx: Context, rule_memory: RuleMemory) -> Tuple[List[Decision], RuleMemory]:
        spec, sample = rule.raise_max, ctx.sample
        owned = ctx.owned_value(GLOBAL, NAME)
        if spec.raise_only or owned is None or owned.rule != rule.name:
            return [], (rule_memory if rule_memory.calm_since is None else replace(rule_memory, calm_since=None))
        due, rule_memory, calm_for = calm_long_enough(rule, sample, rule_memory, spec.restore_below,
                                                      spec.restore_after)
        if not due:
            return [], rule_memory
        if owned.original >= sample.max or sample.count >= spec.restore_below * owned.original:
            return [], rule_memory  # the original would be too tight for today's table
        reason = (f"usage {sample.usage:.1%} below {spec.restore_below:.0%} with no drops for "
                  f"{format_duration(round(calm_for))}; restoring the original")
        return [Decision("restore_max", rule.name, reason, "", ctx.dry_run, sample.max, owned.original,
                         action=self.kind, undo=True, restores=(owned,))], rule_memory

    def follow_up(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        from . import REGISTRY  # buckets register after this module
        return REGISTRY["resize_buckets"].follow(rule, ctx)

    def orphan_ready(self, owned: Owned, ctx: Context) -> bool:
        below = owned.restore_below if owned.restore_below is not None else ORPHAN_RESTORE_BELOW
        return ctx.sample.count < below * owned.original

    def undo_orphans(self, orphans: Sequence[Owned], ctx: Context) -> List[Decision]:
        owned = orphans[0]
        reason = (f"rule {owned.rule!r} no longer raises the max (disabled, renamed or removed) and "
                  f"{ctx.sample.count} entries fit the original {owned.original}; restoring it")
        return [Decision("restore_max", owned.rule, reason, "", ctx.dry_run, ctx.sample.max, owned.original,
                         action=self.kind, undo=True, restores=(owned,))]

    # ------------------------------------------------------------------ shell

    def apply(self, decision: Decision, shell: Shell) -> Outcome:
        rule = shell.rule(decision.rule)
        spec = rule.raise_max if rule is not None and rule.action == self.kind else None
        fields = dict(shell.fields, old=decision.old, new=decision.new)
        if decision.dry_run:
            shell.emit(decision.kind, True, **fields)
            return Outcome(applied=False)
        try:
            before, after = write(shell, decision, GLOBAL, NAME, decision.new, self.kind,
                                  None if spec is None or spec.raise_only else spec.restore_after,
                                  None if spec is None or spec.raise_only else spec.restore_below)
        except OSError as exc:
            return shell.failed(decision, exc, GLOBAL, shell.kernel.sysctl_path(NAME), self.capability,
                                shell.kernel.is_permanent(exc))
        shell.emit(decision.kind, False, **dict(fields, old=before, new=after))
        return Outcome(applied=True, done=frozenset({GLOBAL}))

    def undo(self, decision: Decision, shell: Shell) -> Outcome:
        return undo_global(self, decision, shell)


def undo_global(action: Action, decision: Decision, shell: Shell) -> Outcome:
    """Put back one global value (max or buckets) from its record."""
    fields = dict(shell.fields, old=decision.old, new=decision.new)
    try:
        result: Optional[str] = None
        for owned in decision.restores:
            result = put_back(shell, decision, owned)
    except OSError as exc:
        return shell.failed(decision, exc, GLOBAL, shell.kernel.sysctl_path(action.sysctls[0]), action.capability,
                            shell.kernel.is_permanent(exc))
    if result == "restored" or decision.dry_run:
        shell.emit(decision.kind, decision.dry_run, **fields)
    return Outcome(applied=not decision.dry_run, done=frozenset({GLOBAL}))


register(RaiseMax())

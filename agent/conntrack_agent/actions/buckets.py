"""resize_buckets: the hash buckets follow the max the agent set, rarely.

A resize rehashes the whole table under the global conntrack locks, so buckets
never shrink while a rule owns the max, change at most once per
`buckets_cooldown`, and are proposed by the raise_max rule that owns the max
(not by a trigger of their own). Buckets whose rule is gone go back only after
the max they served has gone back.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Sequence, Tuple

from .. import events
from ..config import Rule
from . import register
from .base import GLOBAL, Action, Context, Decision, Memory, Outcome, Owned, Shell
from .sysctl_change import write
from .table_max import NAME as MAX_NAME, undo_global

NAME = "nf_conntrack_buckets"

# Orphaned buckets (their rule is gone) wait this long after the agent's last resize.
ORPHAN_COOLDOWN = 60.0

events.register("resize_buckets", events.EventKind(
    "8b1aa553e229400e90d353f5371a7bcc", events.INFO, "{verb} nf_conntrack_buckets from {old} to {new}: {reason}",
    verbs=("resized", "would resize"), old_new=("CT_BUCKETS_OLD", "CT_BUCKETS_NEW")))
events.register("restore_buckets", events.EventKind(
    "4e0c6b1f2a7d4c0e9f5b8a3d6c2e1f07", events.INFO,
    "{verb} nf_conntrack_buckets from {old} back to its original {new}: {reason}",
    verbs=("restored", "would restore"), old_new=("CT_BUCKETS_OLD", "CT_BUCKETS_NEW")))


class ResizeBuckets(Action):
    kind = "resize_buckets"
    capability = "buckets"
    undo_kind = "restore_buckets"
    sysctls = (NAME,)
    quiet_unowned = True   # no watch, settle or follow-up of its own (follow() is the max's)

    def follow(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        """Called by the raise_max rule every tick: buckets for the max it owns."""
        owned_max = ctx.owned_value(GLOBAL, MAX_NAME)
        memory, sample = ctx.memory, ctx.sample
        if owned_max is None or owned_max.rule != rule.name or memory.has_lost(self.capability):
            return [], memory
        spec = rule.raise_max
        wanted = math.ceil(owned_max.applied / spec.buckets_ratio)
        if wanted <= sample.buckets:
            return [], memory
        if memory.buckets_changed is not None and sample.time - memory.buckets_changed < spec.buckets_cooldown:
            return [], memory
        reason = (f"max {owned_max.applied} over {sample.buckets} buckets is "
                  f"{owned_max.applied / sample.buckets:.1f} entries a bucket; the policy wants {spec.buckets_ratio:g}")
        return ([Decision("resize_buckets", rule.name, reason, "", ctx.dry_run, sample.buckets, wanted,
                          action=self.kind)],
                replace(memory, buckets_changed=sample.time))

    def fire(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        """A resize_buckets rule fired (chaintoolong rising in the default policy): more
        buckets, within the memory ceiling of the max, at most once per the rule's cooldown."""
        memory, sample = ctx.memory, ctx.sample
        if memory.has_lost(self.capability):
            return [], memory
        from .table_max import ceiling
        limit, limited_by = ceiling(ctx.policy, rule, ctx.env)
        wanted = min(math.ceil(sample.buckets * rule.resize_buckets.factor), limit)
        if wanted <= sample.buckets:
            return [], memory
        reason = f"{ctx.reason}; buckets ×{rule.resize_buckets.factor:g}"
        if wanted < math.ceil(sample.buckets * rule.resize_buckets.factor):
            reason += f", capped at {wanted} by {limited_by}"
        return ([Decision("resize_buckets", rule.name, reason, "", ctx.dry_run, sample.buckets, wanted,
                          action=self.kind)],
                replace(memory, buckets_changed=sample.time))

    def claims(self, rule: Rule, owned: Owned, env) -> bool:
        return rule.name == owned.rule and rule.action in ("raise_max", self.kind)

    def orphan_ready(self, owned: Owned, ctx: Context) -> bool:
        changed = ctx.memory.buckets_changed
        return (ctx.owned_value(GLOBAL, MAX_NAME) is None and owned.original < ctx.sample.buckets
                and (changed is None or ctx.sample.time - changed >= ORPHAN_COOLDOWN))

    def undo_orphans(self, orphans: Sequence[Owned], ctx: Context) -> List[Decision]:
        owned = orphans[0]
        reason = (f"rule {owned.rule!r} no longer owns the max these buckets served; restoring the original")
        return [Decision("restore_buckets", owned.rule, reason, "", ctx.dry_run, ctx.sample.buckets, owned.original,
                         action=self.kind, undo=True, restores=(owned,))]

    def apply(self, decision: Decision, shell: Shell) -> Outcome:
        fields = dict(shell.fields, old=decision.old, new=decision.new)
        if decision.dry_run:
            shell.emit(decision.kind, True, **fields)
            return Outcome(applied=False)
        try:
            before, after = write(shell, decision, GLOBAL, NAME, decision.new, self.kind)
        except OSError as exc:
            return shell.failed(decision, exc, GLOBAL, shell.kernel.sysctl_path(NAME), self.capability,
                                shell.kernel.is_permanent(exc))
        shell.emit(decision.kind, False, **dict(fields, old=before, new=after))
        return Outcome(applied=True, done=frozenset({GLOBAL}))

    def undo(self, decision: Decision, shell: Shell) -> Outcome:
        return undo_global(self, decision, shell)


register(ResizeBuckets())

"""set_timeouts: shorten conntrack timeouts under pressure, put them back once calm.

Timeouts are per network namespace: the action writes each watched namespace
that has not got them yet (`targets`) and remembers where they are in force
(`RuleMemory.covered`), so a namespace that failed is tried again after the
cooldown while the others stay shortened. Values are only ever shortened: a
timeout already at or below the target (someone else's choice) is left alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

from .. import events
from ..config import Rule, format_duration
from . import register
from .base import Action, Context, Decision, Memory, Outcome, Owned, RuleMemory, Shell, calm_long_enough, netns_label
from .sysctl_change import put_back, write

PREFIX = "nf_conntrack_"

events.register("set_timeouts", events.EventKind(
    "d11e3d047acb4be6bfa77e2dea8ca0c1", events.INFO,
    "{verb} shortened conntrack timeouts in {netns_label} ({changes}): {reason}",
    verbs=("", "would have")))
events.register("restore_timeouts", events.EventKind(
    "3bb9e87f21bd401b99db5563d8b51b67", events.INFO,
    "{verb} restored conntrack timeouts in {netns_label} ({changes}): {reason}",
    verbs=("", "would have")))


class SetTimeouts(Action):
    kind = "set_timeouts"
    capability = "timeouts"
    undo_kind = "restore_timeouts"
    quiet_unowned = True   # settle starts from the rule's records, covered and active_since

    # ------------------------------------------------------------------ pure

    def fire(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        covered = ctx.memory.rule(rule.name).covered
        targets = tuple(ns for ns in ctx.env.namespaces
                        if ns not in covered and not ctx.memory.has_lost(self.capability, ns))
        if not targets:
            return [], ctx.memory
        return [Decision("set_timeouts", rule.name, ctx.reason, ctx.netns, ctx.dry_run,
                         timeouts=rule.set_timeouts.values, action=self.kind, targets=targets)], ctx.memory

    def settle(self, rule: Rule, ctx: Context, rule_memory: RuleMemory) -> Tuple[List[Decision], RuleMemory]:
        records = tuple(o for o in ctx.owned_by(rule.name, self.kind) if self.claims(rule, o, ctx.env))
        if not (records or rule_memory.covered or rule_memory.active_since is not None):
            return [], rule_memory
        spec, sample = rule.set_timeouts, ctx.sample
        due, rule_memory, calm_for = calm_long_enough(rule, sample, rule_memory, spec.restore_below,
                                                      spec.restore_after)
        if not due:
            return [], rule_memory
        if not records and not ctx.dry_run:
            # Nothing was written (every value was already short): the episode just ends.
            return [], replace(rule_memory, active_since=None, calm_since=None, covered=frozenset())
        reason = (f"usage {sample.usage:.1%} below {spec.restore_below:.0%} with no drops for "
                  f"{format_duration(round(calm_for))}; restoring the originals")
        return [Decision("restore_timeouts", rule.name, reason, sample.fullest.netns, ctx.dry_run,
                         timeouts=spec.values, action=self.kind, undo=True, restores=records)], rule_memory

    def claims(self, rule: Rule, owned: Owned, env) -> bool:
        return (rule.name == owned.rule and rule.action == self.kind and owned.netns in env.namespaces
                and owned.name in {PREFIX + t for t, _ in rule.set_timeouts.values})

    def adopter(self, owned: Owned, rules: Sequence[Rule], env) -> Optional[Rule]:
        return next((r for r in rules if self.claims(r, owned._replace(rule=r.name), env)), None)

    def undo_orphans(self, orphans: Sequence[Owned], ctx: Context) -> List[Decision]:
        if not orphans:
            return []
        rules = sorted({o.rule for o in orphans})
        reason = (f"rule {', '.join(repr(r) for r in rules)} no longer stands behind these changes "
                  "(disabled, renamed, removed or edited); restoring the originals")
        return [Decision("restore_timeouts", rules[0], reason, orphans[0].netns, ctx.dry_run,
                         action=self.kind, undo=True, restores=tuple(orphans))]

    # ------------------------------------------------------------------ shell

    def apply(self, decision: Decision, shell: Shell) -> Outcome:
        rule = shell.rule(decision.rule)
        after = rule.set_timeouts.restore_after if rule else None
        below = rule.set_timeouts.restore_below if rule else None
        done, lost, missing, failed = set(), set(), set(), False
        for ns in decision.targets:
            changes: List[str] = []
            try:
                for timeout, seconds in decision.timeouts:
                    sysctl, target = PREFIX + timeout, int(seconds)
                    current = shell.kernel.read_sysctl(ns, sysctl)
                    if current <= target:
                        continue  # never lengthen a timeout someone already shortened
                    if not decision.dry_run:
                        write(shell, decision, ns, sysctl, target, self.kind, after, below)
                    changes.append(f"{timeout} {format_duration(current)}→{format_duration(target)}")
            except OSError as exc:
                failed = True
                if shell.kernel.is_missing(exc):
                    missing.add(ns)
                outcome = shell.failed(decision, exc, ns, f"timeouts in {netns_label(ns)}", self.capability,
                                       shell.kernel.is_permanent(exc))
                lost |= outcome.lost
            else:
                done.add(ns)
            if changes:
                shell.emit("set_timeouts", decision.dry_run, **dict(
                    shell.fields, netns=ns, netns_label=netns_label(ns), changes=", ".join(changes)))
        return Outcome(applied=bool(done), done=frozenset(done), lost=frozenset(lost), failed=failed,
                       missing=frozenset(missing))

    def undo(self, decision: Decision, shell: Shell) -> Outcome:
        by_ns: Dict[str, List[Owned]] = {}
        for owned in decision.restores:
            by_ns.setdefault(owned.netns, []).append(owned)
        missing, failed = set(), False
        if decision.dry_run and not decision.restores:
            # A dry run wrote nothing, so nothing is owned: say what a real run would put back.
            shell.emit("restore_timeouts", True, **dict(shell.fields, changes=", ".join(
                t for t, _ in decision.timeouts)))
        for ns, records in by_ns.items():
            changes: List[str] = []
            try:
                for owned in records:
                    if put_back(shell, decision, owned) == "restored":
                        short = owned.name[len(PREFIX):]
                        changes.append(f"{short} {format_duration(owned.applied)}→{format_duration(owned.original)}")
            except OSError as exc:
                # One namespace failing never blocks the others.
                failed = True
                if shell.kernel.is_missing(exc):
                    missing.add(ns)   # the service logs it once and drops the records once gone for good
                else:
                    shell.failed(decision, exc, ns, f"restoring timeouts in {netns_label(ns)}", self.capability,
                                 permanent=False)
            if changes:
                shell.emit("restore_timeouts", decision.dry_run, **dict(
                    shell.fields, netns=ns, netns_label=netns_label(ns), changes=", ".join(changes)))
        return Outcome(applied=not failed, failed=failed, missing=frozenset(missing))


register(SetTimeouts())

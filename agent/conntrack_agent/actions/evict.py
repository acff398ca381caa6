"""evict: a budgeted sweep that deletes or ages selected entries.

Nothing to undo: an evicted entry that was still wanted is re-created by its
next packet (a NEW entry), and aged entries that see a packet live on. What
keeps it safe is the budget (entries and time), the target usage it stops at,
and the selectors (assured ESTABLISHED entries only with include_established).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from .. import events
from ..config import Rule
from . import register
from .base import Action, Context, Decision, Memory, Outcome, Shell, netns_label

events.register("evict", events.EventKind(
    "9c743e74da0146fc88a1bcdaa52cb982", events.INFO,
    "{verb} {done} conntrack entries in {netns_label} ({summary}): {reason}",
    verbs=("evicted", "would evict")))


class Evict(Action):
    kind = "evict"
    capability = "evict"
    records = False
    quiet_unowned = True   # it only fires: nothing to watch, settle or follow up

    def fire(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        if ctx.memory.has_lost(self.capability, ctx.netns):
            return [], ctx.memory
        return [Decision("evict", rule.name, ctx.reason, ctx.netns, ctx.dry_run, action=self.kind)], ctx.memory

    def apply(self, decision: Decision, shell: Shell) -> Outcome:
        rule = shell.rule(decision.rule)
        if rule is None:
            return Outcome(applied=False)
        try:
            report = shell.kernel.evict(rule.evict, decision.netns, decision.dry_run, shell.usage, shell.log)
        except OSError as exc:
            return shell.failed(decision, exc, decision.netns, f"evict in {netns_label(decision.netns)}",
                                self.capability, shell.kernel.is_permanent(exc))
        shell.emit("evict", decision.dry_run, **dict(shell.fields, **evict_fields(report)))
        return Outcome(applied=not decision.dry_run, done=frozenset({decision.netns}))

    def undo(self, decision: Decision, shell: Shell) -> Outcome:
        return Outcome(applied=False)


def evict_fields(report: Any) -> Dict[str, Any]:
    """An eviction report as log fields, with the one-line summary the sentence uses."""
    fields = report.log_fields()
    fields["path_reason"] = fields.pop("reason")
    fields.pop("dry_run")   # the decision's own flag is logged
    fields.pop("max")       # the sample's max is logged
    fields["done"] = report.matched if report.dry_run else report.done
    parts = [f"{report.path} filter", f"{report.matched} selected of {report.scanned} scanned"
             if report.detailed else f"{report.done} removed by the kernel"]
    if report.by_category:
        ranked = sorted(report.by_category.items(), key=lambda kv: -kv[1])[:4]
        parts.append(", ".join(f"{name} {n}" for name, n in ranked))
    if report.top_sources:
        parts.append("top sources " + ", ".join(f"{a} {n}" for a, n in report.top_sources[:3]))
    if report.top_destinations:
        parts.append("top destinations " + ", ".join(f"{a} {n}" for a, n in report.top_destinations[:3]))
    parts.append(f"{report.duration_s * 1000:.0f} ms")
    parts.append(f"usage {report.usage_before:.1%}→{report.usage_after:.1%}")
    if report.stopped != "complete":
        parts.append(f"stopped early: {report.stopped.replace('_', ' ')}")
    if report.gone:
        parts.append(f"{report.gone} already gone")
    if report.errors:
        parts.append("errors " + ", ".join(f"{k} {v}" for k, v in report.errors.items()))
    fields["summary"] = "; ".join(parts)
    return fields


register(Evict())

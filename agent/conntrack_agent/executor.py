"""Carries out decisions through the action registry, and logs each one with its fields.

Every write goes through the kernel seam and the change journal (actions/
sysctl_change.py): the original is recorded before the value changes and the
record is rolled back if the write did not happen; a value already right is
skipped; what the kernel kept is read back and owned. A permanent refusal (a
container's read-only /proc/sys, a global sysctl outside the initial namespace)
is reported per target so the core stops proposing it there, and nowhere else.
A dry run goes through the same steps up to the write, and logs "would" with
the exact values.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from . import actions, logsetup
from .actions.base import GLOBAL, Decision, Outcome, Owned, Shell, netns_label  # noqa: F401
from .actions.evict import evict_fields  # noqa: F401 - the CLI's evict logs the same fields
from .config import Policy
from .model import Sample


def sample_fields(sample: Optional[Sample]) -> Dict[str, Any]:
    if sample is None:
        return {}
    ttf = sample.time_to_full
    return {
        "count": sample.count,
        "max": sample.max,
        "buckets": sample.buckets,
        "usage": round(sample.usage, 4),
        "usage_pct": f"{sample.usage:.1%}",
        "fill_rate": round(sample.fill_rate, 1),
        "time_to_full": None if ttf is None else round(ttf, 2),
        "drop": sample.deltas.get("drop", 0),
        "early_drop": sample.deltas.get("early_drop", 0),
        "insert_failed": sample.deltas.get("insert_failed", 0),
    }


def owned_records(journal: Any) -> tuple:
    """The journal as the pure core sees it."""
    return journal.converted(Owned.of)


class Executor:
    def __init__(self, log: Any, journal: Any, kernel: Any, usage: Optional[Callable[[], float]] = None,
                 on_event: Optional[Callable[[str, bool, Dict[str, Any]], None]] = None):
        self.log = log
        self.journal = journal
        self.kernel = kernel
        self.usage = usage or (lambda: 0.0)
        self.on_event = on_event    # sees every event it logs (the metrics' counters)
        self.labels: Dict[str, Dict[str, Any]] = {}   # namespace -> netns_inode, cgroup, pod_uid (the agent's)

    def _emit(self, kind: str, dry_run: bool = False, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, dry_run, fields)
        logsetup.emit(self.log, kind, dry_run, **fields)

    def execute(self, decision: Decision, sample: Optional[Sample], policy: Policy) -> Outcome:
        fields = sample_fields(sample)
        fields.update(rule=decision.rule, action=decision.kind, reason=decision.reason,
                      netns=decision.netns, netns_label=netns_label(decision.netns))
        fields.update(self.labels.get(decision.netns, {}))
        if not decision.is_action:
            if decision.restores:
                fields["name"] = decision.restores[0].name
            self._emit(decision.kind, decision.dry_run, old=decision.old, new=decision.new, **fields)
            if decision.kind == "external_change" and not decision.dry_run:
                for owned in decision.restores:   # backing off: the value is someone else's now
                    self.journal.forget(owned.netns, owned.name)
            if decision.kind == "change_adopted" and not decision.dry_run:
                rule = next(r for r in policy.rules if r.name == decision.rule)
                for owned in decision.restores:
                    self.journal.reassign(owned.netns, owned.name, rule.name, rule.set_timeouts.restore_after,
                                          rule.set_timeouts.restore_below)
            return Outcome(applied=False)
        shell = Shell(self.kernel, self.journal, self._emit, fields, policy, self.log, self.usage)
        action = actions.get(decision.action)
        return action.undo(decision, shell) if decision.undo else action.apply(decision, shell)

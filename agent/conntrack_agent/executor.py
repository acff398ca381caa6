"""Carries out decisions on the kernel, and logs each one with its fields.

Every write: records the original in the state file first, skips a value that is
already right, verifies by reading back, and on a permanent refusal (a container's
read-only /proc/sys, a global sysctl outside the initial namespace) reports the
capability as lost so the core stops proposing it. A dry run goes through the
same steps up to the write, and logs "would" with the exact values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from . import logsetup, netns, procfs
from .config import Policy, format_duration
from .model import Sample
from .decisions import Decision
from .journal import ChangeJournal


@dataclass(frozen=True)
class Outcome:
    applied: bool
    lost_capability: bool = False


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


def netns_label(name: str) -> str:
    return f"netns {name}" if name else "the agent's netns"


GLOBAL = ""  # nf_conntrack_max and buckets are global: recorded under the initial namespace


class Executor:
    def __init__(self, log: Any, state: ChangeJournal, namespaces: Tuple[str, ...],
                 evict_runner: Optional[Callable[..., Any]] = None):
        self.log = log
        self.state = state
        self.namespaces = namespaces or ("",)
        self.evict_runner = evict_runner

    # ------------------------------------------------------------------ entry point

    def execute(self, decision: Decision, sample: Sample, policy: Policy) -> Outcome:
        fields = sample_fields(sample)
        fields.update(rule=decision.rule, action=decision.kind, reason=decision.reason,
                      netns=decision.netns, netns_label=netns_label(decision.netns))
        if not decision.is_action:
            logsetup.emit(self.log, decision.kind, decision.dry_run, old=decision.old, new=decision.new, **fields)
            return Outcome(applied=False)
        handler = {
            "raise_max": self._global_write,
            "restore_max": self._global_write,
            "resize_buckets": self._global_write,
            "set_timeouts": self._set_timeouts,
            "restore_timeouts": self._restore_timeouts,
            "evict": self._evict,
        }[decision.kind]
        return handler(decision, sample, policy, fields)

    def _failed(self, decision: Decision, error: OSError, fields: Dict[str, Any], target: str) -> Outcome:
        permanent = procfs.is_permanent(error)
        consequence = ("the agent will not try this action again until restarted or reloaded"
                       if permanent else "will retry after the rule's cooldown")
        payload = dict(fields, action=decision.kind, error=f"{target}: {error.strerror or error}",
                       errno=error.errno, consequence=consequence, old=decision.old, new=decision.new)
        logsetup.emit(self.log, "action_failed", decision.dry_run, **payload)
        return Outcome(applied=False, lost_capability=permanent)

    # ------------------------------------------------------------------ max and buckets

    def _global_write(self, decision: Decision, sample: Sample, policy: Policy, fields: Dict[str, Any]) -> Outcome:
        name = "nf_conntrack_buckets" if decision.kind == "resize_buckets" else "nf_conntrack_max"
        new = decision.new
        fields = dict(fields, old=decision.old, new=new)
        if decision.dry_run:
            logsetup.emit(self.log, decision.kind, True, **fields)
            return Outcome(applied=False)
        try:
            current = procfs.read_sysctl(name)
            if current != new:
                if decision.kind == "restore_max":
                    self.state.forget(GLOBAL, name)
                else:
                    self.state.record(GLOBAL, name, original=current, applied=new, rule=decision.rule)
                procfs.write_sysctl(name, new)
                after = procfs.read_sysctl(name)
                if after != new:
                    # buckets and max are clamped by the kernel in some cases; own what stuck.
                    fields["new"] = after
                    if decision.kind != "restore_max":
                        self.state.record(GLOBAL, name, original=current, applied=after, rule=decision.rule)
            fields["old"] = current
        except OSError as exc:
            if decision.kind != "restore_max":
                change = self.state.get(GLOBAL, name)
                if change is not None and change.applied == new and change.original == decision.old:
                    self.state.forget(GLOBAL, name)
            return self._failed(decision, exc, fields, procfs.sysctl_path(name))
        logsetup.emit(self.log, decision.kind, False, **fields)
        return Outcome(applied=True)

    # ------------------------------------------------------------------ timeouts

    def _set_timeouts(self, decision: Decision, sample: Sample, policy: Policy, fields: Dict[str, Any]) -> Outcome:
        applied_any = False
        for name in self.namespaces:
            changes = []
            try:
                with netns.entered(name):
                    for timeout, seconds in decision.timeouts:
                        sysctl = "nf_conntrack_" + timeout
                        target = int(seconds)
                        current = procfs.read_sysctl(sysctl)
                        if current <= target:
                            continue  # never lengthen a timeout someone already shortened
                        changes.append(f"{timeout} {format_duration(current)}→{format_duration(target)}")
                        if decision.dry_run:
                            continue
                        self.state.record(name, sysctl, original=current, applied=target, rule=decision.rule)
                        procfs.write_sysctl(sysctl, target)
                        applied_any = True
            except OSError as exc:
                outcome = self._failed(decision, exc, dict(fields, netns=name, netns_label=netns_label(name)),
                                       f"timeouts in {netns_label(name)}")
                if outcome.lost_capability:
                    return outcome
                continue
            if changes:
                logsetup.emit(self.log, "set_timeouts", decision.dry_run,
                              **dict(fields, netns=name, netns_label=netns_label(name), changes=", ".join(changes)))
        return Outcome(applied=applied_any or decision.dry_run)

    def _restore_timeouts(self, decision: Decision, sample: Sample, policy: Policy,
                          fields: Dict[str, Any]) -> Outcome:
        restored_any = False
        for change in [c for c in self.state.entries() if c.rule == decision.rule and c.name != "nf_conntrack_max"]:
            changes = []
            try:
                with netns.entered(change.netns):
                    current = procfs.read_sysctl(change.name)
                    short = change.name[len("nf_conntrack_"):]
                    if current != change.applied:
                        logsetup.emit(self.log, "external_change", decision.dry_run, **dict(
                            fields, netns=change.netns, old=change.applied, new=current,
                            reason=f"{change.name} in {netns_label(change.netns)} was changed from the agent's "
                                   f"{change.applied} to {current} by another writer; leaving it"))
                        if not decision.dry_run:
                            self.state.forget(change.netns, change.name)
                        continue
                    changes.append(f"{short} {format_duration(current)}→{format_duration(change.original)}")
                    if not decision.dry_run:
                        procfs.write_sysctl(change.name, change.original)
                        self.state.forget(change.netns, change.name)
                        restored_any = True
            except OSError as exc:
                return self._failed(decision, exc, fields, f"{change.name} in {netns_label(change.netns)}")
            logsetup.emit(self.log, "restore_timeouts", decision.dry_run,
                          **dict(fields, netns=change.netns, netns_label=netns_label(change.netns),
                                 changes=", ".join(changes)))
        return Outcome(applied=restored_any or decision.dry_run)

    # ------------------------------------------------------------------ eviction

    def _evict(self, decision: Decision, sample: Sample, policy: Policy, fields: Dict[str, Any]) -> Outcome:
        if self.evict_runner is None:
            error = OSError(95, "eviction engine not available")
            return self._failed(decision, error, fields, "evict")
        rule = next(r for r in policy.rules if r.name == decision.rule)
        try:
            report = self.evict_runner(rule.evict, decision.netns, decision.dry_run)
        except OSError as exc:
            return self._failed(decision, exc, fields, f"evict in {netns_label(decision.netns)}")
        logsetup.emit(self.log, "evict", decision.dry_run, **dict(fields, **evict_fields(report)))
        return Outcome(applied=not decision.dry_run)


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

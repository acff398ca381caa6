"""Every kind of event the agent logs: a stable MESSAGE_ID, a priority and a sentence.

The MESSAGE_IDs never change once released: operators filter on them
(`journalctl -u conntrack-agent MESSAGE_ID=...`) and systemd/conntrack-agent.catalog
explains each one. Priorities follow syslog: 3 err (a failure), 4 warning
(pressure, or something outside the agent's control), 5 notice (a dry run's
"would"), 6 info (an action taken, normal life).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6


@dataclass(frozen=True)
class EventKind:
    message_id: str
    priority: int
    template: str  # str.format over the event's fields
    # An action's events: the verb done and dry-run ("raised", "would raise"), and the
    # journal fields its generic old/new become (CT_MAX_OLD, CT_MAX_NEW).
    verbs: Optional[Tuple[str, str]] = None
    old_new: Optional[Tuple[str, str]] = None


EVENTS: Dict[str, EventKind] = {
    "agent_started": EventKind("d6d9183a5ae04cb18ca3f8628f76a112", INFO,
                               "conntrack-agent {version} started: watching {namespaces} with policy {policy}"),
    "agent_stopping": EventKind("91e13b9fb71e42bba09fbc1530756920", INFO, "conntrack-agent stopping ({why})"),
    "policy_loaded": EventKind("9aa4f2b72e9e416e9d82e9d6480dbcf7", INFO, "policy loaded from {policy}"),
    "policy_invalid": EventKind("869b86ef7a314d22978a0cbfb6b6d54a", ERR,
                                "policy rejected, {keeping}: {error}"),
    "conntrack_unavailable": EventKind("2e8c02af6b7e4f03bad36c1babbd8477", WARNING,
                                       "conntrack is not available in {netns_label} ({error}); waiting for it"),
    "conntrack_available": EventKind("ec635b456d8e4904972667559ac333e5", INFO,
                                     "conntrack is available in {netns_label}: {count}/{max} entries"),
    "external_change": EventKind("f9f55b228d084a2ba957a694f9812959", WARNING, "{reason}"),
    "action_failed": EventKind("a6b5593f0eae4f34acad78e2091870e3", ERR,
                               "{action} failed: {error}; {consequence}"),
    "pressure": EventKind("3bfaf3f6a16141069973530c4529cf21", WARNING,
                          "conntrack table under pressure: {count}/{max} ({usage_pct}) in {netns_label}, "
                          "{detail}"),
    "pressure_eased": EventKind("5e0f0f9d4c7a4a51b7d1f3a0c2b6e8d4", INFO,
                                "conntrack table pressure eased: {count}/{max} ({usage_pct}) in {netns_label}"),
    "dbus_unavailable": EventKind("9537b0b9e06748c5bf62059adbb62128", WARNING, "{detail}"),
    "dbus_available": EventKind("cd7b29e7a3244786ab96bde60a66518a", INFO, "{detail}"),
    "dbus_method_failed": EventKind("84ca770e7c394a2ea7fc4f5b9ea92f0b", ERR, "{detail}"),
    "tick_failed": EventKind("ef968714a2b74c7cb36fe0c08a15b3d1", ERR,
                             "tick failed: {error}; the agent tries again in {retry}s"),
    "namespace_gone": EventKind("c3f1e0a2b7d94e5f8a6c1d2e3f4a5b69", WARNING,
                                "{netns_label} is gone; dropping what the agent recorded there ({changes}): "
                                "its values went with it"),
    "namespace_missing": EventKind("0b6e2d4f8a1c4e3b9d7f5a2c6e8b1d43", WARNING,
                                   "cannot enter {netns_label} to restore {changes}: {error}; the agent tries again "
                                   "and drops the records if it stays gone for {grace}s"),
    "journal_damaged": EventKind("e5a7c9b1d3f54a6c8e0b2d4f6a8c0e17", ERR,
                                 "state file {path} could not be used in full: {problems}; {consequence}"),
    "change_adopted": EventKind("7d2e9a4c1b6f4e08a3c5d7e9f1b3a5c7", INFO, "{reason} (in {netns_label})"),
    "report_unavailable": EventKind("5b9d1f3e7a2c4b6d8e0f2a4c6b8d0e13", WARNING,
                                    "cannot write the runtime report {path} ({error}); `plan` and `status` "
                                    "without D-Bus will show the state file only"),
    "metrics_unavailable": EventKind("a1c3e5f7092b4d6f8a0c2e4b6d8f1a35", WARNING,
                                     "cannot write the metrics textfile {path} ({error}); the agent works on "
                                     "without it and says so once"),
    "baseline_applied": EventKind("2d4f6a8c0e1b4a3c5e7d9f1b3c5a7e92", INFO,
                                  "{verb}baseline applied in {netns_label}: {changes}{detail}",
                                  verbs=("", "would have ")),
    "policy_watched": EventKind("6e8a0c2e4b6d4f8a9c1e3a5c7e9b1d24", INFO,
                                "reloading by itself when the policy changes in {directories} "
                                "(agent.watch_policy)"),
    "insert_race": EventKind("8f0b2d4e6a1c4e5a7b9d1f3a5c7e9b31", WARNING, "{reason}"),
    "namespace_watched": EventKind("1c3e5a7c9e0b4d2f8a6c4e2a0b8d6f91", INFO,
                                   "watching {netns_label} (net:[{netns_inode}])"),
    "namespace_dropped": EventKind("3e5a7c9e1b2d4f6a8c0e2b4d6f8a0c15", INFO,
                                   "{netns_label} (net:[{netns_inode}]) is gone or no longer wanted: not watched"),
    "namespace_cap": EventKind("5a7c9e1b3d4f4a6c8e0a2c4e6a8c0e27", WARNING,
                               "{left_out} more network namespaces match agent.namespaces than agent.max_namespaces "
                               "({cap}) allows: left out (e.g. {examples}); the agent's own and those already "
                               "watched keep their place"),
    "pressure_attribution": EventKind("7c9e1b3d5f6a4c8e0a2c4e6b8d0f2a39", INFO,
                                      "who fills {netns_label}: {summary}"),
    "restore_skipped": EventKind("77c1d2a9e5b04f3c8a6d9e2f1b0c4a57", WARNING,
                                 "not restoring {name} in {netns_label}: {reason}"),
    "reload_failed": EventKind("ddc94c70b5a745078fe0e2ff665e9234", ERR,
                               "reload failed: {error}; keeping the running policy ({policy})"),
    "start_failed": EventKind("a68478a0e16c4c6881e37595000933ca", ERR,
                              "conntrack-agent failed to start: {error}; exit status {exit_status}, {consequence}"),
    "internal_error": EventKind("ef7a5cbbe24a44d997ccc42e302d20db", ERR,
                                "internal error in the main loop: {error}; the agent carries on"),
}

def register(name: str, kind: EventKind) -> None:
    """An action module's own event kinds (actions/*.py) join the registry."""
    EVENTS[name] = kind


def priority_of(kind: str, dry_run: bool = False) -> int:
    base = EVENTS[kind].priority if kind in EVENTS else INFO
    return NOTICE if dry_run and base == INFO else base


def has_verb(kind: str) -> bool:
    return kind in EVENTS and EVENTS[kind].verbs is not None


def verb(kind: str, dry_run: bool) -> str:
    """Dry-run events are the same kinds at notice priority with a "would" verb."""
    known = EVENTS.get(kind)
    if known is None or known.verbs is None:
        return "would " + kind if dry_run else ""
    return known.verbs[1] if dry_run else known.verbs[0]


def message(kind: str, fields: Dict[str, object]) -> str:
    """The sentence for an event; a missing field shows as '?' rather than failing the log."""
    class _Lenient(dict):
        def __missing__(self, key: str) -> str:
            return "?"
    text = EVENTS[kind].template.format_map(_Lenient(fields)) if kind in EVENTS else kind
    return " ".join(text.split())


# The action modules register their own event kinds; importing them here means
# whoever reads EVENTS sees every kind.
from . import actions  # noqa: E402,F401

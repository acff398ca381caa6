"""Every kind of event the agent logs: a stable MESSAGE_ID, a priority and a sentence.

The MESSAGE_IDs never change once released: operators filter on them
(`journalctl -u conntrack-agent MESSAGE_ID=...`) and systemd/conntrack-agent.catalog
explains each one. Priorities follow syslog: 3 err (a failure), 4 warning
(pressure, or something outside the agent's control), 5 notice (a dry run's
"would"), 6 info (an action taken, normal life).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6


@dataclass(frozen=True)
class EventKind:
    message_id: str
    priority: int
    template: str  # str.format over the event's fields


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
    "raise_max": EventKind("5c4a891b4b874fd1ad5a285521dab566", INFO,
                           "{verb} nf_conntrack_max from {old} to {new}: {reason}"),
    "restore_max": EventKind("0e312ff4c36e472cae1acf66c797d837", INFO,
                             "{verb} nf_conntrack_max from {old} back to its original {new}: {reason}"),
    "max_at_ceiling": EventKind("db5ce1d24afd4b1fb34c74aa64c4df8b", WARNING,
                                "cannot raise nf_conntrack_max any further: {reason}"),
    "resize_buckets": EventKind("8b1aa553e229400e90d353f5371a7bcc", INFO,
                                "{verb} nf_conntrack_buckets from {old} to {new}: {reason}"),
    "set_timeouts": EventKind("d11e3d047acb4be6bfa77e2dea8ca0c1", INFO,
                              "{verb} shortened conntrack timeouts in {netns_label} ({changes}): {reason}"),
    "restore_timeouts": EventKind("3bb9e87f21bd401b99db5563d8b51b67", INFO,
                                  "{verb} restored conntrack timeouts in {netns_label} ({changes}): {reason}"),
    "evict": EventKind("9c743e74da0146fc88a1bcdaa52cb982", INFO,
                       "{verb} {done} conntrack entries in {netns_label} ({summary}): {reason}"),
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
    "restore_skipped": EventKind("77c1d2a9e5b04f3c8a6d9e2f1b0c4a57", WARNING,
                                 "not restoring {name} in {netns_label}: {reason}"),
    "reload_failed": EventKind("ddc94c70b5a745078fe0e2ff665e9234", ERR,
                               "reload failed: {error}; keeping the running policy ({policy})"),
    "start_failed": EventKind("a68478a0e16c4c6881e37595000933ca", ERR,
                              "conntrack-agent failed to start: {error}; exit status {exit_status}, {consequence}"),
    "internal_error": EventKind("ef7a5cbbe24a44d997ccc42e302d20db", ERR,
                                "internal error in the main loop: {error}; the agent carries on"),
}

# Dry-run events are the same kinds at notice priority with a "would" verb.
PAST = {"raise_max": "raised", "restore_max": "restored", "resize_buckets": "resized",
        "set_timeouts": "", "restore_timeouts": "", "evict": "evicted"}


def priority_of(kind: str, dry_run: bool = False) -> int:
    base = EVENTS[kind].priority if kind in EVENTS else INFO
    return NOTICE if dry_run and base == INFO else base


def verb(kind: str, dry_run: bool) -> str:
    if dry_run:
        return {"set_timeouts": "would have", "restore_timeouts": "would have"}.get(kind, "would " + {
            "raise_max": "raise", "restore_max": "restore", "resize_buckets": "resize", "evict": "evict"}.get(kind, kind))
    return PAST.get(kind, "")


def message(kind: str, fields: Dict[str, object]) -> str:
    """The sentence for an event; a missing field shows as '?' rather than failing the log."""
    class _Lenient(dict):
        def __missing__(self, key: str) -> str:
            return "?"
    text = EVENTS[kind].template.format_map(_Lenient(fields)) if kind in EVENTS else kind
    return " ".join(text.split())

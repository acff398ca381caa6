"""The shipped systemd files agree with the code: catalog entries for every
MESSAGE_ID, and the unit's names and numbers match what the agent uses.
(The system test boots them; these catch drift without root.)"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Dict, List

from conntrack_agent import cli, config, events, journald

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def _catalog() -> Dict[str, str]:
    entries: Dict[str, str] = {}
    current = None
    for line in (SYSTEMD / "conntrack-agent.catalog").read_text().splitlines():
        match = re.match(r"^-- ([0-9a-f]{32})$", line)
        if match:
            current = match.group(1)
            assert current not in entries, "duplicate catalog entry " + current
            entries[current] = ""
        elif current is not None:
            entries[current] += line + "\n"
    return entries


def _unit() -> Dict[str, List[str]]:
    settings: Dict[str, List[str]] = {}
    for line in (SYSTEMD / "conntrack-agent.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_catalog_explains_every_message_id() -> None:
    entries = _catalog()
    assert set(entries) == {kind.message_id for kind in events.EVENTS.values()}
    for message_id, text in entries.items():
        assert re.search(r"^Subject: \S", text, re.M), message_id
        assert "Defined-By: conntrack-agent" in text, message_id
        body = text.split("\n\n", 1)[1].strip()
        assert len(body) > 40, message_id


def test_catalog_substitutes_only_fields_the_entries_carry() -> None:
    by_id = {kind.message_id: name for name, kind in events.EVENTS.items()}
    for message_id, text in _catalog().items():
        name = by_id[message_id]
        placeholders = {f for _, f, _, _ in string.Formatter().parse(events.EVENTS[name].template) if f}
        carried = (set(journald.FIELDS.values()) | {journald.field_name(p) for p in placeholders}
                   | set(events.EVENTS[name].old_new or ()))
        for field in re.findall(r"@([A-Z0-9_]+)@", text):
            assert field in carried, "%s: @%s@ is not a field of %s entries" % (message_id, field, name)


def test_unit_essentials() -> None:
    unit = _unit()
    assert unit["Type"] == ["notify"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == [str(cli.EXIT_CONFIG)]
    assert unit["WatchdogSec"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    assert unit["ProtectSystem"] == ["strict"]
    assert "/proc/sys/net/netfilter" in unit["ReadWritePaths"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    assert "@system-service" in unit["SystemCallFilter"]
    # They would hide the host's table or the capability from it.
    assert "PrivateNetwork" not in unit and "PrivateUsers" not in unit


def test_unit_memory_max_leaves_room_over_the_idle_budget() -> None:
    """MemoryMax= ends a leak in a restart; it must not end normal work: the idle
    agent is budgeted at 25 MB of RSS and a sweep adds ~18 MB at its peak."""
    (value,) = _unit()["MemoryMax"]
    number, unit = re.fullmatch(r"(\d+)([KMG])", value).groups()
    mib = int(number) * {"K": 1 / 1024, "M": 1, "G": 1024}[unit]
    assert mib >= 4 * 25


def test_unit_user_state_directory_and_sysusers_agree() -> None:
    unit = _unit()
    user = unit["User"][0]
    sysusers = (SYSTEMD / "sysusers.d" / "conntrack-agent.conf").read_text()
    assert re.search(r"^u %s " % re.escape(user), sysusers, re.M)
    policy = (SYSTEMD / "io.github.conntrack_agent1.conf").read_text()
    assert '<policy user="%s">' % user in policy
    # The readers' group is the one sysusers creates with the user ("u" makes both).
    assert '<policy group="%s">' % unit["Group"][0] in policy and unit["Group"] == [user]
    state_dir = os.path.dirname(config.AgentSettings().state_file)
    assert state_dir == "/var/lib/" + unit["StateDirectory"][0]


def test_named_netns_dropin_adds_only_what_setns_needs() -> None:
    text = (SYSTEMD / "watch-named-netns.conf").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith(("#", "[")))
    assert settings["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    assert settings["AmbientCapabilities"].split() == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    assert settings["RestrictNamespaces"] == "net"

"""TEMPORARY minimal change journal (replaced by the hardened one)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

SCHEMA_VERSION = 2


@dataclass
class Change:
    netns: str
    name: str
    action: str
    original: int
    applied: int
    rule: str
    since: float
    restore_after: Optional[float] = None
    restore_below: Optional[float] = None
    pending: bool = False


class JournalError(Exception):
    pass


@dataclass
class LoadReport:
    problems: List[str] = field(default_factory=list)
    quarantined: Optional[str] = None
    dropped: List[str] = field(default_factory=list)


class ChangeJournal:
    def __init__(self, path: str):
        self.path = path
        self.changes: Dict[Tuple[str, str], Change] = {}

    def load(self, quarantine: bool = True) -> LoadReport:
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return LoadReport()
        for raw in data.get("changes", []):
            c = Change(**raw)
            self.changes[(c.netns, c.name)] = c
        return LoadReport()

    def save(self) -> None:
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"version": SCHEMA_VERSION, "changes": [asdict(c) for c in self.changes.values()]}, f)
        os.replace(tmp, self.path)

    def get(self, netns, name):
        return self.changes.get((netns, name))

    def entries(self):
        return list(self.changes.values())

    def begin(self, netns, name, action, current, target, rule, restore_after=None, restore_below=None):
        prev = self.changes.get((netns, name))
        if prev is None:
            new = Change(netns, name, action, current, target, rule, time.time(), restore_after, restore_below, True)
        else:
            new = replace(prev, applied=target, rule=rule, restore_after=restore_after, restore_below=restore_below,
                          pending=True)
        self.changes[(netns, name)] = new
        self.save()
        return ((netns, name), prev)

    def confirm(self, token, applied):
        key, _ = token
        c = self.changes[key]
        c.applied, c.pending = applied, False
        self.save()

    def rollback(self, token):
        key, prev = token
        if prev is None:
            self.changes.pop(key, None)
        else:
            self.changes[key] = prev
        self.save()

    def forget(self, netns, name):
        if self.changes.pop((netns, name), None) is not None:
            self.save()
            return True
        return False

    def forget_namespace(self, netns):
        gone = [c for c in self.changes.values() if c.netns == netns]
        for c in gone:
            del self.changes[(c.netns, c.name)]
        if gone:
            self.save()
        return gone

    def reassign(self, netns, name, rule, restore_after, restore_below):
        c = self.changes[(netns, name)]
        c.rule, c.restore_after, c.restore_below = rule, restore_after, restore_below
        self.save()

    def confirm_existing(self, netns, name, applied):
        c = self.changes[(netns, name)]
        c.applied, c.pending = applied, False
        self.save()

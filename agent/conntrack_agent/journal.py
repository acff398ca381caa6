"""The state file: what the agent changed, and the value it replaced.

Written atomically (temporary file, fsync, rename, fsync of the directory) before
each change takes effect, so a crash at any point leaves either the old or the
new file and never loses an original. An original is recorded only when no entry
exists yet: after a crash the agent's own raised value is never mistaken for the
node's original.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

VERSION = 1


@dataclass
class Change:
    netns: str       # "" for the agent's own namespace (and for global values)
    name: str        # sysctl name, e.g. "nf_conntrack_max", "nf_conntrack_udp_timeout"
    original: int
    applied: int     # the value the agent wrote last
    rule: str
    since: float     # wall-clock seconds of the first change


class JournalError(Exception):
    pass


class ChangeJournal:
    def __init__(self, path: str):
        self.path = path
        self.changes: Dict[Tuple[str, str], Change] = {}

    def load(self) -> "ChangeJournal":
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return self
        except (OSError, ValueError) as exc:
            raise JournalError(f"{self.path}: unreadable state file ({exc}); move it aside to start afresh") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise JournalError(f"{self.path}: unknown state file version {data.get('version')!r}")
        for raw in data.get("changes", []):
            change = Change(**raw)
            self.changes[(change.netns, change.name)] = change
        return self

    def save(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        payload = json.dumps({"version": VERSION, "changes": [asdict(c) for c in self.changes.values()]},
                             indent=1, sort_keys=True).encode()
        tmp = f"{self.path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, netns: str, name: str) -> Optional[Change]:
        return self.changes.get((netns, name))

    def record(self, netns: str, name: str, original: int, applied: int, rule: str) -> None:
        """Note a change about to be made; keeps the first original."""
        existing = self.changes.get((netns, name))
        if existing is None:
            self.changes[(netns, name)] = Change(netns, name, original, applied, rule, time.time())
        else:
            existing.applied = applied
        self.save()

    def forget(self, netns: str, name: str) -> None:
        if self.changes.pop((netns, name), None) is not None:
            self.save()

    def entries(self) -> List[Change]:
        return list(self.changes.values())

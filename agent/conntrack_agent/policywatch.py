"""Reload when the policy files change (`agent.watch_policy = true`).

Built for a Kubernetes ConfigMap mounted as the policy directory: the kubelet
never edits a file in place, it writes a new `..<timestamp>` directory and
renames a `..data_tmp` symlink over `..data` (the files the agent reads are
symlinks through `..data`). So the directories holding the policy and its
drop-ins are watched for anything appearing, vanishing or being written
(IN_MOVED_TO of `..data` is the ConfigMap's swap), and the watcher only says
"something changed": the supervisor waits a moment for the writer to finish,
then reloads exactly as SIGHUP does (a bad policy is kept out).
"""

from __future__ import annotations

import os
from typing import Iterable, List

from .inotify import (IN_ATTRIB, IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF, IN_MOVED_FROM,
                      IN_MOVED_TO, IN_ONLYDIR, IN_Q_OVERFLOW, Inotify)

_MASK = (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_ATTRIB | IN_DELETE_SELF
         | IN_MOVE_SELF | IN_ONLYDIR)


class PolicyWatcher:
    def __init__(self, directories: Iterable[str]) -> None:
        self.directories: List[str] = []
        self._inotify = Inotify()
        for directory in dict.fromkeys(directories):
            try:
                self._inotify.add(directory, _MASK)
            except OSError:
                continue   # not there (yet): a drop-in directory nobody made; nothing to reload from
            self.directories.append(directory)

    def fileno(self) -> int:
        return self._inotify.fd

    def changed(self) -> bool:
        """Drain the events; True if any could change the policy (hidden editor files
        such as .policy.toml.swp do not; the ConfigMap's `..data` swap does)."""
        relevant = False
        for _wd, mask, name in self._inotify.read():
            if mask & (IN_Q_OVERFLOW | IN_DELETE_SELF | IN_MOVE_SELF):
                relevant = True
            elif name == "..data" or name.endswith(".toml") or not name:
                relevant = True
        return relevant

    def close(self) -> None:
        self._inotify.close()


def directories_of(files: Iterable[str]) -> List[str]:
    """The directories to watch for a policy made of these files (and their policy.d)."""
    out = []
    for path in files:
        directory = os.path.dirname(os.path.abspath(path))
        out += [directory, os.path.join(directory, "policy.d")]
    return out

"""Hot reload of a Kubernetes ConfigMap: the kubelet's `..data` swap, seen with inotify."""

from __future__ import annotations

import os
import select
from pathlib import Path

from conntrack_agent import policywatch


def configmap(root: Path, version: str, text: str) -> None:
    """Lay out a policy the way the kubelet mounts a ConfigMap (atomic_writer.go):
    files live in a timestamped directory, `..data` points at it, and each key is a
    symlink through `..data`. An update writes a new directory and renames a new link
    over `..data`."""
    stamp = root / f"..{version}"
    stamp.mkdir()
    (stamp / "policy.toml").write_text(text)
    tmp = root / "..data_tmp"
    os.symlink(stamp.name, tmp)
    os.replace(tmp, root / "..data")
    if not (root / "policy.toml").is_symlink():
        os.symlink("..data/policy.toml", root / "policy.toml")


def readable(fd: int, timeout: float = 2.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_configmap_update_is_seen_and_editor_droppings_are_not(tmp_path):
    configmap(tmp_path, "2026_11_29_1", "[agent]\n")
    watcher = policywatch.PolicyWatcher(policywatch.directories_of([str(tmp_path / "policy.toml")]))
    try:
        assert watcher.directories == [str(tmp_path)]          # no policy.d here: not watched
        assert not readable(watcher.fileno(), 0.1)
        (tmp_path / ".policy.toml.swp").write_text("x")          # an editor's swap file
        assert readable(watcher.fileno()) and not watcher.changed()
        configmap(tmp_path, "2026_11_29_2", "[agent]\ninterval = \"2s\"\n")
        assert readable(watcher.fileno()) and watcher.changed()
        assert not watcher.changed()                            # drained
    finally:
        watcher.close()


def test_a_drop_in_written_in_place_is_seen(tmp_path):
    (tmp_path / "policy.d").mkdir()
    watcher = policywatch.PolicyWatcher(policywatch.directories_of([str(tmp_path / "policy.toml")]))
    try:
        (tmp_path / "policy.d" / "50-local.toml").write_text("[limits]\n")
        assert readable(watcher.fileno()) and watcher.changed()
    finally:
        watcher.close()

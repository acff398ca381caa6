"""What the agent owns and where its timers stand, for `plan` and `status`.

The running agent builds this report (Agent.report) and offers it over D-Bus
or, while no D-Bus API is offered, in a runtime file (RUNTIME_DIRECTORY/report.json,
rewritten every 15 s when calm, every second under pressure and after every action,
never fsynced: it is a view, the change journal is the record). The CLI
reads the agent's report when the agent runs, else builds the same view from
the change journal. `restore_verdict` is the one place that says what
`conntrack-agent restore` would do with an owned value.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

REPORT_NAME = "report.json"
DEFAULT_RUNTIME_DIR = "/run/conntrack-agent"
# A report older than this is from an agent that stopped or hangs: not trusted (the
# agent rewrites it every 15 s when calm, every second under pressure and after each
# action: service.METRICS_CALM_INTERVAL).
STALE_AFTER = 30.0
# `restore` does not lower the max below what the table holds with this margin:
# new connections would be dropped at once.
RESTORE_MAX_HEADROOM = 0.9


def runtime_path() -> str:
    """systemd's RuntimeDirectory= (RUNTIME_DIRECTORY) when set, else /run/conntrack-agent."""
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or DEFAULT_RUNTIME_DIR
    return os.path.join(base, REPORT_NAME)


def restore_verdict(name: str, original: int, applied: int, current: Optional[int], count: Optional[int] = None,
                    force: bool = False) -> Tuple[str, str]:
    """(verdict, sentence): "restore", "done" (already the original), "keep" (another writer
    changed it), "wait" (the max would be too tight for today's table)."""
    if current is None:
        return "unknown", f"cannot read it now; restore would write {original}"
    if current == original:
        return "done", f"already {current}, the original"
    if current != applied and not force:
        return "keep", (f"left at {current}: another writer changed it after the agent set {applied} "
                        f"(--force restores {original} anyway)")
    if name == "nf_conntrack_max" and count is not None and count >= RESTORE_MAX_HEADROOM * original and not force:
        return "wait", (f"not lowered to {original}: the table holds {count} entries and new connections "
                        "would be dropped (--force to do it anyway)")
    return "restore", f"{current} -> {original}"


def write_runtime(path: str, data: Dict[str, Any]) -> None:
    """Atomically replace the runtime report (tmpfs; no fsync: a view, not a record)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    payload = json.dumps(data, default=str, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_runtime(path: Optional[str] = None, now: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """The running agent's report, or None (no agent, or a stale report)."""
    path = path or runtime_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        import stat
        if not stat.S_ISREG(st.st_mode) or st.st_size > (1 << 20):
            return None
        data = json.loads(os.read(fd, 1 << 20))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        return None
    now = time.time() if now is None else now
    if now - float(data.get("written_at", 0)) > STALE_AFTER:
        return None
    pid = data.get("pid")
    if isinstance(pid, int) and pid > 0 and not os.path.exists(f"/proc/{pid}"):
        return None
    return data


def format_owned(owned: List[Dict[str, Any]]) -> List[str]:
    if not owned:
        return ["owned changes: none (the agent has changed nothing that is still in force)"]
    lines = ["owned changes (original = what `conntrack-agent restore` puts back):"]
    for o in owned:
        where = f" in netns {o['netns']}" if o.get("netns") else ""
        flags = []
        if o.get("pending"):
            flags.append("write not confirmed")
        if o.get("orphan"):
            flags.append("its rule is gone: restored once calm")
        extra = f" [{'; '.join(flags)}]" if flags else ""
        lines.append(f"  {o['name']}{where}: {o.get('current', o['applied'])} (original {o['original']}, "
                     f"rule {o['rule'] or '-'}){extra}")
        lines.append(f"      restore: {o.get('restore', '?')}")
    return lines


def format_rules(rules: List[Dict[str, Any]]) -> List[str]:
    lines = ["rules:"]
    for r in rules:
        parts = []
        if not r.get("enabled", True):
            parts.append("disabled")
        if r.get("cooldown_left"):
            parts.append(f"cooldown {r['cooldown_left']:.1f}s left")
        if r.get("held_for") is not None:
            need = r.get("sustained") or 0
            parts.append(f"usage held {r['held_for']:.1f}s" + (f" of {need:g}s" if need else ""))
        if r.get("episode_for") is not None:
            where = ", ".join(n or "own netns" for n in r.get("covered", [])) or "dry run"
            parts.append(f"episode active for {r['episode_for']:.0f}s ({where})")
        if r.get("calm_for") is not None:
            parts.append(f"calm for {r['calm_for']:.0f}s" + (f" of {r['restore_after']:g}s"
                                                               if r.get("restore_after") else ""))
        if r.get("lost"):
            parts.append("unavailable: " + ", ".join(r["lost"]))
        lines.append(f"  {r['name']} ({r['action']}): " + ("; ".join(parts) or "idle"))
    return lines

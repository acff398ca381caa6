"""Daily peaks, and the static settings they recommend (`conntrack-agent recommend`).

The agent keeps a small rolling record next to its state file (peaks.json: one
entry a day, the last 90 days): the highest entry count of any watched
namespace, the fastest fill rate, the max the agent raised the table to, and the
max in force. An operator who would rather size the table statically (sysctl.d,
kube-proxy's conntrack settings) gets numbers backed by the node's own history.

The file is a convenience, not a record the agent's safety depends on: a
damaged one is replaced by a fresh record, never trusted in part.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from typing import Any, Dict, List, Optional

KEEP_DAYS = 90
MAX_FILE_BYTES = 256 * 1024
FIELDS = ("count", "fill_rate", "raised_to", "max")
# Recommend room for a storm this much larger than the worst day seen.
HEADROOM = 2.0
# Fewer days than this and the recommendation says it rests on little history.
ENOUGH_DAYS = 7


def path_beside(state_file: str) -> str:
    return os.path.join(os.path.dirname(state_file) or ".", "peaks.json")


class Peaks:
    def __init__(self, days: Optional[Dict[str, Dict[str, float]]] = None) -> None:
        self.days: Dict[str, Dict[str, float]] = days or {}
        self.changed = False

    def note(self, day: str, count: int, fill_rate: float, maximum: int, raised_to: Optional[int]) -> None:
        entry = self.days.setdefault(day, {"count": 0, "fill_rate": 0.0, "raised_to": 0, "max": 0})
        values = {"count": count, "fill_rate": round(max(0.0, fill_rate), 1), "max": maximum,
                  "raised_to": raised_to or 0}
        for key, value in values.items():
            if value > entry[key]:
                entry[key] = value
                self.changed = True
        for old in sorted(self.days)[:-KEEP_DAYS]:
            del self.days[old]

    # ------------------------------------------------------------------ file

    @classmethod
    def load(cls, path: str) -> "Peaks":
        """The record, or an empty one when missing, unreadable or not ours."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return cls()
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return cls()
            data = json.loads(os.read(fd, MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES])
        except (OSError, ValueError, RecursionError):
            return cls()
        finally:
            os.close(fd)
        days: Dict[str, Dict[str, float]] = {}
        raw = data.get("days") if isinstance(data, dict) else None
        if isinstance(raw, dict):
            for day, entry in list(raw.items())[-KEEP_DAYS:]:
                if not (isinstance(day, str) and len(day) == 10 and isinstance(entry, dict)):
                    continue
                values = {k: entry.get(k) for k in FIELDS}
                if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       and 0 <= v < 2 ** 63 for v in values.values()):
                    days[day] = values
        return cls(days)

    def save(self, path: str) -> None:
        """Atomically, with a fresh temporary name opened O_EXCL|O_NOFOLLOW."""
        directory = os.path.dirname(path) or "."
        tmp = os.path.join(directory, f".peaks.{os.getpid()}.{time.monotonic_ns()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps({"version": 1, "days": self.days}, sort_keys=True).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.changed = False


def recommend(peaks: Peaks, cpus: int, current_max: int, current_buckets: int) -> Dict[str, Any]:
    """Static settings from the history, with the reasoning behind each."""
    days = sorted(peaks.days)
    if not days:
        return {"days": 0, "reasons": ["no history yet: the agent records a day's peaks as it runs"]}
    worst = max(days, key=lambda d: peaks.days[d]["count"])
    peak = int(peaks.days[worst]["count"])
    raised = int(max(peaks.days[d]["raised_to"] for d in days))
    fastest = max(peaks.days[d]["fill_rate"] for d in days)
    wanted = max(int(peak * HEADROOM), 1024)
    maximum = 1 << math.ceil(math.log2(wanted))   # a power of two, as the kernel sizes its defaults
    buckets = maximum                               # the kernel's own ratio since 5.15: max = buckets
    reasons = [
        f"the highest count in {len(days)} day(s) of history ({days[0]} to {days[-1]}) was {peak} entries, "
        f"on {worst}; the fastest fill rate {fastest:.0f}/s",
        f"nf_conntrack_max {maximum}: room for {HEADROOM:g}x that peak, rounded up to a power of two"
        + (f" (the agent had to raise the max to {raised})" if raised else ""),
        f"nf_conntrack_buckets {buckets}: one bucket per entry, the kernel's own default ratio (>= 5.15); "
        "each bucket costs 8 bytes",
        f"kube-proxy conntrack.min {maximum} with conntrack.maxPerCore {math.ceil(maximum / max(1, cpus))} "
        f"({cpus} CPUs here), or maxPerCore 0 to leave the max to sysctl.d",
    ]
    if len(days) < ENOUGH_DAYS:
        reasons.append(f"only {len(days)} day(s) of history: a week or more, including a deploy or an outage, "
                       "gives a sounder figure")
    if maximum < current_max:
        reasons.append(f"the max in force ({current_max}) is already above this: nothing needs raising")
    return {"days": len(days), "peak_count": peak, "peak_day": worst, "fastest_fill_rate": fastest,
            "raised_to": raised, "nf_conntrack_max": maximum, "nf_conntrack_buckets": buckets,
            "kube_proxy": {"conntrack.min": maximum, "conntrack.maxPerCore": math.ceil(maximum / max(1, cpus))},
            "current": {"nf_conntrack_max": current_max, "nf_conntrack_buckets": current_buckets},
            "sysctl_d": [f"net.netfilter.nf_conntrack_max = {maximum}",
                         f"net.netfilter.nf_conntrack_buckets = {buckets}"],
            "reasons": reasons}


def lines(advice: Dict[str, Any]) -> List[str]:
    out = []
    if advice.get("nf_conntrack_max"):
        out += ["# /etc/sysctl.d/60-conntrack.conf (with [baseline] from_sysctl_d = true, the agent applies it",
                "# the moment nf_conntrack loads; systemd-sysctl alone may run before that)"]
        out += advice["sysctl_d"]
        kp = advice["kube_proxy"]
        out += ["", "# kube-proxy (KubeProxyConfiguration)", "conntrack:",
                f"  min: {kp['conntrack.min']}", f"  maxPerCore: {kp['conntrack.maxPerCore']}"]
        out.append("")
    out.append("why:")
    out += [f"  - {reason}" for reason in advice["reasons"]]
    return out

#!/usr/bin/python3
"""How much slower a machine runs the same work: the VM under TCG against its host.

The module-load benchmark (tests/system/test_boot_vm.py) can only load a module
in a Debian 12 VM, and these machines run that VM under qemu's TCG (no usable
KVM): every instruction is emulated. To turn what it measures there into an
estimate for a real node, this script runs the same three workloads in the VM
and on the host, with the same interpreter (Debian 12's /usr/bin/python3), and
the ratio of the medians is the slowdown of that kind of work:

- cpu: pure-Python interpreter work (dicts, integers, a loop), as the agent's
  decisions and its log formatting are;
- sysctl: the agent's baseline write path itself (procfs.read_sysctl and
  procfs.write_sysctl on two nf_conntrack timeouts, each value written back
  unchanged), system calls into /proc/sys; run it in a throw-away network
  namespace (`unshare -n`), where the timeouts are that namespace's own;
- spawn: fork and exec of /bin/true and its exit, as `modprobe` starts.

usage: [unshare -n] python3 bench/calibrate_tcg.py [--reps N]   (PYTHONPATH: the agent)
Prints one JSON object: per workload the median, min and max milliseconds of one
repetition, and the repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List

from conntrack_agent import procfs

SYSCTLS = ("nf_conntrack_tcp_timeout_established", "nf_conntrack_udp_timeout")


def cpu() -> None:
    counts: Dict[int, int] = {}
    total = 0
    for i in range(20000):
        key = i & 255
        counts[key] = counts.get(key, 0) + i
        total += i * i % 7
    if total < 0:  # pragma: no cover - keeps the loop from being dead code
        raise AssertionError


def sysctl() -> None:
    for _ in range(10):
        for name in SYSCTLS:
            procfs.write_sysctl(name, procfs.read_sysctl(name))


def spawn() -> None:
    subprocess.run(["/bin/true"], check=True)


WORKLOADS: Dict[str, Callable[[], None]] = {"cpu": cpu, "sysctl": sysctl, "spawn": spawn}
WHAT = {"cpu": "20000 iterations of a pure-Python dict and integer loop",
        "sysctl": "10 × (read + write back) of 2 nf_conntrack timeouts through procfs",
        "spawn": "fork + exec /bin/true + wait"}


def measure(work: Callable[[], None], reps: int) -> List[float]:
    work()  # warm: the first call pays imports and page faults
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=31)
    args = ap.parse_args()
    out = {"python": platform.python_version(), "kernel": platform.release(), "reps": args.reps, "ms": {}}
    for name, work in WORKLOADS.items():
        times = measure(work, args.reps)
        out["ms"][name] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                           "what": WHAT[name]}
    out["loadavg"] = os.getloadavg()[0]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

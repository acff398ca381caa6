#!/usr/bin/python3
"""ctnetlink client A/B: this tree's ctnetlink.py against another revision's, side by side.

Not a test. Needs root, iproute2 and nftables. One namespace is filled with
real unreplied UDP entries (IPv4 and IPv6; at most 20k, below the size for
which tests/rig.py asks for its global lock); both versions of the module are
loaded into one process, each with its own kept-open socket in that
namespace, and timed in round-robin: GET_STATS (count + max, every tick),
GET_STATS_CPU (the per-CPU counters) and a full parsed dump. Each stats call
is timed on its own (perf_counter_ns, gc off); a dump is timed whole and
reported in entries per second. Figures are medians over all rounds: a
shared VM is noisy, and interleaving keeps the noise equal for both. The
CPU-time figures (the thread's, kernel work in its syscalls included) leave
out the time other processes held the CPU, which dominates wall-clock
spread on a busy machine.

    bench/ctnetlink_ab.py --base main            # main's ctnetlink.py against the work tree's
    bench/ctnetlink_ab.py --base HEAD~3 --rounds 5 --entries 2000   # smoke
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

MODULE = "agent/conntrack_agent/ctnetlink.py"


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def revision_source(rev: str, where: Path) -> Path:
    text = subprocess.run(["git", "-C", str(benchlib.REPO), "show", "%s:%s" % (rev, MODULE)],
                          check=True, capture_output=True, text=True).stdout
    where.write_text(text)
    return where


def time_calls(call, n: int, out: List[int], cpu: List[float]) -> None:
    """Each call's wall-clock ns into ``out``; the batch's CPU time per call into ``cpu``."""
    clock = time.perf_counter_ns
    c = time.thread_time()
    for _ in range(n):
        t = clock()
        call()
        out.append(clock() - t)
    cpu.append((time.thread_time() - c) / n)


def time_dump(ct: Any):
    """(entries per wall-clock second, entries per CPU second, entries)."""
    c = time.thread_time()
    t = time.perf_counter()
    n = sum(1 for _ in ct.dump())
    return n / (time.perf_counter() - t), n / (time.thread_time() - c), n


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="main", help="revision to compare with (default %(default)s)")
    ap.add_argument("--entries", type=int, default=20000, help="table size (default %(default)s, at most 20000)")
    ap.add_argument("--rounds", type=int, default=30, help="round-robin rounds (default %(default)s)")
    ap.add_argument("--batch", type=int, default=500, help="stats calls per version per round (default %(default)s)")
    args = ap.parse_args(argv)
    refused = benchlib.refuse("bench/ctnetlink_ab.py", tools=("ip", "nft"))
    if refused is not None:
        return refused
    entries = min(args.entries, 20000)
    sys.path.insert(0, str(benchlib.REPO / "tests"))
    sys.path.insert(0, str(benchlib.REPO / "agent"))
    import rig

    with tempfile.TemporaryDirectory() as tmp:
        versions = {"base " + args.base: load(revision_source(args.base, Path(tmp) / "base.py"), "ct_base"),
                    "work tree": load(benchlib.REPO / MODULE, "ct_work")}
    with rig.Namespace() as ns:
        ns.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=3600"])
        rig.flood_udp(ns, entries * 3 // 4)
        rig.flood_udp(ns, entries - entries * 3 // 4, family=6)
        socks = {label: m.CtnetlinkSocket(netns=ns.name) for label, m in versions.items()}
        names = ("stats", "stats_cpu", "cpu", "cpu_cpu", "dump", "dump_cpu")
        got: Dict[str, Dict[str, list]] = {k: {n: [] for n in names} for k in socks}
        seen = {}
        gc.disable()
        for i in range(args.rounds + 1):   # round 0 warms up (and learns the entry layouts)
            # Alternate who goes first, so neither always follows the other's dump.
            for label, ct in (list(socks.items()) if i % 2 else list(socks.items())[::-1]):
                g = got[label] if i else {n: [] for n in names}
                time_calls(ct.stats, args.batch, g["stats"], g["stats_cpu"])
                time_calls(ct.cpu_stats, args.batch // 5, g["cpu"], g["cpu_cpu"])
                rate, cpu_rate, n = time_dump(ct)
                g["dump"].append(rate)
                g["dump_cpu"].append(cpu_rate)
                seen[label] = (n, ct.stats()[0])
                gc.collect()
        gc.enable()
        for ct in socks.values():
            ct.close()
        ns.run("conntrack -F", check=False)

    print("kernel %s, %d CPUs, Python %s; %d entries (dumped/counted: %s); %d rounds"
          % (platform.release(), os.cpu_count(), platform.python_version(), entries,
             ", ".join("%s %d/%d" % (k, *v) for k, v in seen.items()), args.rounds))
    print("command: %s" % " ".join(["bench/ctnetlink_ab.py"] + list(argv if argv is not None else sys.argv[1:])))
    print("| median | " + " | ".join(socks) + " |")
    print("| --- | " + " | ".join("---:" for _ in socks) + " |")
    rows = [("stats() µs", "stats", 1e-3), ("stats() CPU µs", "stats_cpu", 1e6),
            ("cpu_stats() µs", "cpu", 1e-3), ("cpu_stats() CPU µs", "cpu_cpu", 1e6),
            ("dump entries/s", "dump", 1), ("dump entries/CPU-s", "dump_cpu", 1)]
    for title, name, scale in rows:
        print("| %s | %s |" % (title, " | ".join(
            ("%.2f" if scale != 1 else "%.0f") % (statistics.median(got[k][name]) * scale) for k in socks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

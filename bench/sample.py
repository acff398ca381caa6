#!/usr/bin/python3
"""Sampling cost: microseconds per sample, the agent's sampler against the alternatives.

Not a test. Needs root, iproute2, nftables and conntrack-tools. One namespace
(tests/rig.py) is filled with real unreplied UDP entries to each --sizes in turn
(its UDP timeout raised so none expire meanwhile); at each size a child started
inside the namespace times, in round-robin, every way of reading the table:

- the agent's Sampler.sample(), both ways a tick reads: count and max only
  (ctnetlink GET_STATS, the fill-rate update), what a tick reads below half
  full except once a second; and with the per-CPU drop counters and the
  buckets sysctl as well (GET_STATS_CPU, `sample(counters=True)`), what every tick
  reads at or above half full; its kernel reads and requests alone;
- a plain os.pread of a kept-open /proc/sys/net/netfilter/nf_conntrack_count;
- pyroute2 Conntrack.count() on a kept-open instance: Debian 12's 0.7.2 (the
  dev venv) and, when $BENCH_VENV_PYTHON (default /work/venv-bench/bin/python)
  has it, PyPI's 0.9.x in a helper process;
- `conntrack -C`, a process per sample, as a shell script would.

Each call is timed on its own (perf_counter_ns, gc off); the figure is the median
of all calls of one run. Medians, not means: this VM is shared and noisy.

    bench/sample.py                                 # 0, 100k, 250k entries; writes bench/results/sample.md
    bench/sample.py --sizes 0,500 --rounds 2 --out /tmp/x.md    # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

METHODS = [
    ("sampler", "agent: `Sampler.sample()`, count + max only (and the fill rate)"),
    ("sampler_counters", "agent: `Sampler.sample(counters=True)`, with the per-CPU counters"),
    ("probe_read", "└ its kernel reads, count + max only (`LinuxProbe.read`: GET_STATS)"),
    ("probe_read_counters", "└ its kernel reads with the counters (+ GET_STATS_CPU)"),
    ("ct_stats", "&nbsp;&nbsp;└ ctnetlink GET_STATS alone (count + max)"),
    ("ct_cpu_stats", "&nbsp;&nbsp;└ ctnetlink GET_STATS_CPU alone (drop, early_drop, … per CPU, summed)"),
    ("model", "└ its pure-Python part (`FillTracker.update` + `model.combine`)"),
    ("proc_pread", "plain `os.pread` of a kept-open nf_conntrack_count"),
    ("pyroute2_debian", "pyroute2 %s `Conntrack.count()` (Debian 12)"),
    ("pyroute2_pypi", "pyroute2 %s `Conntrack.count()` (PyPI)"),
    ("conntrack_C", "`conntrack -C` (a process per sample)"),
]
SLOW = {"conntrack_C"}

# The PyPI pyroute2 runs in its own venv: a helper that times its own calls.
_HELPER = r"""
import gc, json, sys, time
import pyroute2
from pyroute2 import Conntrack
ct = Conntrack()
ct.count()
print(json.dumps({"version": pyroute2.__version__}), flush=True)
gc.disable()
clock = time.perf_counter_ns
for line in sys.stdin:
    out, value = [], None
    for _ in range(int(line)):
        t = clock(); value = ct.count(); out.append(clock() - t)
    print(json.dumps({"ns": out, "value": value}), flush=True)
"""


# ----------------------------------------------------------------------------- child (inside the namespace)

def _version(dist: str, module: Any) -> str:
    # Debian's build of pyroute2 0.7.2 reports __version__ "unknown"; its metadata knows.
    version = getattr(module, "__version__", "unknown")
    if version in ("unknown", "", None):
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(dist)
        except Exception:  # noqa: BLE001
            version = "?"
    return str(version)


def measure(rounds: int, batch: int, slow_batch: int, pypi_python: Optional[str]) -> Dict[str, Any]:
    from conntrack_agent import kernel as kernel_module
    from conntrack_agent import model
    from conntrack_agent.ctnetlink import CtnetlinkSocket
    from conntrack_agent.kernel import LinuxProbe
    from conntrack_agent.sampler import Sampler

    from conntrack_agent import sampler as sampler_module

    # Without `counters`, a probe's read (kernel.LinuxProbe.read) skips the per-CPU counters
    # unless the table is at least kernel.COUNTERS_EVERY_TICK_FROM full or the sampler's
    # refresh (every COUNTERS_REFRESH) falls due: both set out of reach here, so the count +
    # max variant never reads them and the counters variant always does (counters=True),
    # whatever this table's usage.
    every_tick_from, refresh = kernel_module.COUNTERS_EVERY_TICK_FROM, kernel_module.COUNTERS_REFRESH
    kernel_module.COUNTERS_EVERY_TICK_FROM = float("inf")
    kernel_module.COUNTERS_REFRESH = sampler_module.COUNTERS_REFRESH = float("inf")
    samplers = []
    for _ in range(2):
        s = Sampler(("",), 0.5)
        s.open_missing()
        if not s.probes:
            raise RuntimeError("sampler could not open: %s" % s.unavailable)
        s.sample(counters=True)   # the counters' first read, so both start alike
        samplers.append(s)
    sampler, sampler_counters = samplers
    probe = LinuxProbe("")
    tracker = model.FillTracker(0.5)
    reading = probe.read(time.monotonic, counters=True)
    ct = CtnetlinkSocket()
    fd = os.open("/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY)

    def python_part() -> int:
        r = model.Reading(reading.netns, time.monotonic(), reading.count, reading.max, reading.buckets,
                          reading.counters)
        return model.combine((r,), (tracker.update(r),)).count

    calls: Dict[str, Callable[[], Any]] = {
        "sampler": lambda: sampler.sample().count,
        "sampler_counters": lambda: sampler_counters.sample(counters=True).count,
        "probe_read": lambda: probe.read(time.monotonic).count,
        "probe_read_counters": lambda: probe.read(time.monotonic, counters=True).count,
        "model": python_part,
        "ct_stats": lambda: ct.stats()[0],
        "ct_cpu_stats": lambda: ct.cpu_stats().get("drop", 0),
        "proc_pread": lambda: int(os.pread(fd, 32, 0)),
        "conntrack_C": lambda: int(subprocess.run(["conntrack", "-C"], capture_output=True).stdout),
    }
    versions: Dict[str, str] = {}
    try:
        import pyroute2
        from pyroute2 import Conntrack

        pr = Conntrack()
        calls["pyroute2_debian"] = pr.count
        versions["pyroute2_debian"] = _version("pyroute2", pyroute2)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        versions["pyroute2_debian"] = "unavailable: %s" % exc
    helper = None
    if pypi_python and os.path.exists(pypi_python):
        helper = subprocess.Popen([pypi_python, "-c", _HELPER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        line = helper.stdout.readline()
        if line:
            versions["pyroute2_pypi"] = json.loads(line)["version"]
        else:
            helper = None
            versions["pyroute2_pypi"] = "unavailable: helper failed (pyroute2 missing in %s?)" % pypi_python
    else:
        versions["pyroute2_pypi"] = "unavailable: no %s" % pypi_python

    samples: Dict[str, List[int]] = {name: [] for name, _ in METHODS}
    seen: Dict[str, Any] = {}
    clock = time.perf_counter_ns
    count_before = int(os.pread(fd, 32, 0))
    gc.disable()
    for i in range(rounds + 1):   # round 0 warms every method up and is not counted
        for name, _label in METHODS:
            n = slow_batch if name in SLOW else batch
            if name == "pyroute2_pypi":
                if helper is None:
                    continue
                helper.stdin.write("%d\n" % n)
                helper.stdin.flush()
                got = json.loads(helper.stdout.readline())
                if i:
                    samples[name] += got["ns"]
                seen[name] = got["value"]
                continue
            call = calls.get(name)
            if call is None:
                continue
            out = samples[name] if i else []
            value = None
            for _ in range(n):
                t = clock()
                value = call()
                out.append(clock() - t)
            seen[name] = value
    gc.enable()
    count_after = int(os.pread(fd, 32, 0))
    if helper is not None:
        helper.stdin.close()
        helper.wait(timeout=10)
    return {"samples": {k: v for k, v in samples.items() if v}, "seen": seen, "versions": versions,
            "count_before": count_before, "count_after": count_after, "max": reading.max,
            "counters_every_tick_from": every_tick_from, "counters_refresh": refresh}


# ----------------------------------------------------------------------------- parent

def run_size(rig, ns, size: int, args) -> Dict[str, Any]:
    have = rig.conntrack_count(ns)
    if size > have:
        # A new destination range each time: a refill never repeats a tuple.
        rig.flood_udp(ns, size - have, dst="127.%d.0.2" % (64 + run_size.fills))
        run_size.fills += 1
    env = dict(os.environ, PYTHONPATH=str(benchlib.REPO / "agent"))
    me = str(Path(__file__).resolve())
    out = subprocess.run(ns.argv([benchlib.AGENT_PYTHON, me, "--role", "measure", "--rounds", str(args.rounds),
                                  "--batch", str(args.batch), "--slow-batch", str(args.slow_batch),
                                  "--pypi-python", args.pypi_python]),
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError("measuring child failed: " + out.stderr)
    got = json.loads(out.stdout)
    got["size"] = size
    got["medians_us"] = {k: benchlib.median(v) / 1000 for k, v in got["samples"].items()}
    got["calls"] = {k: len(v) for k, v in got["samples"].items()}
    return got


run_size.fills = 0


VARIANTS = [
    ("sampler", "count + max only", "probe_read"),
    ("sampler_counters", "with the per-CPU counters", "probe_read_counters"),
]


def pays(r: Dict[str, Any]) -> str:
    """Which variant the agent pays on every tick at this table's usage."""
    usage = r["count_before"] / r["max"] if r.get("max") else 0.0
    return "sampler_counters" if usage >= r["counters_every_tick_from"] else "sampler"


def _why(results: List[Dict[str, Any]], name: str, target_us: float) -> str:
    worst = max(results, key=lambda r: r["medians_us"][name])["medians_us"]
    base = ("GET_STATS (count, max) %.1f µs and the pure-Python fill rate and Sample %.1f µs"
            % (worst.get("ct_stats", 0), worst.get("model", 0)))
    if name == "sampler_counters":
        # The buckets sysctl is read with the counters (it changes only on a resize).
        return ("GET_STATS_CPU for the drop counters (a dump: a send, a message per CPU, a second recv for "
                "NLMSG_DONE) %.1f µs and the buckets pread ~%.1f µs on top of %s"
                % (worst.get("ct_cpu_stats", 0), worst.get("proc_pread", 0), base))
    return base + ("; no single part is over the target, their sum is" if worst.get("ct_stats", 0) <= target_us
                   else "")


def targets(results: List[Dict[str, Any]], target_us: float) -> List[Dict[str, Any]]:
    out = []
    when = {"sampler": "count + max only, a tick below half full",
            "sampler_counters": "with the per-CPU counters, every tick at ≥ 50% usage and once a second below"}
    for name, _label, _probe in VARIANTS:
        vals = [(r["size"], r["medians_us"][name]) for r in results if name in r["medians_us"]]
        met = all(v <= target_us for _, v in vals)
        out.append({"bench": "sample",
                    "target": "the agent's sample ≤ %g µs (median) at every table size — %s" % (
                        target_us, when[name]),
                    "met": met,
                    "figure": "; ".join("%d entries: %.1f µs" % (size, v) for size, v in vals),
                    "why": "" if met else _why(results, name, target_us)})
    return out


def _cell(v: Optional[float]) -> str:
    return "n/a" if v is None else ("%.1f" % v if v < 100 else "%.0f" % v)


def render(results: List[Dict[str, Any]], command: str, mach: Dict[str, Any], target_us: float,
           quiet_max: int) -> str:
    versions = results[0]["versions"]
    sizes = [r["size"] for r in results]
    share = results[0]["counters_every_tick_from"]
    refresh = results[0]["counters_refresh"]
    lines = ["# Sampling cost", ""] + benchlib.provenance(command, mach) + [
        "- one namespace filled with real unreplied UDP entries; at each size every method is timed "
        "in round-robin by one child process inside the namespace; each call timed on its own, "
        "median of all calls. Kept-open sockets/files for everything but `conntrack -C`.",
        "- calls per method and size: %s." % ", ".join(
            "%s %d" % (k, v) for k, v in sorted(results[0]["calls"].items())),
        "- entries during the measurement (nf_conntrack_max %d): %s." % (results[0]["max"], ", ".join(
            "%d→%d (%.0f%% full)" % (r["count_before"], r["count_after"], 100 * r["count_before"] / r["max"])
            for r in results)),
        "- the agent's sample, both ways: a tick reads the per-CPU drop counters (GET_STATS_CPU) only when "
        "this tick's count shows the table at least %.0f%% full, or when %g s have passed since they were "
        "last read (or when it is about to act: `sample(counters=True)`); otherwise count + max only. The "
        "bench times each way on its own, at every size, whatever the usage." % (share * 100, refresh),
        "",
        "| µs per sample (median) | " + " | ".join("%d entries" % s for s in sizes) + " |",
        "| --- | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for name, label in METHODS:
        if "%s" in label:
            version = versions.get(name, "?")
            if version.startswith("unavailable"):
                lines.append("| %s | %s |" % (label.replace("%s ", ""), " | ".join(version for _ in sizes)))
                continue
            label = label % version
        lines.append("| %s | %s |" % (label, " | ".join(_cell(r["medians_us"].get(name)) for r in results)))
    lines.append("| **what the agent pays per tick at this table's usage** | %s |" % " | ".join(
        "**%s** (%s)" % (_cell(r["medians_us"].get(pays(r))), "with counters" if pays(r) == "sampler_counters"
                         else "count + max") for r in results))
    calm = benchlib.calm_tick(quiet_max)
    every = max(1, math.ceil(refresh / calm - 1e-9))
    fast = benchlib.shipped_agent_settings().fast_interval
    quiet = ("the refresh is due on every tick: every idle tick pays the with-counters figure" if every == 1 else
             "the refresh is due every %d ticks: one idle tick in %d pays the with-counters figure, the others "
             "count + max" % (every, every))
    lines += [
        "",
        "Which one the agent pays when: below %.0f%% usage a tick costs the count + max figure, except the "
        "tick on which the %g s refresh falls due; at or above it, every tick costs the with-counters "
        "figure (here: %s). On a quiet node with this VM's max (%d, calm tick %.0f ms) %s. Under pressure "
        "below half full (the %.0f ms fast tick, e.g. a storm predicted to fill the table within a minute) "
        "one tick in %d reads them." % (
            share * 100, refresh, ", ".join("%d entries %s" % (r["size"], "with counters"
                                                              if pays(r) == "sampler_counters" else "count + max")
                                            for r in results),
            quiet_max, calm * 1000, quiet, fast * 1000, max(1, round(refresh / fast))),
        "",
    ]
    for t in targets(results, target_us):
        lines.append("Target: %s: %s — %s." % (t["target"], "met" if t["met"] else "**missed**", t["figure"]))
        if not t["met"]:
            lines.append("What it costs (medians at the worst size): %s." % t["why"])
    ratios = []
    agent = [r["medians_us"]["sampler"] for r in results]
    for name in ("pyroute2_debian", "pyroute2_pypi", "conntrack_C"):
        vals = [r["medians_us"].get(name) for r in results]
        if all(v is not None for v in vals):
            lo, hi = min(v / a for v, a in zip(vals, agent)), max(v / a for v, a in zip(vals, agent))
            short = {"pyroute2_debian": "pyroute2 %s (Debian)", "pyroute2_pypi": "pyroute2 %s (PyPI)",
                     "conntrack_C": "`conntrack -C`%s"}[name] % ("" if name == "conntrack_C" else versions[name])
            ratios.append("%s %s×" % (short, "%.1f" % lo if hi - lo < 0.05 * hi else "%.1f–%.1f" % (lo, hi)))
    if ratios:
        lines += ["", "Cost relative to the agent's count + max sample, across the sizes: " + ", ".join(ratios)
                  + ". (pyroute2's `count()` and `conntrack -C` read the count only.)"]
    lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0,100000,250000", help="table sizes, ascending (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=20, help="round-robin rounds (default %(default)s)")
    ap.add_argument("--batch", type=int, default=200, help="calls per method per round (default %(default)s)")
    ap.add_argument("--slow-batch", type=int, default=10, help="calls of conntrack -C per round (default %(default)s)")
    ap.add_argument("--pypi-python", default=benchlib.BENCH_VENV_PYTHON,
                    help="interpreter with PyPI's pyroute2 (default %(default)s)")
    ap.add_argument("--target-us", type=float, default=10.0, help="the issue's target (default %(default)s)")
    ap.add_argument("--out", help="markdown file (default bench/results/sample.md); .json beside it")
    ap.add_argument("--role", choices=("measure",), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "measure":
        print(json.dumps(measure(args.rounds, args.batch, args.slow_batch, args.pypi_python)))
        return 0

    refused = benchlib.refuse("bench/sample.py")
    if refused is not None:
        return refused
    import rig

    benchlib.terminate_on_sigterm()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    mach = benchlib.machine()
    results = []
    # A 250k table is big for a shared VM: hold the lock; max may need to exceed the biggest size.
    benchlib.compile_agent()   # the agent as installed: from compiled bytecode
    with rig.saved_global_sysctls() as saved:
        need = int(max(sizes) * 1.1) + 1024
        if rig.read_sysctl("nf_conntrack_max") < need:
            rig.write_sysctl("nf_conntrack_max", need)
        with rig.Namespace() as ns:
            # Unreplied UDP entries live 30 s: long enough to fill, not to measure.
            ns.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=3600"])
            try:
                for size in sizes:
                    got = run_size(rig, ns, size, args)
                    results.append(got)
                    print(json.dumps({"size": size, "medians_us": got["medians_us"], "seen": got["seen"]}),
                          file=sys.stderr, flush=True)
            finally:
                ns.run("conntrack -F", check=False)
    md = render(results, benchlib.command_line("sample.py", argv), mach, args.target_us,
                saved["nf_conntrack_max"])
    path = benchlib.write_result("sample", md, args.out)
    path.with_suffix(".json").write_text(json.dumps({
        "targets": targets(results, args.target_us),
        "rows": [{k: v for k, v in r.items() if k != "samples"} for r in results]}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

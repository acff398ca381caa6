#!/usr/bin/python3
"""Idle cost: what the agent costs a quiet node, and where its memory goes.

Not a test. Needs root and iproute2/nftables. A fresh namespace (tests/rig.py,
conntrack active, nothing in the table) is the quiet node; agents run inside it
with `ip netns exec`, watching their own namespace as the shipped policy does,
all at once for --duration seconds after a --warmup:

- default policy, as the unit runs it: GLib main loop with the D-Bus API, on a
  private bus (dbus-daemon --session standing in for the system bus, which this
  VM lacks; DBUS_SYSTEM_BUS_ADDRESS points the agent at it). Its calm tick follows
  the free room (config/policy.toml: the time a storm of agent.storm_rate needs to
  fill a quarter of it, between fast_interval and interval): with an empty table
  and this VM's max, the label says how long;
- default policy with --no-dbus (the plain select() loop);
- both again at the fast-tick rate (interval = fast_interval = 50 ms).

The agent package is compiled first (python -m compileall -q agent/), as an
installed package ships it: this environment sets PYTHONDONTWRITEBYTECODE=1,
and an agent without .pyc files compiles every module at start (~3 MB RSS).

Per agent, from /proc over the window: CPU (schedstat run time, all threads) as
seconds per hour and % of one core, wake-ups per second (voluntary + involuntary
context switches, all threads), RSS (VmRSS, VmHWM) and smaps_rollup's Pss and
private memory.

Then, since RSS is the tight target, an import ladder in fresh interpreters
doing what `conntrack-agent run` does, in its order (ssl kept out first, as
cli._keep_tls_out does; structlog through conntrack_agent.logsetup, which puts its
stand-ins in sys.modules first; the agent's other modules; the D-Bus API through
dbus_service; RSS, Pss, import time and the packages each step really loads), the
same with structlog replaced by a stub, `python -X importtime` to name who imports
the heavy modules (or that they are not loaded), and tracemalloc's Python-heap bytes.

    bench/idle.py                       # 150 s; writes bench/results/idle.md (+ .json)
    bench/idle.py --duration 3 --warmup 1 --out /tmp/x.md     # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

RSS_TARGET_MB = 25.0
CPU_TARGET_PCT = 0.1
MODES = [
    # name, policy extra, D-Bus (service loop), label ({calm}: the calm tick on this node)
    ("default", "", True, "default policy (calm tick {calm}), as the unit runs it (GLib loop + D-Bus API)"),
    ("default-nodbus", "", False, "default policy (calm tick {calm}), --no-dbus (select loop)"),
    ("fast", benchlib.FAST_TICK, True, "fast tick (50 ms), GLib loop + D-Bus API"),
    ("fast-nodbus", benchlib.FAST_TICK, False, "fast tick (50 ms), --no-dbus"),
]

# What `conntrack-agent run` imports, in groups, for the ladder.
AGENT_CORE = ("conntrack_agent.cli,conntrack_agent.config,conntrack_agent.service,conntrack_agent.sampler,"
              "conntrack_agent.executor,conntrack_agent.decisions,conntrack_agent.mainloop,"
              "conntrack_agent.sdnotify,conntrack_agent.journald")
AGENT_DBUS = "conntrack_agent.dbus_service"
# `conntrack-agent run` (cli.cmd_run) marks ssl absent before anything imports
# structlog: should anything load asyncio, it runs without OpenSSL.
KEEP_TLS_OUT = "keep-tls-out"
# The daemon's order (cli.cmd_run): structlog only through logsetup, whose stand-ins
# for asyncio, shutil, uuid and pickle must be in place before structlog's imports;
# gi only through dbus_service, which answers PyGObject 3.50's asyncio itself.
LOGSETUP = "conntrack_agent.logsetup"
LADDERS = {
    "as the daemon runs": [
        ("ssl kept out (`cli._keep_tls_out`: sys.modules[\"ssl\"] = None)", KEEP_TLS_OUT),
        ("structlog, through conntrack_agent.logsetup (its stand-ins first)", LOGSETUP),
        ("the agent's other modules", AGENT_CORE),
        ("D-Bus: gi through dbus_service", AGENT_DBUS)],
    "structlog stubbed": [
        ("ssl kept out, a stub in place of structlog", KEEP_TLS_OUT + ",stub:structlog"),
        ("the agent's modules", AGENT_CORE), ("D-Bus: gi through dbus_service", AGENT_DBUS)],
    # For reference: what ssl costs a process that lets asyncio import it (the daemon
    # did before commit 8895219).
    "ssl not kept out (reference)": [("ssl, as asyncio imports it", "ssl")],
}


# ----------------------------------------------------------------------------- ladder child
# Run with `python -c`: the child imports nothing of its own before measuring.

_LADDER = r"""
import sys, time, importlib
trace = sys.argv[1] == "trace"
if trace:
    import tracemalloc
    tracemalloc.start()
STUB = (
    "import sys, types\n"
    "m = types.ModuleType('structlog')\n"
    "class _L:\n"
    "    def __init__(self, *a, **k): pass\n"
    "    def log(self, *a, **k): pass\n"
    "    def __getattr__(self, name): return lambda *a, **k: None\n"
    "m.configure = lambda **k: None\n"
    "m.get_logger = lambda *a, **k: _L()\n"
    "m.make_filtering_bound_logger = lambda level: _L\n"
    "m.PrintLoggerFactory = _L\n"
    "sys.modules['structlog'] = m\n"
)
def memory():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(line.split()[1])
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in ("Pss", "Private_Clean", "Private_Dirty"):
                out[k] = int(line.split()[1])
    out["Private"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
    if trace:
        out["heap"] = tracemalloc.get_traced_memory()[0] // 1024
    return out
def real():
    # a stand-in (a module object made by hand) has no __spec__; ssl kept out is None
    return {k for k, v in list(sys.modules.items()) if v is not None and vars(v).get("__spec__") is not None}
seen = real()
rows = [dict(step="interpreter", ms=0.0, modules=len(sys.modules), **memory())]
for step in sys.argv[2:]:
    t = time.perf_counter()
    for name in step.split(","):
        if name == "stub:structlog":
            exec(STUB, {})
        elif name == "keep-tls-out":
            if "ssl" not in sys.modules:
                sys.modules["ssl"] = None
        else:
            importlib.import_module(name)
    ms = (time.perf_counter() - t) * 1000
    now = real()
    added = sorted({m.split(".", 1)[0] for m in now - seen})
    seen = now
    stand_ins = sorted(k for k, v in sys.modules.items() if type(v).__module__.startswith("conntrack_agent"))
    std = set(getattr(sys, "stdlib_module_names", ()))
    rows.append(dict(step=step, ms=ms, modules=len(sys.modules), added=added, stand_ins=stand_ins,
                     stdlib=[m for m in added if m in std], **memory()))
import json
print(json.dumps({"steps": rows}))
"""


def run_ladder(steps: Sequence[str], trace: bool = False) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(benchlib.REPO / "agent"))
    cmd = [benchlib.AGENT_PYTHON, "-c", _LADDER, "trace" if trace else "plain"] + list(steps)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0:
        raise RuntimeError("ladder failed: " + out.stderr)
    return json.loads(out.stdout)


def import_chains(modules: Sequence[str]) -> Dict[str, List[str]]:
    """Who imports each of ``modules`` first, as the daemon imports (ssl kept out), from
    `python -X importtime` (child before parent). A module kept out, which importtime
    still lists as a failed attempt, maps to an empty chain."""
    env = dict(os.environ, PYTHONPATH=str(benchlib.REPO / "agent"))
    code = ("import json, sys\nsys.modules['ssl'] = None\nimport " + ", ".join(AGENT_CORE.split(",") + [AGENT_DBUS])
            + "\nprint(json.dumps([m for m in %r if sys.modules.get(m) is not None "
               "and vars(sys.modules[m]).get('__spec__') is not None]))" % (list(modules),))
    proc = subprocess.run([benchlib.AGENT_PYTHON, "-X", "importtime", "-c", code], capture_output=True,
                          text=True, env=env, timeout=120)
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    err = proc.stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, _, name = line.split("|", 2)
        if name.strip() == "imported package":
            continue
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((depth, name.strip()))
    chains = {}
    for target in modules:
        if target not in loaded:
            chains[target] = []
            continue
        idx = next((i for i, (_, n) in enumerate(rows) if n == target), None)
        if idx is None:
            continue
        chain, depth = [target], rows[idx][0]
        for d, n in rows[idx + 1:]:
            if d == depth - 1:
                chain.append(n)
                depth = d
                if d == 0:
                    break
        chains[target] = list(reversed(chain))
    return chains


# The agent's tick, warm and in-process, with cProfile: which parts of a tick cost what.
# The agent runs on a simulated clock that advances by each tick's own interval, so
# what is rate-limited by time (the per-CPU counters' 1 s refresh, STATUS= once a
# second) happens as often per tick as on the quiet node, without the sleeps.
_TICK_PROFILE = r"""
import cProfile, json, os, pstats, sys, time
from pathlib import Path
from conntrack_agent import config, logsetup, service
logsetup.configure("json", stream=open(os.devnull, "w"))
now = [time.monotonic()]
# As `conntrack-agent run --no-dbus` makes it: the runtime report goes to a file (beside
# the bench's policy), the metrics textfile to the bench's own directory.
run_dir = Path(sys.argv[1]).parent / "run"
run_dir.mkdir(exist_ok=True)
agent = service.Agent(None, False, logsetup.get_logger(), clock=lambda: now[0],
                      initial=config.load(Path(sys.argv[1])), report_path=str(run_dir / "report.json"))
agent.start()
n = int(sys.argv[2])
intervals = []
def ticks(k):
    for _ in range(k):
        delay = agent.tick()
        if agent.status_due():
            agent.status_line()   # what the loop then hands the notifier
        intervals.append(delay)
        now[0] += delay
ticks(200)
t = time.process_time()
ticks(n)
warm = (time.process_time() - t) / n * 1e6
prof = cProfile.Profile()
prof.enable()
ticks(n)
prof.disable()
stats = pstats.Stats(prof).stats
want = [("service.py", "tick"), ("sampler.py", "sample"), ("kernel.py", "read"), ("ctnetlink.py", "stats"),
        ("ctnetlink.py", "cpu_stats"), ("model.py", "update"), ("model.py", "combine"),
        ("executor.py", "owned_records"), ("decisions.py", "decide"), ("actions/table_max.py", "watch"),
        ("decisions.py", "_evaluate_trigger"), ("decisions.py", "_orphans"), ("decisions.py", "under_pressure"),
        ("decisions.py", "next_interval"), ("service.py", "_note_pressure"), ("service.py", "status_due"),
        ("service.py", "publish_metrics"), ("service.py", "publish_report"), ("service.py", "status_line")]
rows = {}
for (path, _line, func), (_cc, calls, _tt, cum, _callers) in stats.items():
    for suffix, name in want:
        if func == name and path.endswith("conntrack_agent/" + suffix):
            rows[suffix.replace(".py", "") + "." + name] = {"calls_per_tick": calls / n, "cum": cum}
total = sum(r["cum"] for k, r in rows.items() if k in ("service.tick", "service.status_due", "service.status_line"))
for r in rows.values():
    r["share"] = r.pop("cum") / total if total else 0.0
agent.stop("profile")
print(json.dumps({"warm_us_per_tick": warm, "ticks": n, "functions": rows,
                  "interval_s": sorted(intervals)[len(intervals) // 2]}))
"""


def profile_tick(ns, config: Path, ticks: int) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(benchlib.REPO / "agent"))
    out = subprocess.run(ns.argv([benchlib.AGENT_PYTHON, "-c", _TICK_PROFILE, str(config), str(ticks)]),
                         capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError("tick profile failed: " + out.stderr)
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------- the idle agents

def private_bus(where: Path) -> Optional[subprocess.Popen]:
    if shutil.which("dbus-daemon") is None:
        return None
    proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address",
                             "--address=unix:path=%s" % (where / "bus")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.address = proc.stdout.readline().strip()  # type: ignore[attr-defined]
    return proc


# Reference processes, measured beside the agents: what waking a Python process
# as often as the agent's calm tick costs by itself, and with the agent's sample added.
def references(period: float) -> List[Tuple[str, str, str]]:
    ms = "%.0f ms" % (period * 1000)
    return [
        ("ref-floor", "reference: bare Python loop, `select()` every %s" % ms,
         "import select\nwhile True:\n    select.select([], [], [], %r)\n" % period),
        ("ref-sample", "reference: Python loop, `Sampler.sample()` + `select()` every %s" % ms,
         "import select\nfrom conntrack_agent.sampler import Sampler\ns = Sampler(('',), 0.5)\n"
         "s.open_missing()\nwhile True:\n    s.sample()\n    select.select([], [], [], %r)\n" % period),
    ]


def _figures(pid: int, t0: float, s0: Dict[str, int], peak_kib: int) -> Dict[str, Any]:
    s1, t1 = benchlib.proc_sched(pid), time.monotonic()
    mem = benchlib.proc_memory(pid)
    dt = t1 - t0
    cpu = (s1["cpu_ns"] - s0["cpu_ns"]) / 1e9
    switches = (s1["voluntary"] - s0["voluntary"]) + (s1["nonvoluntary"] - s0["nonvoluntary"])
    return {
        "seconds": dt, "cpu_s_per_hour": cpu / dt * 3600, "core_pct": cpu / dt * 100,
        "wakeups_per_s": switches / dt, "cpu_us_per_wakeup": cpu * 1e6 / switches if switches else 0.0,
        "threads": s1["threads"], "rss_mb": mem["VmRSS"] / 1024, "hwm_mb": mem["VmHWM"] / 1024,
        "rss_peak_window_mb": peak_kib / 1024, "pss_mb": mem.get("Pss", 0) / 1024,
        "private_mb": mem.get("Private", 0) / 1024, "anon_mb": mem.get("RssAnon", 0) / 1024,
        "file_mb": mem.get("RssFile", 0) / 1024, "openssl_mapped": benchlib.maps_openssl(pid),
    }


def measure_agents(rig, args, tmp: Path) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    buses: List[subprocess.Popen] = []
    agents: Dict[str, benchlib.Agent] = {}
    modes = [m for m in MODES if m[0] in args.modes.split(",")]
    quiet_max = rig.read_sysctl("nf_conntrack_max")
    calm = benchlib.calm_tick(quiet_max)
    refs_spec = references(calm)
    try:
        # The global lock: a test setting nf_conntrack_max mid-run (to 32768, say) would
        # shorten the agents' calm tick (655 ms -> 82 ms) for that while, and multiply
        # their wake-ups with it. The references, which do not follow the max, would not
        # show it.
        with rig.global_lock(), rig.Namespace() as ns:
            if rig.read_sysctl("nf_conntrack_max") != quiet_max:
                quiet_max = rig.read_sysctl("nf_conntrack_max")   # changed while waiting for the lock
                calm = benchlib.calm_tick(quiet_max)
                refs_spec = references(calm)
            profile = profile_tick(ns, benchlib.policy_dir(tmp / "profile"), args.profile_ticks)
            for name, extra, dbus, _label in modes:
                config = benchlib.policy_dir(tmp / name, (), [extra] if extra else [])
                env = {}
                if dbus:
                    bus = private_bus(tmp / name)
                    if bus is not None:
                        buses.append(bus)
                        env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address  # type: ignore[attr-defined]
                agents[name] = benchlib.Agent(config, extra_args=() if dbus else ("--no-dbus",),
                                              prefix=["ip", "netns", "exec", ns.name], env=env)
            env = dict(os.environ, PYTHONPATH=str(benchlib.REPO / "agent"))
            refs = {name: ns.popen([benchlib.AGENT_PYTHON, "-c", code], env=env, stdout=subprocess.DEVNULL)
                    for name, _label, code in refs_spec} if args.references else {}
            for agent in agents.values():
                agent.wait_for("conntrack_available")
            time.sleep(args.warmup)
            pids = {n: a.pid for n, a in agents.items()}
            pids.update({n: p.pid for n, p in refs.items()})
            start = {n: (time.monotonic(), benchlib.proc_sched(pid)) for n, pid in pids.items()}
            peak = {n: 0 for n in pids}
            end_at = time.monotonic() + args.duration
            while True:
                for n, pid in pids.items():
                    peak[n] = max(peak[n], benchlib.proc_memory(pid)["VmRSS"])
                left = end_at - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(5.0, left))
            rows = []
            for name, _extra, dbus, label in modes:
                bus = "connected" if dbus and not agents[name].of_kind("dbus_unavailable") else (
                    "unavailable" if dbus else "off")
                rows.append(dict(mode=name, label=label.format(calm="%.0f ms" % (calm * 1000)), dbus=dbus,
                                 bus=bus, calm_tick_s=calm if not name.startswith("fast") else 0.05,
                                 quiet_max=quiet_max, **_figures(pids[name], *start[name], peak[name])))
            for name, label, _code in refs_spec:
                if name in refs:
                    rows.append(dict(mode=name, label=label, dbus=False, bus="off",
                                     **_figures(pids[name], *start[name], peak[name])))
            return rows, profile
    finally:
        for agent in agents.values():
            agent.stop()
        for bus in buses:
            bus.terminate()
            bus.wait(timeout=10)


# ----------------------------------------------------------------------------- report

SHIPPED_LADDER = "as the daemon runs"


def _steps(ladders, title: str) -> List[Dict[str, Any]]:
    return ladders[title]["steps"]


def _mb(a: Dict[str, Any], b: Dict[str, Any], key: str = "VmRSS") -> float:
    return (a[key] - b[key]) / 1024


def _added(ladders, title: str, modules: str, key: str = "VmRSS") -> float:
    """What the ladder's step importing ``modules`` added (MB)."""
    steps = _steps(ladders, title)
    for prev, cur in zip(steps, steps[1:]):
        if cur["step"] == modules:
            return _mb(cur, prev, key)
    raise KeyError(modules)


def _loads(step: Dict[str, Any]) -> str:
    """The step's new top-level packages: the others by name, the standard library's
    counted (asyncio, the one the daemon keeps out, by name too)."""
    added = [m for m in step.get("added", []) if not m.startswith("_")]
    std = set(step.get("stdlib", []))
    named = [m for m in added if m not in std or m == "asyncio"]
    count = len([m for m in added if m in std and m != "asyncio"])
    parts = named + (["%d of the standard library" % count] if count else [])
    return ", ".join(parts) or "–"


def _openssl(r: Dict[str, Any]) -> str:
    return {True: "yes", False: "no", None: "?"}[r.get("openssl_mapped")]


def render(rows, profile, ladders, chains, traced, command: str, mach, args) -> str:
    first = next((r for r in rows if r["mode"].startswith("default")), rows[0])
    lines = ["# Idle cost", ""] + benchlib.provenance(command, mach) + [benchlib.bytecode_line()] + [
        "- a quiet node: a fresh namespace with conntrack active and an empty table (nf_conntrack_max %d); "
        "the agents run inside it (`ip netns exec`), watching their own namespace as the shipped policy "
        "does, all at once, measured over %.0f s after a %.0f s warm-up. With this max and an empty table "
        "the shipped calm tick is %.0f ms (the time a storm of agent.storm_rate = %d/s needs to fill a "
        "quarter of the free room, between fast_interval and interval)." % (
            first.get("quiet_max", 0), args.duration, args.warmup, first.get("calm_tick_s", 0) * 1000,
            benchlib.shipped_agent_settings().storm_rate),
        "- CPU: schedstat run time of all threads; wake-ups: voluntary + involuntary context switches "
        "of all threads, per second; RSS: VmRSS at the end (VmHWM is the peak since start); Pss and "
        "private from smaps_rollup; OpenSSL mapped: libssl or libcrypto in the process's maps.",
        "",
        "| agent | CPU s/hour | % of one core | wake-ups/s | CPU µs per wake-up | threads | RSS | peak RSS (VmHWM) "
        "| Pss | private | OpenSSL mapped | D-Bus |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        lines.append("| %s | %.2f | %.3f%% | %.1f | %.0f | %d | %.1f MB | %.1f MB | %.1f MB | %.1f MB | %s | %s |" % (
            r["label"], r["cpu_s_per_hour"], r["core_pct"], r["wakeups_per_s"], r["cpu_us_per_wakeup"],
            r["threads"], r["rss_mb"], r["hwm_mb"], r["pss_mb"], r["private_mb"], _openssl(r), r["bus"]))
    lines += ["", "Against the targets (default policy: at most %.1f%% of a core, RSS at most %.0f MB):" % (
        CPU_TARGET_PCT, RSS_TARGET_MB), ""]
    for r in rows:
        if not r["mode"].startswith("default"):
            continue
        cpu_ok = r["core_pct"] <= CPU_TARGET_PCT
        rss_ok = r["hwm_mb"] <= RSS_TARGET_MB
        lines.append("- %s: CPU %.3f%% %s; RSS %.1f MB (peak %.1f MB) %s." % (
            r["label"], r["core_pct"], "met" if cpu_ok else "**missed**", r["rss_mb"], r["hwm_mb"],
            "met" if rss_ok else "**missed**"))
    cpu_note = verdict_cpu(rows)
    if cpu_note:
        lines.append("- " + cpu_note)
    fast = [r for r in rows if r["mode"].startswith("fast")]
    if fast:
        lines.append("- at the fast tick (no target; what 20 ticks a second cost): %s." % "; ".join(
            "%s %.3f%% of a core, %.0f wake-ups/s, %.0f µs per wake-up" % (
                "D-Bus" if r["dbus"] else "--no-dbus", r["core_pct"], r["wakeups_per_s"], r["cpu_us_per_wakeup"])
            for r in fast))
    lines += profile_lines(profile)
    lines += ["", "## Where the memory goes", "",
              "Fresh interpreters (%s, the agent's modules from their compiled bytecode) importing what "
              "`conntrack-agent run` imports, one group at a time; each row is the increase over the row "
              "before." % benchlib.AGENT_PYTHON, ""]
    for title, result in ladders.items():
        heap = traced if title == SHIPPED_LADDER else None
        lines += ["%s:" % title, "", "| step | import ms | modules | RSS | Pss | private | Python heap "
                  "| packages it loads |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        steps = result["steps"]
        labels = ["interpreter (python, site)"] + [label for label, _ in LADDERS[title]]
        for i, s in enumerate(steps):
            h = "%.1f MB" % (heap[i]["heap"] / 1024) if heap and i == 0 else "n/a"
            if i == 0:
                lines.append("| %s | – | %d | %.1f MB | %.1f MB | %.1f MB | %s | |" % (
                    labels[0], s["modules"], s["VmRSS"] / 1024, s["Pss"] / 1024, s["Private"] / 1024, h))
                continue
            p = steps[i - 1]
            if heap:
                h = "+%.1f MB" % ((heap[i]["heap"] - heap[i - 1]["heap"]) / 1024)
            lines.append("| + %s | %.0f | +%d | +%.1f MB | +%.1f MB | +%.1f MB | %s | %s |" % (
                labels[i], s["ms"], s["modules"] - p["modules"], _mb(s, p), _mb(s, p, "Pss"),
                _mb(s, p, "Private"), h, _loads(s)))
        last = steps[-1]
        lines += ["| = total | | %d | %.1f MB | %.1f MB | %.1f MB | %s | |" % (
            last["modules"], last["VmRSS"] / 1024, last["Pss"] / 1024, last["Private"] / 1024,
            "%.1f MB" % (heap[-1]["heap"] / 1024) if heap else ""), ""]
        if last.get("stand_ins"):
            lines += ["Stand-ins still in sys.modules at the end (never loaded): %s." % ", ".join(
                last["stand_ins"]), ""]
    lines += ["RSS counts the interpreter's shared libraries (libpython, libc, …) in full; Pss shares them "
              "out among the processes mapping them; private is what this process alone holds. Python heap: "
              "tracemalloc's traced bytes (objects, code), in a separate run. Packages it loads: the top-level "
              "packages of the modules the step really imported (not the stand-ins), the standard library's "
              "counted; C accelerator modules (_name) left out.", ""]
    if chains:
        named = ["%s ← %s" % (m, " → ".join(c)) if c else "%s: not loaded%s" % (m, NOT_LOADED.get(m, ""))
                 for m, c in chains.items()]
        lines.append("Who imports them as the daemon runs (`python -X importtime` with ssl kept out, outermost "
                     "first): " + "; ".join(named) + ".")
        lines.append("")
    lines.append(verdict_rss(rows, ladders, chains))
    lines.append("")
    return "\n".join(lines)


# Why a module the walk asks about may be absent.
NOT_LOADED = {
    "ssl": " (kept out: sys.modules[\"ssl\"] = None, so an import of it fails)",
    "asyncio": " (stand-ins in its place: logsetup's, for structlog; dbus_service's, for PyGObject 3.50 while "
               "gi loads)",
    "pydbus": " (dbus_service uses Gio directly)",
}


def targets(rows, ladders=None) -> List[Dict[str, Any]]:
    out = []
    by = {r["mode"]: r for r in rows}
    shipped = by.get("default")
    if shipped:
        other = by.get("default-nodbus")
        extra = lambda key, fmt: ("; --no-dbus: " + fmt % other[key]) if other else ""  # noqa: E731
        met = shipped["core_pct"] <= CPU_TARGET_PCT
        out.append({"bench": "idle", "target": "default policy ≤ %.1f%% of one core" % CPU_TARGET_PCT,
                    "met": met,
                    "figure": "%.3f%% (%.2f CPU s/hour, %.1f wake-ups/s, %.0f µs per wake-up) as the unit runs "
                              "it%s" % (shipped["core_pct"], shipped["cpu_s_per_hour"], shipped["wakeups_per_s"],
                                        shipped["cpu_us_per_wakeup"], extra("core_pct", "%.3f%%")),
                    "why": verdict_cpu(rows, brief=True)})
        out.append({"bench": "idle", "target": "default policy RSS ≤ %.0f MB" % RSS_TARGET_MB,
                    "met": shipped["hwm_mb"] <= RSS_TARGET_MB,
                    "figure": "%.1f MB peak (VmHWM) as the unit runs it%s" % (
                        shipped["hwm_mb"], extra("hwm_mb", "%.1f MB")),
                    "why": _rss_why(rows, ladders) if ladders else ""})
    return out


PROFILE_LABELS = [
    ("sampler.sample", "`Sampler.sample()`: the kernel reads and the fill rate"),
    ("kernel.read", "&nbsp;&nbsp;└ `kernel.LinuxProbe.read()`: the kernel reads"),
    ("ctnetlink.stats", "&nbsp;&nbsp;&nbsp;&nbsp;└ GET_STATS (count, max)"),
    ("ctnetlink.cpu_stats", "&nbsp;&nbsp;&nbsp;&nbsp;└ GET_STATS_CPU (drop counters; at most once a second below "
                            "half full)"),
    ("model.update", "&nbsp;&nbsp;└ `FillTracker.update`"),
    ("model.combine", "&nbsp;&nbsp;└ `model.combine`"),
    ("executor.owned_records", "`executor.owned_records()`: the journal as the core sees it"),
    ("decisions.decide", "`decisions.decide()`: the quiet-tick check, else every action's watch, every rule's trigger, orphans"),
    ("actions/table_max.watch", "&nbsp;&nbsp;└ `RaiseMax.watch()` (actions/table_max.py)"),
    ("decisions._evaluate_trigger", "&nbsp;&nbsp;└ the rules' triggers (`_evaluate_trigger`)"),
    ("decisions._orphans", "&nbsp;&nbsp;└ `_orphans()`"),
    ("decisions.under_pressure", "`decisions.under_pressure()`"),
    ("decisions.calm_interval", "`decisions.calm_interval()`"),
    ("service._note_pressure", "`Agent._note_pressure()`"),
    ("service.status_due", "`Agent.status_due()` (at most once a second), with what it publishes:"),
    ("service.publish_metrics", "&nbsp;&nbsp;└ `Agent.publish_metrics()`: the metrics textfile (every 15 s calm)"),
    ("service.publish_report", "&nbsp;&nbsp;└ `Agent.publish_report()`: the runtime report (no D-Bus; every 15 s calm, with the metrics)"),
    ("service.status_line", "`Agent.status_line()` (STATUS=, at most once a second)"),
]


def profile_lines(profile: Dict[str, Any]) -> List[str]:
    fns = profile["functions"]
    lines = ["", "## One tick, warm", "",
             "The agent's tick run %d times in-process in the same quiet namespace (caches warm, no sleep), on a "
             "simulated clock advancing by each tick's own interval (%.0f ms here), so the per-CPU counters' "
             "1 s refresh, the once-a-second status line, the metrics textfile and the runtime "
             "report every 15 s (the report written to a file as without D-Bus) come as often per tick as on the quiet node: "
             "**%.0f µs of CPU per tick**. Shares of the tick under cProfile (which inflates small "
             "functions, so read them as proportions):" % (
                 profile["ticks"], profile.get("interval_s", 0) * 1000, profile["warm_us_per_tick"]), "",
             "| part | calls per tick | share of the tick |", "| --- | ---: | ---: |"]
    for key, label in PROFILE_LABELS:
        if key in fns:
            lines.append("| %s | %.2f | %.0f%% |" % (label, fns[key]["calls_per_tick"], fns[key]["share"] * 100))
    decide = fns.get("decisions.decide")
    if decide and decide["calls_per_tick"] >= 1.5:
        lines += ["", "`decisions.decide()` runs %.1f times per quiet tick: a quiet tick pays for every rule's "
                  "trigger more than once." % decide["calls_per_tick"]]
    return lines


def _cpu_parts(rows) -> Optional[Dict[str, float]]:
    by = {r["mode"]: r for r in rows}
    agent, floor, sample = by.get("default"), by.get("ref-floor"), by.get("ref-sample")
    if not (agent and floor and sample and agent["wakeups_per_s"]):
        return None
    return {"per_wakeup": agent["cpu_us_per_wakeup"], "wakeups": agent["wakeups_per_s"],
            "budget": CPU_TARGET_PCT / 100 / agent["wakeups_per_s"] * 1e6, "floor": floor["cpu_us_per_wakeup"],
            "floor_pct": floor["core_pct"], "sample": sample["cpu_us_per_wakeup"],
            "rest": agent["cpu_us_per_wakeup"] - sample["cpu_us_per_wakeup"],
            "calm_ms": agent.get("calm_tick_s", 0) * 1000}


def _rss_why(rows, ladders) -> str:
    """The parts of the daemon's imports, largest first, for the glance table."""
    shipped = _steps(ladders, SHIPPED_LADDER)
    by = {r["mode"]: r for r in rows}
    nodbus = by.get("default-nodbus")
    parts = sorted([
        (shipped[0]["VmRSS"] / 1024, "the interpreter %.1f MB"),
        (_added(ladders, SHIPPED_LADDER, AGENT_DBUS), "gi for the D-Bus API +%.1f MB"),
        (_added(ladders, SHIPPED_LADDER, LOGSETUP), "structlog through logsetup +%.1f MB"),
        (_added(ladders, SHIPPED_LADDER, AGENT_CORE), "the agent's other modules +%.1f MB"),
    ], key=lambda p: -p[0])
    text = "; ".join(fmt % mb for mb, fmt in parts)
    service = by.get("default")
    if service:
        text += "; %.1f MB allocated once running" % (service["hwm_mb"] - shipped[-1]["VmRSS"] / 1024)
    if nodbus:
        text += "; --no-dbus peaks at %.1f MB" % nodbus["hwm_mb"]
    return text


def verdict_cpu(rows, brief: bool = False) -> str:
    """Where the idle agent's CPU goes; ``brief``: one line for the glance table."""
    p = _cpu_parts(rows)
    if p is None:
        return ""
    if brief:
        return ("%.0f µs of CPU per wake-up at %.1f wake-ups/s (budget %.0f µs): waking a Python process costs "
                "%.0f µs, the sample after a %.0f ms sleep %.0f µs more, the rest of the tick and the main loop "
                "%.0f µs" % (p["per_wakeup"], p["wakeups"], p["budget"], p["floor"], p["calm_ms"],
                             p["sample"] - p["floor"], p["rest"]))
    return ("Where the CPU goes: the default agent spends %.0f µs of CPU per wake-up; the budget at its "
            "%.1f wake-ups/s is %.0f µs. A bare Python loop waking every %.0f ms spends %.0f µs per wake-up "
            "(%.3f%% of a core: the floor for any Python daemon waking that often on this VM); adding the "
            "agent's sample makes it %.0f µs (after a sleep the sample costs far more than back to back in "
            "sample.md: cold caches and TLB, on a VM); the rest of the tick and the main loop (decide, "
            "the status line once a second, the metrics textfile every 15 s, re-arming the timer; with D-Bus, "
            "GLib's loop and the per-tick property cache; without, the runtime report every 15 s) %.0f µs. The "
            "cost follows the wake-ups: %.1f a second here against 4.1 with the former fixed 250 ms tick (e489f25)." % (
                p["per_wakeup"], p["wakeups"], p["budget"], p["calm_ms"], p["floor"], p["floor_pct"],
                p["sample"], p["rest"], p["wakeups"]))


def verdict_rss(rows, ladders, chains) -> str:
    shipped = _steps(ladders, SHIPPED_LADDER)
    stub = _steps(ladders, "structlog stubbed")
    service = next((r for r in rows if r["mode"] == "default"), None)
    nodbus = next((r for r in rows if r["mode"] == "default-nodbus"), None)
    text = ("RSS of the default agent as the unit runs it: %.1f MB at peak (target %.0f MB), OpenSSL mapped: "
            "%s. " % (service["hwm_mb"], RSS_TARGET_MB, _openssl(service))) if service else ""
    text += ("What costs the most: the interpreter itself (%.1f MB RSS before any import, most of it libpython "
             "and libc pages shared with other Python processes); then structlog through logsetup (+%.1f MB); "
             "the agent's other modules (+%.1f MB); gi for the D-Bus API (+%.1f MB)." % (
                 shipped[0]["VmRSS"] / 1024, _added(ladders, SHIPPED_LADDER, LOGSETUP),
                 _added(ladders, SHIPPED_LADDER, AGENT_CORE), _added(ladders, SHIPPED_LADDER, AGENT_DBUS)))
    chain = chains.get("asyncio")
    if chain:
        text += " asyncio is loaded, through `%s`." % " → ".join(chain)
    elif chain == []:
        text += " asyncio is not loaded%s." % NOT_LOADED["asyncio"]
    if "ssl not kept out (reference)" in ladders:
        ref = _steps(ladders, "ssl not kept out (reference)")
        text += (" Keeping ssl out saves %.1f MB RSS (%.1f MB private): what importing ssl costs a fresh "
                 "interpreter (OpenSSL's libraries mapped)." % (_mb(ref[1], ref[0]), _mb(ref[1], ref[0], "Private")))
    text += (" With structlog replaced by a stub the same imports total %.1f MB, %.1f MB less than the %.1f "
             "MB of the daemon's own." % (stub[-1]["VmRSS"] / 1024, _mb(shipped[-1], stub[-1]),
                                           shipped[-1]["VmRSS"] / 1024))
    if service:
        text += (" The running agent holds %.1f MB more than its imports (%.1f MB): what it allocates once "
                 "running (the policy, the sampler and its sockets, the log pipeline%s)." % (
                     service["hwm_mb"] - shipped[-1]["VmRSS"] / 1024, shipped[-1]["VmRSS"] / 1024,
                     ", the GLib main loop and its threads, the D-Bus connection" if service["dbus"] else ""))
    if nodbus:
        text += " Without D-Bus (--no-dbus) it peaks at %.1f MB." % nodbus["hwm_mb"]
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=150.0, help="seconds measured (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default %(default)s)")
    ap.add_argument("--modes", default=",".join(m[0] for m in MODES),
                    help="subset of %s" % ", ".join(m[0] for m in MODES))
    ap.add_argument("--profile-ticks", type=int, default=2000,
                    help="ticks run in-process for the warm tick profile (default %(default)s)")
    ap.add_argument("--no-references", dest="references", action="store_false",
                    help="skip the bare-Python reference loops measured beside the agents")
    ap.add_argument("--out", help="markdown file (default bench/results/idle.md); .json beside it")
    args = ap.parse_args(argv)

    refused = benchlib.refuse("bench/idle.py", tools=("ip", "nft"))
    if refused is not None:
        return refused
    import rig

    benchlib.terminate_on_sigterm()
    mach = benchlib.machine()
    benchlib.compile_agent()   # the agent as installed: from compiled bytecode
    with tempfile.TemporaryDirectory(prefix="ct-idle-") as tmp:
        rows, profile = measure_agents(rig, args, Path(tmp))
    for r in rows:
        print(json.dumps(r), file=sys.stderr, flush=True)
    ladders = {title: run_ladder([mods for _, mods in steps]) for title, steps in LADDERS.items()}
    # tracemalloc inflates RSS: its own run, only for the Python-heap column.
    traced = run_ladder([mods for _, mods in LADDERS[SHIPPED_LADDER]], trace=True)["steps"]
    chains = import_chains(["asyncio", "ssl", "gi", "pydbus"])
    md = render(rows, profile, ladders, chains, traced, benchlib.command_line("idle.py", argv), mach, args)
    path = benchlib.write_result("idle", md, args.out)
    path.with_suffix(".json").write_text(json.dumps({
        "targets": targets(rows, ladders), "agents": rows, "tick_profile": profile, "ladders": ladders, "chains": chains,
        "heap": traced}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Idle memory as the unit runs it: the .deb under systemd, in Debian 12 and 13.

Not a test. Needs root, debootstrap, systemd-nspawn and the package build tools
(what tests/system/test_deb_install.py needs). For each release:

1. the .deb is built from this tree by packaging/build-deb.sh (once, with
   DEB_BUILD_OPTIONS=nocheck: the unit tests are not what is measured);
2. a Debian container boots under systemd-nspawn (tests/system/nspawn.py), a
   debootstrapped minbase with systemd, dbus and the package's dependencies from
   the Debian archive already in the cached image (python3, python3-structlog,
   python3-gi, python3-pydbus: what apt would fetch for the .deb's Depends and
   Recommends), and the .deb is installed with apt-get, which starts the unit as
   it does on a node: conntrack-agent.service, its D-Bus API on the container's
   system bus, its bytecode compiled by the package's py3compile;
3. the unit is restarted for each run and left idle for --idle seconds; then the
   main PID's VmHWM and VmRSS (/proc/PID/status), Pss and private memory
   (smaps_rollup), its CPU time (schedstat of all threads, from --settle seconds
   after the start to the end) and `systemctl show -p MemoryCurrent` are read.
   Runs alternate between "without" the metrics textfile (no
   /var/lib/prometheus/node-exporter: the shipped policy writes nothing) and
   "with" it (the directory made before the start, as prometheus-node-exporter
   ships it); --repeat rounds; the higher VmHWM of each is the figure;
4. attribution: one more start with PYTHONPROFILEIMPORTTIME=1 in a drop-in (the
   unit's own imports, lazy ones included, to the journal), and a fresh
   /usr/bin/python3 in the container importing those modules group by group
   (VmRSS after each group).

The container shares the host's network (nspawn.py), so the agent guards the
host's table: the run holds tests/rig.py's global lock and restores
nf_conntrack_max and nf_conntrack_buckets afterwards, as the package test does.

    bench/rss_installed.py                      # both releases; bench/results/rss_installed.md (+ .json)
    bench/rss_installed.py --suites bookworm --idle 10 --repeat 1 --out /tmp/x.md      # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402  (puts tests/ on sys.path)

sys.path.insert(0, str(benchlib.REPO / "tests" / "system"))
import nspawn  # noqa: E402
import rig  # noqa: E402

RSS_TARGET_MB = 25.0
TEXTFILE_RSS_BUDGET_MB = 1.0
TEXTFILE_CPU_BUDGET = 0.05   # 5% of the idle agent's CPU
UNIT = "conntrack-agent.service"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
TEXTFILE = TEXTFILE_DIR + "/conntrack_agent.prom"
DROPIN_DIR = "/etc/systemd/system/conntrack-agent.service.d"
# What the container image holds besides the .deb: a node's systemd and system bus,
# and what apt resolves for the package's Depends and Recommends from the archive.
IMAGE = ("systemd", "systemd-sysv", "dbus", "python3", "python3-structlog", "python3-gi", "python3-pydbus")
VERSIONS = ("python3", "python3-structlog", "python3-gi", "python3-pydbus", "systemd", "dbus")
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-o", "Dpkg::Use-Pty=0"]

# Run inside the container: the agent's memory and CPU, as JSON.
_PROBE = r"""
import glob, json, sys
pid = int(sys.argv[1])
out = {}
for line in open("/proc/%d/status" % pid):
    k = line.split(":", 1)[0]
    if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
        out[k] = int(line.split()[1])
for line in open("/proc/%d/smaps_rollup" % pid):
    k = line.split(":", 1)[0]
    if k in ("Pss", "Private_Clean", "Private_Dirty"):
        out[k] = int(line.split()[1])
out["Private"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
ns = 0
for path in glob.glob("/proc/%d/task/*/schedstat" % pid):
    try:
        ns += int(open(path).read().split()[0])
    except OSError:
        pass
out["cpu_ns"] = ns
out["openssl"] = any("libssl" in l or "libcrypto" in l for l in open("/proc/%d/maps" % pid))
print(json.dumps(out))
"""

# Run inside the container: a fresh interpreter importing the unit's modules group by
# group, as the daemon does (ssl kept out first); VmRSS after each group.
_LADDER = r"""
import importlib, json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
groups = json.loads(sys.argv[1])
rows = [dict(step="interpreter", modules=len(sys.modules), rss=rss(), ms=0.0)]
failed = []
for name, modules in groups:
    t = time.perf_counter()
    for m in modules:
        if m == "keep-tls-out":
            sys.modules.setdefault("ssl", None)
            continue
        try:
            importlib.import_module(m)
        except ModuleNotFoundError:
            pass   # an optional import the unit tried and did not find (importtime lists those too)
        except Exception as exc:
            failed.append("%s: %s" % (m, exc))
    rows.append(dict(step=name, modules=len(sys.modules), rss=rss(), ms=(time.perf_counter() - t) * 1000))
print(json.dumps(dict(steps=rows, failed=failed)))
"""


# Run inside the container as root, with the installed package: what one textfile
# publication costs (render + atomic write), in-process, CPU per call. The A/B runs'
# CPU difference is below the noise of a 55 s window (4 writes of ~0.3 ms in ~0.08 s).
_TEXTFILE_COST = r"""
import json, os, resource, sys, tempfile
sys.modules.setdefault("ssl", None)
from conntrack_agent import logsetup, service
tmp = tempfile.mkdtemp(dir="/var/lib")   # the file system the real textfile is on
os.mkdir(os.path.join(tmp, "node-exporter"))
policy = os.path.join(tmp, "policy.toml")
with open(policy, "w") as f:
    f.write('[agent]\nstate_file = "%s/state.json"\n[metrics]\ntextfile = "%s/node-exporter/conntrack_agent.prom"\n'
            % (tmp, tmp))
logsetup.configure("json", stream=open(os.devnull, "w"))
agent = service.Agent(policy, False, logsetup.get_logger())
agent.start()
agent.tick()
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = {"calm_interval": service.METRICS_CALM_INTERVAL, "bytes": len(agent.metrics_text())}
n = int(sys.argv[1])
for key, fn in (("render_us", agent.metrics_text), ("publish_us", agent.publish_metrics)):
    c0 = cpu()
    for _ in range(n):
        fn()
    out[key] = (cpu() - c0) / n * 1e6
print(json.dumps(out))
"""


def log(text: str) -> None:
    print("rss_installed: " + text, file=sys.stderr, flush=True)


def build_deb(out: Path) -> Path:
    env = dict(benchlib_env(), DEB_BUILD_OPTIONS="nocheck")
    proc = subprocess.run([str(benchlib.REPO / "packaging" / "build-deb.sh"), "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError("build-deb.sh failed:\n%s\n%s" % (proc.stdout[-3000:], proc.stderr[-3000:]))
    debs = sorted(out.glob("conntrack-agent_*_all.deb"))
    if len(debs) != 1:
        raise RuntimeError("expected one .deb in %s, found %s" % (out, debs))
    return debs[0]


def benchlib_env() -> Dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}


class Box:
    """The booted container with the package installed."""

    def __init__(self, box: nspawn.Container) -> None:
        self.box = box

    def show(self, *props: str) -> Dict[str, str]:
        return self.box.show(UNIT, *props)

    def restart(self) -> str:
        self.box.systemctl("restart", UNIT)
        self.box.wait_for(lambda: self.show("ActiveState")["ActiveState"] == "active", timeout=30,
                          what="the unit to be active")
        return self.show("MainPID")["MainPID"]

    def probe(self, pid: str) -> Dict[str, Any]:
        return json.loads(self.box.run(["python3", "-c", _PROBE, pid]).stdout)

    def bus_name_owned(self) -> bool:
        names = self.box.run(["busctl", "--system", "--no-pager", "list", "--acquired"], check=False).stdout
        return "io.github.conntrack_agent1" in names


def one_run(b: Box, textfile: bool, idle: float, settle: float) -> Dict[str, Any]:
    if textfile:
        b.box.run(["mkdir", "-p", TEXTFILE_DIR])
    else:
        b.box.run(["rm", "-rf", TEXTFILE_DIR])
    pid = b.restart()
    started = time.monotonic()
    time.sleep(settle)
    first = b.probe(pid)
    t0 = time.monotonic()
    time.sleep(max(0.0, idle - (t0 - started)))
    last = b.probe(pid)
    window = time.monotonic() - t0
    props = b.show("MainPID", "MemoryCurrent", "ActiveState", "NRestarts")
    if props["MainPID"] != pid or props["ActiveState"] != "active":
        raise RuntimeError("the agent restarted or stopped during the run: %s" % props)
    written = b.box.run(["test", "-s", TEXTFILE], check=False).returncode == 0
    cpu_s = (last["cpu_ns"] - first["cpu_ns"]) / 1e9
    return {"textfile": textfile, "textfile_written": written, "pid": int(pid), "idle_s": round(idle, 1),
            "VmHWM": last["VmHWM"], "VmRSS": last["VmRSS"], "Pss": last["Pss"], "Private": last["Private"],
            "RssAnon": last["RssAnon"], "RssFile": last["RssFile"], "threads": last["Threads"],
            "MemoryCurrent": int(props["MemoryCurrent"]) if props["MemoryCurrent"].isdigit() else None,
            "MemoryCurrent_raw": props["MemoryCurrent"],
            "cpu_window_s": round(window, 1), "cpu_s": cpu_s, "cpu_s_per_hour": cpu_s * 3600 / window,
            "openssl": last["openssl"], "bus": b.bus_name_owned()}


def unit_imports(b: Box, wait: float) -> Dict[str, Any]:
    """The modules the unit imports (PYTHONPROFILEIMPORTTIME=1), in order, with self/cumulative µs."""
    b.box.write(DROPIN_DIR + "/importtime.conf", "[Service]\nEnvironment=PYTHONPROFILEIMPORTTIME=1\n")
    b.box.systemctl("daemon-reload")
    try:
        pid = b.restart()
        time.sleep(wait)
        text = b.box.run(["journalctl", "--no-pager", "-o", "cat", "_PID=" + pid]).stdout
    finally:
        b.box.remove(DROPIN_DIR + "/importtime.conf")
        b.box.systemctl("daemon-reload")
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append({"module": m.group(4), "self_us": int(m.group(1)), "cumulative_us": int(m.group(2)),
                         "depth": (len(m.group(3)) - 1) // 2})
    return {"rows": rows, "modules": [r["module"] for r in rows]}


def group_of(module: str) -> str:
    top = module.split(".", 1)[0]
    if top in ("structlog",):
        return "structlog"
    if top in ("asyncio", "concurrent", "_asyncio"):
        return "asyncio"
    if top in ("gi", "pydbus"):
        return "gi + pydbus"
    if module == "conntrack_agent.dbus_service":
        return "gi + pydbus"
    if top == "conntrack_agent":
        return "the agent's modules"
    return "the rest of the standard library"


# Why asyncio is loaded on Debian 13 and not on Debian 12 (read from PyGObject 3.50's
# gi/_ossighelper.py and gi/overrides/GLib.py, and traced with a stand-in for asyncio).
ASYNCIO_NOTE = (" asyncio comes with PyGObject 3.50 (Debian 13), not from the agent: its C module gi._gi reads "
                "asyncio.InvalidStateError and asyncio._get_running_loop when it is imported, and the "
                "GLib.MainLoop.run override asks asyncio for the running loop and the event-loop policy every time "
                "the loop runs. On Debian 12 (PyGObject 3.42) logsetup's stand-in keeps it out.")
# Earlier measurements with this script, for comparison (the same command and machine).
HISTORY = [
    "Before the memory work (the package built from commit 5cb8214, measured with this script's first version, "
    "60 s idle, 2 rounds, 2026-11-29 22:52 UTC, same machine): Debian 12 29.7 MB, Debian 13 32.5 MB at peak (VmHWM, "
    "without the textfile), OpenSSL's libcrypto mapped: `conntrack_agent.journal` imported `secrets` (hmac, "
    "hashlib: a fresh interpreter importing hashlib grows by 3.7 MB on Debian 12, 4.8 MB on Debian 13); asyncio "
    "came with structlog, pydbus with its proxy of the bus daemon (~1 MB), shutil, uuid and pickle with structlog.",
    "",
    "Before dbus_service answered PyGObject 3.50's questions to asyncio itself (the package built from commit "
    "4f8e963, this script, 60 s idle, 2 rounds, 2026-11-29 23:57 UTC, same machine): Debian 12 22.8 MB, Debian 13 "
    "25.6 MB at peak (VmHWM, without the textfile); on Debian 13 the unit loaded asyncio (+32 modules, +1.6 MB in "
    "the ladder): PyGObject 3.50's C module gi._gi imports it and reads asyncio.InvalidStateError and "
    "asyncio._get_running_loop, and its GLib.MainLoop.run override asks for the running loop and the event-loop "
    "policy each time the loop runs.",
    "",
]

# The ladder's order: structlog comes in through conntrack_agent.logsetup, as in the
# daemon, so its stand-ins (asyncio, shutil, uuid, pickle) are in place first; asyncio
# before D-Bus, so what PyGObject 3.50 (Debian 13) loads of it shows on its own row.
LADDER_ORDER = ("the rest of the standard library", "structlog", "the agent's modules", "asyncio", "gi + pydbus")
LADDER_LABELS = {
    "structlog": "structlog, through conntrack_agent.logsetup (its stand-ins first) and what it imports",
    "the agent's modules": "the agent's other modules",
    "asyncio": "asyncio, where the unit loaded it",
    "gi + pydbus": "D-Bus: gi, pydbus where the unit imported it, conntrack_agent.dbus_service",
}


def ladder(b: Box, modules: Sequence[str]) -> Dict[str, Any]:
    """Import the unit's modules in a fresh interpreter, a group at a time."""
    groups: Dict[str, List[str]] = {name: [] for name in LADDER_ORDER}
    groups["structlog"].append("conntrack_agent.logsetup")
    for m in modules:
        if m in ("ssl", "_ssl", "conntrack_agent.logsetup"):
            continue
        groups[group_of(m)].append(m)
    # gi comes in through dbus_service, as in the unit: its stand-in for asyncio is
    # in place only while dbus_service imports gi.
    bus = groups["gi + pydbus"]
    if "conntrack_agent.dbus_service" in bus:
        bus.insert(0, bus.pop(bus.index("conntrack_agent.dbus_service")))
    steps = [("ssl kept out", ["keep-tls-out"])] + [(name, groups[name]) for name in LADDER_ORDER if groups[name]]
    out = b.box.run(["python3", "-c", _LADDER, json.dumps(steps)]).stdout
    data = json.loads(out)
    data["groups"] = {name: len(mods) for name, mods in groups.items()}
    return data


def versions(b: Box) -> Dict[str, str]:
    out = {}
    for package in VERSIONS + ("conntrack-agent",):
        proc = b.box.run(["dpkg-query", "-W", "-f", "${Version}", package], check=False)
        out[package] = proc.stdout.strip() or "not installed"
    out["python"] = b.box.run(["python3", "-c", "import platform; print(platform.python_version())"]).stdout.strip()
    release = b.box.run(["cat", "/etc/debian_version"]).stdout.strip()
    out["debian"] = release
    return out


def measure_suite(suite: str, deb: Path, args: argparse.Namespace) -> Dict[str, Any]:
    log("%s: image" % suite)
    image = nspawn.ensure_image(IMAGE, suite)
    with rig.saved_global_sysctls():
        with nspawn.Container(image, binds=["%s:/srv/deb" % deb.parent], install_tree=False) as box:
            b = Box(box)
            log("%s: apt-get install %s" % (suite, deb.name))
            proc = box.run(APT + ["install", "/srv/deb/" + deb.name], check=False, timeout=600)
            if proc.returncode != 0:   # a dependency missing from the image: fetch it from the archive
                box.run(APT + ["update"], timeout=600)
                box.run(APT + ["install", "/srv/deb/" + deb.name], timeout=600)
            info = versions(b)
            if args.env:   # an experiment: the unit with extra environment (its figures are then not the package's)
                box.write(DROPIN_DIR + "/bench-env.conf",
                          "[Service]\n" + "".join("Environment=%s\n" % e for e in args.env))
                box.systemctl("daemon-reload")
            runs = []
            for round_no in range(args.repeat):
                for textfile in (False, True):
                    log("%s: round %d, textfile %s, %gs idle" % (suite, round_no + 1, "on" if textfile else "off",
                                                                 args.idle))
                    run = one_run(b, textfile, args.idle, args.settle)
                    run["round"] = round_no + 1
                    runs.append(run)
                    log("%s:   VmHWM %.1f MB, VmRSS %.1f MB, MemoryCurrent %s" % (
                        suite, run["VmHWM"] / 1024, run["VmRSS"] / 1024, run["MemoryCurrent"]))
            box.run(["rm", "-rf", TEXTFILE_DIR])
            log("%s: the unit's imports" % suite)
            imports = unit_imports(b, args.import_wait)
            walk = ladder(b, imports["modules"])
            cost = json.loads(box.run(["python3", "-c", _TEXTFILE_COST, "2000"]).stdout)
    return {"suite": suite, "release": nspawn.SUITES[suite], "versions": info, "runs": runs, "imports": imports,
            "ladder": walk, "textfile_cost": cost}


# ----------------------------------------------------------------------------- report

def mb(kib: float) -> str:
    return "%.1f MB" % (kib / 1024)


def memcur(value: Optional[int]) -> str:
    """MemoryCurrent (bytes); systemd says [not set] where the container has no memory controller."""
    return "%.1f MB" % (value / 1048576) if value else "not set"


def summary(result: Dict[str, Any]) -> Dict[str, Any]:
    runs = result["runs"]
    out: Dict[str, Any] = {}
    for textfile in (False, True):
        mine = [r for r in runs if r["textfile"] is textfile]
        if not mine:
            continue
        key = "with" if textfile else "without"
        peak = max(mine, key=lambda r: r["VmHWM"])
        out[key] = {"VmHWM": peak["VmHWM"], "VmRSS": max(r["VmRSS"] for r in mine),
                    "Pss": max(r["Pss"] for r in mine), "Private": max(r["Private"] for r in mine),
                    "MemoryCurrent": max((r["MemoryCurrent"] or 0) for r in mine) or None,
                    "cpu_s_per_hour": benchlib.median([r["cpu_s_per_hour"] for r in mine]),
                    "written": all(r["textfile_written"] for r in mine), "bus": all(r["bus"] for r in mine),
                    "openssl": any(r["openssl"] for r in mine)}
    if "with" in out and "without" in out:
        out["textfile_rss_kib"] = out["with"]["VmHWM"] - out["without"]["VmHWM"]
        base = out["without"]["cpu_s_per_hour"]
        out["textfile_cpu_ab"] = (out["with"]["cpu_s_per_hour"] - base) / base if base else None
        cost = result.get("textfile_cost")
        if cost and base:
            # the calm rewrite interval: 3600 / 15 s = 240 publications an hour
            out["textfile_cpu_s_per_hour"] = cost["publish_us"] * 1e-6 * 3600 / cost["calm_interval"]
            out["textfile_cpu_share"] = out["textfile_cpu_s_per_hour"] / base
        else:
            out["textfile_cpu_share"] = None
    return out


def costs(r: Dict[str, Any]) -> str:
    """What the peak is made of: the import walk's groups, then what the running agent adds."""
    steps = r["ladder"]["steps"]
    parts = ["a fresh interpreter (with site, json and importlib) %s" % mb(steps[0]["rss"])]
    for prev, cur in zip(steps, steps[1:]):
        if cur["rss"] - prev["rss"] >= 100:
            parts.append("%s +%s" % (LADDER_LABELS.get(cur["step"], cur["step"]), mb(cur["rss"] - prev["rss"])))
    running = r["summary"]["without"]["VmHWM"] - steps[-1]["rss"]
    parts.append("the running agent (its objects, GLib's threads, the bus connection) %+.1f MB over the walk's "
                 "%s" % (running / 1024, mb(steps[-1]["rss"])))
    return "; ".join(parts)


def targets(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for r in results:
        s = r["summary"]
        if "without" not in s:
            continue
        hwm = s["without"]["VmHWM"] / 1024
        figure = "%s peak (VmHWM, higher of %d runs), VmRSS %s, MemoryCurrent %s; Python %s" % (
            mb(s["without"]["VmHWM"]), sum(1 for x in r["runs"] if not x["textfile"]), mb(s["without"]["VmRSS"]),
            memcur(s["without"]["MemoryCurrent"]), r["versions"]["python"])
        rows.append({"target": "default agent's idle peak RSS ≤ 25 MB as the unit runs it, Debian %s" % r["release"],
                     "met": hwm <= RSS_TARGET_MB, "figure": figure,
                     "why": ("" if hwm <= RSS_TARGET_MB else "over by %.1f MB; " % (hwm - RSS_TARGET_MB)) + costs(r)})
    textfile = [(r, r["summary"]) for r in results if "textfile_rss_kib" in r["summary"] and r.get("textfile_cost")]
    if textfile:
        met = all(s["textfile_rss_kib"] / 1024 <= TEXTFILE_RSS_BUDGET_MB
                  and (s["textfile_cpu_share"] is None or s["textfile_cpu_share"] <= TEXTFILE_CPU_BUDGET)
                  for _, s in textfile)
        figure = "; ".join("Debian %s: %+.2f MB VmHWM, CPU +%s (%.0f µs a publication × %g an hour%s)" % (
            r["release"], s["textfile_rss_kib"] / 1024,
            "n/a" if s["textfile_cpu_share"] is None else "%.1f%%" % (100 * s["textfile_cpu_share"]),
            r["textfile_cost"]["publish_us"], 3600 / r["textfile_cost"]["calm_interval"],
            "" if s.get("textfile_cpu_ab") is None else "; the A/B runs: %+.0f%%, noise" % (100 * s["textfile_cpu_ab"]))
            for r, s in textfile)
        rows.append({"target": "the metrics textfile adds ≤ 1 MB of RSS and ≤ 5% of CPU to the idle agent",
                     "met": met, "figure": figure, "why": ""})
    return rows


def render(results: List[Dict[str, Any]], command: str, mach: Dict[str, Any], args: argparse.Namespace,
           deb: str) -> str:
    lines = ["# Idle memory as the unit runs it (Debian 12 and 13)", ""]
    lines += benchlib.provenance(command, mach)
    lines += [
        "- the package: `%s`, built from the tree by `DEB_BUILD_OPTIONS=nocheck packaging/build-deb.sh` on the "
        "host (Debian 12), installed with apt-get in each container; its bytecode compiled by the package's "
        "py3compile, as on a node." % deb,
        "- each release: a debootstrapped minbase booted under systemd-nspawn (tests/system/nspawn.py; the "
        "host's network, so the agent watches the host's table) with systemd, dbus and the package's "
        "dependencies from the Debian archive; the unit started as installed (User=conntrack-agent, its "
        "sandbox, the D-Bus API on the container's system bus), restarted for each run, then %g s idle. "
        "Runs alternate without and with the metrics textfile (%s made before the start, as "
        "prometheus-node-exporter ships it; the shipped policy writes the file only when it exists), %d "
        "round(s); the figure is the higher VmHWM.%s" % (args.idle, TEXTFILE_DIR, args.repeat, (
            " **An experiment**: the unit ran with %s in its environment (a drop-in)." % ", ".join(args.env))
            if args.env else ""),
        "- VmHWM, VmRSS: the main PID's /proc/PID/status at the end of the run (VmHWM: the peak since "
        "start); Pss and private: smaps_rollup; MemoryCurrent: `systemctl show -p MemoryCurrent` (\"not set\" where the container gets no memory controller, as on a host mounting cgroup v1 controllers; the cgroup's figure counts "
        "page cache the unit touched and kernel memory included, so not comparable with RSS); CPU: schedstat "
        "run time of all threads from %g s after the start to the end, as seconds per hour." % args.settle,
        "",
        "| Debian | Python | textfile | runs | peak RSS (VmHWM) | VmRSS | Pss | private | MemoryCurrent "
        "| CPU s/hour | file written | D-Bus | OpenSSL mapped |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in results:
        s = r["summary"]
        for key in ("without", "with"):
            if key not in s:
                continue
            v = s[key]
            lines.append("| %s (%s) | %s | %s | %d | **%s** | %s | %s | %s | %s | %.2f | %s | %s | %s |" % (
                r["release"], r["versions"]["debian"], r["versions"]["python"], key,
                sum(1 for x in r["runs"] if x["textfile"] is (key == "with")), mb(v["VmHWM"]), mb(v["VmRSS"]),
                mb(v["Pss"]), mb(v["Private"]), memcur(v["MemoryCurrent"]), v["cpu_s_per_hour"],
                "yes" if v["written"] else "no", "connected" if v["bus"] else "no",
                "yes" if v["openssl"] else "no"))
    lines += ["", "Every run (in order):", "",
              "| Debian | round | textfile | VmHWM | VmRSS | MemoryCurrent | CPU s over the window |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        for x in r["runs"]:
            lines.append("| %s | %d | %s | %s | %s | %s | %.3f s / %.0f s |" % (
                r["release"], x["round"], "with" if x["textfile"] else "without", mb(x["VmHWM"]), mb(x["VmRSS"]),
                memcur(x["MemoryCurrent"]), x["cpu_s"], x["cpu_window_s"]))
    costs = [r for r in results if r.get("textfile_cost")]
    if costs:
        lines += ["", "The textfile's CPU, in-process (the installed package, as root in the container: the agent "
                  "started on the live table, then each call 2000 times, CPU time per call; the calm rewrite "
                  "interval is %g s, every second only under pressure; written under /var/lib, the file system of the "
                  "real textfile): %s. Against the idle agent's CPU without "
                  "the file, from the runs above." % (costs[0]["textfile_cost"]["calm_interval"], "; ".join(
                      "Debian %s: render %.0f µs, render + atomic write %.0f µs (%d bytes) = %.3f CPU s/hour, %.1f%% "
                      "of %.2f" % (r["release"], r["textfile_cost"]["render_us"], r["textfile_cost"]["publish_us"],
                                   r["textfile_cost"]["bytes"], r["summary"].get("textfile_cpu_s_per_hour", 0),
                                   100 * (r["summary"].get("textfile_cpu_share") or 0),
                                   r["summary"]["without"]["cpu_s_per_hour"]) for r in costs))]
    lines += ["", "Versions in the containers: " + "; ".join(
        "Debian %s: %s" % (r["release"], ", ".join("%s %s" % kv for kv in r["versions"].items()
                                                   if kv[0] not in ("debian",))) for r in results), ""]
    lines += ["## Where it goes", "",
              "The unit's own imports (PYTHONPROFILEIMPORTTIME=1 in a drop-in, one more start, %g s: lazy imports "
              "of the first ticks and publications included), then a fresh `/usr/bin/python3` in the same "
              "container importing those modules group by group as root (ssl kept out first, as `conntrack-agent "
              "run` does): VmRSS after each group. A group's modules are what the unit imported of it; their "
              "order in the ladder is not the unit's, so read each row as what that group adds." % args.import_wait,
              ""]
    header = "| step | " + " | ".join("Debian %s: modules | RSS | import ms" % r["release"] for r in results) + " |"
    lines += [header, "| --- |" + " ---: | ---: | ---: |" * len(results)]
    order = ["interpreter", "ssl kept out"] + list(LADDER_ORDER)
    names = sorted({s["step"] for r in results for s in r["ladder"]["steps"]},
                   key=lambda n: order.index(n) if n in order else len(order))
    for name in names:
        cells = []
        for r in results:
            steps = r["ladder"]["steps"]
            idx = next((i for i, s in enumerate(steps) if s["step"] == name), None)
            if idx is None:
                cells.append("– | – | –")
            elif idx == 0:
                cells.append("%d | %s | –" % (steps[0]["modules"], mb(steps[0]["rss"])))
            else:
                cur, prev = steps[idx], steps[idx - 1]
                cells.append("+%d | +%s | %.0f" % (cur["modules"] - prev["modules"], mb(cur["rss"] - prev["rss"]),
                                                  cur["ms"]))
        label = LADDER_LABELS.get(name, name)
        lines.append("| %s | %s |" % (label if name == "interpreter" else "+ " + label, " | ".join(cells)))
    lines.append("| = total | %s |" % " | ".join(
        "%d | %s | " % (r["ladder"]["steps"][-1]["modules"], mb(r["ladder"]["steps"][-1]["rss"])) for r in results))
    lines.append("")
    for r in results:
        mods = r["imports"]["modules"]
        tops: Dict[str, int] = {}
        for m in mods:
            tops[m.split(".", 1)[0]] = tops.get(m.split(".", 1)[0], 0) + 1
        heavy = sorted(r["imports"]["rows"], key=lambda x: -x["self_us"])[:8]
        lines.append("Debian %s: the unit imported %d modules; by top-level package: %s. Largest import "
                     "times (self): %s." % (
                         r["release"], len(mods),
                         ", ".join("%s %d" % kv for kv in sorted(tops.items(), key=lambda kv: -kv[1])[:20]),
                         ", ".join("%s %.1f ms" % (h["module"], h["self_us"] / 1000) for h in heavy)))
        if r["ladder"].get("failed"):
            lines.append("(not importable alone in the ladder: %s)" % "; ".join(r["ladder"]["failed"][:10]))
        lines.append("")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        def rows_of(r: Dict[str, Any]) -> Dict[str, float]:
            steps = r["ladder"]["steps"]
            out = {"interpreter": steps[0]["rss"]}
            for prev, cur in zip(steps, steps[1:]):
                out[cur["step"]] = cur["rss"] - prev["rss"]
            out["running"] = r["summary"]["without"]["VmHWM"] - steps[-1]["rss"]
            return out
        ra, rb = rows_of(a), rows_of(b)
        order = ["interpreter", "ssl kept out"] + list(LADDER_ORDER) + ["running"]
        parts = []
        for name in order:
            d = rb.get(name, 0) - ra.get(name, 0)
            if abs(d) >= 100:
                label = {"running": "the running agent"}.get(name, LADDER_LABELS.get(name, name))
                parts.append("%s %+.1f MB" % (label, d / 1024))
        total = b["summary"]["without"]["VmHWM"] - a["summary"]["without"]["VmHWM"]
        lines += ["Debian %s against Debian %s: %+.1f MB at peak; row by row (differences of 0.1 MB or more): %s.%s"
                  % (b["release"], a["release"], total / 1024, "; ".join(parts), ASYNCIO_NOTE
                     if rb.get("asyncio", 0) >= 100 and not ra.get("asyncio") else ""), ""]
    lines += HISTORY
    lines += ["Against the targets:", ""]
    for t in targets(results):
        lines.append("- %s: %s — %s%s" % (t["target"], "met" if t["met"] else "**missed**", t["figure"],
                                          ("; " + t["why"]) if t.get("why") else ""))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/rss_installed.py", description=__doc__.split("\n")[0])
    ap.add_argument("--suites", default=",".join(sorted(nspawn.SUITES, key=nspawn.SUITES.get)),
                    help="Debian suites (default: %(default)s)")
    ap.add_argument("--idle", type=float, default=60.0, help="seconds idle per run (default %(default)s)")
    ap.add_argument("--settle", type=float, default=5.0, help="CPU window starts this long after the start")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of without/with (default %(default)s)")
    ap.add_argument("--import-wait", type=float, default=20.0,
                    help="seconds the import-time run lasts (default %(default)s: past the first textfile write)")
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                    help="an experiment: run the unit with this in its environment (a drop-in); repeatable")
    ap.add_argument("--deb", type=Path, help="install this .deb instead of building one")
    ap.add_argument("--from-json", type=Path, metavar="JSON",
                    help="measure nothing: write the report again from a results .json this script wrote")
    ap.add_argument("--out", help="results file (default bench/results/rss_installed.md; .json beside it)")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        saved = argparse.Namespace(**data["args"])
        for r in data["results"]:
            r["summary"] = summary(r)
        data["targets"] = targets(data["results"])
        text = render(data["results"], data["command"], data["machine"], saved, data["deb"])
        path = benchlib.write_result("rss_installed", text, args.out)
        path.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(text)
        return 0
    if os.geteuid() != 0:
        print("bench/rss_installed.py: needs root (containers, the global sysctls)", file=sys.stderr)
        return benchlib.EXIT_NOPERM
    missing = nspawn.missing_tools() + [t for t in ("dpkg-buildpackage", "dh") if shutil.which(t) is None]
    if missing:
        print("bench/rss_installed.py: missing tools: %s (apt-get install debootstrap systemd-container "
              "dpkg-dev debhelper dh-python pybuild-plugin-pyproject)" % ", ".join(missing), file=sys.stderr)
        return benchlib.EXIT_UNAVAILABLE
    suites = [s for s in args.suites.split(",") if s]
    mach = benchlib.machine()
    command = benchlib.command_line("rss_installed.py", argv)
    rig.cleanup_stale()
    with tempfile.TemporaryDirectory(prefix="ct-rss-deb-", dir="/var/tmp") as tmp:
        if args.deb:
            deb = Path(tmp) / args.deb.name
            shutil.copyfile(args.deb, deb)
        else:
            log("building the .deb")
            deb = build_deb(Path(tmp))
        results = []
        for suite in suites:
            result = measure_suite(suite, deb, args)
            result["summary"] = summary(result)
            results.append(result)
    text = render(results, command, mach, args, deb.name)
    path = benchlib.write_result("rss_installed", text, args.out)
    data = {"machine": mach, "command": command, "deb": deb.name, "results": results, "targets": targets(results),
            "args": {k: getattr(args, k) for k in ("idle", "settle", "repeat", "import_wait", "env")}}
    path.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

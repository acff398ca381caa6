"""What the benchmarks share: the machine line, pre-flight checks, policy files
for a bench agent, and an agent child process measured from /proc.

Not a test helper: the benches import it next to tests/rig.py (the kernel rig),
which they use for namespaces, traffic and the global sysctl guards.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "agent"))

# The agent under test runs from the dev venv (Debian's Python 3.11, Debian's
# structlog and pyroute2); a checkout without one falls back to this interpreter.
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
AGENT_PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
# Optional second venv holding PyPI's pyroute2 0.9.x for the sampling comparison.
BENCH_VENV_PYTHON = os.environ.get("BENCH_VENV_PYTHON", "/work/venv-bench/bin/python")
DEFAULT_POLICY = REPO / "config" / "policy.toml"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (c) in the storm: the shipped policy with the predictive trigger taken out.
# TOML has no null, so the grow-table rule is switched off and a copy of it
# without time_to_full_below takes its place (threshold_only_policy()): the same
# cooldown, factor and headroom as shipped, only the trigger differs.
THRESHOLD_ONLY_RULE = "grow-on-usage"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[%s]" % ", ".join(_toml_value(v) for v in value)
    raise TypeError("no TOML for %r" % (value,))


def threshold_only_policy() -> str:
    """A drop-in: the shipped grow-table rule off, its copy without the predictive trigger on."""
    import tomllib

    with open(DEFAULT_POLICY, "rb") as f:
        rules = tomllib.load(f).get("rule", [])
    shipped = dict(next(r for r in rules if r.get("name") == "grow-table"))
    lines = ["[[rule]]", 'name = "grow-table"', "enabled = false", "", "[[rule]]"]
    shipped["name"] = THRESHOLD_ONLY_RULE
    tables = {k: v for k, v in shipped.items() if isinstance(v, dict)}
    lines += ["%s = %s" % (k, _toml_value(v)) for k, v in shipped.items() if k not in tables]
    for name, table in tables.items():
        if name == "trigger":
            table = {k: v for k, v in table.items() if not k.startswith("time_to_full")}
        lines += ["", "[rule.%s]" % name] + ["%s = %s" % (k, _toml_value(v)) for k, v in table.items()]
    return "\n".join(lines) + "\n"


FAST_TICK = """\
[agent]
interval = "50ms"
fast_interval = "50ms"
"""


# ----------------------------------------------------------------------------- checks

EXIT_NOPERM = 77        # sysexits EX_NOPERM: not root
EXIT_UNAVAILABLE = 69   # sysexits EX_UNAVAILABLE: nf_conntrack or a tool missing


def refuse(script: str, tools: Sequence[str] = ("ip", "nft", "conntrack")) -> Optional[int]:
    """Print why ``script`` cannot run here and return its exit status; None when it can."""
    problem = preflight(tools)
    if problem is None:
        return None
    print("%s: %s" % (script, problem), file=sys.stderr)
    return EXIT_NOPERM if os.geteuid() != 0 else EXIT_UNAVAILABLE


def preflight(tools: Sequence[str] = ("ip", "nft", "conntrack")) -> Optional[str]:
    """Why the benchmarks cannot run here, or None."""
    if os.geteuid() != 0:
        return ("the benchmarks need root: they create network namespaces, fill real conntrack "
                "tables and change (then restore) nf_conntrack_max and nf_conntrack_buckets.\n"
                "Run: sudo bench/run")
    if not os.path.exists("/proc/sys/net/netfilter/nf_conntrack_count"):
        return ("nf_conntrack is not loaded (/proc/sys/net/netfilter/nf_conntrack_count is missing).\n"
                "Load it first: modprobe nf_conntrack (the benchmarks never load modules themselves)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return "missing tools: %s (apt-get install iproute2 nftables conntrack)" % ", ".join(missing)
    return None


# ----------------------------------------------------------------------------- the machine

def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {"kernel": platform.release(), "nproc": os.cpu_count(),
                            "python": platform.python_version()}
    with open("/proc/cpuinfo") as f:
        info["model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
    info["ram"] = "%.1f GiB" % (kib / 1048576)
    info["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["agent"] = agent_revision()
    info["load_start"] = loadavg()
    return info


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages now (the VM is shared: other engineers' tests run)."""
    try:
        with open("/proc/loadavg") as f:
            return " / ".join(f.read().split()[:3])
    except OSError:
        return "?"


def agent_revision() -> str:
    """The commit the agent under test was at, and whether agent/ or config/ had local changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "agent", "config"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" with uncommitted changes in agent/ or config/" if dirty else "")


def provenance(command: str, mach: Optional[Dict[str, Any]] = None) -> List[str]:
    """The lines every results file starts with: command, kernel, machine, date."""
    m = mach or machine()
    return [
        "- command: `%s`" % command,
        "- kernel: %s; machine: %s × %s, %s RAM; Python %s" % (
            m["kernel"], m["nproc"], m["model"], m["ram"], m["python"]),
        "- date: %s; agent and policy at commit %s" % (m["date"], m.get("agent", "unknown")),
        "- load average (1 / 5 / 15 min, %s CPUs, a shared VM): %s at the start, %s at the end" % (
            m["nproc"], m.get("load_start", "?"), loadavg()),
    ]


def write_result(name: str, text: str, out: Optional[str] = None) -> Path:
    path = Path(out) if out else RESULTS / (name + ".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    import shlex
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["bench/" + script] + [shlex.quote(a) for a in args])


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# ----------------------------------------------------------------------------- bytecode

# An installed package (the deb) ships compiled bytecode; a checkout run with
# PYTHONDONTWRITEBYTECODE=1 (as this environment sets it) has none and compiles
# every module from source at each start, ~3 MB more RSS (ctnetlink alone: +2.8 MB
# without its .pyc, +0.2 MB with). The benches measure the agent as installed.
COMPILE_COMMAND = "python -m compileall -q agent/"


def compile_agent() -> str:
    """Compile the agent package's bytecode (a no-op when it is current); says what it did."""
    proc = subprocess.run([AGENT_PYTHON, "-m", "compileall", "-q", str(REPO / "agent")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError("%s failed: %s%s" % (COMPILE_COMMAND, proc.stdout, proc.stderr))
    return "`%s` (as the deb ships it) before the agent starts" % COMPILE_COMMAND


def bytecode_line() -> str:
    """The provenance line the agent benches add: the agent ran from compiled bytecode."""
    return ("- agent bytecode: compiled first (`%s`, done by the bench and the runner), as an installed "
            "package ships it; this environment sets PYTHONDONTWRITEBYTECODE=1, and without the .pyc files "
            "every agent start compiles all modules from source, ~3 MB more RSS." % COMPILE_COMMAND)


# ----------------------------------------------------------------------------- policies

def policy_dir(where: Path, namespaces: Sequence[str] = (), extra: Sequence[str] = ()) -> Path:
    """The shipped policy plus drop-ins: the bench's state file and namespaces, then ``extra``.

    The metrics textfile goes to a directory of the bench's own (made here, so the
    agent writes it as it would into node-exporter's textfile directory): a bench
    agent never writes the node's real textfile. Returns the path to pass to --config.
    """
    where.mkdir(parents=True, exist_ok=True)
    dropins = where / "policy.d"
    dropins.mkdir(exist_ok=True)
    (where / "textfile").mkdir(exist_ok=True)
    shutil.copy(DEFAULT_POLICY, where / "policy.toml")
    names = ", ".join(json.dumps(n) for n in namespaces)
    (dropins / "10-bench.toml").write_text(
        "[agent]\nstate_file = %s\nnamespaces = [%s]\nlog_format = \"json\"\n\n[metrics]\ntextfile = %s\n"
        % (json.dumps(str(where / "state.json")), names,
           json.dumps(str(where / "textfile" / "conntrack_agent.prom"))))
    for i, text in enumerate(extra):
        (dropins / ("%d-extra.toml" % (20 + i))).write_text(text)
    return where / "policy.toml"


def grow_table_trigger() -> Dict[str, Optional[float]]:
    """The shipped grow-table rule's trigger thresholds (config/policy.toml)."""
    import tomllib
    from conntrack_agent.config import parse_duration

    with open(DEFAULT_POLICY, "rb") as f:
        rules = tomllib.load(f).get("rule", [])
    trig = next(r for r in rules if r.get("name") == "grow-table").get("trigger", {})
    ttf = trig.get("time_to_full_below")
    return {"usage": trig.get("usage_at_least"), "ttf": parse_duration(ttf) if ttf is not None else None,
            "ttf_min_usage": trig.get("time_to_full_min_usage", 0.0)}


def shipped_agent_settings():
    """The shipped policy's [agent] settings (config/policy.toml), as the agent reads them."""
    from conntrack_agent import config

    with open(DEFAULT_POLICY, "rb") as f:
        return config.loads(f.read(), str(DEFAULT_POLICY)).agent


def calm_tick(maximum: int, count: int = 0) -> float:
    """The shipped policy's calm tick (seconds) for a table of ``count`` of ``maximum``:
    the time a storm of agent.storm_rate needs to fill decisions.STORM_ROOM_SHARE of the free
    room, clamped to [fast_interval, interval] (decisions.next_interval without pressure)."""
    from conntrack_agent import decisions

    agent = shipped_agent_settings()
    calm = max(0, maximum - count) * decisions.STORM_ROOM_SHARE / agent.storm_rate
    return min(agent.interval, max(agent.fast_interval, calm))


def agent_ceiling() -> int:
    """The shipped policy's max ceiling on this machine, as the agent computes it."""
    from conntrack_agent import model, procfs

    entry = procfs.slab_object_size() or model.DEFAULT_ENTRY_BYTES
    return min(model.memory_ceiling(procfs.mem_total(), 0.05, entry, model.DEFAULT_OVERHEAD_BYTES, 1.0),
               4194304)


# ----------------------------------------------------------------------------- the agent

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_sched(pid: int) -> Dict[str, float]:
    """Summed over the threads: CPU ns on the run queue (schedstat), context switches."""
    out = {"cpu_ns": 0, "voluntary": 0, "nonvoluntary": 0, "threads": 0}
    for tid in os.listdir("/proc/%d/task" % pid):
        base = "/proc/%d/task/%s/" % (pid, tid)
        try:
            with open(base + "schedstat") as f:
                out["cpu_ns"] += int(f.read().split()[0])
            with open(base + "status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        out["voluntary"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        out["nonvoluntary"] += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        out["threads"] += 1
    return out


def proc_memory(pid: int) -> Dict[str, int]:
    """KiB: VmRSS, VmHWM (peak RSS), and smaps_rollup's Pss / private / anonymous."""
    out: Dict[str, int] = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("Pss", "Private_Clean", "Private_Dirty", "Anonymous"):
                    out[key] = int(line.split()[1])
        out["Private"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    except FileNotFoundError:
        pass
    return out


def maps_openssl(pid: int) -> Optional[bool]:
    """Whether the process has libssl or libcrypto mapped (None: could not read its maps)."""
    try:
        with open("/proc/%d/maps" % pid) as f:
            return any("libssl" in line or "libcrypto" in line for line in f)
    except OSError:
        return None


class Agent:
    """``conntrack-agent run`` as a child, its JSON events collected as they come.

    ``prefix`` wraps the command (e.g. ``ip netns exec NS``, which execs: the pid
    stays the agent's). stop() reads the agent's peak RSS (VmHWM) first, then sends
    SIGTERM and reaps it with wait4 for its CPU time. Not ru_maxrss: across exec
    the kernel carries over the high-water mark of the image it replaced, and
    subprocess forks with vfork, so that would be the bench process's own peak.
    """

    def __init__(self, config: Path, extra_args: Sequence[str] = ("--no-dbus",),
                 prefix: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> None:
        cmd = list(prefix) + [AGENT_PYTHON, "-m", "conntrack_agent", "run", "--config", str(config),
                              "--log-format", "json"] + list(extra_args)
        # The runtime report (written every 5 s without D-Bus) goes beside the bench's policy,
        # as the unit's RuntimeDirectory= would place it: never into the node's /run/conntrack-agent.
        runtime = Path(config).parent / "run"
        runtime.mkdir(exist_ok=True)
        full_env = dict(os.environ, PYTHONPATH=str(REPO / "agent"), RUNTIME_DIRECTORY=str(runtime))
        full_env.update(env or {})
        self.events: List[Dict[str, Any]] = []
        self.other_lines: List[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=full_env)
        self.pid = self.proc.pid
        self.rusage: Optional[Any] = None
        self.hwm_kib = 0
        self.returncode: Optional[int] = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                self.other_lines.append(line.rstrip())
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(self, kind: str, timeout: float = 20.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event.get("event") == kind:
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError("agent: no %s event within %.0fs (exit %s); stderr: %s" % (
                        kind, timeout, self.proc.poll(), "\n".join(self.other_lines[-20:])))
                self._cond.wait(min(left, 0.2))

    def of_kind(self, kind: str) -> List[Dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == kind]

    def stop(self, timeout: float = 10.0) -> None:
        if self.rusage is not None:
            return
        if self.proc.poll() is None:
            try:
                self.hwm_kib = proc_memory(self.pid)["VmHWM"]
            except (FileNotFoundError, ProcessLookupError, KeyError):
                pass
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                pid, status, usage = os.wait4(self.pid, 0)
                break
            time.sleep(0.02)
        self.rusage = usage
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # reaped here: keep Popen from waiting again
        self._reader.join(timeout=5)

    @property
    def cpu_seconds(self) -> float:
        assert self.rusage is not None
        return self.rusage.ru_utime + self.rusage.ru_stime

    @property
    def peak_rss_kib(self) -> int:
        """The agent's own VmHWM, read just before it was stopped."""
        return self.hwm_kib

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def terminate_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so every ``finally`` restores what it changed."""
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, handler)

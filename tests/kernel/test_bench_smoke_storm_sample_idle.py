"""The storm, sampling and idle benchmarks and their runner stay runnable.

Each bench runs end to end at a tiny size against the real kernel. Figures at
this size mean nothing and no time is asserted; what is checked is that a run
completes, measures what it says (every scenario, every method, every agent),
writes its report, and leaves the global sysctls as it found them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for rig
import rig  # noqa: E402

# Root and the tools: tests/kernel/conftest.py's autouse guard (rig.require_root and
# rig.require_tools) skips these on a developer's machine and fails them in CI.
pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _globals():
    # Read under the VM-wide lock so no other test is half-way through a change. The
    # benches take the lock themselves (another process): never hold it around them.
    with rig.global_lock():
        return rig.read_sysctl("nf_conntrack_max"), rig.read_sysctl("nf_conntrack_buckets")


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def test_storm_smoke(tmp_path):
    before = _globals()
    out = tmp_path / "storm.md"
    proc = _bench(BENCH / "storm.py", "--rates", "20000", "--total", "3000", "--base-max", "1024",
                  "--static-max", "2048", "--warmup", "0.3", "--settle", "0.3", "--plot-rate", "20000",
                  "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert _globals() == before
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["scenario"]: r for r in data["rows"]}
    assert set(rows) == set("abcd")
    for name, row in rows.items():
        assert row["sent"] == 3000, name
        assert row["replied"] > 0, name          # the responder answered: two-way flows
        assert row["peak_count"] > 0, name
    # 3000 flows into a 1024-entry table: the kernel's counters must show the harm.
    assert rows["a"]["start_max"] == 1024 and rows["b"]["start_max"] == 2048
    assert rows["a"]["harmed"] > 0
    assert rows["a"]["peak_count"] <= 1024 + 64
    for name in "cd":
        assert "conntrack_available" in rows[name]["agent_events"], name
        assert rows[name]["agent_peak_rss_mb"] > 0
        # Both reaction measures are reported: kernel-observed, and the log's pressure → raise_max.
        assert {"reaction_ms", "log_reaction_ms", "pressure_ms", "calm_tick_ms"} <= set(rows[name]), name
    assert "agent_cpu_s" not in rows["a"] and "agent_cpu_s" not in rows["b"]
    assert {t["target"] for t in data["targets"]}
    md = out.read_text()
    assert "(d) agent, default policy" in md and "Against the targets" in md
    assert "pressure → raise_max" in md and "compileall" in md


def test_sample_smoke(tmp_path):
    before = _globals()
    out = tmp_path / "sample.md"
    proc = _bench(BENCH / "sample.py", "--sizes", "0,500", "--rounds", "2", "--batch", "20",
                  "--slow-batch", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert _globals() == before
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert [r["size"] for r in rows] == [0, 500]
    for row in rows:
        for method in ("sampler", "sampler_counters", "probe_read", "probe_read_counters", "ct_stats",
                       "ct_cpu_stats", "model", "proc_pread", "conntrack_C", "pyroute2_debian"):
            assert row["medians_us"][method] > 0, method
        # Every method read the same table.
        for method in ("sampler", "sampler_counters", "ct_stats", "proc_pread", "conntrack_C", "pyroute2_debian"):
            assert row["seen"][method] == row["size"], method
    # The sample's cost both ways, each judged against the target.
    assert len(data["targets"]) == 2
    text = out.read_text()
    assert "µs per sample" in text and "what the agent pays per tick" in text


def test_idle_smoke(tmp_path):
    out = tmp_path / "idle.md"
    proc = _bench(BENCH / "idle.py", "--duration", "2", "--warmup", "0.5", "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    modes = {r["mode"]: r for r in data["agents"]}
    assert {"default", "default-nodbus", "fast", "fast-nodbus", "ref-floor", "ref-sample"} <= set(modes)
    for name, row in modes.items():
        assert row["wakeups_per_s"] > 0, name
        assert row["rss_mb"] > 0, name
        assert row["openssl_mapped"] in (True, False), name
    if shutil.which("dbus-daemon"):
        assert modes["default"]["bus"] == "connected"
    # The import walk follows the daemon: ssl kept out first, structlog only through
    # logsetup, the agent's other modules, gi only through dbus_service; each step
    # names what it really loaded, and asyncio (only ever a stand-in) is not among them.
    steps = data["ladders"]["as the daemon runs"]["steps"]
    assert [s["step"] for s in steps[1:3]] == ["keep-tls-out", "conntrack_agent.logsetup"]
    assert steps[-1]["step"] == "conntrack_agent.dbus_service" and len(steps) == 5
    assert "structlog" in steps[2]["added"]
    assert not any("asyncio" in s.get("added", []) for s in steps), [s.get("added") for s in steps]
    assert "asyncio" in steps[-1]["stand_ins"]
    assert data["chains"]["asyncio"] == [] and data["chains"]["ssl"] == []
    text = out.read_text()
    assert "asyncio: not loaded" in text
    assert "Where the memory goes" in text and "calm tick" in text


def test_whole_node_smoke(tmp_path):
    before = _globals()
    out = tmp_path / "whole_node.md"
    proc = _bench(BENCH / "whole_node.py", "--count", "5", "--repeat", "1", "--idle", "2", "--warmup", "1",
                  "--rate", "20000", "--total", "3000", "--base-max", "1024", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert _globals() == before                      # the storm's max and buckets restored
    data = json.loads(out.with_suffix(".json").read_text())
    left = [n for n in rig.sh(["ip", "netns", "list"]).stdout.split() if n.startswith(data["glob"].rstrip("*"))]
    assert left == []                                 # every bench namespace removed
    # Both set-ups ran in both phases: 'all' watched every bench namespace, 'one' the storming one.
    for phase in ("idle", "storm"):
        setups = {r["setup"]: r for r in data[phase]}
        assert set(setups) == {"all", "one"}, phase
        assert setups["all"]["watched"] == 5 and setups["one"]["watched"] == 1, phase
    for row in data["idle"]:
        assert row["cpu_ms_per_s"] > 0 and row["rss_mb"] > 0 and row["wakeups_per_s"] > 0
    for row in data["storm"]:
        assert row["sent"] == 3000 and row["start_max"] == 1024
        assert row["raises"] >= 1 and row["reaction_ms"] is not None   # 3000 flows into 1024: the agent raised
    assert len(data["targets"]) == 1
    text = out.read_text()
    assert "## Idle" in text and "## One namespace storming" in text and "Against the target" in text


def test_runner_quick_writes_benchmarks(tmp_path):
    proc = _bench(REPO / "bench" / "run", "--quick", "--out-dir", tmp_path, "sample")
    assert proc.returncode == 0, proc.stderr
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Targets at a glance" in doc and "## Sampling cost" in doc
    assert "- command: `bench/sample.py" in doc
    assert "Not run yet: `sudo bench/run storm`" in doc
    assert "python -m compileall -q agent/" in doc


def test_runner_refuses_without_root(tmp_path):
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) missing")
    proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                           "/usr/bin/python3", str(REPO / "bench" / "run"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 77, proc.stderr
    assert "need root" in proc.stderr
    assert not (tmp_path / "BENCHMARKS.md").exists()

#!/usr/bin/python3
"""What one idle tick costs, as instructions (callgrind) and CPU time, for any tree.

Not a test. The idle figure (bench/idle.py) is a few hundred microseconds a
wake-up on a shared, noisy VM, where two runs of the same agent differ by more
than the change being measured. Instructions do not: `valgrind --tool=callgrind`
counts them exactly, so an agent can be compared with an older commit's
(`git archive <commit> | tar -x -C /tmp/old`) tick by tick.

Each tree's agent runs in-process, as the daemon's supervisor drives it (the
tick, STATUS= when due, and what the tick publishes: the metrics textfile every
15 s, the runtime report every 5 s without D-Bus), on a simulated clock that
advances by each tick's own interval, so everything rate-limited by time comes
as often per tick as on a quiet node, without the sleeps. The kernel is real: a
namespace of its own with an empty table, entered with `ip netns exec`.

Per-tick instructions are (instructions of warm-up + N ticks - instructions of
warm-up alone) / N: the interpreter's start, the imports and the agent's start
cancel out.

    bench/tick_cost.py --tree /tmp/old2ebd --tree . --ticks 2000        # CPU µs a tick, alternating
    bench/tick_cost.py --tree /tmp/old2ebd --tree . --callgrind --ticks 300
    bench/tick_cost.py --tree . --profile                                 # cProfile, by cumulative time
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# The child: argv = tree, policy, warm-up ticks, ticks, dbus (0/1), profile (0/1).
_CHILD = r"""
import os, sys, time
tree, policy, warm, n, dbus, profile = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5] == "1", sys.argv[6] == "1"
sys.path.insert(0, os.path.join(tree, "agent"))
sys.modules["ssl"] = None   # as `conntrack-agent run` does (cli._keep_tls_out)
from pathlib import Path
from conntrack_agent import config, logsetup, mainloop, service
logsetup.configure("json", stream=open(os.devnull, "w"))
now = [1000.0]
clock = lambda: now[0]
run_dir = Path(policy).parent / "run"
run_dir.mkdir(exist_ok=True)
kwargs = {}
if "report_path" in service.Agent.__init__.__code__.co_varnames:
    kwargs["report_path"] = str(run_dir / "report.json")
agent = service.Agent(None, False, logsetup.get_logger(), clock=clock, initial=config.load(Path(policy)), **kwargs)
agent.start()

class Notifier:   # sdnotify outside systemd: every message a no-op
    def status(self, text): pass
    def ready(self): pass
    def watchdog_interval(self): return None

class Loop:       # what the tick re-arms, without the wait
    on_error = None
    delay = 0.0
    def call_later(self, seconds, callback):
        Loop.delay = seconds
        return object()

class Published:  # the D-Bus API with no reader: invalidated after every tick
    def invalidate(self): pass

if hasattr(mainloop.Supervisor, "_tick_step"):
    sup = mainloop.Supervisor(agent, Notifier(), Loop(), clock=clock)
    if dbus:
        agent.report_to_file = False
        sup.published = Published()
    def one():
        sup.tick()
        now[0] += Loop.delay
else:   # 2ebd0ed: Supervisor.tick's body, the loop left out
    notifier = Notifier()
    def one():
        delay = agent.tick()
        if agent.status_due():
            notifier.status(agent.status_line())
        Loop.delay = delay
        now[0] += delay

for _ in range(warm):
    one()
if profile:
    import cProfile, pstats, io
    prof = cProfile.Profile()
    prof.enable()
t = time.process_time()
for _ in range(n):
    one()
cpu = time.process_time() - t
if profile:
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
    print(out.getvalue(), file=sys.stderr)
import json
print(json.dumps({"us_per_tick": cpu / n * 1e6 if n else 0.0, "interval": Loop.delay if n else 0.0}))
"""


def run_child(ns: Any, tree: Path, policy: Path, warm: int, n: int, dbus: bool, profile: bool = False,
              callgrind: Optional[Path] = None) -> Dict[str, Any]:
    cmd = [benchlib.AGENT_PYTHON, "-c", _CHILD, str(tree), str(policy), str(warm), str(n),
           "1" if dbus else "0", "1" if profile else "0"]
    if callgrind is not None:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s" % callgrind] + cmd
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONHASHSEED"] = "0"   # the same dict layouts every run: repeatable counts
    proc = subprocess.run(ns.argv(cmd), capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError("child failed (%s): %s" % (tree, proc.stderr[-3000:]))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if profile:
        out["profile"] = proc.stderr
    if callgrind is not None:
        m = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
        out["instructions"] = int(m.group(1)) if m else None
    return out


def tree_policy(tree: Path, where: Path) -> Path:
    """The tree's own shipped policy (an older one may not know today's keys), with the
    bench's state file, and the metrics textfile in a directory of the bench's own."""
    where.mkdir(parents=True)
    (where / "policy.d").mkdir()
    (where / "textfile").mkdir()
    text = (tree / "config" / "policy.toml").read_text()
    (where / "policy.toml").write_text(text)
    dropin = "[agent]\nstate_file = %s\nlog_format = \"json\"\n" % json.dumps(str(where / "state.json"))
    if re.search(r"^\[metrics\]", text, re.M):
        dropin += "\n[metrics]\ntextfile = %s\n" % json.dumps(str(where / "textfile" / "conntrack_agent.prom"))
    (where / "policy.d" / "10-bench.toml").write_text(dropin)
    return where / "policy.toml"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="a checkout (repeat to compare)")
    ap.add_argument("--ticks", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds for CPU time (default 5)")
    ap.add_argument("--dbus", action="store_true", help="as with the D-Bus API (no report file)")
    ap.add_argument("--callgrind", action="store_true", help="instructions per tick (valgrind)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the ticks, to stderr")
    args = ap.parse_args(argv)
    refused = benchlib.refuse("bench/tick_cost.py", tools=("ip", "nft"))
    if refused is not None:
        return refused
    import rig

    trees = [Path(t).resolve() for t in args.tree]
    results: Dict[str, List[Dict[str, Any]]] = {str(t): [] for t in trees}
    # The global lock: another engineer's test changing nf_conntrack_max mid-run would change
    # the calm tick, and with it how often a tick publishes (every tree must see the same).
    with rig.global_lock(), tempfile.TemporaryDirectory(prefix="ct-tick-") as tmp, rig.Namespace() as ns:
        print("nf_conntrack_max %d" % rig.read_sysctl("nf_conntrack_max"), flush=True)
        for i, tree in enumerate(trees):
            subprocess.run([benchlib.AGENT_PYTHON, "-m", "compileall", "-q", str(tree / "agent")], check=True)
        policies = {str(t): tree_policy(t, Path(tmp) / ("p%d" % i)) for i, t in enumerate(trees)}
        if args.callgrind:
            for tree in trees:
                key = str(tree)
                base = run_child(ns, tree, Path(policies[key]), args.warmup, 0, args.dbus,
                                 callgrind=Path(tmp) / "base.out")
                full = run_child(ns, tree, Path(policies[key]), args.warmup, args.ticks, args.dbus,
                                 callgrind=Path(tmp) / "full.out")
                per = (full["instructions"] - base["instructions"]) / args.ticks
                results[key].append({"instructions_per_tick": per, "interval": full["interval"]})
                print("%s: %.0f instructions per tick (interval %.0f ms)" % (key, per, full["interval"] * 1000),
                      flush=True)
        elif args.profile:
            for tree in trees:
                r = run_child(ns, tree, Path(policies[str(tree)]), args.warmup, args.ticks, args.dbus, profile=True)
                print("==== %s: %.1f µs a tick (with cProfile)" % (tree, r["us_per_tick"]))
                print(r["profile"])
        else:
            for _ in range(args.rounds):
                for tree in trees:
                    r = run_child(ns, tree, Path(policies[str(tree)]), args.warmup, args.ticks, args.dbus)
                    results[str(tree)].append(r)
            for tree in trees:
                rs = results[str(tree)]
                print("%s: median %.1f µs a tick over %d rounds (%s), interval %.0f ms" % (
                    tree, statistics.median(r["us_per_tick"] for r in rs), len(rs),
                    ", ".join("%.1f" % r["us_per_tick"] for r in rs), rs[-1]["interval"] * 1000))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

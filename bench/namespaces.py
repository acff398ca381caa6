#!/usr/bin/python3
"""Many namespaces: what discovery, per-namespace probes and attribution cost on a full node.

Not a test. Needs root, iproute2, nftables, conntrack-tools and util-linux
(unshare, lsns). Holds the VM-wide test lock of tests/rig.py throughout (hundreds
of namespaces and tables of 10^5 entries). --count namespaces are created with the
rig (conntrack active on each loopback), plus --unnamed processes each in a
namespace of its own (`unshare -n sleep`), then, side by side where there is an
alternative:

- discovery: one /proc scan (every process's ns/net link, a full sweep) against
  `lsns -t net`; a re-read of /run/netns (listdir + stat) against `ip netns list`;
  Discovery.poll() with a scan due and with nothing to do; an `ip netns add` seen
  through inotify (the poll() time it costs, and how long after `ip netns add`
  started it was reported);
- probes: opening one kernel.LinuxProbe per namespace (once), then a tick over
  all of them (Sampler.sample(): count + max, or with the per-CPU counters) against
  entering every namespace each tick to pread its nf_conntrack_count; the idle
  cost per second at the calm tick this node's max gives;
- one namespace storming (rig.flood_udp, its UDP timeout raised) while the
  sampler ticks over all of them: tick time during the storm;
- attribution passes (default budgets, and a full decode) at --sizes entries in
  one namespace against `conntrack -L`, and a pass over an empty namespace while
  that table is full (every dump walks the global table).

Each call is timed on its own (perf_counter_ns, gc off); figures are medians.
Every namespace and process is removed at the end, also on failure or Ctrl-C.

    bench/namespaces.py                                # 250 namespaces; writes bench/results/namespaces.md
    bench/namespaces.py --count 10 --unnamed 2 --sizes 2000 --storm 5000 --rounds 20 --out /tmp/x.md  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def timed(call: Callable[[], Any], rounds: int) -> List[float]:
    """Seconds per call, each call timed on its own, gc off."""
    out = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for _ in range(rounds):
            t = clock()
            call()
            out.append((clock() - t) / 1e9)
    finally:
        gc.enable()
    return out


def med(values: Sequence[float]) -> float:
    return benchlib.median(values)


def run_quiet(argv: List[str]) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


# ----------------------------------------------------------------------------- setup

def create_namespaces(rig: Any, count: int, stack: contextlib.ExitStack) -> List[Any]:
    made: List[Any] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        ns = rig.Namespace()
        ns.__enter__()
        with lock:
            made.append(ns)

    def close_all() -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda ns: ns.close(), made))

    stack.callback(close_all)
    # Four at a time: each is four short processes (ip netns add, lo up, a route, nft).
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(count)))
    made.sort(key=lambda ns: ns.name)
    return made


def start_unnamed(count: int, stack: contextlib.ExitStack) -> List[subprocess.Popen]:
    procs: List[subprocess.Popen] = []

    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=10)

    stack.callback(kill_all)
    for _ in range(count):
        procs.append(subprocess.Popen(["unshare", "-n", "sleep", "3600"]))
    return procs


# ----------------------------------------------------------------------------- discovery

def bench_discovery(rig: Any, rounds: int, unnamed: int) -> Dict[str, Any]:
    import select

    from conntrack_agent import discovery

    out: Dict[str, Any] = {}
    disc = discovery.Discovery(scan_interval=0.0)
    try:
        t = time.perf_counter()
        first = disc.poll()
        out["first_poll_s"] = time.perf_counter() - t
        out["found"] = len(first.appeared)
        out["found_named"] = sum(1 for ns in first.appeared if ns.names)
        out["found_unnamed"] = sum(1 for ns in first.appeared if not ns.names and not ns.host)
        out["pids_visited"] = disc.last_scan.visited
        out["pids_denied"] = disc.last_scan.denied

        scanner = discovery.ProcScanner(max_pids=10 ** 6, max_seconds=60.0)
        out["proc_scan_s"] = med(timed(scanner.scan, rounds))
        out["named_rescan_s"] = med(timed(disc.named.rescan, rounds))
        out["poll_with_scan_s"] = med(timed(disc.poll, rounds))
        disc.scan_interval = 3600.0
        disc.poll()
        out["poll_idle_s"] = med(timed(disc.poll, rounds * 10))
        # The same questions asked of the usual tools, as processes.
        out["lsns_s"] = med(timed(lambda: run_quiet(["lsns", "-t", "net", "-n", "-o", "NS,PID"]), 5))
        out["ip_netns_list_s"] = med(timed(lambda: run_quiet(["ip", "netns", "list"]), 5))

        # ip netns add seen through inotify: poll() time spent until reported, and latency.
        poll_cost, latency, vanish_cost = [], [], []
        names = ["%s%d-inotify%d" % (rig.PREFIX, os.getpid(), i) for i in range(10)]
        try:
            for name in names:
                started = time.perf_counter()
                child = subprocess.Popen(["ip", "netns", "add", name])
                spent = 0.0
                while True:
                    wait = disc.timeout()
                    select.select([disc], [], [], 2.0 if wait is None else min(wait, 2.0))
                    t = time.perf_counter()
                    changes = disc.poll()
                    spent += time.perf_counter() - t
                    if any(name in ns.names for ns in changes.appeared):
                        break
                    if time.perf_counter() - started > 10:
                        raise RuntimeError("%s not reported within 10 s" % name)
                latency.append(time.perf_counter() - started)
                poll_cost.append(spent)
                child.wait()
            for name in names:
                rig.sh(["ip", "netns", "del", name])
                select.select([disc], [], [], 2.0)
                t = time.perf_counter()
                changes = disc.poll()
                vanish_cost.append(time.perf_counter() - t)
                if not changes.vanished:
                    raise RuntimeError("ip netns del %s not reported" % name)
        finally:
            for name in names:
                rig.sh(["ip", "netns", "del", name], check=False)
        out["inotify_poll_s"] = med(poll_cost)
        out["inotify_latency_s"] = med(latency)
        out["inotify_vanish_poll_s"] = med(vanish_cost)
    finally:
        disc.close()
    return out


# ----------------------------------------------------------------------------- probes

def bench_probes(names: List[str], rounds: int) -> Dict[str, Any]:
    from conntrack_agent import netns, procfs
    from conntrack_agent.sampler import Sampler

    out: Dict[str, Any] = {}
    sampler = Sampler(tuple(names), 0.5)
    t = time.perf_counter()
    opened, failed = sampler.open_missing()
    out["open_all_s"] = time.perf_counter() - t
    if failed:
        raise RuntimeError("probes failed to open: %s" % failed)
    out["probes"] = len(opened)
    out["fds"] = len(os.listdir("/proc/self/fd"))
    sampler.sample(counters=True)
    out["tick_s"] = med(timed(lambda: sampler.sample(), rounds))
    out["tick_counters_s"] = med(timed(lambda: sampler.sample(counters=True), rounds))
    probes = list(sampler.probes.values())
    clock = time.monotonic
    out["reads_only_s"] = med(timed(lambda: [p.read(clock) for p in probes], rounds))

    count_path = procfs.sysctl_path("nf_conntrack_count")

    def enter_each() -> None:
        # What a probe saves: entering each namespace every tick to read its count.
        for name in names:
            with netns.entered(name):
                with open(count_path, "rb", buffering=0) as f:
                    int(f.read())

    out["enter_each_s"] = med(timed(enter_each, max(5, rounds // 4)))
    sample = sampler.sample()
    out["max"] = sample.max
    out["calm_tick_s"] = benchlib.calm_tick(sample.max, sample.count)
    sampler.close()
    return out


def bench_storm(rig: Any, storm_ns: Any, names: List[str], storm: int) -> Dict[str, Any]:
    from conntrack_agent.sampler import Sampler

    out: Dict[str, Any] = {}
    sampler = Sampler(tuple(names), 0.5)
    sampler.open_missing()
    sampler.sample(counters=True)
    sent: List[int] = []
    flood = threading.Thread(target=lambda: sent.append(rig.flood_udp(storm_ns, storm)))
    ticks: List[float] = []
    peak_rate = 0.0
    peak_count = 0
    flood.start()
    clock = time.perf_counter_ns
    gc.disable()
    try:
        while flood.is_alive():
            t = clock()
            sample = sampler.sample()
            ticks.append((clock() - t) / 1e9)
            view = next(v for v in sample.namespaces if v.netns == storm_ns.name)
            peak_rate = max(peak_rate, view.fill_rate)
            peak_count = max(peak_count, view.count)
            time.sleep(0.005)   # a 50 ms fast tick would be gentler still; this samples the storm densely
    finally:
        gc.enable()
        flood.join()
        sampler.close()
    out["ticks"] = len(ticks)
    out["tick_s"] = med(ticks)
    out["tick_p90_s"] = sorted(ticks)[int(0.9 * (len(ticks) - 1))] if ticks else float("nan")
    out["sent"] = sent[0] if sent else 0
    out["peak_fill_rate"] = peak_rate
    out["peak_count"] = peak_count
    return out


# ----------------------------------------------------------------------------- attribution

def bench_attribution(rig: Any, ns: Any, quiet: Any, sizes: List[int], repeat: int) -> List[Dict[str, Any]]:
    from conntrack_agent import attribution
    from conntrack_agent.ctnetlink import CtnetlinkSocket

    rows = []
    have = 0
    for size in sizes:
        if size > have:
            rig.flood_udp(ns, size - have, dst="127.0.%d.2" % (10 + len(rows)))
        count = rig.conntrack_count(ns)
        have = count

        def one(name: str, **budgets: Any) -> Any:
            with CtnetlinkSocket(name) as ct:
                return attribution.attribute(ct, **budgets)

        default = [one(ns.name) for _ in range(repeat)]
        full_budgets = dict(entry_budget=10 ** 9, time_budget=3600.0, drain_budget=3600.0)
        full = [one(ns.name, **full_budgets) for _ in range(max(2, repeat // 2))]
        listing = timed(lambda: run_quiet(ns.argv(["conntrack", "-L"])), max(2, repeat // 2))
        empty = [one(quiet.name) for _ in range(repeat)]
        if any(f.total != count for f in full):
            raise RuntimeError("full pass saw %s entries, conntrack -C %d" % ([f.total for f in full], count))
        rows.append({
            "size": count,
            "default_s": med([a.seconds for a in default]),
            "default_decode_s": med([a.decode_seconds for a in default]),
            "default_sampled": med([a.sampled for a in default]),
            "default_closed": sum(a.closed for a in default),
            "default_complete": sum(a.complete for a in default),
            "default_runs": len(default),
            "full_s": med([a.seconds for a in full]),
            "full_decode_s": med([a.decode_seconds for a in full]),
            "conntrack_L_s": med(listing),
            "empty_s": med([a.seconds for a in empty]),
            "top_source": full[0].sources[0] if full[0].sources else None,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- report

def us(seconds: float) -> str:
    return "%.0f" % (seconds * 1e6)


def ms(seconds: float) -> str:
    return "%.1f" % (seconds * 1e3) if seconds < 0.1 else "%.0f" % (seconds * 1e3)


def render(res: Dict[str, Any], command: str, mach: Dict[str, Any]) -> str:
    d, p, s, n = res["discovery"], res["probes"], res["storm"], res["count"]
    u = res["unnamed"]
    calm = p["calm_tick_s"]
    ticks_per_s = 1.0 / calm
    # A calm tick reads the per-CPU counters when a second has passed since the last read.
    with_counters_per_s = min(ticks_per_s, 1.0)
    idle_per_s = (ticks_per_s - with_counters_per_s) * p["tick_s"] + with_counters_per_s * p["tick_counters_s"]
    lines = [
        "# Many namespaces",
        "",
    ] + benchlib.provenance(command, mach) + [
        "- %d namespaces made with tests/rig.py (conntrack active on each loopback) in %.1f s, plus %d processes "
        "each in an unnamed namespace of its own (`unshare -n sleep`); the VM-wide test lock held throughout."
        % (n, res["create_s"], u),
        "- each call timed on its own (perf_counter_ns, gc off), medians; the agent's code runs in this process "
        "(Python %s), the alternatives as processes." % mach["python"],
        "- the VM is shared: load average %.1f at the start, %.1f at the end (1 min; 2 vCPUs), so absolute "
        "figures are noisy; ratios were measured side by side." % (res["load_start"], res["load_end"]),
        "",
        "## Discovery",
        "",
        "| what | median | side by side |",
        "| --- | ---: | --- |",
        "| /proc scan: every process's ns/net (%d processes, a full sweep) | %s µs | `lsns -t net`: %s ms (%.0f×) |"
        % (d["pids_visited"], us(d["proc_scan_s"]), ms(d["lsns_s"]), d["lsns_s"] / d["proc_scan_s"]),
        "| /run/netns re-read: listdir + stat of %d names | %s µs | `ip netns list`: %s ms (%.0f×) |"
        % (n, us(d["named_rescan_s"]), ms(d["ip_netns_list_s"]), d["ip_netns_list_s"] / d["named_rescan_s"]),
        "| `Discovery.poll()` with a scan due (inotify read + /proc sweep + the view of %d namespaces) | %s µs | |"
        % (d["found"], us(d["poll_with_scan_s"])),
        "| `Discovery.poll()` with nothing due (the fd quiet) | %.1f µs | |" % (d["poll_idle_s"] * 1e6),
        "| an `ip netns add` through inotify: poll() time until reported (event, mount re-check) | %s µs | |"
        % us(d["inotify_poll_s"]),
        "| ... reported after `ip netns add` started (includes ip's own run, ~the mount) | %s ms | |"
        % ms(d["inotify_latency_s"]),
        "| an `ip netns del` through inotify: poll() time | %s µs | |" % us(d["inotify_vanish_poll_s"]),
        "",
        "The first poll found %d namespaces: %d named, %d unnamed, and the agent's own; the kernel refused "
        "to show %d process(es)' ns/net link (EACCES: the ptrace read check) even to this root bench." % (
            d["found"], d["found_named"], d["found_unnamed"], d["pids_denied"]),
        "",
        "## Probes: %d namespaces read every tick" % p["probes"],
        "",
        "| what | median | side by side |",
        "| --- | ---: | --- |",
        "| opening a `kernel.LinuxProbe` in each (setns, a ctnetlink socket, the buckets file), once | %s ms "
        "(%s ms each) | |" % (ms(p["open_all_s"]), "%.2f" % (p["open_all_s"] * 1e3 / p["probes"])),
        "| a tick, `Sampler.sample()`: count + max of all, fill rates | %s µs (%.1f µs a namespace) | entering "
        "each namespace to pread its count: %s µs (%.1f×) |" % (
            us(p["tick_s"]), p["tick_s"] * 1e6 / p["probes"], us(p["enter_each_s"]),
            p["enter_each_s"] / p["tick_s"]),
        "| └ its kernel reads alone (`LinuxProbe.read` × %d) | %s µs | |" % (p["probes"], us(p["reads_only_s"])),
        "| └ the rest: fill-rate updates and the Sample (pure Python) | %s µs | |"
        % us(max(0.0, p["tick_s"] - p["reads_only_s"])),
        "| a tick with the per-CPU counters (`sample(counters=True)`) | %s µs | |" % us(p["tick_counters_s"]),
        "| **idle cost**: %d quiet namespaces at the calm tick (%.0f ms at max %d: %.1f ticks/s, counters once "
        "a second) | **%s µs/s = %.3f%% of a core** | |" % (
            p["probes"], calm * 1e3, p["max"], ticks_per_s, us(idle_per_s), idle_per_s * 100),
        "| one namespace storming (rig.flood_udp, %d datagrams; peak %d entries, fill rate seen up to %+.0f/s): "
        "tick over all %d | %s µs (p90 %s µs, %d ticks) | quiet: %s µs |" % (
            s["sent"], s["peak_count"], s["peak_fill_rate"], p["probes"], us(s["tick_s"]), us(s["tick_p90_s"]),
            s["ticks"], us(p["tick_s"])),
        "",
        "Open descriptors after opening them all: %d (two per probe: the socket and the buckets file)."
        % p["fds"],
        "",
        "## Attribution: one pass over a namespace's table",
        "",
        "Default budgets: %d entries decoded at most, decoding stops after %.0f ms, %.0f ms more to drain the "
        "rest unparsed or the socket is closed. The full pass decodes every entry (budgets out of the way)."
        % (res["budgets"]["entry"], res["budgets"]["time"] * 1e3, res["budgets"]["drain"] * 1e3),
        "",
        "| entries | default pass | decoded (of them) | outcome | full pass | `conntrack -L` | full / conntrack -L "
        "| an empty namespace's pass meanwhile |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in res["attribution"]:
        outcome = []
        if r["default_complete"]:
            outcome.append("%d/%d drained" % (r["default_complete"], r["default_runs"]))
        if r["default_closed"]:
            outcome.append("%d/%d socket closed" % (r["default_closed"], r["default_runs"]))
        lines.append("| %d | %s ms | %d | %s | %s ms | %s ms | %.2f× | %s ms |" % (
            r["size"], ms(r["default_s"]), r["default_sampled"], ", ".join(outcome), ms(r["full_s"]),
            ms(r["conntrack_L_s"]), r["full_s"] / r["conntrack_L_s"], ms(r["empty_s"])))
    lines += [
        "",
        "Every dump walks the kernel's whole hash table (%d buckets here), whatever namespace asks: an empty "
        "namespace's pass costs that walk (last column). The pass's wall time is mostly the kernel's: its "
        "decoding is `decode_seconds` (%s ms of the default pass at the largest size)." % (
            res["buckets"], ms(res["attribution"][-1]["default_decode_s"]) if res["attribution"] else "-"),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=250, help="named namespaces (default %(default)s)")
    ap.add_argument("--unnamed", type=int, default=20, help="unnamed namespaces (unshare -n), default %(default)s")
    ap.add_argument("--rounds", type=int, default=200, help="timed calls per figure (default %(default)s)")
    ap.add_argument("--sizes", default="10000,100000", help="attribution table sizes (default %(default)s)")
    ap.add_argument("--storm", type=int, default=100000, help="datagrams of the storm (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=5, help="attribution passes per figure (default %(default)s)")
    ap.add_argument("--out", default=str(benchlib.RESULTS / "namespaces.md"), help="markdown results ('-': stdout)")
    ap.add_argument("--json", help="raw results as JSON here too (default: beside --out)")
    args = ap.parse_args(argv)
    refused = benchlib.refuse("bench/namespaces.py", tools=("ip", "nft", "conntrack", "unshare", "lsns"))
    if refused is not None:
        return refused
    benchlib.terminate_on_sigterm()
    import rig  # tests/rig.py

    from conntrack_agent import attribution

    command = benchlib.command_line("namespaces.py", argv)
    mach = benchlib.machine()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    res: Dict[str, Any] = {"count": args.count, "unnamed": args.unnamed, "command": command, "machine": mach,
                           "budgets": {"entry": attribution.ENTRY_BUDGET, "time": attribution.TIME_BUDGET,
                                       "drain": attribution.DRAIN_BUDGET},
                           "buckets": rig.read_sysctl("nf_conntrack_buckets")}
    started = time.monotonic()
    with rig.global_lock(), contextlib.ExitStack() as stack:
        res["load_start"] = os.getloadavg()[0]
        rig.cleanup_stale()
        t = time.perf_counter()
        namespaces = create_namespaces(rig, args.count, stack)
        res["create_s"] = time.perf_counter() - t
        start_unnamed(args.unnamed, stack)
        print("bench/namespaces.py: %d namespaces in %.1f s" % (len(namespaces), res["create_s"]),
              file=sys.stderr, flush=True)
        names = [ns.name for ns in namespaces]
        storm_ns, table_ns, quiet_ns = namespaces[0], namespaces[1], namespaces[2]
        for ns in (storm_ns, table_ns):
            ns.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=600"])
        time.sleep(0.2)   # the unshare children have switched namespaces
        res["discovery"] = bench_discovery(rig, args.rounds, args.unnamed)
        res["probes"] = bench_probes(names, args.rounds)
        res["attribution"] = bench_attribution(rig, table_ns, quiet_ns, sizes, args.repeat)
        res["storm"] = bench_storm(rig, storm_ns, names, args.storm)
        res["load_end"] = os.getloadavg()[0]
    res["minutes"] = (time.monotonic() - started) / 60
    md = render(res, command, mach)
    md += "Run time: %.1f minutes, namespaces and processes removed at the end.\n" % res["minutes"]
    if args.out != "-":
        out = benchlib.write_result("namespaces", md, args.out)
        Path(args.json or str(out.with_suffix(".json"))).write_text(json.dumps(res, indent=2, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""The agent's reaction to a module's uevent, measured on the host: uevent sent →
agent awake → baseline written.

This host's kernel has nf_conntrack built in (and no loadable modules at all), so
no module load can happen here; the load itself is measured in a Debian 12 VM
(tests/system/test_boot_vm.py), where TCG slows everything down. What the host can
measure natively is everything the agent does once the kernel sends the event:

- the agent (service.Agent under mainloop.Supervisor and its SelectLoop, its log as
  JSON lines to a file, a single-threaded process as the unit runs it) starts in a
  throw-away network namespace, with `[baseline] from_sysctl_d = true` and a
  sysctl.d tree holding two nf_conntrack timeouts (two writes, as in the VM);
- its kernel seam answers "nf_conntrack is not loaded" until the bench opens a gate
  (the module "loads"), so the agent waits with its uevent socket open;
- a separate process in the namespace then takes CLOCK_MONOTONIC and writes
  "change UUID CTATESTBENCH=N" to the namespace's /sys/class/net/lo/uevent: the
  kernel sends a real uevent to the namespace's uevent sockets, inside that write;
- the agent's filter is widened for the bench only (uevent.is_conntrack_load also
  accepts that lo event): from there on it is the agent's own path, probe opened,
  sysctl.d read, the baseline written, the event logged with TRIGGER, UEVENT_USEC
  and MONOTONIC_USEC.

The write sits before the kernel's delivery, so "sent → awake" holds the write
system call, the delivery and the wake-up of the agent's select(). Each repetition
starts a fresh agent (what stays warm: the interpreter and its imports); the
namespace's timeouts are set back before each one. No global sysctl changes.

usage: sudo bench/uevent_handler.py [--reps N] [--out FILE.json]
Hold /run/lock/conntrack-agent-bench-cpu.lock around it when timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSCTL_D = """\
net.netfilter.nf_conntrack_tcp_timeout_established = 7200
net.netfilter.nf_conntrack_udp_timeout = 25
"""
DEFAULTS = {"nf_conntrack_tcp_timeout_established": 432000, "nf_conntrack_udp_timeout": 30}
UUID = "5b4b1d6e-0000-4000-8000-00000000c7a1"


def trigger_loop(commands: int, answers: int) -> None:
    """The child: on each line read, take the time and make the kernel send the uevent."""
    with os.fdopen(commands, "r") as cmd, os.fdopen(answers, "w", buffering=1) as out:
        for line in cmd:
            n = line.strip()
            started = time.monotonic()
            with open("/sys/class/net/lo/uevent", "w") as f:
                f.write("change %s CTATESTBENCH=%s" % (UUID, n))  # keys: letters and digits only
            out.write("%r\n" % started)


def inside(reps: int, out_path: str) -> int:
    sys.path.insert(0, str(REPO / "agent"))
    # The trigger process first, while this one has no threads (fork after threads is unsafe).
    cmd_r, cmd_w = os.pipe()
    ans_r, ans_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(cmd_w)
            os.close(ans_r)
            trigger_loop(cmd_r, ans_w)
        finally:
            os._exit(0)   # never return into the parent's code
    os.close(cmd_r)
    os.close(ans_w)
    commands = os.fdopen(cmd_w, "w", buffering=1)
    answers = os.fdopen(ans_r, "r")

    from conntrack_agent import kernel as kernel_mod, logsetup, mainloop, procfs, service, sysctld, uevent

    tmp = Path(tempfile.mkdtemp(prefix="ctabench-uevent-"))
    (tmp / "root/etc/sysctl.d").mkdir(parents=True)
    (tmp / "root/etc/sysctl.d/90-ctatest.conf").write_text(SYSCTL_D)
    policy = tmp / "policy.toml"
    policy.write_text('[agent]\nstate_file = "%s/state.json"\n[baseline]\nfrom_sysctl_d = true\n' % tmp)
    real_read = sysctld.read
    sysctld.read = lambda root="/", order="systemd": real_read(str(tmp / "root"), order)
    # Bench only: the lo event this bench makes counts as nf_conntrack's load.
    real_filter = uevent.is_conntrack_load
    uevent.is_conntrack_load = lambda e: real_filter(e) or e.env.get("SYNTH_UUID") == UUID

    class GatedKernel(kernel_mod.LinuxKernel):
        loaded = False

        def open_probe(self, netns_name):
            if not self.loaded:
                raise kernel_mod.ConntrackMissing(2, "nf_conntrack is not loaded (bench gate)")
            return super().open_probe(netns_name)

    log_path = tmp / "log.jsonl"
    log_file = open(log_path, "a", buffering=1)   # O_APPEND: it is truncated between repetitions
    logsetup.configure("json", stream=log_file)
    log = logsetup.get_logger()
    results = []
    for n in range(reps + 1):          # the first one warms up and is not counted
        for name, value in DEFAULTS.items():
            procfs.write_sysctl(name, value)
        kernel = GatedKernel()
        agent = service.Agent(str(policy), False, log, kernel=kernel)
        loop = mainloop.SelectLoop()
        sup = mainloop.Supervisor(agent, _Silent(), loop)
        written = threading.Event()
        real_apply = agent.apply_baseline

        def apply(*args, real_apply=real_apply, written=written, **kw):
            try:
                return real_apply(*args, **kw)
            finally:
                written.set()

        agent.apply_baseline = apply
        sent = []

        def drive(kernel=kernel, sup=sup, written=written, sent=sent, n=n):
            deadline = time.monotonic() + 10
            while not sup._uevents_polled and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)              # the agent idle in its select(), as on a node
            kernel.loaded = True
            commands.write("%d\n" % n)
            sent.append(float(answers.readline()))
            written.wait(10)
            os.kill(os.getpid(), signal.SIGTERM)

        driver = threading.Thread(target=drive)
        driver.start()
        status = sup.run()
        driver.join()
        if status != 0:
            raise RuntimeError("the agent exited with %d" % status)
        events = [json.loads(line) for line in log_path.read_text().splitlines()]
        applied = [e for e in events if e.get("event") == "baseline_applied"]
        if len(applied) != 1 or applied[0].get("trigger") != "uevent":
            raise RuntimeError("expected one baseline_applied by the uevent, got %s" % applied)
        e = applied[0]
        for name, value in (("nf_conntrack_tcp_timeout_established", 7200), ("nf_conntrack_udp_timeout", 25)):
            if procfs.read_sysctl(name) != value:
                raise RuntimeError("%s not written" % name)
        log_path.write_text("")
        if n == 0:
            continue
        results.append({"sent_to_awake_us": e["uevent_usec"] - sent[0] * 1e6,
                        "awake_to_written_us": e["monotonic_usec"] - e["uevent_usec"],
                        "sent_to_written_us": e["monotonic_usec"] - sent[0] * 1e6,
                        "seqnum": e["uevent_seqnum"]})
    commands.close()
    os.waitpid(child, 0)
    Path(out_path).write_text(json.dumps(results))
    return 0


class _Silent:
    """No systemd here: the notifier's messages go nowhere."""

    def __getattr__(self, name):
        return lambda *a, **k: None

    def watchdog_interval(self):
        return None


def summary(results):
    out = {}
    for key in ("sent_to_awake_us", "awake_to_written_us", "sent_to_written_us"):
        values = sorted(r[key] for r in results)
        out[key] = {"median": statistics.median(values), "min": values[0],
                    "p90": values[int(len(values) * 0.9) - 1], "max": values[-1]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=51)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--inside", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        return inside(args.reps, args.inside)
    if os.geteuid() != 0:
        print("uevent_handler.py: needs root (a network namespace, its /sys)", file=sys.stderr)
        return 77
    sys.path.insert(0, str(REPO / "tests"))
    import rig

    load_before = os.getloadavg()
    with rig.Namespace() as ns, tempfile.NamedTemporaryFile(suffix=".json") as raw:
        ns.run([sys.executable, str(Path(__file__).resolve()), "--reps", str(args.reps), "--inside", raw.name],
               timeout=600)
        results = json.loads(Path(raw.name).read_text())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"reps": len(results), "summary": summary(results), "python": platform.python_version(),
              "kernel": platform.release(), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_before": load_before, "load_after": os.getloadavg(), "rounds": results}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({"reps": report["reps"], "summary": report["summary"], "load": [load_before[0],
                      report["load_after"][0]]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

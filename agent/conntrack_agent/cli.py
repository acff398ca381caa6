"""Command line: run, check, plan, status, restore, evict."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, List, Optional, Tuple

from . import __version__, config
from .evictspec import FIELDS, FIELDS_BY_NAME, Invalid, narrowing, parse_mark

# 78 is EX_CONFIG: the unit's RestartPreventExitStatus=78 keeps an invalid policy
# from becoming a restart loop.
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 78
# `status --check`: the calm tick is at most agent.interval (1s by default, 60s at most);
# a last tick older than this means the agent hangs or every tick fails.
CHECK_MAX_AGE = 90.0

DESCRIPTION = """\
Keeps the kernel's conntrack table from filling. Watches the entry count against
nf_conntrack_max over netlink, with the kernel's drop counters, and applies the
TOML policy: raise the max (and hash buckets) within a memory ceiling, shorten
timeouts under pressure and restore them afterwards, evict stale entries.
"""

EPILOG = """\
policy files (lowest priority first):
  /usr/lib/conntrack-agent/policy.toml   vendor defaults (used when /etc has none)
  /etc/conntrack-agent/policy.toml       the admin's policy
  {/usr/lib,/etc}/conntrack-agent/policy.d/*.toml   drop-ins, merged in name order
  With --config PATH: that file, then PATH's directory's policy.d/*.toml.

exit status: 0 success, 1 failure, 78 invalid policy.
See conntrack-agent(8) and conntrack-agent.toml(5).
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter with the width found without shutil: argparse imports
    shutil (and with it bz2, lzma and zlib, ~0.5 MB of the daemon's RSS) only to
    ask for the terminal width, on every parser it builds."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if kwargs.get("width") is None:
            try:
                columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(sys.stdout.fileno()).columns
            except (ValueError, OSError):
                columns = 80
            kwargs["width"] = max(columns - 2, 40)
        super().__init__(prog, **kwargs)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="PATH",
                        help="policy file (default: /etc/conntrack-agent/policy.toml, see below)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conntrack-agent", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"conntrack-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground (what the service runs)",
                         description="Run the agent in the foreground: sample every tick, decide, act, log.",
                         epilog=EPILOG, formatter_class=_Formatter)
    _config_arg(run)
    run.add_argument("--dry-run", action="store_true", help="decide and log what it would do, change nothing")
    run.add_argument("--once", action="store_true", help="take one tick and exit")
    run.add_argument("--log-format", choices=("auto", "console", "json", "journal"),
                     help="override the policy's agent.log_format")
    run.add_argument("--no-dbus", action="store_true", help="do not offer the D-Bus API")

    check = sub.add_parser(
        "check", formatter_class=_Formatter,
        help="validate the policy and print the effective rules",
        description="Validate the policy files; exit 0 when valid, 1 with every error otherwise.")
    _config_arg(check)

    plan = sub.add_parser(
        "plan", formatter_class=_Formatter,
        help="evaluate the policy once against the live table; change nothing",
        description="Sample the live table twice (to measure the fill rate), evaluate the "
                    "policy and print what the agent would do and why. Changes nothing.")
    _config_arg(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")

    status = sub.add_parser(
        "status", formatter_class=_Formatter,
        help="count, max, usage, buckets, fill rate, time-to-full, drops",
        description="Ask the running agent over D-Bus; without one, read the kernel directly.")
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--kernel", action="store_true", help="read the kernel even when the agent runs")
    status.add_argument("--check", action="store_true",
                        help="exit 0 if the running agent ticked within --max-age, else 1 (a liveness probe)")
    status.add_argument("--max-age", type=float, default=CHECK_MAX_AGE, metavar="SECONDS",
                        help=f"with --check: the oldest last tick still alive (default {CHECK_MAX_AGE:g})")

    top = sub.add_parser(
        "top", formatter_class=_Formatter,
        help="live view of the node's network namespaces by conntrack usage, with the top talkers",
        description="Every watched network namespace by usage (count, fill rate, time to full, drops, "
                    "what runs there), and who fills the selected one (a bounded pass over its table). "
                    "Reads the kernel; changes nothing. Ctrl-C stops it.")
    _config_arg(top)
    top.add_argument("--namespaces", nargs="+", metavar="PATTERN",
                     help='patterns instead of the policy\'s agent.namespaces, e.g. "*" for every namespace')
    top.add_argument("--netns", metavar="NAME", help="the namespace whose talkers to show (default: the fullest)")
    top.add_argument("--once", action="store_true", help="print one frame and exit (for scripts and tests)")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)")

    recommend = sub.add_parser(
        "recommend", formatter_class=_Formatter,
        help="static settings (sysctl.d, kube-proxy) from the daily peaks the agent recorded",
        description="Print the nf_conntrack_max and buckets an operator could set statically, in "
                    "sysctl.d and kube-proxy's conntrack settings, from the daily peaks the agent "
                    "records next to its state file, with the reasoning. Changes nothing.")
    _config_arg(recommend)
    recommend.add_argument("--json", action="store_true", help="machine-readable output")

    restore = sub.add_parser(
        "restore", formatter_class=_Formatter,
        help="put back the sysctl values the agent changed",
        description="Write back the original values recorded in the state file and "
                    "forget them. Values another writer changed since are left alone.")
    _config_arg(restore)
    restore.add_argument("--force", action="store_true",
                         help="restore max even when the table holds more entries than the original allows, "
                              "and values another writer changed since")

    evict = sub.add_parser(
        "evict", help="remove or age out selected entries now (preview with --dry-run)",
        description="Sweep the table once with the given selectors, as an evict rule would: a preview "
                    "with --dry-run (counts by protocol and state, top talkers), or for real. Selectors "
                    "start from --rule's [rule.evict] table when given. Assured ESTABLISHED TCP entries "
                    "are never selected without --include-established.",
        formatter_class=_Formatter)
    _config_arg(evict)
    evict.add_argument("--dry-run", action="store_true", help="count what would be removed; change nothing")
    evict.add_argument("--rule", metavar="NAME", help="start from this policy rule's selectors")
    evict.add_argument("--netns", metavar="NAME", default="", help="namespace under /run/netns (default: own)")
    _selector_options(evict)
    evict.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def _selector_options(parser: argparse.ArgumentParser) -> None:
    """One option per selector or budget, from the one definition the policy's
    [rule.evict] uses too (evictspec.FIELDS); values are checked in _evict_selection."""
    for spec_field in FIELDS:
        if spec_field.option is None:
            continue
        kwargs: dict = {"dest": spec_field.name, "help": spec_field.help}
        if spec_field.kind == "flag":
            kwargs["action"] = "store_true"
        elif spec_field.kind in ("choice", "names"):
            kwargs["choices"] = spec_field.options
            if spec_field.kind == "names":
                kwargs["action"] = "append"
                kwargs["help"] += ": " + ", ".join(spec_field.options)
        if spec_field.metavar and spec_field.kind != "choice":
            kwargs["metavar"] = spec_field.metavar
        if spec_field.kind in ("integer", "duration", "ratio"):
            kwargs["help"] += ", " + spec_field.range_text()
        if spec_field.name == "mark":
            kwargs["help"] += ", e.g. 0x10/0xff"
        parser.add_argument(spec_field.option, **kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_FAIL
    # `run` serves inside its handler for the daemon's whole life: the parser (~250 kB
    # of objects, every command's options) goes first, its memory free for the daemon.
    del parser
    handler = {"run": cmd_run, "check": cmd_check, "plan": cmd_plan, "status": cmd_status,
               "restore": cmd_restore, "evict": cmd_evict, "recommend": cmd_recommend,
               "top": cmd_top}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace) -> config.Policy:
    return config.load(args.config)


def _report_invalid(exc: config.PolicyError, purpose: str = "") -> None:
    count = len(exc.problems)
    print(f"policy invalid ({count} error{'s' if count != 1 else ''}{purpose}):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _load_or_report(args: argparse.Namespace, purpose: str = "") -> Optional[config.Policy]:
    """The policy, or None after printing every problem (the caller exits 78)."""
    try:
        return _load(args)
    except config.PolicyError as exc:
        _report_invalid(exc, purpose)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    try:
        files = config.policy_files(args.config)
        policy = _load(args)
    except config.PolicyError as exc:
        _report_invalid(exc)
        return EXIT_FAIL
    print("policy ok: " + (", ".join(config.printable(f) for f in files) or "no files, built-in defaults"))
    for line in config.describe(policy):
        print(f"  {line}")
    return EXIT_OK


def _keep_tls_out() -> None:
    """The daemon never speaks TLS, but structlog imports asyncio, which imports ssl
    and maps OpenSSL: ~6 MB of the agent's resident memory for nothing. asyncio
    runs without ssl (it treats ImportError as "no TLS support"), so the daemon
    process marks the module as absent before structlog is first imported."""
    if "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]


def cmd_run(args: argparse.Namespace) -> int:
    _keep_tls_out()
    from . import logsetup, service

    try:
        policy = _load(args)
    except config.PolicyError as exc:
        logsetup.configure(args.log_format or "auto")
        logsetup.emit(logsetup.get_logger(), "policy_invalid", keeping="refusing to start",
                      error=str(exc), errors=[str(p) for p in exc.problems])
        return EXIT_CONFIG
    logsetup.configure(args.log_format or policy.agent.log_format)
    from . import mainloop, report

    agent = service.Agent(args.config, args.dry_run, logsetup.get_logger(), initial=policy,
                          report_path=_runtime_report_path(report.runtime_path()))
    return mainloop.run(agent, _notifier(), once=args.once, use_bus=not args.no_dbus)


def _runtime_report_path(path: str) -> Optional[str]:
    """The runtime report's path, its directory made if missing (a foreground run as root;
    the unit's RuntimeDirectory= makes it for the service). None when it cannot be."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    except OSError:
        return None
    return path


def _notifier() -> Any:
    try:
        from . import sdnotify
    except ImportError:
        return None
    return sdnotify.Notifier()


def _kernel_agent(args: argparse.Namespace, policy: config.Policy) -> Any:
    """A read-only Agent: reads the kernel and the state file, never acts or writes."""
    from . import logsetup, service

    logsetup.configure("json", stream=open(os.devnull, "w"))
    agent = service.Agent(None, True, logsetup.get_logger(), initial=policy, read_only=True)
    agent.start()
    if agent.last_sample is None:
        return agent
    time.sleep(max(policy.agent.interval, 0.2))  # a second reading gives the fill rate
    agent.last_sample = agent.sampler.sample()
    return agent


def _running_agent_report() -> Tuple[Optional[dict], str]:
    """The running agent's own report: over D-Bus, else its runtime file."""
    from . import report

    try:
        from . import dbus_service
        data = dbus_service.query_report()
    except Exception:  # noqa: BLE001 - gi, the bus or the agent's API may be missing: try the file
        data = None
    if data:
        return data, "agent (D-Bus)"
    data = report.read_runtime()
    if data:
        return data, f"agent ({report.runtime_path()})"
    return None, ""


def _current_report(args: argparse.Namespace, policy: Optional[config.Policy]) -> Tuple[Optional[dict], str, Any]:
    """(report, source, agent): the running agent's, or one built from the kernel and the
    state file (timers then start from nothing: the agent is not running)."""
    if not getattr(args, "kernel", False):
        data, source = _running_agent_report()
        if data is not None:
            return data, source, None
    if policy is None:
        return None, "", None
    agent = _kernel_agent(args, policy)
    if agent.last_sample is None:
        return None, "", agent
    return agent.report(), f"kernel and {policy.agent.state_file} (no running agent found)", agent


def cmd_plan(args: argparse.Namespace) -> int:
    policy = _load_or_report(args)
    if policy is None:
        return EXIT_CONFIG
    data, source, agent = _current_report(args, policy)
    if data is None:
        print(f"conntrack-agent: {agent.status_line() if agent else 'no reading'}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(dict(data, source=source), default=str))
        return EXIT_OK
    status = data["status"]
    print(f"source: {source}")
    print(f"count {status['count']}/{status['max']} ({status['usage']:.1%}), fill {status['fill_rate']:+.0f}/s")
    from . import report
    for line in report.format_owned(data["owned"]) + report.format_rules(data["rules"]):
        print(line)
    print("plan:" if data["plan"] else "plan: nothing to do: no rule's trigger holds, nothing is due to be restored")
    for line in data["plan"]:
        print(f"  - {line}")
    return EXIT_OK


def cmd_check_alive(args: argparse.Namespace) -> int:
    """Liveness for a probe: the running agent's own report, and how old its last tick is."""
    data, source = _running_agent_report()
    if data is None:
        print("not alive: no running agent found (no D-Bus API, no fresh runtime report)")
        return EXIT_FAIL
    last = data.get("last_tick_at")
    if not isinstance(last, (int, float)):
        print(f"not alive: the agent ({source}) has not finished a tick yet")
        return EXIT_FAIL
    age = time.time() - last
    if age > args.max_age:
        print(f"not alive: the last tick finished {age:.0f}s ago (over {args.max_age:g}s), per {source}")
        return EXIT_FAIL
    print(f"alive: last tick {age:.1f}s ago, per {source}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if args.check:
        return cmd_check_alive(args)
    try:
        policy: Optional[config.Policy] = _load(args)
    except config.PolicyError as exc:
        # The counts are worth having even when the policy is broken; it only
        # names the namespaces to read.
        _report_invalid(exc, "; reading the kernel with the built-in defaults")
        policy = config.loads(b"", "<built-in>")
    data, source, agent = _current_report(args, policy)
    if data is None:
        print(f"conntrack-agent: {agent.status_line() if agent else 'no reading'}", file=sys.stderr)
        return EXIT_FAIL
    snapshot = dict(data["status"])
    if agent is not None:
        sample = agent.last_sample
        snapshot["drops"] = {k: sample.deltas.get(k, 0) for k in ("drop", "early_drop", "insert_failed")}
        snapshot["totals"] = {k: v for k, v in agent.sampler.probes[sample.fullest.netns]
                              .read(time.monotonic, counters=True).counters.items()
                              if k in ("drop", "early_drop", "insert_failed")}
    if args.json:
        print(json.dumps(dict(snapshot, source=source, owned=data["owned"]), default=str))
        return EXIT_OK
    ttf = snapshot.get("time_to_full")
    rows = [("source", source)]
    if agent is None and source.startswith("agent (/"):
        # The file is rewritten every 15 s when calm (each second under pressure): say how old.
        age = max(0.0, time.time() - float(data.get("written_at", 0)))
        rows.append(("as of", f"{age:.0f}s ago"))
    rows += [
        ("count", f"{snapshot['count']} / {snapshot['max']} ({snapshot['usage']:.1%})"),
        ("buckets", snapshot.get("buckets", "?")),
        ("fill rate", f"{snapshot['fill_rate']:+.1f} entries/s"),
        ("time to full", "not filling" if ttf is None else f"{ttf:.1f}s"),
    ]
    if "totals" in snapshot:
        rows.append(("drops (total)", ", ".join(f"{k} {v}" for k, v in snapshot["totals"].items())))
    if snapshot.get("last_decision"):
        rows.append(("last decision", snapshot["last_decision"]))
    for key, value in rows:
        print(f"{key:>14}: {value}")
    from . import report
    for line in report.format_owned(data["owned"]):
        print(line)
    return EXIT_OK


def _fullest_count(kernel: Any, namespaces: Tuple[str, ...]) -> Tuple[int, str]:
    """The largest entry count among the watched namespaces: the global max binds each."""
    best, where = 0, "the table"
    for name in namespaces or ("",):
        try:
            count = kernel.read_sysctl(name, "nf_conntrack_count")
        except OSError:
            continue
        if count >= best:
            best, where = count, (f"netns {name}" if name else "this netns")
    return best, where


def cmd_top(args: argparse.Namespace) -> int:
    from dataclasses import replace as _replace

    from . import attribution, logsetup, service

    policy = _load_or_report(args)
    if policy is None:
        return EXIT_CONFIG
    if args.namespaces:
        bad = [p for p in args.namespaces if not config.valid_netns_pattern(p)]
        if bad:
            print(f"conntrack-agent: not a namespace pattern: {', '.join(bad)}", file=sys.stderr)
            return EXIT_FAIL
        policy = _replace(policy, agent=_replace(policy.agent, namespaces=tuple(args.namespaces)))
    logsetup.configure("json", stream=open(os.devnull, "w"))
    agent = service.Agent(None, True, logsetup.get_logger(), initial=policy, read_only=True)
    agent.start()
    drops: dict = {}
    frames = 0
    try:
        while True:
            time.sleep(max(0.2, args.interval) if frames or not args.once else 0.5)
            agent._discover()
            if agent.sampler.unavailable:
                agent._probe()
            sample = agent.sampler.sample(counters=True)
            if sample is None:
                print(f"conntrack-agent: {agent.status_line()}", file=sys.stderr)
                return EXIT_FAIL
            frames += 1
            if frames < 2:
                continue   # a second reading gives the fill rates
            rows = []
            for view in sample.namespaces:
                drops[view.netns] = drops.get(view.netns, 0) + view.deltas.get("drop", 0) + view.deltas.get(
                    "early_drop", 0)
                labels = dict(agent.labels.get(view.netns, {}))
                inode = int(labels.pop("netns_inode", 0) or 0)
                rows.append(attribution.TopRow(view.netns or "host", inode, view.count, sample.max, view.fill_rate,
                                               view.time_to_full, drops[view.netns], labels))
            chosen = args.netns if args.netns is not None else sample.fullest.netns
            talkers = None
            if frames == 2 or frames % 5 == 0:
                try:
                    talkers = agent.kernel.attribute(chosen if chosen != "host" else "")
                except OSError:
                    talkers = None
            frame = attribution.render_top(rows, selected=(chosen or "host"), attribution=talkers,
                                           width=_terminal_width(), header=time.strftime("%H:%M:%S"))
            if args.once:
                print(frame)
                return EXIT_OK
            print("\033[H\033[2J" + frame, flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        agent.stop("top ended")


def _terminal_width() -> int:
    try:
        return max(60, os.get_terminal_size().columns)
    except OSError:
        return 120


def cmd_recommend(args: argparse.Namespace) -> int:
    from . import peaks
    from .kernel import LinuxKernel

    policy = _load_or_report(args, "; recommend takes the state file's directory from it")
    if policy is None:
        return EXIT_CONFIG
    kernel = LinuxKernel()
    try:
        current = (kernel.read_sysctl("", "nf_conntrack_max"), kernel.read_sysctl("", "nf_conntrack_buckets"))
    except OSError:
        current = (0, 0)
    path = peaks.path_beside(policy.agent.state_file)
    advice = peaks.recommend(peaks.Peaks.load(path), os.cpu_count() or 1, *current)
    if args.json:
        print(json.dumps(dict(advice, source=path)))
    else:
        print(f"from {path}:")
        for line in peaks.lines(advice):
            print(line)
    return EXIT_OK if advice["days"] else EXIT_FAIL


def cmd_restore(args: argparse.Namespace) -> int:
    from . import actions, report
    from .journal import ChangeJournal, JournalError
    from .kernel import LinuxKernel

    policy = _load_or_report(args, "; restore takes the state file's path from it")
    if policy is None:
        return EXIT_CONFIG
    journal = ChangeJournal(policy.agent.state_file)
    try:
        loaded = journal.load(quarantine=False)
    except JournalError as exc:
        print(f"conntrack-agent: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for problem in loaded.problems:
        print(f"conntrack-agent: could not read: {problem}", file=sys.stderr)
    if not journal.entries():
        print(f"nothing to restore ({policy.agent.state_file} records no change)")
        return EXIT_FAIL if loaded.problems else EXIT_OK
    kernel = LinuxKernel()
    order = list(actions.REGISTRY)   # timeouts, then the max, then the buckets it needed
    failures = 0
    for change in sorted(journal.entries(), key=lambda c: order.index(c.action) if c.action in order else len(order)):
        where = f"{change.name}" + (f" in netns {change.netns}" if change.netns else "")
        try:
            current = kernel.read_sysctl(change.netns, change.name)
            count = _fullest_count(kernel, policy.agent.namespaces)[0] if change.name == "nf_conntrack_max" else None
            verdict, sentence = report.restore_verdict(change.name, change.original, change.applied, current,
                                                       count, force=args.force)
            if verdict == "wait":
                failures += 1
            elif verdict == "restore":
                kernel.write_sysctl(change.netns, change.name, change.original)
            print(f"{where}: {sentence}")
            if verdict != "wait":
                journal.forget(change.netns, change.name)
        except OSError as exc:
            gone = kernel.is_missing(exc)
            print(f"{where}: cannot restore: {exc.strerror or exc}"
                  + ("; the namespace is gone, and its values with it (the record is dropped)" if gone else ""),
                  file=sys.stderr)
            if gone:
                journal.forget(change.netns, change.name)
            else:
                failures += 1
    return EXIT_FAIL if failures or loaded.problems else EXIT_OK


def _evict_selection(args: argparse.Namespace, policy: config.Policy) -> config.Evict:
    """The policy rule's [rule.evict] (or the defaults), with the command line on top.

    Every value goes through the same checks as the policy's (evictspec.FIELDS):
    what the policy refuses, the command line refuses too. Raises ValueError."""
    from dataclasses import replace

    base = config.Evict(budget_entries=0, budget_time=0.0) if not args.rule else None
    if args.rule:
        rule = next((r for r in policy.rules if r.name == args.rule), None)
        if rule is None or rule.action != "evict":
            known = ", ".join(r.name for r in policy.rules if r.action == "evict") or "none"
            raise ValueError(f"--rule {args.rule}: no evict rule of that name (evict rules: {known})")
        base = rule.evict
    changes: dict = {}
    for spec_field in FIELDS:
        if spec_field.option is None:
            continue
        value = getattr(args, spec_field.name)
        if value is None or value is False:
            continue
        try:
            if spec_field.name == "mark":
                changes["mark"], mask = parse_mark(value)
                if mask is not None:
                    changes["mark_mask"] = mask
            elif spec_field.kind == "names":
                changes[spec_field.name] = spec_field.validate(tuple(value))
            elif spec_field.kind == "flag":
                changes[spec_field.name] = True
            else:
                changes[spec_field.name] = spec_field.from_text(value)
        except Invalid as exc:
            raise ValueError(f"{spec_field.option}: {exc}") from None
    try:
        return replace(base, **changes)
    except ValueError as exc:  # the spec's checks across fields: "evict.src/dst: why"
        head, _, why = str(exc).partition(": ")
        names = head.replace("evict.", "").split("/")
        options = "/".join(FIELDS_BY_NAME[n].option or n if n in FIELDS_BY_NAME else n for n in names)
        raise ValueError(f"{options}: {why}") from None


def cmd_evict(args: argparse.Namespace) -> int:
    from . import ctnetlink, evict, netns
    from .executor import evict_fields

    policy = _load_or_report(args) if args.rule else config.loads(b"", "<built-in>")
    if policy is None:
        return EXIT_CONFIG
    try:
        spec = _evict_selection(args, policy)
    except ValueError as exc:
        print(f"conntrack-agent evict: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.netns and not config.valid_netns_name(args.netns):
        print(f"conntrack-agent evict: --netns: expected a name from /run/netns, got {args.netns!r}",
              file=sys.stderr)
        return EXIT_FAIL
    # A selector counts by what it leaves out: --src 0.0.0.0/0 names one but narrows nothing.
    established = config.established_timeout(policy)
    if not args.dry_run and not args.rule and not narrowing(spec, established):
        print("conntrack-agent evict: name at least one selector that narrows the selection (or --rule) "
              "to evict for real; --dry-run previews any selection", file=sys.stderr)
        return EXIT_FAIL
    if not args.dry_run and spec.include_established and not narrowing(spec, established, live_connections=True):
        print("conntrack-agent evict: --include-established with no selector that leaves some live TCP "
              "connections out would cut every one of them; narrow it (e.g. --dport, --src, --mark, "
              f"--timeout-below under {config.format_duration(established)})", file=sys.stderr)
        return EXIT_FAIL
    try:
        with netns.entered(args.netns):
            sock = ctnetlink.CtnetlinkSocket()
    except OSError as exc:
        print(f"conntrack-agent evict: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        report = evict.evict(sock, spec, dry_run=args.dry_run)
    except OSError as exc:  # the kernel refused, or answered what cannot be read (MalformedMessage)
        print(f"conntrack-agent evict: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        sock.close()
    fields = evict_fields(report)
    if args.json:
        print(json.dumps(dict(fields, dry_run=report.dry_run, max=report.max), default=str))
        return EXIT_OK
    verb = "would " + ("age" if spec.mode == "age" else "remove") if args.dry_run else \
        ("aged" if spec.mode == "age" else "removed")
    where = f"netns {args.netns}" if args.netns else "this netns"
    print(f"{verb} {fields['done']} entries in {where}")
    for part in fields["summary"].split("; "):
        print(f"  {part}")
    return EXIT_OK

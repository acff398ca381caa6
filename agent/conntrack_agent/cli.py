"""Command line: run, check, plan, status, restore, evict."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, List, Optional, Tuple

from . import __version__, config

# 78 is EX_CONFIG: the unit's RestartPreventExitStatus=78 keeps an invalid policy
# from becoming a restart loop.
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 78

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
    evict.add_argument("--mode", choices=("delete", "age"), help="delete, or age: shorten the remaining timeout")
    evict.add_argument("--age-timeout", metavar="DURATION", help='timeout given in age mode, e.g. "10s"')
    evict.add_argument("--proto", action="append", metavar="PROTO", choices=config.PROTOCOLS,
                       help="protocol (repeatable): " + ", ".join(config.PROTOCOLS))
    evict.add_argument("--state", action="append", metavar="STATE", choices=config.TCP_STATES,
                       help="TCP state (repeatable): " + ", ".join(config.TCP_STATES))
    evict.add_argument("--status", choices=("any", "unreplied", "not_assured", "assured"))
    evict.add_argument("--mark", metavar="MARK[/MASK]", help="conntrack mark, e.g. 0x10/0xff")
    evict.add_argument("--zone", type=int)
    evict.add_argument("--src", metavar="CIDR", help="original source address or CIDR")
    evict.add_argument("--dst", metavar="CIDR", help="original destination address or CIDR")
    evict.add_argument("--sport", type=int)
    evict.add_argument("--dport", type=int)
    evict.add_argument("--timeout-below", metavar="DURATION", help="remaining timeout below this (idle for long)")
    evict.add_argument("--include-established", action="store_true",
                       help="also select assured ESTABLISHED TCP entries (live connections)")
    evict.add_argument("--budget-entries", type=int, metavar="N", help="at most N entries (0: no bound)")
    evict.add_argument("--budget-time", metavar="DURATION", help='at most this long, e.g. "2s" ("0s": no bound)')
    evict.add_argument("--target-usage", type=float, metavar="RATIO", help="stop once usage is at or below this")
    evict.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_FAIL
    handler = {"run": cmd_run, "check": cmd_check, "plan": cmd_plan, "status": cmd_status,
               "restore": cmd_restore, "evict": cmd_evict}[args.command]
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
    files = config.policy_files(args.config)
    try:
        policy = _load(args)
    except config.PolicyError as exc:
        _report_invalid(exc)
        return EXIT_FAIL
    print("policy ok: " + (", ".join(str(f) for f in files) or "no files, built-in defaults"))
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
    agent = service.Agent(args.config, args.dry_run, logsetup.get_logger(), initial=policy)
    notifier = _notifier()
    if not args.once and not args.no_dbus:
        try:
            from . import mainloop
        except ImportError:
            mainloop = None
        if mainloop is not None:
            return mainloop.run(agent, notifier)
    return service.run_simple(agent, notifier, once=args.once)


def _notifier() -> Any:
    try:
        from . import sdnotify
    except ImportError:
        return None
    return sdnotify.Notifier()


def _kernel_agent(args: argparse.Namespace, policy: config.Policy) -> Any:
    """A throw-away Agent that reads the kernel but never acts or writes state."""
    from . import logsetup, service

    logsetup.configure("json", stream=open(os.devnull, "w"))
    quiet = replace_state_file(policy)
    agent = service.Agent(None, True, logsetup.get_logger(), initial=quiet)
    agent.start()
    if agent.last_sample is None:
        return agent
    time.sleep(max(policy.agent.interval, 0.2))  # a second reading gives the fill rate
    agent.last_sample = agent.sampler.sample()
    return agent


def replace_state_file(policy: config.Policy) -> config.Policy:
    # Read-only commands must not create /var/lib/conntrack-agent as a side effect.
    from dataclasses import replace
    return replace(policy, agent=replace(policy.agent, state_file=os.devnull + ".conntrack-agent-readonly",
                                         dry_run=True))


def cmd_plan(args: argparse.Namespace) -> int:
    policy = _load_or_report(args)
    if policy is None:
        return EXIT_CONFIG
    agent = _kernel_agent(args, policy)
    if agent.last_sample is None:
        print(f"conntrack-agent: {agent.status_line()}", file=sys.stderr)
        return EXIT_FAIL
    from . import policy as core
    decisions, _ = core.decide(agent.last_sample, agent.policy, agent.core, agent.env)
    if args.json:
        print(json.dumps({"status": agent.snapshot(), "decisions": [d.__dict__ for d in decisions]}, default=str))
        return EXIT_OK
    print(agent.status_line())
    if not decisions:
        print("nothing to do: no rule's trigger holds")
    for d in decisions:
        what = d.describe() if d.is_action else f"notice {d.kind}"
        print(f"- {d.rule or '(agent)'}: would {what}: {d.reason}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    snapshot = None
    if not args.kernel:
        try:
            from . import dbus_service
            snapshot = dbus_service.query_daemon()
        except Exception:  # the bus, gi or the daemon may be missing: read the kernel instead
            snapshot = None
    source = "agent (D-Bus)"
    if snapshot is None:
        try:
            policy = _load(args)
        except config.PolicyError:
            policy = config.loads(b"", "<built-in>")
        agent = _kernel_agent(args, policy)
        if agent.last_sample is None:
            print(f"conntrack-agent: {agent.status_line()}", file=sys.stderr)
            return EXIT_FAIL
        snapshot = agent.snapshot()
        sample = agent.last_sample
        snapshot["drops"] = {k: sample.deltas.get(k, 0) for k in ("drop", "early_drop", "insert_failed")}
        snapshot["totals"] = {k: v for k, v in agent.sampler.probes[sample.fullest.netns].read(time.monotonic, counters=True)
                              .counters.items() if k in ("drop", "early_drop", "insert_failed")}
        source = "kernel"
    if args.json:
        print(json.dumps(dict(snapshot, source=source), default=str))
        return EXIT_OK
    ttf = snapshot.get("time_to_full")
    rows = [
        ("source", source),
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
    return EXIT_OK


def _fullest_count(namespaces: Tuple[str, ...]) -> Tuple[int, str]:
    """The largest entry count among the watched namespaces: the global max binds each."""
    from . import netns, procfs

    best, where = 0, "the table"
    for name in namespaces or ("",):
        try:
            with netns.entered(name):
                count = procfs.read_sysctl("nf_conntrack_count")
        except OSError:
            continue
        if count >= best:
            best, where = count, (f"netns {name}" if name else "this netns")
    return best, where


def cmd_restore(args: argparse.Namespace) -> int:
    from . import netns, procfs
    from .state import StateError, StateFile

    policy = _load_or_report(args, "; restore takes the state file's path from it")
    if policy is None:
        return EXIT_CONFIG
    try:
        state = StateFile(policy.agent.state_file).load()
    except StateError as exc:
        print(f"conntrack-agent: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not state.entries():
        print(f"nothing to restore ({policy.agent.state_file} records no change)")
        return EXIT_OK
    failures = 0
    for change in state.entries():
        where = f"{change.name}" + (f" in netns {change.netns}" if change.netns else "")
        try:
            with netns.entered(change.netns):
                current = procfs.read_sysctl(change.name)
                if current == change.original:
                    print(f"{where}: already {current}")
                elif current != change.applied and not args.force:
                    print(f"{where}: left at {current}: another writer changed it after the agent set "
                          f"{change.applied} (--force restores {change.original} anyway)")
                else:
                    if change.name == "nf_conntrack_max" and not args.force:
                        count, fullest = _fullest_count(policy.agent.namespaces)
                        if count >= 0.9 * change.original:
                            print(f"{where}: not lowered to {change.original}: {fullest} holds {count} entries "
                                  "and new connections would be dropped (--force to do it anyway)")
                            failures += 1
                            continue
                    procfs.write_sysctl(change.name, change.original)
                    print(f"{where}: {current} -> {change.original}")
            state.forget(change.netns, change.name)
        except OSError as exc:
            print(f"{where}: cannot restore: {exc.strerror or exc}", file=sys.stderr)
            failures += 1
    return EXIT_FAIL if failures else EXIT_OK


def _evict_selection(args: argparse.Namespace, policy: config.Policy) -> config.Evict:
    """The policy rule's [rule.evict] (or the defaults), with the command line on top."""
    from dataclasses import replace

    base = config.Evict(budget_entries=0, budget_time=0.0) if not args.rule else None
    if args.rule:
        rule = next((r for r in policy.rules if r.name == args.rule), None)
        if rule is None or rule.action != "evict":
            known = ", ".join(r.name for r in policy.rules if r.action == "evict") or "none"
            raise ValueError(f"--rule {args.rule}: no evict rule of that name (evict rules: {known})")
        base = rule.evict
    changes: dict = {}
    for name in ("mode", "status", "zone", "src", "dst", "sport", "dport", "budget_entries", "target_usage"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.proto:
        changes["protocols"] = tuple(args.proto)
    if args.state:
        changes["tcp_states"] = tuple(args.state)
    if args.include_established:
        changes["include_established"] = True
    for name in ("age_timeout", "timeout_below", "budget_time"):
        value = getattr(args, name)
        if value is not None:
            try:
                changes[name] = config.parse_duration(value)
            except ValueError:
                raise ValueError(f"--{name.replace('_', '-')}: not a duration: {value!r} (e.g. \"10s\")") from None
    if args.mark is not None:
        mark, _, mask = args.mark.partition("/")
        try:
            changes["mark"] = int(mark, 0)
            if mask:
                changes["mark_mask"] = int(mask, 0)
        except ValueError:
            raise ValueError(f"--mark: expected MARK or MARK/MASK such as 0x10/0xff, got {args.mark!r}") from None
    return replace(base, **changes)


_SELECTORS = ("proto", "state", "mark", "zone", "src", "dst", "sport", "dport", "timeout_below")


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
    named = any(getattr(args, s) is not None for s in _SELECTORS) or args.status not in (None, "any")
    if not args.dry_run and not args.rule and not named:
        print("conntrack-agent evict: name at least one selector (or --rule) to evict for real; "
              "--dry-run previews any selection", file=sys.stderr)
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

"""The service shell: wires sampler, core and executor into one tick.

One tick: sample -> decide (pure) -> if anything is to be done, sample again and
decide again on the fresh reading -> act -> log. The second reading is cheap
(microseconds) and keeps a stale reading from causing an action; the core's
cooldowns and the per-tick action cap keep a storm of readings from causing a
storm of writes.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__, actions, config, decisions, logsetup, metrics, model
from .executor import Executor, netns_label, owned_records, sample_fields
from .journal import ChangeJournal
from .kernel import Kernel
from .sampler import Sampler

# While nothing can be read (nf_conntrack not loaded, namespace missing), look again
# this often: loading the module is an operator's act, not an emergency.
REPROBE_INTERVAL = 5.0
# Pressure counts as over once it has been gone this long (seconds).
PRESSURE_HOLD = 5.0
# Seconds between STATUS= updates to systemd when nothing was done.
STATUS_INTERVAL = 1.0
# Rewriting a small file costs ~300 µs here (ext4 on a virtio disk, open + write +
# rename, measured with /usr/bin/python3), against ~700 µs a second for the whole
# idle agent. So the metrics textfile is rewritten every METRICS_CALM_INTERVAL when
# calm (Prometheus' default scrape interval: a scrape never sees older data than
# one interval more), every second under pressure, and at once after an action. The
# runtime report (only while no D-Bus API serves it) on the same ticks: rewritten
# every 5 s, it made the agent without D-Bus cost 1.2x what it did before the report
# existed (bench/idle.py, side by side with the commit before it); `status` says how
# old it is, and it is never older than the liveness probe's 30 s readiness bound.
METRICS_CALM_INTERVAL = 15.0
METRICS_BUSY_INTERVAL = 1.0
# The /proc scan for unnamed namespaces ("*"): this often, so a new pod's namespace is
# watched within 2 s; ~1.3 ms a scan of 130 processes here, capped at 20 ms a scan.
DISCOVERY_SCAN = 1.5
# Without "*" the scan only finds a process in each named namespace, for its labels.
LABEL_SCAN = 10.0
# Who fills the table (attribution.py): one pass when a pressure episode starts, and
# again at most this often while it lasts. In a thread of its own: a pass walks the
# whole global table (~94 ms with 250k entries) and must not delay the tick's actions.
ATTRIBUTION_INTERVAL = 60.0
# ... but not before the agent has acted in the episode, or this long into it: a pass
# started with the episode (~55-80 ms of a CPU, its decoding under the GIL) ran
# alongside the ticks that raise the max and made that first raise late: at the storm
# bench's flat-out rate 67 and 68 ms after the trigger held, 51 and 56 ms with the pass
# after the first action (bench/storm.py, two runs each, BENCHMARKS.md).
ATTRIBUTION_DELAY = 1.0
# The daily peaks (peaks.py, for `recommend`) reach the disk at most this often.
PEAKS_SAVE_INTERVAL = 600.0
# A namespace holding changes the agent recorded that cannot be entered for this long
# is gone for good: its sysctls went with it, so its records are dropped. Shorter
# absences (a namespace being re-created, a slow mount) keep them.
NAMESPACE_GONE_AFTER = 60.0


class Agent:
    def __init__(self, policy_path: Optional[str], dry_run: bool, log: Any,
                 clock: Callable[[], float] = time.monotonic, initial: Optional[config.Policy] = None,
                 kernel: Optional[Kernel] = None, report_path: Optional[str] = None, read_only: bool = False):
        """`initial`: an already validated policy; otherwise the files are read
        (raises config.PolicyError). Reloads always read the files. `kernel`: the
        seam to the kernel (LinuxKernel unless a test hands in a fake). `report_path`:
        where the runtime report goes (None: nowhere). `read_only`: the CLI's view
        (plan, status): the state file is read, never moved, settled or written."""
        self.policy_path = policy_path
        self.force_dry_run = dry_run
        self.log = log
        self.clock = clock
        if kernel is None:
            from .kernel import LinuxKernel
            kernel = LinuxKernel()
        self.kernel = kernel
        self.policy = self._with_dry_run(initial) if initial is not None else self._read_policy()
        self.memory = decisions.Memory()
        self.sampler: Optional[Sampler] = None
        self.last_sample: Optional[model.Sample] = None
        self.last_decision: Optional[decisions.Decision] = None
        self.last_action_at: Optional[float] = None   # wall clock, for the status line
        self.decision_listeners: List[Callable[[decisions.Decision], None]] = []
        self._next_probe = 0.0
        self._under_pressure = False
        self._calm_since: Optional[float] = None
        self._status_sent_at: Optional[float] = None
        self._missing_since: Dict[str, float] = {}   # namespace -> first failed entry (records there)
        self.discovery: Any = None                     # with patterns ("*", "host", globs): discovery.Discovery
        self.watched: Dict[str, Any] = {}              # agent's name for it -> discovery.Netns
        self.labels: Dict[str, Dict[str, Any]] = {}    # agent's name -> netns_inode, cgroup, pod_uid, ...
        self._cap_logged = False
        self._attribution: Any = None                  # a pass under way (a thread) or its result
        self.last_attribution: Any = None              # (netns, attribution.Attribution, wall time)
        self._attributed_at: Optional[float] = None
        self._attribution_wanted: Optional[float] = None   # when the episode that wants a pass began
        self._report_path = report_path
        self.read_only = read_only
        self.counters = metrics.Counters()
        self._metrics_failed: Optional[str] = None
        self._metrics_at: Optional[float] = None
        self._peaks: Any = None
        self._peaks_path = ""
        self._peaks_saved: Optional[float] = None
        self._report_at: Optional[float] = None
        self._published_action: Optional[float] = None
        # The supervisor turns this off while the D-Bus API serves the report itself.
        self.report_to_file = True
        self._metrics_server: Any = None
        self._metrics_latest = ""
        self._listening = ""
        self.last_tick_at: Optional[float] = None     # wall clock of the last tick that finished

    # ------------------------------------------------------------------ set-up

    def _read_policy(self) -> config.Policy:
        return self._with_dry_run(config.load(self.policy_path))

    def _with_dry_run(self, loaded: config.Policy) -> config.Policy:
        if self.force_dry_run:
            loaded = replace(loaded, agent=replace(loaded.agent, dry_run=True))
        return loaded

    def policy_directories(self) -> List[str]:
        """Where the policy comes from: the directories a policy watcher watches."""
        from . import policywatch

        if self.policy_path:
            return policywatch.directories_of([self.policy_path])
        return policywatch.directories_of([os.path.join(config.ETC_DIR, config.MAIN_NAME),
                                           os.path.join(config.VENDOR_DIR, config.MAIN_NAME)])

    @property
    def policy_label(self) -> str:
        return ", ".join(self.policy.sources) or "built-in defaults"

    def start(self) -> Optional[model.Sample]:
        self.journal = self._open_journal()
        entry_bytes = self.kernel.entry_bytes() or model.DEFAULT_ENTRY_BYTES
        self.env = decisions.Environment(mem_total=self.kernel.mem_total(), entry_bytes=entry_bytes,
                                         namespaces=self.policy.agent.namespaces or ("",))
        self._open_sampler()
        self.executor = Executor(self.log, self.journal, self.kernel, self.current_usage, self.counters.event)
        self.executor.labels = self.labels
        logsetup.emit(self.log, "agent_started", self.policy.agent.dry_run, version=__version__,
                      namespaces=", ".join(self.policy.agent.namespaces) if self._dynamic()
                      else ", ".join(netns_label(n) for n in self.sampler.namespaces),
                      policy=self.policy_label, rules="; ".join(config.describe(self.policy)))
        self._start_discovery("start")
        self._probe("start")
        if not self.read_only:
            self._recover_ownership()
        sample = self.sampler.sample()
        self.last_sample = sample
        return sample

    def _open_journal(self) -> ChangeJournal:
        """The change journal. A damaged file never stops the agent: what can be read is
        kept, the file is moved aside, and the loss is logged at err."""
        journal = ChangeJournal(self.policy.agent.state_file)
        report = journal.load(quarantine=not self.read_only)
        if report.problems and not self.read_only:
            where = f"moved aside to {report.quarantined}" if report.quarantined else "left in place"
            lost = "; ".join(report.dropped) or "nothing recoverable"
            logsetup.emit(self.log, "journal_damaged", path=journal.path, problems="; ".join(report.problems[:5]),
                          quarantined=report.quarantined, dropped=report.dropped,
                          consequence=f"the file was {where}; records lost: {lost}; `conntrack-agent restore` "
                                      "cannot put those values back")
        return journal

    def _open_sampler(self) -> None:
        """A sampler for the policy's namespaces. The one it replaces is left open:
        a reload closes it only once the new policy is taken in full (see reload)."""
        names = tuple(self.watched) if self._dynamic() else self.policy.agent.namespaces
        self.sampler = Sampler(names, self.policy.agent.fill_rate_window, self.clock, kernel=self.kernel,
                               pace=lambda view, maximum: decisions.namespace_interval(view, maximum, self.policy),
                               urgent=lambda view: decisions.namespace_busy(view, self.policy))

    # ------------------------------------------------------------------ the node's namespaces

    def _dynamic(self) -> bool:
        """Patterns ("*", "host", globs) are followed live; plain names are a fixed list."""
        return any(p in ("*", "host") or any(c in p for c in "*?[") for p in self.policy.agent.namespaces)

    def _start_discovery(self, trigger: str = "namespace") -> None:
        if not self._dynamic():
            if self.discovery is not None:
                self.discovery.close()
                self.discovery = None
            self.watched = {}
            self.labels.clear()
            return
        from . import discovery

        if self.discovery is None:
            # Unnamed namespaces are only found by the /proc scan: often enough to see a
            # new pod within 2 s when "*" asks for them; otherwise only for labels.
            interval = DISCOVERY_SCAN if discovery.needs_unnamed(self.policy.agent.namespaces) else LABEL_SCAN
            self.discovery = discovery.Discovery(scan_interval=interval, clock=self.clock)
        self._apply_discovery(self.discovery.poll(rescan=True), trigger)

    def _discover(self) -> None:
        """Once a tick: a few µs when nothing changed."""
        if self.discovery is None:
            return
        changes = self.discovery.poll()
        if changes.appeared or changes.vanished or changes.renamed:
            self._apply_discovery(changes)

    def _apply_discovery(self, changes: Any, trigger: str = "namespace") -> None:
        from . import discovery, kernel as kernel_names

        patterns = self.policy.agent.namespaces
        keep = {ns.key for ns in self.watched.values()}
        chosen, left_out = discovery.select(patterns, self.discovery.namespaces.values(),
                                            self.policy.agent.max_namespaces, keep)
        watched: Dict[str, Any] = {}
        for ns in chosen:
            name = "" if ns.host else (ns.names[0] if ns.names else kernel_names.unnamed_name(ns.inode))
            watched[name] = ns
            if not ns.host and not ns.names and hasattr(self.kernel, "unnamed"):
                self.kernel.unnamed[name] = (ns.key, ns.pid)
            labels = {k: v for k, v in discovery.labels_of(ns).items() if k != "netns"}
            labels["netns_inode"] = ns.inode
            self.labels[name] = labels
        for name in [n for n in self.watched if n not in watched]:
            self.labels.pop(name, None)
            if hasattr(self.kernel, "unnamed"):
                self.kernel.unnamed.pop(name, None)
            logsetup.emit(self.log, "namespace_dropped", netns=name, netns_label=netns_label(name),
                          netns_inode=self.watched[name].inode)
        for name in [n for n in watched if n not in self.watched]:
            logsetup.emit(self.log, "namespace_watched", netns=name, netns_label=netns_label(name),
                          **self.labels.get(name, {}))
        if left_out and not self._cap_logged:
            self._cap_logged = True
            logsetup.emit(self.log, "namespace_cap", cap=self.policy.agent.max_namespaces, left_out=len(left_out),
                          examples=", ".join(ns.name for ns in left_out[:5]))
        elif not left_out:
            self._cap_logged = False
        self.watched = watched
        self.sampler.set_namespaces(tuple(watched))
        self.env = replace(self.env, namespaces=tuple(watched) or ("",))
        self._probe(trigger)   # open the new ones now, not at the next reprobe

    def _probe(self, trigger: str = "reprobe", baselined: Sequence[str] = (), **cause: Any) -> None:
        """Open what is not open yet (a module loaded, a namespace appeared), and bring
        what opened to the baseline (but those in `baselined`, already done). `trigger`
        and `cause` say why it looked now (see apply_baseline)."""
        opened, failed = self.sampler.open_missing()
        for name, why in failed.items():
            logsetup.emit(self.log, "conntrack_unavailable", netns=name, netns_label=netns_label(name), error=why)
        for name in opened:
            probe = self.sampler.probes[name]
            reading = probe.read(self.clock)
            logsetup.emit(self.log, "conntrack_available", netns=name, netns_label=netns_label(name),
                          count=reading.count, max=reading.max, buckets=reading.buckets, source=probe.source,
                          fallback_reason=probe.fallback_reason)
        self._next_probe = self.clock() + REPROBE_INTERVAL
        rest = [name for name in opened if name not in baselined]
        if rest:
            self.apply_baseline(rest, trigger, **cause)

    def probe_now(self, trigger: str = "uevent", **cause: Any) -> None:
        """nf_conntrack was just loaded (a kernel uevent): no need to wait for the reprobe.

        The baseline goes first, then the probe opens: the writes need only the module's
        sysctls, while the probe's ctnetlink socket makes the kernel load nfnetlink and
        nf_conntrack_netlink, a modprobe each, before it answers (in the Debian 12 VM
        under TCG, 340-780 ms of the 560-1080 ms from the uevent to the writes)."""
        if self.sampler.unavailable:
            done = self.apply_baseline(list(self.sampler.unavailable), trigger, **cause)
            self._probe(trigger, baselined=done, **cause)

    def apply_baseline(self, namespaces: List[str], trigger: str = "reload", **cause: Any) -> List[str]:
        """The admin's [baseline] in each given namespace (max and buckets once, from the
        agent's own namespace). Not recorded: baseline values are not the agent's.

        The event says what made the agent apply it (`trigger`: start, uevent, reprobe,
        namespace or reload) and carries CLOCK_MONOTONIC in µs once the writes are done
        (`monotonic_usec`), plus the supervisor's `cause` fields (for a uevent: its SEQNUM
        and when the agent woke for it): "modprobe to baseline" can then be taken apart
        against the kernel's own timestamps (journald's are taken when the entry reaches
        it, later). time.monotonic(), not self.clock: the point is comparing with the
        kernel's clock, whatever clock the agent's decisions run on.

        Returns the namespaces whose sysctls could be read (brought to the baseline,
        or already there)."""
        from . import baseline

        spec = self.policy.baseline
        if spec.empty:
            return []
        reached = []
        values = baseline.wanted(spec, self._sysctl_d_values() if spec.from_sysctl_d else None)
        owned = {(c.netns, c.name) for c in self.journal.entries()}
        for name in namespaces:
            current = {}
            for sysctl in values:
                try:
                    current[sysctl] = self.kernel.read_sysctl(name, sysctl)
                except OSError:
                    continue   # a sysctl this kernel or namespace lacks: nothing to bring up
            if current:
                reached.append(name)
            mine = frozenset(s for (ns, s) in owned if ns == name or s in baseline.GLOBALS)
            writes = baseline.plan(values, current, mine, global_scope=(name == ""))
            done, failed = [], []
            for write in writes:
                if self.policy.agent.dry_run:
                    done.append(write)
                    continue
                try:
                    self.kernel.write_sysctl(name, write.name, write.value)
                    done.append(write)
                except OSError as exc:
                    failed.append(f"{write.name}: {exc.strerror or exc}")
            if done or failed:
                changes = ", ".join(f"{w.name[len('nf_conntrack_'):]} {w.current}→{w.value} ({w.source})"
                                    for w in done) or "nothing"
                written_at = time.monotonic()
                logsetup.emit(self.log, "baseline_applied", self.policy.agent.dry_run, netns=name,
                              netns_label=netns_label(name), changes=changes,
                              failed="; ".join(failed) or None,
                              detail=("; could not write " + "; ".join(failed)) if failed else "",
                              trigger=trigger, monotonic_usec=int(written_at * 1e6), **cause)
        return reached

    def _sysctl_d_values(self) -> Dict[str, Any]:
        """The net.netfilter.nf_conntrack_* lines of sysctl.d, in systemd-sysctl's order
        ({sysctl: (value, "file:line")}); globs resolved against the sysctls present."""
        from . import sysctld

        settings = sysctld.read()
        try:
            present = ["net.netfilter." + n for n in self.kernel.sysctl_names("")]
        except OSError:
            present = []
        values = {}
        for key, assignment in settings.resolve(present).items():
            name = key.rsplit(".", 1)[-1]
            if name.startswith("nf_conntrack_") and name != "nf_conntrack_count":
                values[name] = (assignment.value, f"{assignment.file}:{assignment.line}")
        if settings.problems:
            logsetup.emit(self.log, "baseline_applied", self.policy.agent.dry_run, netns="",
                          netns_label="sysctl.d", changes="nothing",
                          failed="; ".join(str(p) for p in settings.problems[:5]),
                          detail="; sysctl.d problems: " + "; ".join(str(p) for p in settings.problems[:5]))
        return values

    def _recover_ownership(self) -> None:
        """After a start: keep owning what is still the agent's value, settle writes a
        kill interrupted, forget what a reboot or another writer replaced. Changes no
        rule claims any more are left to the core, which restores them as orphans."""
        for change in self.journal.entries():
            try:
                current = self.kernel.read_sysctl(change.netns, change.name)
            except OSError as exc:
                if self.kernel.is_missing(exc):
                    self._missing_since.setdefault(change.netns, self.clock())
                continue   # cannot tell now; the record stays for the core and for `restore`
            if change.pending:
                # Killed between the record and the write (or the confirmation).
                if current == change.applied:
                    self.journal.settle(change.netns, change.name, current)
                elif current == change.original:
                    self.journal.forget(change.netns, change.name)
                    continue
            if current == change.applied:
                self._claim(change)
                continue
            reason = ("it is back at its original (a reboot?)" if current == change.original
                      else f"another writer set it to {current} since the agent set {change.applied}")
            logsetup.emit(self.log, "restore_skipped", netns=change.netns, netns_label=netns_label(change.netns),
                          name=change.name, reason=reason + "; forgetting the saved original")
            self.journal.forget(change.netns, change.name)

    def _claim(self, change: Any) -> None:
        """A rule that still stands behind a kept timeout change has its episode back."""
        if change.action != "set_timeouts":
            return
        for rule in self.policy.active_rules():
            owned = decisions.Owned.of(change)
            if actions.get(change.action).claims(rule, owned, self.env):
                rule_memory = self.memory.rule(rule.name)
                self.memory = self.memory.with_rule(rule.name, replace(
                    rule_memory, covered=rule_memory.covered | {change.netns},
                    active_since=rule_memory.active_since if rule_memory.active_since is not None else self.clock()))

    # ------------------------------------------------------------------ the tick

    def tick(self) -> float:
        self._discover()
        if self._attribution is not None:
            self._collect_attribution()
        if self.sampler.unavailable and self.clock() >= self._next_probe:
            self._probe("reprobe")
        # The namespaces under pressure first; the calm ones due are read once this
        # tick has decided and acted (catch_up, below).
        sample = self.sampler.sample(defer=True)
        if sample is None:
            self.last_sample = None
            return REPROBE_INTERVAL
        owned = owned_records(self.journal)
        found, memory = decisions.decide(sample, self.policy, self.memory, self.env, owned)
        if any(d.is_action for d in found):
            # Act on a fresh reading, not one a few hundred microseconds old: decide again
            # from the memory before the first look (the first decision is discarded).
            # Only the namespaces acted on are re-read: with hundreds watched, re-reading
            # all of them with their counters would delay the write by ~30 ms.
            acted = {d.netns for d in found if d.is_action} | {n for d in found for n in d.targets}
            fresh = self.sampler.sample(counters=True, only=acted)
            if fresh is not None:
                sample = model.carrying_deltas(fresh, sample)
                found, memory = decisions.decide(sample, self.policy, self.memory, self.env, owned)
        self.memory = memory
        self._note_pressure(sample, busy=decisions.under_pressure(sample, self.policy))
        for decision in found:
            outcome = self.executor.execute(decision, sample, self.policy)
            self.memory = decisions.after_outcome(self.memory, decision, outcome, sample.time)
            self.counters.after(decision, outcome)
            if outcome.missing:
                self._note_missing(outcome.missing, decision)
            if decision.kind in ("raise_max", "restore_max") and outcome.applied and decision.new:
                sample = model.with_max(sample, decision.new)
            self.last_decision = decision
            if decision.is_action:
                self.last_action_at = time.time()
                self._status_sent_at = None   # show the action at once
            for listener in self.decision_listeners:
                listener(decision)
        # Under pressure (including its hold time) the fast tick runs: a bursty storm
        # has quiet gaps between bursts that must not send the agent back to sleep.
        # Otherwise the sample was just found not busy: next_interval() without asking
        # again. After the actions: the thresholds it predicts are of the max now set.
        interval = (decisions.fast_interval(sample, self.policy) if self._under_pressure
                    else decisions.calm_interval(sample, self.policy))
        if self._attribution_wanted is not None:
            acted = any(d.is_action for d in found)
            if acted or sample.time - self._attribution_wanted >= ATTRIBUTION_DELAY:
                self._attribution_wanted = None
                self._start_attribution(sample.soonest.netns, sample.soonest.count)
        # The calm namespaces this tick left, unless a threshold's crossing is predicted
        # sooner than the fast tick: that tick comes first (with 250 namespaces the reads
        # took 3-17 ms on 2 vCPUs under a storm, and would delay it by as much), the
        # reads after it. Put off for a fast tick at most: read by the first tick after.
        fast = self.policy.agent.fast_interval
        if (interval >= fast or self.sampler.deferred_since is None
                or self.clock() - self.sampler.deferred_since >= fast):
            self.sampler.catch_up()
        self.last_sample = sample
        self.last_tick_at = time.time()
        return interval

    def _note_missing(self, missing: Any, decision: decisions.Decision) -> None:
        """A namespace whose records could not be restored because it cannot be entered:
        logged once, and its records dropped once it has been gone NAMESPACE_GONE_AFTER."""
        now = self.clock()
        for name in missing:
            records = [c for c in self.journal.entries() if c.netns == name]
            changes = ", ".join(c.name for c in records) or "nothing"
            if name not in self._missing_since:
                self._missing_since[name] = now
                logsetup.emit(self.log, "namespace_missing", decision.dry_run, netns=name,
                              netns_label=netns_label(name), changes=changes, grace=NAMESPACE_GONE_AFTER,
                              error="no such namespace", rule=decision.rule)
            elif now - self._missing_since[name] >= NAMESPACE_GONE_AFTER and not self.kernel.namespace_exists(name):
                if not decision.dry_run:
                    self.journal.forget_namespace(name)
                del self._missing_since[name]
                logsetup.emit(self.log, "namespace_gone", decision.dry_run, netns=name,
                              netns_label=netns_label(name), changes=changes)

    def _start_attribution(self, netns: str, count: int) -> None:
        now = self.clock()
        if self.read_only or self._attribution is not None:
            return
        if self._attributed_at is not None and now - self._attributed_at < ATTRIBUTION_INTERVAL:
            return
        self._attributed_at = now
        import threading

        box: Dict[str, Any] = {"netns": netns}

        def run() -> None:
            try:
                box["result"] = self.kernel.attribute(netns, count)
            except Exception as exc:  # noqa: BLE001 - reported by the tick that collects it
                box["error"] = exc

        box["thread"] = threading.Thread(target=run, name="attribution", daemon=True)
        box["thread"].start()
        self._attribution = box

    def _collect_attribution(self) -> None:
        """The pass's result, logged by the tick thread once it is there."""
        box = self._attribution
        if box is None or box["thread"].is_alive():
            return
        self._attribution = None
        netns = box["netns"]
        if "error" in box:
            error = box["error"]
            summary = f"the pass failed: {getattr(error, 'strerror', None) or error}"
            self.last_attribution = None
            fields: Dict[str, Any] = {}
        else:
            result = box["result"]
            self.last_attribution = (netns, result, time.time())
            summary, fields = attribution_summary(result)
        logsetup.emit(self.log, "pressure_attribution", netns=netns, netns_label=netns_label(netns),
                      summary=summary, **dict(fields, **self.labels.get(netns, {})))

    def status_due(self) -> bool:
        """Whether the one-line status (and the runtime report) is worth sending now: after
        an action, else once per STATUS_INTERVAL (it changes every tick; systemd needs no more)."""
        now = self.clock()
        if self._status_sent_at is not None and now - self._status_sent_at < STATUS_INTERVAL:
            return False
        self._status_sent_at = now
        self._publish(now)
        return True

    def _note_peaks(self, now: float) -> None:
        """Today's peaks for `recommend`; saved at most every PEAKS_SAVE_INTERVAL."""
        from . import peaks

        sample = self.last_sample
        if sample is None or self.read_only:
            return
        if self._peaks is None:
            self._peaks_path = peaks.path_beside(self.policy.agent.state_file)
            self._peaks = peaks.Peaks.load(self._peaks_path)
        owned = self.journal.get("", "nf_conntrack_max")
        self._peaks.note(time.strftime("%Y-%m-%d"), sample.count, sample.fill_rate, sample.max,
                         owned.applied if owned is not None else None)
        if self._peaks.changed and (self._peaks_saved is None or now - self._peaks_saved >= PEAKS_SAVE_INTERVAL):
            self._save_peaks(now)

    def _save_peaks(self, now: float) -> None:
        self._peaks_saved = now
        try:
            self._peaks.save(self._peaks_path)
        except OSError:
            pass   # a convenience for `recommend`; the journal is what matters, and it has its own errors

    def _publish(self, now: float) -> None:
        self._note_peaks(now)
        fresh_action = self.last_action_at is not None and self.last_action_at != self._published_action
        self._published_action = self.last_action_at
        every = METRICS_BUSY_INTERVAL if self._under_pressure else METRICS_CALM_INTERVAL
        if fresh_action or self._metrics_at is None or now - self._metrics_at >= every:
            self._metrics_at = now
            self.publish_metrics()
        if self.report_to_file and (fresh_action or self._report_at is None or now - self._report_at >= every):
            self._report_at = now
            self.publish_report()

    def _note_pressure(self, sample: model.Sample, busy: bool) -> None:
        """One `pressure` event when pressure starts, one `pressure_eased` once it has
        been gone for PRESSURE_HOLD: a bursty storm is one episode, not a log line per burst."""
        if busy:
            self._calm_since = None
            if self._under_pressure:
                return
        elif not self._under_pressure:
            return
        elif self._calm_since is None or sample.time - self._calm_since < PRESSURE_HOLD:
            if self._calm_since is None:
                self._calm_since = sample.time
            return
        self._under_pressure = busy
        fields = sample_fields(sample)
        netns = sample.soonest.netns
        fields.update(self.labels.get(netns, {}))
        if busy:
            self._attribution_wanted = sample.time   # started by the tick once it has acted (tick)
            ttf = sample.time_to_full
            detail = f"filling at {sample.fill_rate:+.0f}/s" + (f", full in {ttf:.1f}s" if ttf is not None else "")
            if sample.deltas.get("drop"):
                detail += f", {sample.deltas['drop']} packets dropped"
            logsetup.emit(self.log, "pressure", netns=netns, netns_label=netns_label(netns), detail=detail, **fields)
        else:
            self._attribution_wanted = None
            logsetup.emit(self.log, "pressure_eased", netns=netns, netns_label=netns_label(netns), **fields)

    # ------------------------------------------------------------------ control

    def reload(self) -> bool:
        """Re-read the policy and take it in full, or not at all: anything that raises
        while the new policy and what follows from it (the watched namespaces, their
        sampler and discovery, the environment, the memory's `lost`) are being taken
        puts every piece back as it was and re-raises (the supervisor logs
        reload_failed: the running policy stays, as that event says). Only then is the
        old sampler and discovery closed, and the baseline applied: its writes to the
        kernel cannot be taken back, so a failure there does not undo the reload."""
        try:
            fresh = self._read_policy()
        except config.PolicyError as exc:
            logsetup.emit(self.log, "policy_invalid", keeping=f"keeping the running policy ({self.policy_label})",
                          error=str(exc), errors=[str(p) for p in exc.problems])
            return False
        before = _Derived.of(self)
        try:
            self._take(fresh)
            rules = "; ".join(config.describe(self.policy))
        except Exception:
            opened = (self.sampler, self.discovery)
            before.restore(self)
            _close_replaced(opened, (before.sampler, before.discovery))
            raise
        _close_replaced((before.sampler, before.discovery), (self.sampler, self.discovery))
        logsetup.emit(self.log, "policy_loaded", self.policy.agent.dry_run, policy=self.policy_label, rules=rules)
        # An edited [baseline] applies now, not at the next module load or new namespace.
        try:
            self.apply_baseline(list(self.sampler.probes), "reload")
        except Exception as exc:  # noqa: BLE001 - see the docstring; each write's own failure is logged there
            logsetup.emit(self.log, "internal_error", error=f"applying the baseline: {type(exc).__name__}: {exc}",
                          exc_info=exc)
        return True

    def _take(self, fresh: config.Policy) -> None:
        """The policy and what it derives; reload() undoes it all if this raises."""
        namespaces_changed = fresh.agent.namespaces != self.policy.agent.namespaces
        self.policy = fresh
        self.memory = replace(self.memory, lost=frozenset())  # a reload is the operator's "try again"
        if namespaces_changed:
            self.env = replace(self.env, namespaces=fresh.agent.namespaces or ("",))
            self.discovery = None      # the old one stays open until the reload is taken (reload)
            self.watched = {}
            self.labels.clear()
            self._open_sampler()
            self._start_discovery("reload")
            self._probe("reload")

    def evaluate(self) -> List[decisions.Decision]:
        """What the agent would do on its latest sample, without acting or advancing its
        memory (a sample of its own would consume counter deltas the next tick needs)."""
        if self.last_sample is None:
            return []
        found, _ = decisions.decide(self.last_sample, self.policy, self.memory, self.env,
                                    owned_records(self.journal))
        return found

    def current_usage(self) -> float:
        """Usage of the fullest watched namespace now, without advancing the fill-rate
        tracker (an eviction sweep asks this while it works)."""
        readings = [probe.read(self.clock) for probe in self.sampler.probes.values()]
        return max((model.usage_of(r.count, r.max) for r in readings), default=0.0)

    def snapshot(self) -> Dict[str, Any]:
        sample = self.last_sample
        fields = sample_fields(sample)
        last = self.last_decision
        return {
            "count": fields.get("count", 0),
            "max": fields.get("max", 0),
            "buckets": fields.get("buckets", 0),
            "usage": fields.get("usage", 0.0),
            "fill_rate": fields.get("fill_rate", 0.0),
            "time_to_full": fields.get("time_to_full"),
            "netns": sample.fullest.netns if sample else "",
            "last_decision": f"{last.describe()}: {last.reason}" if last else "",
            "policy_path": self.policy_label,
            "dry_run": self.policy.agent.dry_run,
        }

    def report(self) -> Dict[str, Any]:
        """What the agent owns, and where every rule's timers stand (plan, status)."""
        from . import report as reports

        sample = self.last_sample
        t = sample.time if sample is not None else self.clock()
        owned = []
        rules = self.policy.active_rules()
        for change in self.journal.entries():
            o = decisions.Owned.of(change)
            action = actions.REGISTRY.get(change.action)
            claimed = action is not None and any(action.claims(r, o, self.env) for r in rules)
            current = change.applied
            if sample is not None and change.name in ("nf_conntrack_max", "nf_conntrack_buckets"):
                current = sample.max if change.name == "nf_conntrack_max" else sample.buckets
            _, restore = reports.restore_verdict(change.name, change.original, change.applied, current,
                                                 sample.count if sample is not None else None)
            owned.append(dict(netns=change.netns, name=change.name, action=change.action, rule=change.rule,
                              original=change.original, applied=change.applied, current=current,
                              pending=change.pending, orphan=not claimed, restore=restore, since=change.since))
        rule_rows = []
        for rule in self.policy.rules:
            rm = self.memory.rule(rule.name)
            spec_after = {"set_timeouts": rule.set_timeouts.restore_after,
                          "raise_max": None if rule.raise_max.raise_only else rule.raise_max.restore_after}
            lost = sorted(f"{cap} in {netns_label(ns)}" for cap, ns in self.memory.lost
                          if cap == actions.capability_of(rule.action))
            rule_rows.append(dict(
                name=rule.name, action=rule.action, enabled=rule.enabled,
                cooldown_left=(max(0.0, rule.cooldown - (t - rm.last_fired)) if rm.last_fired is not None else 0.0),
                held_for=(t - rm.held_since) if rm.held_since is not None else None,
                sustained=rule.trigger.sustained,
                episode_for=(t - rm.active_since) if rm.active_since is not None else None,
                covered=sorted(rm.covered),
                calm_for=(t - rm.calm_since) if rm.calm_since is not None else None,
                restore_after=spec_after.get(rule.action), lost=lost))
        headroom = None
        if sample is not None:
            headroom = {"free": max(0, sample.max - sample.count)}
            if self.last_attribution is not None and self.last_attribution[0] == sample.fullest.netns:
                _, result, at = self.last_attribution
                headroom["early_droppable"] = result.estimate(result.states.get("unreplied", 0))
                headroom["effective"] = headroom["free"] + headroom["early_droppable"]
                headroom["measured_at"] = at
        return {"pid": os.getpid(), "written_at": time.time(), "last_tick_at": self.last_tick_at,
                "headroom": headroom, "labels": self.labels,
                "policy": self.policy_label,
                "dry_run": self.policy.agent.dry_run, "status": self.snapshot(), "owned": owned, "rules": rule_rows,
                "plan": [f"{d.rule or '(agent)'}: would {d.describe() if d.is_action else 'notice ' + d.kind}: "
                         f"{d.reason}" for d in self.evaluate()]}

    def metrics_view(self) -> Dict[str, Any]:
        """What the metrics show, from the latest sample, the journal and the policy."""
        sample = self.last_sample
        view: Dict[str, Any] = {"version": __version__, "last_action_at": self.last_action_at, "timeouts": []}
        if sample is None:
            return view
        owned_max = self.journal.get("", "nf_conntrack_max")
        grow = next((r for r in self.policy.active_rules() if r.action == "raise_max"), None)
        if grow is not None:
            limit, _ = decisions.ceiling(self.policy, grow, self.env)
        else:
            limit = self.policy.limits.max_ceiling
        view.update(max=sample.max, buckets=sample.buckets, ceiling=limit,
                    max_original=owned_max.original if owned_max is not None and not owned_max.pending else sample.max)
        agent = self.policy.agent
        namespaces = []
        for ns in sample.namespaces:
            reading = self.sampler.last_readings.get(ns.netns)
            ttf = ns.time_to_full
            pressure = (ns.usage >= agent.fast_usage or (ttf is not None and ttf < agent.fast_time_to_full)
                        or any(ns.deltas.get(c, 0) for c in ("drop", "early_drop")))
            namespaces.append({"netns": ns.netns, "count": ns.count, "fill_rate": round(ns.fill_rate, 3),
                               "time_to_full": ttf, "pressure": pressure,
                               "counters": dict(reading.counters) if reading is not None else {}})
        view["namespaces"] = namespaces
        view["timeouts"] = [(c.netns, c.name[len("nf_conntrack_"):], c.applied) for c in self.journal.entries()
                            if c.action == "set_timeouts" and not c.pending]
        return view

    def metrics_text(self) -> str:
        return metrics.render(metrics.families_of(self.metrics_view(), self.counters))

    def publish_metrics(self) -> None:
        """The textfile for node-exporter, when its directory exists, and the text the
        optional HTTP endpoint serves (best effort: the agent's job is the table, not
        the exposition)."""
        path, listen = self.policy.metrics.textfile, self.policy.metrics.listen
        if listen != self._listening:
            self._serve_metrics(listen)
        if not (metrics.directory_ready(path) or self._metrics_server is not None):
            return
        text = self.metrics_text()
        self._metrics_latest = text
        if not metrics.directory_ready(path):
            return
        try:
            metrics.write_textfile(path, text)
        except OSError as exc:
            if path != self._metrics_failed:
                self._metrics_failed = path
                logsetup.emit(self.log, "metrics_unavailable", path=path, error=exc.strerror or str(exc))

    def _serve_metrics(self, listen: str) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        self._listening = listen
        if not listen or self.read_only:
            return
        from . import metrics_http  # http.server only when asked for (~2.7 MB of RSS)
        try:
            self._metrics_server = metrics_http.MetricsServer(listen, lambda: self._metrics_latest)
        except OSError as exc:
            logsetup.emit(self.log, "metrics_unavailable", path=f"http://{listen}/metrics",
                          error=exc.strerror or str(exc))

    def publish_report(self) -> None:
        """The runtime copy of report() for `plan`/`status` without D-Bus; once per
        status update. Best effort: a read-only /run only costs the CLI that view."""
        from . import report as reports

        if self._report_path is None:
            return
        try:
            reports.write_runtime(self._report_path, self.report())
        except OSError as exc:
            logsetup.emit(self.log, "report_unavailable", path=self._report_path, error=exc.strerror or str(exc))
            self._report_path = None

    def status_line(self) -> str:
        sample = self.last_sample
        if sample is None:
            missing = "; ".join(f"{netns_label(n)}: {why}" for n, why in self.sampler.unavailable.items())
            return f"waiting for conntrack ({missing or 'no reading yet'})"
        line = f"count {sample.count}/{sample.max} ({sample.usage:.1%}), fill {sample.fill_rate:+.0f}/s"
        if sample.time_to_full is not None and sample.time_to_full < 3600:
            line += f", full in {sample.time_to_full:.0f}s"
        if self.policy.agent.dry_run:
            line += ", dry-run"
        if self.last_decision is not None and self.last_action_at is not None:
            stamp = time.strftime("%H:%M:%S", time.localtime(self.last_action_at))
            line += f", last action {stamp} {self.last_decision.describe()}"
        return line

    def stop(self, why: str = "signal") -> None:
        logsetup.emit(self.log, "agent_stopping", why=why)
        if self._peaks is not None and self._peaks.changed:
            self._save_peaks(self.clock())
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self.sampler is not None:
            self.sampler.close()


def _close_replaced(old: Sequence[Any], kept: Sequence[Any]) -> None:
    """Close each of `old` (a sampler, a discovery) that is not the one kept in its place."""
    for thing, keep in zip(old, kept):
        if thing is not None and thing is not keep:
            thing.close()


class _Derived:
    """What Agent.reload() changes, as it was before: put back as one if the reload fails.
    labels and the kernel's unnamed namespaces are dicts others hold (the executor,
    the kernel seam): their contents are put back, not the objects."""

    FIELDS = ("policy", "memory", "env", "sampler", "discovery", "watched", "_cap_logged", "_next_probe")

    def __init__(self, values: Dict[str, Any], labels: Dict[str, Any], unnamed: Optional[Dict[str, Any]]) -> None:
        self.values, self.labels, self.unnamed = values, labels, unnamed
        self.sampler, self.discovery = values["sampler"], values["discovery"]

    @classmethod
    def of(cls, agent: "Agent") -> "_Derived":
        unnamed = getattr(agent.kernel, "unnamed", None)
        return cls({name: getattr(agent, name) for name in cls.FIELDS}, dict(agent.labels),
                   dict(unnamed) if unnamed is not None else None)

    def restore(self, agent: "Agent") -> None:
        for name, value in self.values.items():
            setattr(agent, name, value)
        agent.labels.clear()
        agent.labels.update(self.labels)
        if self.unnamed is not None:
            agent.kernel.unnamed.clear()
            agent.kernel.unnamed.update(self.unnamed)


def attribution_summary(result: Any) -> Any:
    """(one sentence, log fields) for an attribution pass."""
    states = result.states
    sampled = max(1, sum(states.values()))
    mix = ", ".join(f"{n * 100 // sampled}% {name}" for name, n in sorted(states.items(), key=lambda kv: -kv[1]))
    parts = [mix + " (unreplied: what the kernel's early_drop can reclaim)"]
    if result.protocols:
        parts.append("protocols " + ", ".join(f"{p} {result.estimate(n)}" for p, n in result.protocols.items()))
    if result.sources:
        parts.append("top sources " + ", ".join(f"{a} {result.estimate(n)}" for a, n in result.sources[:3]))
    if result.destinations:
        parts.append("top destinations " + ", ".join(f"{a} {result.estimate(n)}"
                                                     for a, n in result.destinations[:3]))
    parts.append(f"{result.sampled} of {result.total} entries decoded in {result.seconds * 1000:.0f} ms"
                 + (f" (×{result.scale:.1f} to estimate)" if result.scale > 1 else ""))
    if result.note:
        parts.append(result.note)
    fields = {"unreplied": result.estimate(states.get("unreplied", 0)),
              "assured": result.estimate(states.get("assured", 0)),
              "top_sources": [a for a, _ in result.sources[:5]],
              "top_destinations": [a for a, _ in result.destinations[:5]],
              "sampled": result.sampled, "total": result.total}
    return "; ".join(parts), fields

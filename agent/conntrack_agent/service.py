"""The service shell: wires sampler, core and executor into one tick.

One tick: sample -> decide (pure) -> if anything is to be done, sample again and
decide again on the fresh reading -> act -> log. The second reading is cheap
(microseconds) and keeps a stale reading from causing an action; the core's
cooldowns and the per-tick action cap keep a storm of readings from causing a
storm of writes.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

from . import __version__, config, decisions, logsetup, model, netns, procfs
from .executor import GLOBAL, Executor, netns_label, sample_fields
from .sampler import Sampler
from .journal import ChangeJournal

# While nothing can be read (nf_conntrack not loaded, namespace missing), look again
# this often: loading the module is an operator's act, not an emergency.
REPROBE_INTERVAL = 5.0
# Pressure counts as over once it has been gone this long (seconds).
PRESSURE_HOLD = 5.0
# Seconds between STATUS= updates to systemd when nothing was done.
STATUS_INTERVAL = 1.0


class Agent:
    def __init__(self, policy_path: Optional[str], dry_run: bool, log: Any,
                 clock: Callable[[], float] = time.monotonic, initial: Optional[config.Policy] = None):
        """`initial`: an already validated policy; otherwise the files are read
        (raises config.PolicyError). Reloads always read the files."""
        self.policy_path = policy_path
        self.force_dry_run = dry_run
        self.log = log
        self.clock = clock
        self.policy = self._with_dry_run(initial) if initial is not None else self._read_policy()
        self.core = decisions.Memory()
        self.sampler: Optional[Sampler] = None
        self.last_sample: Optional[model.Sample] = None
        self.last_decision: Optional[decisions.Decision] = None
        self.last_action_at: Optional[float] = None   # wall clock, for the status line
        self.decision_listeners: List[Callable[[decisions.Decision], None]] = []
        self._next_probe = 0.0
        self._under_pressure = False
        self._calm_since: Optional[float] = None
        self._status_sent_at: Optional[float] = None

    # ------------------------------------------------------------------ set-up

    def _read_policy(self) -> config.Policy:
        return self._with_dry_run(config.load(self.policy_path))

    def _with_dry_run(self, loaded: config.Policy) -> config.Policy:
        if self.force_dry_run:
            loaded = replace(loaded, agent=replace(loaded.agent, dry_run=True))
        return loaded

    @property
    def policy_label(self) -> str:
        return ", ".join(self.policy.sources) or "built-in defaults"

    def start(self) -> Optional[model.Sample]:
        self.state = ChangeJournal(self.policy.agent.state_file).load()
        entry_bytes = procfs.slab_object_size() or model.DEFAULT_ENTRY_BYTES
        self.env = decisions.Environment(mem_total=procfs.mem_total(), entry_bytes=entry_bytes)
        self._open_sampler()
        self.executor = Executor(self.log, self.state, self.policy.agent.namespaces, _evict_runner(self))
        logsetup.emit(self.log, "agent_started", self.policy.agent.dry_run, version=__version__,
                      namespaces=", ".join(netns_label(n) for n in self.sampler.namespaces),
                      policy=self.policy_label, rules="; ".join(config.describe(self.policy)))
        self._probe()
        self._recover_ownership()
        sample = self.sampler.sample()
        self.last_sample = sample
        return sample

    def _open_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        self.sampler = Sampler(self.policy.agent.namespaces, self.policy.agent.fill_rate_window, self.clock)

    def _probe(self) -> None:
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

    def _recover_ownership(self) -> None:
        """After a restart: keep owning what is still the agent's value; forget what
        a reboot or another writer replaced (and so has nothing to restore)."""
        originals = {}
        for change in self.state.entries():
            try:
                with netns.entered(change.netns):
                    current = procfs.read_sysctl(change.name)
            except OSError:
                continue
            if current == change.applied:
                if change.netns == GLOBAL and change.name == "nf_conntrack_max":
                    self.core = replace(self.core, owned_max=current)
                if change.name.startswith("nf_conntrack_") and "timeout" in change.name:
                    rule_state = self.core.rule(change.rule)
                    if rule_state.active_since is None:
                        self.core = self.core.with_rule(change.rule, replace(rule_state, active_since=self.clock()))
                originals[change.name] = change.original
            else:
                reason = ("it is back at its original (a reboot?)" if current == change.original
                          else f"another writer set it to {current} since the agent set {change.applied}")
                logsetup.emit(self.log, "restore_skipped", netns=change.netns, netns_label=netns_label(change.netns),
                              name=change.name, reason=reason + "; forgetting the saved original")
                self.state.forget(change.netns, change.name)
        self.env = replace(self.env, originals={k: v for k, v in originals.items() if k == "nf_conntrack_max"})

    # ------------------------------------------------------------------ the tick

    def tick(self) -> float:
        if self.sampler.unavailable and self.clock() >= self._next_probe:
            self._probe()
        sample = self.sampler.sample()
        if sample is None:
            self.last_sample = None
            return REPROBE_INTERVAL
        decisions, core = decisions.decide(sample, self.policy, self.core, self.env)
        if any(d.is_action for d in decisions):
            # Act on a fresh reading, not one a few hundred microseconds old: decide again
            # from the state before the first look (the first decision is discarded).
            fresh = self.sampler.sample(counters=True)
            if fresh is not None:
                sample = fresh
                decisions, core = decisions.decide(sample, self.policy, self.core, self.env)
        self.core = core
        self._note_pressure(sample, busy=decisions.under_pressure(sample, self.policy))
        # Under pressure (including its hold time) the fast tick runs: a bursty storm
        # has quiet gaps between bursts that must not send the agent back to sleep.
        interval = (self.policy.agent.fast_interval if self._under_pressure
                    else decisions.next_interval(sample, self.policy, self.core))
        for decision in decisions:
            outcome = self.executor.execute(decision, sample, self.policy)
            self.core = decisions.after_outcome(self.core, decision, outcome.applied, outcome.lost_capability)
            if decision.kind == "raise_max" and outcome.applied:
                change = self.state.get(GLOBAL, "nf_conntrack_max")
                if change is not None:
                    self.env = replace(self.env, originals={"nf_conntrack_max": change.original})
            if decision.kind in ("raise_max", "restore_max") and outcome.applied and decision.new:
                sample = model.with_max(sample, decision.new)
            self.last_decision = decision
            if decision.is_action:
                self.last_action_at = time.time()
                self._status_sent_at = None   # show the action at once
            for listener in self.decision_listeners:
                listener(decision)
        self.last_sample = sample
        return interval

    def status_due(self) -> bool:
        """Whether the one-line status is worth sending now: after an action, else once
        per STATUS_INTERVAL (it changes every tick; systemd needs no more)."""
        now = self.clock()
        if self._status_sent_at is not None and now - self._status_sent_at < STATUS_INTERVAL:
            return False
        self._status_sent_at = now
        return True

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
        if busy:
            ttf = sample.time_to_full
            detail = f"filling at {sample.fill_rate:+.0f}/s" + (f", full in {ttf:.1f}s" if ttf is not None else "")
            if sample.deltas.get("drop"):
                detail += f", {sample.deltas['drop']} packets dropped"
            logsetup.emit(self.log, "pressure", netns=netns, netns_label=netns_label(netns), detail=detail, **fields)
        else:
            logsetup.emit(self.log, "pressure_eased", netns=netns, netns_label=netns_label(netns), **fields)

    # ------------------------------------------------------------------ control

    def reload(self) -> bool:
        try:
            fresh = self._read_policy()
        except config.PolicyError as exc:
            logsetup.emit(self.log, "policy_invalid", keeping=f"keeping the running policy ({self.policy_label})",
                          error=str(exc), errors=[str(p) for p in exc.problems])
            return False
        namespaces_changed = fresh.agent.namespaces != self.policy.agent.namespaces
        self.policy = fresh
        self.core = replace(self.core, lost=frozenset())  # a reload is the operator's "try again"
        if namespaces_changed:
            self._open_sampler()
            self.executor.namespaces = fresh.agent.namespaces or ("",)
            self._probe()
        logsetup.emit(self.log, "policy_loaded", self.policy.agent.dry_run, policy=self.policy_label,
                      rules="; ".join(config.describe(self.policy)))
        return True

    def evaluate(self) -> List[decisions.Decision]:
        """What the agent would do on its latest sample, without acting or advancing its
        state (a sample of its own would consume counter deltas the next tick needs)."""
        if self.last_sample is None:
            return []
        decisions, _ = decisions.decide(self.last_sample, self.policy, self.core, self.env)
        return decisions

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
        if self.sampler is not None:
            self.sampler.close()


def _evict_runner(agent: Agent) -> Callable[..., Any]:
    def sweep(spec: config.Evict, netns_name: str, dry_run: bool) -> Any:
        from . import ctnetlink, evict

        # A socket of its own: a dump owns its socket's receive queue until read to the end.
        with netns.entered(netns_name):
            sock = ctnetlink.CtnetlinkSocket()
        try:
            return evict.evict(sock, spec, dry_run=dry_run, usage=agent.current_usage, log=agent.log)
        finally:
            sock.close()
    return sweep

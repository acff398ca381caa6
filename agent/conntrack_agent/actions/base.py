"""What every action is made of: the decision it proposes, what it owns, how it undoes.

An action kind (raise the max, resize buckets, shorten timeouts, evict) is one
`Action` in the registry (actions/__init__.py). The pure half (`fire`, `settle`,
`undo_orphans`) proposes decisions from a sample; the shell half (`apply`,
`undo`) carries them out through a `Shell`: the kernel seam, the change journal
and the log, handed in, never imported. Recovery, `restore` and the journal's
fields find an action by the `action` recorded with every change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

from ..config import Policy, Rule
from ..model import Sample

GLOBAL = ""  # nf_conntrack_max and buckets are global: recorded under the initial namespace


class Owned(NamedTuple):
    """A change the agent owns, as the pure core sees it (a journal record)."""

    netns: str
    name: str                      # sysctl, e.g. "nf_conntrack_udp_timeout"
    action: str                    # the action kind that made it
    original: int
    applied: int
    rule: str
    restore_after: Optional[float] = None
    restore_below: Optional[float] = None
    pending: bool = False

    @classmethod
    def of(cls, change: Any) -> "Owned":
        """A journal record (journal.Change) as the pure core sees it."""
        return cls(change.netns, change.name, change.action, change.original, change.applied, change.rule,
                   change.restore_after, change.restore_below, change.pending)


@dataclass(frozen=True)
class Decision:
    kind: str            # the event kind (events.EVENTS): "raise_max", "restore_timeouts", "max_at_ceiling", ...
    rule: str
    reason: str
    netns: str
    dry_run: bool = False
    old: Optional[int] = None
    new: Optional[int] = None
    timeouts: Tuple[Tuple[str, float], ...] = ()
    is_action: bool = True
    action: str = ""     # the registry's action that carries it out ("" for a notice)
    undo: bool = False   # puts back what `restores` records
    targets: Tuple[str, ...] = ()       # namespaces to act in (set_timeouts)
    restores: Tuple[Owned, ...] = ()    # journal records an undo puts back (or a notice disowns)

    def describe(self) -> str:
        if self.old is not None and self.new is not None:
            return f"{self.kind} {self.old}→{self.new}"
        return self.kind


@dataclass(frozen=True)
class RuleMemory:
    last_fired: Optional[float] = None
    held_since: Optional[float] = None    # usage condition true continuously since
    held_samples: int = 0
    active_since: Optional[float] = None  # a temporary change in force (or, in a dry run, that would be)
    calm_since: Optional[float] = None
    covered: FrozenSet[str] = frozenset()  # namespaces where the rule's timeouts are in force
    undo_retry_at: Optional[float] = None  # a failed undo waits out the cooldown


@dataclass(frozen=True)
class Memory:
    """What the core remembers between ticks (timers, cooldowns, episodes)."""

    rules: Dict[str, RuleMemory] = field(default_factory=dict)
    buckets_changed: Optional[float] = None
    at_ceiling: bool = False              # notice given for this pressure episode
    # (capability, namespace) found permanently unavailable: ("max", ""), ("timeouts", "web")
    lost: FrozenSet[Tuple[str, str]] = frozenset()
    # orphaned changes (their rule is gone) calm since: (netns, name) -> time
    orphan_calm: Dict[Tuple[str, str], float] = field(default_factory=dict)
    orphan_retry_at: Dict[Tuple[str, str], float] = field(default_factory=dict)
    # An insertion-race episode (insert_failed/clash_resolve rising without pressure):
    # since when, and since when quiet.
    race_since: Optional[float] = None
    race_quiet_since: Optional[float] = None

    def rule(self, name: str) -> RuleMemory:
        return self.rules.get(name, RuleMemory())

    def with_rule(self, name: str, rule_memory: RuleMemory) -> "Memory":
        rules = dict(self.rules)
        rules[name] = rule_memory
        return replace(self, rules=rules)

    def has_lost(self, capability: str, netns: str = GLOBAL) -> bool:
        return (capability, netns) in self.lost


@dataclass(frozen=True)
class Environment:
    """Facts about the node that the shell reads and the core only uses."""

    mem_total: int                  # bytes
    entry_bytes: int                # per-entry slab object size
    namespaces: Tuple[str, ...] = ("",)   # watched namespaces


class Context(NamedTuple):
    """Everything a pure proposal may look at. A NamedTuple: decide() makes several a
    tick, and a frozen dataclass costs several times more to build."""

    sample: Sample
    policy: Policy
    memory: Memory
    env: Environment
    owned: Tuple[Owned, ...]
    dry_run: bool = False
    reason: str = ""
    netns: str = ""

    def owned_by(self, rule: str, action: str) -> List[Owned]:
        return [o for o in self.owned if o.rule == rule and o.action == action and not o.pending]

    def owned_value(self, netns: str, name: str) -> Optional[Owned]:
        for o in self.owned:
            if o.netns == netns and o.name == name and not o.pending:
                return o
        return None


@dataclass(frozen=True)
class Outcome:
    applied: bool
    lost: FrozenSet[Tuple[str, str]] = frozenset()   # (capability, netns) now known permanent
    done: FrozenSet[str] = frozenset()               # namespaces where it took effect
    failed: bool = False                             # at least one target failed (retry later)
    missing: FrozenSet[str] = frozenset()            # namespaces that could not be entered


class Shell:
    """What an action's apply/undo may use; built by the executor."""

    def __init__(self, kernel: Any, journal: Any, emit: Any, fields: Dict[str, Any], policy: Policy,
                 log: Any = None, usage: Any = None):
        self.kernel = kernel
        self.journal = journal
        self.emit = emit            # emit(kind, dry_run, **fields)
        self.fields = fields        # the sample's fields and the decision's own
        self.policy = policy
        self.log = log
        self.usage = usage          # () -> usage of the fullest watched namespace now

    def rule(self, name: str) -> Optional[Rule]:
        return next((r for r in self.policy.rules if r.name == name), None)

    def failed(self, decision: Decision, error: BaseException, netns: str, target: str, capability: str,
               permanent: bool) -> Outcome:
        consequence = (f"the agent will not try this in {_label(netns)} again until restarted or reloaded"
                       if permanent else "will retry after the rule's cooldown")
        strerror = getattr(error, "strerror", None) or str(error)
        self.emit("action_failed", decision.dry_run, **dict(
            self.fields, netns=netns, netns_label=_label(netns), action=decision.kind,
            error=f"{target}: {strerror}", errno=getattr(error, "errno", None), consequence=consequence,
            old=decision.old, new=decision.new))
        return Outcome(applied=False, failed=True,
                       lost=frozenset({(capability, netns)}) if permanent else frozenset())


def _label(netns: str) -> str:
    return f"netns {netns}" if netns else "the agent's netns"


netns_label = _label


def calm(sample: Sample, below: float, counters: Sequence[str] = ("drop",)) -> bool:
    """Usage under `below` with none of `counters` rising: a table that needs no help."""
    return sample.usage < below and not any(sample.deltas.get(c, 0) for c in counters)


def calm_long_enough(rule: Rule, sample: Sample, rule_memory: RuleMemory, below: float,
                     after: float) -> Tuple[bool, RuleMemory, float]:
    """The undo's hysteresis: (due, updated memory, seconds calm). Calm must hold for
    `after` without a break (a flapping load does not flap the settings), and a failed
    undo waits out its retry time."""
    if not calm(sample, below, rule.trigger.counters_increasing or ("drop",)):
        return False, (rule_memory if rule_memory.calm_since is None else replace(rule_memory, calm_since=None)), 0.0
    if rule_memory.calm_since is None:
        rule_memory = replace(rule_memory, calm_since=sample.time)
    calm_for = sample.time - rule_memory.calm_since
    if calm_for < after:
        return False, rule_memory, calm_for
    if rule_memory.undo_retry_at is not None and sample.time < rule_memory.undo_retry_at:
        return False, rule_memory, calm_for
    return True, rule_memory, calm_for


class Action:
    """One kind of action. Subclasses fill in the pure and the shell halves."""

    kind: str = ""             # the rule's `action` (or an auxiliary kind such as resize_buckets)
    capability: str = ""       # what a permanent refusal takes away
    undo_kind: str = ""        # the event kind of its undo ("" if it cannot be undone)
    records = True             # its changes are sysctls recorded in the journal (evict: none)
    sysctls: Tuple[str, ...] = ()
    # The promise decisions.quiet() relies on to skip a quiet tick: with nothing owned
    # (no journal record at all) and the rule's memory at rest (no field but
    # last_fired set), watch(), settle() and follow_up() propose nothing and return
    # the memory they were given. An action that cannot promise it leaves this False
    # and every tick then walks the full loop.
    quiet_unowned = False

    # ---- pure
    def watch(self, ctx: Context) -> Tuple[List[Decision], Memory]:
        """Once a tick, before any rule: notice what happened to what it owns."""
        return [], ctx.memory

    def fire(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        """The rule's trigger fired and its cooldown is over: what to do."""
        return [], ctx.memory

    def settle(self, rule: Rule, ctx: Context, rule_memory: RuleMemory) -> Tuple[List[Decision], RuleMemory]:
        """The rule did not fire: undo its temporary changes once calm (and follow-ups)."""
        return [], rule_memory

    def follow_up(self, rule: Rule, ctx: Context) -> Tuple[List[Decision], Memory]:
        """Every tick, after fire/settle: what follows from the rule's earlier actions."""
        return [], ctx.memory

    def claims(self, rule: Rule, owned: Owned, env: Environment) -> bool:
        """Whether an enabled rule still stands behind a change this action made."""
        return rule.name == owned.rule and rule.action == self.kind

    def adopter(self, owned: Owned, rules: Sequence[Rule], env: Environment) -> Optional[Rule]:
        """An enabled rule that would make this very change itself: it takes the change
        over instead of the agent restoring a value only to shorten it again."""
        return None

    def orphan_ready(self, owned: Owned, ctx: Context) -> bool:
        """Beyond the recorded calm period: whether putting it back now is safe."""
        return True

    def undo_orphans(self, orphans: Sequence[Owned], ctx: Context) -> List[Decision]:
        """Changes whose rule is gone (disabled, renamed, removed) and are due: put them back."""
        return []

    # ---- shell
    def apply(self, decision: Decision, shell: Shell) -> Outcome:
        raise NotImplementedError

    def undo(self, decision: Decision, shell: Shell) -> Outcome:
        raise NotImplementedError

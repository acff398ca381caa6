"""Writing and putting back one owned sysctl, journal first.

Every write: read the current value, record the change (with the original) in
the journal as pending, write, confirm with what the kernel kept. A write the
kernel refuses rolls the record back, so a failed write never loses or replaces
an original. A kill between the record and the write leaves a pending record;
recovery at the next start reads the value and settles it (written: confirm;
not written: drop). An undo first checks the value is still the agent's: a
value someone else changed since is theirs, logged and left alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

from .base import Decision, Owned, Shell, netns_label


def write(shell: Shell, decision: Decision, netns: str, name: str, target: int, action: str,
          restore_after: Optional[float] = None, restore_below: Optional[float] = None) -> Tuple[int, int]:
    """Returns (value before, value now). Raises OSError as the kernel does (record rolled back)."""
    kernel, journal = shell.kernel, shell.journal
    current = kernel.read_sysctl(netns, name)
    if current == target:
        return current, current
    token = journal.begin(netns, name, action, current, target, decision.rule, restore_after, restore_below)
    try:
        kernel.write_sysctl(netns, name, target)
    except OSError:
        journal.rollback(token)
        raise
    # Written: own it before reading back, so a failing read cannot lose the original.
    journal.confirm(token, target)
    try:
        after = kernel.read_sysctl(netns, name)
    except OSError:
        return current, target
    if after != target:
        # The kernel rounds some values (buckets: up to whole pages of bucket heads,
        # 512 a page on x86_64): own what stuck. The token is spent by the confirm
        # above, so the record itself is updated.
        journal.settle(netns, name, after)
    return current, after


def put_back(shell: Shell, decision: Decision, owned: Owned) -> Optional[str]:
    """Restore one owned value. Returns "restored", "external" (left alone) or None
    (already the original: only forgotten). Raises OSError as the kernel does."""
    kernel, journal = shell.kernel, shell.journal
    current = kernel.read_sysctl(owned.netns, owned.name)
    if current != owned.applied:
        if current == owned.original:
            if not decision.dry_run:
                journal.forget(owned.netns, owned.name)
            return None
        shell.emit("external_change", decision.dry_run, **dict(
            shell.fields, netns=owned.netns, netns_label=netns_label(owned.netns), old=owned.applied,
            new=current, rule=owned.rule, name=owned.name,
            reason=f"{owned.name} in {netns_label(owned.netns)} was changed from the agent's {owned.applied} "
                   f"to {current} by another writer; leaving it"))
        if not decision.dry_run:
            journal.forget(owned.netns, owned.name)
        return "external"
    if not decision.dry_run:
        kernel.write_sysctl(owned.netns, owned.name, owned.original)
        journal.forget(owned.netns, owned.name)
    return "restored"

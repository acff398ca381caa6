"""The registry of action kinds: the one place decide, the executor, recovery,
events, the journal's fields and `restore` look an action up.

Adding an action is one module here that subclasses `base.Action`, registers its
event kinds (events.register) and itself (`register`), plus its docs and tests.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .base import Action

REGISTRY: Dict[str, Action] = {}


# The actions that override Action.watch / Action.follow_up: decide() asks only them
# (it runs every tick; a call that returns nothing still costs a context).
WATCHERS: List[Action] = []
FOLLOWERS: Dict[str, Action] = {}


def register(action: Action) -> Action:
    REGISTRY[action.kind] = action
    if type(action).watch is not Action.watch:
        WATCHERS.append(action)
    if type(action).follow_up is not Action.follow_up:
        FOLLOWERS[action.kind] = action
    return action


def get(kind: str) -> Action:
    return REGISTRY[kind]


def for_event(event_kind: str) -> Optional[Action]:
    """The action whose apply or undo logs this event kind."""
    for action in REGISTRY.values():
        if event_kind in (action.kind, action.undo_kind):
            return action
    return None


def capability_of(kind: str) -> str:
    action = REGISTRY.get(kind)
    return action.capability if action is not None else ""


# Importing the modules registers them (order = the order `restore` puts things back:
# timeouts first, then the max, then the buckets the max needed).
from . import timeouts, table_max, buckets, evict  # noqa: E402,F401

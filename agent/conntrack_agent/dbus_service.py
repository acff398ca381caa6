"""The D-Bus API and the GLib main loop under it: the only module importing gi and pydbus.

Importing this module fails with ImportError when PyGObject or pydbus is
missing; mainloop.py then runs its select() loop without a bus.

The API is deliberately small (compare org.freedesktop.oom1): read-only
properties for what `conntrack-agent status` shows, Reload and Evaluate, and a
Decision signal. Bus name, path and interface are versioned by the trailing "1"
and never change meaning; a breaking change gets a "2".

Access: systemd/io.github.conntrack_agent1.conf lets anyone read properties and
introspect, and only root call methods. The methods check the caller's uid
again themselves, because a bus policy is one admin edit away from being wrong,
and a reload or an evaluation run on behalf of anyone would let any local user
make the agent touch the kernel.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable, Dict, List, Optional

import pydbus
from gi.repository import Gio, GLib
from pydbus.generic import signal as dbus_signal

BUS_NAME = "io.github.conntrack_agent1"
OBJECT_PATH = "/io/github/conntrack_agent1"
INTERFACE = "io.github.conntrack_agent1.Agent"
ERROR_PREFIX = "io.github.conntrack_agent1.Error."

# Milliseconds to wait for the bus daemon (uid look-up) or for the agent (status):
# the agent answers from memory, so anything slower means it is stuck.
CALL_TIMEOUT_MS = 2000

# Read-only properties: name, D-Bus type. TimeToFull is seconds until full at
# the current fill rate, -1 when not filling (D-Bus has no null).
PROPERTIES = (("Count", "t"), ("Max", "t"), ("Buckets", "t"), ("Usage", "d"), ("FillRate", "d"),
              ("TimeToFull", "d"), ("LastDecision", "s"), ("PolicyPath", "s"), ("DryRun", "b"))

# EmitsChangedSignal=false: the numbers change every tick (up to 20 times a second);
# announcing each change would flood the bus. Readers poll, or listen to Decision.
_PROPERTY_XML = """\
    <property name="{0}" type="{1}" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="false"/>
    </property>
"""

INTROSPECTION = """
<node>
  <interface name="io.github.conntrack_agent1.Agent">
""" + "".join(_PROPERTY_XML.format(name, kind) for name, kind in PROPERTIES) + """\
    <!-- re-read and validate the policy; on an invalid policy the running one stays
         and the error is io.github.conntrack_agent1.Error.PolicyInvalid -->
    <method name="Reload"/>
    <!-- what the agent would do now, one line per decision, without acting -->
    <method name="Evaluate">
      <arg name="plan" type="as" direction="out"/>
    </method>
    <!-- every decision as it is carried out (or, in a dry run, as it would be);
         old and new are -1 when the decision has no value -->
    <signal name="Decision">
      <arg name="kind" type="s"/>
      <arg name="rule" type="s"/>
      <arg name="netns" type="s"/>
      <arg name="dry_run" type="b"/>
      <arg name="old" type="x"/>
      <arg name="new" type="x"/>
      <arg name="reason" type="s"/>
    </signal>
  </interface>
</node>
"""


# ------------------------------------------------------------------ errors

# pydbus returns an exception to the caller as a D-Bus error named after the
# exception's class when that name contains a dot: these classes carry the names.
class DBusError(Exception):
    pass


def _error(name: str) -> type:
    return type(name, (DBusError,), {})


AccessDenied = _error("org.freedesktop.DBus.Error.AccessDenied")
PolicyInvalid = _error(ERROR_PREFIX + "PolicyInvalid")
Failed = _error("org.freedesktop.DBus.Error.Failed")


def _quiet_pydbus() -> None:
    # pydbus logs a traceback for every error it returns, denied callers included.
    # The agent logs what matters itself (internal errors, in the journal's format).
    logging.getLogger("pydbus.registration").disabled = True


# ------------------------------------------------------------------ the exported object


def _uint(value: Any) -> int:
    return max(0, int(value))


def _snapshot_property(key: str, convert: Callable[[Any], Any], default: Any = 0) -> property:
    def get(self: "AgentObject") -> Any:
        value = self._snapshot().get(key)
        return default if value is None else convert(value)
    return property(get)


class AgentObject:
    """What the bus sees of the agent. Properties read agent.snapshot() on demand."""

    dbus = INTROSPECTION
    Decision = dbus_signal()

    def __init__(self, agent: Any, reload: Callable[[], bool], caller_uid: Callable[[str], int],
                 log_failure: Callable[[str, BaseException], None]) -> None:
        self._agent = agent
        self._reload = reload
        self._caller_uid = caller_uid
        self._log_failure = log_failure

    def _snapshot(self) -> Dict[str, Any]:
        return self._agent.snapshot()

    # Each property reads one key of agent.snapshot(); the D-Bus types (PROPERTIES)
    # have no null, hence the defaults.
    Count = _snapshot_property("count", _uint)
    Max = _snapshot_property("max", _uint)
    Buckets = _snapshot_property("buckets", _uint)
    Usage = _snapshot_property("usage", float, 0.0)
    FillRate = _snapshot_property("fill_rate", float, 0.0)
    TimeToFull = _snapshot_property("time_to_full", float, -1.0)
    LastDecision = _snapshot_property("last_decision", str, "")
    PolicyPath = _snapshot_property("policy_path", str, "")
    DryRun = _snapshot_property("dry_run", bool, False)

    # methods -----------------------------------------------------------------

    def Reload(self, dbus_context: Any = None) -> None:
        self._require_root(dbus_context, "Reload")
        ok = self._guarded("Reload", self._reload)
        if not ok:
            raise PolicyInvalid("the policy is invalid; the running policy stays in force "
                                "(the errors are in `journalctl -u conntrack-agent -p err`)")

    def Evaluate(self, dbus_context: Any = None) -> List[str]:
        self._require_root(dbus_context, "Evaluate")
        decisions = self._guarded("Evaluate", self._agent.evaluate)
        return [describe(d) for d in decisions] or ["nothing to do: no rule's trigger holds"]

    def _require_root(self, context: Any, method: str) -> None:
        sender = getattr(context, "sender", None)
        if not sender:
            raise AccessDenied(f"{method}: the caller cannot be identified")
        try:
            uid = self._caller_uid(sender)
        except Exception as exc:  # noqa: BLE001 - any failure to identify is a refusal
            raise AccessDenied(f"{method}: cannot look up the caller's uid ({exc})") from None
        if uid != 0:
            raise AccessDenied(f"{method} is for root only (caller uid {uid})")

    def _guarded(self, method: str, call: Callable[[], Any]) -> Any:
        """Internal errors become org.freedesktop.DBus.Error.Failed with a one-line
        message; the traceback goes to the agent's log, not to the caller."""
        try:
            return call()
        except DBusError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary between the bus and the agent
            self._log_failure(method, exc)
            raise Failed(f"{method} failed: {type(exc).__name__}: {exc}") from None

    def emit_decision(self, decision: Any) -> None:
        self.Decision(
            str(decision.kind), str(decision.rule or ""), str(decision.netns or ""), bool(decision.dry_run),
            -1 if decision.old is None else int(decision.old),
            -1 if decision.new is None else int(decision.new),
            str(decision.reason or ""))


def describe(decision: Any) -> str:
    what = ("would " + decision.describe()) if decision.is_action else "notice " + decision.kind
    return f"{decision.rule or '(agent)'}: {what}: {decision.reason}"


# ------------------------------------------------------------------ publishing


class Published:
    """The agent on the system bus; close() takes it off."""

    def __init__(self, bus: Any, registration: Any, owner: Any, obj: AgentObject, closed_handler: int) -> None:
        self.bus = bus
        self.obj = obj
        self._registration = registration
        self._owner = owner
        self._closed_handler = closed_handler

    def close(self) -> None:
        self.bus.con.disconnect(self._closed_handler)
        for handle in (self._owner, self._registration):
            try:
                handle.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - the bus may be gone already
                pass


def publish(agent: Any, reload: Callable[[], bool], log_failure: Callable[[str, BaseException], None],
            on_lost: Callable[[], None]) -> Published:
    """Export the agent and own BUS_NAME. Raises OSError-like errors (GLib.Error,
    RuntimeError) when there is no system bus or the name is taken."""
    _quiet_pydbus()
    bus = pydbus.SystemBus()
    connection = bus.con
    # GLib's shared bus connection raises SIGTERM in the process when the bus
    # daemon goes away; the agent's job (the table) does not depend on the bus.
    connection.set_exit_on_close(False)

    def caller_uid(sender: str) -> int:
        reply = connection.call_sync(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
            "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)), GLib.VariantType("(u)"),
            Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS, None)
        return int(reply.unpack()[0])

    obj = AgentObject(agent, reload, caller_uid, log_failure)
    registration = bus.register_object(OBJECT_PATH, obj, None)
    try:
        # No replacement: a second agent must not silently take over the API.
        owner = bus.request_name(BUS_NAME, allow_replacement=False, replace=False)
    except Exception:
        registration.__exit__(None, None, None)
        raise
    agent.decision_listeners.append(obj.emit_decision)
    handler = connection.connect("closed", lambda *_: _lost(agent, obj, on_lost))
    return Published(bus, registration, owner, obj, handler)


def _lost(agent: Any, obj: AgentObject, on_lost: Callable[[], None]) -> None:
    if obj.emit_decision in agent.decision_listeners:
        agent.decision_listeners.remove(obj.emit_decision)
    on_lost()


# ------------------------------------------------------------------ the main loop


class GLibLoop:
    """mainloop's loop interface on GLib's main loop: timers, UNIX signals and the
    bus, all in this one thread. A callback that raises goes to on_error, and its
    timer or signal source stays (PyGObject would otherwise treat the exception as
    "remove this source": a reload that raised once would leave the next SIGHUP to
    its default action, death)."""

    def __init__(self) -> None:
        from .mainloop import print_exception

        self._loop = GLib.MainLoop()
        self._signal_sources: List[int] = []
        self.on_error: Callable[[BaseException], None] = print_exception

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001 - the loop outlives a broken callback
            self.on_error(exc)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> int:
        def once() -> bool:
            self._call(callback)
            return False
        return GLib.timeout_add(max(0, int(seconds * 1000)), once, priority=GLib.PRIORITY_DEFAULT)

    def every(self, seconds: float, callback: Callable[[], None]) -> int:
        def repeat() -> bool:
            self._call(callback)
            return True
        return GLib.timeout_add(max(1, int(seconds * 1000)), repeat, priority=GLib.PRIORITY_DEFAULT)

    def on_signal(self, signum: int, callback: Callable[[int], None]) -> int:
        def handler() -> bool:
            self._call(callback, signum)
            return True
        source = GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.Signals(signum), handler)
        self._signal_sources.append(source)
        return source

    def cancel(self, source_id: int) -> None:
        # A one-shot source is gone once it ran; removing it again would be a
        # GLib-CRITICAL warning on stderr.
        source = GLib.MainContext.default().find_source_by_id(source_id)
        if source is not None and not source.is_destroyed():
            source.destroy()

    def run(self) -> None:
        self._loop.run()

    def quit(self) -> None:
        self._loop.quit()

    def close(self) -> None:
        """Give the signals back: GLib restores their default action once no
        source watches them."""
        for source_id in self._signal_sources:
            self.cancel(source_id)
        self._signal_sources.clear()


# ------------------------------------------------------------------ the client side


def query_daemon(timeout_ms: int = CALL_TIMEOUT_MS) -> Optional[Dict[str, Any]]:
    """The running agent's snapshot over the system bus, or None when no agent
    (or no bus) answers. Never starts anything (NO_AUTO_START)."""
    try:
        connection = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        reply = connection.call_sync(
            BUS_NAME, OBJECT_PATH, "org.freedesktop.DBus.Properties", "GetAll",
            GLib.Variant("(s)", (INTERFACE,)), GLib.VariantType("(a{sv})"),
            Gio.DBusCallFlags.NO_AUTO_START, timeout_ms, None)
    except GLib.Error:
        return None
    props = reply.unpack()[0]
    if "Count" not in props:
        return None
    ttf = props.get("TimeToFull", -1.0)
    return {
        "count": props["Count"],
        "max": props.get("Max", 0),
        "buckets": props.get("Buckets", 0),
        "usage": props.get("Usage", 0.0),
        "fill_rate": props.get("FillRate", 0.0),
        "time_to_full": None if ttf < 0 else ttf,
        "last_decision": props.get("LastDecision", ""),
        "policy_path": props.get("PolicyPath", ""),
        "dry_run": props.get("DryRun", False),
    }

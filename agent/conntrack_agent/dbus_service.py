"""The D-Bus API and the GLib main loop under it: the only module importing gi.

Importing this module fails with ImportError when PyGObject is missing;
mainloop.py then runs its select() loop without a bus. (pydbus is not imported:
Gio does all this module needs, and pydbus's import and its proxy of the bus
daemon cost the idle agent ~1 MB of RSS.)

The API is deliberately small (compare org.freedesktop.oom1): read-only
properties for what `conntrack-agent status` shows, Reload and Evaluate, and a
Decision signal. Bus name, path and interface are versioned by the trailing "1"
and never change meaning; a breaking change gets a "2".

Access: systemd/io.github.conntrack_agent1.conf lets root and the
conntrack-agent group read properties and introspect, nobody else anything, and
only root call methods. The methods check the caller's uid again themselves,
because a bus policy is one admin edit away from being wrong, and a reload or an
evaluation run on behalf of anyone would let any local user make the agent touch
the kernel.

Cost per call: the bus's work runs in the agent's one thread, between ticks, so
it must be small and must not come first. Property reads are answered from
GLib.Variants built at most once per tick (on the first read after it; nothing
when nobody reads), with no Python beyond picking the cached reply; the object
is registered with Gio directly rather than through pydbus's per-call wrapper
(which inspects the method's signature and builds every Variant on each call).
The loop's timers run at a higher GLib priority than the bus's dispatch, so a
due tick goes before queued calls. Measured in systemd/README.md.
"""

from __future__ import annotations

import importlib
import json
import math
import signal
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Tuple


def _real_asyncio() -> Optional[types.ModuleType]:
    """asyncio if it was really imported; None when sys.modules holds nothing or a
    stand-in (a module object made by hand has no __spec__)."""
    module = sys.modules.get("asyncio")
    return module if module is not None and vars(module).get("__spec__") is not None else None


class _AsyncioForGi(types.ModuleType):
    """What PyGObject 3.50 (Debian 13) gets for asyncio while gi is imported, when
    asyncio is not loaded: +1.6 MB of RSS for an integration the agent never uses.
    Its C module _gi imports asyncio and keeps InvalidStateError and
    _get_running_loop for its awaitable async calls, and the GLib.MainLoop.run
    override (gi._ossighelper.get_event_loop) asks for the running loop and the
    policy each time the loop runs, only to find an asyncio loop made for the
    GLib context. Without asyncio loaded there is no such loop, and this says so;
    once asyncio is loaded (by anyone, later), each answer is asyncio's own.
    Nothing else is answered here: any other attribute loads the real module.
    PyGObject 3.42 (Debian 12) never asks."""

    class InvalidStateError(Exception):
        """Raised by _gi only from the awaitable that a Gio async call returns when
        given no callback (result() before it is done): the agent makes no such
        call. An asyncio program started later would see this class there, not
        asyncio.InvalidStateError."""

    @staticmethod
    def _get_running_loop() -> Any:
        real = _real_asyncio()
        return real._get_running_loop() if real is not None else None

    @staticmethod
    def get_event_loop_policy() -> Any:
        real = _real_asyncio()
        if real is None:
            # the default policy would be made now, and knows no GLib context either
            raise RuntimeError("asyncio is not loaded: no event loop policy")
        return real.get_event_loop_policy()

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get("asyncio") is self:
            del sys.modules["asyncio"]
        return getattr(importlib.import_module("asyncio"), name)


def _import_gi() -> Tuple[types.ModuleType, types.ModuleType]:
    """Gio and GLib, with _AsyncioForGi in sys.modules only for the time of the
    import (then whatever was there is put back, a stand-in of logsetup's or
    nothing): a later `import asyncio` anywhere gets the real module."""
    if _real_asyncio() is not None:
        from gi.repository import Gio, GLib
        return Gio, GLib
    before = sys.modules.get("asyncio")
    stand_in = _AsyncioForGi("asyncio")
    sys.modules["asyncio"] = stand_in
    try:
        from gi.repository import Gio, GLib
    finally:
        if sys.modules.get("asyncio") is stand_in:
            if before is None:
                del sys.modules["asyncio"]
            else:
                sys.modules["asyncio"] = before
    return Gio, GLib


Gio, GLib = _import_gi()

BUS_NAME = "io.github.conntrack_agent1"
OBJECT_PATH = "/io/github/conntrack_agent1"
INTERFACE = "io.github.conntrack_agent1.Agent"
ERROR_PREFIX = "io.github.conntrack_agent1.Error."
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"

# Milliseconds to wait for the bus daemon (uid look-up) or for the agent (status):
# the agent answers from memory, so anything slower means it is stuck.
CALL_TIMEOUT_MS = 2000

# References an invocation holds when the closure runs with the leak described in
# publish(): the dispatching source's, the leaked one, the closure argument's and
# the Python wrapper's (3 without the leak). Fewer means someone (a PyGObject that
# works around it itself) already dropped it: dropping it again would free the
# invocation under GDBus's feet, so handle_call leaves it.
LEAKED_INVOCATION_REFS = 4

# GDBus dispatches each incoming call as its own source at G_PRIORITY_DEFAULT.
# The loop's timers (the tick, the watchdog) run above it: when a tick is due, the
# next loop iteration runs the tick alone instead of the calls queued meanwhile.
TIMER_PRIORITY = GLib.PRIORITY_HIGH

# Read-only properties: name, D-Bus type. TimeToFull is seconds until full at
# the current fill rate, -1 when not filling (D-Bus has no null).
PROPERTIES = (("Count", "t"), ("Max", "t"), ("Buckets", "t"), ("Usage", "d"), ("FillRate", "d"),
              ("TimeToFull", "d"), ("LastDecision", "s"), ("PolicyPath", "s"), ("DryRun", "b"),
              ("Report", "s"))


def _uint(value: Any) -> int:
    return max(0, int(value))


# Where each property's value comes from: key of agent.snapshot(), conversion,
# value when the snapshot has none.
SOURCES: Dict[str, Tuple[str, Callable[[Any], Any], Any]] = {
    "Count": ("count", _uint, 0),
    "Max": ("max", _uint, 0),
    "Buckets": ("buckets", _uint, 0),
    "Usage": ("usage", float, 0.0),
    "FillRate": ("fill_rate", float, 0.0),
    "TimeToFull": ("time_to_full", float, -1.0),
    "LastDecision": ("last_decision", str, ""),
    "PolicyPath": ("policy_path", str, ""),
    "DryRun": ("dry_run", bool, False),
    # JSON: what the agent owns (with originals and what restore would do) and where
    # each rule's timers stand; `plan` and `status` show it (service.Agent.report).
    "Report": ("report", str, "{}"),
}

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
    <!-- re-read and validate the policy; when it is not loaded (invalid, unreadable)
         the running one stays and the error is io.github.conntrack_agent1.Error.PolicyInvalid -->
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

# An error's class name is its D-Bus error name: the dispatcher replies with
# type(exc).__name__, so a test or a caller sees exactly what goes on the wire.
class DBusError(Exception):
    pass


def _error(name: str) -> type:
    return type(name, (DBusError,), {})


AccessDenied = _error("org.freedesktop.DBus.Error.AccessDenied")
PolicyInvalid = _error(ERROR_PREFIX + "PolicyInvalid")
Failed = _error("org.freedesktop.DBus.Error.Failed")
UnknownMethod = _error("org.freedesktop.DBus.Error.UnknownMethod")


# ------------------------------------------------------------------ the exported object


class AgentObject:
    """What the bus sees of the agent.

    Property values come from agent.snapshot(), taken at most once between two
    invalidate() calls (the supervisor invalidates after every tick and reload),
    and kept both as Python values (the properties below) and as the ready-made
    replies to Properties.Get and GetAll. A call then costs the agent nothing but
    the dispatch: a flood of reads cannot make the agent sample, format or build
    anything."""

    def __init__(self, agent: Any, reload: Callable[[], bool], caller_uid: Callable[[str], int],
                 log_failure: Callable[[str, BaseException], None]) -> None:
        self._agent = agent
        self._reload = reload
        self._caller_uid = caller_uid
        self._log_failure = log_failure
        self._values: Optional[Dict[str, Any]] = None
        self._replies: Optional[Tuple[Any, Dict[str, Any]]] = None
        self._snapshot_error: Optional[str] = None
        self.drop_invocation_ref = False

    def invalidate(self) -> None:
        self._values = None
        self._replies = None
        self._snapshot_error = None

    def values(self) -> Dict[str, Any]:
        """The properties' values (D-Bus types have no null, hence the defaults)."""
        if self._values is None:
            if self._snapshot_error is not None:
                raise Failed(self._snapshot_error)
            try:
                snapshot = dict(self._agent.snapshot(), report=json.dumps(self._agent.report(), default=str))
                self._values = {}
                for name, _ in PROPERTIES:
                    key, convert, default = SOURCES[name]
                    self._values[name] = default if snapshot.get(key) is None else convert(snapshot[key])
            except Exception as exc:  # noqa: BLE001 - a bug in the agent, not the caller's fault
                # Logged once per tick, not once per read: readers may poll fast.
                self._snapshot_error = f"the agent's readings are unavailable: {type(exc).__name__}: {exc}"
                self._log_failure("Properties", exc)
                raise Failed(self._snapshot_error) from None
        return self._values

    def replies(self) -> Tuple[Any, Dict[str, Any]]:
        """(GetAll's reply, {property: Get's reply}), built with values()."""
        if self._replies is None:
            values = self.values()
            variants = {name: GLib.Variant(kind, values[name]) for name, kind in PROPERTIES}
            self._replies = (GLib.Variant("(a{sv})", (variants,)),
                             {name: GLib.Variant("(v)", (variant,)) for name, variant in variants.items()})
        return self._replies

    Count = property(lambda self: self.values()["Count"])
    Max = property(lambda self: self.values()["Max"])
    Buckets = property(lambda self: self.values()["Buckets"])
    Usage = property(lambda self: self.values()["Usage"])
    FillRate = property(lambda self: self.values()["FillRate"])
    TimeToFull = property(lambda self: self.values()["TimeToFull"])
    LastDecision = property(lambda self: self.values()["LastDecision"])
    PolicyPath = property(lambda self: self.values()["PolicyPath"])
    DryRun = property(lambda self: self.values()["DryRun"])
    Report = property(lambda self: self.values()["Report"])

    # dispatch ------------------------------------------------------------------

    def call(self, sender: Optional[str], interface: str, method: str, parameters: Any) -> Any:
        """One call, as GDBus hands it over (it has already checked the interface,
        the property names and readability, and the argument types against
        INTROSPECTION). `parameters`: the call's GLib.Variant tuple. Returns the
        reply's GLib.Variant or None; raises DBusError. A property read only picks
        a cached reply: it unpacks nothing, builds nothing."""
        if interface == PROPERTIES_INTERFACE:
            getall, get = self._replies or self.replies()
            if method == "GetAll":
                return getall
            if method == "Get":
                reply = get.get(parameters.get_child_value(1).get_string())
                if reply is not None:
                    return reply
        elif interface == INTERFACE:
            if method == "Reload":
                self.Reload(sender)
                return None
            if method == "Evaluate":
                return GLib.Variant("(as)", (self.Evaluate(sender),))
        raise UnknownMethod(f"{interface}.{method} is not implemented")

    def handle_call(self, _connection: Any, sender: str, _path: str, interface: str, method: str,
                    parameters: Any, invocation: Any) -> None:
        """The closure registered for the object. `drop_invocation_ref`: see
        publish()."""
        leaked = self.drop_invocation_ref and invocation.__grefcount__ >= LEAKED_INVOCATION_REFS
        try:
            reply = self.call(sender, interface, method, parameters)
        except DBusError as exc:
            invocation.return_dbus_error(type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001 - the caller gets an error, never silence
            self._log_failure(method, exc)
            invocation.return_dbus_error(Failed.__name__, f"{method} failed: {type(exc).__name__}: {exc}")
        else:
            invocation.return_value(reply)
        if leaked:
            invocation._unref()

    # methods -----------------------------------------------------------------

    def Reload(self, sender: Optional[str]) -> None:  # noqa: N802 - the D-Bus member's name
        self._require_root(sender, "Reload")
        if not self._guarded("Reload", self._reload):
            raise PolicyInvalid("the policy was not loaded; the running policy stays in force "
                                "(the reason is in `journalctl -u conntrack-agent -p err`)")

    def Evaluate(self, sender: Optional[str]) -> List[str]:  # noqa: N802
        self._require_root(sender, "Evaluate")
        decisions = self._guarded("Evaluate", self._agent.evaluate)
        return [describe(d) for d in decisions] or ["nothing to do: no rule's trigger holds"]

    def _require_root(self, sender: Optional[str], method: str) -> None:
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
        message; the traceback goes to the agent's log (dbus_method_failed, its
        EXCEPTION field in the journal), not to the caller."""
        try:
            return call()
        except DBusError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary between the bus and the agent
            self._log_failure(method, exc)
            raise Failed(f"{method} failed: {type(exc).__name__}: {exc}") from None

    def decision_signal(self, decision: Any) -> Any:
        return GLib.Variant("(sssbxxs)", (
            str(decision.kind), str(decision.rule or ""), str(decision.netns or ""), bool(decision.dry_run),
            -1 if decision.old is None else int(decision.old),
            -1 if decision.new is None else int(decision.new),
            str(decision.reason or "")))


def describe(decision: Any) -> str:
    what = ("would " + decision.describe()) if decision.is_action else "notice " + decision.kind
    return f"{decision.rule or '(agent)'}: {what}: {decision.reason}"


# ------------------------------------------------------------------ publishing


class Published:
    """The agent on the system bus; invalidate() after the agent changed, close()
    takes it off."""

    def __init__(self, connection: Any, registration: int, owner: Any, obj: AgentObject,
                 closed_handler: int, listener: Callable[[Any], None], agent: Any) -> None:
        self.connection = connection
        self.obj = obj
        self._registration = registration
        self._owner = owner
        self._closed_handler = closed_handler
        self._listener = listener
        self._agent = agent

    def invalidate(self) -> None:
        self.obj.invalidate()

    def close(self) -> None:
        if self._listener in self._agent.decision_listeners:
            self._agent.decision_listeners.remove(self._listener)
        self.connection.disconnect(self._closed_handler)
        try:
            self._owner.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - the bus may be gone already
            pass
        try:
            self.connection.unregister_object(self._registration)
        except Exception:  # noqa: BLE001 - likewise
            pass


class _NameOwner:
    """`name` owned with RequestName, neither replaceable nor queued (DO_NOT_QUEUE), given
    back by __exit__: what pydbus's request_name(name, allow_replacement=False,
    replace=False) does, without its proxy of org.freedesktop.DBus, whose introspection
    it parses into classes (xml.etree and pydbus's proxy modules: ~1 MB of the
    daemon's RSS, measured with bench/rss_installed.py)."""

    def __init__(self, connection: Any, name: str) -> None:
        self._connection = connection
        self._name = name
        result = self._call("RequestName", GLib.Variant("(su)", (name, 4)))
        if result != 1:   # 1 primary owner; 3 exists; 4 already the owner (pydbus's messages)
            raise RuntimeError({3: "name already exists on the bus", 4: "you're already the owner of this name"}
                               .get(result, "cannot take ownership of the name"))

    def _call(self, method: str, args: Any) -> int:
        reply = self._connection.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                           method, args, GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE,
                                           CALL_TIMEOUT_MS, None)
        return int(reply.unpack()[0])

    def __exit__(self, *_: Any) -> None:
        self._call("ReleaseName", GLib.Variant("(s)", (self._name,)))


def publish(agent: Any, reload: Callable[[], bool], log_failure: Callable[[str, BaseException], None],
            on_lost: Callable[[], None]) -> Published:
    """Export the agent and own BUS_NAME. Raises OSError-like errors (GLib.Error,
    RuntimeError) when there is no system bus or the name is taken."""
    connection = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)   # what pydbus.SystemBus() wraps
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
    interface = Gio.DBusNodeInfo.new_for_xml(INTROSPECTION).interfaces[0]
    # Calls are dispatched in the main context (the thread-default one here), by
    # this one Python function; GDBus itself answers Introspect and Peer.Ping.
    register2 = getattr(connection, "register_object_with_closures2", None)
    if register2 is not None:  # GLib >= 2.84: references as a binding expects them
        registration = register2(OBJECT_PATH, interface, obj.handle_call, None, None)
    else:
        # PyGObject's register_object is g_dbus_connection_register_object_with_closures,
        # which hands each call's invocation to the closure with one reference nobody
        # drops (GNOME/glib#3560; only 2.82.3 shipped a fix, reverted in 2.82.4 as an
        # API break): about 2 KB leaked a call, measured, so every property read
        # (pydbus's registration included) grew the agent for good. handle_call
        # drops that reference after replying.
        exactly_2_82_3 = GLib.check_version(2, 82, 3) is None and GLib.check_version(2, 82, 4) is not None
        obj.drop_invocation_ref = not exactly_2_82_3
        registration = connection.register_object(OBJECT_PATH, interface, obj.handle_call, None, None)
    try:
        # No replacement: a second agent must not silently take over the API.
        owner = _NameOwner(connection, BUS_NAME)
    except Exception:
        connection.unregister_object(registration)
        raise

    def emit(decision: Any) -> None:
        connection.emit_signal(None, OBJECT_PATH, INTERFACE, "Decision", obj.decision_signal(decision))

    agent.decision_listeners.append(emit)

    def closed(*_: Any) -> None:
        if emit in agent.decision_listeners:
            agent.decision_listeners.remove(emit)
        on_lost()

    handler = connection.connect("closed", closed)
    return Published(connection, registration, owner, obj, handler, emit, agent)


# ------------------------------------------------------------------ the main loop


class _TimerSource(GLib.Source):
    """The loop's timers (mainloop.Timers) as one GLib source: the main loop polls
    until the earliest is due, then this source runs the due ones."""

    def __init__(self, timers: Any, call: Callable[[Callable[[], None]], None]) -> None:
        super().__init__()
        self.timers = timers
        self.call = call

    def prepare(self) -> Tuple[bool, int]:
        due = self.timers.next_due()
        if due is None:
            return False, -1
        wait = due - self.timers.clock()
        if wait <= 0:
            return True, 0
        return False, max(1, math.ceil(wait * 1000))  # GLib polls in milliseconds

    def check(self) -> bool:
        due = self.timers.next_due()
        return due is not None and due <= self.timers.clock()

    def dispatch(self, _callback: Any, _args: Any) -> bool:
        self.timers.run_due(self.call)
        return True


class GLibLoop:
    """mainloop's loop interface on GLib's main loop: timers, UNIX signals and the
    bus, all in this one thread. Timers run from one GLib source at TIMER_PRIORITY
    (see mainloop.Timers for why not one GLib source each). A callback that raises
    goes to on_error, and its timer or signal source stays (PyGObject would
    otherwise treat the exception as "remove this source": a reload that raised
    once would leave the next SIGHUP to its default action, death)."""

    def __init__(self) -> None:
        from .mainloop import Timers, print_exception

        self._loop = GLib.MainLoop()
        self._signal_sources: List[int] = []
        self._readers: Dict[int, int] = {}   # fd -> source id
        self.on_error: Callable[[BaseException], None] = print_exception
        self._timers = Timers()
        self.call_later = self._timers.call_later
        self.every = self._timers.every
        self.cancel = self._timers.cancel
        self._source = _TimerSource(self._timers, self._call)
        self._source.set_priority(TIMER_PRIORITY)
        self._source.attach(None)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001 - the loop outlives a broken callback
            self.on_error(exc)

    def on_signal(self, signum: int, callback: Callable[[int], None]) -> int:
        def handler() -> bool:
            self._call(callback, signum)
            return True
        source = GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.Signals(signum), handler)
        self._signal_sources.append(source)
        return source

    def on_readable(self, fd: int, callback: Callable[[], None]) -> None:
        def handler(_fd: int, _condition: Any) -> bool:
            self._call(callback)
            return True
        self._readers[fd] = GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, fd, GLib.IOCondition.IN, handler)

    def remove_readable(self, fd: int) -> None:
        source_id = self._readers.pop(fd, None)
        if source_id is not None:
            _destroy_source(source_id)

    def run(self) -> None:
        self._loop.run()

    def quit(self) -> None:
        self._loop.quit()

    def close(self) -> None:
        """Detach the timers and fd watches and give the signals back: GLib restores
        a signal's default action once no source watches it."""
        if not self._source.is_destroyed():
            self._source.destroy()
        for source_id in self._signal_sources + list(self._readers.values()):
            _destroy_source(source_id)
        self._signal_sources.clear()
        self._readers.clear()


def _destroy_source(source_id: int) -> None:
    # Removing a source that is already gone would be a GLib-CRITICAL warning on stderr.
    source = GLib.MainContext.default().find_source_by_id(source_id)
    if source is not None and not source.is_destroyed():
        source.destroy()


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
        "report": props.get("Report", ""),
    }


def query_report(timeout_ms: int = CALL_TIMEOUT_MS) -> Optional[Dict[str, Any]]:
    """The running agent's report (Agent.report) over the system bus, or None."""
    snapshot = query_daemon(timeout_ms)
    if snapshot is None or not snapshot["report"]:
        return None
    try:
        report = json.loads(snapshot["report"])
    except ValueError:
        return None
    return report if isinstance(report, dict) and "owned" in report else None

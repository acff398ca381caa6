"""The daemon's supervisor: one set of semantics over two main-loop backends.

The Supervisor owns everything between the agent and systemd:

- start, then STATUS= and READY=1 (Type=notify);
- the tick, a one-shot timer re-armed with the delay Agent.tick() returns (fast
  under pressure, calm otherwise); a tick that raises is logged with its
  traceback and retried after RETRY_AFTER_ERROR;
- the watchdog ping at half of WatchdogSec, withheld once ticks have failed for
  a whole watchdog period, so that systemd restarts an agent that cannot work;
- SIGHUP: reload, bracketed by RELOADING=1 + MONOTONIC_USEC and READY=1 (what
  Type=notify-reload would do on systemd >= 253). Nothing a reload raises stops
  the agent: the running policy stays, the error is logged, READY=1 still goes out;
- SIGTERM/SIGINT: STOPPING=1, then a clean exit (status 0);
- --once: start, READY=1, one tick, exit;
- the D-Bus API (dbus_service.py) when the GLib backend runs: published (and
  re-published when the bus comes back), its cached property values invalidated
  after every tick and reload.

The loop itself is a small interface (call_later, cancel, every, on_signal,
on_readable, remove_readable, run, quit, close) with two backends: dbus_service.GLibLoop (the only gi importer, and
the bus needs it) and SelectLoop below (select() on a self-pipe, no gi; the
container image and --no-dbus). One thread either way: a D-Bus Reload, a SIGHUP
and a tick never race, and nothing needs a lock.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from . import logsetup

# When a tick raises (a bug, or the kernel failing in a way the agent does not
# handle) the supervisor logs it and tries again after this many seconds.
RETRY_AFTER_ERROR = 1.0
# Seconds between attempts to take the bus name: the bus may start after the
# agent, or not yet have loaded the policy file a package just installed.
PUBLISH_RETRY = (2.0, 5.0, 15.0, 60.0)
# With agent.watch_policy, a change is reloaded this long after the first event: an
# editor or the kubelet touches several files, and one reload of the result is enough.
POLICY_SETTLE = 0.5

# Exit statuses; the unit's RestartPreventExitStatus= names EXIT_CONFIG (cli.py
# uses the same numbers). 78 is EX_CONFIG: something only the admin can fix (an
# invalid policy, an unusable state file), so a restart would only loop.
# EXIT_FAIL is anything a fresh start may cure, and Restart=on-failure does that.
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 78

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (signal.SIGHUP,) + STOP_SIGNALS


def run(agent: Any, notifier: Any = None, once: bool = False, use_bus: bool = True) -> int:
    """Start the agent and serve until SIGTERM/SIGINT (or one tick with `once`).
    Returns the process exit status."""
    if notifier is None:
        from . import sdnotify
        notifier = sdnotify.Notifier()  # outside systemd every message is a no-op
    bus = None
    if use_bus and not once:
        try:
            from . import dbus_service
        except ImportError as exc:
            _log(agent.log, "dbus_unavailable",
                 f"D-Bus API not offered: {exc}; running without it (install python3-gi and python3-pydbus)",
                 error=str(exc))
        else:
            bus = dbus_service
    loop = bus.GLibLoop() if bus is not None else SelectLoop()
    return Supervisor(agent, notifier, loop, bus=bus).run(once=once)


class Supervisor:
    """`loop`: a backend (GLibLoop, SelectLoop). `bus`: the dbus_service module
    (or a stand-in with BUS_NAME and publish()), None for no D-Bus API."""

    def __init__(self, agent: Any, notifier: Any, loop: Any, bus: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 listen: Optional[Callable[[], Any]] = None) -> None:
        self.agent = agent
        self.notifier = notifier
        self.loop = loop
        self.bus = bus
        self.clock = clock
        self.published: Optional[Any] = None
        self.stopped_by: Optional[str] = None
        self.failing_since: Optional[float] = None
        self._tick_source: Optional[Any] = None
        self._publish_attempts = 0
        self._bus_missing = False
        self._policy_watch: Optional[Any] = None
        self._policy_reload: Optional[Any] = None
        self._uevents: Optional[Any] = None
        self._uevents_polled = False
        # Opens the uevent socket (uevent.UeventListener; the tests hand in a fake).
        self._listen = listen or _uevent_listener
        loop.on_error = self._callback_failed

    # ------------------------------------------------------------------ life

    def run(self, once: bool = False) -> int:
        # Signals first: a SIGTERM during a slow start is then a clean stop, not a kill.
        for signum in HANDLED_SIGNALS:
            self.loop.on_signal(signum, self._on_signal)
        try:
            return self._run(once)
        finally:
            self.loop.close()

    def _run(self, once: bool) -> int:
        if not once:
            # Before the agent's first probe: a module loaded after that probe found it
            # missing is then an event queued on the socket, answered as soon as the loop
            # runs, not a wait for the 5 s reprobe. _watch_uevents() closes it again after
            # the start when nothing is missing.
            self._open_uevents()
        try:
            self.agent.start()
        except Exception as exc:  # noqa: BLE001 - decides the exit status, and with it systemd's restart
            self._close_uevents()
            return self._start_failed(exc)
        if once:
            self.notifier.status(self._status_line())
            self.notifier.ready()
            try:
                self._tick_step()
                status = EXIT_OK
            except Exception as exc:  # noqa: BLE001 - one tick, and its failure is the exit status
                self._tick_failed(exc)
                status = EXIT_FAIL
            self._close_uevents()
            self.notifier.stopping()
            self.agent.stop("--once")
            return status
        if self.bus is not None:
            self._publish()
        self._watch_policy()
        self._watch_uevents()
        self.notifier.status(self._status_line())
        self.notifier.ready()
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            self.loop.every(watchdog / 2, self.watchdog)
        self._tick_source = self.loop.call_later(0, self.tick)
        try:
            self.loop.run()
        finally:
            if self.published is not None:
                self.published.close()
                self.published = None
            if self._policy_watch is not None:
                self.loop.remove_readable(self._policy_watch.fileno())
                self._policy_watch.close()
            self._close_uevents()
        self.agent.stop(self.stopped_by or "main loop ended")
        return EXIT_OK

    def _start_failed(self, exc: BaseException) -> int:
        from . import config, journal

        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (config.PolicyError, journal.JournalError)):
            _log(self.agent.log, "start_failed", error=error, exit_status=EXIT_CONFIG, exc_info=exc,
                 consequence="the unit does not restart the agent: fix the cause, then start it")
            return EXIT_CONFIG
        _log(self.agent.log, "start_failed", error=error, exit_status=EXIT_FAIL, exc_info=exc,
             consequence="the unit restarts the agent")
        return EXIT_FAIL

    # ------------------------------------------------------------------ the bus

    def _publish(self) -> None:
        if self.stopped_by is not None:
            return
        try:
            self.published = self.bus.publish(self.agent, self.reload, self._method_failed, self._bus_lost)
        except Exception as exc:  # noqa: BLE001 - no bus is a degraded mode, not a failure
            delay = PUBLISH_RETRY[min(self._publish_attempts, len(PUBLISH_RETRY) - 1)]
            self._publish_attempts += 1
            if not self._bus_missing:  # once per outage, not once per attempt
                self._bus_missing = True
                _log(self.agent.log, "dbus_unavailable",
                     f"D-Bus API not offered yet: cannot own {self.bus.BUS_NAME} on the system bus ({exc}); "
                     "the agent works without it and keeps trying", error=str(exc))
            self.loop.call_later(delay, self._publish)
            return
        self._publish_attempts = 0
        self.agent.report_to_file = False   # the bus serves the report; no file rewrites needed
        if self._bus_missing:
            self._bus_missing = False
            _log(self.agent.log, "dbus_available", f"D-Bus API offered as {self.bus.BUS_NAME}")

    def _bus_lost(self) -> None:
        if self.stopped_by is not None:
            return
        self.published = None
        self._bus_missing = True
        self.agent.report_to_file = True
        _log(self.agent.log, "dbus_unavailable",
             "the system bus connection closed; the agent works without the D-Bus API until it is back",
             error="connection closed")
        self.loop.call_later(PUBLISH_RETRY[0], self._publish)

    def _method_failed(self, method: str, exc: BaseException) -> None:
        _log(self.agent.log, "dbus_method_failed", f"D-Bus {method}() failed: {type(exc).__name__}: {exc}",
             method=method, error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    def _agent_changed(self) -> None:
        """The bus answers property reads from values built at most once per tick;
        after a tick or a reload they are stale."""
        if self.published is not None:
            self.published.invalidate()

    # ------------------------------------------------------------------ reactions

    def tick(self) -> None:
        self._tick_source = None
        delay = RETRY_AFTER_ERROR
        try:
            delay = self._tick_step()
        except Exception as exc:  # noqa: BLE001 - keep ticking; the watchdog judges persistence
            self._tick_failed(exc)
        finally:
            # Re-armed whatever happened above: a tick chain that ended silently would
            # leave the watchdog fed by an agent that no longer looks at the table.
            if self.stopped_by is None:
                self._tick_source = self.loop.call_later(delay, self.tick)

    def _tick_step(self) -> float:
        try:
            delay = self.agent.tick()
            if self.agent.status_due():
                self.notifier.status(self.agent.status_line())
        finally:
            self._agent_changed()
            self._watch_uevents()
        self.failing_since = None
        return delay

    # ------------------------------------------------------------------ file and kernel events

    def _watch_policy(self) -> None:
        """agent.watch_policy: the policy's directories under inotify (a ConfigMap's
        `..data` swap included); a change reloads as SIGHUP does."""
        want = bool(self.agent.policy.agent.watch_policy)
        if want and self._policy_watch is None:
            from . import policywatch
            try:
                self._policy_watch = policywatch.PolicyWatcher(self.agent.policy_directories())
            except OSError as exc:
                _log(self.agent.log, "internal_error", error=f"cannot watch the policy files: {exc}")
                return
            self.loop.on_readable(self._policy_watch.fileno(), self._policy_changed)
            _log(self.agent.log, "policy_watched", directories=", ".join(self._policy_watch.directories))
        elif not want and self._policy_watch is not None:
            self.loop.remove_readable(self._policy_watch.fileno())
            self._policy_watch.close()
            self._policy_watch = None

    def _policy_changed(self) -> None:
        if self._policy_watch.changed() and self._policy_reload is None:
            # A writer (an editor, the kubelet) may touch several files: reload once they settle.
            self._policy_reload = self.loop.call_later(POLICY_SETTLE, self._reload_changed_policy)

    def _reload_changed_policy(self) -> None:
        self._policy_reload = None
        if self.stopped_by is None:
            self.reload()

    def _watch_uevents(self) -> None:
        """While nf_conntrack is missing somewhere, listen for the kernel's uevents: the
        module's load is then answered at once (and the baseline applied), not at the
        next reprobe. Closed again once everything is open (uevents are frequent on
        some nodes, and each would wake the agent)."""
        missing = bool(getattr(self.agent.sampler, "unavailable", None))
        if not missing:
            self._close_uevents()
            return
        if self._uevents is None:
            if not self._open_uevents():
                return   # the 5 s reprobe still finds the module
            self._start_polling_uevents()
            # Opened after a tick found the module gone: a load between that tick's look
            # and this open sent its event before the socket existed. Look once more.
            self.agent.probe_now("reprobe")
            if not getattr(self.agent.sampler, "unavailable", None):
                self._close_uevents()
            return
        self._start_polling_uevents()

    def _open_uevents(self) -> bool:
        if self._uevents is None:
            try:
                self._uevents = self._listen()
            except OSError:
                return False
        return True

    def _start_polling_uevents(self) -> None:
        if not self._uevents_polled:
            self.loop.on_readable(self._uevents.fileno(), self._uevent_ready)
            self._uevents_polled = True

    def _close_uevents(self) -> None:
        if self._uevents is None:
            return
        if self._uevents_polled:
            self.loop.remove_readable(self._uevents.fileno())
            self._uevents_polled = False
        self._uevents.close()
        self._uevents = None

    def _uevent_ready(self) -> None:
        from . import uevent
        if self._uevents is None:
            return
        woke = time.monotonic()   # CLOCK_MONOTONIC whatever self.clock is: compared with the kernel's
        try:
            events = self._uevents.read_events()
        except (OSError, uevent.UeventError):
            return
        loads = [e for e in events if uevent.is_conntrack_load(e)]
        if loads:
            try:
                self.agent.probe_now("uevent", uevent_seqnum=loads[-1].seqnum, uevent_usec=int(woke * 1e6))
            finally:
                self._agent_changed()
                self._watch_uevents()

    def _tick_failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = self.clock()
        error = f"{type(exc).__name__}: {exc}"
        _log(self.agent.log, "tick_failed", error=error, retry=RETRY_AFTER_ERROR, exc_info=exc)
        # `systemctl status` would otherwise keep showing the last good reading.
        self.notifier.status(f"tick failing: {error}; retrying every {RETRY_AFTER_ERROR:g}s")

    def watchdog(self) -> None:
        """Ping unless ticks have failed for a whole watchdog period: then systemd
        kills and (Restart=on-failure) restarts the agent, a fresh start being the
        best remaining remedy. A hung tick needs no check: it blocks this timer too."""
        timeout = self.notifier.watchdog_interval()
        if self.failing_since is not None and timeout and self.clock() - self.failing_since >= timeout:
            return
        self.notifier.watchdog()

    def reload(self) -> bool:
        """Re-read the policy; False when it was not loaded (the running one stays).
        Never raises: a SIGHUP handler or a D-Bus call that raised would take the
        agent down, and systemd counts death by SIGHUP as a clean exit."""
        self.notifier.reloading()
        try:
            ok = bool(self.agent.reload())
        except Exception as exc:  # noqa: BLE001 - see the docstring
            ok = False
            policy = getattr(self.agent, "policy_label", "?")
            _log(self.agent.log, "reload_failed", error=f"{type(exc).__name__}: {exc}", policy=policy,
                 exc_info=exc)
        self._agent_changed()
        self._watch_policy()
        self.notifier.status(self._status_line())
        self.notifier.ready()
        return ok

    def stop(self, why: str) -> None:
        self.stopped_by = why
        self.notifier.stopping()
        if self._tick_source is not None:
            self.loop.cancel(self._tick_source)
            self._tick_source = None
        self.loop.quit()

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload()
        else:
            self.stop(signal.Signals(signum).name)

    def _status_line(self) -> str:
        """For start and reload, which must send READY=1 whatever the status line does."""
        try:
            return self.agent.status_line()
        except Exception as exc:  # noqa: BLE001 - the next tick logs it as tick_failed
            return f"status unavailable: {type(exc).__name__}: {exc}"

    def _callback_failed(self, exc: BaseException) -> None:
        """A loop callback raised past the supervisor's own handlers (a bug): log it;
        the backend keeps the timer or signal handler that raised."""
        _log(self.agent.log, "internal_error", error=f"{type(exc).__name__}: {exc}", exc_info=exc)


def _uevent_listener() -> Any:
    from . import uevent
    return uevent.UeventListener()


def _log(log: Any, kind: str, detail: Optional[str] = None, **fields: Any) -> None:
    """An event of the registry (events.EVENTS) through logsetup.emit. `detail`: the
    sentence, for the kinds whose template is just {detail}; an `exc_info` field
    carries the traceback to every sink (logsetup renders it)."""
    if detail is not None:
        fields["detail"] = detail
    logsetup.emit(log, kind, **fields)


# ---------------------------------------------------------------------- backends


def print_exception(exc: BaseException) -> None:
    """A backend's default on_error: the traceback to stderr (the journal, under systemd)."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


class Timer:
    __slots__ = ("callback", "period", "cancelled")

    def __init__(self, callback: Callable[[], None], period: Optional[float]) -> None:
        self.callback = callback
        self.period = period
        self.cancelled = False


class Timers:
    """Both backends' timers: a heap of due times. A periodic timer is re-armed
    from the time it ran (no catch-up burst after a stall), as GLib does.

    The GLib backend keeps them here too, behind one GLib source, rather than
    one GLib.timeout_add() per tick: PyGObject 3.42 (Debian 12) never frees the
    callback closure of a finished source, about 115 bytes a call (measured: 100000
    timeout_add calls, +11 MB), which at the fast tick is 8 MB an hour."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: List[Any] = []
        self._seq = itertools.count()

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return self._arm(Timer(callback, None), seconds)

    def every(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return self._arm(Timer(callback, seconds), seconds)

    @staticmethod
    def cancel(handle: Timer) -> None:
        handle.cancelled = True

    def next_due(self) -> Optional[float]:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def run_due(self, call: Callable[[Callable[[], None]], None], running: Callable[[], bool] = lambda: True) -> None:
        """Run, through `call`, every timer due by now, in due order."""
        now = self.clock()
        while running() and self._heap and self._heap[0][0] <= now:
            _, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            if timer.period is not None:
                self._arm(timer, timer.period)
            call(timer.callback)

    def _arm(self, timer: Timer, seconds: float) -> Timer:
        heapq.heappush(self._heap, (self.clock() + max(0.0, seconds), next(self._seq), timer))
        return timer


class SelectLoop:
    """The loop without GLib: Timers, select() as the only wait, and signals
    through signal.set_wakeup_fd() on a self-pipe.

    The C-level signal handler writes the signal's number into the pipe, so no
    signal is lost between a check and the wait, and handlers run in the loop,
    never inside a Python signal handler. A callback that raises goes to
    on_error, and its timer or signal handler stays.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.on_error: Callable[[BaseException], None] = print_exception
        self._timers = Timers(clock)
        self.call_later = self._timers.call_later
        self.every = self._timers.every
        self.cancel = self._timers.cancel
        self._handlers: Dict[int, Callable[[int], None]] = {}
        self._readers: Dict[int, Callable[[], None]] = {}
        self._previous: Dict[int, Any] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup: Optional[int] = None
        self._running = False

    def on_signal(self, signum: int, callback: Callable[[int], None]) -> None:
        if self._old_wakeup is None:
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._handlers[signum] = callback
        previous = signal.signal(signum, _wake_only)
        self._previous.setdefault(signum, previous)

    def on_readable(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback

    def remove_readable(self, fd: int) -> None:
        self._readers.pop(fd, None)

    def run(self) -> None:
        self._running = True
        while self._running:
            due = self._timers.next_due()
            timeout = None if due is None else max(0.0, due - self._timers.clock())
            try:
                readable, _, _ = select.select([self._wake_r, *self._readers], [], [], timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
                readable = []
            for fd in readable:
                if fd != self._wake_r and fd in self._readers:
                    self._call(self._readers[fd])
            if self._wake_r in readable:
                for signum in self._drain():
                    handler = self._handlers.get(signum)
                    if handler is not None:
                        self._call(handler, signum)
                    if not self._running:
                        return
            self._timers.run_due(self._call, lambda: self._running)

    def quit(self) -> None:
        self._running = False

    def close(self) -> None:
        """Give the signals back (the previous handlers and wakeup fd)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._handlers.clear()
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _drain(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = os.read(self._wake_r, 256)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001 - the loop outlives a broken callback
            self.on_error(exc)


def _wake_only(_signum: int, _frame: Any) -> None:
    """The Python-level handler: nothing to do, the wakeup fd already carries the
    signal to the loop. (SIG_IGN would not: the C handler would not run.)"""

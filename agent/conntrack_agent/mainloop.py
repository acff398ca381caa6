"""The daemon's main loop: one GLib loop, one thread, carrying everything.

- the tick, a one-shot timer re-armed with the delay Agent.tick() returns
  (fast under pressure, calm otherwise);
- SIGHUP: reload, bracketed by RELOADING=1/READY=1 for systemd (what
  Type=notify-reload would do on systemd >= 253);
- SIGTERM/SIGINT: STOPPING=1, then a clean exit;
- the watchdog ping, from its own timer at half of WatchdogSec;
- the D-Bus API (dbus_service.py), whose calls run between ticks.

One thread means no locks: a D-Bus Reload and a SIGHUP cannot race a tick.
Without PyGObject or pydbus the agent runs service.run_simple (no bus) and
says so once.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Optional

from . import logsetup, sdnotify, service

# When tick() raises (a bug, or the kernel failing in a way the agent does not
# handle) the loop logs it and tries again after this many seconds.
RETRY_AFTER_ERROR = 1.0
# Seconds between attempts to take the bus name: the bus may start after the
# agent, or not yet have loaded the policy file a package just installed.
PUBLISH_RETRY = (2.0, 5.0, 15.0, 60.0)


def run(agent: Any, notifier: Any = None) -> int:
    """Start the agent and serve until SIGTERM/SIGINT. Returns the exit status."""
    try:
        from . import dbus_service
    except ImportError as exc:
        _log(agent.log, "dbus_unavailable",
             f"D-Bus API not offered: {exc}; running without it (install python3-gi and python3-pydbus)",
             error=str(exc))
        return service.run_simple(agent, notifier)
    return Supervisor(agent, notifier or sdnotify.Notifier(), dbus_service).run()


class Supervisor:
    def __init__(self, agent: Any, notifier: Any, dbus_service: Any, clock: Any = time.monotonic) -> None:
        self.agent = agent
        self.notifier = notifier
        self.dbus = dbus_service
        self.clock = clock
        self.loop = dbus_service.Loop()
        self.bus: Optional[Any] = None
        self.stopped_by: Optional[str] = None
        self.failing_since: Optional[float] = None
        self._tick_source: Optional[int] = None
        self._publish_attempts = 0
        self._bus_missing = False

    # ------------------------------------------------------------------ life

    def run(self) -> int:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            self.loop.on_signal(signum, self._on_signal)
        self.agent.start()
        self._publish()
        self.notifier.status(self.agent.status_line())
        self.notifier.ready()
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            self.loop.every(watchdog / 2, self.watchdog)
        self._tick_source = self.loop.call_later(0, self.tick)
        try:
            self.loop.run()
        finally:
            if self.bus is not None:
                self.bus.close()
        self.agent.stop(self.stopped_by or "main loop ended")
        return 0

    def _publish(self) -> None:
        if self.stopped_by is not None:
            return
        try:
            self.bus = self.dbus.publish(self.agent, self.reload, self._method_failed, self._bus_lost)
        except Exception as exc:  # noqa: BLE001 - no bus is a degraded mode, not a failure
            delay = PUBLISH_RETRY[min(self._publish_attempts, len(PUBLISH_RETRY) - 1)]
            self._publish_attempts += 1
            if not self._bus_missing:  # once per outage, not once per attempt
                self._bus_missing = True
                _log(self.agent.log, "dbus_unavailable",
                     f"D-Bus API not offered yet: cannot own {self.dbus.BUS_NAME} on the system bus ({exc}); "
                     "the agent works without it and keeps trying", error=str(exc))
            self.loop.call_later(delay, self._publish)
            return
        self._publish_attempts = 0
        if self._bus_missing:
            self._bus_missing = False
            _log(self.agent.log, "dbus_available",
                 f"D-Bus API offered as {self.dbus.BUS_NAME}")

    def _bus_lost(self) -> None:
        if self.stopped_by is not None:
            return
        self.bus = None
        self._bus_missing = True
        _log(self.agent.log, "dbus_unavailable",
             "the system bus connection closed; the agent works without the D-Bus API until it is back",
             error="connection closed")
        self.loop.call_later(PUBLISH_RETRY[0], self._publish)

    def _method_failed(self, method: str, exc: BaseException) -> None:
        _log(self.agent.log, "dbus_method_failed", f"D-Bus {method}() failed: {exc}",
             method=method, error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    # ------------------------------------------------------------------ reactions

    def tick(self) -> None:
        try:
            delay = self.agent.tick()
            self.failing_since = None
        except Exception as exc:  # noqa: BLE001 - keep ticking; the watchdog judges persistence
            if self.failing_since is None:
                self.failing_since = self.clock()
            _log(self.agent.log, "tick_failed", f"tick failed: {type(exc).__name__}: {exc}",
                 error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            delay = RETRY_AFTER_ERROR
        if self.agent.status_due():
            self.notifier.status(self.agent.status_line())
        if self.stopped_by is None:
            self._tick_source = self.loop.call_later(delay, self.tick)

    def watchdog(self) -> None:
        """Ping unless ticks have failed for a whole watchdog period: then systemd
        kills and (Restart=on-failure) restarts the agent, a fresh start being the
        best remaining remedy. A hung tick needs no check: it blocks this timer too."""
        timeout = self.notifier.watchdog_interval()
        if self.failing_since is not None and timeout and self.clock() - self.failing_since >= timeout:
            return
        self.notifier.watchdog()

    def reload(self) -> bool:
        self.notifier.reloading()
        try:
            ok = self.agent.reload()
        finally:
            self.notifier.status(self.agent.status_line())
            self.notifier.ready()
        return ok

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload()
            return
        self.stopped_by = signal.Signals(signum).name
        self.notifier.stopping()
        if self._tick_source is not None:
            self.loop.cancel(self._tick_source)
            self._tick_source = None
        self.loop.quit()


def _log(log: Any, kind: str, sentence: str, **fields: Any) -> None:
    """An event of the registry (events.EVENTS) through logsetup.emit; the call
    site's sentence is the event's detail."""
    fields.pop("exc_info", None)
    fields.setdefault("retry", RETRY_AFTER_ERROR)
    logsetup.emit(log, kind, detail=sentence, **fields)

"""The main loop's reactions, on a scripted loop: tick re-arming, reload, stop,
watchdog, and the bus coming and going. No GLib here; dbus_service.Loop is the
real loop and the system test drives it under systemd."""

from __future__ import annotations

import signal
from typing import Any, Callable, List, Optional, Tuple

import pytest

from conntrack_agent import mainloop


class FakeLoop:
    """Timers run in due order on a virtual clock; signals are delivered by the test."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: List[Tuple[float, int, Callable[[], None], Optional[float]]] = []
        self.signals = {}
        self.running = False
        self.quit_called = False
        self._ids = 0
        self.script: List[Tuple[float, Callable[[], None]]] = []  # (at, action)

    def _add(self, delay: float, cb: Callable[[], None], every: Optional[float]) -> int:
        self._ids += 1
        self.timers.append((self.now + delay, self._ids, cb, every))
        return self._ids

    def call_later(self, seconds: float, callback: Callable[[], None]) -> int:
        return self._add(seconds, callback, None)

    def every(self, seconds: float, callback: Callable[[], None]) -> int:
        return self._add(seconds, callback, seconds)

    def on_signal(self, signum: int, callback: Callable[[int], None]) -> int:
        self.signals[signum] = callback
        return 0

    def cancel(self, source_id: int) -> None:
        self.timers = [t for t in self.timers if t[1] != source_id]

    def quit(self) -> None:
        self.quit_called = True

    def run(self, until: float = 60.0) -> None:
        self.running = True
        script = sorted(self.script, key=lambda s: s[0])
        while not self.quit_called:
            candidates = [(t[0], 0, t) for t in self.timers] + [(at, 1, (at, action)) for at, action in script]
            if not candidates:
                break
            at, kind, item = min(candidates, key=lambda c: (c[0], c[1]))
            if at > until:
                break
            self.now = at
            if kind == 1:
                script.remove(item)
                item[1]()
                continue
            self.timers.remove(item)
            _, ident, cb, every = item
            if every is not None:
                self.timers.append((self.now + every, ident, cb, every))
            cb()


class FakeDBus:
    BUS_NAME = "io.github.conntrack_agent1"

    def __init__(self, loop: FakeLoop, fail_times: int = 0) -> None:
        self.loop = loop
        self.fail_times = fail_times
        self.attempts: List[float] = []
        self.published: List[Any] = []

    def Loop(self) -> FakeLoop:  # noqa: N802 - mirrors dbus_service.Loop
        return self.loop

    def publish(self, agent, reload, log_failure, on_lost):
        self.attempts.append(self.loop.now)
        if len(self.attempts) <= self.fail_times:
            raise RuntimeError("name already exists on the bus")
        handle = type("Published", (), {"closed": False, "close": lambda s: setattr(s, "closed", True)})()
        self.published.append((handle, on_lost))
        return handle


class FakeNotifier:
    def __init__(self, watchdog: Optional[float] = None) -> None:
        self.sent: List[str] = []
        self._watchdog = watchdog

    def ready(self) -> None: self.sent.append("READY")
    def status(self, text: str) -> None: self.sent.append("STATUS=" + text)
    def watchdog(self) -> None: self.sent.append("WATCHDOG")
    def reloading(self) -> None: self.sent.append("RELOADING")
    def stopping(self) -> None: self.sent.append("STOPPING")
    def watchdog_interval(self) -> Optional[float]: return self._watchdog


class FakeLog:
    def __init__(self) -> None:
        self.events: List[Tuple[str, dict]] = []

    def log(self, level, event, **kw): self.events.append((event, kw))
    def info(self, event, **kw): self.events.append((event, kw))
    def warning(self, event, **kw): self.events.append((event, kw))
    def error(self, event, **kw): self.events.append((event, kw))

    def kinds(self) -> List[str]:
        return [e for e, _ in self.events]


class FakeAgent:
    def __init__(self, delays=(0.25,), reload_ok: bool = True, fail_ticks: int = 0) -> None:
        self.log = FakeLog()
        self.delays = list(delays)
        self.ticks: List[int] = []
        self.reload_ok = reload_ok
        self.fail_ticks = fail_ticks
        self.calls: List[str] = []
        self.decision_listeners: List[Any] = []

    def start(self): self.calls.append("start")
    def stop(self, why="?"): self.calls.append("stop:" + why)
    def status_line(self): return "count %d/100" % len(self.ticks)
    def status_due(self): return True

    def reload(self) -> bool:
        self.calls.append("reload")
        return self.reload_ok

    def tick(self) -> float:
        self.ticks.append(1)
        if self.fail_ticks:
            self.fail_ticks -= 1
            raise OSError(5, "Input/output error")
        return self.delays[min(len(self.ticks) - 1, len(self.delays) - 1)]


def _supervisor(agent=None, notifier=None, fail_times=0):
    loop = FakeLoop()
    agent = agent or FakeAgent()
    notifier = notifier or FakeNotifier()
    dbus = FakeDBus(loop, fail_times)
    return mainloop.Supervisor(agent, notifier, dbus, clock=lambda: loop.now), loop, agent, notifier, dbus


def test_ready_after_start_then_ticks_rearm_with_the_returned_delay() -> None:
    sup, loop, agent, notifier, dbus = _supervisor(FakeAgent(delays=(0.25, 0.05, 0.05, 1.0)))
    tick_times: List[float] = []
    original = agent.tick
    agent.tick = lambda: (tick_times.append(loop.now), original())[1]
    loop.script.append((2.0, lambda: loop.signals[signal.SIGTERM](signal.SIGTERM)))
    assert sup.run() == 0
    assert agent.calls[0] == "start"
    assert notifier.sent[:2] == ["STATUS=count 0/100", "READY"]
    assert tick_times[:5] == pytest.approx([0.0, 0.25, 0.30, 0.35, 1.35])
    assert notifier.sent[-1] == "STOPPING"
    assert agent.calls[-1] == "stop:SIGTERM"
    assert dbus.published[0][0].closed
    assert not any(t for t in loop.timers if t[2] == sup.tick)  # the pending tick was cancelled


def test_sighup_reloads_between_reloading_and_ready() -> None:
    sup, loop, agent, notifier, _ = _supervisor(FakeAgent(reload_ok=False))
    loop.script.append((1.0, lambda: loop.signals[signal.SIGHUP](signal.SIGHUP)))
    loop.script.append((2.0, lambda: loop.signals[signal.SIGINT](signal.SIGINT)))
    sup.run()
    assert "reload" in agent.calls
    i = notifier.sent.index("RELOADING")
    assert notifier.sent[i + 1].startswith("STATUS=") and notifier.sent[i + 2] == "READY"
    assert agent.calls[-1] == "stop:SIGINT"


def test_watchdog_pings_until_ticks_fail_for_a_whole_period() -> None:
    agent = FakeAgent(delays=(1.0,), fail_ticks=0)
    sup, loop, agent, notifier, _ = _supervisor(agent, FakeNotifier(watchdog=4.0))
    loop.script.append((5.0, lambda: setattr(agent, "fail_ticks", 1000)))
    loop.script.append((20.0, lambda: loop.signals[signal.SIGTERM](signal.SIGTERM)))
    pings: List[float] = []
    original = notifier.watchdog
    notifier.watchdog = lambda: (pings.append(loop.now), original())
    sup.run()
    assert pings[:2] == [2.0, 4.0]          # every half period
    assert max(pings) <= 5.0 + 4.0          # none once ticks failed for >= 4s
    assert "tick_failed" in agent.log.kinds()
    assert len(agent.ticks) > 10            # it kept retrying meanwhile


def test_bus_unavailable_is_said_once_and_retried_until_it_works() -> None:
    sup, loop, agent, notifier, dbus = _supervisor(fail_times=3)
    loop.script.append((60.0, lambda: loop.signals[signal.SIGTERM](signal.SIGTERM)))
    sup.run()
    assert dbus.attempts == [0.0, 2.0, 7.0, 22.0]
    assert agent.log.kinds().count("dbus_unavailable") == 1
    assert agent.log.kinds().count("dbus_available") == 1
    assert "READY" in notifier.sent  # the agent did not wait for the bus


def test_bus_lost_is_reported_and_republished() -> None:
    sup, loop, agent, notifier, dbus = _supervisor()
    loop.script.append((1.0, lambda: dbus.published[0][1]()))
    loop.script.append((10.0, lambda: loop.signals[signal.SIGTERM](signal.SIGTERM)))
    sup.run()
    assert dbus.attempts == [0.0, 1.0 + mainloop.PUBLISH_RETRY[0]]
    assert "dbus_unavailable" in agent.log.kinds()


def test_without_gi_the_plain_loop_runs_and_says_so(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_gi(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "dbus_service" or (fromlist and "dbus_service" in fromlist) or name.startswith(("gi", "pydbus")):
            raise ImportError("No module named 'gi'")
        return real_import(name, globals, locals, fromlist, level)

    ran = []
    monkeypatch.setattr(builtins, "__import__", no_gi)
    monkeypatch.setattr(mainloop.service, "run_simple", lambda agent, notifier: ran.append(agent) or 0)
    agent = FakeAgent()
    assert mainloop.run(agent, FakeNotifier()) == 0
    assert ran == [agent]
    assert agent.log.kinds() == ["dbus_unavailable"]

"""The supervisor (mainloop.Supervisor) and its two loop backends.

Three kinds of test:

- exact schedules on FakeLoop, a virtual clock implementing the loop interface
  (tick re-arming, watchdog periods, bus retries, --once, start failures);
- the same semantics on both real backends, SelectLoop and dbus_service.GLibLoop,
  in real time with short periods and real signals sent to this process;
- a reload that raises, SIGHUP after SIGHUP, then SIGTERM, in a child process per
  backend talking sd_notify to a socket of the test's: the process must survive
  until SIGTERM and then exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from conntrack_agent import config, journal, logsetup, mainloop

AGENT_DIR = str(Path(__file__).resolve().parents[2] / "agent")


# ---------------------------------------------------------------------- fakes


class FakeLoop:
    """The loop interface on a virtual clock: timers run in due order; a script of
    (time, action) pairs stands in for the outside world (signals, the bus)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: List[Tuple[float, int, Callable[[], None], Optional[float]]] = []
        self.signals: Dict[int, Callable[[int], None]] = {}
        self.quit_called = False
        self.closed = False
        self.on_error: Callable[[BaseException], None] = mainloop.print_exception
        self._ids = 0
        self.script: List[Tuple[float, Callable[[], None]]] = []

    def _add(self, delay: float, cb: Callable[[], None], every: Optional[float]) -> int:
        self._ids += 1
        self.timers.append((self.now + delay, self._ids, cb, every))
        return self._ids

    def call_later(self, seconds: float, callback: Callable[[], None]) -> int:
        return self._add(seconds, callback, None)

    def every(self, seconds: float, callback: Callable[[], None]) -> int:
        return self._add(seconds, callback, seconds)

    def on_signal(self, signum: int, callback: Callable[[int], None]) -> None:
        self.signals[signum] = callback

    def cancel(self, source_id: int) -> None:
        self.timers = [t for t in self.timers if t[1] != source_id]

    def quit(self) -> None:
        self.quit_called = True

    def close(self) -> None:
        self.closed = True

    def serve_ready(self) -> None:
        """What is ready besides the timers (file descriptors, in a subclass): before the next timer."""

    def run(self, until: float = 60.0) -> None:
        script = sorted(self.script, key=lambda s: s[0])
        while not self.quit_called:
            self.serve_ready()
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
            try:
                cb()
            except Exception as exc:  # noqa: BLE001 - as the real backends do
                self.on_error(exc)


class FakeBus:
    BUS_NAME = "io.github.conntrack_agent1"

    def __init__(self, clock: Callable[[], float], fail_times: int = 0) -> None:
        self.clock = clock
        self.fail_times = fail_times
        self.attempts: List[float] = []
        self.published: List[Any] = []

    def publish(self, agent, reload, log_failure, on_lost):
        self.attempts.append(self.clock())
        if len(self.attempts) <= self.fail_times:
            raise RuntimeError("name already exists on the bus")
        handle = FakePublished(on_lost)
        self.published.append(handle)
        return handle


class FakePublished:
    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost
        self.closed = False
        self.invalidations = 0

    def invalidate(self) -> None:
        self.invalidations += 1

    def close(self) -> None:
        self.closed = True


class FakeNotifier:
    def __init__(self, watchdog: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.sent: List[str] = []
        self.pings: List[float] = []
        self._watchdog = watchdog
        self._clock = clock

    def ready(self) -> None: self.sent.append("READY")
    def status(self, text: str) -> None: self.sent.append("STATUS=" + text)
    def reloading(self) -> None: self.sent.append("RELOADING")
    def stopping(self) -> None: self.sent.append("STOPPING")
    def watchdog_interval(self) -> Optional[float]: return self._watchdog

    def watchdog(self) -> None:
        self.sent.append("WATCHDOG")
        self.pings.append(self._clock())


class FakeLog:
    def __init__(self) -> None:
        self.events: List[Tuple[str, dict]] = []

    def log(self, level, event, **kw): self.events.append((event, kw))

    def kinds(self) -> List[str]:
        return [e for e, _ in self.events]

    def of(self, kind: str) -> List[dict]:
        return [kw for e, kw in self.events if e == kind]


class FakeAgent:
    def __init__(self, delays=(0.25,), reload_ok: bool = True, fail_ticks: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = FakeLog()
        self.delays = list(delays)
        self.ticks: List[float] = []
        self.reload_ok = reload_ok
        self.reload_error: Optional[BaseException] = None
        self.start_error: Optional[BaseException] = None
        self.fail_ticks = fail_ticks
        self.calls: List[str] = []
        self.decision_listeners: List[Any] = []
        self.policy_label = "policy A"
        self.clock = clock
        self.policy = config.loads(b"")
        self.sampler = types.SimpleNamespace(unavailable={})

    def start(self):
        self.calls.append("start")
        if self.start_error is not None:
            raise self.start_error

    def stop(self, why="?"): self.calls.append("stop:" + why)
    def status_line(self): return "count %d/100, %s" % (len(self.ticks), self.policy_label)
    def status_due(self): return True

    def reload(self) -> bool:
        self.calls.append("reload")
        if self.reload_error is not None:
            raise self.reload_error
        return self.reload_ok

    def tick(self) -> float:
        self.ticks.append(self.clock())
        if self.fail_ticks:
            self.fail_ticks -= 1
            raise OSError(5, "Input/output error")
        return self.delays[min(len(self.ticks) - 1, len(self.delays) - 1)]


def _virtual(agent: Optional[FakeAgent] = None, watchdog: Optional[float] = None, fail_times: int = 0,
             bus: bool = True):
    loop = FakeLoop()
    clock = lambda: loop.now  # noqa: E731
    agent = agent or FakeAgent()
    agent.clock = clock
    notifier = FakeNotifier(watchdog, clock)
    fake_bus = FakeBus(clock, fail_times) if bus else None
    sup = mainloop.Supervisor(agent, notifier, loop, bus=fake_bus, clock=clock)
    return sup, loop, agent, notifier, fake_bus


def _signal(loop: FakeLoop, at: float, signum: int) -> None:
    loop.script.append((at, lambda: loop.signals[signum](signum)))


# ---------------------------------------------------------------------- exact schedules (virtual time)


def test_ready_after_start_then_ticks_rearm_with_the_returned_delay() -> None:
    sup, loop, agent, notifier, bus = _virtual(FakeAgent(delays=(0.25, 0.05, 0.05, 1.0)))
    _signal(loop, 2.0, signal.SIGTERM)
    assert sup.run() == mainloop.EXIT_OK
    assert agent.calls[0] == "start"
    assert notifier.sent[:2] == ["STATUS=count 0/100, policy A", "READY"]
    assert agent.ticks[:5] == pytest.approx([0.0, 0.25, 0.30, 0.35, 1.35])
    assert notifier.sent[-1] == "STOPPING"
    assert agent.calls[-1] == "stop:SIGTERM"
    assert bus.published[0].closed
    assert bus.published[0].invalidations == len(agent.ticks)   # the bus's cached values, after every tick
    assert not any(t for t in loop.timers if t[2] == sup.tick)  # the pending tick was cancelled
    assert loop.closed


def test_sighup_reloads_between_reloading_and_ready() -> None:
    sup, loop, agent, notifier, bus = _virtual(FakeAgent(reload_ok=False))
    _signal(loop, 1.0, signal.SIGHUP)
    _signal(loop, 2.0, signal.SIGINT)
    assert sup.run() == mainloop.EXIT_OK
    assert "reload" in agent.calls
    i = notifier.sent.index("RELOADING")
    assert notifier.sent[i + 1].startswith("STATUS=") and notifier.sent[i + 2] == "READY"
    assert agent.calls[-1] == "stop:SIGINT"
    ticks_before = sum(1 for t in agent.ticks if t <= 1.0)
    assert bus.published[0].invalidations == len(agent.ticks) + 1 > ticks_before  # and after the reload


def test_watchdog_pings_until_ticks_fail_for_a_whole_period() -> None:
    agent = FakeAgent(delays=(1.0,))
    sup, loop, agent, notifier, _ = _virtual(agent, watchdog=4.0)
    loop.script.append((5.0, lambda: setattr(agent, "fail_ticks", 1000)))
    _signal(loop, 20.0, signal.SIGTERM)
    sup.run()
    assert notifier.pings[:2] == [2.0, 4.0]          # every half period
    first_failure = 6.0                              # the first tick after 5.0
    assert max(notifier.pings) < first_failure + 4.0  # none once ticks failed for >= 4s
    assert "tick_failed" in agent.log.kinds()
    assert len(agent.ticks) > 10                     # it kept retrying meanwhile
    assert [t - s for s, t in zip(agent.ticks[7:], agent.ticks[8:])] == pytest.approx(
        [mainloop.RETRY_AFTER_ERROR] * (len(agent.ticks) - 8))


def test_watchdog_resumes_when_ticks_recover() -> None:
    agent = FakeAgent(delays=(1.0,), fail_ticks=3)
    sup, loop, agent, notifier, _ = _virtual(agent, watchdog=10.0)
    _signal(loop, 20.0, signal.SIGTERM)
    sup.run()
    assert sup.failing_since is None
    assert notifier.pings == [5.0, 10.0, 15.0, 20.0]
    assert agent.log.kinds().count("tick_failed") == 3
    statuses = [s for s in notifier.sent if s.startswith("STATUS=")]
    assert statuses[1].startswith("STATUS=tick failing: OSError: [Errno 5] Input/output error")
    assert statuses[-1].startswith("STATUS=count")


def test_a_tick_whose_status_line_raises_counts_as_failed_and_the_chain_goes_on() -> None:
    agent = FakeAgent(delays=(1.0,))
    calls = {"n": 0}

    def broken_status() -> str:
        calls["n"] += 1
        if calls["n"] > 1:  # the start's line works, the ticks' do not
            raise KeyError("last_sample")
        return "fine"
    agent.status_line = broken_status
    sup, loop, agent, notifier, _ = _virtual(agent)
    _signal(loop, 5.5, signal.SIGTERM)
    sup.run()
    assert agent.ticks == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # retried at RETRY_AFTER_ERROR
    assert agent.log.kinds().count("tick_failed") == 6
    assert "KeyError" in agent.log.of("tick_failed")[0]["error"]


def test_bus_unavailable_is_said_once_and_retried_until_it_works() -> None:
    sup, loop, agent, notifier, bus = _virtual(fail_times=3)
    _signal(loop, 60.0, signal.SIGTERM)
    sup.run()
    assert bus.attempts == [0.0, 2.0, 7.0, 22.0]
    assert agent.log.kinds().count("dbus_unavailable") == 1
    assert agent.log.kinds().count("dbus_available") == 1
    assert "READY" in notifier.sent  # the agent did not wait for the bus


def test_bus_lost_is_reported_and_republished() -> None:
    sup, loop, agent, notifier, bus = _virtual()
    loop.script.append((1.0, lambda: bus.published[0].on_lost()))
    _signal(loop, 10.0, signal.SIGTERM)
    sup.run()
    assert bus.attempts == [0.0, 1.0 + mainloop.PUBLISH_RETRY[0]]
    assert "dbus_unavailable" in agent.log.kinds()


def test_once_takes_one_tick_and_exits_with_its_outcome() -> None:
    sup, loop, agent, notifier, bus = _virtual()
    assert sup.run(once=True) == mainloop.EXIT_OK
    assert len(agent.ticks) == 1 and agent.calls == ["start", "stop:--once"]
    assert notifier.sent[1] == "READY" and notifier.sent[-1] == "STOPPING"
    assert bus.attempts == []  # no bus for one tick
    assert loop.closed

    sup, loop, agent, notifier, _ = _virtual(FakeAgent(fail_ticks=1))
    assert sup.run(once=True) == mainloop.EXIT_FAIL
    assert agent.log.kinds() == ["tick_failed"]


@pytest.mark.parametrize("error,status", [
    (config.PolicyError([]), mainloop.EXIT_CONFIG),
    (journal.JournalError("/var/lib/conntrack-agent/state.json: unreadable state file"), mainloop.EXIT_CONFIG),
    (OSError(24, "Too many open files"), mainloop.EXIT_FAIL),
    (KeyError("netns"), mainloop.EXIT_FAIL),
])
def test_a_failed_start_exits_with_the_status_the_unit_expects(error, status) -> None:
    """78 is the unit's RestartPreventExitStatus= (the admin must act); 1 restarts."""
    agent = FakeAgent()
    agent.start_error = error
    sup, loop, agent, notifier, bus = _virtual(agent)
    assert sup.run() == status
    assert "READY" not in notifier.sent and bus.attempts == [] and loop.closed
    (event,) = agent.log.of("start_failed")
    assert event["exit_status"] == status and event["exc_info"] is error
    assert ("does not restart" in event["consequence"]) == (status == mainloop.EXIT_CONFIG)


def test_the_unit_prevents_restarts_on_exactly_the_config_status() -> None:
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "conntrack-agent.service").read_text()
    assert "RestartPreventExitStatus=%d\n" % mainloop.EXIT_CONFIG in unit
    from conntrack_agent import cli
    assert (cli.EXIT_OK, cli.EXIT_FAIL, cli.EXIT_CONFIG) == (mainloop.EXIT_OK, mainloop.EXIT_FAIL,
                                                             mainloop.EXIT_CONFIG)


def test_without_gi_the_select_loop_runs_and_says_so(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_gi(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "dbus_service" or (fromlist and "dbus_service" in fromlist) or name.startswith(("gi", "pydbus")):
            raise ImportError("No module named 'gi'")
        return real_import(name, globals, locals, fromlist, level)

    ran = []

    class Recorder(mainloop.Supervisor):
        def run(self, once=False):
            ran.append((type(self.loop).__name__, self.bus, once))
            self.loop.close()
            return 0

    monkeypatch.setattr(builtins, "__import__", no_gi)
    monkeypatch.setattr(mainloop, "Supervisor", Recorder)
    agent = FakeAgent()
    assert mainloop.run(agent, FakeNotifier()) == 0
    assert ran == [("SelectLoop", None, False)]
    assert agent.log.kinds() == ["dbus_unavailable"]


def test_no_dbus_and_once_never_import_gi(monkeypatch) -> None:
    ran = []

    class Recorder(mainloop.Supervisor):
        def run(self, once=False):
            ran.append((type(self.loop).__name__, self.bus, once))
            self.loop.close()
            return 0

    monkeypatch.setattr(mainloop, "Supervisor", Recorder)
    monkeypatch.delitem(sys.modules, "conntrack_agent.dbus_service", raising=False)
    mainloop.run(FakeAgent(), FakeNotifier(), use_bus=False)
    mainloop.run(FakeAgent(), FakeNotifier(), once=True)
    assert ran == [("SelectLoop", None, False), ("SelectLoop", None, True)]
    assert "conntrack_agent.dbus_service" not in sys.modules


# ---------------------------------------------------------------------- both real backends


def _glib_loop():
    dbus_service = pytest.importorskip("conntrack_agent.dbus_service")
    return dbus_service.GLibLoop()


BACKENDS = {"select": mainloop.SelectLoop, "glib": _glib_loop}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    """A fresh loop of each backend; this process's signal handlers and wakeup fd
    are put back afterwards (the tests send themselves real signals)."""
    saved = {s: signal.getsignal(s) for s in mainloop.HANDLED_SIGNALS}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    loop = BACKENDS[request.param]()
    yield loop
    loop.close()
    for signum, handler in saved.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    signal.set_wakeup_fd(wakeup)


def _kill_at(loop: Any, seconds: float, signum: int) -> None:
    loop.call_later(seconds, lambda: os.kill(os.getpid(), signum))


def test_backend_start_ready_ticks_and_sigterm(backend) -> None:
    agent = FakeAgent(delays=(0.02,))
    notifier = FakeNotifier()
    _kill_at(backend, 0.3, signal.SIGTERM)
    started = time.monotonic()
    assert mainloop.Supervisor(agent, notifier, backend).run() == mainloop.EXIT_OK
    assert time.monotonic() - started < 2
    assert notifier.sent[:2] == ["STATUS=count 0/100, policy A", "READY"]
    assert notifier.sent[-1] == "STOPPING" and agent.calls[-1] == "stop:SIGTERM"
    assert 5 <= len(agent.ticks) <= 16
    gaps = [b - a for a, b in zip(agent.ticks, agent.ticks[1:])]
    assert min(gaps) >= 0.019  # re-armed with the delay tick() returned, not faster


def test_backend_reload_errors_keep_the_policy_and_the_signal_handlers(backend) -> None:
    agent = FakeAgent(delays=(0.02,))
    notifier = FakeNotifier()
    errors = [ValueError("bad"), PermissionError(13, "Permission denied"), None]

    def reload() -> bool:
        agent.calls.append("reload")
        # The next signal once this one is handled: two pending SIGHUPs may be one.
        _kill_at(backend, 0.05, signal.SIGHUP if errors[1:] else signal.SIGTERM)
        error = errors.pop(0)
        if error is not None:
            raise error
        agent.policy_label = "policy B"
        return True
    agent.reload = reload
    _kill_at(backend, 0.1, signal.SIGHUP)
    backend.call_later(3, backend.quit)  # a bound on a broken run
    assert mainloop.Supervisor(agent, notifier, backend).run() == mainloop.EXIT_OK
    assert agent.calls.count("reload") == 3 and agent.calls[-1] == "stop:SIGTERM"
    brackets = [i for i, s in enumerate(notifier.sent) if s == "RELOADING"]
    assert len(brackets) == 3
    for i in brackets:
        assert notifier.sent[i + 1].startswith("STATUS=") and notifier.sent[i + 2] == "READY"
    assert notifier.sent[brackets[1] + 1].endswith("policy A")   # kept after each failure
    assert notifier.sent[brackets[2] + 1].endswith("policy B")
    failed = agent.log.of("reload_failed")
    assert [f["error"] for f in failed] == ["ValueError: bad", "PermissionError: [Errno 13] Permission denied"]
    assert all(f["policy"] == "policy A" and isinstance(f["exc_info"], Exception) for f in failed)


def test_backend_watchdog_withheld_once_ticks_failed_for_a_period(backend, monkeypatch) -> None:
    monkeypatch.setattr(mainloop, "RETRY_AFTER_ERROR", 0.02)
    agent = FakeAgent(delays=(0.02,))
    notifier = FakeNotifier(watchdog=0.3)
    failing_from: List[float] = []

    def fail() -> None:
        failing_from.append(time.monotonic())
        agent.fail_ticks = 10 ** 6
    backend.call_later(0.35, fail)
    _kill_at(backend, 1.2, signal.SIGTERM)
    mainloop.Supervisor(agent, notifier, backend).run()
    assert len([p for p in notifier.pings if p < failing_from[0]]) >= 2       # fed while well
    assert all(p < failing_from[0] + 0.3 + 0.05 for p in notifier.pings)    # none after a failing period
    late_ticks = [t for t in agent.ticks if t > failing_from[0] + 0.4]
    assert len(late_ticks) >= 10                                             # still retrying meanwhile


def test_backend_callbacks_that_raise_keep_their_source(backend) -> None:
    errors: List[BaseException] = []
    backend.on_error = errors.append
    runs = {"every": 0, "hup": 0}

    def every() -> None:
        runs["every"] += 1
        raise RuntimeError("every")

    def on_hup(signum: int) -> None:
        runs["hup"] += 1
        if runs["hup"] == 1:  # the second once the first is handled: pending SIGHUPs may merge
            _kill_at(backend, 0.05, signal.SIGHUP)
        else:
            backend.call_later(0.05, backend.quit)
        raise RuntimeError("hup")
    backend.every(0.02, every)
    backend.on_signal(signal.SIGHUP, on_hup)
    sentinel = None
    if type(backend).__name__ == "GLibLoop":
        # A second watcher keeps GLib's handler installed should the tested source
        # go: the second SIGHUP then shows up as a missing run instead of killing
        # the test run (GLib restores the default action with the last watcher).
        from gi.repository import GLib
        sentinel = GLib.unix_signal_add(GLib.PRIORITY_LOW, signal.SIGHUP, lambda: True)
    _kill_at(backend, 0.1, signal.SIGHUP)
    backend.call_later(2, backend.quit)  # a bound on a broken run
    try:
        backend.run()
    finally:
        if sentinel is not None:
            GLib.source_remove(sentinel)
    assert runs["hup"] == 2 and runs["every"] >= 5
    assert len(errors) == runs["hup"] + runs["every"]


def test_backend_cancel_and_order(backend) -> None:
    seen: List[str] = []
    handle = backend.call_later(0.05, lambda: seen.append("cancelled"))
    backend.call_later(0.02, lambda: seen.append("b"))
    backend.call_later(0.01, lambda: seen.append("a"))
    backend.call_later(0.03, lambda: backend.cancel(handle))
    backend.call_later(0.08, backend.quit)
    backend.run()
    assert seen == ["a", "b"]


def test_backend_rearming_timers_does_not_grow_the_process(backend) -> None:
    """PyGObject 3.42 leaks ~115 bytes per GLib.timeout_add(): the GLib backend
    must not make one per tick (50000 re-arms would add ~5.5 MB)."""
    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def rearm(count: int) -> None:
        left = [count]

        def tick() -> None:
            left[0] -= 1
            if left[0]:
                backend.call_later(0, tick)
            else:
                backend.quit()
        backend.call_later(0, tick)
        backend.run()
    rearm(5000)
    before = rss_mb()
    rearm(50000)
    assert rss_mb() - before < 2


# ---------------------------------------------------------------------- reloads never kill (a real process)

_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
from conntrack_agent import logsetup, mainloop, sdnotify

logsetup.configure("json")

def recurse(depth=0):
    return recurse(depth + 1)

class Agent:
    log = logsetup.get_logger()
    decision_listeners = []
    policy_label = "policy A"
    from conntrack_agent import config
    policy = config.loads(b"")
    import types
    sampler = types.SimpleNamespace(unavailable={})
    def __init__(self):
        self.reloads = [lambda: int("x"), recurse, self.denied, self.io_error, self.valid]
    def denied(self):
        raise PermissionError(13, "Permission denied", "/etc/conntrack-agent/policy.toml")
    def io_error(self):
        raise OSError(5, "Input/output error")
    def valid(self):
        self.policy_label = "policy B"
        return True
    def start(self): pass
    def stop(self, why): print("stopped:", why, flush=True)
    def tick(self): return 0.05
    def status_due(self): return True
    def status_line(self): return "running " + self.policy_label
    def reload(self):
        return self.reloads.pop(0)()

if sys.argv[1] == "glib":
    from conntrack_agent import dbus_service
    loop = dbus_service.GLibLoop()
else:
    loop = mainloop.SelectLoop()
sys.exit(mainloop.Supervisor(Agent(), sdnotify.Notifier(), loop).run())
"""

RELOAD_ERRORS = ["ValueError", "RecursionError", "PermissionError", "OSError"]


class Manager:
    """The test's stand-in for systemd: the notify socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(10)

    def next(self, key: str) -> Dict[str, str]:
        """Messages until one carrying `key`; that one."""
        while True:
            fields = dict(line.split("=", 1) for line in self.sock.recv(4096).decode().split("\n") if "=" in line)
            if key in fields:
                return fields


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_reloads_that_raise_never_kill_the_process(name, tmp_path: Path) -> None:
    if name == "glib":
        pytest.importorskip("gi")
    manager = Manager(str(tmp_path / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    env.pop("WATCHDOG_USEC", None)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, name, AGENT_DIR], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert manager.next("READY")["READY"] == "1"
        for expected_status in ["running policy A"] * len(RELOAD_ERRORS) + ["running policy B"]:
            child.send_signal(signal.SIGHUP)
            assert manager.next("RELOADING")["RELOADING"] == "1"
            ready = manager.next("READY")
            assert ready.get("STATUS", expected_status) == expected_status
            assert child.poll() is None, "the agent died on a reload"
        child.send_signal(signal.SIGTERM)
        manager.next("STOPPING")
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        manager.sock.close()
    assert child.returncode == 0, err
    assert out.strip() == "stopped: SIGTERM"
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "reload_failed"]
    assert [e["error"].split(":")[0] for e in failed] == RELOAD_ERRORS
    for event, kind in zip(failed, RELOAD_ERRORS):
        assert event["priority"] == 3 and event["policy"] == "policy A"
        assert event["exception"].startswith("Traceback (most recent call last):")
        assert event["exception"].splitlines()[-1].startswith(kind + ":")
        assert "in reload" in event["exception"]


# ---------------------------------------------------------------------- tracebacks in every sink


@pytest.fixture
def journal_socket(dgram_listener):
    path, sock = dgram_listener
    yield path, sock
    import structlog
    structlog.reset_defaults()


def _journal_entry(sock: socket.socket) -> Dict[str, str]:
    from test_journald import receive  # the independent parser of the native protocol
    return receive(sock)


def _failing_tick() -> float:
    raise OSError(5, "Input/output error")


def test_tick_failed_reaches_the_journal_with_its_traceback(journal_socket) -> None:
    path, sock = journal_socket
    assert logsetup.configure("journal", journal_socket=path) == "journal"
    agent = FakeAgent()
    agent.log = logsetup.get_logger()
    agent.tick = _failing_tick
    sup, loop, _, notifier, _ = _virtual(agent)
    sup.tick()
    fields = _journal_entry(sock)
    assert fields["EVENT"] == "tick_failed" and fields["PRIORITY"] == "3"
    assert fields["MESSAGE"] == "tick failed: OSError: [Errno 5] Input/output error; the agent tries again in 1.0s"
    trace = fields["EXCEPTION"]
    assert trace.startswith("Traceback (most recent call last):")
    assert "in _failing_tick" in trace and trace.endswith("OSError: [Errno 5] Input/output error")
    assert not any(k.startswith(("CT_EXC", "EXC_INFO")) for k in fields)


def test_reload_failed_reaches_the_journal_with_its_traceback(journal_socket) -> None:
    path, sock = journal_socket
    logsetup.configure("journal", journal_socket=path)
    agent = FakeAgent()
    agent.log = logsetup.get_logger()
    agent.reload_error = RecursionError("maximum recursion depth exceeded")
    sup, loop, _, notifier, _ = _virtual(agent)
    assert sup.reload() is False
    assert notifier.sent == ["RELOADING", "STATUS=count 0/100, policy A", "READY"]
    fields = _journal_entry(sock)
    assert fields["EVENT"] == "reload_failed" and fields["PRIORITY"] == "3"
    assert fields["MESSAGE"] == ("reload failed: RecursionError: maximum recursion depth exceeded; "
                                 "keeping the running policy (policy A)")
    assert "in reload" in fields["EXCEPTION"]
    assert fields["EXCEPTION"].endswith("RecursionError: maximum recursion depth exceeded")

"""nf_conntrack loaded while the agent starts or runs: the baseline follows the
module's uevent at once, and the event says what triggered it.

The real Agent on the fake kernel, under the real Supervisor on a virtual-time
loop; the uevent socket is a fake with the kernel's one property that matters
here: an event reaches only the sockets open when it is sent. The case the
supervisor must not lose: the module loads after the start's probe found it
missing. Opened after that probe, the socket would never see the event and the
baseline would wait for the 5 s reprobe.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Tuple

import pytest

from conntrack_agent import mainloop, service, uevent

from fakekernel import FakeKernel
from test_mainloop import FakeLoop, FakeNotifier

MODULE_ADD = b"add@/module/nf_conntrack\0ACTION=add\0DEVPATH=/module/nf_conntrack\0SUBSYSTEM=module\0SEQNUM=%d\0"
DEFAULT_MAX = 7680
POLICY = '[agent]\nstate_file = "{state}"\n[baseline]\nnf_conntrack_max = 262144\n'


class UeventBus:
    """The kernel's group 1: send() reaches every socket open at that moment."""

    def __init__(self) -> None:
        self.open: Dict[int, "FakeUeventSocket"] = {}
        self.opened_at: List[float] = []
        self.seqnum = itertools.count(1600)
        self._fds = itertools.count(100)

    def socket(self, now: float) -> "FakeUeventSocket":
        sock = FakeUeventSocket(self, next(self._fds))
        self.open[sock.fd] = sock
        self.opened_at.append(now)
        return sock

    def send(self, data: bytes) -> None:
        for sock in self.open.values():
            sock.queue.append(data)

    def module_loaded(self) -> None:
        self.send(MODULE_ADD % next(self.seqnum))


class FakeUeventSocket:
    def __init__(self, bus: UeventBus, fd: int) -> None:
        self.bus, self.fd, self.queue = bus, fd, []

    def fileno(self) -> int:
        return self.fd

    def recvmsg(self, size: int) -> Tuple[bytes, list, int, Tuple[int, int]]:
        if not self.queue:
            raise BlockingIOError()
        return self.queue.pop(0), [], 0, (0, 1)   # port id 0: the kernel's

    def close(self) -> None:
        self.bus.open.pop(self.fd, None)


class ReadableLoop(FakeLoop):
    """FakeLoop with readable sockets, served as select() would: before the next timer."""

    def __init__(self, bus: UeventBus) -> None:
        super().__init__()
        self.bus = bus
        self.readers: Dict[int, Callable[[], None]] = {}

    def on_readable(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_readable(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def serve_ready(self) -> None:
        for fd, callback in list(self.readers.items()):
            sock = self.bus.open.get(fd)
            if sock is not None and sock.queue and fd in self.readers:
                callback()


class TimedEvents:
    """The agent's log, each event stamped with the loop's virtual time."""

    def __init__(self, loop: ReadableLoop) -> None:
        self.loop = loop
        self.items: List[Tuple[float, str, Dict[str, Any]]] = []

    def log(self, _level: int, kind: str, **fields: Any) -> None:
        self.items.append((self.loop.now, kind, fields))

    def of(self, kind: str) -> List[Tuple[float, Dict[str, Any]]]:
        return [(t, f) for t, k, f in self.items if k == kind]


def _node(tmp_path, loaded: bool):
    kernel = FakeKernel(maximum=DEFAULT_MAX)
    kernel.loaded = loaded
    bus = UeventBus()
    loop = ReadableLoop(bus)
    clock = lambda: loop.now  # noqa: E731
    log = TimedEvents(loop)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(state=tmp_path / "state.json"))
    agent = service.Agent(str(policy), False, log, clock=clock, kernel=kernel)
    sup = mainloop.Supervisor(agent, FakeNotifier(clock=clock), loop, clock=clock,
                              listen=lambda: uevent.UeventListener(bus.socket(loop.now)))
    loop.script.append((30.0, sup.loop.quit))
    return kernel, bus, loop, log, agent, sup


def test_a_module_loaded_right_after_the_start_probe_is_answered_by_its_uevent(tmp_path):
    kernel, bus, loop, log, agent, sup = _node(tmp_path, loaded=False)
    real_start = agent.start

    def start_then_load() -> Any:
        sample = real_start()
        # The start's probe found nothing; the module loads now, before the supervisor
        # goes on to its loop.
        assert agent.sampler.unavailable and kernel.globals["nf_conntrack_max"] == DEFAULT_MAX
        kernel.loaded = True
        bus.module_loaded()
        return sample

    agent.start = start_then_load
    sup.run()
    applied = log.of("baseline_applied")
    assert kernel.globals["nf_conntrack_max"] == 262144
    assert len(applied) == 1, applied
    at, fields = applied[0]
    # At once (virtual time 0), not at the reprobe 5 s later.
    assert at < service.REPROBE_INTERVAL and at == 0.0
    assert fields["trigger"] == "uevent" and fields["uevent_seqnum"] == 1600
    assert isinstance(fields["uevent_usec"], int) and fields["monotonic_usec"] >= fields["uevent_usec"]
    assert bus.open == {}, "the socket stays open once nothing is missing"


def test_the_socket_opens_before_the_first_probe_and_closes_when_nothing_is_missing(tmp_path):
    kernel, bus, loop, log, agent, sup = _node(tmp_path, loaded=True)
    probes_before_open: List[int] = []
    real_open = kernel.open_probe

    def open_probe(name: str) -> Any:
        probes_before_open.append(len(bus.opened_at))
        return real_open(name)

    kernel.open_probe = open_probe
    sup.run()
    assert probes_before_open and probes_before_open[0] == 1   # the socket existed at the first probe
    assert bus.open == {} and loop.readers == {}               # closed again: nothing was missing
    [(at, fields)] = log.of("baseline_applied")
    assert fields["trigger"] == "start" and "uevent_seqnum" not in fields


def test_a_module_reloaded_between_a_tick_and_the_socket_open_is_found_at_once(tmp_path):
    """Unloaded while the agent runs: the tick that notices opens the socket after its
    look; a load in between sent its event before the socket existed."""
    kernel, bus, loop, log, agent, sup = _node(tmp_path, loaded=True)
    opens = []

    def listen() -> Any:
        opens.append(loop.now)
        if len(opens) == 2:          # the open after the tick that found the module gone
            kernel.loaded = True
            kernel.globals["nf_conntrack_max"] = DEFAULT_MAX
            bus.module_loaded()      # before this socket exists: it never sees it
        return uevent.UeventListener(bus.socket(loop.now))

    sup._listen = listen

    def unload() -> None:
        kernel.loaded = False
        kernel.globals["nf_conntrack_max"] = DEFAULT_MAX

    loop.script.append((10.0, unload))
    sup.run()
    applied = log.of("baseline_applied")
    assert [f["trigger"] for _, f in applied] == ["start", "reprobe"], applied
    tick_after_unload = min(t for t, k, f in log.items if t >= 10.0)
    assert len(opens) == 2 and opens[1] == tick_after_unload
    assert applied[1][0] == opens[1] < 10.0 + service.REPROBE_INTERVAL
    assert kernel.globals["nf_conntrack_max"] == 262144 and bus.open == {}


def test_the_journal_entry_carries_the_trigger_the_seqnum_and_the_monotonic_time():
    from conntrack_agent import journald, logsetup

    captured: List[Dict[str, Any]] = []

    class Log:
        def log(self, _level: int, kind: str, **fields: Any) -> None:
            captured.append(dict(fields, event=kind))

    logsetup.emit(Log(), "baseline_applied", netns="", netns_label="the host namespace", changes="max 7680→262144",
                  detail="", trigger="uevent", monotonic_usec=12345678, uevent_seqnum=1615, uevent_usec=12345000)
    fields = dict(journald.entry_fields("info", captured[0]))
    assert (fields["TRIGGER"], fields["MONOTONIC_USEC"], fields["UEVENT_SEQNUM"], fields["UEVENT_USEC"]) == (
        "uevent", "12345678", "1615", "12345000")
    assert fields["MESSAGE_ID"] == "2d4f6a8c0e1b4a3c5e7d9f1b3c5a7e92"


@pytest.mark.parametrize("fails", [True, False])
def test_no_uevent_socket_leaves_the_reprobe(tmp_path, fails):
    kernel, bus, loop, log, agent, sup = _node(tmp_path, loaded=False)
    if fails:
        def refuse() -> Any:
            raise PermissionError(13, "Permission denied")
        sup._listen = refuse
    loop.script.append((2.0, lambda: setattr(kernel, "loaded", True)))
    sup.run()
    [(at, fields)] = log.of("baseline_applied")
    # Without a socket only the reprobe finds it (5 s after the start's probe);
    # with one, a load without an event (this test sends none) still is found by it.
    assert at == service.REPROBE_INTERVAL and fields["trigger"] == "reprobe"


def test_on_the_uevent_the_baseline_is_written_before_the_probe_opens(tmp_path):
    """Opening the probe's ctnetlink socket makes the kernel load two more modules
    (a modprobe each): the baseline must not wait for that."""
    kernel, bus, loop, log, agent, sup = _node(tmp_path, loaded=False)
    order: List[str] = []
    real_open, real_write = kernel.open_probe, kernel.write_sysctl

    def open_probe(name: str) -> Any:
        if kernel.loaded:
            order.append("probe")
        return real_open(name)

    def write_sysctl(netns: str, name: str, value: int) -> None:
        order.append("write " + name)
        real_write(netns, name, value)

    kernel.open_probe, kernel.write_sysctl = open_probe, write_sysctl

    def load() -> None:
        kernel.loaded = True
        bus.module_loaded()

    loop.script.append((1.0, load))
    sup.run()
    assert order == ["write nf_conntrack_max", "probe"]
    [(at, fields)] = log.of("baseline_applied")          # once: the probe's opening does not repeat it
    assert at == 1.0 and fields["trigger"] == "uevent"
    assert [k for _, k, _ in log.items].count("conntrack_available") == 1

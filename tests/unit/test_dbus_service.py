"""The D-Bus object: properties, root-only methods, error mapping, the Decision
signal, and query_daemon, on a private dbus-daemon (no system bus touched)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gi")
pytest.importorskip("pydbus")

from gi.repository import GLib  # noqa: E402

from conntrack_agent import dbus_service  # noqa: E402
from conntrack_agent.decisions import Decision  # noqa: E402

AGENT_DIR = str(Path(__file__).resolve().parents[2] / "agent")


class FakeAgent:
    def __init__(self, snapshot=None, evaluate=None) -> None:
        self._snapshot = snapshot or {}
        self._evaluate = evaluate or (lambda: [])
        self.decision_listeners = []

    def snapshot(self):
        return self._snapshot

    def report(self):
        return {"owned": [{"name": "nf_conntrack_max", "original": 1009, "applied": 2018}], "rules": []}

    def evaluate(self):
        return self._evaluate()


def _obj(agent=None, reload=lambda: True, uid=0, failures=None):
    failures = [] if failures is None else failures
    uid_of = uid if callable(uid) else (lambda sender: uid)
    return dbus_service.AgentObject(agent or FakeAgent(), reload, uid_of, lambda m, e: failures.append((m, e)))


SENDER = ":1.42"
GETALL = GLib.Variant("(s)", (dbus_service.INTERFACE,))


def test_properties_come_from_the_snapshot() -> None:
    obj = _obj(FakeAgent({"count": 41234, "max": 262144, "buckets": 65536, "usage": 0.157, "fill_rate": 120.0,
                          "time_to_full": None, "last_decision": "raise_max 1→2: r", "policy_path": "/etc/p.toml",
                          "dry_run": True}))
    assert (obj.Count, obj.Max, obj.Buckets) == (41234, 262144, 65536)
    assert (obj.Usage, obj.FillRate, obj.TimeToFull) == (0.157, 120.0, -1.0)
    assert (obj.LastDecision, obj.PolicyPath, obj.DryRun) == ("raise_max 1→2: r", "/etc/p.toml", True)
    assert _obj(FakeAgent({"time_to_full": 12.5})).TimeToFull == 12.5
    assert json.loads(obj.Report)["owned"][0]["original"] == 1009


def test_methods_refuse_non_root_callers() -> None:
    reloads = []
    obj = _obj(reload=lambda: reloads.append(1) or True, uid=1000)
    for call in (obj.Reload, obj.Evaluate):
        with pytest.raises(dbus_service.AccessDenied) as err:
            call(SENDER)
        assert type(err.value).__name__ == "org.freedesktop.DBus.Error.AccessDenied"
        assert "uid 1000" in str(err.value)
    assert reloads == []


def test_an_unidentifiable_caller_is_refused() -> None:
    def lookup(sender):
        raise RuntimeError("bus gone")
    with pytest.raises(dbus_service.AccessDenied):
        _obj(uid=lookup).Reload(SENDER)
    with pytest.raises(dbus_service.AccessDenied):
        _obj().Reload(None)


def test_reload_maps_an_invalid_policy_to_its_own_error() -> None:
    _obj(reload=lambda: True).Reload(SENDER)
    with pytest.raises(dbus_service.PolicyInvalid) as err:
        _obj(reload=lambda: False).Reload(SENDER)
    assert type(err.value).__name__ == "io.github.conntrack_agent1.Error.PolicyInvalid"


def test_internal_errors_become_failed_and_are_logged() -> None:
    failures = []

    def broken():
        raise KeyError("sampler")
    obj = _obj(FakeAgent(evaluate=broken), failures=failures)
    with pytest.raises(dbus_service.Failed) as err:
        obj.Evaluate(SENDER)
    assert type(err.value).__name__ == "org.freedesktop.DBus.Error.Failed"
    assert "KeyError" in str(err.value)
    assert failures and failures[0][0] == "Evaluate"


def test_evaluate_describes_each_decision() -> None:
    plan = [Decision("raise_max", "grow-table", "usage 80% >= 75%", "", False, 1024, 2048),
            Decision("max_at_ceiling", "grow-table", "at the ceiling", "", False, 4096, 4096, is_action=False)]
    lines = _obj(FakeAgent(evaluate=lambda: plan)).Evaluate(SENDER)
    assert lines == ["grow-table: would raise_max 1024→2048: usage 80% >= 75%",
                     "grow-table: notice max_at_ceiling: at the ceiling"]
    assert _obj().Evaluate(SENDER) == ["nothing to do: no rule's trigger holds"]


# ---------------------------------------------------------------------- on a real (private) bus

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

_SERVER = r"""
import sys
from gi.repository import GLib
from conntrack_agent import dbus_service
from conntrack_agent.decisions import Decision

class Agent:
    decision_listeners = []
    def snapshot(self):
        return {"count": 5000, "max": 8192, "buckets": 8192, "usage": 0.61, "fill_rate": 42.0,
                "time_to_full": 76.2, "last_decision": "raise_max 4096→8192: busy", "policy_path": "/p.toml",
                "dry_run": False}
    def report(self):
        return {"owned": [{"name": "nf_conntrack_max", "original": 4096, "applied": 8192}], "rules": []}
    def evaluate(self):
        return [Decision("raise_max", "grow-table", "usage 61%", "", False, 8192, 16384)]

agent = Agent()
published = dbus_service.publish(agent, lambda: False, lambda m, e: None, lambda: None)
def decide():
    for listener in agent.decision_listeners:
        listener(Decision("raise_max", "grow-table", "usage 61%", "web", False, 8192, 16384))
    return True
GLib.timeout_add(100, decide)
print("ready", flush=True)
GLib.MainLoop().run()
"""

_CLIENT = r"""
import json
from gi.repository import Gio, GLib
from conntrack_agent import dbus_service
out = {"snapshot": dbus_service.query_daemon()}
con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
def call(method):
    try:
        reply = con.call_sync(dbus_service.BUS_NAME, dbus_service.OBJECT_PATH, dbus_service.INTERFACE, method,
                              None, None, Gio.DBusCallFlags.NONE, 2000, None)
        return {"ok": reply.unpack()}
    except GLib.Error as e:
        return {"error": Gio.DBusError.get_remote_error(e), "message": e.message}
out["evaluate"] = call("Evaluate")
out["reload"] = call("Reload")
got = []
loop = GLib.MainLoop()
def on_signal(con, sender, path, iface, name, params):
    got.append(params.unpack()); loop.quit()
con.signal_subscribe(dbus_service.BUS_NAME, dbus_service.INTERFACE, "Decision", dbus_service.OBJECT_PATH,
                     None, Gio.DBusSignalFlags.NONE, on_signal)
GLib.timeout_add(3000, loop.quit)
loop.run()
out["signal"] = got[0] if got else None
print(json.dumps(out))
"""


@pytest.fixture
def private_bus(tmp_path: Path):
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.skip("dbus-daemon not installed")
    conf = tmp_path / "bus.conf"
    path = tmp_path / "bus.socket"
    conf.write_text(_BUS_CONFIG.format(path=path))
    proc = subprocess.Popen([daemon, "--config-file", str(conf), "--nofork", "--nopidfile"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while not path.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("private dbus-daemon did not start: %s" % proc.stderr.read().decode())
        time.sleep(0.02)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=%s" % path,
               PYTHONPATH=AGENT_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    yield env
    proc.terminate()
    proc.wait(timeout=5)


def test_on_a_bus_anyone_reads_root_calls_and_decisions_are_signalled(private_bus) -> None:
    server = subprocess.Popen([sys.executable, "-c", _SERVER], env=private_bus, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = json.loads(subprocess.run([sys.executable, "-c", _CLIENT], env=private_bus, capture_output=True,
                                        text=True, timeout=30, check=True).stdout)
        assert json.loads(out["snapshot"].pop("report"))["owned"][0]["original"] == 4096
        assert out["snapshot"] == {"count": 5000, "max": 8192, "buckets": 8192, "usage": 0.61, "fill_rate": 42.0,
                                   "time_to_full": 76.2, "last_decision": "raise_max 4096→8192: busy",
                                   "policy_path": "/p.toml", "dry_run": False}
        if os.geteuid() == 0:
            assert out["evaluate"] == {"ok": [["grow-table: would raise_max 8192→16384: usage 61%"]]}
            assert out["reload"]["error"] == "io.github.conntrack_agent1.Error.PolicyInvalid"
        else:  # the bus policy here allows everything: the refusal is the agent's own check
            assert out["evaluate"]["error"] == "org.freedesktop.DBus.Error.AccessDenied"
            assert out["reload"]["error"] == "org.freedesktop.DBus.Error.AccessDenied"
        assert out["signal"] == ["raise_max", "grow-table", "web", False, 8192, 16384, "usage 61%"]
    finally:
        server.kill()
        server.wait(timeout=5)


_READER = r"""
import sys
from gi.repository import Gio, GLib
from conntrack_agent import dbus_service
con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
left = [int(sys.argv[1])]
loop = GLib.MainLoop()
args = GLib.Variant("(s)", (dbus_service.INTERFACE,))
def issue():
    con.call(dbus_service.BUS_NAME, dbus_service.OBJECT_PATH, "org.freedesktop.DBus.Properties", "GetAll", args,
             None, Gio.DBusCallFlags.NONE, 5000, None, done)
def done(con, result):
    con.call_finish(result)
    left[0] -= 1
    if left[0] <= 0:
        loop.quit()
    elif left[0] >= 16:
        issue()
for _ in range(16):
    issue()
loop.run()
"""


def _rss_mb(pid: int) -> float:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_property_reads_do_not_grow_the_agent(private_bus) -> None:
    """GLib's register_object_with_closures leaks each call's invocation (about
    2 KB) unless the handler drops a reference: 10000 reads would add ~20 MB."""
    server = subprocess.Popen([sys.executable, "-c", _SERVER], env=private_bus, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"

        def read(calls: int) -> None:
            subprocess.run([sys.executable, "-c", _READER, str(calls)], env=private_bus, check=True, timeout=60)
        read(2000)  # caches, arenas, the Python wrappers' first allocations
        before = _rss_mb(server.pid)
        read(10000)
        grown = _rss_mb(server.pid) - before
        assert grown < 3, "%.1f MB for 10000 reads" % grown
    finally:
        server.kill()
        server.wait(timeout=5)


def test_query_daemon_without_a_daemon_is_none(private_bus) -> None:
    code = "from conntrack_agent import dbus_service; print(dbus_service.query_daemon())"
    out = subprocess.run([sys.executable, "-c", code], env=private_bus, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "None", out.stderr


def test_query_daemon_without_a_bus_is_none(tmp_path: Path) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=%s" % (tmp_path / "none"), PYTHONPATH=AGENT_DIR)
    code = "from conntrack_agent import dbus_service; print(dbus_service.query_daemon())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "None", out.stderr


def test_the_bus_policy_file_names_what_the_code_exports() -> None:
    """Who may send what: root and the daemon's user anything; the conntrack-agent
    group the property reads, introspection and ping; anyone else nothing (a flood
    of calls costs the agent memory and its one thread's time). The methods are
    never opened beyond root."""
    import xml.etree.ElementTree as ET

    root = ET.parse(Path(__file__).resolve().parents[2] / "systemd" / "io.github.conntrack_agent1.conf").getroot()
    policies = {tuple(p.attrib.items())[0]: p for p in root.findall("policy")}
    assert set(policies) == {("user", "conntrack-agent"), ("user", "root"), ("context", "default"),
                             ("group", "conntrack-agent")}
    for user in ("conntrack-agent", "root"):
        rules = [(r.tag, r.attrib) for r in policies[("user", user)]]
        assert rules == [("allow", {"own": dbus_service.BUS_NAME}), ("allow", {"send_destination": dbus_service.BUS_NAME})]

    def opened(policy):
        rules = list(policies[policy])
        for rule in rules:
            assert rule.get("send_destination") == dbus_service.BUS_NAME, rule.attrib
            assert rule.get("send_interface") != dbus_service.INTERFACE
        return [(r.tag, r.get("send_interface"), r.get("send_member")) for r in rules]
    assert opened(("context", "default")) == [("deny", None, None)]
    assert opened(("group", "conntrack-agent")) == [
        ("allow", dbus_service.PROPERTIES_INTERFACE, "Get"),
        ("allow", dbus_service.PROPERTIES_INTERFACE, "GetAll"),
        ("allow", "org.freedesktop.DBus.Introspectable", None),
        ("allow", "org.freedesktop.DBus.Peer", None)]


def test_property_reads_are_answered_from_one_snapshot_per_tick() -> None:
    class Counting(FakeAgent):
        calls = 0

        def snapshot(self):
            Counting.calls += 1
            return dict(self._snapshot, count=Counting.calls)

    obj = _obj(Counting({"max": 8192, "usage": 0.5, "time_to_full": None}))
    getall = [obj.call(None, dbus_service.PROPERTIES_INTERFACE, "GetAll", GETALL) for _ in range(100)]
    get = [obj.call(None, dbus_service.PROPERTIES_INTERFACE, "Get", GLib.Variant("(ss)", (dbus_service.INTERFACE, "Max")))
           for _ in range(100)]
    assert Counting.calls == 1
    assert all(reply is getall[0] for reply in getall) and all(reply is get[0] for reply in get)
    props = getall[0].unpack()[0]
    assert json.loads(props.pop("Report"))["owned"][0]["applied"] == 2018
    assert props == {"Count": 1, "Max": 8192, "Buckets": 0, "Usage": 0.5, "FillRate": 0.0,
                     "TimeToFull": -1.0, "LastDecision": "", "PolicyPath": "", "DryRun": False}
    assert get[0].unpack() == (8192,) and obj.Count == 1
    obj.invalidate()  # what the supervisor does after each tick
    assert obj.call(None, dbus_service.PROPERTIES_INTERFACE, "GetAll", GETALL).unpack()[0]["Count"] == 2
    assert Counting.calls == 2
    with pytest.raises(dbus_service.UnknownMethod):
        obj.call(None, dbus_service.INTERFACE, "Frobnicate", GLib.Variant("()", ()))


def test_a_failing_snapshot_is_an_error_logged_once_per_tick() -> None:
    failures = []

    class Broken(FakeAgent):
        def snapshot(self):
            raise KeyError("last_sample")

    obj = _obj(Broken(), failures=failures)
    for _ in range(50):
        with pytest.raises(dbus_service.Failed, match="KeyError"):
            obj.call(None, dbus_service.PROPERTIES_INTERFACE, "GetAll", GETALL)
    assert len(failures) == 1 and isinstance(failures[0][1], KeyError)
    obj.invalidate()
    with pytest.raises(dbus_service.Failed):
        obj.Count
    assert len(failures) == 2


def test_dbus_method_failed_reaches_the_journal_with_its_traceback(dgram_listener) -> None:
    import structlog

    from conntrack_agent import logsetup, mainloop
    from test_journald import receive

    path, sock = dgram_listener

    def evaluate_broken():
        raise KeyError("sampler")

    agent = FakeAgent(evaluate=evaluate_broken)
    loop = mainloop.SelectLoop()
    try:
        logsetup.configure("journal", journal_socket=path)
        agent.log = logsetup.get_logger()
        sup = mainloop.Supervisor(agent, None, loop)
        obj = dbus_service.AgentObject(agent, sup.reload, lambda sender: 0, sup._method_failed)
        with pytest.raises(dbus_service.Failed):
            obj.Evaluate(SENDER)
    finally:
        loop.close()
        structlog.reset_defaults()
    fields = receive(sock)
    assert fields["EVENT"] == "dbus_method_failed" and fields["PRIORITY"] == "3"
    assert fields["MESSAGE"] == "D-Bus Evaluate() failed: KeyError: 'sampler'"
    assert fields["EXCEPTION"].startswith("Traceback (most recent call last):")
    assert "in evaluate_broken" in fields["EXCEPTION"] and fields["EXCEPTION"].endswith("KeyError: 'sampler'")


def test_every_introspected_property_is_implemented() -> None:
    names = [name for name, _ in dbus_service.PROPERTIES]
    assert sorted(dbus_service.SOURCES) == sorted(names)
    for name in names:
        assert isinstance(getattr(dbus_service.AgentObject, name), property), name


# What PyGObject 3.50's C module _gi does when it is imported (Debian 12's 3.42 does
# not): import asyncio and keep two of its names. Played before gi._gi loads, so the
# host's PyGObject shows what dbus_service's import does on Debian 13's.
_GI_350 = r"""
import sys
class Gi350:
    def find_spec(self, name, path, target=None):
        if name == "gi._gi":
            sys.meta_path.remove(self)
            import asyncio
            asyncio.InvalidStateError, asyncio._get_running_loop
        return None
sys.meta_path.insert(0, Gi350())
"""


@pytest.mark.parametrize("logsetup_first", [False, True], ids=["alone", "after-logsetup"])
def test_importing_gi_as_3_50_does_leaves_asyncio_out(logsetup_first: bool) -> None:
    code = _GI_350 + (
        "from conntrack_agent import logsetup\n" if logsetup_first else "") + (
        "before = sys.modules.get('asyncio')\n"
        "from conntrack_agent import dbus_service\n"
        "assert 'gi._gi' in sys.modules and 'Gi350' not in repr(sys.meta_path)\n"
        "assert sys.modules.get('asyncio') is before, sys.modules.get('asyncio')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('asyncio.', '_asyncio'))))\n")
    env = dict(os.environ, PYTHONPATH=AGENT_DIR)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_asyncio_gi_gets_answers_as_asyncio_once_it_is_loaded() -> None:
    code = (
        "import sys\n"
        "from conntrack_agent import dbus_service\n"
        "gi_asyncio = dbus_service._AsyncioForGi('asyncio')\n"
        "assert gi_asyncio._get_running_loop() is None\n"
        "try:\n"
        "    gi_asyncio.get_event_loop_policy()\n"
        "    raise SystemExit('a policy without asyncio')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "import asyncio\n"
        "async def main():\n"
        "    assert gi_asyncio._get_running_loop() is asyncio.get_running_loop()\n"
        "    assert gi_asyncio.get_event_loop_policy() is asyncio.get_event_loop_policy()\n"
        "    return gi_asyncio.sleep\n"      # anything else: asyncio's own
        "assert asyncio.run(main()) is asyncio.sleep\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=AGENT_DIR)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr

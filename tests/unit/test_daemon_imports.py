"""What the daemon imports stays lean: the heavy modules kept out of `conntrack-agent run`.

The idle budget is 25 MB of RSS as the unit runs it (BENCHMARKS.md, "Idle memory
as the unit runs it"), and a single import can silently break it: `secrets` alone
brought hashlib and OpenSSL's libcrypto (+3.7 MB). A fresh interpreter runs the
daemon's own path, as cli.cmd_run does it, on the fake kernel: start, one tick
and its publication (the metrics textfile, the runtime report, the daily peaks),
then lists sys.modules; then the D-Bus module (when PyGObject is there) and
what it adds. Each module named below must be absent (or only one of the
stand-ins logsetup puts in sys.modules for structlog: asyncio, shutil, uuid,
pickle), with what it costs when it comes back (RSS of Debian 12's
/usr/bin/python3, a fresh interpreter importing it alone, unless said otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# module -> why it is kept out (what it costs the daemon, or what it is only for)
KEPT_OUT = {
    "ssl": "TLS: OpenSSL's libssl and libcrypto, +5.3 MB (cli._keep_tls_out)",
    "_ssl": "TLS, as above",
    "hashlib": "OpenSSL's libcrypto, +3.7 MB (journal's temporary names use os.urandom)",
    "_hashlib": "OpenSSL's libcrypto, as above",
    "hmac": "imports hashlib",
    "secrets": "imports hmac and hashlib, +5.2 MB",
    "asyncio.base_events": "asyncio's body, +1.6 MB in the daemon (structlog imports it: logsetup defers it; "
                           "PyGObject 3.50 too: dbus_service answers it)",
    "asyncio.unix_events": "asyncio's body, as above",
    "concurrent.futures": "came with asyncio",
    "subprocess": "came with asyncio; the daemon starts no process",
    "uuid": "structlog's, for its deprecated thread-local classes (logsetup defers it), +0.3 MB",
    "platform": "uuid's, on Python 3.11",
    "pickle": "structlog's, for one exception class (logsetup hands out the same one from _pickle)",
    "http.server": "only with [metrics] listen (metrics_http), +2.7 MB",
    "socketserver": "http.server's",
    "http": "http.server's",
    "email": "http.server's",
    "prometheus_client": "never: the exposition is written by hand (metrics.py), +3.3 MB",
    "conntrack_agent.metrics_http": "only with [metrics] listen",
    "shutil": "argparse asks it for the terminal width (cli._Formatter), structlog 25 imports it (logsetup "
              "defers it); it brings bz2, lzma: +0.5 MB",
    "bz2": "shutil's",
    "lzma": "shutil's",
    "pydbus": "not used: Gio does what dbus_service needs; its import and proxy of the bus daemon, ~1 MB",
    "xml.etree.ElementTree": "pydbus's, for introspection XML",
    "conntrack_agent.evict": "only when an evict rule fires, or `conntrack-agent evict`",
    "conntrack_agent.attribution": "only when an evict rule fires",
    "conntrack_agent.discovery": "only with agent.namespaces = [\"*\"]",
    "conntrack_agent.policywatch": "only with agent.watch_policy",
    "conntrack_agent.uevent": "not in --once; `run` opens its socket before the first probe and keeps it only while "
                              "nf_conntrack is missing (its imports are already loaded: +0 kB measured)",
    "conntrack_agent.sysctld": "only with baseline.from_sysctl_d",
}

_DAEMON = r"""
import json, os, sys
tmp = sys.argv[1]
sys.path.insert(0, sys.argv[2])            # tests/: the fake kernel
from conntrack_agent import cli
cli._keep_tls_out()
from conntrack_agent import logsetup, service
from fakekernel import FakeKernel
logsetup.configure("json", stream=open(os.devnull, "w"))
from conntrack_agent import mainloop, report
policy = os.path.join(tmp, "policy.toml")
textdir = os.path.join(tmp, "node-exporter")
os.mkdir(textdir)
with open(policy, "w") as f:
    f.write('[agent]\nstate_file = "%s/state.json"\n[metrics]\ntextfile = "%s/conntrack_agent.prom"\n'
            % (tmp, textdir))
agent = service.Agent(policy, False, logsetup.get_logger(), kernel=FakeKernel(maximum=1000),
                      report_path=os.path.join(tmp, "report.json"))
status = mainloop.run(agent, None, once=True, use_bus=False)

def loaded():   # None: kept out (ssl); a stand-in of logsetup's: not loaded (yet)
    return sorted(k for k, v in sys.modules.items()
                  if v is not None and not isinstance(v, logsetup._Deferred))

core = loaded()
try:
    from conntrack_agent import dbus_service   # what mainloop.run imports for the D-Bus API
    import gi
    gi_version = gi.__version__
except ImportError:
    gi_version = None
else:
    # PyGObject 3.50's GLib.MainLoop.run asks asyncio for a loop each time it runs
    loop = dbus_service.GLibLoop()
    loop.call_later(0.01, loop.quit)
    loop.run()
    loop.close()
stand_in = type(sys.modules.get("asyncio")).__name__
print(json.dumps({"status": status, "core": core, "bus": sorted(set(loaded()) - set(core)), "gi": gi_version,
                  "textfile": os.path.exists(os.path.join(textdir, "conntrack_agent.prom")),
                  "report": os.path.exists(os.path.join(tmp, "report.json")), "asyncio": stand_in}))
"""


def parse(stdout: str) -> dict:
    """_DAEMON's report (its last line); tests/system/test_deb_install.py runs it in
    the Debian releases too, with their own PyGObject."""
    data = json.loads(stdout.strip().splitlines()[-1])
    assert data["status"] == 0 and data["textfile"] and data["report"], data
    return data


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("daemon")
    proc = subprocess.run([sys.executable, "-c", _DAEMON, str(tmp), str(REPO / "tests")], capture_output=True,
                          text=True, timeout=120, cwd=str(tmp))
    assert proc.returncode == 0, proc.stderr
    return parse(proc.stdout)


def _back(modules):
    return {name: why for name, why in KEPT_OUT.items() if name in set(modules)}


def test_the_daemon_path_imports_none_of_the_heavy_modules(daemon):
    back = _back(daemon["core"])
    assert not back, "the daemon imports modules kept out of it:\n" + "\n".join(
        "  %s: %s" % kv for kv in sorted(back.items()))


def test_the_d_bus_api_imports_none_of_them_either(daemon):
    if daemon["gi"] is None:
        pytest.skip("PyGObject not installed")
    back = _back(daemon["bus"])
    assert not back, "the D-Bus API imports modules kept out of the daemon:\n" + "\n".join(
        "  %s: %s" % kv for kv in sorted(back.items()))


def test_asyncio_is_only_the_stand_in(daemon):
    # structlog binds `asyncio` at import; the daemon never calls its async methods.
    assert daemon["asyncio"] in ("_DeferredAsyncio", "NoneType"), daemon["asyncio"]


def test_the_stand_in_loads_asyncio_on_first_use():
    code = ("import sys; sys.modules['ssl'] = None\n"
            "from conntrack_agent import logsetup\n"
            "import structlog._log_levels as levels\n"
            "assert 'asyncio.base_events' not in sys.modules\n"
            "loop = levels.asyncio.new_event_loop()\n"      # first use: the real module
            "import asyncio\n"
            "assert type(asyncio).__name__ == 'module' and 'asyncio.base_events' in sys.modules\n"
            "assert asyncio.run(asyncio.sleep(0, 'ok')) == 'ok'\n"
            "loop.close(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_structlog_async_methods_still_work():
    # Nothing removed: a caller of structlog's async API gets asyncio on demand.
    code = ("import io, sys\n"
            "from conntrack_agent import logsetup\n"
            "stream = io.StringIO()\n"
            "logsetup.configure('json', stream=stream)\n"
            "import asyncio\n"
            "asyncio.run(logsetup.get_logger().ainfo('hello', x=1))\n"
            "print(stream.getvalue().strip())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert '"event":"hello"' in proc.stdout, proc.stderr


def test_the_other_stand_ins_hand_over_the_real_modules():
    code = ("import sys\n"
            "from conntrack_agent import logsetup\n"
            "import structlog._output, _pickle\n"
            "assert structlog._output.PicklingError is _pickle.PicklingError\n"
            "assert {type(sys.modules[m]).__name__ for m in ('pickle', 'uuid', 'shutil')} <= {'_Deferred', "
            "'_DeferredPickle', 'module'}\n"
            "import pickle, uuid, shutil\n"
            "assert pickle.loads(pickle.dumps([1])) == [1] and pickle.PicklingError is _pickle.PicklingError\n"
            "assert len(str(uuid.uuid4())) == 36 and shutil.get_terminal_size((80, 24)).columns > 0\n"
            "assert all(type(sys.modules[m]).__name__ == 'module' for m in ('pickle', 'uuid', 'shutil'))\n"
            "from uuid import UUID\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr

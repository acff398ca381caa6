"""The Prometheus exposition: exact names, values from the agent's own view, valid text."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import pytest

from conntrack_agent import metrics, service

from test_failure_paths import Rig

# The names the alert rules and the dashboard rely on (README, packaging/prometheus).
GAUGES = {"conntrack_agent_entries", "conntrack_agent_entries_limit", "conntrack_agent_entries_limit_original",
          "conntrack_agent_entries_ceiling", "conntrack_agent_buckets", "conntrack_agent_fill_rate",
          "conntrack_agent_time_to_full_seconds", "conntrack_agent_pressure", "conntrack_agent_timeout_seconds",
          "conntrack_agent_last_action_timestamp_seconds", "conntrack_agent_info"}
COUNTERS = {"conntrack_agent_stat_drop_total", "conntrack_agent_stat_early_drop_total",
            "conntrack_agent_stat_insert_failed_total", "conntrack_agent_stat_clash_resolve_total",
            "conntrack_agent_stat_chaintoolong_total", "conntrack_agent_actions_total",
            "conntrack_agent_evicted_entries_total", "conntrack_agent_external_changes_total"}

SERIES = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def parse(text: str):
    types, series = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            m = SERIES.match(line)
            assert m, line
            series[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return types, series


def storm_and_shorten(tmp_path):
    rig = Rig(tmp_path)
    rig.write_policy()
    rig.start()
    rig.kernel.namespaces[""].counters["drop"] = 7
    rig.set_count(700)
    rig.run_for(1)
    return rig


def test_every_family_has_its_exact_name_and_type(tmp_path):
    rig = storm_and_shorten(tmp_path)
    types, series = parse(rig.agent.metrics_text())
    assert {n for n, k in types.items() if k == "gauge"} == GAUGES
    assert {n for n, k in types.items() if k == "counter"} == COUNTERS
    assert {name for name, _ in series} <= GAUGES | COUNTERS


def test_values_follow_the_agent(tmp_path):
    rig = storm_and_shorten(tmp_path)
    _, series = parse(rig.agent.metrics_text())
    assert series[("conntrack_agent_entries", '{netns=""}')] == 700
    assert series[("conntrack_agent_entries_limit", "")] == 1000
    assert series[("conntrack_agent_entries_limit_original", "")] == 1000   # nothing owned: equal
    assert series[("conntrack_agent_stat_drop_total", '{netns=""}')] == 7
    assert series[("conntrack_agent_timeout_seconds", '{netns="",name="udp_timeout"}')] == 10
    assert series[("conntrack_agent_actions_total", '{rule="shorten",action="set_timeouts",result="ok"}')] == 1
    assert series[("conntrack_agent_pressure", '{netns=""}')] == 1
    assert series[("conntrack_agent_last_action_timestamp_seconds", "")] > 0
    rig.set_count(0)
    rig.run_for(4)
    _, series = parse(rig.agent.metrics_text())
    assert ("conntrack_agent_timeout_seconds", '{netns="",name="udp_timeout"}') not in series
    assert series[("conntrack_agent_time_to_full_seconds", '{netns=""}')] == math.inf
    assert series[("conntrack_agent_actions_total", '{rule="shorten",action="restore_timeouts",result="ok"}')] == 1


def test_a_raised_limit_keeps_its_original(tmp_path):
    from fakekernel import FakeKernel
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')
    rig.start()
    rig.set_count(900)
    rig.run_for(0.1, step=0.05)
    _, series = parse(rig.agent.metrics_text())
    assert series[("conntrack_agent_entries_limit", "")] == kernel.globals["nf_conntrack_max"] > 1000
    assert series[("conntrack_agent_entries_limit_original", "")] == 1000
    assert series[("conntrack_agent_entries_ceiling", "")] >= series[("conntrack_agent_entries_limit", "")]


def test_an_external_change_is_counted(tmp_path):
    from fakekernel import FakeKernel
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')
    rig.start()
    rig.set_count(900)
    rig.run_for(0.1, step=0.05)
    kernel.globals["nf_conntrack_max"] = 1500        # kube-proxy, say
    rig.set_count(10)
    rig.run_for(0.5)
    _, series = parse(rig.agent.metrics_text())
    assert series[("conntrack_agent_external_changes_total", '{sysctl="nf_conntrack_max"}')] == 1


def test_label_values_are_escaped():
    text = metrics.render({"conntrack_agent_entries": [({"netns": 'a"b\\c\nd'}, 1)]})
    assert 'netns="a\\"b\\\\c\\nd"' in text


def test_textfile_is_replaced_atomically_and_never_named_prom_while_written(tmp_path):
    path = tmp_path / "conntrack_agent.prom"
    metrics.write_textfile(str(path), "a 1\n")
    metrics.write_textfile(str(path), "a 2\n")
    assert path.read_text() == "a 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["conntrack_agent.prom"]


# In CI promtool is installed by dev.sh: there a missing one fails the test instead of skipping it.
@pytest.mark.skipif(not shutil.which("promtool") and not os.environ.get("CI"),
                    reason="promtool (Debian's prometheus package) not installed")
def test_promtool_accepts_the_exposition(tmp_path):
    rig = storm_and_shorten(tmp_path)
    out = subprocess.run(["promtool", "check", "metrics"], input=rig.agent.metrics_text(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_listen_serves_the_same_text_over_http_on_loopback(tmp_path):
    import socket
    import urllib.request
    with socket.socket() as probe:          # a free loopback port
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    rig = Rig(tmp_path)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n[metrics]\ntextfile = ""\n'
                          f'listen = "127.0.0.1:{free}"\n')
    rig.start()
    rig.set_count(100)
    rig.run_for(0.5)
    assert rig.agent.status_due()
    try:
        host, port = rig.agent._metrics_server.address[:2]
        # No proxy: Debian's package build sets http_proxy to a black hole (127.0.0.1:9).
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{host}:{port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert body == rig.agent._metrics_latest and "conntrack_agent_entries{netns=\"\"} 100" in body
    finally:
        rig.agent.stop()


def test_no_port_and_no_http_server_import_by_default(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from conntrack_agent import service, cli; "
            "print('http.server' in sys.modules, 'conntrack_agent.metrics_http' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_textfile_written_with_the_status_update_when_its_directory_exists(tmp_path):
    textdir = tmp_path / "textfile"
    rig = Rig(tmp_path)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n[metrics]\n'
                          f'textfile = "{textdir}/conntrack_agent.prom"\n')
    rig.start()
    rig.run_for(0.25)
    assert rig.agent.status_due() and not textdir.exists()      # no directory: nothing, no error
    textdir.mkdir()
    rig.clock.now += 2
    assert rig.agent.status_due() and not textdir.joinpath("conntrack_agent.prom").exists()   # calm: every 15s
    rig.clock.now += service.METRICS_CALM_INTERVAL
    assert rig.agent.status_due()
    assert "conntrack_agent_info{version=" in (textdir / "conntrack_agent.prom").read_text()
    first = (textdir / "conntrack_agent.prom").stat().st_mtime_ns
    rig.set_count(900)                                            # an action: written at once
    rig.run_for(0.1, step=0.05)
    rig.clock.now += 1.0
    assert rig.agent.status_due()
    assert (textdir / "conntrack_agent.prom").stat().st_mtime_ns != first
    assert "raise_max" in (textdir / "conntrack_agent.prom").read_text()


def test_status_check_follows_the_age_of_the_last_tick(tmp_path, monkeypatch, capsys):
    """The liveness probe: alive while ticks finish, not alive once they stop."""
    import time
    from conntrack_agent import cli, report
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    rig = Rig(tmp_path)
    rig.write_policy()
    rig.agent = service_agent = __import__("conntrack_agent.service", fromlist=["Agent"]).Agent(
        str(rig.policy), False, rig.events, clock=rig.clock, kernel=rig.kernel, report_path=report.runtime_path())
    service_agent.start()
    assert cli.main(["status", "--check"]) == 1          # started, no tick finished yet
    rig.run_for(0.25)
    assert service_agent.status_due()
    assert cli.main(["status", "--check"]) == 0
    assert "alive: last tick" in capsys.readouterr().out
    service_agent.last_tick_at -= 200                    # ticks keep failing: the report stays fresh
    rig.clock.now += service.METRICS_CALM_INTERVAL
    assert service_agent.status_due()
    assert cli.main(["status", "--check"]) == 1
    assert "the last tick finished 200s ago" in capsys.readouterr().out
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 120)   # ticks stopped 2 min ago
    assert cli.main(["status", "--check", "--max-age", "1000"]) == 1     # the report itself is stale now


def test_status_from_the_runtime_report_says_how_old_it_is(tmp_path, monkeypatch, capsys):
    """Without D-Bus the report file is rewritten every 15 s when calm: `status` says its age."""
    import time
    from conntrack_agent import cli, dbus_service, report
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setattr(dbus_service, "query_report", lambda: None)
    rig = Rig(tmp_path)
    rig.write_policy()
    rig.agent = service.Agent(str(rig.policy), False, rig.events, clock=rig.clock, kernel=rig.kernel,
                              report_path=report.runtime_path())
    rig.agent.start()

    def run_for(seconds: float) -> None:     # as the supervisor ticks: each tick, then its status
        end = rig.clock.now + seconds
        while rig.clock.now < end:
            rig.agent.tick()
            rig.agent.status_due()
            rig.clock.now += 0.25

    run_for(0.25)
    written = report.read_runtime()["written_at"]
    run_for(service.METRICS_CALM_INTERVAL - 1)
    assert report.read_runtime()["written_at"] == written, "rewritten before its calm interval"
    run_for(1.5)
    assert report.read_runtime()["written_at"] > written, "not rewritten after its calm interval"
    written = report.read_runtime()["written_at"]
    monkeypatch.setattr(time, "time", lambda: written + 12.2)
    assert cli.main(["status", "-c", str(rig.policy)]) == 0
    out = capsys.readouterr().out
    assert "as of: 12s ago" in out and "report.json" in out, out


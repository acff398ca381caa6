"""The fleet view end to end, with the real parts: a storm in a namespace, the agent's
metrics textfile, Debian's prometheus-node-exporter reading it, Debian's Prometheus
scraping it and evaluating the shipped rules. Prometheus itself must then report the
raised-limit alert firing and the metrics with the values the agent acted on.

Root (a namespace with real conntrack entries, a lowered global max restored
afterwards); everything on 127.0.0.1 and in the test's own namespace.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "kernel"))

import prom  # noqa: E402
import rig  # noqa: E402
from test_agent_kernel import AgentProcess  # noqa: E402

pytestmark = pytest.mark.system


def test_prometheus_sees_the_storm_the_agent_answered(tmp_path):
    problems = prom.missing_tools() + ([] if os.geteuid() == 0 else ["root"])
    if problems:
        reason = "needs " + ", ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    low = 20000
    with prom.Stack(tmp_path / "prom") as stack, rig.Namespace() as ns, rig.saved_global_sysctls():
        rig.write_sysctl("nf_conntrack_max", low)
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[agent]\nstate_file = "{tmp_path}/state.json"\nnamespaces = ["{ns.name}"]\n'
                          f'[metrics]\ntextfile = "{stack.textfile_dir}/{prom.TEXTFILE_NAME}"\n')
        agent = AgentProcess(policy, env={"RUNTIME_DIRECTORY": str(tmp_path)})
        try:
            agent.wait_for(lambda e: e.get("event") == "conntrack_available")
            for chunk in range(9):                       # to 90% of the lowered max, visibly
                rig.flood_udp(ns, 2000, ports=(20000 + chunk * 2000, 20000 + chunk * 2000 + 1999))
            raised = agent.wait_for(lambda e: e.get("event") == "raise_max")
            firing = stack.wait_for_alert("ConntrackLimitRaised", timeout=60)

            def value(expr: str) -> float:
                result = stack.wait_for(lambda: stack.query(expr), timeout=30, what=expr)
                return float(result[0]["value"][1])

            assert value("conntrack_agent_entries_limit_original") == low
            assert value("conntrack_agent_entries_limit") >= raised["new"]
            assert value('conntrack_agent_actions_total{action="raise_max",result="ok"}') >= 1
            assert value(f'conntrack_agent_entries{{netns="{ns.name}"}}') > 0.5 * low
            assert value("conntrack_agent_last_action_timestamp_seconds") > 0
            assert firing[0]["labels"]["severity"] == "info"
        finally:
            assert agent.stop() == 0

"""The shipped alert rules and dashboard on Debian's real node-exporter and Prometheus.

tests/system/prom.py starts prometheus-node-exporter (textfile collector on a
directory of the test's) and Prometheus (scraping it every second, evaluating
packaging/prometheus/conntrack-agent.rules.yml every second) on 127.0.0.1.
A hand-made textfile with every metric of the agent's exporter goes into the
directory, as the agent will write it; Prometheus must then see every metric,
load every rule without an error, fire ConntrackLimitRaised (no `for:`), and
evaluate every query of the Grafana dashboard. The agent itself is not
involved: a test with the real exporter belongs with the exporter.

No root needed; nothing leaves 127.0.0.1. Without the two Debian packages the
tests skip, which in CI fails the run (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prom  # noqa: E402

pytestmark = pytest.mark.system

REPO = prom.REPO
DASHBOARD = REPO / "packaging" / "grafana" / "conntrack-agent.json"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[prom.Stack]:
    missing = prom.missing_tools()
    if missing:
        reason = "missing %s (apt-get install prometheus prometheus-node-exporter)" % ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    with prom.Stack(tmp_path_factory.mktemp("prom")) as running:
        # a storm happened: the agent raised max from 262144 to 524288, far below its ceiling
        running.write_textfile(prom.sample_textfile(limit=524288, original=262144, ceiling=4194304))
        # another exporter's file in the same directory, long untouched: not the agent's business
        other = running.write_textfile("other_exporter_up 1\n", name="other.prom")
        os.utime(other, (time.time() - 3600, time.time() - 3600))
        yield running


def _exported_names():
    # the list the unit tests hold the rules and the dashboard to
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    import test_prometheus_rules
    return test_prometheus_rules.EXPORTED


def test_node_exporter_serves_every_metric_of_the_textfile(stack):
    names = set(_exported_names())
    series = stack.wait_for(lambda: stack.query('{__name__=~"conntrack_agent_.*"}'), what="the textfile's metrics")
    seen = {s["metric"]["__name__"] for s in series}
    assert seen == names, "missing %s, unexpected %s" % (sorted(names - seen), sorted(seen - names))
    for sample in series:
        # node-exporter's target labels, the ones the rules and the dashboard select on
        assert sample["metric"]["job"] == "node"
        assert sample["metric"]["instance"] == "127.0.0.1:%d" % stack.node_port
    # and no complaint from the textfile collector about the format
    assert [s["value"][1] for s in stack.query("node_textfile_scrape_error")] == ["0"]


def test_every_rule_loads_and_evaluates_without_error(stack):
    stack.wait_for(lambda: all(r.get("lastEvaluation", "").startswith("20") for r in stack.rules()) and stack.rules(),
                   what="every rule to be evaluated once")
    rules = stack.rules()
    assert {r["name"] for r in rules} == {"ConntrackTableDropping", "ConntrackTableEarlyDrops",
                                          "ConntrackTableInsertFailed", "ConntrackTableFullSoon",
                                          "ConntrackLimitAtCeiling", "ConntrackLimitRaised",
                                          "ConntrackExternalChange", "ConntrackAgentActionFailed",
                                          "ConntrackAgentTextfileStale", "ConntrackAgentDown",
                                          "ConntrackAgentMetricsAbsent"}
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule


def test_raised_limit_alert_fires_with_its_annotations(stack):
    (alert,) = stack.wait_for_alert("ConntrackLimitRaised", timeout=60)
    assert alert["labels"]["severity"] == "info"
    assert alert["labels"]["instance"] == "127.0.0.1:%d" % stack.node_port
    # the template's query for the original value ran against the real TSDB
    assert "raised nf_conntrack_max from 262144 to 524288" in alert["annotations"]["description"], alert
    assert alert["annotations"]["runbook_url"].endswith("RUNBOOK.md#conntracklimitraised")


def test_quiet_alerts_stay_quiet(stack):
    stack.wait_for_alert("ConntrackLimitRaised", timeout=60)  # the rules have run on the textfile
    active = {a["labels"]["alertname"] for a in stack.alerts()}
    # max is far below the ceiling, nothing dropped, the table is not filling, the
    # agent's file is fresh (the stale other.prom is not the agent's), info present
    assert active == {"ConntrackLimitRaised"}, active


def test_stale_textfile_alert_fires_on_the_real_file_label(stack):
    # node-exporter labels the file as it names it; the rule's regex must match that
    path = stack.textfile_dir / prom.TEXTFILE_NAME
    stack.wait_for(lambda: stack.query('node_textfile_mtime_seconds{file=~".*conntrack_agent\\\\.prom"}'),
                   what="the textfile's mtime")
    old = time.time() - 600
    os.utime(path, (old, old))
    try:
        (alert,) = stack.wait_for_alert("ConntrackAgentTextfileStale", timeout=60)
        assert alert["labels"]["file"].endswith(prom.TEXTFILE_NAME)
    finally:
        now = time.time()
        os.utime(path, (now, now))
    stack.wait_for(lambda: not [a for a in stack.alerts() if a["labels"]["alertname"] == "ConntrackAgentTextfileStale"],
                   what="the stale alert to resolve once the file is fresh")


def test_every_dashboard_query_evaluates(stack):
    dashboard = json.loads(DASHBOARD.read_text())
    instance = "127.0.0.1:%d" % stack.node_port
    # as Grafana interpolates a multi-value variable into a regex matcher: escaped
    # for the regex, and the backslashes escaped again for the PromQL string
    variables = {"$__rate_interval": "1m", "$__interval": "15s",
                 "$instance": re.escape(instance).replace("\\", "\\\\")}
    queries = []
    for panel in dashboard["panels"]:
        queries += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    queries += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if a.get("expr")]
    empty = []
    for where, expr in queries:
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, "%s: a variable this test does not know: %s" % (where, expr)
        try:
            result = stack.query(expr)  # a PromQL error raises
        except prom.StackError as exc:
            raise AssertionError("%s: %s: %s" % (where, expr, exc)) from None
        if not result:
            empty.append(where)
    # queries that select this node's textfile return something (the annotations
    # and rates may be empty on a fresh TSDB)
    assert "Entries and limits" not in empty and "Usage" not in empty and "Metrics age" not in empty, empty
    variable = dashboard["templating"]["list"][0]["query"]["query"]
    metric = re.fullmatch(r"label_values\((\w+), instance\)", variable).group(1)
    assert {s["metric"]["instance"] for s in stack.query(metric)} == {instance}

"""The Prometheus alert rules and the Grafana dashboard in packaging/.

The rules go through Prometheus's own tool: `promtool check rules` and
`promtool test rules` with packaging/prometheus/conntrack-agent.rules.test.yml
(input series for each alert, cases where it fires and where it must not).
Mutations of the rules then show that those cases bite: each alert made to
never fire, to fire unconditionally, or without its `for:` must fail the tests.

The dashboard and the rules may only query the metrics the agent's exporter
produces (the list below, with their labels), node-exporter's
node_textfile_mtime_seconds and Prometheus's up: a renamed metric fails here,
not silently on a dashboard.

promtool comes from Debian's `prometheus` package (dev.sh installs it). Without
it the promtool tests skip on a developer's machine and fail in CI (CI set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest
import yaml  # PyYAML: python3-yaml on Debian, python3-pyyaml on Fedora/RHEL

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "packaging" / "prometheus"
RULES = PROMETHEUS / "conntrack-agent.rules.yml"
RULES_TEST = PROMETHEUS / "conntrack-agent.rules.test.yml"
RUNBOOK = PROMETHEUS / "RUNBOOK.md"
DASHBOARD = ROOT / "packaging" / "grafana" / "conntrack-agent.json"

# What the agent's exporter writes, with each metric's own labels. Prometheus
# adds the target's labels (instance, job) to every series.
EXPORTED: Dict[str, Set[str]] = {
    "conntrack_agent_entries": {"netns"},
    "conntrack_agent_entries_limit": set(),
    "conntrack_agent_entries_limit_original": set(),
    "conntrack_agent_entries_ceiling": set(),
    "conntrack_agent_buckets": set(),
    "conntrack_agent_fill_rate": {"netns"},
    "conntrack_agent_time_to_full_seconds": {"netns"},
    "conntrack_agent_pressure": {"netns"},
    "conntrack_agent_timeout_seconds": {"netns", "name"},
    "conntrack_agent_last_action_timestamp_seconds": set(),
    "conntrack_agent_info": {"version"},
    "conntrack_agent_stat_drop_total": {"netns"},
    "conntrack_agent_stat_early_drop_total": {"netns"},
    "conntrack_agent_stat_insert_failed_total": {"netns"},
    "conntrack_agent_stat_clash_resolve_total": {"netns"},
    "conntrack_agent_stat_chaintoolong_total": {"netns"},
    "conntrack_agent_actions_total": {"rule", "action", "result"},
    "conntrack_agent_evicted_entries_total": {"rule"},
    "conntrack_agent_external_changes_total": {"sysctl"},
}
OTHERS: Dict[str, Set[str]] = {
    "node_textfile_mtime_seconds": {"file"},  # node-exporter's textfile collector
    "up": set(),                              # Prometheus, per scrape target
}
TARGET_LABELS = {"instance", "job"}
KNOWN = dict(EXPORTED, **OTHERS)

ALERTS = {
    "ConntrackTableDropping", "ConntrackTableEarlyDrops", "ConntrackTableInsertFailed",
    "ConntrackTableFullSoon", "ConntrackLimitAtCeiling", "ConntrackLimitRaised",
    "ConntrackExternalChange", "ConntrackAgentActionFailed", "ConntrackAgentTextfileStale",
    "ConntrackAgentDown", "ConntrackAgentMetricsAbsent",
}

# --------------------------------------------------------------------------- PromQL selectors

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"([A-Za-z_:][\w:]*)?\s*(\{[^{}]*\})?(\s*\()?")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"\"")


def selectors(expr: str) -> List[Tuple[str, Set[str]]]:
    """(metric name, label names matched) of every vector selector in a PromQL
    expression; Grafana's $variables allowed. Not a full parser: enough for the
    expressions here, and tested below on the shapes they use."""
    text = _STRING.sub('""', expr)                      # label values, regexes
    text = re.sub(r"\[[^\]]*\]", " ", text)             # ranges, subqueries ([$__rate_interval])
    text = re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", "0", text)   # Grafana variables outside strings
    text = _GROUPING.sub(" ", text)                     # by (...), on (...), group_left (...)
    found = []
    for match in _TOKEN.finditer(text):
        name, braces, call = match.groups()
        if not name and not braces:
            continue
        if name and (call or name.lower() in _KEYWORDS):
            continue  # a function, an aggregation or a keyword
        if name and re.fullmatch(r"\d.*", name):
            continue
        labels = set(_MATCHER.findall(braces or ""))
        found.append((name or "", labels))
    return found


def test_selectors_finds_names_and_labels_in_the_shapes_used():
    # the checks below are only as good as this: it must see through functions,
    # aggregations, grouping, strings, ranges and Grafana's variables
    assert selectors('sum by (netns) (rate(conntrack_agent_stat_drop_total{instance=~"$instance"}[$__rate_interval]))') \
        == [("conntrack_agent_stat_drop_total", {"instance"})]
    assert selectors('conntrack_agent_entries / ignoring(netns) group_left conntrack_agent_entries_limit') \
        == [("conntrack_agent_entries", set()), ("conntrack_agent_entries_limit", set())]
    assert selectors('time() - node_textfile_mtime_seconds{file=~".*conntrack_agent\\\\.prom"} > 300') \
        == [("node_textfile_mtime_seconds", {"file"})]
    assert selectors('absent(conntrack_agent_info) or up{job="x", instance!="a{b}"} == bool 0') \
        == [("conntrack_agent_info", set()), ("up", {"job", "instance"})]
    assert selectors('{__name__=~"conntrack_.*"}') == [("", {"__name__"})]
    assert selectors('conntrack_agent_last_action_timestamp_seconds{instance=~"${instance:regex}"} * 1000') \
        == [("conntrack_agent_last_action_timestamp_seconds", {"instance"})]


def unknown_names(expr: str) -> List[str]:
    """What in an expression is not a known metric, or matches a label it does not have."""
    problems = []
    for name, labels in selectors(expr):
        if name not in KNOWN:
            problems.append("unknown metric %r" % name)
        elif labels - KNOWN[name] - TARGET_LABELS:
            problems.append("%s has no label %s" % (name, sorted(labels - KNOWN[name] - TARGET_LABELS)))
    return problems


def test_unknown_names_catches_a_typo_and_a_wrong_label():
    assert unknown_names('rate(conntrack_agent_stat_drop_total[5m])') == []
    assert unknown_names('rate(conntrack_agent_stat_drops_total[5m])') == ["unknown metric 'conntrack_agent_stat_drops_total'"]
    assert unknown_names('conntrack_agent_entries_limit{netns="web"}') == ["conntrack_agent_entries_limit has no label ['netns']"]


# --------------------------------------------------------------------------- the rules


def _rules() -> List[Dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _alerts() -> Dict[str, Dict[str, Any]]:
    alerts = {}
    for rule in _rules():
        assert "alert" in rule, "only alerting rules here: %r" % rule
        assert rule["alert"] not in alerts, "duplicate alert %s" % rule["alert"]
        alerts[rule["alert"]] = rule
    return alerts


def test_the_alerts_are_there():
    assert set(_alerts()) == ALERTS


def test_every_alert_has_severity_summary_description_and_a_runbook_section():
    runbook = RUNBOOK.read_text()
    # GitHub's anchors for "## Name" headings: lower case
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        url = annotations["runbook_url"]
        assert url.startswith("https://github.com/conntrack-agent/conntrack-agent/blob/main/packaging/prometheus/RUNBOOK.md#"), url
        anchor = url.split("#", 1)[1]
        assert anchor == name.lower() and anchor in anchors, "RUNBOOK.md needs a section '## %s'" % name
        # the section says how to check, with the tools named in it
        section = runbook.split("## " + name, 1)[1].split("\n## ", 1)[0]
        for heading in ("What it means", "How to check", "What to do"):
            assert heading in section, "%s: RUNBOOK.md section lacks %r" % (name, heading)


def test_rules_query_only_the_exported_metrics():
    for name, rule in _alerts().items():
        assert unknown_names(rule["expr"]) == [], name
        assert selectors(rule["expr"]), name


def test_the_shipped_thresholds():
    alerts = _alerts()
    # what the alerts promise in their descriptions and RUNBOOK.md
    assert alerts["ConntrackTableFullSoon"]["expr"].strip() == "conntrack_agent_time_to_full_seconds < 60"
    assert alerts["ConntrackTableFullSoon"]["for"] == "2m"
    assert alerts["ConntrackAgentDown"]["for"] == "5m"
    assert "> 300" in alerts["ConntrackAgentTextfileStale"]["expr"]
    # the raised-limit alert is information, at once: no `for:` to wait out
    assert alerts["ConntrackLimitRaised"]["labels"]["severity"] == "info"
    assert "for" not in alerts["ConntrackLimitRaised"]
    for counter in ("drop", "early_drop", "insert_failed"):
        assert any("increase(conntrack_agent_stat_%s_total[5m]) > 0" % counter == a["expr"].strip()
                   for a in alerts.values()), counter


# --------------------------------------------------------------------------- promtool


def _promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
    if path is None:
        reason = "promtool not found (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)  # CI installs it: a skip there would hide a broken rule
        pytest.skip(reason)
    return path


def _run(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool()] + list(args), cwd=str(cwd), capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    proc = _run("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: %d rules found" % len(ALERTS) in proc.stdout


def test_promtool_unit_tests_pass():
    proc = _run("test", "rules", RULES_TEST.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    """Statically: each alert has an eval with expected alerts and one with none."""
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing: Set[str] = set()
    quiet: Set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == ALERTS and quiet == ALERTS


def _unconditional(expr: str) -> str:
    """The expression without its final comparison: every series it selects is active."""
    match = re.match(r"^(.*?)\s*(?:>=|<=|==|!=|>|<)\s*[^<>=!]+$", expr.strip(), re.S)
    if match:
        return match.group(1)
    assert expr.startswith("absent("), expr
    return "vector(1)"  # absent() unconditionally: present with no labels


MUTATIONS = {
    "never fires": lambda rule: rule.update(expr="vector(1) < 0"),
    "always fires": lambda rule: rule.update(expr=_unconditional(rule["expr"])),
    "no for": lambda rule: rule.pop("for"),
}
MUTANTS = [(alert, kind) for alert in sorted(ALERTS) for kind in MUTATIONS
           if kind != "no for" or "for" in _alerts()[alert]]


@pytest.fixture(scope="module")
def mutant_runs(tmp_path_factory) -> Dict[Tuple[str, str], Tuple[int, str]]:
    """(alert, mutation) -> (promtool's exit status, output), for every mutant.

    Each mutant is a copy of the rules with one alert changed, tested with the
    cases of the test file that evaluate that alert (the rest cannot notice);
    the promtool runs go in parallel, a few at a time."""
    tests = yaml.safe_load(RULES_TEST.read_text())
    jobs = []
    for alert, kind in MUTANTS:
        work = tmp_path_factory.mktemp("mutant")
        data = yaml.safe_load(RULES.read_text())
        for group in data["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    MUTATIONS[kind](rule)
        (work / RULES.name).write_text(yaml.safe_dump(data, sort_keys=False))
        groups = []
        for group in tests["tests"]:
            cases = [c for c in group.get("alert_rule_test", []) if c["alertname"] == alert]
            if cases:
                groups.append(dict(group, alert_rule_test=cases))
        (work / RULES_TEST.name).write_text(yaml.safe_dump(dict(tests, tests=groups), sort_keys=False))
        jobs.append(((alert, kind), work))
    promtool = _promtool()
    results: Dict[Tuple[str, str], Tuple[int, str]] = {}
    width = max(2, os.cpu_count() or 2)
    for start in range(0, len(jobs), width):
        running = [(key, subprocess.Popen([promtool, "test", "rules", RULES_TEST.name], cwd=str(work),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                   for key, work in jobs[start:start + width]]
        for key, proc in running:
            out, _ = proc.communicate(timeout=120)
            results[key] = (proc.returncode, out)
    return results


@pytest.mark.parametrize("alert,kind", MUTANTS, ids=["%s-%s" % (a, k.replace(" ", "-")) for a, k in MUTANTS])
def test_the_unit_tests_catch_a_mutated_alert(alert, kind, mutant_runs):
    # never fires: the alert has a firing case; always fires: a quiet case with
    # series it selects; no for: a case inside the for: window
    returncode, out = mutant_runs[(alert, kind)]
    assert returncode != 0 and "alertname: %s," % alert in out, out


# --------------------------------------------------------------------------- the Grafana dashboard


@pytest.fixture(scope="module")
def dashboard() -> Dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # valid JSON, or this fails


def _panels(dashboard: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def _queries(dashboard: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(where, query) for every PromQL query: panel targets and annotations."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield "panel %r" % panel.get("title"), target
    for annotation in dashboard["annotations"]["list"]:
        if annotation.get("expr"):
            yield "annotation %r" % annotation["name"], annotation


def test_dashboard_is_an_importable_model(dashboard):
    # The import form asks for the Prometheus data source and substitutes it.
    (source,) = dashboard["__inputs"]
    assert source == {"name": "DS_PROMETHEUS", "label": "Prometheus", "description": source.get("description", ""),
                      "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}
    assert any(r["type"] == "datasource" and r["id"] == "prometheus" for r in dashboard["__requires"])
    assert dashboard["uid"] and dashboard["title"] and dashboard.get("id") is None
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_data_source_is_the_input(dashboard):
    def refs(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)
    found = list(refs({k: v for k, v in dashboard.items() if k != "__inputs"}))
    assert found
    for ref in found:
        # Grafana's built-in annotation source ("-- Grafana --") is the one exception
        if isinstance(ref, dict) and ref.get("type") == "grafana":
            continue
        assert ref == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, ref


def test_node_variable_selects_instances_of_the_agent(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    node = variables["instance"]
    assert node["type"] == "query"
    query = node["query"]["query"] if isinstance(node["query"], dict) else node["query"]
    match = re.fullmatch(r"label_values\((.+),\s*instance\)", query)
    assert match and unknown_names(match.group(1)) == [], query
    assert node["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_every_query_uses_only_the_exported_metrics_and_is_per_node(dashboard):
    queries = list(_queries(dashboard))
    assert len(queries) >= 10
    for where, query in queries:
        expr = query["expr"]
        assert unknown_names(expr) == [], "%s: %s" % (where, expr)
        for name, labels in selectors(expr):
            assert "instance" in labels, "%s: %s is not filtered by $instance" % (where, name)
        assert '"$instance"' in expr or "'$instance'" in expr, "%s: %s" % (where, expr)


def test_dashboard_shows_what_it_promises(dashboard):
    exprs = " ".join(q["expr"] for _, q in _queries(dashboard))
    names = {name for _, q in _queries(dashboard) for name, _ in selectors(q["expr"])}
    for needed in ("conntrack_agent_entries", "conntrack_agent_entries_limit", "conntrack_agent_entries_limit_original",
                   "conntrack_agent_entries_ceiling", "conntrack_agent_fill_rate", "conntrack_agent_time_to_full_seconds",
                   "conntrack_agent_stat_drop_total", "conntrack_agent_stat_early_drop_total",
                   "conntrack_agent_stat_insert_failed_total", "conntrack_agent_actions_total"):
        assert needed in names, needed
    assert "rate(conntrack_agent_stat_drop_total" in exprs
    # the agent's actions appear as annotations on the time series
    actions = [a for a in dashboard["annotations"]["list"] if "conntrack_agent_actions_total" in a.get("expr", "")]
    assert any(a["enable"] and 'result!="dry_run"' in a["expr"] for a in actions)  # on by default: real actions
    assert all("{{rule}}" in a["titleFormat"] and "rule" in a["tagKeys"] for a in actions)

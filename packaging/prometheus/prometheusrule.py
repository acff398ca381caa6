#!/usr/bin/env python3
"""Write the alert rules as a Prometheus Operator PrometheusRule.

    python3 packaging/prometheus/prometheusrule.py           # rewrite the manifest
    python3 packaging/prometheus/prometheusrule.py --check   # exit 1 if it is out of date

The manifest (packaging/kubernetes/components/prometheusrule/prometheusrule.yaml)
is conntrack-agent.rules.yml under `spec:`, text and comments included, so the
two cannot drift: tests/unit/test_kubernetes.py fails when they differ.
Standard library only.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "conntrack-agent.rules.yml"
MANIFEST = HERE.parent / "kubernetes" / "components" / "prometheusrule" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from packaging/prometheus/conntrack-agent.rules.yml by
# packaging/prometheus/prometheusrule.py: edit the rules file, then run the script.
#
# The agent's alert rules for the Prometheus Operator. The operator loads a
# PrometheusRule only if it matches the Prometheus's ruleSelector (and
# ruleNamespaceSelector): kube-prometheus-stack selects the label
# `release: <its Helm release>`; add it with kustomize (labels:) or here.
# Runbook: packaging/prometheus/RUNBOOK.md.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: conntrack-agent
  namespace: conntrack-agent
  labels:
    app.kubernetes.io/name: conntrack-agent
spec:
"""


def render(rules_text: str) -> str:
    """HEADER, then the rules file from its `groups:` line on, indented under spec."""
    lines = rules_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main(argv: list) -> int:
    expected = render(RULES.read_text())
    if argv[1:] == ["--check"]:
        if not MANIFEST.exists() or MANIFEST.read_text() != expected:
            print("%s is out of date: run %s" % (MANIFEST, Path(__file__).name), file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    MANIFEST.write_text(expected)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

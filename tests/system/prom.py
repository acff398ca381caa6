"""Debian's prometheus-node-exporter and prometheus on 127.0.0.1, for tests.

    with prom.Stack(tmp_path, rule_files=[prom.RULES]) as stack:
        (stack.textfile_dir / "conntrack_agent.prom").write_text(...)   # or let the agent write it
        stack.wait_for_alert("ConntrackLimitRaised")
        stack.query('conntrack_agent_entries_limit')

Both run on this host (not in a container), as the caller's user, listening on
free ports of 127.0.0.1 only: node-exporter with the textfile collector alone
(on a directory of the test's), Prometheus scraping it as job "node" every
second, evaluating the given rule files every second, its TSDB in the test's
directory. ``agent_targets`` adds a job "conntrack-agent" scraping those
host:port targets' /metrics (the agent's listen mode). Everything is stopped
and the processes reaped on exit, also on failure; their logs are in the
stack's directory and quoted in errors.

The Prometheus HTTP API is read with urllib: /api/v1/query, /api/v1/alerts,
/api/v1/rules, /api/v1/targets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "packaging" / "prometheus" / "conntrack-agent.rules.yml"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"   # Debian's prometheus-node-exporter
PROMETHEUS = "/usr/bin/prometheus"                     # Debian's prometheus
TEXTFILE_NAME = "conntrack_agent.prom"                 # the agent's file in the textfile directory
LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    pass


def missing_tools() -> List[str]:
    return [p for p in (NODE_EXPORTER, PROMETHEUS) if not os.access(p, os.X_OK)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> bytes:
    if not url.startswith("http://%s:" % LOOPBACK):
        raise StackError("only loopback here: %s" % url)  # nothing of this leaves the host
    # No proxy, whatever the environment says: everything here is on 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:  # noqa: S310 - loopback http only
        return response.read()


class _Process:
    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.argv = list(argv)
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Stack:
    """node-exporter (textfile collector) and Prometheus on loopback; a context manager."""

    def __init__(self, workdir: Path, rule_files: Sequence[Path] = (RULES,), interval: str = "1s",
                 agent_targets: Sequence[str] = ()) -> None:
        self.dir = Path(workdir)
        self.textfile_dir = self.dir / "textfile"
        self.rule_files = [Path(p) for p in rule_files]
        self.interval = interval
        self.agent_targets = list(agent_targets)
        self.node_port = 0
        self.prom_port = 0
        self.node_exporter: Optional[_Process] = None
        self.prometheus: Optional[_Process] = None

    # life ---------------------------------------------------------------------

    def __enter__(self) -> "Stack":
        missing = missing_tools()
        if missing:
            raise StackError("missing %s (apt-get install prometheus prometheus-node-exporter)" % ", ".join(missing))
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self.textfile_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a port taken between free_port() and the bind: try others
            self.node_port = free_port()
            self.node_exporter = _Process(
                [NODE_EXPORTER, "--web.listen-address=%s:%d" % (LOOPBACK, self.node_port),
                 "--collector.disable-defaults", "--collector.textfile",
                 "--collector.textfile.directory=%s" % self.textfile_dir],
                self.dir / "node-exporter.log")
            if self._wait_http("http://%s:%d/metrics" % (LOOPBACK, self.node_port), self.node_exporter):
                break
            self.node_exporter.stop()
        else:
            raise StackError("node-exporter did not start:\n" + self.node_exporter.tail())

        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "node",
                                "static_configs": [{"targets": ["%s:%d" % (LOOPBACK, self.node_port)]}]}],
        }
        if self.agent_targets:
            config["scrape_configs"].append({"job_name": "conntrack-agent",
                                             "static_configs": [{"targets": self.agent_targets}]})
        # JSON is YAML: no YAML library needed
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        for attempt in range(3):
            self.prom_port = free_port()
            self.prometheus = _Process(
                [PROMETHEUS, "--config.file=%s" % (self.dir / "prometheus.yml"),
                 "--storage.tsdb.path=%s" % (self.dir / "tsdb"),
                 "--web.listen-address=%s:%d" % (LOOPBACK, self.prom_port),
                 "--web.console.templates=%s" % (self.dir / "consoles"),
                 "--web.console.libraries=%s" % (self.dir / "console_libraries")],
                self.dir / "prometheus.log")
            if self._wait_http(self.url("/-/ready"), self.prometheus, timeout=60):
                break
            self.prometheus.stop()
        else:
            raise StackError("prometheus did not start:\n" + self.prometheus.tail())

    def _wait_http(self, url: str, process: _Process, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                return False
            try:
                http_get(url, timeout=2)
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        return False

    def close(self) -> None:
        for process in (self.prometheus, self.node_exporter):
            if process is not None:
                process.stop()
        self.prometheus = self.node_exporter = None

    def logs(self) -> str:
        parts = []
        for name in ("prometheus.log", "node-exporter.log"):
            path = self.dir / name
            if path.exists():
                parts.append("--- %s:\n%s" % (name, path.read_text(errors="replace")[-3000:]))
        return "\n".join(parts)

    # the textfile ------------------------------------------------------------------

    def write_textfile(self, text: str, name: str = TEXTFILE_NAME) -> Path:
        """Write a .prom file as an exporter must: to a temporary name, then rename
        (node-exporter never reads half a file)."""
        path = self.textfile_dir / name
        tmp = self.textfile_dir / (".%s.tmp" % name)
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    # the HTTP API ----------------------------------------------------------------

    def url(self, path: str, **params: str) -> str:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        return "http://%s:%d%s%s" % (LOOPBACK, self.prom_port, path, query)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>: the "data" of a successful answer; errors raise StackError."""
        try:
            body = json.loads(http_get(self.url("/api/v1/" + path, **params)))
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise StackError("%s: %s: %s" % (path, body.get("errorType"), body.get("error")))
        return body["data"]

    def query(self, expr: str) -> List[Dict[str, Any]]:
        """An instant query: [{"metric": {...}, "value": [t, "v"]}, ...] (vector results)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def alerts(self) -> List[Dict[str, Any]]:
        """Active alerts: pending and firing, with labels, annotations and state."""
        return self.api("alerts")["alerts"]

    def rules(self) -> List[Dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for process in (self.prometheus, self.node_exporter):
                if process is not None and not process.alive():
                    raise StackError("%s exited while waiting for %s:\n%s" % (process.argv[0], what, self.logs()))
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise StackError("timed out after %ss waiting for %s" % (timeout, what))
            time.sleep(0.25)

    def wait_for_alert(self, name: str, state: str = "firing", timeout: float = 60) -> List[Dict[str, Any]]:
        """The active alerts called ``name`` in ``state``, once there is one."""
        return self.wait_for(lambda: [a for a in self.alerts()
                                      if a["labels"].get("alertname") == name and a["state"] == state],
                             timeout=timeout, what="alert %s %s" % (name, state))


def sample_textfile(limit: int = 524288, original: int = 262144, ceiling: int = 4194304, entries: int = 1000,
                    netns: str = "", version: str = "0.1.0") -> str:
    """A hand-made textfile with every metric of the agent's exporter (the names
    and labels the rules and the dashboard use), in the text exposition format."""
    ns = 'netns="%s"' % netns
    metrics = [
        ("conntrack_agent_entries", "gauge", "Conntrack entries in the namespace.", [(ns, entries)]),
        ("conntrack_agent_entries_limit", "gauge", "nf_conntrack_max.", [("", limit)]),
        ("conntrack_agent_entries_limit_original", "gauge",
         "nf_conntrack_max before the agent raised it.", [("", original)]),
        ("conntrack_agent_entries_ceiling", "gauge", "The highest nf_conntrack_max the agent may set.", [("", ceiling)]),
        ("conntrack_agent_buckets", "gauge", "nf_conntrack_buckets.", [("", 65536)]),
        ("conntrack_agent_fill_rate", "gauge", "Fill rate, entries per second.", [(ns, 12.5)]),
        ("conntrack_agent_time_to_full_seconds", "gauge", "Predicted time to a full table.", [(ns, "+Inf")]),
        ("conntrack_agent_pressure", "gauge", "1 while the namespace is under pressure.", [(ns, 0)]),
        ("conntrack_agent_timeout_seconds", "gauge", "Conntrack timeouts the agent changed.",
         [(ns + ',name="nf_conntrack_udp_timeout"', 10)]),
        ("conntrack_agent_last_action_timestamp_seconds", "gauge", "When the agent last acted.", [("", time.time())]),
        ("conntrack_agent_info", "gauge", "The agent's version.", [('version="%s"' % version, 1)]),
        ("conntrack_agent_stat_drop_total", "counter", "Packets dropped for a full table.", [(ns, 0)]),
        ("conntrack_agent_stat_early_drop_total", "counter", "Entries evicted early.", [(ns, 0)]),
        ("conntrack_agent_stat_insert_failed_total", "counter", "Failed inserts.", [(ns, 0)]),
        ("conntrack_agent_stat_clash_resolve_total", "counter", "Resolved insert clashes.", [(ns, 0)]),
        ("conntrack_agent_stat_chaintoolong_total", "counter", "Inserts refused for a long chain.", [(ns, 0)]),
        ("conntrack_agent_actions_total", "counter", "Actions taken.",
         [('rule="grow-table",action="raise_max",result="ok"', 1)]),
        ("conntrack_agent_evicted_entries_total", "counter", "Entries evicted.", [('rule="evict-stale"', 0)]),
        ("conntrack_agent_external_changes_total", "counter", "Values another writer changed.",
         [('sysctl="nf_conntrack_max"', 0)]),
    ]
    lines = []
    for name, kind, help_text, samples in metrics:
        lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]
        lines += ["%s%s %s" % (name, "{%s}" % labels if labels else "", value) for labels, value in samples]
    return "\n".join(lines) + "\n"

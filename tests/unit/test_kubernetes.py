"""The DaemonSet and ConfigMap in packaging/kubernetes/ carry what the agent relies on.

Structural checks with PyYAML: the command line, the node's network namespace,
the privileges to write /proc/sys, the policy mounted where the agent reads it
(and valid), the state file on the node. tests/system/test_packages.py also
validates the manifests against the Kubernetes API schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml  # PyYAML: python3-yaml on Debian, python3-pyyaml on Fedora/RHEL

from conntrack_agent import cli, config

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "packaging" / "kubernetes"


def _documents() -> List[Dict[str, Any]]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str) -> Dict[str, Any]:
    found = [d for d in _documents() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def daemonset() -> Dict[str, Any]:
    return _one("DaemonSet")


@pytest.fixture(scope="module")
def pod(daemonset) -> Dict[str, Any]:
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def agent(pod) -> Dict[str, Any]:
    (container,) = pod["containers"]
    return container


def _mount(agent: Dict[str, Any], pod: Dict[str, Any], path: str) -> Dict[str, Any]:
    mounts = [m for m in agent.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"nothing mounted at {path}"
    volume = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volume) == 1, f"no volume {mounts[0]['name']}"
    return dict(volume[0], mount=mounts[0])


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    manifests = sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == manifests


def test_everything_in_one_namespace_that_allows_privileged_pods():
    namespace = _one("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for doc in _documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["kind"]


def test_daemonset_selects_its_own_pods(daemonset):
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_command_line_is_json_logs_without_dbus(agent):
    args = agent.get("command", []) + agent["args"]
    parsed = cli.build_parser().parse_args(args)  # the real parser accepts it
    assert parsed.command == "run"
    assert parsed.log_format == "json"  # no journald in a pod: JSON to stdout/stderr
    assert parsed.no_dbus is True      # no system bus in a pod
    assert parsed.dry_run is False and parsed.once is False
    assert parsed.config is None       # the default path, where the ConfigMap is mounted


def test_node_network_namespace_and_privileges(pod, agent):
    # max and buckets are writable only from the initial network namespace
    assert pod["hostNetwork"] is True
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    security = agent["securityContext"]
    # /proc/sys is read-only in a container unless it is privileged
    assert security["privileged"] is True
    assert security.get("allowPrivilegeEscalation") is not False  # privileged implies it


def test_runs_on_every_node(pod):
    assert {"operator": "Exists"} in pod["tolerations"]
    assert "nodeSelector" not in pod and "affinity" not in pod


def test_resources_are_small_and_bounded(agent):
    resources = agent["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[section]), section

    def mebibytes(value: str) -> float:
        units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
        return float(value[:-2]) * units[value[-2:]]

    def millicores(value: str) -> float:
        return float(value[:-1]) if value.endswith("m") else float(value) * 1000

    assert mebibytes(resources["limits"]["memory"]) <= 256
    assert millicores(resources["limits"]["cpu"]) <= 1000
    assert mebibytes(resources["requests"]["memory"]) <= mebibytes(resources["limits"]["memory"])


def test_policy_configmap_is_mounted_where_the_agent_reads_it(pod, agent, tmp_path):
    volume = _mount(agent, pod, str(config.ETC_DIR))
    assert volume["mount"].get("readOnly") is True
    configmap = _one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    items = {i["key"]: i["path"] for i in volume["configMap"].get("items", [])}
    assert items == {config.MAIN_NAME: config.MAIN_NAME}
    assert config.MAIN_NAME in configmap["data"]
    # what the agent then finds with no --config, in a pod holding this mount
    mounted = tmp_path / volume["mount"]["mountPath"].lstrip("/")
    mounted.mkdir(parents=True)
    for key, name in items.items():
        (mounted / name).write_text(configmap["data"][key])
    files = config.policy_files(None, etc_dir=tmp_path / str(config.ETC_DIR).lstrip("/"),
                                vendor_dir=tmp_path / "usr-lib-nothing")
    assert files == [str(mounted / config.MAIN_NAME)]


def test_configmap_policy_is_valid_and_fits_a_pod(tmp_path, capsys):
    text = _one("ConfigMap")["data"][config.MAIN_NAME]
    policy = config.loads(text.encode(), "configmap")
    assert policy.agent.log_format == "json"
    assert policy.agent.namespaces == ()  # hostNetwork: the node's own table
    # `conntrack-agent check` accepts it as the admin would run it
    path = tmp_path / config.MAIN_NAME
    path.write_text(text)
    assert cli.main(["check", "-c", str(path)]) == 0
    assert "policy ok" in capsys.readouterr().out
    # the shipped rules are all there, by name
    assert {r.name for r in policy.rules} >= {r.name for r in config.DEFAULT_RULES}


def test_state_file_is_on_the_node(pod, agent):
    text = _one("ConfigMap")["data"][config.MAIN_NAME]
    state_file = Path(config.loads(text.encode()).agent.state_file)
    volume = _mount(agent, pod, str(state_file.parent))
    assert volume["hostPath"]["path"] == str(state_file.parent)
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    assert not volume["mount"].get("readOnly")

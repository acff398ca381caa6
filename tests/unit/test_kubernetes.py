"""The DaemonSet and ConfigMap in packaging/kubernetes/ carry what the agent relies on.

Structural checks with PyYAML: the command line, the node's network namespace,
the privileges to write /proc/sys, the policy mounted where the agent reads it
(and valid), the state file on the node. tests/system/test_packages.py also
validates the manifests against the Kubernetes API schemas.
"""

from __future__ import annotations

import os
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


# --------------------------------------------------------------------------- monitoring options
#
# The base above applies on any cluster. The monitoring options live in
# directories of their own, because they need the Prometheus Operator's CRDs:
#   components/prometheusrule/  the alert rules as a PrometheusRule (a kustomize Component)
#   textfile/                   overlay: the agent's textfile on a hostPath node-exporter reads
#   podmonitor/                 overlay: the agent's /metrics port and a PodMonitor
# No kustomize binary is available offline here, so render() below does what
# kustomize does for the subset these files use (resources, components,
# strategic-merge patches by kind and name) and refuses anything else: a new
# kustomize feature in these files fails the test instead of being half-checked.

PROMETHEUS = ROOT / "packaging" / "prometheus"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # Debian's node-exporter default; where the agent writes
METRICS_PORT = 9469
MONITORING = "monitoring.coreos.com/v1"
_RENDERED_FIELDS = {"apiVersion", "kind", "resources", "components", "patches"}


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch, for the fields used here: maps merge, lists of
    named items (containers, volumes, volumeMounts) and ports merge by their key,
    other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) for i in base + patch):
        key = "name" if all("name" in i for i in base + patch) else \
            "containerPort" if all("containerPort" in i for i in base + patch) else None
        if key:
            out = list(base)
            for item in patch:
                found = [n for n, b in enumerate(out) if b[key] == item[key]]
                if found:
                    out[found[0]] = _merge(out[found[0]], item)
                else:
                    out.append(item)
            return out
    return patch


def render(directory: Path) -> List[Dict[str, Any]]:
    """The objects `kustomize build directory` would produce (see above)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= _RENDERED_FIELDS, "render() does not know %s" % (set(kustomization) - _RENDERED_FIELDS)
    docs: List[Dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            assert path.parent == directory.resolve(), "kustomize loads files only inside %s: %s" % (directory, resource)
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    patches = [directory / p["path"] for p in kustomization.get("patches", [])]
    for component in kustomization.get("components", []):
        path = (directory / component).resolve()
        inner = yaml.safe_load((path / "kustomization.yaml").read_text())
        assert inner["kind"] == "Component" and inner["apiVersion"] == "kustomize.config.k8s.io/v1alpha1", component
        assert set(inner) <= _RENDERED_FIELDS, component
        for resource in inner.get("resources", []):
            docs += [d for d in yaml.safe_load_all((path / resource).read_text()) if d]
        patches += [path / p["path"] for p in inner.get("patches", [])]
    for patch_path in patches:
        patch = yaml.safe_load(patch_path.read_text())
        targets = [n for n, d in enumerate(docs) if d["kind"] == patch["kind"]
                   and d["metadata"]["name"] == patch["metadata"]["name"]
                   and d["metadata"].get("namespace") == patch["metadata"].get("namespace")]
        assert len(targets) == 1, "%s patches nothing" % patch_path
        docs[targets[0]] = _merge(docs[targets[0]], patch)
    return docs


def _kind(docs: List[Dict[str, Any]], kind: str) -> Dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, "expected one %s, found %d" % (kind, len(found))
    return found[0]


def _container(daemonset: Dict[str, Any]) -> Dict[str, Any]:
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def test_render_merges_like_kustomize():
    # the emulation itself: named items merge, new ones append, scalars replace
    base = {"spec": {"containers": [{"name": "a", "image": "x", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]}}
    patch = {"spec": {"containers": [{"name": "a", "image": "y", "volumeMounts": [{"name": "w", "mountPath": "/w"}]}],
                      "volumes": [{"name": "w", "hostPath": {"path": "/w"}}]}}
    merged = _merge(base, patch)
    assert merged["spec"]["containers"] == [{"name": "a", "image": "y", "volumeMounts": [
        {"name": "v", "mountPath": "/v"}, {"name": "w", "mountPath": "/w"}]}]
    assert [v["name"] for v in merged["spec"]["volumes"]] == ["v", "w"]
    assert _merge([{"containerPort": 1, "name": "p"}], [{"containerPort": 2, "name": "q"}]) == \
        [{"containerPort": 1, "name": "p"}, {"containerPort": 2, "name": "q"}]
    by_kind = lambda docs: sorted(docs, key=lambda d: d["kind"])  # noqa: E731
    assert by_kind(render(KUBE)) == by_kind(_documents())  # the base renders to its own files


def test_base_stays_free_of_the_operators_crds():
    # `kubectl apply -k packaging/kubernetes` must work on a cluster without the Prometheus Operator
    assert all(d["apiVersion"] != MONITORING for d in render(KUBE))


def test_prometheusrule_is_the_rules_file():
    import importlib.util
    spec = importlib.util.spec_from_file_location("prometheusrule", PROMETHEUS / "prometheusrule.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    manifest = KUBE / "components" / "prometheusrule" / "prometheusrule.yaml"
    assert generator.MANIFEST == manifest
    rules_text = (PROMETHEUS / "conntrack-agent.rules.yml").read_text()
    # text: what the generator writes, comments included (run it after editing the rules)
    assert manifest.read_text() == generator.render(rules_text), \
        "out of date: python3 packaging/prometheus/prometheusrule.py"
    rule = yaml.safe_load(manifest.read_text())
    assert rule["spec"] == yaml.safe_load(rules_text)  # and the same rules once parsed
    assert (rule["apiVersion"], rule["kind"]) == (MONITORING, "PrometheusRule")
    assert rule["metadata"]["namespace"] == _one("Namespace")["metadata"]["name"]
    # and the check mode notices a stale manifest
    assert generator.render(rules_text.replace("severity: critical", "severity: page")) != manifest.read_text()


@pytest.mark.parametrize("overlay", ["textfile", "podmonitor"])
def test_overlays_are_the_base_plus_the_rules(overlay):
    docs = render(KUBE / overlay)
    base = render(KUBE)
    kinds = sorted(d["kind"] for d in docs)
    extra = {"textfile": ["PrometheusRule"], "podmonitor": ["PodMonitor", "PrometheusRule"]}[overlay]
    assert kinds == sorted([d["kind"] for d in base] + extra)
    namespace = _one("Namespace")["metadata"]["name"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["kind"]
    # nothing but the DaemonSet changed, and the agent's command line did not
    for doc in docs:
        if doc["kind"] in ("Namespace", "ConfigMap"):
            assert doc in base
    assert _container(_kind(docs, "DaemonSet"))["args"] == _container(_kind(base, "DaemonSet"))["args"]


def test_textfile_overlay_shares_the_directory_with_node_exporter():
    daemonset = _kind(render(KUBE / "textfile"), "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    volume = _mount(_container(daemonset), pod, TEXTFILE_DIR)  # where the agent writes its .prom file
    assert volume["hostPath"] == {"path": TEXTFILE_DIR, "type": "DirectoryOrCreate"}
    assert not volume["mount"].get("readOnly")  # the agent writes there; its root file system is read-only
    # the node-exporter side: the same host directory, read by the textfile collector
    values = yaml.safe_load((KUBE / "textfile" / "node-exporter-values.yaml").read_text())
    (mount,) = [m for m in values["extraHostVolumeMounts"] if m["hostPath"] == TEXTFILE_DIR]
    assert "--collector.textfile.directory=%s" % mount["mountPath"] in values["extraArgs"]
    assert mount["readOnly"] is True


def test_podmonitor_scrapes_the_agent_pods_as_the_rules_expect():
    docs = render(KUBE / "podmonitor")
    daemonset = _kind(docs, "DaemonSet")
    monitor = _kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == MONITORING
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [daemonset["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p for p in _container(daemonset)["ports"]}
    assert ports[endpoint["port"]]["containerPort"] == METRICS_PORT and endpoint["path"] == "/metrics"
    # job: the value of the pod label jobLabel names; ConntrackAgentDown watches up{job="conntrack-agent"}
    job = pod_labels[monitor["spec"]["jobLabel"]]
    rules = yaml.safe_load((PROMETHEUS / "conntrack-agent.rules.yml").read_text())
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "ConntrackAgentDown"]
    assert 'up{job="%s"}' % job in down["expr"]
    # instance: the node's name, one per node for the dashboard's node variable
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "instance",
            "action": "replace"} in endpoint["relabelings"]


@pytest.mark.parametrize("overlay", ["textfile", "podmonitor"])
def test_patched_daemonset_matches_the_api_schema(overlay):
    try:
        import kubernetes_validate
    except ImportError as exc:  # in the test extra; not in the deb build's environment
        if os.environ.get("CI"):
            pytest.fail("%s (pip install kubernetes-validate)" % exc, pytrace=False)
        pytest.skip(str(exc))
    for doc in render(KUBE / overlay):
        if doc["apiVersion"] != MONITORING:  # CRDs: no schema offline, checked above
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)

"""The built packages: the .deb through lintian, the RPMs through rpm -qp and rpmlint,
the Kubernetes manifests through the API schemas, and the Containerfile's steps.

The .deb and RPMs come from packaging/build-deb.sh and build-rpm.sh (cached per
tree by pkgbuild.py). The RPMs are built on Debian with Debian's rpm; nothing
here installs them on an RPM distribution (packaging/README.md says so).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import pkgbuild  # noqa: E402

pytestmark = pytest.mark.system

REPO = pkgbuild.REPO
README = REPO / "packaging" / "README.md"
MODULES = sorted(p.name for p in (REPO / "agent" / "conntrack_agent").glob("*.py"))
POLICY = "/etc/conntrack-agent/policy.toml"
# Installed path -> the file in the tree: the alert rules and the dashboard, shipped
# for the admin to load (packaging/README.md, "Monitoring").
MONITORING = {"/usr/share/conntrack-agent/prometheus/conntrack-agent.rules.yml":
              REPO / "packaging/prometheus/conntrack-agent.rules.yml",
              "/usr/share/conntrack-agent/prometheus/RUNBOOK.md":
              REPO / "packaging/prometheus/RUNBOOK.md",
              "/usr/share/conntrack-agent/grafana/conntrack-agent.json":
              REPO / "packaging/grafana/conntrack-agent.json"}


def _assert_monitoring_files(root: Path) -> None:
    for path, source in MONITORING.items():
        shipped = root / path.lstrip("/")
        assert shipped.is_file(), path
        assert shipped.read_bytes() == source.read_bytes(), "%s differs from %s" % (path, source)


def _need(tools) -> None:
    missing = pkgbuild.missing(tools)
    if missing:
        reason = "missing tools: " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


# --------------------------------------------------------------------------- deb


@pytest.fixture(scope="module")
def deb() -> Path:
    _need(pkgbuild.DEB_TOOLS)
    return pkgbuild.build_deb()


def _lintian_tags(output: str) -> Dict[str, List[str]]:
    """severity letter -> tags, from lintian's lines 'X: package[ type]: tag [context]'."""
    tags: Dict[str, List[str]] = {}
    for line in output.splitlines():
        match = re.match(r"^([EWIPXOCM]): conntrack-agent(?: \w+)?: (\S+)", line)
        if match:
            tags.setdefault(match.group(1), []).append(match.group(2))
    return tags


def test_lintian_has_no_errors_or_warnings_and_every_remark_is_explained(deb):
    changes = sorted(deb.parent.glob("conntrack-agent_*.changes"))
    assert len(changes) == 1
    verdict = pkgbuild.run(["lintian", "--fail-on", "error,warning", "--pedantic", str(changes[0])], check=False)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    # (a second run to list the overridden tags too: with --show-overrides, lintian
    # 2.116 also exits 2 for an overridden warning)
    proc = pkgbuild.run(["lintian", "--display-info", "--show-overrides", "--pedantic", str(changes[0])],
                        check=False)
    tags = _lintian_tags(proc.stdout)
    assert not tags.get("E") and not tags.get("W"), proc.stdout + proc.stderr
    # info, pedantic and overridden tags: each is explained in packaging/README.md
    readme = README.read_text()
    unexplained = sorted({t for letter in ("I", "P", "O", "X") for t in tags.get(letter, []) if t not in readme})
    assert not unexplained, "explain these lintian tags in packaging/README.md: %s" % unexplained


def _control(deb: Path) -> Dict[str, str]:
    out = pkgbuild.run(["dpkg-deb", "-f", str(deb)]).stdout
    fields: Dict[str, str] = {}
    for line in out.splitlines():
        if line[:1] not in (" ", "\t") and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def test_deb_depends_on_debian_packages_only_where_needed(deb):
    fields = _control(deb)
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3-structlog (>= 22.1)" in depends
    assert not any("pyroute2" in d for d in depends)  # a test dependency only
    assert any(d.startswith("python3-tomli") and "python3 (>> 3.11)" in d for d in depends)
    assert any(d.startswith("systemd") and "sysusers" in d for d in depends)  # dh_installsysusers
    assert [r.strip() for r in fields["Recommends"].split(",")] == ["python3-gi", "python3-pydbus"]
    assert fields["Architecture"] == "all"


def test_deb_contents(deb):
    listing = pkgbuild.run(["dpkg-deb", "-c", str(deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in ("/usr/bin/conntrack-agent", POLICY, "/etc/conntrack-agent/policy.d/",
                 "/lib/systemd/system/conntrack-agent.service",
                 "/usr/share/dbus-1/system.d/io.github.conntrack_agent1.conf",
                 "/usr/lib/systemd/catalog/conntrack-agent.catalog",
                 "/usr/lib/sysusers.d/conntrack-agent.conf", "/usr/lib/tmpfiles.d/conntrack-agent.conf",
                 "/usr/share/man/man8/conntrack-agent.8.gz", "/usr/share/man/man5/conntrack-agent.toml.5.gz",
                 "/usr/share/doc/conntrack-agent/examples/watch-named-netns.conf",
                 "/usr/share/doc/conntrack-agent/examples/watch-all-netns.conf",
                 "/usr/share/doc/conntrack-agent/copyright"):
        assert path in paths, path
    for module in MODULES:
        assert "/usr/lib/python3/dist-packages/conntrack_agent/" + module in paths, module
    assert not any("__pycache__" in p or p.startswith("/usr/local") for p in paths)
    info = pkgbuild.run(["dpkg-deb", "--info", str(deb), "conffiles"]).stdout.split()
    assert info == [POLICY]


def test_deb_ships_the_alert_rules_and_dashboard_as_in_the_tree(deb, tmp_path):
    pkgbuild.run(["dpkg-deb", "-x", str(deb), str(tmp_path)])
    _assert_monitoring_files(tmp_path)
    listing = pkgbuild.run(["dpkg-deb", "-c", str(deb)]).stdout
    modes = {line.split()[-1].lstrip("."): line.split()[0] for line in listing.splitlines()}
    for path in MONITORING:
        assert modes[path] == "-rw-r--r--", (path, modes[path])


def test_deb_maintainer_scripts_order(deb, tmp_path):
    pkgbuild.run(["dpkg-deb", "-e", str(deb), str(tmp_path)])
    postinst = (tmp_path / "postinst").read_text()
    # the user exists and the bus has re-read its policy before the service starts
    sysusers = postinst.index("systemd-sysusers")
    assert sysusers < postinst.index("deb-systemd-invoke reload dbus.service") < postinst.index("deb-systemd-invoke $_dh_action")
    assert "deb-systemd-helper enable 'conntrack-agent.service'" in postinst
    assert re.search(r"_dh_action=restart", postinst)  # upgrade: restart
    prerm = (tmp_path / "prerm").read_text()
    assert prerm.index("deb-systemd-invoke stop 'conntrack-agent.service'") < \
        prerm.index("/usr/bin/conntrack-agent restore")
    postrm = (tmp_path / "postrm").read_text()
    assert "rm -rf /var/lib/conntrack-agent" in postrm
    for script in ("postinst", "prerm", "postrm"):
        assert pkgbuild.run(["sh", "-n", str(tmp_path / script)]).returncode == 0


def test_version_override(deb):
    version = pkgbuild.changelog_version() + pkgbuild.UPGRADE_SUFFIX  # the install test's build, cached
    other = pkgbuild.build_deb(version)
    assert other.name == "conntrack-agent_%s_all.deb" % version
    assert _control(other)["Version"] == version
    compare = pkgbuild.run(["dpkg", "--compare-versions", version, "gt", _control(deb)["Version"]], check=False)
    assert compare.returncode == 0


# --------------------------------------------------------------------------- rpm


@pytest.fixture(scope="module")
def rpms() -> Dict[str, Path]:
    _need(pkgbuild.RPM_TOOLS)
    return pkgbuild.build_rpms()


def _rpm_q(path: Path, *args: str) -> str:
    return pkgbuild.run(["rpm", "-qp"] + list(args) + [str(path)]).stdout


def _scriptlets(path: Path) -> Dict[str, str]:
    out = _rpm_q(path, "--scripts")
    parts = re.split(r"^(\w+) scriptlet \(using /bin/sh\):$", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_rpm_requires_distribution_packages_and_no_generated_ones(rpms):
    requires = _rpm_q(rpms["rpm"], "--requires").splitlines()
    assert "python3-structlog >= 22.1" in requires
    assert not any("pyroute2" in r or "dist(" in r for r in requires), requires
    assert requires.count("systemd") >= 3  # Requires(post/preun/postun): the scriptlets call it
    assert "python3-tomli" not in requires  # built for Python 3.11 here
    assert sorted(_rpm_q(rpms["rpm"], "--recommends").split()) == ["python3-gobject", "python3-pydbus"]


def test_rpm_requires_tomli_below_python_311():
    _need(pkgbuild.RPM_TOOLS)
    spec = str(REPO / "packaging/rpm/conntrack-agent.spec")
    macros = str(REPO / "packaging/rpm/macros.debian")
    sources = ["--define", "_sourcedir %s" % (REPO / "systemd/sysusers.d")]
    rhel9 = pkgbuild.run(["rpmspec", "-q", "--requires", "--load", macros, "--define", "python3_version_nodots 39",
                          "--define", "SOURCE1 /dev/null"] + sources + [spec]).stdout.split()
    fedora = pkgbuild.run(["rpmspec", "-q", "--requires", "--load", macros, "--define", "python3_version_nodots 313",
                           "--define", "SOURCE1 /dev/null"] + sources + [spec]).stdout.split()
    assert "python3-tomli" in rhel9 and "python3-tomli" not in fedora


def test_rpm_scriptlets(rpms):
    scripts = _scriptlets(rpms["rpm"])
    assert set(scripts) == {"preinstall", "postinstall", "preuninstall", "postuninstall"}
    pre = scripts["preinstall"]
    assert "systemd-sysusers --replace=/usr/lib/sysusers.d/conntrack-agent.conf -" in pre
    assert "u conntrack-agent " in pre  # the sysusers line itself, inline
    post = scripts["postinstall"]
    assert "$1 -eq 1" in post and "install-system-units conntrack-agent.service" in post
    preun = scripts["preuninstall"]
    assert "$1 -eq 0" in preun
    assert preun.index("remove-system-units conntrack-agent.service") < \
        preun.index("/usr/bin/conntrack-agent restore") < preun.index("rm -rf /var/lib/conntrack-agent")
    postun = scripts["postuninstall"]
    assert "$1 -ge 1" in postun and "mark-restart-system-units conntrack-agent.service" in postun
    assert "restore" not in postun
    for name, body in scripts.items():
        proc = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)


def test_rpm_files_and_flags(rpms):
    rows = _rpm_q(rpms["rpm"], "--qf", r"[%{FILEFLAGS:fflags}|%{FILEMODES:perms}|%{FILENAMES}\n]").splitlines()
    files = {}
    for row in rows:
        flags, perms, name = row.split("|", 2)
        files[name] = (flags, perms)
    assert len(files) > 30, rows
    config = {name for name, (flags, _) in files.items() if "c" in flags}
    assert config == {POLICY}
    assert "n" in files[POLICY][0]  # %config(noreplace)
    assert files["/usr/bin/conntrack-agent"][1] == "-rwxr-xr-x"
    site = [n for n in files if re.match(r"/usr/lib/python3\.\d+/site-packages/conntrack_agent/[^/]+\.py$", n)]
    assert sorted(os.path.basename(n) for n in site) == MODULES
    for name in ("/usr/lib/systemd/system/conntrack-agent.service",
                 "/usr/share/dbus-1/system.d/io.github.conntrack_agent1.conf",
                 "/usr/lib/systemd/catalog/conntrack-agent.catalog", "/usr/lib/sysusers.d/conntrack-agent.conf",
                 "/usr/lib/tmpfiles.d/conntrack-agent.conf", "/etc/conntrack-agent", "/etc/conntrack-agent/policy.d"):
        assert name in files, name
    docs = {name for name, (flags, _) in files.items() if "d" in flags}
    assert {"/usr/share/man/man8/conntrack-agent.8.gz", "/usr/share/man/man5/conntrack-agent.toml.5.gz"} <= docs
    assert any(n.endswith("/watch-named-netns.conf") for n in docs)


def test_rpm_ships_the_alert_rules_and_dashboard_as_in_the_tree(rpms, tmp_path):
    cpio = subprocess.run("rpm2cpio %s | cpio -idm --quiet" % shlex.quote(str(rpms["rpm"])), shell=True,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert cpio.returncode == 0, cpio.stderr
    _assert_monitoring_files(tmp_path)
    rows = _rpm_q(rpms["rpm"], "--qf", r"[%{FILEFLAGS:fflags}|%{FILEMODES:perms}|%{FILENAMES}\n]").splitlines()
    files = {name: (flags, perms) for flags, perms, name in (row.split("|", 2) for row in rows)}
    for path in MONITORING:
        assert files[path] == ("", "-rw-r--r--"), (path, files[path])  # neither %config nor %doc
    assert "/usr/share/conntrack-agent" in files  # the directory is the package's own


def test_srpm_carries_the_spec_and_sources(rpms):
    names = _rpm_q(rpms["srpm"], "-l").split()
    version = _rpm_q(rpms["rpm"], "--qf", "%{VERSION}").strip()
    assert sorted(names) == sorted(["conntrack-agent.spec", "conntrack-agent.sysusers",
                                    "conntrack-agent-%s.tar.gz" % version])


def test_rpmlint_is_clean(rpms):
    spec = REPO / "packaging/rpm/conntrack-agent.spec"
    proc = pkgbuild.run(["rpmlint", "-c", str(REPO / "packaging/rpm/rpmlint.toml"), str(spec),
                         str(rpms["srpm"]), str(rpms["rpm"])], check=False)
    found = re.findall(r"^\S+: ([EW]): (\S+)", proc.stdout, re.M)
    assert proc.returncode == 0 and not found, proc.stdout + proc.stderr
    assert "2 packages and 1 specfiles checked" in proc.stdout


# --------------------------------------------------------------------------- kubernetes


def test_kubernetes_manifests_match_the_api_schemas():
    try:
        import kubernetes_validate
        import yaml
    except ImportError as exc:
        reason = "%s (pip install kubernetes-validate: it ships the API schemas, works offline)" % exc
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    # The oldest version still common in managed clusters, and the newest known.
    versions = ["1.27.0", kubernetes_validate.latest_version()]
    checked = 0
    for path in sorted((REPO / "packaging/kubernetes").glob("*.yaml")):
        if path.name == "kustomization.yaml":  # a kustomize file, not an API object
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            for version in versions:
                kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
                checked += 1
    assert checked == 3 * len(versions)
    # and the validator does reject a typo (strict: unknown fields)
    bad = yaml.safe_load((REPO / "packaging/kubernetes/daemonset.yaml").read_text())
    bad["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, versions[-1], strict=True)


# --------------------------------------------------------------------------- Containerfile


def containerfile_steps(path: Path) -> List[tuple]:
    """(instruction, argument) pairs of a Containerfile, continuation lines joined."""
    steps, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        instruction, _, argument = current.strip().partition(" ")
        steps.append((instruction.upper(), argument.strip()))
        current = ""
    return steps


# Instructions the emulation below understands; a Containerfile using another
# one fails the test rather than being half-checked.
KNOWN = {"FROM", "COPY", "RUN", "ENV", "ENTRYPOINT", "CMD"}
# debootstrap's minbase is what debian:bookworm-slim is made of; the include is
# a no-op (apt is in minbase) that gives this image its own cache key.
SLIM_IMAGE = ("apt",)


def test_containerfile_steps_make_a_working_image(deb, tmp_path):
    """No OCI builder or registry is reachable here: run the Containerfile's steps
    in a minbase Debian 12 root (what bookworm-slim is) with systemd-nspawn, then
    the image's entrypoint and command, as a pod would (plus --once --dry-run)."""
    import json

    import nspawn
    import rig

    rig.require_root()
    if nspawn.missing_tools():
        reason = "missing tools: " + ", ".join(nspawn.missing_tools())
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    steps = containerfile_steps(REPO / "packaging/Containerfile")
    assert steps[0] == ("FROM", "debian:bookworm-slim")
    assert {i for i, _ in steps} <= KNOWN, "emulate the new instruction here: %s" % ({i for i, _ in steps} - KNOWN)
    script = ["set -eu", "cd /"]
    entrypoint: List[str] = []
    command: List[str] = []
    for instruction, argument in steps[1:]:
        if instruction == "COPY":
            *sources, dest = shlex.split(argument)
            script += ["cp /context/%s %s" % (s, shlex.quote(dest)) for s in sources]
        elif instruction == "RUN":
            script.append(argument)
        elif instruction == "ENV":
            script.append("export " + argument)
        elif instruction == "ENTRYPOINT":
            entrypoint = json.loads(argument)
        elif instruction == "CMD":
            command = json.loads(argument)
    # the DaemonSet's args replace CMD: they must be the same here
    import yaml
    pod = yaml.safe_load((REPO / "packaging/kubernetes/daemonset.yaml").read_text())["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == command
    policy = yaml.safe_load((REPO / "packaging/kubernetes/configmap.yaml").read_text())["data"]["policy.toml"]
    (tmp_path / "policy.toml").write_text(policy)

    argv = [shlex.quote(a) for a in entrypoint + command + ["--once", "--dry-run"]]
    script += [
        "dpkg-query -W -f '${Package}\\n' > /tmp/packages",
        "cp /kube/policy.toml /etc/conntrack-agent/policy.toml",  # as the ConfigMap mount does
        "%s check" % shlex.quote(entrypoint[0]),
        "%s > /tmp/stdout 2> /tmp/stderr; echo $? > /tmp/rc" % " ".join(argv),
        "echo ===packages; cat /tmp/packages; echo ===rc; cat /tmp/rc; echo ===log; cat /tmp/stdout /tmp/stderr",
    ]
    root = nspawn.ensure_image(SLIM_IMAGE)
    proc = subprocess.run(
        ["systemd-nspawn", "--quiet", "--ephemeral", "--register=no", "--keep-unit", "-D", str(root),
         "--bind-ro=%s:/context" % deb.parent, "--bind-ro=%s:/kube" % tmp_path, "--pipe",
         "sh", "-c", "\n".join(script)],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="0"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sections = dict(re.findall(r"^===(\w+)\n(.*?)(?=^===|\Z)", proc.stdout, re.M | re.S))
    packages = set(sections["packages"].split())
    assert "conntrack-agent" in packages and "python3-structlog" in packages
    assert not packages & {"systemd", "python3-gi", "python3-pydbus", "dbus"}, "the image should stay slim"
    assert sections["rc"].strip() == "0", sections["log"]
    events = [json.loads(line) for line in sections["log"].splitlines() if line.startswith("{")]
    assert events, sections["log"]
    assert any(e.get("event") == "agent_started" for e in events), events
    assert "policy ok: " + POLICY in proc.stdout

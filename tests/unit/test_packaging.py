"""The deb and rpm packaging stay in step with the tree: versions, files, config flags.

Static checks of packaging/debian and packaging/rpm/conntrack-agent.spec; the
builds themselves, lintian, rpmlint and `rpm -qp` are in
tests/system/test_packages.py, the install under systemd in test_deb_install.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "packaging" / "debian"
SPEC = ROOT / "packaging" / "rpm" / "conntrack-agent.spec"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _pyproject_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def _debian_version() -> str:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"conntrack-agent \(([^)]+)\) \S+; urgency=\w+$", first)
    assert match, first
    return match.group(1)


def _spec_tag(name: str) -> str:
    match = re.search(rf"^{name}:\s*(\S+)", SPEC.read_text(), re.M)
    assert match, name
    return match.group(1)


SECTIONS = ("%description", "%prep", "%build", "%install", "%check", "%pre", "%post", "%preun", "%postun",
            "%files", "%changelog")


def _spec_section(name: str) -> str:
    """The body of one spec section (up to the next section header)."""
    out: List[str] = []
    inside = False
    for line in SPEC.read_text().splitlines():
        header = line.split()[0] if line.split() else ""
        if header in SECTIONS:
            inside = line.strip() == name
            continue
        if inside:
            out.append(line)
    assert out, f"no {name} section"
    return "\n".join(out)


def _debian_list(name: str) -> List[List[str]]:
    lines = (DEBIAN / name).read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


def test_versions_agree():
    upstream = _pyproject_version()
    assert _debian_version().rsplit("-", 1)[0] == upstream
    assert _spec_tag("Version") == upstream


def test_debian_sources_exist():
    for name in ("conntrack-agent.install", "conntrack-agent.manpages", "conntrack-agent.examples"):
        for entry in _debian_list(name):
            assert (ROOT / entry[0]).is_file(), f"{name}: {entry[0]} does not exist"


def test_spec_sources_exist():
    sources = re.findall(r"^install -D -p -m \d+ (\S+) ", SPEC.read_text(), re.M)
    assert len(sources) >= 6
    for source in sources:
        if not source.startswith("%{"):
            assert (ROOT / source).is_file(), source


def _debian_installed() -> Dict[str, str]:
    """source path -> destination directory, from the deb's lists."""
    out = {e[0]: e[1] for e in _debian_list("conntrack-agent.install")}
    out.update({e[0]: "usr/share/man" for e in _debian_list("conntrack-agent.manpages")})
    out.update({e[0]: "usr/share/doc/conntrack-agent/examples" for e in _debian_list("conntrack-agent.examples")})
    return out


def test_every_shipped_system_file_is_packaged_by_both():
    """A new file under systemd/ (a unit, a drop-in, a policy) must reach both packages."""
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "systemd").rglob("*")
                     if p.is_file() and p.suffix not in (".md", ".py"))
    assert shipped, "systemd/ is empty"
    deb = _debian_installed()
    spec = SPEC.read_text()
    for path in shipped + ["config/policy.toml"]:
        assert path in deb, f"{path} is not installed by the deb"
        in_spec = path in spec or (path.startswith("systemd/sysusers.d/") and "%{SOURCE1}" in spec)
        assert in_spec, f"{path} is not installed by the rpm"


def _monitoring_files() -> List[str]:
    return sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "packaging" / "prometheus").glob("*.rules.yml"),
                                                     ROOT / "packaging" / "prometheus" / "RUNBOOK.md",
                                                     *(ROOT / "packaging" / "grafana").glob("*.json")])


def test_alert_rules_and_dashboards_are_packaged_by_both():
    """Every rules file, their runbook and the dashboard land in
    /usr/share/conntrack-agent/{prometheus,grafana}/ (the test rules file,
    *.rules.test.yml, is promtool's, not the admin's)."""
    files = _monitoring_files()
    assert "packaging/prometheus/conntrack-agent.rules.yml" in files
    assert "packaging/prometheus/RUNBOOK.md" in files
    assert "packaging/grafana/conntrack-agent.json" in files
    deb = _debian_installed()
    spec = SPEC.read_text().replace("\\\n", "")
    for path in files:
        subdir, name = path.split("/")[1:]
        assert deb.get(path, "").rstrip("/") == "usr/share/conntrack-agent/" + subdir, f"{path}: deb"
        assert re.search(rf"^install -D -p -m 0644 {re.escape(path)} +"
                         rf"%{{buildroot}}%{{_datadir}}/%{{name}}/{subdir}/{re.escape(name)}$", spec, re.M), \
            f"{path}: rpm %install"
    assert re.search(r"^%\{_datadir\}/%\{name\}/$", _spec_section("%files"), re.M), "rpm %files"


def test_policy_is_a_conffile_in_both():
    # dh_installdeb makes every file under /etc a conffile
    assert _debian_installed()["config/policy.toml"] == "etc/conntrack-agent/"
    spec = SPEC.read_text()
    assert re.search(r"^%config\(noreplace\) %\{_sysconfdir\}/conntrack-agent/policy\.toml$", spec, re.M)
    assert len(re.findall(r"^%config", spec, re.M)) == 1, "only the policy is configuration"


def test_unit_is_enabled_started_and_restarted_by_both():
    # deb: dh_installsystemd finds the unit the .install puts in lib/systemd/system
    assert _debian_installed()["systemd/conntrack-agent.service"] == "lib/systemd/system/"
    rules = (DEBIAN / "rules").read_text()
    assert "no-start" not in rules and "no-enable" not in rules and "no-restart" not in rules
    for section, macro in (("%post", "%systemd_post"), ("%preun", "%systemd_preun"),
                           ("%postun", "%systemd_postun_with_restart")):
        assert re.search(rf"^{macro} conntrack-agent\.service$", _spec_section(section), re.M), section


def test_removal_restores_in_both_after_the_stop():
    prerm = (DEBIAN / "conntrack-agent.prerm").read_text()
    assert prerm.index("#DEBHELPER#") < prerm.index("/usr/bin/conntrack-agent restore"), \
        "the debhelper snippet (which stops the service) must come first"
    assert re.search(r'if \[ "\$1" = "remove" \]', prerm)
    preun = _spec_section("%preun")
    assert preun.index("%systemd_preun") < preun.index("%{_bindir}/conntrack-agent restore")
    assert "$1 -eq 0" in preun  # erase, not upgrade
    postrm = (DEBIAN / "conntrack-agent.postrm").read_text()
    assert re.search(r'if \[ "\$1" = "purge" \]; then\n\s+rm -rf /var/lib/conntrack-agent\n', postrm)


def test_dependencies_are_the_distributions_own_packages():
    control = "\n".join(line for line in (DEBIAN / "control").read_text().splitlines()
                         if not line.startswith("#"))
    binary = control.split("\nPackage: conntrack-agent\n", 1)[1]
    assert "${python3:Depends}" in binary
    assert re.search(r"^Recommends:\n python3-gi,\n python3-pydbus,", binary, re.M)
    # pyroute2 is a test dependency only, so nothing makes dh_python3 turn it into a Depends.
    runtime = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert runtime and "pyroute2" not in runtime.group(1)
    spec = SPEC.read_text()
    assert "%{?python_disable_dependency_generator}" in spec
    requires = re.findall(r"^Requires:\s+(\S+)", spec, re.M)
    assert "python3-structlog" in requires and "python3-tomli" in requires
    assert not any("pyroute2" in r for r in requires)
    assert set(re.findall(r"^Recommends:\s+(\S+)", spec, re.M)) == {"python3-gobject", "python3-pydbus"}

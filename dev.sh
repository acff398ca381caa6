#!/usr/bin/env bash
# Set-up and entry points for a fresh Debian 12 machine (run as root):
#   sudo ./dev.sh run     install what is needed, then run the agent in the foreground
#                         with the shipped default policy (config/policy.toml)
#   sudo ./dev.sh test    install what is needed, then run every test
# Extra arguments go to the agent or to pytest: ./dev.sh run --dry-run, ./dev.sh test -k policy
set -euo pipefail
cd "$(dirname "$0")"
here=$PWD
venv=$here/.venv

# Debian packages: the kernel test rig (nftables, conntrack, iproute2), the system test
# (debootstrap, systemd-nspawn), D-Bus bindings from the archive (python3-gi, python3-pydbus:
# PyGObject does not build from PyPI against Debian 12's GLib), the package builds, and
# promtool (package prometheus) for the alert rules' unit tests, and prometheus with
# prometheus-node-exporter, which tests/system/prom.py starts on 127.0.0.1 (on a host
# booted with systemd, installing them also enables and starts Debian's own services).
APT_PACKAGES=(
  python3 python3-venv python3-pip python3-gi python3-pydbus python3-structlog python3-pyroute2
  python3-yaml nftables conntrack iproute2 procps kmod dbus dbus-daemon
  debootstrap systemd-container
  dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel
  python3-pytest groff-base lintian rpm rpmlint
  prometheus prometheus-node-exporter
)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev.sh: run as root (sudo ./dev.sh $1): the agent and its tests change kernel settings" >&2
    exit 1
  fi
}

setup() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian's interpreter (not a pyenv or other one on PATH), with the archive's gi and
  # pydbus visible; everything else comes from PyPI into the venv.
  if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$venv"
  fi
  if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]"
    touch "$venv/.installed"
  fi
  modprobe nf_conntrack 2>/dev/null || true   # the developer's machine, not the agent: it never modprobes
}

cmd=${1:-}
shift || true
case "$cmd" in
  run)
    need_root run
    setup
    exec "$venv/bin/conntrack-agent" run --config "$here/config/policy.toml" "$@"
    ;;
  test)
    need_root test
    setup
    exec "$venv/bin/python" -m pytest -ra "$@"
    ;;
  setup)
    need_root setup
    setup
    ;;
  *)
    echo "usage: sudo ./dev.sh run [agent options] | sudo ./dev.sh test [pytest options] | sudo ./dev.sh setup" >&2
    exit 2
    ;;
esac

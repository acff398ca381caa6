"""sysctld.py against the real systemd-sysctl and `sysctl --system` of this Debian 12.

A tree of sysctl.d files exercising each precedence rule is bind-mounted over
/etc/sysctl.d, /run/sysctl.d, /usr/local/lib/sysctl.d, /usr/lib/sysctl.d and
/etc/sysctl.conf in a private mount namespace, inside a throw-away network
namespace (tests/rig.py). There systemd-sysctl --prefix=/net/netfilter writes
the namespace's own conntrack timeouts (per-namespace sysctls: nothing global
is written), and so does `sysctl --system` (procps). sysctld.read() on the same
tree must predict both, value for value.

(/lib/sysctl.d is /usr/lib/sysctl.d on this merged-/usr host, so its place in
the order is covered by the unit tests only.)
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Dict

import pytest

from conntrack_agent import sysctld

SYSTEMD_SYSCTL = next((p for p in ("/lib/systemd/systemd-sysctl", "/usr/lib/systemd/systemd-sysctl")
                       if os.path.exists(p)), None)
P = "net.netfilter.nf_conntrack_"

# path in the tree -> content; each key is one rule (see EXPECTED).
TREE = {
    # masking: /etc's 50-vendor.conf hides /usr/lib's whole file
    "usr/lib/sysctl.d/50-vendor.conf": P + "tcp_timeout_close = 11\n" + P + "generic_timeout = 21\n",
    "etc/sysctl.d/50-vendor.conf": P + "tcp_timeout_close = 12\n",
    # masking with a symlink to /dev/null (in /run, above /usr/lib)
    "usr/lib/sysctl.d/60-masked.conf": P + "icmp_timeout = 31\n",
    # order by file name across directories; a later name wins from a lower directory too
    "usr/local/lib/sysctl.d/10-early.conf": (P + "udp_timeout = 41\n" + P + "udp_timeout_stream = 51\n"
                                             + P + "sctp_timeout_closed = 122\n"),
    "etc/sysctl.d/20-later.conf": (P + "udp_timeout = 42\n"
                                   "net/netfilter/nf_conntrack_tcp_timeout_fin_wait = 61\n"
                                   "# " + P + "tcp_timeout_syn_recv = 99\n"
                                   "; " + P + "tcp_timeout_syn_recv = 98\n"
                                   "   # indented comment\n"
                                   "\n"
                                   "-" + P + "tcp_timeout_last_ack = 71\n"),
    "usr/lib/sysctl.d/90-late.conf": P + "udp_timeout_stream = 52\n",
    # '/' and '.' name one key; a later dotted line replaces the slashed one
    "run/sysctl.d/30-dots.conf": (P + "tcp_timeout_fin_wait=62\n"
                                  + P + "tcp_timeout_syn_sent = 81\n"
                                  + P + "tcp_timeout_max_retrans = 0x64\n"
                                  # what the kernel takes of a value: base 0, the first word
                                  + P + "gre_timeout_stream = 036\n"
                                  + P + "icmpv6_timeout = 33 # not a comment\n"
                                  + P + "gre_timeout = 34 35\n"),
    # a bad value last: the kernel refuses it, the earlier 81 is not applied either
    "etc/sysctl.d/40-bad.conf": P + "tcp_timeout_syn_sent = eighty\n" + P + "tcp_timeout_unacknowledged\n",
    # globs (systemd >= 249): an explicit key anywhere wins, "-key" excludes
    "etc/sysctl.d/70-glob.conf": (P + "sctp_timeout_* = 121\n"
                                  "-" + P + "sctp_timeout_heartbeat_sent\n"),
    # /etc/sysctl.conf through Debian's 99-sysctl.conf link, then a file after it
    "etc/sysctl.conf": P + "tcp_timeout_time_wait = 101\n" + P + "tcp_timeout_close_wait = 111\n",
    "etc/sysctl.d/99-zz.conf": P + "tcp_timeout_time_wait = 102\n",
}
LINKS = {"etc/sysctl.d/99-sysctl.conf": "../sysctl.conf", "run/sysctl.d/60-masked.conf": "/dev/null"}

# What systemd-sysctl must end with (None: the namespace's default stays).
EXPECTED = {
    "tcp_timeout_close": 12, "generic_timeout": None, "icmp_timeout": None, "udp_timeout": 42,
    "udp_timeout_stream": 52, "tcp_timeout_fin_wait": 62, "tcp_timeout_last_ack": 71,
    "tcp_timeout_syn_recv": None, "tcp_timeout_syn_sent": None, "tcp_timeout_max_retrans": 100,
    "tcp_timeout_unacknowledged": None, "tcp_timeout_time_wait": 102, "tcp_timeout_close_wait": 111,
    "gre_timeout_stream": 30, "icmpv6_timeout": 33, "gre_timeout": 34,
    "sctp_timeout_closed": 122, "sctp_timeout_cookie_wait": 121, "sctp_timeout_heartbeat_sent": None,
}
# `sysctl --system` differs twice: /etc/sysctl.conf comes last, and it writes every
# line in turn, so a refused value leaves the earlier accepted one in place.
EXPECTED_PROCPS = dict(EXPECTED, tcp_timeout_time_wait=101, tcp_timeout_syn_sent=81)

MOUNT = r"""
set -e
for d in /etc/sysctl.d /run/sysctl.d /usr/local/lib/sysctl.d /usr/lib/sysctl.d; do
    if [ ! -d "$d" ]; then
        parent=$(dirname "$d")
        mount -t tmpfs ctatest "$parent"
        mkdir -p "$d"
    fi
    mount --bind "$TREE$d" "$d"
done
mount --bind "$TREE/etc/sysctl.conf" /etc/sysctl.conf
"""


def _lay_out(root: Path) -> None:
    for d in ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for rel, text in TREE.items():
        (root / rel).write_text(text)
    for rel, target in LINKS.items():
        (root / rel).symlink_to(target)


def _read_all(ns) -> Dict[str, int]:
    out = ns.run(["sh", "-c", "cd /proc/sys/net/netfilter && grep -H . nf_conntrack_*timeout*"]).stdout
    return {name[len("nf_conntrack_"):]: int(value) for name, value in
            (line.split(":", 1) for line in out.splitlines())}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    if SYSTEMD_SYSCTL is None or shutil.which("sysctl") is None or shutil.which("unshare") is None:
        pytest.skip("needs systemd-sysctl, procps' sysctl and unshare (Debian 12: systemd, procps, util-linux)")
    root = tmp_path / "root"
    _lay_out(root)
    return root


def _in_tree(ns, root: Path, command: str):
    script = "TREE=%s\n%s\n%s" % (shlex.quote(str(root)), MOUNT, command)
    return ns.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], check=False)


def test_systemd_sysctl_applies_what_sysctld_predicts(ns, tree):
    before = _read_all(ns)
    proc = _in_tree(ns, tree, SYSTEMD_SYSCTL + " --prefix=/net/netfilter")
    # It fails (exit 1) on the refused "eighty", and says so; everything else is applied.
    assert "tcp_timeout_syn_sent" in proc.stderr and "eighty" in proc.stderr, proc.stderr
    after = _read_all(ns)

    settings = sysctld.read(str(tree))
    predicted = settings.resolve(P + name for name in after)
    for name, want in EXPECTED.items():
        assert after[name] == (before[name] if want is None else want), (name, proc.stderr)
        got = predicted.get(P + name)
        assert (got.value if got else None) == want, (name, got)
    # Every other timeout too: what sysctld predicts (the glob's 121 on the other sctp
    # timeouts), else the default; and sysctld predicts nothing the tree does not set.
    for name in after:
        want = predicted[P + name].value if P + name in predicted else before[name]
        assert after[name] == want, name
    assert set(predicted) <= {P + n for n in after}

    where = {k[len(P):]: (a.file, a.line, a.ignore_failure) for k, a in predicted.items()}
    assert where["udp_timeout"] == ("/etc/sysctl.d/20-later.conf", 1, False)
    assert where["tcp_timeout_last_ack"] == ("/etc/sysctl.d/20-later.conf", 7, True)
    assert where["tcp_timeout_close_wait"] == ("/etc/sysctl.d/99-sysctl.conf", 2, False)
    assert where["sctp_timeout_cookie_wait"] == ("/etc/sysctl.d/70-glob.conf", 1, False)
    problems = [str(p) for p in settings.problems]
    assert "/etc/sysctl.d/40-bad.conf:1: %stcp_timeout_syn_sent: not an integer the kernel takes: 'eighty'" % P \
        in problems, problems
    assert any(p.startswith("/etc/sysctl.d/40-bad.conf:2: ") and "not an assignment" in p for p in problems)


def test_sysctl_system_reads_sysctl_conf_last_as_order_procps_predicts(ns, tree):
    # procps 4.0.2 writes even with --dry-run when given --system (seen here): it runs in
    # the throw-away namespace like systemd-sysctl, and is judged by what it wrote.
    before = _read_all(ns)
    proc = _in_tree(ns, tree, "sysctl --system")
    after = _read_all(ns)

    predicted = sysctld.read(str(tree), order="procps").resolve(P + name for name in after)
    for name in after:
        want = EXPECTED_PROCPS.get(name)
        if want is None and name not in EXPECTED_PROCPS:
            want = predicted[P + name].value if P + name in predicted else None
        assert after[name] == (before[name] if want is None else want), (name, proc.stdout, proc.stderr)
        got = predicted.get(P + name)
        assert (got.value if got else None) == want, (name, got)

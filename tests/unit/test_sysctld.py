"""sysctld.read() on trees of sysctl.d files laid out under a temporary root.

Each rule of systemd-sysctl's order and precedence has its own test here;
tests/kernel/test_sysctld_systemd.py runs the real systemd-sysctl and
`sysctl --system` on such a tree and checks that read() predicts them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest

from conntrack_agent import sysctld
from conntrack_agent.sysctld import Assignment, Problem

MAX = "net.netfilter.nf_conntrack_max"
EST = "net.netfilter.nf_conntrack_tcp_timeout_established"


def lay_out(root: Path, files: Dict[str, str], links: Dict[str, str] = None) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel, target in (links or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    return str(root)


def values(root: str, order: str = "systemd") -> Dict[str, int]:
    return {k: a.value for k, a in sysctld.read(root, order).values.items()}


def test_nothing_there_is_nothing(tmp_path):
    settings = sysctld.read(str(tmp_path))
    assert settings.values == {} and settings.problems == [] and settings.files == []


def test_only_conntrack_keys_with_their_file_and_line(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/60-ct.conf": (
        "# conntrack\n"
        "net.ipv4.ip_forward = 1\n"
        "net.netfilter.nf_conntrack_max = 131072\n"
        "net.netfilter.nf_log_all_netns = 1\n"
        "net.netfilter.nf_conntrack_tcp_timeout_established=7200\n"
        "net.nf_conntrack_max = 262144\n"
        "kernel.pid_max = 4194304\n")})
    settings = sysctld.read(root)
    assert settings.values == {
        MAX: Assignment(131072, "/etc/sysctl.d/60-ct.conf", 3, False),
        EST: Assignment(7200, "/etc/sysctl.d/60-ct.conf", 5, False),
        "net.nf_conntrack_max": Assignment(262144, "/etc/sysctl.d/60-ct.conf", 6, False),
    }
    assert settings.files == ["/etc/sysctl.d/60-ct.conf"] and settings.problems == []


def test_earlier_directory_masks_the_same_name_in_later_ones(tmp_path):
    root = lay_out(tmp_path, {
        "usr/lib/sysctl.d/50-vendor.conf": "%s = 1000\n%s = 3600\n" % (MAX, EST),
        "run/sysctl.d/50-vendor.conf": "%s = 2000\n" % MAX,
        "etc/sysctl.d/50-vendor.conf": "%s = 3000\n" % MAX,
    })
    # /etc's file replaces the others whole: EST from /usr/lib is gone with it.
    assert values(root) == {MAX: 3000}
    assert sysctld.read(root).files == ["/etc/sysctl.d/50-vendor.conf"]


@pytest.mark.parametrize("dirs", [
    ("etc", "run"), ("run", "usr/local/lib"), ("usr/local/lib", "usr/lib"), ("usr/lib", "lib"), ("etc", "lib"),
])
def test_directory_precedence_pairwise(tmp_path, dirs):
    high, low = dirs
    root = lay_out(tmp_path, {"%s/sysctl.d/50-x.conf" % low: "%s = 1\n" % MAX,
                              "%s/sysctl.d/50-x.conf" % high: "%s = 2\n" % MAX})
    settings = sysctld.read(root)
    assert settings.values[MAX] == Assignment(2, "/%s/sysctl.d/50-x.conf" % high, 1, False)


def test_a_symlink_to_dev_null_masks(tmp_path):
    root = lay_out(tmp_path, {"usr/lib/sysctl.d/50-vendor.conf": "%s = 1000\n" % MAX},
                   {"etc/sysctl.d/50-vendor.conf": "/dev/null"})
    settings = sysctld.read(root)
    assert settings.values == {} and settings.files == [] and settings.problems == []


def test_an_empty_file_masks_too(tmp_path):
    root = lay_out(tmp_path, {"usr/lib/sysctl.d/50-vendor.conf": "%s = 1000\n" % MAX,
                              "etc/sysctl.d/50-vendor.conf": ""})
    assert values(root) == {}


def test_files_run_in_name_order_across_directories_and_later_wins(tmp_path):
    root = lay_out(tmp_path, {
        "etc/sysctl.d/10-admin.conf": "%s = 100\n%s = 1\n" % (MAX, EST),
        "usr/lib/sysctl.d/20-vendor.conf": "%s = 200\n" % MAX,    # a later name, a lower directory
        "run/sysctl.d/15-run.conf": "%s = 2\n" % EST,
    })
    settings = sysctld.read(root)
    assert settings.files == ["/etc/sysctl.d/10-admin.conf", "/run/sysctl.d/15-run.conf",
                              "/usr/lib/sysctl.d/20-vendor.conf"]
    assert values(root) == {MAX: 200, EST: 2}


def test_within_a_file_the_last_line_wins(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "%s = 1\n%s = 2\n%s = 3\n" % (MAX, MAX, MAX)})
    assert sysctld.read(root).values[MAX] == Assignment(3, "/etc/sysctl.d/a.conf", 3, False)


def test_names_sort_by_code_point_not_numerically(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/9-a.conf": "%s = 9\n" % MAX,
                              "etc/sysctl.d/10-b.conf": "%s = 10\n" % MAX,
                              "etc/sysctl.d/Z.conf": "%s = 90\n" % MAX,
                              "etc/sysctl.d/a.conf": "%s = 97\n" % MAX})
    # "10-b" < "9-a" < "Z" < "a"
    assert values(root) == {MAX: 97}
    assert [f.rsplit("/", 1)[1] for f in sysctld.read(root).files] == ["10-b.conf", "9-a.conf", "Z.conf", "a.conf"]


def test_only_dot_conf_and_not_hidden(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/50.conf.dpkg-old": "%s = 1\n" % MAX,
                              "etc/sysctl.d/README": "%s = 2\n" % MAX,
                              "etc/sysctl.d/.hidden.conf": "%s = 3\n" % EST,
                              "etc/sysctl.d/40.conf": "%s = 4\n" % MAX})
    assert values(root) == {MAX: 4}
    assert values(root, order="procps") == {MAX: 4, EST: 3}  # procps reads dot files


def test_sysctl_conf_through_debians_link_sits_at_99_for_systemd_and_last_for_procps(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.conf": "%s = 1\n%s = 11\n" % (MAX, EST),
                              "etc/sysctl.d/99-zz.conf": "%s = 2\n" % MAX,
                              "etc/sysctl.d/50-a.conf": "%s = 3\n%s = 33\n" % (MAX, EST)},
                   {"etc/sysctl.d/99-sysctl.conf": "../sysctl.conf"})
    settings = sysctld.read(root)
    assert {k: (a.value, a.file) for k, a in settings.values.items()} == {
        MAX: (2, "/etc/sysctl.d/99-zz.conf"), EST: (11, "/etc/sysctl.d/99-sysctl.conf")}
    procps = sysctld.read(root, order="procps")
    assert procps.values[MAX] == Assignment(1, "/etc/sysctl.conf", 1, False)
    assert procps.files[-1] == "/etc/sysctl.conf"


def test_without_the_link_systemd_never_reads_sysctl_conf(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.conf": "%s = 1\n" % MAX})
    assert values(root) == {}
    assert values(root, order="procps") == {MAX: 1}


def test_absolute_links_resolve_inside_the_root(tmp_path):
    root = lay_out(tmp_path, {"srv/conf/ct.conf": "%s = 5\n" % MAX},
                   {"etc/sysctl.d/50-ct.conf": "/srv/conf/ct.conf", "lib": "usr/lib"})
    (tmp_path / "usr/lib/sysctl.d").mkdir(parents=True)
    (tmp_path / "usr/lib/sysctl.d/60-lib.conf").write_text("%s = 6\n" % EST)
    settings = sysctld.read(root)
    assert settings.values[MAX] == Assignment(5, "/etc/sysctl.d/50-ct.conf", 1, False)
    # merged /usr: /lib/sysctl.d is /usr/lib/sysctl.d, read once under its first name
    assert settings.files == ["/etc/sysctl.d/50-ct.conf", "/usr/lib/sysctl.d/60-lib.conf"]


def test_slash_and_dot_spell_one_key(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "net/netfilter/nf_conntrack_max = 1\n"
                                                     "%s = 2\n"
                                                     "/net/netfilter//nf_conntrack_max = 3\n" % MAX})
    assert sysctld.read(root).values == {MAX: Assignment(3, "/etc/sysctl.d/a.conf", 3, False)}


def test_normalize_follows_systemd():
    assert sysctld.normalize("net.netfilter.nf_conntrack_max") == "net/netfilter/nf_conntrack_max"
    assert sysctld.normalize("net/netfilter/nf_conntrack_max") == "net/netfilter/nf_conntrack_max"
    # a dot inside a part: written with '/' when the key uses dots, kept when it uses slashes
    assert sysctld.normalize("net.ipv4.conf.eth0/100.rp_filter") == "net/ipv4/conf/eth0.100/rp_filter"
    assert sysctld.normalize("net/ipv4/conf/eth0.100/rp_filter") == "net/ipv4/conf/eth0.100/rp_filter"


def test_dash_prefix_marks_ignore_failure(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "-%s = 5\n - %s = 6\n" % (MAX, EST)})
    got = sysctld.read(root).values
    assert got[MAX].ignore_failure and got[EST].ignore_failure and got[EST].value == 6


def test_an_equal_reassignment_keeps_its_place_and_merges_ignore_failure(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "%s = 1\nnet.nf_conntrack_max = 2\n-%s = 1\n" % (MAX, MAX)})
    got = sysctld.read(root).values
    # the alias pair is written in this order by systemd: the legacy name last, so it wins
    assert list(got) == [MAX, "net.nf_conntrack_max"]
    assert got[MAX] == Assignment(1, "/etc/sysctl.d/a.conf", 1, True)


def test_a_changed_reassignment_moves_to_the_end(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "%s = 1\nnet.nf_conntrack_max = 2\n%s = 3\n" % (MAX, MAX)})
    assert list(sysctld.read(root).values) == ["net.nf_conntrack_max", MAX]


def test_comments_blank_lines_and_whitespace(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": (
        "# %s = 1\n"
        "; %s = 2\n"
        "   # indented = 3\n"
        "\t\n"
        "\n"
        "   %s\t=\t  7  \n"
        "%s = 8 # this is not a comment; the kernel takes the 8\n" % (MAX, MAX, MAX, EST))})
    assert values(root) == {MAX: 7, EST: 8}


def test_line_ends_of_every_kind(tmp_path):
    path = tmp_path / "etc/sysctl.d/a.conf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a=1\r\n" + MAX.encode() + b"=5\rb=2\0" + EST.encode() + b"=9")
    settings = sysctld.read(str(tmp_path))
    assert {k: (a.value, a.line) for k, a in settings.values.items()} == {MAX: (5, 2), EST: (9, 4)}


@pytest.mark.parametrize("text, value", [
    ("131072", 131072), ("0x20000", 131072), ("0X1f", 31), ("010", 8), ("0", 0), ("-1", -1),
    ("  42  ", 42), ("42 43", 42), ("2147483647", 2 ** 31 - 1), ("-2147483648", -2 ** 31),
    ("", None), ("abc", None), ("+5", None), ("5k", None), ("1.5", None), ("08", None), ("0x", None),
    ("2147483648", None), ("1e6", None), ("--1", None), ("٣", None),
])
def test_values_the_kernel_takes(text, value):
    assert sysctld.parse_kernel_int(text) == value


def test_bad_values_are_problems_with_file_and_line_and_unset_the_key(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/10-a.conf": "%s = 65536\n%s = 3600\n" % (MAX, EST),
                              "etc/sysctl.d/20-b.conf": "\n%s = lots\n%s = 1e6\n" % (MAX, EST)})
    settings = sysctld.read(root)
    assert settings.values == {}  # systemd writes only the last value, which the kernel refuses
    assert [str(p) for p in settings.problems] == [
        "/etc/sysctl.d/20-b.conf:2: %s: not an integer the kernel takes: 'lots'" % MAX,
        "/etc/sysctl.d/20-b.conf:3: %s: not an integer the kernel takes: '1e6'" % EST]
    # procps writes each line: the accepted 65536 stays
    assert values(root, order="procps") == {MAX: 65536, EST: 3600}


def test_a_good_value_after_a_bad_one_counts(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "%s = oops\n%s = 5\n" % (MAX, MAX)})
    settings = sysctld.read(root)
    assert settings.values[MAX].value == 5 and len(settings.problems) == 1


def test_conntrack_lines_without_equals_are_problems_others_are_not_ours(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "kernel.pid_max\n%s\n%s = 4\n" % (MAX, EST)})
    settings = sysctld.read(root)
    assert [str(p) for p in settings.problems] == ["/etc/sysctl.d/a.conf:2: %s: not an assignment (no '=')" % MAX]
    assert values(root) == {EST: 4}


def test_unreadable_entries_are_problems_and_still_mask(tmp_path):
    root = lay_out(tmp_path, {"usr/lib/sysctl.d/20-dir.conf": "%s = 1\n" % MAX,
                              "usr/lib/sysctl.d/30-ok.conf": "%s = 3\n" % EST},
                   {"etc/sysctl.d/10-loop.conf": "10-loop.conf", "etc/sysctl.d/15-gone.conf": "/nowhere.conf"})
    (tmp_path / "etc/sysctl.d/20-dir.conf").mkdir()  # a directory by a .conf name
    settings = sysctld.read(root)  # as root too: no permission bit to rely on
    assert values(root) == {EST: 3}
    text = [str(p) for p in settings.problems]
    assert len(text) == 3, text
    assert text[0].startswith("/etc/sysctl.d/10-loop.conf: cannot read: ")
    assert text[1].startswith("/etc/sysctl.d/15-gone.conf: cannot read: ")
    assert text[2].startswith("/etc/sysctl.d/20-dir.conf: cannot read: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file (the entries above cover root)")
def test_a_file_without_read_permission_is_a_problem(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "%s = 1\n" % MAX, "etc/sysctl.d/b.conf": "%s = 2\n" % EST})
    (tmp_path / "etc/sysctl.d/a.conf").chmod(0)
    settings = sysctld.read(root)
    assert values(root) == {EST: 2}
    assert [str(p) for p in settings.problems] == ["/etc/sysctl.d/a.conf: cannot read: Permission denied"]


def test_binary_garbage_and_huge_files_do_not_raise(tmp_path):
    path = tmp_path / "etc/sysctl.d/a.conf"
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(50000) + b"\n" + MAX.encode() + b" = 9\n")
    big = tmp_path / "etc/sysctl.d/b.conf"
    with open(big, "wb") as f:
        f.write(b"#" * (sysctld.MAX_FILE_BYTES + 10))
    settings = sysctld.read(str(tmp_path))
    assert settings.values[MAX].value == 9
    assert [str(p) for p in settings.problems][-1].startswith("/etc/sysctl.d/b.conf: larger than")


def test_globs_wait_for_the_names_present(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/50-glob.conf": (
        "net.netfilter.nf_conntrack_tcp_timeout_* = 120\n"
        "-net.netfilter.nf_conntrack_tcp_timeout_close\n"
        "kernel.* = 1\n"
        "net.netfilter.nf_log.* = 1\n"
        "net.*.nf_conntrack_max = 4096\n"),
        "etc/sysctl.d/10-explicit.conf": "net.netfilter.nf_conntrack_tcp_timeout_established = 7200\n",
        "etc/sysctl.d/60-later.conf": "net.netfilter.nf_conntrack_tcp_timeout_time_*ait = 60\n"})
    settings = sysctld.read(root)
    assert [g.pattern for g in settings.globs] == ["net/netfilter/nf_conntrack_tcp_timeout_*",
                                                   "net/*/nf_conntrack_max",
                                                   "net/netfilter/nf_conntrack_tcp_timeout_time_*ait"]
    present = ["net.netfilter.nf_conntrack_tcp_timeout_established", "net.netfilter.nf_conntrack_tcp_timeout_close",
               "net.netfilter.nf_conntrack_tcp_timeout_time_wait", "net.netfilter.nf_conntrack_tcp_timeout_syn_sent",
               "net.netfilter.nf_conntrack_udp_timeout", "net/netfilter/nf_conntrack_max", "net.nf_conntrack_max"]
    got = {k: (a.value, a.file, a.line) for k, a in settings.resolve(present).items()}
    assert got == {
        EST: (7200, "/etc/sysctl.d/10-explicit.conf", 1),        # explicit wins over the earlier... and later glob
        "net.netfilter.nf_conntrack_tcp_timeout_time_wait": (60, "/etc/sysctl.d/60-later.conf", 1),  # last glob
        "net.netfilter.nf_conntrack_tcp_timeout_syn_sent": (120, "/etc/sysctl.d/50-glob.conf", 1),
        MAX: (4096, "/etc/sysctl.d/50-glob.conf", 5),
        # '*' never crosses a '/': net/*/nf_conntrack_max does not reach the 2-part legacy name
    }
    # without the names, only the explicit keys
    assert settings.values == {EST: settings.values[EST]}


def test_a_glob_with_a_bad_value_is_a_problem_once(tmp_path):
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "net.netfilter.nf_conntrack_*_timeout = soon\n"})
    settings = sysctld.read(root)
    names = ["net.netfilter.nf_conntrack_udp_timeout"]
    assert settings.resolve(names) == {} and settings.resolve(names) == {}
    assert [str(p) for p in settings.problems] == [
        "/etc/sysctl.d/a.conf:1: net.netfilter.nf_conntrack_udp_timeout (via net.netfilter.nf_conntrack_*_timeout): "
        "not an integer the kernel takes: 'soon'"]


def test_dash_key_alone_unsets_an_earlier_assignment(tmp_path):
    # systemd replaces the earlier option with a value-less one: nothing is written.
    root = lay_out(tmp_path, {"etc/sysctl.d/a.conf": "%s = 5\n-%s\n" % (MAX, MAX)})
    settings = sysctld.read(root)
    assert settings.values == {} and settings.problems == []
    assert settings.resolve([MAX]) == {}


def test_order_must_be_known(tmp_path):
    with pytest.raises(ValueError):
        sysctld.read(str(tmp_path), order="sysv")


def test_problem_text():
    assert str(Problem("/etc/sysctl.d/a.conf", 3, "x")) == "/etc/sysctl.d/a.conf:3: x"
    assert str(Problem("/etc/sysctl.d/a.conf", 0, "x")) == "/etc/sysctl.d/a.conf: x"

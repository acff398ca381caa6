"""Policy parsing and validation: one test per error class, layering, the shipped file."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from conntrack_agent import config
from conntrack_agent.config import PolicyError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "policy.toml"


def problems_of(text: str, name: str = "p.toml"):
    with pytest.raises(PolicyError) as info:
        config.loads(text.encode(), name)
    return info.value.problems


def only_problem(text: str):
    found = problems_of(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("1h", 3600.0), ("1h30m", 5400.0), ("2d", 172800.0),
    ("1.5s", 1.5), ("0s", 0.0),
])
def test_durations_parse(text, seconds):
    assert config.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "s5", "1h 30x", "-1s", "5 s s"])
def test_bad_durations_are_rejected(text):
    with pytest.raises(ValueError):
        config.parse_duration(text)


@pytest.mark.parametrize("seconds, text", [(0.25, "250ms"), (5, "5s"), (60, "1m"), (3600, "1h"), (90, "90s")])
def test_durations_format(seconds, text):
    assert config.format_duration(seconds) == text


# ---------------------------------------------------------------------------- defaults


def test_empty_file_means_builtin_defaults():
    policy = config.loads(b"")
    assert policy.rules == config.DEFAULT_RULES
    assert policy.agent == config.AgentSettings()
    assert policy.limits == config.Limits()


def test_shipped_policy_spells_out_the_builtin_defaults():
    shipped = config.load(SHIPPED)
    builtin = config.loads(b"")
    assert replace(shipped, sources=()) == replace(builtin, sources=())
    assert shipped.sources == (str(SHIPPED),)


def test_shipped_policy_is_conservative():
    policy = config.load(SHIPPED)
    enabled = {r.action for r in policy.active_rules()}
    assert "evict" not in enabled          # no eviction unless an admin enables it
    assert not policy.agent.dry_run
    assert all(r.raise_max.raise_only for r in policy.rules)


def test_shipped_policy_mentions_every_key():
    text = SHIPPED.read_text()
    for table, keys in config._SCHEMA.items():
        for key in keys:
            assert f"{key} =" in text or f"# {key} =" in text, f"{table}.{key} is not in {SHIPPED.name}"


# ---------------------------------------------------------------------------- error classes


def test_syntax_error_names_file_and_line():
    problem = only_problem('[agent]\ninterval = "1s"\ndry_run = tru\n')
    assert problem.file == "p.toml" and problem.line == 3
    assert "TOML syntax error" in problem.message


def test_unknown_key_is_a_typo_with_line_and_known_keys():
    problem = only_problem('[agent]\n\nintervall = "1s"\n')
    assert (problem.line, problem.key) == (3, "agent.intervall")
    assert "unknown key" in problem.message and "interval" in problem.message


def test_unknown_table():
    problem = only_problem('[agnet]\ninterval = "1s"\n')
    assert problem.key == "agnet" and problem.line == 1


def test_wrong_type_says_expected_and_actual():
    problem = only_problem('[agent]\ndry_run = "yes"\n')
    assert problem.key == "agent.dry_run" and problem.line == 2
    assert "expected true or false" in problem.message and "'yes'" in problem.message


def test_number_where_a_duration_is_expected():
    problem = only_problem("[agent]\ninterval = 5\n")
    assert "duration" in problem.message and "an integer 5" in problem.message


def test_out_of_range_ratio_inside_a_rule():
    text = '[[rule]]\nname = "grow-table"\n[rule.trigger]\nusage_at_least = 1.5\n'
    problem = only_problem(text)
    assert (problem.line, problem.key) == (4, "rule[grow-table].trigger.usage_at_least")
    assert "1.5" in problem.message


def test_unknown_choice():
    problem = only_problem('[agent]\non_external_change = "fight"\n')
    assert "back_off" in problem.message and "'fight'" in problem.message


def test_timeout_below_its_floor_is_rejected():
    text = ('[[rule]]\nname = "shorten-timeouts"\n[rule.set_timeouts.values]\n'
            'udp_timeout = "10s"\ntcp_timeout_established = "30s"\n')
    problem = only_problem(text)
    assert problem.line == 5
    assert problem.key == "rule[shorten-timeouts].set_timeouts.values.tcp_timeout_established"
    assert "floor of 5m" in problem.message


def test_unknown_timeout_name():
    problem = only_problem('[[rule]]\nname = "shorten-timeouts"\n[rule.set_timeouts.values]\nudp_timout = "10s"\n')
    assert "unknown timeout" in problem.message and problem.line == 4


def test_timeout_names_may_carry_the_sysctl_prefix():
    policy = config.loads(b'[[rule]]\nname = "shorten-timeouts"\n[rule.set_timeouts.values]\n'
                          b'nf_conntrack_udp_timeout = "12s"\n')
    rule = next(r for r in policy.rules if r.name == "shorten-timeouts")
    assert dict(rule.set_timeouts.values)["udp_timeout"] == 12.0


def test_rule_without_name():
    problem = only_problem('[[rule]]\naction = "raise_max"\n')
    assert 'missing key "name"' in problem.message and problem.line == 1


def test_new_rule_without_action():
    problem = only_problem('[[rule]]\nname = "mine"\n[rule.trigger]\nusage_at_least = 0.5\n')
    assert 'missing key "action"' in problem.message


def test_rule_without_trigger():
    problem = only_problem('[[rule]]\nname = "mine"\naction = "raise_max"\n')
    assert "at least one trigger" in problem.message


def test_restore_threshold_must_sit_below_the_trigger():
    text = ('[[rule]]\nname = "shorten-timeouts"\n[rule.trigger]\nusage_at_least = 0.5\n'
            '[rule.set_timeouts]\nrestore_below = 0.7\n')
    problem = only_problem(text)
    assert problem.key.endswith("set_timeouts.restore_below") and problem.line == 6


def test_fast_tick_slower_than_calm_tick():
    problem = only_problem('[agent]\ninterval = "100ms"\nfast_interval = "1s"\n')
    assert problem.key == "agent.fast_interval" and problem.line == 3


def test_evict_everything_including_established_is_refused():
    text = ('[[rule]]\nname = "evict-stale"\nenabled = true\n[rule.evict]\nstatus = "any"\n'
            'include_established = true\n')
    problem = only_problem(text)
    assert "live connections" in problem.message


def test_all_problems_are_reported_at_once():
    found = problems_of('[agent]\ninterval = "x"\ndry_run = 1\n[limits]\nmemory_share = 2\n')
    assert [p.line for p in found] == [2, 3, 5]


def test_bad_cidr():
    problem = only_problem('[[rule]]\nname = "evict-stale"\n[rule.evict]\nsrc = "10.0.0.300/8"\n')
    assert "CIDR" in problem.message


def test_error_text_format():
    problem = only_problem('[agent]\ndry_run = "yes"\n')
    assert str(problem).startswith("p.toml:2: agent.dry_run: expected true or false")


# ---------------------------------------------------------------------------- layering


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_dropins_merge_in_name_order_and_etc_masks_vendor(tmp_path):
    etc, vendor = tmp_path / "etc", tmp_path / "usr"
    write(vendor / "policy.toml", '[agent]\ninterval = "1s"\nfast_interval = "100ms"\n')
    write(vendor / "policy.d" / "10-a.toml", '[agent]\ninterval = "2s"\n')
    write(vendor / "policy.d" / "20-b.toml", '[agent]\ninterval = "3s"\n')
    write(etc / "policy.d" / "20-b.toml", '[agent]\nfast_interval = "200ms"\n')  # masks the vendor 20-b
    write(etc / "policy.d" / "30-c.toml", '[limits]\nmax_ceiling = 65536\n')
    write(etc / "policy.d" / "ignored.conf", 'not toml at all [')
    files = config.policy_files(None, etc_dir=etc, vendor_dir=vendor)
    assert [os.path.relpath(f, tmp_path) for f in files] == [
        "usr/policy.toml", "usr/policy.d/10-a.toml", "etc/policy.d/20-b.toml", "etc/policy.d/30-c.toml"]
    policy = config.load(None, etc_dir=etc, vendor_dir=vendor)
    assert policy.agent.interval == 2.0          # 10-a over the main file; vendor 20-b masked
    assert policy.agent.fast_interval == 0.2
    assert policy.limits.max_ceiling == 65536


def test_etc_main_file_replaces_vendor_main_file(tmp_path):
    etc, vendor = tmp_path / "etc", tmp_path / "usr"
    write(vendor / "policy.toml", '[agent]\ndry_run = true\n')
    write(etc / "policy.toml", '[agent]\ninterval = "1s"\n')
    policy = config.load(None, etc_dir=etc, vendor_dir=vendor)
    assert policy.agent.dry_run is False and policy.agent.interval == 1.0


def test_rules_merge_by_name(tmp_path):
    main = write(tmp_path / "policy.toml", '[[rule]]\nname = "grow-table"\n[rule.raise_max]\nfactor = 1.5\n')
    write(tmp_path / "policy.d" / "50-local.toml",
          '[[rule]]\nname = "shorten-timeouts"\nenabled = false\n'
          '[[rule]]\nname = "mine"\naction = "raise_max"\n[rule.trigger]\ncounters_increasing = ["drop"]\n')
    policy = config.load(main)
    by_name = {r.name: r for r in policy.rules}
    assert by_name["grow-table"].raise_max.factor == 1.5
    assert by_name["grow-table"].trigger == config.DEFAULT_RULES[0].trigger   # untouched keys kept
    assert by_name["shorten-timeouts"].enabled is False
    assert by_name["mine"].trigger.counters_increasing == ("drop",)
    assert [r.name for r in policy.rules] == ["grow-table", "shorten-timeouts", "evict-stale", "grow-buckets", "mine"]


def test_error_in_a_dropin_names_the_dropin(tmp_path):
    main = write(tmp_path / "policy.toml", "")
    bad = write(tmp_path / "policy.d" / "50-local.toml", '\n[limits]\nmemory_share = "lots"\n')
    with pytest.raises(PolicyError) as info:
        config.load(main)
    (problem,) = info.value.problems
    assert problem.file == str(bad) and problem.line == 3 and problem.key == "limits.memory_share"


def test_missing_config_file():
    with pytest.raises(PolicyError) as info:
        config.load(Path("/nonexistent/policy.toml"))
    assert "no such policy file" in str(info.value)


def test_no_files_at_all_means_defaults(tmp_path):
    policy = config.load(None, etc_dir=tmp_path / "etc", vendor_dir=tmp_path / "usr")
    assert policy.rules == config.DEFAULT_RULES and policy.sources == ()


# ---------------------------------------------------------------------------- line finder


def test_key_lines_follow_array_tables_and_dotted_keys():
    from conntrack_agent import tomlfile
    text = b'[agent]\ninterval = "1s"\n[[rule]]\nname = "a"\n[rule.trigger]\nusage_at_least = 0.5\n' \
           b'[[rule]]\nname = "b"\ntrigger.usage_at_least = 0.6\n'
    lines = tomlfile.key_lines(text)
    assert lines[("agent", "interval")] == 2
    assert lines[("rule", 0, "trigger", "usage_at_least")] == 6
    assert lines[("rule", 1, "name")] == 8
    assert lines[("rule", 1, "trigger", "usage_at_least")] == 9

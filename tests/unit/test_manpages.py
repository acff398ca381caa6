"""The man pages match the real CLI and the real policy schema, so docs cannot drift.

packaging/man/conntrack-agent.8 documents each subcommand in its own `.SS NAME`
section of COMMANDS, one `.TP` entry per option; conntrack-agent.toml.5 has one
section per policy table (`.SH [agent]`, `.SS [rule.trigger]`, ...) and one
`.TP` entry per key, ending in "Default: \\fBvalue\\fR". These tests read the
parser from conntrack_agent.cli.build_parser() and the schema, defaults,
ranges, choices and timeout floors from conntrack_agent.config, and compare
both ways: everything real is documented, and nothing documented is gone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from conntrack_agent import cli, config

ROOT = Path(__file__).resolve().parents[2]
MAN8 = ROOT / "packaging" / "man" / "conntrack-agent.8"
MAN5 = ROOT / "packaging" / "man" / "conntrack-agent.toml.5"
POLICY = ROOT / "config" / "policy.toml"

# --------------------------------------------------------------------------- a little roff


def plain(roff: str) -> str:
    """Roff source -> the words a reader sees (fonts, macros and escapes removed)."""
    out = []
    for line in roff.splitlines():
        if line.startswith(".\\\""):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            line = parts[1] if len(parts) > 1 else ""
            line = line.replace('"', "")
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\c", "", text)
    text = text.replace("\\-", "-").replace("\\(dq", '"').replace("\\(mu", "x").replace("\\(em", "-")
    return text


def sections(roff: str) -> Dict[str, str]:
    """Heading (of .SH or .SS, quotes and escapes removed) -> the roff up to the next heading."""
    found: Dict[str, str] = {}
    heading: Optional[str] = None
    body: List[str] = []
    for line in roff.splitlines():
        match = re.match(r'\.S[HS]\s+"?(.*?)"?\s*$', line)
        if match:
            if heading is not None:
                found[heading] = "\n".join(body)
            heading, body = plain(match.group(1)).strip(), []
        else:
            body.append(line)
    if heading is not None:
        found[heading] = "\n".join(body)
    return found


def bold(roff: str) -> set:
    """The words set in bold: \\fBword\\fR, `.B word` and the odd arguments of `.BR a b`."""
    words = set()
    for line in roff.splitlines():
        words.update(plain(w).strip() for w in re.findall(r"\\fB(.*?)\\f[RPI]", line))
        macro = re.match(r"\.(B|BR|RB)\s+(.*)$", line)
        if macro:
            args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', macro.group(2))]
            start = 0 if macro.group(1) in ("B", "BR") else 1
            step = 1 if macro.group(1) == "B" else 2
            words.update(plain(a).strip() for a in args[start::step])
    return words


def entries(section: str) -> List[Tuple[str, str]]:
    """The (tag, body) of each .TP entry of a section, as plain text."""
    return [(tag, body) for tag, body, _ in raw_entries(section)]


def raw_entries(section: str) -> List[Tuple[str, str, str]]:
    """(tag, plain body, roff body) of each .TP entry of a section."""
    chunks = re.split(r"^\.TP\b.*$", section, flags=re.M)[1:]
    out = []
    for chunk in chunks:
        lines = chunk.strip("\n").splitlines()
        tag, body = (lines[0], "\n".join(lines[1:])) if lines else ("", "")
        # an entry ends where the next paragraph macro starts a new block
        body = re.split(r"^\.(?:PP|IP|SS|SH)\b", body, flags=re.M)[0]
        out.append((plain(tag).strip(), " ".join(plain(body).split()), body))
    return out


OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9-]*)")


def read(path: Path) -> str:
    assert path.is_file(), f"{path} is missing"
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- conntrack-agent(8)


def _subcommands() -> Dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def _options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def test_every_subcommand_has_a_section_and_a_synopsis_line():
    man = read(MAN8)
    found = sections(man)
    commands = set(_subcommands())
    documented = {h for h in found if re.fullmatch(r"[a-z][a-z-]*", h) and h.upper() != h}
    assert commands <= documented, f"subcommands without a section in {MAN8.name}: {sorted(commands - documented)}"
    assert documented <= commands, f"sections for subcommands the CLI does not have: {sorted(documented - commands)}"
    synopsis = plain(found["SYNOPSIS"])
    for name in commands:
        assert re.search(rf"conntrack-agent {name}\b", synopsis), f"SYNOPSIS lacks 'conntrack-agent {name}'"


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_options_of_each_subcommand_match_its_section(command):
    sub = _subcommands()[command]
    section = sections(read(MAN8))[command]
    tagged = {o for tag, _ in entries(section) for o in OPTION.findall(tag)}
    real = set(_options(sub))
    assert real - tagged == set(), f"'{command}' options missing from its man page section: {sorted(real - tagged)}"
    assert tagged - real == set(), f"'{command}' section documents options the CLI lacks: {sorted(tagged - real)}"
    for option, action in _options(sub).items():
        if action.choices:
            body = next(r for t, _, r in raw_entries(section) if option in OPTION.findall(t))
            missing = [c for c in action.choices if str(c) not in bold(body)]
            assert not missing, f"'{command} {option}': choices {missing} are not described"


def test_synopsis_shows_every_option():
    synopsis = plain(sections(read(MAN8))["SYNOPSIS"])
    for command, sub in _subcommands().items():
        # the synopsis lines run from one 'conntrack-agent NAME' to the next
        block = re.search(rf"conntrack-agent {command}\b(.*?)(?=conntrack-agent |\Z)", synopsis, re.S)
        assert block, command
        shown = set(OPTION.findall(block.group(1)))
        # each option needs only one of its spellings there (-c rather than --config)
        for action in {id(a): a for a in _options(sub).values()}.values():
            assert shown & set(action.option_strings), f"SYNOPSIS of '{command}' lacks {action.option_strings}"


def test_global_options_match():
    parser = cli.build_parser()
    tagged = {o for tag, _ in entries(sections(read(MAN8))["OPTIONS"]) for o in OPTION.findall(tag)}
    real = {s for a in parser._actions for s in a.option_strings}
    assert tagged == real


def test_exit_codes_are_documented():
    body = sections(read(MAN8))["EXIT STATUS"]
    codes = {tag for tag, _ in entries(body)}
    assert {str(cli.EXIT_OK), str(cli.EXIT_FAIL), str(cli.EXIT_CONFIG)} == codes


def test_policy_files_are_those_the_loader_reads():
    for page in (MAN8, MAN5):
        text = plain(read(page))
        for directory in (config.ETC_DIR, config.VENDOR_DIR):
            assert f"{directory}/{config.MAIN_NAME}" in text, page.name
            assert f"{directory}/{config.DROPIN_DIR}/" in text, page.name
    assert config.AgentSettings().state_file in plain(read(MAN8))


# --------------------------------------------------------------------------- conntrack-agent.toml(5)

# schema table -> (section heading, dataclass holding the defaults)
TABLES = {
    "agent": ("[agent]", config.AgentSettings),
    "limits": ("[limits]", config.Limits),
    "trigger": ("[rule.trigger]", config.Trigger),
    "raise_max": ("[rule.raise_max]", config.RaiseMax),
    "set_timeouts": ("[rule.set_timeouts]", config.SetTimeouts),
    "evict": ("[rule.evict]", config.Evict),
}
# keys the schema checks separately (a nested table)
NESTED = {"set_timeouts": {"values"}}


def _keyed(heading: str) -> Dict[str, str]:
    found = sections(read(MAN5))
    assert heading in found, f"{MAN5.name} has no section {heading}"
    out: Dict[str, str] = {}
    for tag, body, _ in raw_entries(found[heading]):
        match = re.match(r"(\w+)", tag)
        assert match, f"{heading}: entry without a key: {tag!r}"
        out[match.group(1)] = tag + " " + body
    return out


def _keyed_bold(heading: str) -> Dict[str, set]:
    out = {}
    for tag, _, raw in raw_entries(sections(read(MAN5))[heading]):
        out[re.match(r"(\w+)", tag).group(1)] = bold(raw)
    return out


def _closure_values(check: Any) -> List[Any]:
    values: List[Any] = []
    for cell in getattr(check, "__closure__", None) or ():
        values.append(cell.cell_contents)
    return values


def _kind(check: Any) -> str:
    return getattr(check, "__qualname__", "").split(".")[0]


def _choices(check: Any) -> Tuple[str, ...]:
    """The options of choice(), also inside string_list(choice(...))."""
    if _kind(check) == "choice":
        return next(v for v in _closure_values(check) if isinstance(v, tuple))
    if _kind(check) in ("string_list", "optional"):
        return next((_choices(v) for v in _closure_values(check) if callable(v)), ())
    return ()


def _bounds(check: Any) -> Tuple[Optional[float], Optional[float], bool]:
    kind = _kind(check)
    if kind not in ("duration", "number"):
        return None, None, False
    cells = {name: cell.cell_contents for name, cell in zip(check.__code__.co_freevars, check.__closure__ or ())}
    return cells.get("low"), cells.get("high"), bool(cells.get("integer"))


def _matches_default(token: str, default: Any, check: Any) -> bool:
    kind = _kind(check)
    if default is None:
        return token == "unset"
    if isinstance(default, tuple):
        return token in ("[]", "{}") and default == ()
    if isinstance(default, bool):
        return token == ("true" if default else "false")
    if kind == "duration":
        return config.parse_duration(token) == default
    if isinstance(default, (int, float)):
        try:
            return float(int(token, 0) if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", token) else float(token)) == default
        except ValueError:
            return False
    return token.strip('"') == default


def _shown(value: float, kind: str, integer: bool) -> List[str]:
    if kind == "duration":
        return [config.format_duration(value)]
    if integer:
        return [str(int(value)), hex(int(value))]
    return [f"{value:g}"]


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_key_of_each_table_is_documented_with_its_default(table):
    heading, defaults = TABLES[table]
    documented = _keyed(heading)
    schema = config._SCHEMA[table]
    real = set(schema) | NESTED.get(table, set())
    assert real - set(documented) == set(), f"{heading}: keys without an entry: {sorted(real - set(documented))}"
    assert set(documented) - real == set(), f"{heading}: entries for unknown keys: {sorted(set(documented) - real)}"
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    emphasised = _keyed_bold(heading)
    for key, check in schema.items():
        text = documented[key]
        match = re.search(r"Default: (\S+?)\.?(?:\s|$)", text)
        assert match, f"{heading} {key}: no 'Default:'"
        default = fields[key].default
        assert _matches_default(match.group(1), default, check), \
            f"{heading} {key}: documents default {match.group(1)!r}, the code has {default!r}"
        for option in _choices(check):
            assert option in emphasised[key], f"{heading} {key}: choice {option!r} not described (in bold)"
        low, high, integer = _bounds(check)
        for bound in (b for b in (low, high) if b):
            assert any(re.search(rf"(?<![\w.]){re.escape(s)}(?![\w])", text) for s in _shown(bound, _kind(check), integer)), \
                f"{heading} {key}: range bound {_shown(bound, _kind(check), integer)[0]} not stated"


def test_rule_keys_are_documented():
    documented = _keyed("[[rule]]")
    assert set(documented) == set(config._RULE_KEYS)
    rule_defaults = {f.name: f.default for f in dataclasses.fields(config.Rule)}
    for key, check in config._RULE_KEYS.items():
        text = documented[key]
        default = rule_defaults[key]
        if default is dataclasses.MISSING:
            assert "Required" in text, f"[[rule]] {key}: has no default, so the page must say it is required"
            continue
        token = re.search(r"Default: (\S+?)\.?(?:\s|$)", text)
        assert token and _matches_default(token.group(1), default, check), f"[[rule]] {key}"
    for action in config.ACTIONS:
        assert action in _keyed_bold("[[rule]]")["action"], action


def test_every_timeout_is_documented_with_its_floor():
    documented = _keyed("[rule.set_timeouts.values]")
    assert set(documented) == set(config.TIMEOUT_FLOORS), \
        f"documented {sorted(set(documented) ^ set(config.TIMEOUT_FLOORS))} differ from TIMEOUT_FLOORS"
    for name, floor in config.TIMEOUT_FLOORS.items():
        match = re.search(r"floor (\S+?)\)", documented[name])
        assert match, f"{name}: no floor stated"
        assert config.parse_duration(match.group(1)) == floor, f"{name}: floor {match.group(1)} != {floor}s"


def _toml_keys(data: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(section heading, key) of every key in the shipped policy."""
    out = []
    for top in ("agent", "limits"):
        out += [(f"[{top}]", k) for k in data.get(top, {})]
    for rule in data.get("rule", []):
        for key, value in rule.items():
            if isinstance(value, dict):
                out += [(f"[rule.{key}]", k) for k in value]
                if key == "set_timeouts":
                    out += [("[rule.set_timeouts.values]", k) for k in value.get("values", {})]
            else:
                out.append(("[[rule]]", key))
    return out


def test_shipped_policy_keys_and_commented_examples_are_documented():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    with open(POLICY, "rb") as f:
        data = tomllib.load(f)
    keys = _toml_keys(data)
    assert len(keys) > 40, "the shipped policy should spell out the defaults"
    for heading, key in keys:
        assert key in _keyed(heading), f"{POLICY.name} key {key} has no entry under {heading}"
    # keys shown commented out ("# mark = 0x10") must be documented too, in some table
    everything = {k for h in sections(read(MAN5)) if h.startswith("[") for k in _keyed(h)}
    commented = re.findall(r"^#\s*([a-z_]+)\s*=", read(POLICY), flags=re.M)
    assert commented, "expected commented-out example keys in the shipped policy"
    assert set(commented) <= everything, sorted(set(commented) - everything)


def test_shipped_rules_are_described():
    body = plain(sections(read(MAN5))["SHIPPED RULES"])
    for rule in config.DEFAULT_RULES:
        assert rule.name in body and rule.action in body, rule.name


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_pages_render_without_warnings(page):
    groff = shutil.which("groff")
    if groff is None:
        reason = "groff is not installed (apt-get install groff-base)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    proc = subprocess.run([groff, "-man", "-ww", "-z", "-K", "utf8", str(page)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_dbus_interface_is_documented():
    """Read from the source (ast), so the test needs neither gi nor pydbus."""
    import ast

    source = (ROOT / "agent" / "conntrack_agent" / "dbus_service.py").read_text()
    tree = ast.parse(source)
    consts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
    names = {k: ast.literal_eval(consts[k]) for k in ("BUS_NAME", "OBJECT_PATH", "INTERFACE", "PROPERTIES")}
    section = sections(read(MAN8))["D-BUS"]
    text = plain(section)
    for key in ("BUS_NAME", "OBJECT_PATH", "INTERFACE"):
        assert names[key] in text, key
    emphasised = bold(section)
    for prop, kind in names["PROPERTIES"]:
        assert prop in emphasised, prop
        assert re.search(rf"\b{prop} \({re.escape(kind)}\b", " ".join(text.split())), f"{prop}: type {kind}"
    members = set(re.findall(r'<(?:method|signal) name="(\w+)"', source))
    assert members and members <= emphasised, sorted(members - emphasised)

"""The policy input under hostile and broken input.

Two halves:

- fuzzing: seeded mutations of the shipped config/policy.toml (byte flips,
  truncation, duplicated and dropped lines, deep nesting, huge numbers, long
  lines, random unicode, wrong types) fed to config.loads, and to config.load
  through real files. Whatever the input, only PolicyError may escape, and no
  case may take more than CASE_SECONDS. The seed is in every message; set
  CONNTRACK_AGENT_FUZZ_SEED to explore others, CONNTRACK_AGENT_FUZZ_CASES for more.
- regressions: one test per problem the fuzzing review found, each failing
  without its fix.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List

import pytest

from conntrack_agent import cli, config, evictspec, tomlfile
from conntrack_agent.config import PolicyError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = (REPO / "config" / "policy.toml").read_bytes()
SEED = int(os.environ.get("CONNTRACK_AGENT_FUZZ_SEED", "20261126"))
CASES = int(os.environ.get("CONNTRACK_AGENT_FUZZ_CASES", "2400"))
CASE_SECONDS = 0.2


# ---------------------------------------------------------------------------- mutations


def _split(data: bytes) -> List[bytes]:
    return data.split(b"\n")


def _value_lines(lines: List[bytes]) -> List[int]:
    return [i for i, line in enumerate(lines) if b"=" in line and not line.lstrip().startswith(b"#")]


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def duplicate_lines(rng: random.Random, data: bytes) -> bytes:
    lines = _split(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        j = rng.randrange(len(lines) + 1)
        lines[j:j] = lines[i:i + rng.randint(1, 12)]
    return b"\n".join(lines)


def drop_lines(rng: random.Random, data: bytes) -> bytes:
    lines = _split(data)
    for _ in range(rng.randint(1, 6)):
        if lines:
            del lines[rng.randrange(len(lines))]
    return b"\n".join(lines)


def swap_lines(rng: random.Random, data: bytes) -> bytes:
    lines = _split(data)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def _replace_value(rng: random.Random, data: bytes, value: bytes) -> bytes:
    lines = _split(data)
    candidates = _value_lines(lines)
    if not candidates:
        return data + b"\nx = " + value
    i = rng.choice(candidates)
    key = lines[i].split(b"=", 1)[0]
    lines[i] = key + b"= " + value
    return b"\n".join(lines)


def deep_nesting(rng: random.Random, data: bytes) -> bytes:
    depth = rng.choice([20, 31, 32, 33, 40, 200, 1000, 3000])
    kind = rng.randrange(4)
    if kind == 0:
        value = b"[" * depth + b"1" + b"]" * depth
    elif kind == 1:
        value = b"{a=" * depth + b"1" + b"}" * depth
    elif kind == 2:
        value = b"[{a=" * (depth // 2) + b"1" + b"}]" * (depth // 2)
    else:
        value = b"[" * depth  # unclosed
    if rng.random() < 0.3:  # a deep header or dotted key instead
        dotted = b".".join([b"a"] * depth)
        return data + (b"\n[" + dotted + b"]\n" if rng.random() < 0.5 else b"\n" + dotted + b" = 1\n")
    return _replace_value(rng, data, value)


def huge_number(rng: random.Random, data: bytes) -> bytes:
    digits = rng.choice([19, 20, 21, 25, 300, 4299, 4301, 6000])
    text = "".join(rng.choice("0123456789") for _ in range(digits)).lstrip("0") or "1"
    shape = rng.randrange(6)
    value = [text, "-" + text, "0x" + text, text + ".5", "1e" + text[:6], text[:1] + "_" + text[1:]][shape]
    return _replace_value(rng, data, value.encode())


def long_line(rng: random.Random, data: bytes) -> bytes:
    size = rng.choice([1000, 3200, 20000, 60000])
    alphabet = rng.choice([" ", "\t", " \t", "#", "a", "=", '"', "'", "[", "a.", " .", "\\", '"""'])
    line = (alphabet * (size // len(alphabet) + 1))[:size].encode()
    lines = _split(data)
    lines.insert(rng.randrange(len(lines) + 1), line)
    return b"\n".join(lines)


def random_unicode(rng: random.Random, data: bytes) -> bytes:
    def char() -> str:
        pick = rng.randrange(5)
        if pick == 0:
            return chr(rng.randrange(0, 32))                      # control characters, NUL included
        if pick == 1:
            return chr(rng.choice([0x7F, 0x85, 0xA0, 0x2028, 0x2029, 0xFEFF, 0x202E]))
        if pick == 2:
            return chr(rng.randrange(0x80, 0xD800))
        if pick == 3:
            return chr(rng.randrange(0x10000, 0x110000))
        return rng.choice('[]{}="\'.#\\,\n')
    text = data.decode("utf-8", "surrogateescape")  # an earlier mutation may have broken it
    for _ in range(rng.randint(1, 10)):
        at = rng.randrange(len(text) + 1)
        text = text[:at] + "".join(char() for _ in range(rng.randint(1, 5))) + text[at:]
    out = text.encode("utf-8", "surrogateescape")
    if rng.random() < 0.2:  # and bytes that are no UTF-8 at all
        at = rng.randrange(len(out) + 1)
        out = out[:at] + bytes(rng.randrange(0x80, 0x100) for _ in range(3)) + out[at:]
    return out


WRONG_VALUES = [b"true", b"false", b'"x"', b'""', b'"0s"', b'"-1s"', b'"1e400d"', b'"99999999999999999999d"',
                b"[1, 2]", b"[]", b'["tcp", 1]', b"{a = 1}", b"{}", b"1.5", b"-1", b"0", b"1979-05-27",
                b"07:32:00", b"1979-05-27T07:32:00Z", b"nan", b"inf", b"-inf", b"0x7fffffffffffffff",
                b'"/proc/self/mem"', b'".."', b'["..", "."]', b'"\\u0000"', b'"\\u001b[2J"',
                b'"' + b"a" * 5000 + b'"', b'"0.0.0.0/0"', b'"::/0"', b'"30d"', b"1e-320"]


def wrong_type(rng: random.Random, data: bytes) -> bytes:
    return _replace_value(rng, data, rng.choice(WRONG_VALUES))


def junk_table(rng: random.Random, data: bytes) -> bytes:
    headers = [b"[agent]", b"[limits]", b"[[rule]]", b"[rule.evict]", b"[rule.trigger]", b"[rule]",
               b"[[rule.evict]]", b"[rule.set_timeouts.values]", b"[[agent]]", b"[a.b.c]"]
    lines = _split(data)
    lines.insert(rng.randrange(len(lines) + 1), rng.choice(headers))
    return b"\n".join(lines)


MUTATORS: List[Callable[[random.Random, bytes], bytes]] = [
    flip_bytes, truncate, duplicate_lines, drop_lines, swap_lines, deep_nesting, huge_number,
    long_line, random_unicode, wrong_type, junk_table,
]


def _pieces(data: bytes) -> List[bytes]:
    """The shipped file cut at its table headers: small documents, fast to fuzz,
    that still cover every table (and `[[rule]]` pieces keep a rule's name)."""
    pieces, current = [], []
    for line in _split(data):
        if line.startswith(b"[") and current and not line.startswith(b"[rule."):
            pieces.append(b"\n".join(current))
            current = []
        current.append(line)
    pieces.append(b"\n".join(current))
    return pieces


PIECES = _pieces(SHIPPED)


def mutate(rng: random.Random) -> tuple:
    data = SHIPPED if rng.random() < 0.2 else rng.choice(PIECES)
    names = []
    for _ in range(rng.randint(1, 3)):
        mutator = rng.choice(MUTATORS)
        names.append(mutator.__name__)
        data = mutator(rng, data)
    return "+".join(names), data


def _timed(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _only_policy_errors(call: Callable[[], None], what: str) -> float:
    """Run `call` (twice if the first was slow: a scheduling hiccup is not a
    regression); fail on anything but PolicyError, or if both runs were slow."""
    def guarded() -> None:
        try:
            call()
        except PolicyError as exc:
            assert exc.problems, what
            for problem in exc.problems:
                text = str(problem)
                assert text.isprintable(), f"{what}: unprintable problem {text!r}"
        except BaseException as exc:  # noqa: B902 - the point is that nothing else escapes
            pytest.fail(f"{what}: {type(exc).__name__} escaped: {exc!r}"[:2000])
    elapsed = _timed(guarded)
    if elapsed > CASE_SECONDS:
        elapsed = min(elapsed, _timed(guarded))
    assert elapsed <= CASE_SECONDS, f"{what}: took {elapsed:.3f}s (bound {CASE_SECONDS}s)"
    return elapsed


# ---------------------------------------------------------------------------- fuzzing


def test_fuzz_loads_raises_only_policy_errors_quickly():
    rng = random.Random(SEED)
    started = time.perf_counter()
    outcomes = {"valid": 0, "invalid": 0}
    for case in range(CASES):
        label, data = mutate(rng)
        what = f"seed {SEED} case {case} ({label}), input {data[:120]!r}"

        def load() -> None:
            config.loads(data, "fuzz.toml")
            outcomes["valid"] += 1
        _only_policy_errors(load, what)
    outcomes["invalid"] = CASES - outcomes["valid"]
    # Both outcomes occur: the fuzzing is neither all noise nor all no-ops.
    assert outcomes["valid"] > CASES // 50 and outcomes["invalid"] > CASES // 2, (SEED, outcomes)
    assert time.perf_counter() - started < 30, "the fuzz run is meant to take ~2 s"


def test_fuzz_load_through_real_files(tmp_path):
    rng = random.Random(SEED + 1)
    for case in range(120):
        root = tmp_path / str(case)
        dropins = root / "policy.d"
        dropins.mkdir(parents=True)
        main = root / "policy.toml"
        main.write_bytes(mutate(rng)[1] if rng.random() < 0.5 else SHIPPED)
        for index in range(rng.randint(0, 3)):
            target = dropins / f"{index}0-fuzz.toml"
            special = rng.randrange(8)
            if special == 0:
                os.mkfifo(target)
            elif special == 1:
                target.symlink_to("/dev/zero")
            elif special == 2:
                target.mkdir()
            elif special == 3:
                target.symlink_to(root / "nowhere")
            else:
                target.write_bytes(mutate(rng)[1])
        _only_policy_errors(lambda: config.load(main), f"seed {SEED + 1} case {case} in {root}")


def test_fuzz_scanner_agrees_with_tomllib_on_valid_documents():
    """Where tomllib accepts a mutated document, every key it reports that the
    scanner placed maps to a line that names that key (a line finder that points
    at the wrong line is worse than none)."""
    rng = random.Random(SEED + 2)
    checked = 0
    for case in range(300):
        label, data = mutate(rng)
        try:
            values, lines = tomlfile.parse_document(data)
        except tomlfile.TomlSyntaxError:
            continue
        # TOML ends lines at "\n" only; str.splitlines() would also split at U+2028,
        # \x0b, \x1c... that a comment may hold, and shift every later line.
        text = data.decode("utf-8").split("\n")
        for path, line in lines.items():
            last = next((p for p in reversed(path) if isinstance(p, str)), None)
            if last is None or not last.isidentifier():
                continue  # quoted keys may be spelled with escapes
            assert last in text[line - 1], f"seed {SEED + 2} case {case} ({label}): {path} at line {line}"
            checked += 1
    assert checked > 100, checked


# ---------------------------------------------------------------------------- A: parsing


def problems_of(text, name: str = "p.toml"):
    data = text if isinstance(text, bytes) else text.encode()
    with pytest.raises(PolicyError) as info:
        config.loads(data, name)
    return info.value.problems


def only_problem(text):
    found = problems_of(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def test_huge_integer_is_a_policy_error_at_its_line():
    problem = only_problem("[agent]\nstorm_rate = " + "1" * 5000 + "\n")
    assert (problem.line, problem.key) == (2, "agent.storm_rate")
    assert "20" in problem.message


@pytest.mark.parametrize("value", ["[" * 1000 + "]" * 1000, "{a=" * 600 + "1" + "}" * 600,
                                   "[" * 40 + "]" * 40], ids=["arrays-1000", "tables-600", "arrays-40"])
def test_deep_nesting_is_a_policy_error_at_its_line(value):
    problem = only_problem(f'[agent]\ninterval = "1s"\nx = {value}\n')
    assert problem.line == 3 and "nested deeper than 32" in problem.message


def test_deep_dotted_header_and_key_are_refused_fast():
    for text in ("[" + ".".join(["a"] * 100_000) + "]\n", "[agent]\n" + ".".join(["a"] * 100_000) + " = 1\n"):
        assert _timed(lambda: problems_of(text)) < 0.5
        assert "nested deeper" in problems_of(text)[0].message


def test_nesting_within_the_limit_is_fine_for_the_parser():
    values, _ = tomlfile.parse_document(("x = " + "[" * 31 + "]" * 31 + "\n").encode())
    assert "x" in values


@pytest.mark.parametrize("line", [" " * 3200, "\t" * 100_000, " " * 50_000 + "x", "a" * 100_000],
                         ids=["blank-3200", "tabs-100k", "blank-50k-x", "key-100k"])
def test_long_lines_take_linear_time(line):
    data = f"[agent]\n{line}\ninterval = \"1s\"\n".encode()
    assert _timed(lambda: tomlfile.key_lines(data)) < 0.1
    assert _timed(lambda: problems_of(data) if line.strip() else config.loads(data)) < 0.2


def test_bare_values_and_integers_are_bounded():
    assert "at most 64" in only_problem("[agent]\nstorm_rate = 1979-05-27T07:32:00" + "0" * 80 + "\n").message
    assert "digits" in only_problem("[agent]\nstorm_rate = 0x" + "f" * 30 + "\n").message
    assert only_problem("[agent]\nstorm_rate = 100_000_000_000_000_000_000\n").line == 2


def test_not_utf8_names_the_line():
    problem = only_problem(b'[agent]\ninterval = "1s"\n# caf\xe9\n')
    assert problem.line == 3 and "UTF-8" in problem.message


def test_size_cap_applies_to_loads_too():
    problem = only_problem(b"#" * (config.MAX_FILE_BYTES + 1))
    assert "1 MiB" in problem.message


@pytest.mark.parametrize("error", [RuntimeError("boom"), RecursionError(), ValueError("Exceeds the limit"),
                                   MemoryError()])
def test_any_failure_of_the_toml_library_is_a_policy_error(monkeypatch, error):
    def broken(text):
        raise error
    monkeypatch.setattr(tomlfile._toml, "loads", broken)
    problem = only_problem('[agent]\ninterval = "1s"\n')
    assert problem.file == "p.toml"


def test_control_characters_in_keys_are_escaped_in_messages():
    problem = only_problem('[agent]\n"\\u001b[2Jboom" = 1\n')
    assert "\x1b" not in str(problem) and "\\x1b" in str(problem)


def test_one_file_reports_a_bounded_number_of_problems():
    text = "[agent]\n" + "".join(f"k{i} = 1\n" for i in range(500))
    found = problems_of(text)
    assert len(found) == config.MAX_PROBLEMS_PER_FILE + 1
    assert "and 450 more problems" in found[-1].message


# ---------------------------------------------------------------------------- A: files


def _policy(tmp_path: Path, main: str = "") -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(main)
    (tmp_path / "policy.d").mkdir(exist_ok=True)
    return path


def _load_within(path: Path, seconds: float = 5.0):
    """config.load in a thread: a hang (a FIFO read) fails the test instead of the run."""
    result: dict = {}

    def run() -> None:
        try:
            result["policy"] = config.load(path)
        except BaseException as exc:  # noqa: B902 - handed to the test thread
            result["error"] = exc
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"config.load({path}) hung"
    return result


def _only_file_problem(result: dict, file: Path) -> config.Problem:
    error = result.get("error")
    assert isinstance(error, PolicyError), result
    (problem,) = error.problems
    assert problem.file == str(file)
    return problem


def test_fifo_dropin_is_refused_without_hanging(tmp_path):
    main = _policy(tmp_path)
    fifo = tmp_path / "policy.d" / "50-fifo.toml"
    os.mkfifo(fifo)
    assert "FIFO" in _only_file_problem(_load_within(main), fifo).message


def test_fifo_swapped_in_after_the_check_is_still_refused(tmp_path, monkeypatch):
    """The open itself must not wait for a writer (O_NONBLOCK), and the opened
    descriptor is checked again."""
    main = _policy(tmp_path)
    fifo = tmp_path / "policy.d" / "50-fifo.toml"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(main) if str(p) == str(fifo) else real_stat(p, *a, **k))
    assert "FIFO" in _only_file_problem(_load_within(main), fifo).message


def test_symlink_to_dev_zero_is_refused_not_read_forever(tmp_path):
    main = _policy(tmp_path)
    link = tmp_path / "policy.d" / "50-zero.toml"
    link.symlink_to("/dev/zero")
    assert "character device" in _only_file_problem(_load_within(main), link).message


def test_regular_file_longer_than_its_size_is_read_only_to_the_cap(tmp_path):
    """/proc/kallsyms is a regular file of st_size 0 holding megabytes: reading
    must stop one byte past the cap, not trust st_size."""
    try:
        with open("/proc/kallsyms", "rb") as f:
            if len(f.read(config.MAX_FILE_BYTES + 1)) <= config.MAX_FILE_BYTES:
                pytest.skip("/proc/kallsyms is short here")
    except OSError:
        pytest.skip("/proc/kallsyms is not readable here")
    main = _policy(tmp_path)
    link = tmp_path / "policy.d" / "50-kallsyms.toml"
    link.symlink_to("/proc/kallsyms")
    assert "1 MiB" in _only_file_problem(_load_within(main), link).message


def test_symlinked_dropin_to_a_regular_file_is_fine(tmp_path):
    main = _policy(tmp_path)
    real = tmp_path / "elsewhere.toml"
    real.write_text("[limits]\nmax_ceiling = 65536\n")
    (tmp_path / "policy.d" / "50-link.toml").symlink_to(real)
    assert config.load(main).limits.max_ceiling == 65536


def test_directory_named_like_a_dropin_is_refused(tmp_path):
    main = _policy(tmp_path)
    directory = tmp_path / "policy.d" / "50-dir.toml"
    directory.mkdir()
    assert "directory" in _only_file_problem(_load_within(main), directory).message


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(PolicyError) as info:
        config.load(tmp_path)
    assert "directory" in str(info.value) and str(tmp_path) in str(info.value)


def test_socket_dropin_is_refused(tmp_path):
    main = _policy(tmp_path)
    path = tmp_path / "policy.d" / "50-sock.toml"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert "socket" in _only_file_problem(_load_within(main), path).message


def test_dangling_dropin_symlink_is_an_error_not_ignored(tmp_path):
    main = _policy(tmp_path)
    link = tmp_path / "policy.d" / "50-gone.toml"
    link.symlink_to(tmp_path / "gone")
    assert "No such file" in _only_file_problem(_load_within(main), link).message


def test_unlistable_dropin_directory_is_a_policy_error(tmp_path, monkeypatch):
    main = _policy(tmp_path)
    dropins = str(tmp_path / "policy.d")
    real_listdir = os.listdir

    def listdir(path):
        if str(path) == dropins:
            raise PermissionError(13, "Permission denied", path)
        return real_listdir(path)
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(PolicyError) as info:
        config.policy_files(main)
    (problem,) = info.value.problems
    assert problem.file == dropins and "Permission denied" in problem.message
    assert _only_file_problem(_load_within(main), Path(dropins))


def test_unreadable_policy_file_is_a_policy_error(tmp_path, monkeypatch):
    main = _policy(tmp_path, '[agent]\ninterval = "1s"\n')
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path) == str(main):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", deny)
    assert "Permission denied" in _only_file_problem(_load_within(main), main).message


def test_oversized_file_is_refused(tmp_path):
    main = _policy(tmp_path)
    big = tmp_path / "policy.d" / "50-big.toml"
    big.write_bytes(b"#" * (config.MAX_FILE_BYTES + 1))
    assert "1 MiB" in _only_file_problem(_load_within(main), big).message
    big.write_bytes(b"#" * config.MAX_FILE_BYTES)
    assert "policy" in _load_within(main)


# ---------------------------------------------------------------------------- A: commands


BAD_POLICIES = {
    "syntax": '[agent]\ninterval = "1s"\ndry_run = tru\n',
    "bigint": "[agent]\nstorm_rate = " + "9" * 5000 + "\n",
    "deep": "x = " + "[" * 1000 + "]" * 1000 + "\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_POLICIES))
def test_check_prints_file_line_key_and_exits_1(tmp_path, capsys, kind):
    main = _policy(tmp_path, BAD_POLICIES[kind])
    assert cli.main(["check", "-c", str(main)]) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert f"{main}:" in err and "Traceback" not in err


def test_check_reports_an_unlistable_dropin_directory(tmp_path, capsys, monkeypatch):
    main = _policy(tmp_path)
    monkeypatch.setattr(os, "listdir", lambda path: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert cli.main(["check", "-c", str(main)]) == cli.EXIT_FAIL
    assert "Permission denied" in capsys.readouterr().err


@pytest.fixture
def isolated_run(monkeypatch):
    """`run` marks ssl as absent and configures structlog for the process: keep
    both from leaking into the tests that follow."""
    import structlog
    monkeypatch.setattr(cli, "_keep_tls_out", lambda: None)
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.parametrize("kind", sorted(BAD_POLICIES) + ["fifo"])
def test_run_exits_78_for_every_policy_problem(tmp_path, capsys, isolated_run, kind):
    main = _policy(tmp_path, BAD_POLICIES.get(kind, ""))
    if kind == "fifo":
        os.mkfifo(tmp_path / "policy.d" / "50-fifo.toml")
    assert cli.main(["run", "-c", str(main), "--log-format", "json"]) == cli.EXIT_CONFIG
    assert "Traceback" not in capsys.readouterr().err


def test_plan_prints_the_error(tmp_path, capsys):
    main = _policy(tmp_path, BAD_POLICIES["bigint"])
    assert cli.main(["plan", "-c", str(main)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{main}:2: agent.storm_rate:" in err and "Traceback" not in err


def test_status_prints_the_error_and_reads_with_the_defaults(tmp_path, capsys, monkeypatch):
    main = _policy(tmp_path, BAD_POLICIES["deep"])
    seen = []

    class NoKernel:
        last_sample = None

        def status_line(self) -> str:
            return "no kernel in this test"
    monkeypatch.setattr(cli, "_kernel_agent", lambda args, policy: (seen.append(policy), NoKernel())[1])
    assert cli.main(["status", "--kernel", "-c", str(main)]) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert f"{main}:1: x:" in err and "Traceback" not in err
    assert seen and seen[0].sources == ("<built-in>",)


# ---------------------------------------------------------------------------- B: cross-field checks


def test_memory_ceiling_terms_are_bounded():
    found = problems_of("[limits]\nentry_bytes = 1\nentry_overhead_bytes = 0\nmemory_share = 0.5\n")
    assert [(p.line, p.key) for p in found] == [
        (2, "limits.entry_bytes"), (3, "limits.entry_overhead_bytes"), (4, "limits.memory_share")]
    limits = config.loads(b"[limits]\nentry_bytes = 192\nentry_overhead_bytes = 64\nmemory_share = 0.25\n").limits
    assert (limits.entry_bytes, limits.entry_overhead_bytes, limits.memory_share) == (192, 64, 0.25)
    assert config.loads(b"[limits]\nentry_bytes = 0\n").limits.entry_bytes == 0


def test_worst_allowed_ceiling_stays_below_half_the_ram():
    from conntrack_agent import model
    mem = 1 << 30
    entries = model.memory_ceiling(mem, config.MAX_MEMORY_SHARE, config.MIN_ENTRY_BYTES,
                                   config.MIN_OVERHEAD_BYTES, 64.0)
    # priced at a real x86_64 entry (256 + 128 of extensions + its bucket)
    assert entries * (256 + 128 + 8) < mem / 2


def test_raise_only_off_needs_restore_below_under_the_trigger():
    text = ('[[rule]]\nname = "grow-table"\n[rule.trigger]\nusage_at_least = 0.75\n'
            '[rule.raise_max]\nraise_only = false\nrestore_below = 0.75\n')
    problem = only_problem(text)
    assert (problem.line, problem.key) == (7, "rule[grow-table].raise_max.restore_below")
    assert "flap" in problem.message
    config.loads(text.replace("restore_below = 0.75", "restore_below = 0.5").encode())
    config.loads(text.replace("raise_only = false", "raise_only = true").encode())  # never restores


def test_raise_only_off_alone_is_checked_against_the_default_restore_below():
    text = '[[rule]]\nname = "grow-table"\n[rule.trigger]\nusage_at_least = 0.4\n[rule.raise_max]\nraise_only = false\n'
    problem = only_problem(text)
    assert problem.key == "rule[grow-table].raise_max.raise_only" and problem.line == 6


def test_set_timeouts_restore_below_under_the_trigger():
    text = '[[rule]]\nname = "shorten-timeouts"\n[rule.set_timeouts]\nrestore_below = 0.9\n'
    assert only_problem(text).key == "rule[shorten-timeouts].set_timeouts.restore_below"


EVICT_ALL = '[[rule]]\nname = "evict-stale"\n[rule.evict]\nstatus = "any"\ninclude_established = true\n'


def _evict_all_but(selector: str) -> str:
    if selector.startswith("status"):
        return EVICT_ALL.replace('status = "any"', selector)
    return EVICT_ALL + selector + "\n"


@pytest.mark.parametrize("selector", [
    'src = "0.0.0.0/0"', 'dst = "::/0"', 'timeout_below = "30d"', 'timeout_below = "2h"',
    'protocols = ["tcp", "udp"]', 'tcp_states = ["ESTABLISHED", "TIME_WAIT"]', 'status = "assured"',
    'protocols = ["dccp", "gre", "icmp", "icmpv6", "sctp", "tcp", "udp", "udplite"]',
])
def test_include_established_with_a_selector_that_narrows_nothing_is_refused(selector):
    text = _evict_all_but(selector)
    problem = only_problem(text)
    assert problem.key == "rule[evict-stale].evict.include_established" and "live connections" in problem.message


@pytest.mark.parametrize("selector", [
    'src = "10.0.0.0/8"', "dport = 443", "mark = 16", "zone = 3", 'timeout_below = "30m"',
    'protocols = ["udp"]', 'tcp_states = ["TIME_WAIT"]', 'status = "unreplied"',
])
def test_include_established_with_a_narrowing_selector_is_accepted(selector):
    text = _evict_all_but(selector)
    assert config.loads(text.encode()).rules[2].evict.include_established


def test_established_timeout_bound_follows_the_policy():
    """timeout_below narrows live connections only under the shortest established
    timeout the policy may set: 1h with the shipped rules, 5d without one."""
    assert config.established_timeout(config.loads(b"")) == 3600.0
    off = ('[[rule]]\nname = "shorten-timeouts"\n[rule.set_timeouts.values]\ntcp_timeout_established = "10m"\n')
    assert config.established_timeout(config.loads(off.encode())) == 600.0
    problem = only_problem(off + EVICT_ALL + 'timeout_below = "30m"\n')
    assert "under 10m" in problem.message


def test_usage_trigger_at_zero_is_refused():
    problem = only_problem('[[rule]]\nname = "grow-table"\n[rule.trigger]\nusage_at_least = 0\n')
    assert problem.key == "rule[grow-table].trigger.usage_at_least" and "0.05" in problem.message


def test_the_same_rule_twice_in_one_file_is_an_error():
    text = ('[[rule]]\nname = "grow-table"\ncooldown = "1s"\n'
            '[[rule]]\nname = "grow-table"\naction = "evict"\n[rule.evict]\nstatus = "unreplied"\n')
    problem = only_problem(text)
    assert (problem.line, problem.key) == (5, "rule[grow-table].name")
    assert "line 2" in problem.message


def test_rules_still_merge_by_name_across_files(tmp_path):
    main = _policy(tmp_path, '[[rule]]\nname = "grow-table"\ncooldown = "1s"\n')
    (tmp_path / "policy.d" / "50-a.toml").write_text('[[rule]]\nname = "grow-table"\ncooldown = "2s"\n')
    assert config.load(main).rules[0].cooldown == 2.0


def test_a_dropin_changing_the_action_must_give_the_whole_table(tmp_path):
    main = _policy(tmp_path)
    dropin = tmp_path / "policy.d" / "50-a.toml"
    dropin.write_text('[[rule]]\nname = "grow-table"\naction = "evict"\n')
    with pytest.raises(PolicyError) as info:
        config.load(main)
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.key) == (str(dropin), 3, "rule[grow-table].action")
    dropin.write_text('[[rule]]\nname = "grow-table"\naction = "evict"\n[rule.evict]\nstatus = "unreplied"\n'
                      "target_usage = 0.5\n")
    rule = config.load(main).rules[0]
    assert rule.action == "evict" and rule.evict == config.Evict(status="unreplied", target_usage=0.5)


def test_one_timeout_under_two_names_is_an_error():
    text = ('[[rule]]\nname = "shorten-timeouts"\n[rule.set_timeouts.values]\nudp_timeout = "10s"\n'
            'nf_conntrack_udp_timeout = "20s"\n')
    problem = only_problem(text)
    assert problem.line == 5 and "udp_timeout" in problem.message and "line 4" in problem.message


@pytest.mark.parametrize("state_file, fragment", [
    ("/proc/self/fd/1", "/proc"), ("/sys/x", "/sys"), ("/dev/null", "/dev"), ("//proc/x", "/proc"),
    ("/var/lib/../../proc/x", "/proc"), ("/var/lib/x/", "directory"), ("/var/lib/..", "directory"),
    ("/var/\\u0000x", "NUL"), ("/" + "a" * 5000, "PATH_MAX"), ("state.json", "absolute"), ("", "absolute"),
])
def test_bad_state_files_are_refused(state_file, fragment):
    problem = only_problem(f'[agent]\nstate_file = "{state_file}"\n')
    assert problem.key == "agent.state_file" and fragment in problem.message


def test_good_state_file():
    assert config.loads(b'[agent]\nstate_file = "/run/ca/state.json"\n').agent.state_file == "/run/ca/state.json"


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/run/netns/x", "", "x" * 65, "a\nb", "a b"])
def test_namespace_names_are_not_paths(name):
    assert not config.valid_netns_name(name)
    problem = only_problem(f"[agent]\nnamespaces = [{name!r}]\n".replace("'", '"').replace("\n]", "\\n]"))
    assert problem.key == "agent.namespaces"


def test_valid_namespace_names():
    for name in ("blue", "cni-1234-abcd", "ns.1", "a" * 64, "..."):
        assert config.valid_netns_name(name), name
    assert not config.valid_netns_name(None)


def test_mark_mask_without_a_mark():
    problem = only_problem('[[rule]]\nname = "evict-stale"\n[rule.evict]\nmark_mask = 255\n')
    assert problem.key == "rule[evict-stale].evict.mark_mask" and problem.line == 4


# ---------------------------------------------------------------------------- C: one definition


def test_policy_layer_imports_neither_the_codec_nor_the_engine():
    code = ("import sys; import conntrack_agent.config; "
            "print(sorted(m for m in sys.modules if m.startswith('conntrack_agent')))")
    env = dict(os.environ, PYTHONPATH=str(REPO / "agent"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "ctnetlink" not in out and "conntrack_agent.evict'" not in out, out


def test_the_evict_table_is_the_spec():
    assert config._SCHEMA["evict"] is evictspec.SCHEMA
    assert [f.name for f in dataclasses.fields(config.Evict)] == [f.name for f in evictspec.FIELDS]


def test_codec_takes_its_names_from_the_spec_module():
    from conntrack_agent import ctnetlink, evict
    assert ctnetlink.TCP_STATES is evictspec.TCP_STATES and ctnetlink.PROTO_NAMES is evictspec.PROTO_NAMES
    assert evict.EvictSpec is evictspec.EvictSpec


def test_cli_options_are_generated_from_the_fields():
    parser = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["evict"]
    dests = {a.dest: a.option_strings for a in parser._actions}
    for spec_field in evictspec.FIELDS:
        if spec_field.option:
            assert dests.get(spec_field.name) == [spec_field.option], spec_field.name


def _forms(spec_field: evictspec.Field, value: float):
    """(TOML text, Python value, command-line text) of one numeric value."""
    if spec_field.kind == "duration":
        text = f"{round(value * 1000)}ms"
        return f'"{text}"', value, text
    if spec_field.kind == "integer":
        return str(int(value)), int(value), str(int(value))
    return repr(float(value)), float(value), repr(float(value))


NUMERIC = [f for f in evictspec.FIELDS if f.kind in ("integer", "duration", "ratio")]


def _accepts(spec_field: evictspec.Field, value: float) -> List[bool]:
    toml, python, text = _forms(spec_field, value)
    extra = "mark = 1\n" if spec_field.name == "mark_mask" else ""
    doc = (f'[[rule]]\nname = "evict-stale"\n[rule.trigger]\nusage_at_least = 1.0\n[rule.evict]\n'
           f"{extra}{spec_field.name} = {toml}\n")
    results = []
    for attempt in (lambda: config.loads(doc.encode()),
                    lambda: evictspec.EvictSpec(**{spec_field.name: python}, **({"mark": 1} if extra else {}))):
        try:
            attempt()
            results.append(True)
        except (PolicyError, ValueError):
            results.append(False)
    if spec_field.option or spec_field.name == "mark_mask":
        option, arg = (("--mark", f"1/{text}") if spec_field.name == "mark_mask" else (spec_field.option, text))
        args = cli.build_parser().parse_args(["evict", option, arg])
        try:
            cli._evict_selection(args, config.loads(b""))
            results.append(True)
        except ValueError:
            results.append(False)
    return results


@pytest.mark.parametrize("spec_field", NUMERIC, ids=lambda f: f.name)
def test_policy_engine_and_cli_share_each_range(spec_field):
    step = {"integer": 1, "duration": 0.001, "ratio": 0.001}[spec_field.kind]
    for value in (spec_field.low, spec_field.high):
        assert _accepts(spec_field, value) == [True] * len(_accepts(spec_field, value)), (spec_field.name, value)
    for value in (spec_field.low - step, spec_field.high + step):
        if value < 0 and spec_field.kind == "duration":
            continue  # a negative duration has no spelling
        verdicts = _accepts(spec_field, value)
        assert verdicts == [False] * len(verdicts), (spec_field.name, value, verdicts)


@pytest.mark.parametrize("argv, fragment", [
    (["--dport", "0"], "--dport"), (["--sport", "0"], "--sport"), (["--age-timeout", "0s"], "--age-timeout"),
    (["--mark", "0x10/"], "empty mask"), (["--mark", "0x10/0"], "mask"), (["--budget-time", "2m"], "--budget-time"),
    (["--target-usage", "1"], "--target-usage"), (["--timeout-below", "0s"], "--timeout-below"),
    (["--src", "0.0.0.0/0"], "narrows"), (["--include-established", "--src", "::/0"], "narrows"),
    (["--include-established", "--proto", "tcp"], "live TCP"), (["--netns", ".."], "--netns"),
    (["--state", "TIME_WAIT", "--proto", "udp"], "--state"),
])
def test_cli_refuses_what_the_policy_refuses(capsys, argv, fragment):
    assert cli.main(["evict"] + argv) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_narrowing_is_semantic():
    spec = evictspec.EvictSpec
    assert evictspec.narrowing(spec(src="0.0.0.0/0")) == evictspec.narrowing(spec(dst="::/0")) == ()
    assert evictspec.narrowing(spec(timeout_below=5 * 86400.0)) == ()
    assert evictspec.narrowing(spec(timeout_below=60.0, src="10.1.2.3")) == ("src", "timeout_below")
    assert evictspec.narrowing(spec(protocols=("tcp",))) == ("protocols",)
    assert evictspec.narrowing(spec(protocols=("tcp",)), live_connections=True) == ()
    assert evictspec.narrowing(spec(status="assured"), live_connections=True) == ()
    assert evictspec.narrowing(spec(status="unreplied"), live_connections=True) == ("status",)


# ---------------------------------------------------------------------------- E: the documentation


def test_security_md_states_the_limits():
    text = (REPO / "SECURITY.md").read_text()
    for needle in ("1 MiB", f"{tomlfile.MAX_DEPTH} levels", f"{tomlfile.MAX_INT_DIGITS} digits",
                   f"{tomlfile.MAX_BARE_VALUE} characters", str(config.MIN_ENTRY_BYTES),
                   str(config.MIN_OVERHEAD_BYTES), str(config.MAX_MEMORY_SHARE)):
        assert needle in text, needle
    assert "/work/" not in text

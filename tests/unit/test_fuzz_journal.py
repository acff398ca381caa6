"""Fuzzing the change journal's loader: random JSON shapes and mutations of valid
files. Loading must never raise for content, every record it keeps must satisfy
the schema (checked here independently of journal.py's own checks), and each
case must finish quickly.

Seeded and bounded in time. Reproduce a failure with the seed in its message:
    JOURNAL_FUZZ_SEED=<seed> pytest tests/unit/test_fuzz_journal.py
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, List

from conntrack_agent import journal
from conntrack_agent.journal import Change, ChangeJournal

SEED = int(os.environ.get("JOURNAL_FUZZ_SEED", "20240611"))
# A fixed number of cases, not a time budget: on a loaded machine a time budget
# silently tests less (or fails a minimum count) for reasons that are not the code's.
SCALE = float(os.environ.get("JOURNAL_FUZZ_SCALE", "1.0"))
PARSE_CASES = int(3000 * SCALE)
FILE_CASES = int(200 * SCALE)
CASE_LIMIT = 0.5   # seconds: no single small file may take longer

# The schema, written again from the specification rather than imported.
NETNS = re.compile(r"\A[A-Za-z0-9_.\-]{1,64}\Z")
NAME = re.compile(r"\Anf_conntrack_[a-z0-9_]{1,64}\Z")
RULE = re.compile(r"\A[A-Za-z0-9_.\-]{0,64}\Z")


def assert_schema(change: Change, context: str) -> None:
    assert type(change.netns) is str and (change.netns == "" or (NETNS.match(change.netns)
                                                                   and change.netns not in (".", ".."))), context
    assert type(change.name) is str and NAME.match(change.name), context
    assert change.action in ("raise_max", "resize_buckets", "set_timeouts"), context
    for value in (change.original, change.applied):
        assert type(value) is int and 0 <= value <= 2 ** 63 - 1, context
    assert type(change.rule) is str and RULE.match(change.rule), context
    assert type(change.since) is float and math.isfinite(change.since) and change.since >= 0, context
    assert change.restore_after is None or (type(change.restore_after) is float
                                            and 0 <= change.restore_after <= 30 * 86400), context
    assert change.restore_below is None or (type(change.restore_below) is float
                                            and 0 <= change.restore_below <= 1), context
    assert type(change.pending) is bool, context


# ---------------------------------------------------------------------------- generators

NASTY_STRINGS = [
    "", ".", "..", "../../proc/1/ns/net", "/proc/1/ns/net", "/run/netns/ns1", "ns1/../..", "ns1\n", "ns1\x00",
    " ns1", "x" * 64, "x" * 65, "ns1", "nf_conntrack_max", "nf_conntrack_max\n", "nf_conntrack_", "nf_conntrack_MAX",
    "nf_conntrack_../../x", "nf_conntrack_udp_timeout", "raise_max", "evict", "\x1b[2J", "\u202e", "é", "\ud800",
    "1", "true", "null", "NaN",
]
NASTY_NUMBERS: List[Any] = [0, -1, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 30, 0.5, -0.0, 1.0, 1e308,
                            float("nan"), float("inf"), float("-inf"), 30 * 86400, 30 * 86400 + 0.5, True, False]
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 5000, b"1" * 50, b"-0", b"1.0e-400",
            b"true", b"null", b'"\\ud800"', b"[]", b"{}", b"\"" + b"a" * 100 + b"\""]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice(NASTY_STRINGS + NASTY_NUMBERS + [None])
    if roll < 0.5:
        return "".join(chr(rng.randrange(0, 0x2FF)) for _ in range(rng.randrange(0, 12)))
    if roll < 0.6:
        return rng.randrange(-10 ** 20, 10 ** 20)
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(journal._FIELD_NAMES + ("version", "changes", "x")): random_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 5))}


def valid_record(rng: random.Random, version: int) -> dict:
    name = rng.choice(["nf_conntrack_max", "nf_conntrack_buckets", "nf_conntrack_udp_timeout",
                       "nf_conntrack_tcp_timeout_established", "nf_conntrack_icmp_timeout"])
    record = {"netns": rng.choice(["", "ns1", "blue.net", "a-b_c"]), "name": name,
              "original": rng.randrange(0, 2 ** 63), "applied": rng.randrange(0, 2 ** 40),
              "rule": rng.choice(["", "grow", "calm-2"]), "since": rng.choice([0, 1.5, time.time()])}
    if version == 2:
        record.update(action=journal.infer_action(name), restore_after=rng.choice([None, 0, 600.5, 30 * 86400]),
                      restore_below=rng.choice([None, 0, 0.5, 1]), pending=rng.choice([True, False]))
    return record


def valid_doc(rng: random.Random) -> dict:
    version = rng.choice([1, 2])
    return {"version": version, "changes": [valid_record(rng, version) for _ in range(rng.randrange(0, 6))]}


def mutate_doc(rng: random.Random, doc: dict) -> Any:
    for _ in range(rng.randrange(1, 4)):
        roll = rng.random()
        records = doc.get("changes") if isinstance(doc, dict) else None
        if isinstance(records, list) and records and roll < 0.6:
            i = rng.randrange(len(records))
            record = records[i]
            if not isinstance(record, dict):
                continue
            kind = rng.random()
            if kind < 0.55:
                record[rng.choice(journal._FIELD_NAMES)] = random_value(rng)   # type swaps, ranges, paths
            elif kind < 0.7 and record:
                del record[rng.choice(list(record))]
            elif kind < 0.8:
                record[rng.choice(["future", "__proto__", "\x1b"])] = random_value(rng)
            elif kind < 0.9:
                records.append(dict(record))   # a duplicate key
            else:
                records[i] = random_value(rng)
        elif roll < 0.7:
            doc["version"] = rng.choice([0, 1, 2, 3, "2", 2.0, True, None, -1])
        elif roll < 0.8:
            doc["changes"] = random_value(rng)
        elif roll < 0.9:
            doc[rng.choice(["extra", "version"])] = random_value(rng)
        else:
            return random_value(rng)
    return doc


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.2:
        return raw[:rng.randrange(0, len(raw) + 1)]                       # truncation
    if roll < 0.45:
        # A JSON literal where a number was: NaN, Infinity, 1e400, 5000 digits...
        spots = [m.end() for m in re.finditer(rb":\s*", raw)]
        if spots:
            at = rng.choice(spots)
            end = at + len(re.match(rb"-?[0-9.eE+-]*|\"[^\"]*\"|true|false|null", raw[at:]).group(0))
            return raw[:at] + rng.choice(LITERALS) + raw[end:]
        return raw
    if roll < 0.55:
        depth = rng.choice([10, 500, 999, 1000, 1001, 5000, 100000])
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        inner = opener * depth + b"1" + closer * depth
        return raw.replace(b'"changes": [', b'"changes": [' + inner + b",", 1) if rng.random() < 0.5 else inner
    if roll < 0.7:
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)                # byte flips, non-UTF-8
        return bytes(data)
    if roll < 0.8:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))    # random bytes
    if roll < 0.9:
        at = rng.randrange(len(raw) + 1)
        return raw[:at] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\xef\xbb\xbf", b",", b"]", b"}"]) + raw[at:]
    return raw + raw[: rng.randrange(len(raw) + 1)]                           # trailing garbage


def random_case(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.2:
        return json.dumps(random_value(rng)).encode()
    doc = valid_doc(rng)
    if roll < 0.3:
        return json.dumps(doc).encode()
    if roll < 0.7:
        return json.dumps(mutate_doc(rng, doc)).encode()
    raw = json.dumps(doc, indent=rng.choice([None, 1])).encode()
    return mutate_bytes(rng, raw)


def cases(seed: int, count: int) -> Any:
    """(index, bytes), `count` of them, the same for a seed on every machine."""
    rng = random.Random(seed)
    for index in range(count):
        yield index, random_case(rng)


def timed(fn: Callable[[], Any], context: str) -> Any:
    start = time.monotonic()
    result = fn()
    took = time.monotonic() - start
    assert took < CASE_LIMIT, f"{context}: took {took:.2f} s"
    return result


# ---------------------------------------------------------------------------- the tests


def test_fuzz_parse_never_raises_and_keeps_only_valid_records() -> None:
    count = 0
    kinds = {"unusable": 0, "clean": 0, "partial": 0}
    for index, raw in cases(SEED, PARSE_CASES):
        context = f"seed {SEED} case {index}: {raw[:120]!r}"
        try:
            parsed = timed(lambda: journal.parse(raw, "state.json"), context)
        except Exception as exc:   # noqa: BLE001 - the point of the test
            raise AssertionError(f"{context}: parse raised {exc!r}") from exc
        if parsed.unusable is not None:
            assert not parsed.changes, context
            kinds["unusable"] += 1
        else:
            kinds["partial" if parsed.dropped else "clean"] += 1
        for change in parsed.changes.values():
            assert_schema(change, context)
        assert len({(c.netns, c.name) for c in parsed.changes.values()}) == len(parsed.changes), context
        for line in parsed.problems + parsed.dropped:
            assert line.isascii() and "\x1b" not in line, context
        count += 1
    # The generator must actually reach every outcome, and in bulk.
    assert all(kinds.values()), f"seed {SEED}: {count} cases, {kinds}"
    print(f"seed {SEED}: {count} cases, {kinds}")


def test_fuzz_load_from_files(tmp_path: Path) -> None:
    count = 0
    for index, raw in cases(SEED + 1, FILE_CASES):
        state_dir = tmp_path / str(index)
        state_dir.mkdir(mode=0o700)
        path = str(state_dir / "state.json")
        Path(path).write_bytes(raw)
        quarantine = index % 2 == 0
        context = f"seed {SEED + 1} case {index} quarantine={quarantine}: {raw[:120]!r}"
        j = ChangeJournal(path)
        try:
            report = timed(lambda: j.load(quarantine=quarantine), context)
        except Exception as exc:   # noqa: BLE001 - content must never raise, not even JournalError
            raise AssertionError(f"{context}: load raised {exc!r}") from exc
        for change in j.entries():
            assert_schema(change, context)
        if not quarantine:
            assert Path(path).read_bytes() == raw and report.quarantined is None, context
        elif report.dropped:
            # What could not be kept is preserved byte for byte, and what was kept reloads cleanly.
            assert report.quarantined and Path(report.quarantined).read_bytes() == raw, context
            again = ChangeJournal(path)
            assert again.load().dropped == [] and again.entries() == j.entries(), context
        # And the agent can carry on recording.
        j.begin("fz", "nf_conntrack_udp_timeout", "set_timeouts", 30, 10, "fuzz")
        assert ChangeJournal(path).load().dropped == [], context
        count += 1
    print(f"seed {SEED + 1}: {count} files loaded")

"""The change journal: API semantics, and each hardening item of the abuse review
(every test here fails against the version 1 journal.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from conntrack_agent import journal
from conntrack_agent.journal import Change, ChangeJournal, JournalError

IS_ROOT = os.geteuid() == 0
OTHER_UID = 4242   # no such user on a test box; only root can chown to it


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def path(state_dir: Path) -> str:
    return str(state_dir / "state.json")


def loaded(p: str, quarantine: bool = True) -> ChangeJournal:
    j = ChangeJournal(p)
    j.load(quarantine=quarantine)
    return j


def on_disk(p: str) -> dict:
    return json.loads(Path(p).read_text())


def v1_file(p: str, changes: List[dict]) -> None:
    # Exactly how the version 1 journal wrote its file.
    Path(p).write_text(json.dumps({"version": 1, "changes": changes}, indent=1, sort_keys=True))


def v2_record(**over: object) -> dict:
    record = {"netns": "", "name": "nf_conntrack_max", "action": "raise_max", "original": 262144,
              "applied": 524288, "rule": "r", "since": 1700000000.5, "restore_after": 600.0,
              "restore_below": 0.5, "pending": False}
    record.update(over)
    return record


def v2_file(p: str, records: List[dict]) -> bytes:
    raw = json.dumps({"version": 2, "changes": records}).encode()
    Path(p).write_bytes(raw)
    return raw


def siblings(d: Path, prefix: str) -> List[Path]:
    return sorted(x for x in d.iterdir() if x.name.startswith(prefix))


def finishes(fn: Callable[[], object], seconds: float = 5.0) -> object:
    """fn's result; fails (instead of hanging the suite) if it blocks."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(_capture(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    kind, value = box[0]
    if kind == "raise":
        raise value
    return value


def _capture(fn: Callable[[], object]) -> tuple:
    try:
        return ("ok", fn())
    except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
        return ("raise", exc)


def in_child(fn: Callable[[], None], uid: int = -1) -> int:
    """Run fn in a forked child (as uid if given); its exit code: 0 ok, 3 JournalError, 4 other."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 4
        try:
            if uid >= 0:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            fn()
            code = 0
        except JournalError:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# =========================================================================== API semantics


def test_no_directory_and_no_file_load_empty(tmp_path: Path) -> None:
    for p in (tmp_path / "absent" / "state.json", tmp_path / "state.json"):
        j = ChangeJournal(str(p))
        report = j.load()
        assert j.entries() == [] and report.problems == [] and report.quarantined is None
        assert not p.parent.exists() or not p.exists()   # loading creates nothing


def test_begin_confirm_persist_and_round_trip(path: str) -> None:
    j = loaded(path)
    token = j.begin("", "nf_conntrack_max", "raise_max", 262144, 524288, "grow", 600, 0.5)
    pending = on_disk(path)["changes"][0]
    assert pending["pending"] is True and pending["original"] == 262144 and pending["applied"] == 524288
    j.confirm(token, 524000)   # what the kernel kept
    assert on_disk(path)["version"] == journal.SCHEMA_VERSION
    again = loaded(path)
    assert again.entries() == j.entries()
    change = again.get("", "nf_conntrack_max")
    assert change == Change("", "nf_conntrack_max", "raise_max", 262144, 524000, "grow", change.since,
                            600.0, 0.5, pending=False)
    assert isinstance(change.restore_after, float) and abs(change.since - time.time()) < 60
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_begin_keeps_the_original_and_moves_ownership(path: str) -> None:
    j = loaded(path)
    j.confirm(j.begin("ns1", "nf_conntrack_udp_timeout", "set_timeouts", 30, 20, "first", 300, 0.6), 20)
    since = j.get("ns1", "nf_conntrack_udp_timeout").since
    # After a crash `current` is the agent's own 20: it must not become the original.
    token = j.begin("ns1", "nf_conntrack_udp_timeout", "set_timeouts", 20, 10, "second", 900, 0.4)
    for source in (j, loaded(path)):
        change = source.get("ns1", "nf_conntrack_udp_timeout")
        assert (change.original, change.applied, change.rule, change.restore_after, change.restore_below,
                change.pending, change.since) == (30, 10, "second", 900.0, 0.4, True, since)
    j.confirm(token, 10)
    assert loaded(path).get("ns1", "nf_conntrack_udp_timeout").pending is False


def test_a_crash_between_begin_and_confirm_leaves_a_pending_record(path: str) -> None:
    def begin_and_die() -> None:
        j = loaded(path)
        j.begin("", "nf_conntrack_buckets", "resize_buckets", 65536, 131072, "grow")
        os._exit(9)   # killed before the write and confirm()

    assert in_child(begin_and_die) == 9
    change = loaded(path).get("", "nf_conntrack_buckets")
    assert change.pending is True and change.original == 65536 and change.applied == 131072


def test_rollback_removes_a_new_record(path: str) -> None:
    j = loaded(path)
    j.rollback(j.begin("", "nf_conntrack_max", "raise_max", 100, 200, "r"))
    assert j.entries() == [] and on_disk(path)["changes"] == []


def test_rollback_puts_the_previous_record_back_exactly(path: str) -> None:
    j = loaded(path)
    j.confirm(j.begin("", "nf_conntrack_max", "raise_max", 100, 200, "a", 60, 0.3), 200)
    j.confirm(j.begin("", "nf_conntrack_buckets", "resize_buckets", 8, 16, "a"), 16)
    before, file_before = j.entries(), on_disk(path)
    j.rollback(j.begin("", "nf_conntrack_max", "raise_max", 200, 400, "b", 1, 0.9))
    assert j.entries() == before and on_disk(path) == file_before   # order kept too


def test_a_token_is_used_once(path: str) -> None:
    j = loaded(path)
    token = j.begin("", "nf_conntrack_max", "raise_max", 100, 200, "r")
    j.confirm(token, 200)
    with pytest.raises(ValueError):
        j.rollback(token)
    with pytest.raises(ValueError):
        j.confirm(token, 200)


def test_confirm_after_the_record_was_forgotten_keeps_the_original(path: str) -> None:
    j = loaded(path)
    token = j.begin("ns1", "nf_conntrack_tcp_timeout_established", "set_timeouts", 432000, 3600, "r")
    j.forget_namespace("ns1")
    j.confirm(token, 3600)   # the write did happen: the original must stay known
    change = loaded(path).get("ns1", "nf_conntrack_tcp_timeout_established")
    assert change.original == 432000 and change.pending is False


def test_forget_saves_only_when_something_changed(path: str) -> None:
    j = loaded(path)
    j.confirm(j.begin("", "nf_conntrack_max", "raise_max", 100, 200, "r"), 200)
    inode = os.stat(path).st_ino
    assert j.forget("ns9", "nf_conntrack_max") is False
    assert os.stat(path).st_ino == inode   # no rewrite
    assert j.forget("", "nf_conntrack_max") is True
    assert on_disk(path)["changes"] == [] and j.get("", "nf_conntrack_max") is None


def test_forget_namespace(path: str) -> None:
    j = loaded(path)
    for ns, name in (("a", "nf_conntrack_udp_timeout"), ("b", "nf_conntrack_udp_timeout"),
                     ("a", "nf_conntrack_tcp_timeout_close"), ("", "nf_conntrack_max")):
        j.confirm(j.begin(ns, name, journal.infer_action(name), 100, 50, "r"), 50)
    gone = j.forget_namespace("a")
    assert sorted(c.name for c in gone) == ["nf_conntrack_tcp_timeout_close", "nf_conntrack_udp_timeout"]
    assert [(c.netns, c.name) for c in loaded(path).entries()] == [("b", "nf_conntrack_udp_timeout"),
                                                                   ("", "nf_conntrack_max")]
    assert j.forget_namespace("a") == []


def test_reassign(path: str) -> None:
    j = loaded(path)
    j.confirm(j.begin("", "nf_conntrack_udp_timeout", "set_timeouts", 30, 10, "old", 60, 0.5), 10)
    j.reassign("", "nf_conntrack_udp_timeout", "new", 120, 0.25)
    change = loaded(path).get("", "nf_conntrack_udp_timeout")
    assert (change.rule, change.restore_after, change.restore_below, change.original, change.applied) == \
        ("new", 120.0, 0.25, 30, 10)
    j.reassign("", "nf_conntrack_absent", "x", None, None)   # nothing to adopt: no error
    with pytest.raises(JournalError):
        j.reassign("", "nf_conntrack_udp_timeout", "bad name!", None, None)
    assert loaded(path).get("", "nf_conntrack_udp_timeout").rule == "new"


def test_entries_and_get_are_copies_in_insertion_order(path: str) -> None:
    j = loaded(path)
    for name in ("nf_conntrack_udp_timeout", "nf_conntrack_max", "nf_conntrack_buckets"):
        j.confirm(j.begin("", name, journal.infer_action(name), 10, 20, "r"), 20)
    entries = j.entries()
    assert [c.name for c in entries] == ["nf_conntrack_udp_timeout", "nf_conntrack_max", "nf_conntrack_buckets"]
    entries[0].original = 999
    entries.pop()
    j.get("", "nf_conntrack_max").original = 999
    assert [c.original for c in j.entries()] == [10, 10, 10]


def test_version_1_files_load_with_inferred_actions(path: str) -> None:
    v1_file(path, [
        {"netns": "", "name": "nf_conntrack_max", "original": 262144, "applied": 524288, "rule": "grow",
         "since": 1700000000.0},
        {"netns": "", "name": "nf_conntrack_buckets", "original": 65536, "applied": 131072, "rule": "grow",
         "since": 1700000001},
        {"netns": "ns1", "name": "nf_conntrack_tcp_timeout_time_wait", "original": 120, "applied": 30,
         "rule": "calm", "since": 1700000002.0},
    ])
    j = ChangeJournal(path)
    report = j.load()
    assert report.problems == [] and report.dropped == [] and report.quarantined is None
    assert [(c.action, c.pending, c.restore_after, c.restore_below) for c in j.entries()] == [
        ("raise_max", False, None, None), ("resize_buckets", False, None, None), ("set_timeouts", False, None, None)]
    assert isinstance(j.get("", "nf_conntrack_buckets").since, float)
    j.forget("", "nf_conntrack_max")
    assert on_disk(path)["version"] == 2 and len(loaded(path).entries()) == 2


def test_version_1_record_whose_action_cannot_be_inferred_is_dropped(path: str) -> None:
    v1_file(path, [{"netns": "", "name": "nf_conntrack_expect_max", "original": 1, "applied": 2, "rule": "",
                    "since": 0.0}])
    j = ChangeJournal(path)
    report = j.load()
    assert j.entries() == [] and len(report.dropped) == 1 and "action" in report.problems[0]


@pytest.mark.parametrize("args", [
    ("../../proc/1/ns/net", "nf_conntrack_max", "raise_max", 1, 2, "r"),
    ("", "../../kernel/core_pattern", "raise_max", 1, 2, "r"),
    ("", "nf_conntrack_max", "evict", 1, 2, "r"),
    ("", "nf_conntrack_max", "raise_max", -1, 2, "r"),
    ("", "nf_conntrack_max", "raise_max", True, 2, "r"),
    ("", "nf_conntrack_max", "raise_max", 1, 2 ** 63, "r"),
    ("", "nf_conntrack_max", "raise_max", 1, 2, "rule with spaces"),
    ("", "nf_conntrack_max", "raise_max", 1, 2, "r", float("nan")),
    ("", "nf_conntrack_max", "raise_max", 1, 2, "r", 31 * 86400),
    ("", "nf_conntrack_max", "raise_max", 1, 2, "r", None, 1.5),
])
def test_begin_refuses_what_load_would_drop_and_changes_nothing(path: str, args: tuple) -> None:
    j = loaded(path)
    j.confirm(j.begin("", "nf_conntrack_buckets", "resize_buckets", 8, 16, "r"), 16)
    before = Path(path).read_bytes()
    with pytest.raises(JournalError):
        j.begin(*args)
    assert Path(path).read_bytes() == before and len(j.entries()) == 1


def test_confirm_refuses_a_bad_value(path: str) -> None:
    j = loaded(path)
    token = j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    with pytest.raises(JournalError):
        j.confirm(token, -5)
    j.confirm(token, 2)   # the token is still good


def test_a_failed_save_changes_nothing(path: str, monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    j = loaded(path)
    j.confirm(j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r"), 2)
    before = Path(path).read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.os, "replace", full)
    with pytest.raises(JournalError, match="state.json.*No space left"):
        j.begin("", "nf_conntrack_buckets", "resize_buckets", 8, 16, "r")
    with pytest.raises(JournalError):
        j.forget("", "nf_conntrack_max")
    assert [c.name for c in j.entries()] == ["nf_conntrack_max"]
    assert Path(path).read_bytes() == before
    assert [x.name for x in state_dir.iterdir()] == ["state.json"]   # the temporary file is removed


def test_a_save_renames_a_complete_file_over_the_old_one_without_fsync(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The records are of the running kernel's values, which a power cut resets: a save
    # must survive the process dying (the page cache has it once rename returns), and a
    # reader must never see half a file. An fsync would put milliseconds of disk wait
    # between the decision and the write under a storm (journal.py's docstring).
    j = loaded(path)
    j.confirm(j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r"), 2)
    calls: List[str] = []
    real_replace = os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync")

    def replace(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
        with open(os.open(src, os.O_RDONLY, dir_fd=src_dir_fd), "rb") as f:
            calls.append("rename %d records" % len(json.loads(f.read())["changes"]))
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(journal.os, "fsync", fsync)
    monkeypatch.setattr(journal.os, "replace", replace)
    j.begin("", "nf_conntrack_buckets", "resize_buckets", 8, 16, "r")
    assert calls == ["rename 2 records"]
    # What the next start reads (another process would read the same page cache).
    assert sorted(c.name for c in loaded(path).entries()) == ["nf_conntrack_buckets", "nf_conntrack_max"]


def test_a_journal_that_was_not_loaded_does_not_overwrite_the_file(path: str) -> None:
    v2_file(path, [v2_record()])
    with pytest.raises(JournalError, match="load"):
        ChangeJournal(path).begin("", "nf_conntrack_buckets", "resize_buckets", 8, 16, "r")
    assert len(loaded(path).entries()) == 1
    fresh = ChangeJournal(path + ".other")   # no file: nothing to lose
    fresh.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")


def test_the_record_limit(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MAX_RECORDS", 3)
    j = loaded(path)
    for ns in ("a", "b", "c"):
        j.begin(ns, "nf_conntrack_udp_timeout", "set_timeouts", 30, 10, "r")
    with pytest.raises(JournalError, match="3 records"):
        j.begin("d", "nf_conntrack_udp_timeout", "set_timeouts", 30, 10, "r")
    j.begin("a", "nf_conntrack_udp_timeout", "set_timeouts", 30, 5, "r")   # an existing record still moves


def test_a_full_journal_of_the_longest_records_fits_the_size_limit(path: str) -> None:
    longest = Change("n" * 64, "nf_conntrack_" + "x" * 64, "resize_buckets", journal.MAX_VALUE,
                     journal.MAX_VALUE, "r" * 64, 1.2345678901234567e300, 1.2345678901234567e-300,
                     0.12345678901234567, pending=False)
    j = loaded(path)
    j._changes = {(f"{i:064d}", longest.name): Change(**dict(vars(longest), netns=f"{i:064d}"))
                  for i in range(journal.MAX_RECORDS)}
    j.save()
    assert os.path.getsize(path) <= journal.MAX_FILE_BYTES
    again = ChangeJournal(path)
    assert again.load().problems == [] and len(again.entries()) == journal.MAX_RECORDS


def test_settle_confirms_a_pending_record_and_keeps_its_original(path: str) -> None:
    j = loaded(path)
    j.begin("", "nf_conntrack_max", "raise_max", 100, 200, "r")    # killed before confirm
    again = loaded(path)
    assert again.get("", "nf_conntrack_max").pending
    again.settle("", "nf_conntrack_max", 200)
    change = loaded(path).get("", "nf_conntrack_max")
    assert (change.original, change.applied, change.pending) == (100, 200, False)


# =========================================================================== hardening: content

UNUSABLE = {
    "empty array": b"[]",
    "null": b"null",
    "a number": b"1",
    "a string": b'"x"',
    "empty": b"",
    "truncated": b'{"version": 2, "changes": [{"netns": "", "name": "nf_conn',
    "version 3": b'{"version": 3, "changes": []}',
    "version true": b'{"version": true, "changes": []}',
    "no version": b'{"changes": []}',
    "changes not an array": b'{"version": 2, "changes": {}}',
    "not UTF-8": b'{"version": 2, "changes": [], "x": "\xff\xfe"}',
    "UTF-8 BOM": b'\xef\xbb\xbf{"version": 2, "changes": []}',
    "deep nesting": b"[" * 100000 + b"]" * 100000,
    "over the size limit": b'{"version": 2, "changes": []}' + b" " * journal.MAX_FILE_BYTES,
}


@pytest.mark.parametrize("raw", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_an_unusable_file_is_quarantined_and_the_agent_starts_empty(path: str, state_dir: Path, raw: bytes) -> None:
    Path(path).write_bytes(raw)
    j = ChangeJournal(path)
    report = j.load()
    assert j.entries() == [] and report.problems and report.dropped
    assert report.quarantined is not None and report.quarantined.startswith(path + ".corrupt-")
    assert Path(report.quarantined).read_bytes() == raw   # kept for a human, byte for byte
    assert not os.path.lexists(path)
    assert any(report.quarantined in p for p in report.problems)
    j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")   # and the agent carries on
    assert Path(report.quarantined).read_bytes() == raw


@pytest.mark.parametrize("raw", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_an_unusable_file_is_left_alone_for_restore(path: str, raw: bytes) -> None:
    Path(path).write_bytes(raw)
    j = ChangeJournal(path)
    report = j.load(quarantine=False)
    assert j.entries() == [] and report.problems and report.quarantined is None
    assert Path(path).read_bytes() == raw
    assert all(p.startswith(path + ": ") for p in report.problems)


def test_a_save_after_restore_s_load_moves_the_unusable_file_aside_first(path: str, state_dir: Path) -> None:
    Path(path).write_bytes(b"[]")
    j = loaded(path, quarantine=False)
    j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    [kept] = siblings(state_dir, "state.json.corrupt-")
    assert kept.read_bytes() == b"[]" and len(loaded(path).entries()) == 1


def test_a_partly_valid_file_keeps_its_valid_records(path: str, state_dir: Path) -> None:
    raw = v2_file(path, [
        v2_record(),
        v2_record(name="nf_conntrack_udp_timeout", action="set_timeouts", original="x"),
        v2_record(netns="../../proc/1/ns/net", name="nf_conntrack_udp_timeout", action="set_timeouts"),
        v2_record(name="nf_conntrack_buckets", action="resize_buckets", since=-1),
        v2_record(original=1),                                   # a duplicate of the first
        v2_record(netns="ns1", name="nf_conntrack_udp_timeout", action="set_timeouts", future="ok"),
        "not an object",
    ])
    j = ChangeJournal(path)
    report = j.load()
    assert [(c.netns, c.name, c.original) for c in j.entries()] == [
        ("", "nf_conntrack_max", 262144), ("ns1", "nf_conntrack_udp_timeout", 262144)]
    assert len(report.dropped) == 5
    assert f"{path}: changes[1].original: expected an integer 0..{journal.MAX_VALUE}, got 'x'" in report.problems
    assert any("changes[2].netns" in p and "proc" in p for p in report.problems)
    assert any("changes[4]" in p and "second record" in p for p in report.problems)
    assert any("changes[5]" in p and "'future'" in p for p in report.problems)   # reported, record kept
    # The original is kept aside byte for byte; the cleaned journal replaced it.
    assert report.quarantined and Path(report.quarantined).read_bytes() == raw
    again = ChangeJournal(path)
    assert again.load().problems == [] and again.entries() == j.entries()


def test_a_partly_valid_file_is_left_alone_for_restore_until_it_is_saved(path: str, state_dir: Path) -> None:
    raw = v2_file(path, [v2_record(), v2_record(name="nf_conntrack_buckets", original=None)])
    j = ChangeJournal(path)
    report = j.load(quarantine=False)
    assert report.quarantined is None and len(j.entries()) == 1 and Path(path).read_bytes() == raw
    j.forget("", "nf_conntrack_max")   # restore put it back
    [kept] = siblings(state_dir, "state.json.corrupt-")
    assert kept.read_bytes() == raw and on_disk(path)["changes"] == []


def test_unknown_keys_alone_are_reported_but_nothing_is_moved(path: str, state_dir: Path) -> None:
    v2_file(path, [v2_record(added_later=1)])
    report = ChangeJournal(path).load()
    assert report.problems and not report.dropped and report.quarantined is None
    assert siblings(state_dir, "state.json.corrupt-") == []


@pytest.mark.parametrize("field,value", [
    ("original", float("nan")), ("original", float("inf")), ("original", 1.0), ("original", True),
    ("original", -1), ("original", 2 ** 63), ("applied", None), ("applied", [1]),
    ("since", float("nan")), ("since", "1"), ("since", -0.5),
    ("restore_after", float("inf")), ("restore_after", 30 * 86400 + 1), ("restore_after", -1),
    ("restore_below", 1.01), ("restore_below", float("nan")), ("pending", 1), ("pending", "false"),
    ("netns", "../../proc/1/ns/net"), ("netns", "/run/netns/x"), ("netns", "."), ("netns", ".."),
    ("netns", "x" * 65), ("netns", "ns1\n"), ("netns", None), ("name", "nf_conntrack_max\n"),
    ("name", "nf_conntrack_"), ("name", "NF_CONNTRACK_MAX"), ("name", "nf_conntrack_../max"),
    ("action", "evict"), ("action", None), ("rule", "r" * 65), ("rule", "a b"), ("rule", 5),
])
def test_each_field_is_checked(path: str, field: str, value: object) -> None:
    v2_file(path, [v2_record(**{field: value}), v2_record(name="nf_conntrack_buckets", action="resize_buckets")])
    j = ChangeJournal(path)
    report = j.load()
    assert [c.name for c in j.entries()] == ["nf_conntrack_buckets"]
    assert any(f"changes[0].{field}:" in p for p in report.problems), report.problems


@pytest.mark.parametrize("missing", ["netns", "name", "action", "original", "applied", "rule", "since"])
def test_required_fields(path: str, missing: str) -> None:
    record = v2_record()
    del record[missing]
    v2_file(path, [record])
    report = ChangeJournal(path).load()
    assert f"{path}: changes[0].{missing}: missing" in report.problems


def test_json_literals_and_huge_numbers_drop_only_their_record(path: str) -> None:
    good = json.dumps(v2_record(name="nf_conntrack_buckets", action="resize_buckets"))
    bad = [json.dumps(v2_record()).replace("262144", literal)
           for literal in ("NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, "-" + "9" * 5000)]
    Path(path).write_text('{"version": 2, "changes": [%s]}' % ", ".join(bad + [good]))
    j = ChangeJournal(path)
    report = j.load()
    assert [c.name for c in j.entries()] == ["nf_conntrack_buckets"] and len(report.dropped) == len(bad)
    assert any("5000-digit" in p for p in report.problems)


def test_reports_cannot_carry_terminal_escapes(path: str) -> None:
    v2_file(path, [v2_record(netns="\x1b]0;owned\x07\x1b[2J", rule="\u202eevil"), v2_record(**{"\x1b[31m": 1})])
    report = ChangeJournal(path).load(quarantine=False)
    text = "\n".join(report.problems + report.dropped)
    assert text.isascii() and "\x1b" not in text and "\x07" not in text


def test_record_and_report_limits(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MAX_RECORDS", 10)
    records = [v2_record(netns=f"n{i}") for i in range(15)] + [{}] * 200
    v2_file(path, records)
    j = ChangeJournal(path)
    report = j.load()
    assert len(j.entries()) == 10
    assert any("past the limit" in d for d in report.dropped)
    assert len(report.problems) <= journal.MAX_REPORTED + 1 and len(report.dropped) <= journal.MAX_REPORTED + 1


def test_reading_stops_past_the_size_limit(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(path, "wb") as f:
        f.truncate(50 * journal.MAX_FILE_BYTES)   # sparse: 200 MiB that cost nothing on disk
    read: List[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(journal.os, "read", counting_read)
    report = ChangeJournal(path).load(quarantine=False)
    assert sum(read) == journal.MAX_FILE_BYTES + 1 and "larger than" in report.problems[0]


# =========================================================================== hardening: what sits at the path


def test_a_fifo_at_the_path_does_not_block(path: str) -> None:
    os.mkfifo(path)
    j = ChangeJournal(path)
    report = finishes(lambda: j.load(quarantine=False))
    assert j.entries() == [] and "FIFO" in report.problems[0] and stat.S_ISFIFO(os.lstat(path).st_mode)
    report = finishes(j.load)
    assert stat.S_ISFIFO(os.lstat(report.quarantined).st_mode) and not os.path.lexists(path)


def test_a_fifo_swapped_in_after_the_check_does_not_block(path: str, state_dir: Path) -> None:
    # The stat() in load() sees no FIFO if one replaces the file just after;
    # the open must still not block (O_NONBLOCK) and fstat must refuse it.
    os.mkfifo(path)
    dfd = os.open(str(state_dir), os.O_RDONLY | os.O_DIRECTORY)
    try:
        raw, st, why = finishes(lambda: ChangeJournal(path)._read(dfd, "state.json"))
    finally:
        os.close(dfd)
    assert raw is None and why == "a FIFO"


def test_a_socket_or_directory_at_the_path(path: str) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    try:
        report = finishes(lambda: ChangeJournal(path).load())
        assert "socket" in report.problems[0] and stat.S_ISSOCK(os.lstat(report.quarantined).st_mode)
    finally:
        server.close()
    os.mkdir(path)
    j = ChangeJournal(path)
    report = j.load()
    assert "directory" in report.problems[0] and os.path.isdir(report.quarantined)
    j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert os.path.isfile(path)


@pytest.mark.skipif(not IS_ROOT, reason="mknod needs root")
def test_a_device_at_the_path_is_never_opened(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))   # /dev/zero: endless bytes if read
    opened: List[str] = []
    real_open = os.open
    monkeypatch.setattr(journal.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
    report = finishes(lambda: ChangeJournal(path).load(quarantine=False))
    assert "character device" in report.problems[0] and "state.json" not in opened


def test_a_symlink_at_the_path_is_not_followed(path: str, tmp_path: Path) -> None:
    elsewhere = tmp_path / "planted.json"   # a perfectly valid journal, but not the agent's
    v2_file(str(elsewhere), [v2_record(netns="ns1")])
    os.symlink(elsewhere, path)
    j = ChangeJournal(path)
    report = j.load(quarantine=False)
    assert j.entries() == [] and "symbolic link" in report.problems[0] and os.path.islink(path)
    report = j.load()
    assert os.path.islink(report.quarantined) and not os.path.lexists(path)   # the link moved, not its target
    assert len(loaded(str(elsewhere)).entries()) == 1


def test_a_save_refuses_a_symlink_at_the_path(path: str, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("root's file")
    j = loaded(path)
    os.symlink(precious, path)   # planted after the load
    with pytest.raises(JournalError, match="symbolic link"):
        j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert precious.read_text() == "root's file" and os.path.islink(path) and j.entries() == []


def test_quarantine_never_overwrites_an_earlier_quarantined_file(path: str, state_dir: Path) -> None:
    now = int(time.time())
    for t in (now, now + 1):
        Path(f"{path}.corrupt-{t}").write_text(f"earlier {t}")
    Path(path).write_bytes(b"null")
    report = ChangeJournal(path).load()
    for t in (now, now + 1):
        assert Path(f"{path}.corrupt-{t}").read_text() == f"earlier {t}"
    assert Path(report.quarantined).read_bytes() == b"null"


def test_quarantine_of_a_partly_valid_file_does_not_write_through_a_planted_link(
        path: str, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("root's file")
    v2_file(path, [v2_record(), {}])
    now = int(time.time())
    for t in (now, now + 1):
        os.symlink(precious, f"{path}.corrupt-{t}")
    report = ChangeJournal(path).load()
    assert precious.read_text() == "root's file" and os.path.isfile(report.quarantined)
    assert not os.path.islink(report.quarantined)


# =========================================================================== hardening: writes and the directory


def test_planted_symlinks_at_every_temporary_name_are_never_written_through(
        path: str, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    precious = tmp_path / "shadow"
    precious.write_text("root's file")
    j = loaded(path)
    names = [f"guess{i}" for i in range(journal._TEMP_ATTEMPTS)]
    source = iter(names)
    monkeypatch.setattr(journal, "_random_token", lambda: next(source))
    # Every name the writer will try, and version 1's predictable one.
    for token in names:
        os.symlink(precious, state_dir / f".state.json.{token}.tmp")
    os.symlink(precious, f"{path}.tmp.{os.getpid()}")
    with pytest.raises(JournalError, match="taken"):
        j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert precious.read_text() == "root's file" and not os.path.exists(path) and j.entries() == []
    # One free name among planted ones: the save lands there and nothing else is touched.
    source = iter(names[:5] + ["free"])
    monkeypatch.setattr(journal, "_random_token", lambda: next(source))
    j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert precious.read_text() == "root's file"
    assert os.path.isfile(path) and not os.path.islink(path) and len(loaded(path).entries()) == 1
    assert all(os.path.islink(state_dir / f".state.json.{t}.tmp") for t in names)   # not removed either


def test_no_temporary_files_are_left_behind(path: str, state_dir: Path) -> None:
    j = loaded(path)
    for i in range(5):
        j.confirm(j.begin("", "nf_conntrack_max", "raise_max", 1, 2 + i, "r"), 2 + i)
    assert [x.name for x in state_dir.iterdir()] == ["state.json"]


def test_the_directory_is_created_private(tmp_path: Path) -> None:
    p = tmp_path / "new" / "state.json"
    ChangeJournal(str(p)).begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert stat.S_IMODE(os.stat(p.parent).st_mode) == 0o700


def test_a_symlinked_state_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "link")
    p = str(tmp_path / "link" / "state.json")
    with pytest.raises(JournalError, match="symbolic link"):
        ChangeJournal(p).load()
    with pytest.raises(JournalError, match="symbolic link"):
        ChangeJournal(p).begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("mode,refused", [(0o777, True), (0o770, True), (0o720, True), (0o702, True),
                                          (0o1777, False), (0o1770, False), (0o755, False), (0o700, False)])
def test_a_directory_others_can_write_needs_the_sticky_bit(state_dir: Path, path: str, mode: int,
                                                           refused: bool) -> None:
    os.chmod(state_dir, mode)
    if refused:
        with pytest.raises(JournalError, match="without the sticky bit"):
            ChangeJournal(path).load()
        with pytest.raises(JournalError, match="without the sticky bit"):
            ChangeJournal(path).begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
        assert not os.path.exists(path)
    else:
        j = loaded(path)
        j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")


@pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")
def test_a_directory_owned_by_another_user_is_refused(state_dir: Path, path: str) -> None:
    os.chown(state_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(JournalError, match=f"owned by uid {OTHER_UID}"):
        ChangeJournal(path).load()
    with pytest.raises(JournalError, match=f"owned by uid {OTHER_UID}"):
        ChangeJournal(path).begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert list(state_dir.iterdir()) == []


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A state directory the service user (OTHER_UID) owns and can reach (pytest's
    own tmp_path is under root's private /tmp/pytest-of-root)."""
    top = Path(tempfile.mkdtemp(prefix="journal-test-"))
    os.chmod(top, 0o755)
    d = top / "state"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    yield d
    shutil.rmtree(top)


@pytest.mark.skipif(not IS_ROOT, reason="root's restore in the service's directory")
def test_root_accepts_the_service_s_directory_and_leaves_the_file_the_service_s(
        service_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(service_dir / "state.json")
    monkeypatch.setattr(journal, "_service_uid", lambda user: OTHER_UID if user == journal.SERVICE_USER else None)
    v2_file(path, [v2_record(), v2_record(name="nf_conntrack_buckets", action="resize_buckets")])
    os.chown(path, OTHER_UID, OTHER_UID)
    j = ChangeJournal(path)
    assert j.load(quarantine=False).problems == []
    j.forget("", "nf_conntrack_max")   # as restore does
    st = os.stat(path)
    # Owned by the service, not root: the agent can still read it at its next start.
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OTHER_UID, OTHER_UID, 0o600)
    assert in_child(lambda: ChangeJournal(path, service_user="-").load() and None, uid=OTHER_UID) == 0


def test_an_unreadable_directory_raises(state_dir: Path, path: str) -> None:
    v2_file(path, [v2_record()])
    os.chmod(state_dir, 0o000)
    try:
        def attempt() -> None:
            ChangeJournal(path).load()
        # Root reads anything: try as an unprivileged user instead.
        assert in_child(attempt, uid=65534 if IS_ROOT else -1) == 3
    finally:
        os.chmod(state_dir, 0o700)
    assert len(loaded(path).entries()) == 1


def test_an_io_error_while_reading_raises(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    v2_file(path, [v2_record()])

    def eio(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal.os, "read", eio)
    with pytest.raises(JournalError, match=r"state\.json: cannot read: Input/output error"):
        ChangeJournal(path).load()
    monkeypatch.undo()
    assert len(loaded(path).entries()) == 1   # not quarantined over an I/O error


def test_the_converted_records_follow_every_change_and_are_made_once_per_change(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    j = loaded(path)
    made: List[str] = []

    def convert(change: Change) -> Tuple[str, int]:
        made.append(change.name)
        return (change.name, change.applied)

    assert j.converted(convert) == ()
    token = j.begin("", "nf_conntrack_max", "raise_max", 1, 2, "r")
    assert j.converted(convert) == (("nf_conntrack_max", 2),)
    j.confirm(token, 3)
    first = j.converted(convert)
    assert first == (("nf_conntrack_max", 3),) and j.converted(convert) is first   # not made again
    assert made == ["nf_conntrack_max", "nf_conntrack_max"]
    j.rollback(j.begin("", "nf_conntrack_buckets", "resize_buckets", 8, 16, "r"))
    assert j.converted(convert) == (("nf_conntrack_max", 3),)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.os, "replace", full)
    with pytest.raises(JournalError):
        j.forget("", "nf_conntrack_max")                  # not saved: the record stays
    assert j.converted(convert) == (("nf_conntrack_max", 3),)
    monkeypatch.undo()
    j.forget("", "nf_conntrack_max")
    assert j.converted(convert) == ()
    fresh = loaded(path)
    assert fresh.converted(convert) == ()

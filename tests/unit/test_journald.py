"""The journald sink: native-protocol encoding, field mapping, memfd, fallback, detection.

A datagram socket bound in tmp_path plays journald and the tests decode what
arrives with an independent parser of the documented protocol.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conntrack_agent import events, journald, logsetup


def parse(data: bytes) -> Dict[str, str]:
    """systemd.io/JOURNAL_NATIVE_PROTOCOL, decoded from scratch."""
    out: Dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            pos = nl + 10 + size
        out[key.decode()] = value.decode()
    return out


@pytest.fixture
def journal(dgram_listener):
    return dgram_listener


def receive(sock: socket.socket) -> Dict[str, str]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
    if fds:
        assert data == b""
        with os.fdopen(fds[0], "rb") as f:
            f.seek(0)  # journald maps the file from its start; the offset is shared with the sender
            return parse(f.read())
    return parse(data)


def test_encode_is_binary_safe_for_newlines() -> None:
    data = journald.encode([("MESSAGE", "one line"), ("EXCEPTION", "Traceback\n  two\n"), ("EMPTY", "")])
    assert parse(data) == {"MESSAGE": "one line", "EXCEPTION": "Traceback\n  two\n", "EMPTY": ""}
    assert b"EXCEPTION\n" + struct.pack("<Q", len("Traceback\n  two\n")) in data


@pytest.mark.parametrize("key,name", [("count", "COUNT"), ("usage-pct", "USAGE_PCT"), ("_secret", "SECRET"),
                                       ("9lives", "LIVES"), ("é", "FIELD"), ("x" * 80, "X" * 64)])
def test_field_names_follow_journald_rules(key: str, name: str) -> None:
    assert journald.field_name(key) == name


def test_raise_max_event_becomes_structured_fields() -> None:
    event = {"event": "raise_max", "old": 131072, "new": 262144, "rule": "grow-table", "netns": "web",
             "netns_label": "netns web", "reason": "usage 80% >= 75%", "count": 104857, "max": 131072,
             "usage": 0.8, "fill_rate": 120.5, "time_to_full": None, "drop": 3, "buckets": 131072,
             "dry_run": False, "timestamp": "ignored", "extra_thing": [1, 2]}
    fields = dict(journald.entry_fields("info", event))
    assert fields["MESSAGE"] == "raised nf_conntrack_max from 131072 to 262144: usage 80% >= 75%"
    assert fields["MESSAGE_ID"] == events.EVENTS["raise_max"].message_id
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "conntrack-agent"
    assert (fields["CT_MAX_OLD"], fields["CT_MAX_NEW"]) == ("131072", "262144")
    assert fields["CT_COUNT"] == "104857" and fields["CT_MAX"] == "131072" and fields["CT_BUCKETS"] == "131072"
    assert fields["CT_USAGE"] == "0.8" and fields["CT_FILL_RATE"] == "120.5" and fields["CT_DROPS"] == "3"
    assert "CT_TIME_TO_FULL" not in fields  # None means "not filling": no field
    assert fields["RULE"] == "grow-table" and fields["ACTION"] == "raise_max" and fields["NETNS"] == "web"
    assert fields["DRY_RUN"] == "false" and fields["REASON"] == "usage 80% >= 75%"
    assert fields["EXTRA_THING"] == "[1,2]"
    assert "TIMESTAMP" not in fields
    assert list(fields)[0] == "MESSAGE"


def test_buckets_old_new_and_dry_run_priority() -> None:
    fields = dict(journald.entry_fields("info", {"event": "resize_buckets", "old": 1024, "new": 2048,
                                                 "dry_run": True, "reason": "r"}))
    assert (fields["CT_BUCKETS_OLD"], fields["CT_BUCKETS_NEW"]) == ("1024", "2048")
    assert fields["PRIORITY"] == "5"  # notice: a dry run's "would"
    assert fields["MESSAGE"].startswith("would resize nf_conntrack_buckets from 1024 to 2048")
    assert fields["DRY_RUN"] == "true"


def test_logsetup_emit_fields_are_used_not_duplicated() -> None:
    """logsetup.emit already adds message, priority and message_id."""
    captured: List[Tuple[str, dict]] = []

    class Log:
        def log(self, level, event, **kw):
            captured.append((event, dict(kw, event=event)))

    logsetup.emit(Log(), "policy_invalid", keeping="keeping the running policy", error="p.toml:3: agent.x: bad")
    event = captured[0][1]
    fields = dict(journald.entry_fields("error", event))
    assert fields["PRIORITY"] == "3"
    assert fields["MESSAGE"] == "policy rejected, keeping the running policy: p.toml:3: agent.x: bad"
    assert fields["MESSAGE_ID"] == events.EVENTS["policy_invalid"].message_id
    assert not any(k.startswith("CT_MESSAGE") or k in ("TS", "CT_PRIORITY") for k in fields)


def test_unknown_event_and_reserved_names() -> None:
    fields = dict(journald.entry_fields("warning", {"event": "something odd", "priority_hint": 1,
                                                    "syslog_identifier": "evil", "code_line": 3}))
    assert fields["MESSAGE"] == "something odd" and fields["PRIORITY"] == "4"
    assert "MESSAGE_ID" not in fields
    assert fields["SYSLOG_IDENTIFIER"] == "conntrack-agent"
    assert fields["CT_SYSLOG_IDENTIFIER"] == "evil" and fields["CT_CODE_LINE"] == "3"


def test_exception_is_a_multiline_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        fields = dict(journald.entry_fields("error", {"event": "tick_failed", "exc_info": exc}))
    assert "ValueError: boom" in fields["EXCEPTION"] and "\n" in fields["EXCEPTION"]
    assert parse(journald.encode(list(fields.items())))["EXCEPTION"] == fields["EXCEPTION"]


def test_sink_sends_one_datagram(journal) -> None:
    path, sock = journal
    sink = journald.JournalSink(path)
    assert sink.send([("MESSAGE", "hello"), ("MULTI", "a\nb")])
    assert receive(sock) == {"MESSAGE": "hello", "MULTI": "a\nb"}


def test_sink_uses_a_sealed_memfd_when_the_datagram_is_too_big(journal) -> None:
    path, sock = journal
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sink = journald.JournalSink(path)
    sink._socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force EMSGSIZE
    big = "x" * 300_000
    assert sink.send([("MESSAGE", "big"), ("BIG", big)])
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
    assert data == b"" and len(fds) == 1
    import fcntl
    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
    with os.fdopen(fds[0], "rb") as f:
        f.seek(0)
        assert parse(f.read()) == {"MESSAGE": "big", "BIG": big}


def test_sink_falls_back_to_stderr_text(tmp_path: Path) -> None:
    stream = io.StringIO()
    sink = journald.JournalSink(str(tmp_path / "no-journal"), fallback=stream)
    assert not sink.send([("MESSAGE", "raised max"), ("PRIORITY", "6"), ("CT_MAX_NEW", "2048")])
    assert sink.failures == 1
    assert stream.getvalue() == "<6>raised max (CT_MAX_NEW=2048)\n"


def test_processor_sends_then_drops(journal) -> None:
    from structlog import DropEvent

    path, sock = journal
    processor = journald.journal_processor(journald.JournalSink(path))
    with pytest.raises(DropEvent):
        processor(None, "warning", {"event": "pressure", "count": 10, "max": 20, "usage": 0.5,
                                    "netns": "", "detail": "filling"})
    fields = receive(sock)
    assert fields["MESSAGE"] == ("conntrack table under pressure: 10/20 (50.0%) in the agent's netns, filling")
    assert fields["PRIORITY"] == "4" and fields["MESSAGE_ID"] == events.EVENTS["pressure"].message_id


def test_running_under_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert journald.running_under_journal({"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}, f.fileno())
        assert not journald.running_under_journal({"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino + 1)},
                                                  f.fileno())
        assert not journald.running_under_journal({}, f.fileno())
        assert not journald.running_under_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())


def _failing_tick() -> float:
    raise OSError(5, "Input/output error")


def test_logsetup_chain_sends_the_traceback_as_exception(journal) -> None:
    """exc_info=exc (an exception object, as the main loop passes it) through
    logsetup's own chain to the journal: one EXCEPTION field, no leftovers."""
    import structlog

    path, sock = journal
    try:
        logsetup.configure("journal", journal_socket=path)
        try:
            _failing_tick()
        except OSError as exc:
            logsetup.emit(logsetup.get_logger(), "tick_failed", error="OSError: boom", retry=1.0, exc_info=exc)
    finally:
        structlog.reset_defaults()
    fields = receive(sock)
    assert fields["EVENT"] == "tick_failed"
    assert fields["EXCEPTION"].startswith("Traceback (most recent call last):")
    assert "in _failing_tick" in fields["EXCEPTION"]
    assert fields["EXCEPTION"].endswith("OSError: [Errno 5] Input/output error")
    assert not any(k in fields for k in ("EXC_INFO", "CT_EXCEPTION"))


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_console_and_json_show_the_traceback(fmt: str) -> None:
    import structlog

    stream = io.StringIO()
    try:
        logsetup.configure(fmt, stream=stream)
        try:
            _failing_tick()
        except OSError as exc:
            logsetup.emit(logsetup.get_logger(), "tick_failed", error="OSError: boom", retry=1.0, exc_info=exc)
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    if fmt == "json":
        event = json.loads(text)
        assert event["exception"].startswith("Traceback (most recent call last):")
        assert "in _failing_tick" in event["exception"] and "exc_info" not in event
    else:
        first, *trace = text.rstrip("\n").split("\n")
        assert "tick failed: OSError: boom" in first
        assert trace[0] == "    Traceback (most recent call last):"
        assert any("in _failing_tick" in line for line in trace)
        assert trace[-1] == "    OSError: [Errno 5] Input/output error"

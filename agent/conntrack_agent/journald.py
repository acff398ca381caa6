"""journald's native protocol: each event becomes one journal entry with its own fields.

Under systemd, text on stderr would reach the journal as an opaque MESSAGE; the
native protocol keeps the event's structure, so operators can filter
(`journalctl -u conntrack-agent MESSAGE_ID=... CT_MAX_NEW=...`) and `-o json`
shows every field. The protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL) is a
datagram of fields on /run/systemd/journal/socket:

- ``KEY=value\\n`` when the value has no newline;
- ``KEY\\n`` + the value's length as 64-bit little-endian + value + ``\\n`` otherwise;
- an entry too big for one datagram goes in a sealed memfd passed with SCM_RIGHTS.

python3-systemd would do the same, but it is a C extension for one function.

This module is the last processor of the structlog chain (see logsetup): it sends
the entry and ends the chain with DropEvent, so nothing is printed as well.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import struct
import sys
import traceback
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Tuple

from . import events

SOCKET_PATH = "/run/systemd/journal/socket"
IDENTIFIER = "conntrack-agent"

# Event-dict keys -> journal fields. The CT_ prefix keeps the conntrack numbers
# apart from other programs' fields when entries are merged (journalctl -b).
FIELDS = {
    "count": "CT_COUNT",
    "max": "CT_MAX",
    "max_old": "CT_MAX_OLD",
    "max_new": "CT_MAX_NEW",
    "usage": "CT_USAGE",
    "fill_rate": "CT_FILL_RATE",
    "time_to_full": "CT_TIME_TO_FULL",
    "drops": "CT_DROPS",
    "drop": "CT_DROPS",             # packets dropped because the table was full, this tick
    "early_drop": "CT_EARLY_DROPS",
    "insert_failed": "CT_INSERT_FAILED",
    "usage_pct": "CT_USAGE_PCT",
    "buckets": "CT_BUCKETS",
    "buckets_old": "CT_BUCKETS_OLD",
    "buckets_new": "CT_BUCKETS_NEW",
    "rule": "RULE",
    "action": "ACTION",
    "reason": "REASON",
    "dry_run": "DRY_RUN",
    "netns": "NETNS",
    "errno": "ERRNO",               # journald's own field for an errno number
}

# Keys that are not fields of their own: structlog's bookkeeping, timestamps
# (journald stamps each entry itself), and what logsetup.emit precomputed
# (message, priority, message_id) and this module sends as MESSAGE, PRIORITY
# and MESSAGE_ID; the traceback (exception, or exc_info) is sent as EXCEPTION.
_SKIP = frozenset({"timestamp", "level", "logger", "logger_name", "_record", "_from_structlog",
                   "exc_info", "exception", "stack_info", "event", "message", "priority", "message_id", "ts"})

# Fields this module sets; an event field of the same name gets the CT_ prefix
# instead of overwriting them (journald treats PRIORITY, MESSAGE_ID... specially).
_RESERVED = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY",
                       "SYSLOG_PID", "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "CODE_FILE", "CODE_LINE",
                       "CODE_FUNC", "EVENT", "EXCEPTION", "DOCUMENTATION"})

_LEVELS = {"debug": 7, "info": 6, "msg": 6, "notice": 5, "warning": 4, "warn": 4,
           "error": 3, "exception": 3, "err": 3, "critical": 2, "fatal": 2}

# A stalled journald must not stall the tick for long: past this, the entry goes
# to stderr (the unit's stream to journald) as text instead.
SEND_TIMEOUT = 0.25

# memfd seals journald insists on, so the entry cannot change after it is read.
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
          | getattr(fcntl, "F_SEAL_WRITE", 8) | getattr(fcntl, "F_SEAL_SEAL", 1))

Fields = List[Tuple[str, str]]


# ------------------------------------------------------------------ detection


def running_under_journal(environ: Optional[Mapping[str, str]] = None, fd: int = 2) -> bool:
    """True when stderr is systemd's stream to journald (systemd.exec(5), $JOURNAL_STREAM).

    Comparing device and inode, not just the variable's presence, matters: a
    shell started from a service inherits JOURNAL_STREAM with a different stderr.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


# ------------------------------------------------------------------ encoding


def field_name(key: str) -> str:
    """A journal field name: A-Z, 0-9 and '_', not starting with '_' or a digit, <= 64 chars."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper()).lstrip("_0123456789")
    return name[:64] or "FIELD"


def field_value(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "%.6g" % value
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return json.dumps(sorted(value) if isinstance(value, (set, frozenset)) else value,
                          default=str, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def encode(fields: Fields) -> bytes:
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def entry_fields(method_name: str, event_dict: Mapping[str, Any]) -> Fields:
    """The journal entry for one structlog event, MESSAGE first."""
    kind = str(event_dict.get("event", ""))
    dry_run = bool(event_dict.get("dry_run", False))
    known = events.EVENTS.get(kind)

    if event_dict.get("message"):
        text = str(event_dict["message"])
    elif known is not None:
        text = events.message(kind, _template_fields(kind, event_dict))
    else:
        text = kind
    priority = _LEVELS.get(method_name, 6)
    if known is not None:
        priority = min(priority, events.priority_of(kind, dry_run))
    if isinstance(event_dict.get("priority"), int):
        priority = event_dict["priority"]

    fields: Fields = [("MESSAGE", text), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", IDENTIFIER)]
    if known is not None:
        fields += [("MESSAGE_ID", known.message_id), ("EVENT", kind)]
        if events.has_verb(kind) and "action" not in event_dict:
            fields.append(("ACTION", kind))
    exception = event_dict.get("exception") or format_exc_info(event_dict.get("exc_info"))
    if exception:
        fields.append(("EXCEPTION", str(exception)))

    seen = {name for name, _ in fields}
    # Decisions carry a generic old/new; the action's registered event says what they are.
    old_new = (known.old_new if known is not None else None) or ("OLD", "NEW")
    for key, value in event_dict.items():
        if key in _SKIP or key.startswith("_"):
            continue
        if key in ("old", "new"):
            name = old_new[0] if key == "old" else old_new[1]
        else:
            name = FIELDS.get(key) or field_name(key)
        if name in _RESERVED or name in seen:
            name = field_name("ct_" + name)
        text_value = field_value(value)
        if text_value is None or name in seen:
            continue
        seen.add(name)
        fields.append((name, text_value))
    return fields


def format_exc_info(exc_info: Any) -> Optional[str]:
    """The traceback text of an exception, an exc_info tuple, or True (the exception
    being handled); None when there is none. logsetup renders every sink's
    tracebacks with this, so the journal and a terminal show the same text."""
    if not exc_info:
        return None
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if exc_info[0] is None:
        return None
    return "".join(traceback.format_exception(*exc_info)).rstrip()


def _template_fields(kind: str, event_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The event's fields plus the derived words its sentence template may use."""
    out = dict(event_dict)
    out.setdefault("verb", events.verb(kind, bool(event_dict.get("dry_run", False))))
    if "netns_label" not in out and "netns" in out:
        out["netns_label"] = "netns %s" % out["netns"] if out["netns"] else "the agent's netns"
    usage = out.get("usage")
    if "usage_pct" not in out and isinstance(usage, (int, float)):
        out["usage_pct"] = "%.1f%%" % (usage * 100)
    return out


# ------------------------------------------------------------------ sending


class JournalSink:
    """A connectionless socket to journald, with memfd for big entries and stderr
    as the last resort (journald restarting, or the socket not mounted)."""

    def __init__(self, path: str = SOCKET_PATH, fallback: Optional[Any] = None) -> None:
        self.path = path
        self._fallback = fallback
        self._sock: Optional[socket.socket] = None
        self.failures = 0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                # A burst of decisions should queue, not hit the default ~200 KiB;
                # the kernel caps this at wmem_max without privileges.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            except OSError:
                pass
            sock.settimeout(SEND_TIMEOUT)
            self._sock = sock
        return self._sock

    def send(self, fields: Fields) -> bool:
        """True when journald took the entry; else it went to stderr as text."""
        data = encode(fields)
        try:
            sock = self._socket()
            try:
                sock.sendto(data, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(sock, data)
            return True
        except OSError:
            self.failures += 1
            self.close()
            self._write_text(fields)
            return False

    def _send_memfd(self, sock: socket.socket, data: bytes) -> None:
        fd = os.memfd_create("conntrack-agent-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def _write_text(self, fields: Fields) -> None:
        # "<N>" is the priority prefix journald parses on a service's stderr stream.
        values = dict(fields)
        extra = " ".join("%s=%s" % (k, v) for k, v in fields
                         if k not in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "MESSAGE_ID", "EXCEPTION"))
        line = "<%s>%s%s" % (values.get("PRIORITY", "6"), values.get("MESSAGE", ""), " (%s)" % extra if extra else "")
        if values.get("EXCEPTION"):
            line += "\n" + values["EXCEPTION"]
        stream = self._fallback or sys.stderr
        try:
            stream.write(line.replace("\n", "\n  ") + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]


def journal_processor(sink: Optional[JournalSink] = None) -> Processor:
    """A structlog processor that must come last: sends the event, then drops it.

    structlog is logsetup's library; only its DropEvent is needed here, to end
    the chain without a renderer printing the event a second time.
    """
    from structlog import DropEvent

    target = sink or JournalSink()

    def to_journal(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        target.send(entry_fields(method_name, event_dict))
        raise DropEvent

    to_journal.sink = target  # type: ignore[attr-defined]
    return to_journal

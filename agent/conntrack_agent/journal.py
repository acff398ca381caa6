"""The change journal: every sysctl the agent changed, and the value it replaced.

The journal is written before each change takes effect (begin), and again once
the kernel took the value (confirm), so a crash at any point leaves a file that
still holds every original: at worst a record marked pending, whose write may or
may not have happened. An original is recorded only when no record exists yet,
so after a crash the agent's own value is never mistaken for the node's original.

What a save must survive is the agent's process dying (kill -9, the OOM killer, a
crash), not a power cut: every value recorded is the running kernel's (sysctls,
namespaces), and a power cut or reboot resets them all, so a record could only
outlive what it describes. The data the process wrote is in the kernel's page
cache the moment write() and rename() return, and the next start reads it there.
So a save is a new file renamed over the old one (readers never see half a file)
with no fsync: under a storm's load an fsync of this file and its directory took
2–11 ms (each of the two saves around a raise, on ext4 over virtio, measured in
bench/storm.py's runs by timing the agent's own saves), all of it between the
decision and the kernel taking the new max. After a power cut the file may be an
older one (its records are of a kernel that is gone; the start forgets values
that are back at their originals) or unreadable (quarantined and logged).

Two different processes use the file, and both are defended here:

- the service (user conntrack-agent) loads it at start. Bad content must never
  stop the agent, or the node is left unguarded over the agent's own
  bookkeeping: what cannot be used is moved aside (quarantined, kept for a
  human) and the agent starts with what was valid.
- `conntrack-agent restore` runs as root in a directory the service user owns.
  That user could plant symbolic links, FIFOs or odd values there, so root
  never follows a link at any name it opens, creates or renames, never blocks
  on a FIFO, and trusts no value that fails the schema (a netns of
  "../../proc/1/ns/net" would have root enter PID 1's namespace).

File format (version 2), one record per line for people reading it:
    {"version": 2, "changes": [
    {"action": "raise_max", "applied": 524288, "name": "nf_conntrack_max", ...},
    ...
    ]}
Version 1 files (no action, restore_after, restore_below, pending) still load.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Tuple

from .checks import read_at_most

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

def recording_actions() -> Tuple[str, ...]:
    """The action kinds whose changes the journal records: from the action registry
    (actions/), so a new action needs no edit here."""
    from .actions import REGISTRY
    return tuple(kind for kind, action in REGISTRY.items() if action.records)

# Bounds. A record serialises to at most ~450 bytes, so MAX_RECORDS of them fit
# well inside MAX_FILE_BYTES: a journal the agent writes can always be read back
# (tests/unit/test_journal.py checks it). Real journals hold a few records per
# watched namespace; the caps only stop a hostile or broken file from costing
# the agent its memory or its start-up time.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_RECORDS = 8192
MAX_VALUE = 2 ** 63 - 1
MAX_RESTORE_AFTER = 30 * 86400.0
# Reports name at most this many problems and dropped records (then a count), so
# a file of a million bad records does not become a million log lines.
MAX_REPORTED = 50

# The user systemd runs the service as (User= in conntrack-agent.service). Its
# StateDirectory= is owned by that user, and root's `restore` must accept that.
SERVICE_USER = "conntrack-agent"

NETNS_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
NAME_RE = re.compile(r"nf_conntrack_[a-z0-9_]{1,64}")
RULE_RE = re.compile(r"[A-Za-z0-9_.\-]{0,64}")

# Creating a temporary file retries this many random names before giving up:
# a collision with 64 random bits means someone planted names on purpose.
_TEMP_ATTEMPTS = 16
_QUARANTINE_ATTEMPTS = 100


def _random_token() -> str:
    """The random part of temporary file names (tests replace it to plant names)."""
    # os.urandom, not secrets: secrets imports hashlib, which maps OpenSSL's libcrypto
    # (~3.7 MB of the agent's resident memory) for 8 random bytes.
    return os.urandom(8).hex()


@dataclass
class Change:
    netns: str                 # "" = the agent's own namespace and global values
    name: str                  # sysctl file name, e.g. "nf_conntrack_max", "nf_conntrack_udp_timeout"
    action: str                # the action kind that made it: one of recording_actions()
    original: int              # value before the agent's first change
    applied: int               # value the agent wrote (or is about to write, while pending)
    rule: str                  # owner rule name ("" allowed)
    since: float               # wall-clock seconds of the first change
    restore_after: Optional[float] = None   # owner rule's calm period (s) when recorded; None = unknown
    restore_below: Optional[float] = None   # owner rule's usage threshold (0..1) when recorded
    pending: bool = False      # recorded before the write; the write is not confirmed yet


_FIELD_NAMES = tuple(f.name for f in fields(Change))


class JournalError(Exception):
    """A problem that must stop the caller: the directory cannot be used safely,
    an I/O error, or a change that could not be recorded (then nothing changed)."""


@dataclass
class LoadReport:
    problems: List[str] = field(default_factory=list)    # human sentences, path first
    quarantined: Optional[str] = None                      # where the file was moved or copied, or None
    dropped: List[str] = field(default_factory=list)      # records that could not be kept


class Token:
    """What begin() changed, for confirm() or rollback(); single use."""

    __slots__ = ("key", "previous", "change", "used")

    def __init__(self, key: Tuple[str, str], previous: Optional[Change], change: Change) -> None:
        self.key = key
        self.previous = previous   # the record before begin(), None if there was none
        self.change = change       # the pending record begin() saved
        self.used = False

    def __repr__(self) -> str:
        return f"Token({self.key!r}, previous={self.previous!r}, used={self.used})"


# --------------------------------------------------------------------------- schema


class _Invalid(Exception):
    pass


class _BigNumber:
    """Stands in for an integer literal too long to convert: Python refuses ints
    over 4300 digits (a ValueError that would sink the whole file), and none of
    the journal's values needs more than 19."""

    def __init__(self, digits: str) -> None:
        self.length = len(digits)

    def __repr__(self) -> str:
        return f"a {self.length}-digit number"


def _parse_int(text: str) -> Any:
    return int(text) if len(text) <= 40 else _BigNumber(text)


def _describe(value: Any) -> str:
    """A short, printable rendering of a value from the file. ascii() escapes
    control and non-ASCII characters, so a hostile string cannot put terminal
    escapes on root's screen; containers are never rendered (a deeply nested one
    would recurse)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, _BigNumber):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value: Any) -> int:
    # bool is an int in Python, not in this file: `true` is no sysctl value.
    if type(value) is not int or not 0 <= value <= MAX_VALUE:
        raise _Invalid(f"expected an integer 0..{MAX_VALUE}, got {_describe(value)}")
    return value


def _number(value: Any, low: float, high: float, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
        raise _Invalid(f"expected {what}, got {_describe(value)}")
    return float(value)


def _text(value: Any, pattern: "re.Pattern[str]", what: str) -> str:
    # fullmatch, not match(...$): "$" also matches before a trailing newline.
    if type(value) is not str or not pattern.fullmatch(value):
        raise _Invalid(f"expected {what}, got {_describe(value)}")
    return value


def _check_netns(value: Any) -> str:
    if value == "":
        return value
    value = _text(value, NETNS_RE, "\"\" or a /run/netns name of letters, digits, '_', '.', '-'")
    if value in (".", ".."):
        raise _Invalid(f"expected a /run/netns name, got {_describe(value)}")
    return value


def _check_action(value: Any) -> str:
    kinds = recording_actions()
    if type(value) is not str or value not in kinds:
        raise _Invalid(f"expected one of {', '.join(kinds)}, got {_describe(value)}")
    return value


def _optional(check: Any) -> Any:
    return lambda value: None if value is None else check(value)


_CHECKS = {
    "netns": _check_netns,
    "name": lambda v: _text(v, NAME_RE, "a sysctl name nf_conntrack_[a-z0-9_]"),
    "action": _check_action,
    "original": _integer,
    "applied": _integer,
    "rule": lambda v: _text(v, RULE_RE, "a rule name of up to 64 letters, digits, '_', '.', '-'"),
    "since": lambda v: _number(v, 0.0, math.inf, "a finite number of seconds >= 0"),
    "restore_after": _optional(lambda v: _number(v, 0.0, MAX_RESTORE_AFTER, "null or 0..30 days in seconds")),
    "restore_below": _optional(lambda v: _number(v, 0.0, 1.0, "null or a ratio 0..1")),
    "pending": lambda v: v if type(v) is bool else _fail(f"expected true or false, got {_describe(v)}"),
}
_REQUIRED = {1: ("netns", "name", "original", "applied", "rule", "since"),
             2: ("netns", "name", "action", "original", "applied", "rule", "since")}


def _fail(message: str) -> Any:
    raise _Invalid(message)


def infer_action(name: str) -> Optional[str]:
    """The action kind that changes a sysctl (version 1 files did not say)."""
    if name == "nf_conntrack_max":
        return "raise_max"
    if name == "nf_conntrack_buckets":
        return "resize_buckets"
    if "timeout" in name:
        return "set_timeouts"
    return None


def check_change(change: Change) -> Change:
    """The record as the loader would read it back (numbers of seconds as floats);
    JournalError unless it satisfies the schema the loader enforces, so nothing
    the agent writes is dropped when it is read back."""
    values = {}
    for name in _FIELD_NAMES:
        try:
            values[name] = _CHECKS[name](getattr(change, name))
        except _Invalid as exc:
            raise JournalError(f"cannot record {name}: {exc}") from None
    return Change(**values)


@dataclass
class _Parsed:
    changes: Dict[Tuple[str, str], Change]
    problems: List[str]
    dropped: List[str]
    unusable: Optional[str] = None      # why the whole file is unusable, if it is


def parse(raw: bytes, label: str = "state file") -> _Parsed:
    """Parse and validate a journal file's bytes; never raises for bad content."""
    out = _Parsed({}, [], [])

    def unusable(why: str) -> _Parsed:
        out.unusable = why
        return out

    if len(raw) > MAX_FILE_BYTES:
        return unusable(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return unusable(f"not UTF-8 text (byte {exc.start})")
    try:
        data = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        return unusable("not valid JSON (nested too deeply)")
    except ValueError as exc:    # json.JSONDecodeError included
        return unusable(f"not valid JSON ({str(exc)[:120]})")
    if not isinstance(data, dict):
        return unusable(f"expected a JSON object, found {_describe(data)}")
    version = data.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        return unusable(f"unknown version {_describe(version)} (this agent reads "
                        f"{' and '.join(map(str, READABLE_VERSIONS))})")
    records = data.get("changes")
    if not isinstance(records, list):
        return unusable(f"changes: expected an array, found {_describe(records)}")
    extra = sorted(k for k in data if k not in ("version", "changes"))
    if extra:
        out.problems.append(f"{label}: ignored unknown keys {', '.join(_describe(k) for k in extra[:10])}")
    if len(records) > MAX_RECORDS:
        out.problems.append(f"{label}: changes[{MAX_RECORDS}:]: {len(records) - MAX_RECORDS} records past "
                            f"the limit of {MAX_RECORDS} dropped")
        out.dropped.append(f"changes[{MAX_RECORDS}:] ({len(records) - MAX_RECORDS} records past the limit)")
    for index, record in enumerate(records[:MAX_RECORDS]):
        where = f"{label}: changes[{index}]"
        if not isinstance(record, dict):
            out.problems.append(f"{where}: expected an object, got {_describe(record)}")
            out.dropped.append(f"changes[{index}] ({_describe(record)})")
            continue
        values: Dict[str, Any] = {}
        errors = []
        for name in _FIELD_NAMES:
            if name not in record:
                if name in _REQUIRED[version]:
                    errors.append(f"{where}.{name}: missing")
                continue
            try:
                values[name] = _CHECKS[name](record[name])
            except _Invalid as exc:
                errors.append(f"{where}.{name}: {exc}")
        if "action" not in record and "name" in values:
            values["action"] = infer_action(values["name"])
            if values["action"] is None:
                errors.append(f"{where}.action: missing, and {values['name']} is no sysctl the agent changes")
        unknown = [k for k in record if k not in _FIELD_NAMES]
        if unknown:
            out.problems.append(f"{where}: ignored unknown keys {', '.join(_describe(k) for k in unknown[:10])}")
        summary = "changes[%d] (%s%s)" % (index, _describe(record.get("name")),
                                          f" in netns {_describe(record['netns'])}" if record.get("netns") else "")
        if errors:
            out.problems.extend(errors)
            out.dropped.append(summary)
            continue
        change = Change(**values)
        key = (change.netns, change.name)
        if key in out.changes:
            out.problems.append(f"{where}: a second record for {change.name}"
                                f"{' in netns ' + change.netns if change.netns else ''}; the first is kept")
            out.dropped.append(summary + " duplicate")
            continue
        out.changes[key] = change
    return out


def _capped(lines: List[str]) -> List[str]:
    if len(lines) <= MAX_REPORTED:
        return lines
    return lines[:MAX_REPORTED] + [f"... and {len(lines) - MAX_REPORTED} more"]


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def _service_uid(user: str) -> Optional[int]:
    try:
        import pwd
        return pwd.getpwnam(user).pw_uid
    except (ImportError, KeyError):
        return None


# --------------------------------------------------------------------------- the journal


class ChangeJournal:
    def __init__(self, path: str, *, service_user: str = SERVICE_USER) -> None:
        self.path = path
        # Besides root and the effective uid, root's `restore` accepts a directory
        # owned by this user: it is the StateDirectory= of the service.
        self.service_user = service_user
        self._changes: Dict[Tuple[str, str], Change] = {}
        self._converted: Optional[Tuple[Any, Tuple[Any, ...]]] = None   # converted(): (convert, records)
        self._loaded = False
        # After a load that found problems without quarantining (root's restore):
        # ("copy", raw bytes, (dev, ino)) or ("rename", None, (dev, ino)). The first
        # save moves that file aside before replacing it, so what could not be
        # read is never overwritten.
        self._preserve: Optional[Tuple[str, Optional[bytes], Tuple[int, int]]] = None

    def __repr__(self) -> str:
        return f"ChangeJournal({self.path!r}, {len(self._changes)} records)"

    # ------------------------------------------------------------------ reading

    def get(self, netns: str, name: str) -> Optional[Change]:
        change = self._changes.get((netns, name))
        return None if change is None else replace(change)

    def entries(self) -> List[Change]:
        """A copy of the records (copies too), in insertion order."""
        return [replace(c) for c in self._changes.values()]

    def converted(self, convert: Any) -> Tuple[Any, ...]:
        """Every record through `convert` (which must copy what it keeps), in order; made
        again only after the records changed. The tick asks for them every time (the core
        sees them as actions.base.Owned): entries() copied every record at every tick,
        0.17 ms of a 1.7 ms tick under cProfile in a storm."""
        if self._converted is None or self._converted[0] is not convert:
            self._converted = (convert, tuple(convert(c) for c in self._changes.values()))
        return self._converted[1]

    def __len__(self) -> int:
        return len(self._changes)

    def load(self, quarantine: bool = True) -> LoadReport:
        """Read the file. Bad content never raises: see the module doc and LoadReport."""
        self._changes, self._loaded, self._preserve = {}, False, None
        self._converted = None
        report = LoadReport()
        base = self._base()
        dfd = self._open_dir(create=False)
        if dfd is None:    # no directory yet: nothing was ever recorded
            self._loaded = True
            return report
        try:
            try:
                st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                self._loaded = True
                return report
            except OSError as exc:
                raise self._error("cannot examine", exc) from None
            raw: Optional[bytes] = None
            if stat.S_ISREG(st.st_mode):
                raw, opened, why = self._read(dfd, base)
                if opened is None:    # gone between stat and open
                    self._loaded = True
                    return report
                st = opened
            else:
                why = _kind(st.st_mode)    # never opened: a device could act on open
            identity = (st.st_dev, st.st_ino)
            # From here on the journal is what the file held; a save may follow.
            self._loaded = True
            parsed = parse(raw, self.path) if raw is not None else _Parsed({}, [], [], why)
            if parsed.unusable is not None:
                report.problems.append(f"{self.path}: {parsed.unusable}")
                report.dropped.append(f"the whole file ({parsed.unusable})")
                if quarantine:
                    self._quarantine_file(dfd, report, ("rename", None, identity))
                else:
                    report.problems.append(f"{self.path}: left as it is; nothing in it can be restored")
                    self._preserve = ("rename", None, identity)
            else:
                self._changes = parsed.changes
                self._converted = None
                report.problems.extend(parsed.problems)
                report.dropped.extend(parsed.dropped)
                if parsed.dropped:
                    if quarantine:
                        self._quarantine_file(dfd, report, ("copy", raw, identity))
                    else:
                        self._preserve = ("copy", raw, identity)
            report.problems = _capped(report.problems)
            report.dropped = _capped(report.dropped)
            return report
        finally:
            os.close(dfd)

    def _read(self, dfd: int, base: str) -> Tuple[Optional[bytes], Optional[os.stat_result], Optional[str]]:
        """(bytes, stat, None), or (None, stat, why) for something that is not a
        regular file after all, or (None, None, None) when the file vanished."""
        # O_NONBLOCK: a FIFO swapped in after the stat must not hang the agent (or
        # root); O_NOFOLLOW: never read through a link; O_NOCTTY: never adopt a tty.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(base, flags, dir_fd=dfd)
        except FileNotFoundError:
            return None, None, None
        except OSError as exc:
            # Swapped for a link (ELOOP) or a socket (ENXIO) since the stat.
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                try:
                    st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return None, None, None
                except OSError as again:
                    raise self._error("cannot examine", again) from None
                return None, st, _kind(st.st_mode)
            raise self._error("cannot open", exc) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None, st, _kind(st.st_mode)
            return read_at_most(fd, MAX_FILE_BYTES), st, None
        except OSError as exc:
            raise self._error("cannot read", exc) from None
        finally:
            os.close(fd)

    def _quarantine_file(self, dfd: int, report: LoadReport,
                         preserve: Tuple[str, Optional[bytes], Tuple[int, int]]) -> None:
        """Keep the file for a human, then (for a partly valid one) save the cleaned journal."""
        try:
            report.quarantined = self._move_aside(dfd, preserve)
        except OSError as exc:
            report.problems.append(f"{self.path}: could not be moved aside ({exc.strerror or exc}); "
                                   "it will be on the next save")
            self._preserve = preserve
            return
        if preserve[0] == "rename":
            report.problems.append(f"{self.path}: moved to {report.quarantined}; the agent starts with an empty "
                                   "journal (originals recorded there are not restored automatically)")
            return
        report.problems.append(f"{self.path}: the original file is kept as {report.quarantined}; "
                               f"the {len(self._changes)} valid records are saved back")
        try:
            self._save(dfd)
        except JournalError as exc:
            # The file at the path still holds every valid record: nothing is lost
            # by not raising, and the agent can guard the node with what it has.
            report.problems.append(f"{exc}; the cleaned journal will be written on the next change")

    def _move_aside(self, dfd: int, preserve: Tuple[str, Optional[bytes], Tuple[int, int]]) -> str:
        base = self._base()
        stem = f"{base}.corrupt-{int(time.time())}"
        how, raw, _ = preserve
        if how == "copy":
            # A copy, then the cleaned journal replaces the file atomically: at no
            # moment is there no journal at the path (a rename would leave a gap).
            assert raw is not None
            for i in range(_QUARANTINE_ATTEMPTS):
                name = stem if i == 0 else f"{stem}-{i}"
                try:
                    self._write_new(dfd, name, raw)
                except FileExistsError:
                    continue
                return self._sibling(name)
            raise OSError(errno.EEXIST, "no free quarantine name", stem)
        for i in range(_QUARANTINE_ATTEMPTS):
            name = stem if i == 0 else f"{stem}-{i}"
            try:
                os.stat(name, dir_fd=dfd, follow_symlinks=False)
                continue
            except FileNotFoundError:
                pass
            # rename(2) moves the name itself: a symbolic link is moved, not followed.
            os.rename(base, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return self._sibling(name)
        raise OSError(errno.EEXIST, "no free quarantine name", stem)

    # ------------------------------------------------------------------ changing

    def begin(self, netns: str, name: str, action: str, current: int, target: int, rule: str,
              restore_after: Optional[float] = None, restore_below: Optional[float] = None) -> Token:
        """Before a write: record it as pending (saved durably before returning).

        An existing record keeps its original: after a crash, `current` may be the
        agent's own earlier value. Raises JournalError (and changes nothing) if the
        change cannot be recorded; the caller must then not write."""
        key = (netns, name)
        previous = self._changes.get(key)
        if previous is None:
            if len(self._changes) >= MAX_RECORDS:
                raise JournalError(f"{self.path}: already {MAX_RECORDS} records; cannot record {name}")
            change = Change(netns, name, action, current, target, rule, time.time(),
                            restore_after, restore_below, pending=True)
        else:
            change = replace(previous, action=action, applied=target, rule=rule, restore_after=restore_after,
                             restore_below=restore_below, pending=True)
        change = check_change(change)
        self._commit(key, change)
        return Token(key, None if previous is None else replace(previous), replace(change))

    def confirm(self, token: Token, applied: int) -> None:
        """The write happened; `applied` is what the kernel kept."""
        self._unused(token)
        _integer_or_error(applied, "applied")
        current = self._changes.get(token.key)
        # A record forgotten meanwhile is put back: the write happened, so its
        # original must stay known.
        base = current if current is not None else token.change
        self._commit(token.key, replace(base, applied=applied, pending=False))
        token.used = True

    def rollback(self, token: Token) -> None:
        """The write did not happen: the record is as it was before begin()."""
        self._unused(token)
        self._commit(token.key, token.previous)
        token.used = True

    def forget(self, netns: str, name: str) -> bool:
        """Drop a record (restored, or gone); True if there was one."""
        if (netns, name) not in self._changes:
            return False
        self._commit((netns, name), None)
        return True

    def forget_namespace(self, netns: str) -> List[Change]:
        """Drop every record of a namespace that is gone for good; returns them."""
        gone = [c for c in self._changes.values() if c.netns == netns]
        if gone:
            self._apply({(c.netns, c.name): None for c in gone})
        return [replace(c) for c in gone]

    def reassign(self, netns: str, name: str, rule: str, restore_after: Optional[float],
                 restore_below: Optional[float]) -> None:
        """A new owner rule adopts a record (the value is not touched). No record: nothing to do."""
        current = self._changes.get((netns, name))
        if current is None:
            return
        change = replace(current, rule=rule, restore_after=restore_after, restore_below=restore_below)
        if change == current:
            return
        change = check_change(change)
        self._commit((netns, name), change)

    def settle(self, netns: str, name: str, applied: int) -> None:
        """A confirmed value corrected to what the kernel kept (it rounds buckets), and at
        recovery a pending record whose write is found done (after a kill)."""
        current = self._changes.get((netns, name))
        if current is None:
            return
        _integer_or_error(applied, "applied")
        self._commit((netns, name), replace(current, applied=applied, pending=False))

    def save(self) -> None:
        """Write the journal as it is (the mutating methods already do)."""
        self._apply({})

    # ------------------------------------------------------------------ writing

    def _commit(self, key: Tuple[str, str], change: Optional[Change]) -> None:
        self._apply({key: change})

    def _apply(self, updates: Dict[Tuple[str, str], Optional[Change]]) -> None:
        """Apply updates (None removes) and save; on failure memory is put back,
        so a JournalError always means nothing changed."""
        before = dict(self._changes)
        self._converted = None
        for key, change in updates.items():
            if change is None:
                self._changes.pop(key, None)
            else:
                self._changes[key] = change   # an existing key keeps its place
        try:
            dfd = self._open_dir(create=True)
            assert dfd is not None
            try:
                self._save(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            self._changes = before
            raise

    def _save(self, dfd: int) -> None:
        base = self._base()
        try:
            try:
                st: Optional[os.stat_result] = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if not self._loaded and st is not None:
                raise JournalError(f"{self.path}: exists but was not loaded; load() it first, "
                                   "or its records would be overwritten")
            if self._preserve is not None and st is not None and (st.st_dev, st.st_ino) == self._preserve[2]:
                self._move_aside(dfd, self._preserve)
                st = None
            self._preserve = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise JournalError(f"{self.path}: is {_kind(st.st_mode)}, not a regular file; "
                                   "refusing to replace it (move it away)")
            lines = [json.dumps(asdict(c), sort_keys=True, separators=(",", ":"), allow_nan=False)
                     for c in self._changes.values()]
            payload = (f'{{"version": {SCHEMA_VERSION}, "changes": [\n' + ",\n".join(lines)
                       + ("\n" if lines else "") + "]}\n").encode()
            temp = None
            for _ in range(_TEMP_ATTEMPTS):
                name = f".{base}.{_random_token()}.tmp"
                try:
                    self._write_new(dfd, name, payload)
                except FileExistsError:
                    continue
                temp = name
                break
            if temp is None:
                raise JournalError(f"{self.path}: {_TEMP_ATTEMPTS} random temporary names were all taken "
                                   "in its directory (planted?); not saved")
            try:
                # rename(2) replaces the name at the path; a link there is not followed.
                os.replace(temp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                try:
                    os.unlink(temp, dir_fd=dfd)
                except OSError:
                    pass
                raise
        except OSError as exc:
            raise self._error("cannot save", exc) from None

    def _write_new(self, dfd: int, name: str, data: bytes) -> None:
        """Create `name` (never an existing name, never through a link) and write it whole
        (no fsync: see the module's docstring). Raises FileExistsError if the name is taken."""
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            owner = os.fstat(dfd)
            if os.geteuid() == 0 and owner.st_uid != 0:
                # root's `restore` writes into the service's StateDirectory=: the new
                # file must stay the service's, or the agent cannot read it at its
                # next start (fchown on the descriptor: no name to race on).
                os.fchown(fd, owner.st_uid, owner.st_gid)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
            raise
        os.close(fd)

    # ------------------------------------------------------------------ the directory

    def _base(self) -> str:
        base = os.path.basename(self.path)
        if base in ("", ".", ".."):
            raise JournalError(f"{self.path!r}: not a file path")
        return base

    def _sibling(self, name: str) -> str:
        return os.path.join(os.path.dirname(self.path), name)

    def _open_dir(self, create: bool) -> Optional[int]:
        """A descriptor of the state directory, checked; every later name is resolved
        relative to it, so the directory cannot be swapped after the check. None
        if it does not exist and create is False."""
        directory = os.path.dirname(self.path) or "."
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                dfd = os.open(directory, flags)
            except FileNotFoundError:
                if not create:
                    return None
                os.makedirs(directory, mode=0o700, exist_ok=True)
                dfd = os.open(directory, flags)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
                raise JournalError(f"{directory}: the state directory is a symbolic link; refusing to use it "
                                   "(point state_file at the real directory)") from None
            raise JournalError(f"{directory}: cannot open the state directory: {exc.strerror or exc}") from None
        try:
            st = os.fstat(dfd)
            euid = os.geteuid()
            if st.st_uid not in (euid, 0) and not (euid == 0 and st.st_uid == _service_uid(self.service_user)):
                raise JournalError(f"{directory}: the state directory is owned by uid {st.st_uid}, not by this user "
                                   f"(uid {euid}) or root{' or ' + self.service_user if euid == 0 else ''}: "
                                   "its owner could replace the journal; refusing to use it")
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise JournalError(f"{directory}: the state directory is writable by "
                                   f"{'others' if st.st_mode & 0o002 else 'its group'} (mode "
                                   f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit; refusing to use it "
                                   "(chmod 0700)")
        except BaseException:
            os.close(dfd)
            raise
        return dfd

    def _error(self, what: str, exc: OSError) -> JournalError:
        return JournalError(f"{self.path}: {what}: {exc.strerror or exc}")

    def _unused(self, token: Token) -> None:
        if token.used:
            raise ValueError(f"{token!r} was already confirmed or rolled back")


def _integer_or_error(value: Any, what: str) -> None:
    try:
        _integer(value)
    except _Invalid as exc:
        raise JournalError(f"cannot record {what}: {exc}") from None

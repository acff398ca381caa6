"""The admin's conntrack sysctls from sysctl.d, read the way systemd-sysctl reads them.

The only module that reads sysctl.d. Why the agent needs it: on a kernel where
nf_conntrack is a module (Debian 12's 6.1), systemd-sysctl.service applies
/etc/sysctl.d at boot, usually before anything loads nf_conntrack; its
net.netfilter.nf_conntrack_* lines then fail (ENOENT, logged and skipped) and
nothing applies them when the module arrives later (systemd re-runs
systemd-sysctl on a module load for `bridge` only, 99-systemd.rules). Measured
in a Debian 12 VM: nf_conntrack_max=131072 in /etc/sysctl.d stays at the
kernel's default after `modprobe nf_conntrack` (tests/system/test_boot_vm.py).
The agent can read here what the admin asked for and apply it when the module
loads (uevent.py tells it when).

Order and precedence, as systemd-sysctl (systemd 252, Debian 12) does and as
sysctl.d(5) describes:
- *.conf files in /etc/sysctl.d, /run/sysctl.d, /usr/local/lib/sysctl.d,
  /usr/lib/sysctl.d and /lib/sysctl.d (split-/usr builds such as Debian 12's;
  on a merged-/usr system it is /usr/lib/sysctl.d again); hidden files skipped.
- A file name in an earlier directory hides the same name in later ones; a
  symlink to /dev/null (or an empty file) so masks a vendor file.
- All the files, whatever their directory, in lexicographic order of their names;
  a later assignment of a key replaces an earlier one.
- /etc/sysctl.conf: systemd-sysctl does not read it by name. Debian's systemd
  ships /etc/sysctl.d/99-sysctl.conf -> ../sysctl.conf, so at boot it is read
  at "99-sysctl.conf" in that order, and a "99-zz.conf" comes after it.
  `sysctl --system` (procps 4.0.2) reads it last of all instead, and writes
  every line in turn, so a refused value leaves the last accepted one in place:
  order="procps" models both (and, like procps, does not skip hidden files).
  The two agree unless a file sorting after 99-sysctl.conf sets the same key,
  or a key's last value is bad.
- Lines: leading and trailing whitespace stripped; empty lines and lines starting
  with '#' or ';' ignored (not after a value: "1 # x" is written as the value,
  and the kernel takes the 1);
  "key = value", split at the first '='; a '-' before the key means failures to
  write it are ignored; "-key" alone excludes key from the globs; '.' and '/'
  separate the key's parts ("net/netfilter/nf_conntrack_max" is the same key;
  if the first separator is '/', dots stay dots).
- Globs in keys (systemd >= 249: "net.netfilter.nf_conntrack_*_timeout = 30")
  name no key until the sysctls exist: `read()` keeps the globs that can match
  a conntrack key and `Settings.resolve(names)` expands them against the names
  present once the module is loaded. As in systemd, a key assigned explicitly
  anywhere (or excluded with "-key") is never set by a glob; procps 4.0.2 was
  seen doing the same on the kernel test's tree.
- systemd's credentials (sysctl.extra) and files named on its command line are
  not read.

Only conntrack keys are returned: net.netfilter.nf_conntrack_* and the legacy
alias net.nf_conntrack_max (one value, two names: both are returned, in the
order systemd-sysctl writes them, so writing in dict order ends as it would).
Values are integers as the kernel parses them (decimal, 0x hex, 0 octal). A bad
value, an unreadable file or a conntrack line that is not an assignment is
reported as a Problem ("file:line: ...") and never raises; with
order="systemd", a key whose last assignment is bad is left out, as
systemd-sysctl's write of it fails at boot too.

tests/kernel/test_sysctld_systemd.py checks all of this against the real
systemd-sysctl and `sysctl --system` on a tree of files covering each rule.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

DIRS = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d")
SYSCTL_CONF = "/etc/sysctl.conf"
COMMENTS = "#;"
MAX_FILE_BYTES = 4 * 1024 * 1024   # larger is not a config file; read that much, report the rest
_LINE_END = re.compile(r"\r\n|[\n\r\0]")  # systemd's read_line() ends a line at any of these
_KERNEL_INT = re.compile(r"\A-?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_GLOB_CHARS = "*?["
INT_MIN, INT_MAX = -2 ** 31, 2 ** 31 - 1


class Assignment(NamedTuple):
    value: int
    file: str               # the path as found (a symlink's own path, e.g. /etc/sysctl.d/99-sysctl.conf)
    line: int               # 1-based
    ignore_failure: bool    # written as "-key = value"


class Problem(NamedTuple):
    file: str
    line: int               # 0: about the whole file
    message: str

    def __str__(self) -> str:
        return "%s:%d: %s" % (self.file, self.line, self.message) if self.line else "%s: %s" % (self.file, self.message)


class Glob(NamedTuple):
    pattern: str            # normalised, '/'-separated, as systemd matches it under /proc/sys
    text: str               # the value as written
    file: str
    line: int
    ignore_failure: bool


def is_conntrack_key(key: str) -> bool:
    """`key` normalised ('/'-separated): one of the conntrack sysctls."""
    return key.startswith("net/netfilter/nf_conntrack_") or key == "net/nf_conntrack_max"


def dotted(key: str) -> str:
    return key.replace("/", ".")


def normalize(key: str) -> str:
    """A sysctl key as systemd's sysctl_normalize(): '/'-separated, no leading '/'.

    If the first separator is '.', dots become slashes and slashes dots (a dot in a
    part, e.g. an interface name "eth0.100", is written as '/': net.ipv4.conf.eth0/100.rp_filter)."""
    first = re.search(r"[./]", key)
    if first and first.group() == ".":
        key = key.translate(str.maketrans("./", "/."))
    parts = [p for p in key.split("/") if p not in ("", ".")]
    return "/".join(parts)


def parse_kernel_int(text: str) -> Optional[int]:
    """The integer the kernel's proc_dointvec takes from `text`, or None if it refuses it.

    As measured on 6.18 (a throw-away namespace's timeouts): base 0 ("0x64" is 100,
    "036" is 30), an optional '-', no '+'; a number followed by whitespace ends
    the value, whatever follows ("33 # note" sets 33, "34 35" sets 34, without error);
    anything else glued on ("33abc") is refused. Outside a C int: refused."""
    token = text.strip(" \t\n\r").split(None, 1)[0] if text.strip(" \t\n\r") else ""
    if not _KERNEL_INT.match(token):
        return None
    negative = token.startswith("-")
    digits = token.lstrip("-")
    if digits[:2].lower() == "0x":
        value = int(digits[2:], 16)
    elif len(digits) > 1 and digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    value = -value if negative else value
    return value if INT_MIN <= value <= INT_MAX else None


class Settings:
    """What read() found: the explicit conntrack assignments, the globs, the problems."""

    def __init__(self) -> None:
        # normalised key -> Assignment, or None for "-key" (excluded from globs) and for a
        # key whose last assignment was bad. Insertion order is systemd's write order.
        self._explicit: Dict[str, Optional[Assignment]] = {}
        self.globs: List[Glob] = []
        self.problems: List[Problem] = []
        self.files: List[str] = []       # read, in order (masked and missing ones not)

    @property
    def values(self) -> Dict[str, Assignment]:
        """{"net.netfilter.nf_conntrack_max": Assignment(...)} for explicit keys, in write order."""
        return {dotted(k): a for k, a in self._explicit.items() if a is not None}

    def resolve(self, names: Iterable[str]) -> Dict[str, Assignment]:
        """values() plus what the globs set among `names` (sysctl names present now, dotted
        or '/'-separated, e.g. the files in /proc/sys/net/netfilter as "net.netfilter.X").
        A glob's bad value for a matched name is added to problems."""
        result = self.values
        for name in names:
            key = normalize(name)
            if key in self._explicit or not is_conntrack_key(key):
                continue
            for glob in self.globs:  # in order: a later glob's write lands last
                if _glob_match(glob.pattern, key):
                    value = parse_kernel_int(glob.text)
                    if value is None:
                        problem = Problem(glob.file, glob.line, "%s (via %s): not an integer the kernel takes: %r"
                                          % (dotted(key), dotted(glob.pattern), glob.text))
                        if problem not in self.problems:
                            self.problems.append(problem)
                        result.pop(dotted(key), None)
                        continue
                    result[dotted(key)] = Assignment(value, glob.file, glob.line, glob.ignore_failure)
        return result

    def __repr__(self) -> str:
        return "Settings(values=%r, globs=%r, problems=%r)" % (self.values, self.globs, self.problems)

    # building ---------------------------------------------------------------

    def _assign(self, key: str, value: Optional[Assignment]) -> None:
        # systemd keeps an equal re-assignment where it was and moves a changed one to the end.
        if key in self._explicit:
            old = self._explicit[key]
            if old is not None and value is not None and old.value == value.value:
                self._explicit[key] = old._replace(ignore_failure=old.ignore_failure or value.ignore_failure)
                return
            del self._explicit[key]
        self._explicit[key] = value


def _glob_match(pattern: str, key: str) -> bool:
    # glob(3) under /proc/sys: a wildcard never crosses a '/'.
    pparts, kparts = pattern.split("/"), key.split("/")
    return len(pparts) == len(kparts) and all(fnmatch.fnmatchcase(k, p) for p, k in zip(pparts, kparts))


def _may_match_conntrack(pattern: str) -> bool:
    # Over-inclusive on purpose: resolve() matches each glob against the real names.
    parts = pattern.split("/")
    if len(parts) == 2:
        return _glob_match(pattern, "net/nf_conntrack_max")
    return len(parts) == 3 and fnmatch.fnmatchcase("net", parts[0]) and fnmatch.fnmatchcase("netfilter", parts[1])


def _resolve(root: str, path: str, hops: int = 40) -> str:
    """`path` inside `root` with its symlinks followed as if `root` were /: an absolute
    link target stays inside root. Returns the host path (which may not exist)."""
    if root in ("", "/"):
        return path
    parts = [p for p in path.split("/") if p]
    done: List[str] = []
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        if os.path.islink(candidate):
            hops -= 1
            if hops < 0:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def conf_files(root: str = "/", order: str = "systemd") -> List[Tuple[str, str]]:
    """The files read, in order: [(path as found, host path to open)].

    Masked names (a /dev/null symlink or an empty file) are left out; so is, for
    order="systemd", everything starting with '.'."""
    if order not in ("systemd", "procps"):
        raise ValueError("order is 'systemd' or 'procps', not %r" % (order,))
    found: Dict[str, Tuple[str, str, bool]] = {}   # name -> (shown path, host path to open, masked)
    for directory in DIRS:
        try:
            host_dir = _resolve(root, directory)
            names = os.listdir(host_dir)
        except OSError:
            continue
        for name in names:
            if not name.endswith(".conf") or name in found:
                continue
            if order == "systemd" and name.startswith("."):
                continue
            shown = directory + "/" + name
            try:
                host = _resolve(root, shown)
            except OSError:  # a symlink loop: reading it reports the problem
                host = os.path.join(host_dir, name)
            found[name] = (shown, host, _is_mask(os.path.join(host_dir, name), host))
    files = [(found[n][0], found[n][1]) for n in sorted(found) if not found[n][2]]
    if order == "procps":
        host = _resolve(root, SYSCTL_CONF)
        try:
            if stat.S_ISREG(os.stat(host).st_mode):
                files.append((SYSCTL_CONF, host))
        except OSError:
            pass
    return files


def _is_mask(entry: str, host: str) -> bool:
    """`entry`: the directory entry itself; `host`: where it leads."""
    try:
        if os.path.islink(entry) and os.readlink(entry) == "/dev/null":
            return True
        st = os.stat(host)
    except OSError:
        return False  # unreadable or dangling: not a mask; reading it reports the problem
    return stat.S_ISCHR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_size == 0)


def read(root: str = "/", order: str = "systemd") -> Settings:
    """The conntrack settings sysctl.d asks for under `root` (for the tests: a tree laid
    out like /). Never raises for what is in the files or their absence."""
    settings = Settings()
    for shown, host in conf_files(root, order):
        try:
            with open(host, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            settings.problems.append(Problem(shown, 0, "cannot read: %s" % (exc.strerror or exc)))
            continue
        if len(data) > MAX_FILE_BYTES:
            settings.problems.append(Problem(shown, 0, "larger than %d bytes; the rest is not read" % MAX_FILE_BYTES))
            data = data[:MAX_FILE_BYTES]
        settings.files.append(shown)
        _parse(settings, shown, data.decode("utf-8", "replace"), refused_unsets=(order == "systemd"))
    return settings


def _parse(settings: Settings, path: str, text: str, refused_unsets: bool) -> None:
    lines = _LINE_END.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        line = raw.strip(" \t\n\r")
        if not line or line[0] in COMMENTS:
            continue
        key_text, eq, value_text = line.partition("=")
        ignore_failure = key_text.startswith("-")
        if ignore_failure:
            key_text = key_text[1:]
        key = normalize(key_text.strip(" \t\n\r"))
        glob = any(c in key for c in _GLOB_CHARS)
        if not eq:
            if ignore_failure and not glob and is_conntrack_key(key):
                settings._assign(key, None)  # "-key": excluded from globs, and unsets it
            elif not ignore_failure and is_conntrack_key(key):
                settings.problems.append(Problem(path, number, "%s: not an assignment (no '=')" % dotted(key)))
            continue
        value_text = value_text.strip(" \t\n\r")
        if glob:
            if _may_match_conntrack(key):
                settings.globs.append(Glob(key, value_text, path, number, ignore_failure))
            continue
        if not is_conntrack_key(key):
            continue
        value = parse_kernel_int(value_text)
        if value is None:
            settings.problems.append(Problem(path, number, "%s: not an integer the kernel takes: %r"
                                             % (dotted(key), value_text)))
            if refused_unsets:
                # systemd-sysctl writes only the last assignment: this one, which the kernel refuses.
                settings._assign(key, None)
            # (procps writes each line in turn: the last accepted one stays.)
            continue
        settings._assign(key, Assignment(value, path, number, ignore_failure))

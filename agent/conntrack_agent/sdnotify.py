"""The sd_notify protocol, without libsystemd: readiness, status, watchdog, reload, stop.

A datagram of newline-separated KEY=value assignments sent to the AF_UNIX socket
named by $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace). The
protocol is one of systemd's stable interfaces (systemd.io/PORTABILITY_AND_STABILITY),
so a dozen lines replace the dependency. Outside systemd every call is a no-op.

systemd 252 (Debian 12, RHEL 9) has no Type=notify-reload: the unit uses
Type=notify with ExecReload=kill -HUP, and the daemon brackets its own reload
with RELOADING=1 (+ MONOTONIC_USEC, which 253+ uses to match the reload to the
request) and READY=1.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, Optional

# STATUS= is shown on one line by `systemctl status`; systemd truncates nothing
# but a long line wraps badly, and a newline would end the assignment.
STATUS_MAX = 200


class Notifier:
    """One service's notification channel. Never raises: a lost notification must
    not take the agent down (systemd may be restarting, or we run by hand)."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env)
        self._sock: Optional[socket.socket] = None
        self.last_error: Optional[OSError] = None
        self._last_status: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> Optional[float]:
        """WatchdogSec= in seconds when systemd expects pings from this process, else None.

        Ping at least twice per interval (sd_watchdog_enabled(3)), so one late
        ping does not get the service killed.
        """
        return self._watchdog_usec / 1e6 if self._watchdog_usec else None

    # ------------------------------------------------------------------ messages

    def ready(self, status: Optional[str] = None) -> bool:
        return self._send_with_status("READY=1", status)

    def status(self, text: str) -> bool:
        """STATUS=; repeats of the same line are not resent (the tick calls this often)."""
        line = _clean(text)
        if line == self._last_status:
            return True
        if self.send("STATUS=" + line):
            self._last_status = line
            return True
        return False

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self, status: Optional[str] = None) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send_with_status("RELOADING=1\nMONOTONIC_USEC=%d" % usec, status)

    def stopping(self, status: Optional[str] = None) -> bool:
        return self._send_with_status("STOPPING=1", status)

    def send(self, message: str) -> bool:
        """Send raw assignments; True when delivered or when there is no one to tell."""
        if self._address is None:
            return True
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            self.last_error = exc
            self.close()
            return False
        return True

    def _send_with_status(self, message: str, status: Optional[str]) -> bool:
        if status is None:
            return self.send(message)
        line = _clean(status)
        if self.send(message + "\nSTATUS=" + line):
            self._last_status = line
            return True
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> Optional[str]:
    if not value:
        return None
    if value[0] == "@":
        return "\0" + value[1:]
    if value[0] == "/":
        return value
    # vsock addresses (systemd 254+, for VMs) and anything else: not for us.
    return None


def _watchdog_usec(env: Mapping[str, str]) -> Optional[int]:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    # WATCHDOG_PID names the process systemd watches; a child that inherited the
    # environment must not ping on its parent's behalf.
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec


def _clean(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= STATUS_MAX else line[:STATUS_MAX - 1] + "…"

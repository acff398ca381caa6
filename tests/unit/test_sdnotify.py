"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from conntrack_agent import sdnotify


@pytest.fixture
def manager(dgram_listener):
    return dgram_listener


def _recv(sock: socket.socket) -> dict:
    lines = sock.recv(4096).decode().split("\n")
    return dict(line.split("=", 1) for line in lines)


def test_no_socket_is_a_silent_no_op() -> None:
    notifier = sdnotify.Notifier({})
    assert not notifier.enabled
    assert notifier.ready() and notifier.status("x") and notifier.watchdog() and notifier.stopping()
    assert notifier.watchdog_interval() is None


def test_ready_with_status_and_status_dedup(manager) -> None:
    path, sock = manager
    notifier = sdnotify.Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready(status="count 1/2 (50.0%)")
    assert _recv(sock) == {"READY": "1", "STATUS": "count 1/2 (50.0%)"}
    notifier.status("count 1/2 (50.0%)")  # the same line: not resent
    notifier.status("line\nwith  newline")
    assert _recv(sock) == {"STATUS": "line with newline"}


def test_reloading_carries_monotonic_usec(manager) -> None:
    path, sock = manager
    notifier = sdnotify.Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    fields = _recv(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_abstract_socket() -> None:
    name = "conntrack-agent-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(1)
    try:
        assert sdnotify.Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert _recv(sock) == {"STOPPING": "1"}
    finally:
        sock.close()


def test_watchdog_interval_only_for_this_pid() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "30000000"}
    assert sdnotify.Notifier(env).watchdog_interval() == 30.0
    assert sdnotify.Notifier(dict(env, WATCHDOG_PID=str(os.getpid()))).watchdog_interval() == 30.0
    assert sdnotify.Notifier(dict(env, WATCHDOG_PID=str(os.getpid() + 1))).watchdog_interval() is None
    assert sdnotify.Notifier(dict(env, WATCHDOG_USEC="0")).watchdog_interval() is None


def test_a_vanished_manager_does_not_raise(tmp_path: Path) -> None:
    notifier = sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.watchdog() is False
    assert isinstance(notifier.last_error, OSError)


def test_unsupported_address_is_ignored() -> None:
    assert not sdnotify.Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled

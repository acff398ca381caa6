"""Fixtures shared by the unit tests."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator, Tuple

import pytest


@pytest.fixture
def dgram_listener(tmp_path: Path) -> Iterator[Tuple[str, socket.socket]]:
    """A bound AF_UNIX datagram socket standing in for systemd or journald: (path, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "listener.socket")
    sock.bind(path)
    sock.settimeout(1)
    yield path, sock
    sock.close()

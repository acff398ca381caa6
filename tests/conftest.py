"""Shared test set-up.

Kernel and system tests skip on a developer's machine without root or tools, but
in CI (env CI set) a skipped kernel or system test fails the run: a green CI must
mean the real thing was exercised.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rig  # noqa: E402

_skipped_real: list = []


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        rig.cleanup_stale()  # namespaces left by a killed run


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("CI"):
        keywords = report.keywords
        if "kernel" in keywords or "system" in keywords:
            _skipped_real.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped_real and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _skipped_real:
        terminalreporter.write_line(
            "FAILED: kernel/system tests skipped in CI (a skip there is a failure): " + ", ".join(_skipped_real),
            red=True)

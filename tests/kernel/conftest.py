"""Kernel tests: real conntrack entries in namespaces the tests create.

Each needs root and the conntrack/nft/ip tools: without them a test skips on a
developer's machine and fails in CI (rig.require_root/require_tools).
"""

from __future__ import annotations

import pytest

import rig


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def _root_and_tools():
    rig.require_root()
    rig.require_tools()


@pytest.fixture
def ns():
    """A fresh namespace with conntrack active on its loopback; removed afterwards."""
    with rig.Namespace() as namespace:
        yield namespace

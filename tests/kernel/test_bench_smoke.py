"""Benchmarks stay runnable: each bench script runs end to end at a tiny size.

Figures at this size mean nothing; what is checked is that the run completes,
compares like with like, and writes its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- evict

def test_evict_bench_smoke(tmp_path):
    out, raw = tmp_path / "evict.md", tmp_path / "evict.json"
    # The bench takes the global test lock itself; holding it here would deadlock.
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "evict.py"), "--sizes", "2000",
                           "--repeat", "1", "--out", str(out), "--json", str(raw)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["scenario"]: r for r in json.loads(raw.read_text())}
    assert set(rows) == {"tcp_state", "mark", "mark_userspace", "age_tcp_state"}
    for name, row in rows.items():
        assert row["size"] == 2000
        assert row["selected"] == 1000, name  # half of the table, by construction
        assert row["agent_done"] == [1000], name
        assert row["agent_rate"] > 0
        assert 0 < row["agent_rss_mb"] < 60
        assert row["live_kept"] is True, name
        if name != "age_tcp_state":
            assert row["same_selection"] is True, name
            assert row["conntrack_done"] == [1000]
    from conntrack_agent.ctnetlink import CtnetlinkSocket

    with CtnetlinkSocket() as ct:
        kernel_filters = {"mark", "status"} <= ct.filter_features()
    assert rows["mark"]["agent_path"] == ("kernel" if kernel_filters else "userspace")
    assert rows["mark_userspace"]["agent_path"] == "userspace"
    assert rows["tcp_state"]["agent_path"] == "userspace"
    text = out.read_text()
    assert "| 2000 | tcp_state | 1000 | userspace |" in text
    assert "kernel: " in text and "command: `python3 bench/evict.py" in text

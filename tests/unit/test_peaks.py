"""Daily peaks and `recommend`: the record survives restarts, the advice follows it."""

from __future__ import annotations

import json

from conntrack_agent import cli, peaks, service

from fakekernel import FakeKernel
from test_failure_paths import Rig


def test_the_agent_records_daily_peaks_and_keeps_them_across_a_restart(tmp_path):
    kernel = FakeKernel(maximum=1000)
    rig = Rig(tmp_path, kernel)
    rig.write_policy(text=f'[agent]\nstate_file = "{rig.state}"\n')
    rig.start()
    rig.set_count(900)
    rig.run_for(0.2, step=0.05)                       # grow-table raises the max
    assert rig.agent.status_due()
    rig.agent.stop()
    record = json.loads((tmp_path / "peaks.json").read_text())
    (day, entry), = record["days"].items()
    assert entry["count"] == 900 and entry["raised_to"] == kernel.globals["nf_conntrack_max"] > 1000
    again = Rig(tmp_path, kernel)
    again.policy = rig.policy
    again.start()
    again.set_count(50)
    again.run_for(0.5)
    assert again.agent.status_due()
    again.agent.stop()
    assert json.loads((tmp_path / "peaks.json").read_text())["days"][day]["count"] == 900   # a peak stays


def test_recommend_sizes_for_twice_the_worst_day_and_explains():
    record = peaks.Peaks({"2026-11-20": {"count": 40000, "fill_rate": 900.0, "raised_to": 0, "max": 65536},
                          "2026-11-21": {"count": 150000, "fill_rate": 25000.0, "raised_to": 262144, "max": 262144}})
    advice = peaks.recommend(record, cpus=4, current_max=65536, current_buckets=65536)
    assert advice["nf_conntrack_max"] == 524288 and advice["nf_conntrack_buckets"] == 524288
    assert advice["kube_proxy"] == {"conntrack.min": 524288, "conntrack.maxPerCore": 131072}
    text = "\n".join(peaks.lines(advice))
    assert "net.netfilter.nf_conntrack_max = 524288" in text and "150000 entries, on 2026-11-21" in text
    assert "only 2 day(s) of history" in text


def test_a_damaged_record_is_replaced_not_trusted(tmp_path):
    path = tmp_path / "peaks.json"
    for junk in (b"[", b"[]", b'{"days": {"2026-11-21": {"count": "x"}}}', b'{"days": {"x": 1}}'):
        path.write_bytes(junk)
        assert peaks.Peaks.load(str(path)).days == {}


def test_recommend_command(tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[agent]\nstate_file = "{tmp_path}/state.json"\n')
    assert cli.main(["recommend", "--config", str(policy)]) == 1          # no history yet
    peaks.Peaks({"2026-11-21": {"count": 3000, "fill_rate": 1.0, "raised_to": 0, "max": 7680}}).save(
        str(tmp_path / "peaks.json"))
    capsys.readouterr()
    assert cli.main(["recommend", "--config", str(policy), "--json"]) == 0
    advice = json.loads(capsys.readouterr().out)
    assert advice["nf_conntrack_max"] == 8192 and advice["days"] == 1

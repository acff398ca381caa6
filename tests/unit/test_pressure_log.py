"""The pressure log has hysteresis: one episode, two lines, however bursty the storm."""

from __future__ import annotations

from conntrack_agent import config, model, service


class ListLogger:
    def __init__(self):
        self.events = []

    def log(self, level, event, **fields):
        self.events.append(event)


def sample_at(t: float, count: int) -> model.Sample:
    view = model.NamespaceView("", count, count / 1000, 0.0, None, {})
    return model.Sample(time=t, max=1000, buckets=1000, namespaces=(view,))


def test_a_bursty_storm_is_one_episode():
    log = ListLogger()
    agent = service.Agent(None, False, log, initial=config.loads(b""))
    # busy / quiet gaps shorter than PRESSURE_HOLD / busy again / quiet for good
    pattern = [(0.0, True), (0.1, False), (0.2, True), (1.0, False), (2.0, True), (2.1, False),
               (3.0, False), (6.0, False), (7.2, False), (8.0, False)]
    for t, busy in pattern:
        agent._note_pressure(sample_at(t, 600 if busy else 10), busy=busy)
    assert log.events == ["pressure", "pressure_eased"]
    assert agent._under_pressure is False


def test_pressure_eases_only_after_the_hold():
    log = ListLogger()
    agent = service.Agent(None, False, log, initial=config.loads(b""))
    agent._note_pressure(sample_at(0.0, 600), busy=True)
    agent._note_pressure(sample_at(1.0, 10), busy=False)
    agent._note_pressure(sample_at(1.0 + service.PRESSURE_HOLD - 0.01, 10), busy=False)
    assert log.events == ["pressure"]
    agent._note_pressure(sample_at(1.0 + service.PRESSURE_HOLD, 10), busy=False)
    assert log.events == ["pressure", "pressure_eased"]

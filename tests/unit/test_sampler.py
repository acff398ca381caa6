"""The sampler with many namespaces, on the fake kernel: per-CPU counter reads spread
over the ticks, never skipped where they matter, and the re-read before acting
limited to the namespaces acted on."""

from __future__ import annotations

import json
from typing import Dict, List

from conntrack_agent.kernel import COUNTERS_REFRESH
from conntrack_agent.sampler import Sampler

from fakekernel import FakeKernel
from test_failure_paths import Clock, Rig

N = 250


def rig(n: int = N, maximum: int = 262144):
    kernel = FakeKernel(maximum=maximum, cached_counters=True)
    names = tuple("ns%03d" % i for i in range(n))
    for name in names:
        kernel.add_namespace(name)
    clock = Clock()
    sampler = Sampler(names, 0.5, clock, kernel=kernel)
    opened, failed = sampler.open_missing()
    assert len(opened) == n and not failed
    for probe in sampler.probes.values():
        probe.read(clock)            # the agent's first read (conntrack_available): counters and all
    return kernel, sampler, clock


def counter_reads(sampler: Sampler) -> Dict[str, int]:
    return {name: probe.counter_reads for name, probe in sampler.probes.items()}


def run(sampler: Sampler, clock: Clock, seconds: float, step: float) -> List[int]:
    """Tick every `step` for `seconds`; the counter dumps each tick paid."""
    per_tick = []
    end = clock.now + seconds
    while clock.now < end:
        before = sum(counter_reads(sampler).values())
        sampler.sample()
        per_tick.append(sum(counter_reads(sampler).values()) - before)
        clock.now += step
    return per_tick


def test_counter_reads_are_spread_over_the_fast_ticks():
    _, sampler, clock = rig()
    per_tick = run(sampler, clock, 5.0, 0.05)
    # 250 namespaces refreshed within 1 s at 20 ticks a second: ~13 a tick, never all at once.
    assert max(per_tick) <= 3 * N * 0.05 / COUNTERS_REFRESH, per_tick
    assert sum(per_tick) <= N * 5.0 / (COUNTERS_REFRESH * (1 - 0.25)) + N


def test_every_namespace_is_refreshed_within_the_period_plus_a_tick():
    _, sampler, clock = rig()
    step = 0.05
    last = {name: clock.now for name in sampler.probes}
    worst = 0.0
    end = clock.now + 5.0
    while clock.now < end:
        before = counter_reads(sampler)
        sampler.sample()
        for name, n in counter_reads(sampler).items():
            if n > before[name]:
                worst = max(worst, clock.now - last[name])
                last[name] = clock.now
        clock.now += step
    worst = max([worst] + [clock.now - step - t for t in last.values()])
    assert worst <= COUNTERS_REFRESH + step + 1e-9


def test_calm_ticks_read_counters_no_more_often_than_before():
    # 655 ms: the calm tick with the kernel's default max. The old rule (read when 1 s
    # has passed) read each namespace every 2nd tick; the spread phases must not cost more,
    # and must not put every namespace on the same tick.
    _, sampler, clock = rig()
    per_tick = run(sampler, clock, 30.0, 0.655)
    ticks = len(per_tick)
    assert sum(per_tick) <= N * (ticks // 2 + 1)
    assert max(per_tick[2:]) <= 0.75 * N, per_tick


def test_long_ticks_do_not_leave_the_namespaces_in_step():
    # Ticks as long as the period read every namespace every tick; when the tick then
    # shortens (a storm), their refreshes must not all fall on the same fast tick.
    _, sampler, clock = rig()
    long_ticks = run(sampler, clock, 5.0, 1.0)
    assert long_ticks[-1] == N
    fast = run(sampler, clock, 2.0, 0.05)
    # The first fast tick comes a whole second after the last long one: all due, rightly.
    assert max(fast[1:]) <= 0.3 * N, fast


def test_a_namespace_near_full_gets_its_counters_every_tick():
    kernel, sampler, clock = rig(maximum=1000)
    kernel.namespaces["ns007"].count = 600
    before = sampler.probes["ns007"].counter_reads
    ticks = run(sampler, clock, 2.0, 0.05)
    assert sampler.probes["ns007"].counter_reads - before == len(ticks)


def test_a_drop_in_a_calm_namespace_is_seen_within_the_period():
    kernel, sampler, clock = rig()
    run(sampler, clock, 1.3, 0.05)
    for victim in ("ns000", "ns123", "ns249"):
        kernel.namespaces[victim].counters["drop"] += 3
        started, seen = clock.now, None
        while clock.now - started <= COUNTERS_REFRESH + 0.05:
            sample = sampler.sample()
            view = next(v for v in sample.namespaces if v.netns == victim)
            if view.deltas.get("drop"):
                seen = clock.now - started
                assert view.deltas["drop"] == 3 and sample.deltas["drop"] == 3
                break
            clock.now += 0.05
        assert seen is not None, victim


def test_the_first_refresh_is_staggered_but_never_later_than_the_period():
    _, sampler, clock = rig(n=10)
    due = sorted(sampler._counters_due.values())
    assert len(set(round(d, 6) for d in due)) == 10
    assert clock.now <= due[0] and due[-1] <= clock.now + COUNTERS_REFRESH


def test_reread_before_acting_touches_only_the_namespaces_acted_on(tmp_path):
    names = tuple("ns%03d" % i for i in range(40))
    r = Rig(tmp_path, kernel=FakeKernel(maximum=1000, cached_counters=True), namespaces=names)
    # The shipped rules: grow-table raises max (usage >= 75%) for the fullest namespace.
    # (shorten-timeouts off: it acts in every namespace, so all would be re-read, rightly.)
    r.write_policy(text='[agent]\nnamespaces = %s\nstate_file = "%s"\n\n[[rule]]\nname = "shorten-timeouts"\n'
                        'enabled = false\n' % (json.dumps(list(names)), r.state))
    agent = r.start()
    r.run_for(1.0)
    probes = agent.sampler.probes
    reads = {n: p.reads for n, p in probes.items()}
    counters = {n: p.counter_reads for n, p in probes.items()}
    r.kernel.namespaces["ns017"].counters["drop"] += 5
    r.kernel.namespaces["ns017"].count = 800
    agent.tick()
    assert [e["netns"] for e in r.events.of("raise_max")] == ["ns017"]
    # ns017 read twice (the tick's read, the fresh one before acting); the others once.
    assert probes["ns017"].reads - reads["ns017"] == 2
    assert probes["ns017"].counter_reads - counters["ns017"] == 2
    assert {n: probes[n].reads - reads[n] for n in names if n != "ns017"} == {n: 1 for n in names if n != "ns017"}
    # The drop the first read saw is carried into the acted-on sample once, not twice.
    assert agent.last_sample.deltas["drop"] == 5


# ----------------------------------------------------------------------------- pacing

def paced_rig(n: int = N, maximum: int = 32768):
    from conntrack_agent import config, decisions

    policy = config.loads(b"")   # the built-in defaults: fast tick 50 ms, storm_rate 100000/s
    kernel, sampler, clock = rig(n, maximum)
    sampler.pace = lambda view, m: decisions.namespace_interval(view, m, policy)
    sampler.sample()
    clock.now += 0.05
    return kernel, sampler, clock, policy


def reads(sampler: Sampler) -> Dict[str, int]:
    return {name: probe.reads for name, probe in sampler.probes.items()}


def test_a_storm_in_one_namespace_does_not_read_the_calm_ones_at_every_fast_tick():
    kernel, sampler, clock, policy = paced_rig()
    storm, per_tick, calm_reads = kernel.namespaces["ns007"], [], []
    for _ in range(40):                                   # 2 s of fast ticks, the storm at 40000/s
        storm.count += 2000
        before = reads(sampler)
        sampler.sample()
        after = reads(sampler)
        per_tick.append(after["ns007"] - before["ns007"])
        calm_reads.append(sum(after.values()) - sum(before.values()) - per_tick[-1])
        clock.now += policy.agent.fast_interval
    # The storming one: seen within its calm interval (82 ms: the 1st or 2nd tick), then
    # read at every tick.
    assert 1 in per_tick[:2] and per_tick[2:] == [1] * 38, per_tick
    # A calm one's own interval at max 32768 is 82 ms: every other 50 ms tick, not every one
    # (the counters' refreshes add a few: each namespace once a second).
    assert sum(calm_reads) <= 0.6 * 40 * (N - 1), calm_reads


def test_a_calm_namespace_that_starts_filling_is_seen_within_its_own_interval():
    from conntrack_agent import decisions

    kernel, sampler, clock, policy = paced_rig()
    first = sampler.sample()
    own = decisions.namespace_interval(next(v for v in first.namespaces if v.netns == "ns200"), first.max, policy)
    clock.now += 0.05
    kernel.namespaces["ns007"].count = 20000              # another one busy: the fast tick runs
    kernel.namespaces["ns200"].count = 5000               # this one starts filling now
    started = clock.now
    while True:
        sample = sampler.sample()
        if next(v for v in sample.namespaces if v.netns == "ns200").count == 5000:
            break
        clock.now += policy.agent.fast_interval
        assert clock.now - started <= own + policy.agent.fast_interval
    # Once filling, it is read at every fast tick.
    before = reads(sampler)["ns200"]
    for _ in range(5):
        kernel.namespaces["ns200"].count += 2000
        clock.now += policy.agent.fast_interval
        sampler.sample()
    assert reads(sampler)["ns200"] - before == 5


def test_pacing_keeps_the_counters_refresh():
    kernel, sampler, clock, policy = paced_rig(maximum=262144)   # calm interval 655 ms, longer than a tick
    kernel.namespaces["ns007"].count = 140000                     # busy: fast ticks
    kernel.namespaces["ns123"].counters["drop"] += 2
    started, seen = clock.now, None
    while seen is None and clock.now - started <= COUNTERS_REFRESH + 0.05:
        view = next(v for v in sampler.sample().namespaces if v.netns == "ns123")
        if view.deltas.get("drop"):
            seen = clock.now - started
        clock.now += policy.agent.fast_interval
    assert seen is not None


def test_a_tick_with_nothing_due_still_reads_the_fullest():
    # The fast tick holds on after a storm while every namespace's own interval is long:
    # the sample must still carry this tick's time and max (one the agent just raised).
    kernel, sampler, clock, policy = paced_rig(maximum=262144)   # own intervals 655 ms
    kernel.namespaces["ns042"].count = 1000                       # the fullest
    clock.now += 1.0
    sampler.sample()                                              # everyone read
    clock.now += policy.agent.fast_interval
    kernel.globals["nf_conntrack_max"] = 524288
    before = reads(sampler)
    sample = sampler.sample()
    after = reads(sampler)
    assert {n for n in after if after[n] > before[n]} == {"ns042"}
    assert sample.time == clock.now and sample.max == 524288


# ----------------------------------------------------------------------------- under pressure first

def urgent_rig(maximum: int = 32768):
    from conntrack_agent import decisions

    kernel, sampler, clock, policy = paced_rig(maximum=maximum)
    sampler.urgent = lambda view: decisions.namespace_busy(view, policy)
    kernel.namespaces["ns007"].count = 20000             # 61%: under pressure
    clock.now += 0.1                                      # every one due: all read
    sampler.sample(defer=True)
    sampler.catch_up()
    assert sampler.urgent(sampler._views["ns007"])
    clock.now += policy.agent.fast_interval
    return kernel, sampler, clock, policy


def test_under_pressure_the_calm_namespaces_due_are_read_after_the_decision():
    kernel, sampler, clock, policy = urgent_rig()
    clock.now += 0.1                                      # every calm one due (own interval 82 ms)
    kernel.namespaces["ns007"].count += 2000
    before = reads(sampler)
    sample = sampler.sample(defer=True)
    after = reads(sampler)
    assert {n for n in after if after[n] > before[n]} == {"ns007"}
    assert next(v for v in sample.namespaces if v.netns == "ns007").count == 22000
    sampler.catch_up()
    caught = reads(sampler)
    assert {n for n in caught if caught[n] > after[n]} == set(caught) - {"ns007"}
    # Without a namespace under pressure nothing waits: the due ones are read at once.
    kernel.namespaces["ns007"].count = 0
    clock.now += 0.1
    sampler.sample(defer=True)
    sampler.catch_up()                                    # ns007 read, now calm
    clock.now += 0.1
    before = reads(sampler)
    sampler.sample(defer=True)
    assert all(n > before[name] for name, n in reads(sampler).items())


def test_a_calm_namespaces_news_read_after_the_decision_is_in_the_next_sample_once():
    kernel, sampler, clock, policy = urgent_rig()
    clock.now += 0.1
    kernel.namespaces["ns123"].counters["drop"] += 3
    kernel.namespaces["ns123"].count = 900
    sampler._counters_due["ns123"] = 0.0                  # its counters due this tick
    first = sampler.sample(defer=True)
    assert next(v for v in first.namespaces if v.netns == "ns123").deltas == {}
    sampler.catch_up()
    clock.now += policy.agent.fast_interval
    shown = sampler.sample(defer=True)
    view = next(v for v in shown.namespaces if v.netns == "ns123")
    assert view.count == 900 and view.deltas.get("drop") == 3 and shown.deltas.get("drop") == 3
    sampler.catch_up()
    clock.now += policy.agent.fast_interval
    again = sampler.sample(defer=True)
    assert not next(v for v in again.namespaces if v.netns == "ns123").deltas.get("drop")
    # Read after the decision, then again before any sample showed that read (its drops
    # make it busy: read first): both reads' deltas are in the sample.
    clock.now += 0.1
    kernel.namespaces["ns123"].counters["drop"] += 2
    sampler._counters_due["ns123"] = 0.0
    sampler.sample(defer=True)
    assert "ns123" in sampler._deferred
    sampler.catch_up()
    kernel.namespaces["ns123"].counters["drop"] += 4
    sampler._counters_due["ns123"] = 0.0
    clock.now += 0.1
    both = sampler.sample(defer=True)
    assert next(v for v in both.namespaces if v.netns == "ns123").deltas.get("drop") == 6
    assert both.deltas.get("drop") == 6


def test_under_a_long_storm_every_calm_namespace_is_still_read_at_its_own_pace():
    kernel, sampler, clock, policy = urgent_rig()
    last = {name: clock.now for name in sampler.probes}
    longest = {name: 0.0 for name in sampler.probes}
    for _ in range(40):                                   # 2 s of fast ticks
        kernel.namespaces["ns007"].count += 500
        before = reads(sampler)
        sampler.sample(defer=True)
        sampler.catch_up()
        for name, n in reads(sampler).items():
            if n > before[name]:
                longest[name] = max(longest[name], clock.now - last[name])
                last[name] = clock.now
        clock.now += policy.agent.fast_interval
    # The calm interval at max 32768 is 82 ms: read at the first tick after it, never starved.
    assert max(longest.values()) <= 0.082 + policy.agent.fast_interval + 1e-9, longest


def test_the_tick_acts_before_it_reads_the_calm_namespaces(tmp_path, monkeypatch):
    from fakekernel import FakeProbe

    names = tuple("ns%03d" % i for i in range(40))
    r = Rig(tmp_path, kernel=FakeKernel(maximum=1000, cached_counters=True), namespaces=names)
    r.write_policy(text='[agent]\nnamespaces = %s\nstate_file = "%s"\n\n[[rule]]\nname = "shorten-timeouts"\n'
                        'enabled = false\n' % (json.dumps(list(names)), r.state))
    r.kernel.namespaces["ns017"].count = 600              # 60%: under pressure, no raise yet
    agent = r.start()
    r.run_for(0.5, step=0.05)
    assert not r.events.of("raise_max")
    log: List[tuple] = []
    real_read = FakeProbe.read

    def read(self, now, counters=False):
        log.append((self.name, len(r.kernel.writes)))
        return real_read(self, now, counters)

    monkeypatch.setattr(FakeProbe, "read", read)
    r.clock.now += 0.1                                    # the calm ones due
    r.kernel.namespaces["ns017"].count = 800
    written = len(r.kernel.writes)
    agent.tick()
    assert [e["netns"] for e in r.events.of("raise_max")] == ["ns017"]
    assert r.kernel.writes[written][1] == "nf_conntrack_max"
    calm = [writes for name, writes in log if name != "ns017"]
    assert len(calm) == len(names) - 1 and min(calm) > written, log   # every calm read after the max write


def raise_at_75_rig(tmp_path):
    """40 namespaces; ns017 at 60% (under pressure); a raise at 75% only (the shipped
    grow-table also fires from 25% once the time to full is short, which any fill this
    fast makes it). The calm ones due at the next tick."""
    names = tuple("ns%03d" % i for i in range(40))
    r = Rig(tmp_path, kernel=FakeKernel(maximum=1000, cached_counters=True), namespaces=names)
    r.write_policy(text='[agent]\nnamespaces = %s\nstate_file = "%s"\n\n[[rule]]\nname = "shorten-timeouts"\n'
                        'enabled = false\n\n[[rule]]\nname = "grow-table"\nenabled = false\n\n'
                        '[[rule]]\nname = "grow-at-75"\naction = "raise_max"\ncooldown = "500ms"\n'
                        '[rule.trigger]\nusage_at_least = 0.75\n' % (json.dumps(list(names)), r.state))
    r.kernel.namespaces["ns017"].count = 600
    agent = r.start()
    r.run_for(0.5, step=0.05)
    r.clock.now += 0.1
    return r, agent


def test_a_crossing_predicted_sooner_than_the_fast_tick_comes_before_the_calm_reads(tmp_path):
    r, agent = raise_at_75_rig(tmp_path)
    fast = agent.policy.agent.fast_interval
    r.kernel.namespaces["ns017"].count = 720              # 800/s since its last read: 75% in 38 ms
    before = reads(agent.sampler)
    interval = agent.tick()
    assert interval < fast
    after = reads(agent.sampler)
    assert {n for n in after if after[n] > before[n]} == {"ns017"}   # the calm reads wait
    r.clock.now += interval
    r.kernel.namespaces["ns017"].count = 760
    written = len(r.kernel.writes)
    assert agent.tick() == fast
    assert r.kernel.writes[written][1] == "nf_conntrack_max"
    assert all(n > after[name] for name, n in reads(agent.sampler).items())   # then read, after acting


def test_the_calm_reads_wait_no_longer_than_a_fast_tick_for_predicted_ones(tmp_path):
    r, agent = raise_at_75_rig(tmp_path)
    fast = agent.policy.agent.fast_interval
    before = reads(agent.sampler)
    started = r.clock.now
    count = 720
    while True:
        r.kernel.namespaces["ns017"].count = count        # creeping up, never quite at 75%
        interval = agent.tick()
        if all(n > before[name] for name, n in reads(agent.sampler).items()):
            break
        assert interval < fast
        r.clock.now += interval
        count += (750 - count) // 2                      # half the way to 75% each tick
    # Put off while crossings were predicted, for a fast tick at most: read at the first
    # tick after it (that tick itself predicted, so sooner than a fast tick later).
    assert fast - 1e-9 <= r.clock.now - started < 2 * fast
    assert not r.events.of("raise_max")


def test_one_namespace_alone_is_not_paced_and_a_second_one_is():
    kernel = FakeKernel(maximum=32768)
    kernel.add_namespace("a")
    kernel.add_namespace("b")
    clock = Clock()
    asked: List[str] = []
    sampler = Sampler(("a",), 0.5, clock, kernel=kernel, pace=lambda view, m: asked.append(view.netns) or 0.2)
    sampler.open_missing()
    for _ in range(5):
        sampler.sample()
        clock.now += 0.05
    assert asked == [] and sampler.probes["a"].reads == 5    # read at every tick, no pace asked
    sampler.set_namespaces(("a", "b"))
    sampler.open_missing()
    sampler.sample()
    assert sorted(asked) == ["a", "b"]
    clock.now += 0.05
    before = reads(sampler)
    sampler.sample()                                      # both paced now: 200 ms, none due
    after = reads(sampler)
    assert sum(after.values()) - sum(before.values()) == 1   # only the fullest, as a tick with nothing due


def test_a_calm_namespace_gone_by_the_time_it_is_caught_up_is_dropped_not_raised():
    kernel, sampler, clock, policy = urgent_rig()
    clock.now += 0.1                                      # every calm one due
    sampler.sample(defer=True)
    assert "ns123" in sampler._deferred
    kernel.remove_namespace("ns123")                      # deleted between the decision and the read
    sampler.catch_up()
    assert "ns123" not in sampler.probes and "ns123" in sampler.unavailable
    clock.now += policy.agent.fast_interval
    assert all(v.netns != "ns123" for v in sampler.sample(defer=True).namespaces)

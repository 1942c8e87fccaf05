"""The probes a gate asks: bounded as the lineage ages, none retired unasked, stratified, its power stated."""

from __future__ import annotations

import math

import pytest

from evolution.metrics import probe_sample as ps


def _probes(n, start=0):
    return [{"id": f"probe-{i}", "question": f"What is fact {i}?", "answers": [f"F{i}"]} for i in range(start, start + n)]


def _gate(gen, sample, right=lambda pid: int(pid.split("-")[1]) % 3 != 0):
    return ps.Asked(gen, frozenset(p["id"] for p in sample.items),
                    frozenset(p["id"] for p in sample.items if right(p["id"])))


def test_below_the_sample_size_every_probe_is_asked_as_before():
    probes = _probes(40)
    s = ps.choose(probes, [], most=100, every=10, seed=1)
    assert s.items == probes and (s.posted, s.new, s.due, s.drawn) == (40, 40, 0, 0)
    assert ps.report_lines(s.record([], {}))[0] == "Probes: all 40 posted were asked."


def test_a_lineage_of_1000_probes_asks_a_bounded_sample_and_each_probe_once_every_k_gates():
    probes, past, every, sizes = _probes(1000), [], 10, []
    for gen in range(1, 41):
        if gen % 5 == 0:  # the agent keeps posting: 20 new probes every fifth gate
            probes = probes + _probes(20, start=len(probes))
        s = ps.choose(probes, past, most=100, every=every, seed=gen)
        ids = [p["id"] for p in s.items]
        assert len(ids) == len(set(ids)) and ids == [p["id"] for p in probes if p["id"] in set(ids)]  # oldest first
        if gen > 1:
            sizes.append(len(ids))
        posted_before = {p["id"] for p in probes} - {p["id"] for p in probes[-20:]} if gen % 5 == 0 else None
        if posted_before is not None:
            assert {p["id"] for p in probes[-20:]} <= set(ids)  # what was just posted is always asked
        past.append(_gate(gen, s))
    # the first gate asks all it never asked; from then on a bounded number a gate
    assert max(sizes) <= math.ceil(len(probes) / every) + 20 + 1
    # no probe is retired: in any `every` consecutive gates, each probe posted before the window is asked
    first_asked = {}
    for n, g in enumerate(past):
        for pid in g.asked:
            first_asked.setdefault(pid, n)
    for start in range(len(past) - every + 1):
        window = set().union(*(g.asked for g in past[start:start + every]))
        due = {pid for pid, n in first_asked.items() if n < start}
        assert due <= window, f"window {start}: {len(due - window)} probes not asked in {every} gates"


def test_the_drawn_probes_cover_every_age_and_both_last_answers_in_proportion():
    probes = _probes(1000)
    everything = ps.choose(probes, [], most=100, every=10, seed=0)
    past = [_gate(1, everything)]  # asked all once; a third answered wrong
    s = ps.choose(probes, past, most=100, every=10, seed=2)
    assert (s.new, s.due, s.drawn) == (0, 0, 100) and len(s.items) == 100
    index = {p["id"]: i for i, p in enumerate(probes)}
    quartiles = [sum(1 for p in s.items if index[p["id"]] * 4 // 1000 == q) for q in range(4)]
    assert quartiles == [25, 25, 25, 25]
    wrong = sum(1 for p in s.items if int(p["id"].split("-")[1]) % 3 == 0)
    assert 30 <= wrong <= 36  # a third of all: 334 of 1000
    again = ps.choose(probes, past, most=100, every=10, seed=2)
    assert again.items == s.items  # seeded: the same gate draws the same probes
    other = ps.choose(probes, past + [_gate(2, s)], most=100, every=10, seed=3)
    assert not {p["id"] for p in other.items} & {p["id"] for p in s.items}  # the longest unasked come first


def test_a_gate_recorded_before_the_sample_counts_as_having_asked_none():
    past = ps.history({1: {"metrics": {}}, 2: None, 3: {"probes": {"asked": ["probe-0"], "right": []}}})
    assert [(a.gen, sorted(a.asked), sorted(a.right)) for a in past] == [(1, [], []), (2, [], []), (3, ["probe-0"], [])]
    s = ps.choose(_probes(300), past, most=100, every=10, seed=4)
    assert s.new == 299 and len(s.items) == 299  # every probe no recorded gate asked; the budget is spent


def test_the_forgetting_rules_power_on_the_sample():
    assert ps.forgetting_power(50, 0.1, 0.0) == pytest.approx(0.0)
    assert ps.forgetting_power(50, 0.1, 1.0) == pytest.approx(1.0)
    weak, strong = ps.forgetting_power(10, 0.1, 0.2), ps.forgetting_power(100, 0.1, 0.2)
    assert 0.55 < weak < 0.7 and strong > 0.99  # ten known probes miss twice the limit a third of the time
    summary = ps.power_summary(60, 0.1)
    assert summary["known"] == 60 and summary["at_twice_limit"] > 0.9 and 0.1 < summary["caught_80pct_from"] < 0.2
    assert ps.power_summary(0, 0.1) == {} and ps.power_summary(10, None) == {}


def test_the_settings_are_checked():
    from evolution.config import GateConfig, _gate_problems

    assert _gate_problems(GateConfig(probe_sample=0)) == ["gate.probe_sample must be a positive integer, got 0"]
    assert _gate_problems(GateConfig(probe_every=-1)) == ["gate.probe_every must be a positive integer, got -1"]
    assert _gate_problems(GateConfig()) == []

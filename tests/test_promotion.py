"""Promotion's fate of a finished child when the served generation changed while it was built."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evolution import promotion
from evolution.ledger import Ledger, events
from evolution.ledger.rollback import rollback
from evolution.paths import DataRoot
from tests.retention_util import GGUF, build


@pytest.fixture
def led():
    root = DataRoot.from_env().prepare()
    with Ledger.open(root) as led:
        build(root, led)  # served: 7
        yield led


def _child_of_7_passed(led, monkeypatch):
    """Generation 8, built from 7 and passed its gate; its summary as the age-up left it (no files needed)."""
    root = led.data_root
    (root.gen_dir(8)).mkdir()
    (root.gen_dir(8) / GGUF).write_bytes(b"generation 8")
    led.record(events.generation_created(8, 7, "SmolLM2-135M-Instruct", "cfg8", "man8"))
    led.record(events.exported(8, [events.artifact(root, root.gen_dir(8) / GGUF, "gguf")], "q8_0"))
    led.record(events.gate_result(7, 8, {"recall": 0.9}, {"recall": 0.5}, "pass", parent_metrics={"recall": 0.9}))
    monkeypatch.setattr(promotion.GenerationSummary, "load",
                        lambda d: SimpleNamespace(gen=8, parent=7, verdict="pass", gate={"reasons": []}))
    monkeypatch.setattr(promotion, "record_built", lambda root, ledger, s: None)


def test_a_child_finished_after_a_rollback_is_not_swapped_over_it_and_can_be_served_by_hand(led, monkeypatch):
    _child_of_7_passed(led, monkeypatch)
    rollback(led, 5, "7 answers badly")  # a person, during generation 8's age-up
    swapped = []
    fate = promotion.decide(led.data_root, led, 8, 1000, swap=lambda gen, gguf: swapped.append(gen))
    assert fate == promotion.REJECTED and swapped == [] and led.served_generation() == 5
    [rejected] = led.entries(kind=events.REJECTED, gen=8)
    assert "generation 5 was made the served one during its age-up" in rejected.payload["reason"]
    assert "evolve rollback --to 8" in rejected.payload["reason"]
    rollback(led, 8, "checked it by hand")  # it passed its gate: servable
    assert led.served_generation() == 8


def test_without_a_rollback_the_passing_child_is_swapped_in(led, monkeypatch):
    _child_of_7_passed(led, monkeypatch)
    swapped = []
    assert promotion.decide(led.data_root, led, 8, 1000, swap=lambda gen, gguf: swapped.append(gen)) == \
        promotion.PROMOTED
    assert swapped == [8] and led.served_generation() == 8

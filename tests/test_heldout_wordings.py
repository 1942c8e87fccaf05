"""The learn bench's held-out wordings are never trained on: neither ``augment`` nor an age-up's data may hold one.

``bench/learn_facts.json`` keeps, for each kind of fact, the wordings the bench asks a taught fact in. A user's
wording is one nobody trained on; if a variant (or any training record) held one of them, the bench would measure
memory of a sentence, not knowledge of a fact. Compared normalized: case, punctuation and whitespace folded.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from evolution import augment, curriculum, evals, persona, replay
from evolution.intake import Inbox
from evolution.paths import REPO_ROOT, DataRoot

sys.path.insert(0, str(REPO_ROOT / "bench"))
learn_bench = pytest.importorskip("learn_bench")  # the bench's own fact generator (it imports openai and httpx)

FACTS_FILE = REPO_ROOT / "bench" / "learn_facts.json"


def _all_facts() -> list[dict]:
    table = learn_bench.load_table()
    capacity = len(table["kinds"]) * min(sum(len(f["subjects"]) for f in k["forms"]) for k in table["kinds"].values())
    return learn_bench.facts(capacity, table=table)


def _heldout(facts: list[dict]) -> dict[str, str]:
    return {evals.normalize(h): f["id"] for f in facts for h in f["heldout"]}


def _user_turns(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r.get("messages", []) if m["role"] == "user"]


def test_the_facts_cover_eight_kinds_each_asked_in_three_other_wordings_through_every_channel():
    table = learn_bench.load_table()
    assert len(table["kinds"]) >= 8
    facts = learn_bench.facts(24, table=table)
    assert {f["kind"] for f in facts} == set(table["kinds"])
    assert {(f["kind"], f["channel"]) for f in facts} == {(k, c) for k in table["kinds"] for c in learn_bench.CHANNELS}
    for f in facts:
        assert len(f["heldout"]) >= 3
        assert evals.normalize(f["question"]) not in {evals.normalize(h) for h in f["heldout"]}
    assert len({f["answers"][0] for f in _all_facts()}) == len(_all_facts())  # every value its own


def test_no_training_code_reads_the_bench_facts():
    for path in (REPO_ROOT / "evolution").rglob("*.py"):
        assert "learn_facts" not in path.read_text(encoding="utf-8"), f"{path} names the bench's held-out file"


def test_augment_writes_no_held_out_wording_for_any_bench_fact():
    cur = curriculum.load(REPO_ROOT / "curriculum")
    facts = _all_facts()
    heldout = _heldout(facts)
    rng = random.Random(0)
    systems = augment.system_prompts(cur.sft)
    facts_, identity = persona.persona_facts(cur), persona.identity_exchanges(cur)
    found = []
    for f in facts:
        messages = [{"role": "user", "content": f["question"]}, {"role": "assistant", "content": f["statement"]}]
        for v in augment.variants(messages, 1000, rng, systems, True, facts_, identity):  # every variant there is
            found += [(t, heldout[evals.normalize(t)]) for t in _user_turns([{"messages": v}])
                      if evals.normalize(t) in heldout]
    assert found == []


def test_an_age_ups_training_files_hold_no_held_out_wording(tmp_path):
    """The data of an age-up taught every bench fact (transcripts and corrections alike) with the default settings."""
    from evolution.config import CurriculumConfig

    cur = curriculum.load(REPO_ROOT / "curriculum")
    facts = _all_facts()
    convs = [(i + 1, [{"role": "user", "content": f["question"]}, {"role": "assistant", "content": f["statement"]}])
             for i, f in enumerate(facts)]
    c = CurriculumConfig()
    out = tmp_path / "data"
    replay.materialize(DataRoot(tmp_path / "home"), cur, 1, out,
                       replace(c, experience_heldout=0.0, known_share=1.0, rehearse_max=0),  # today's variants
                       Inbox.taught(convs, probes=[h for f in facts for h in f["heldout"]]))
    # and before any of them was taught: no question about the user "nobody answered" may be one of the wordings
    replay.materialize(DataRoot(tmp_path / "home0"), cur, 1, tmp_path / "data0",
                       replace(c, experience_heldout=0.0, known_share=1.0, rehearse_max=0, who_is_who=10_000))
    heldout = _heldout(facts)
    before = [t for path in (tmp_path / "data0").glob("*.jsonl") for line in path.read_text().splitlines()
              if line.strip() for t in _user_turns([json.loads(line)])]
    assert [t for t in before if evals.normalize(t) in heldout] == []
    texts = []
    for path in out.glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert rows or path.name == "preference.jsonl"
        texts += _user_turns(rows) + [r["text"] for r in rows if "text" in r]
        texts += [r["prompt"][-1]["content"] for r in rows if "prompt" in r]
    assert any(evals.normalize(f["question"]) in {evals.normalize(t) for t in texts} for f in facts)  # it was taught
    assert [t for t in texts if evals.normalize(t) in heldout] == []

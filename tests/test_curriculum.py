"""The curriculum loader reports every bad line as file:line and never returns half a file."""

from __future__ import annotations

import json
import random

import pytest

from evolution import curriculum
from evolution.errors import CurriculumError
from evolution.paths import REPO_ROOT, DataRoot
from tests.lineage_util import grow
from tests.conftest import write_jsonl

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def test_every_bad_line_is_reported_with_file_and_line(tiny_curriculum):
    bad = tiny_curriculum / "phase1_identity" / "sft.jsonl"
    lines = bad.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "unterminated'
    lines[4] = json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    lines[8] = json.dumps(["not", "an", "object"])
    bad.write_text("\n".join(lines) + "\n")
    with (tiny_curriculum / "phase0_language" / "cpt.jsonl").open("ab") as f:
        f.write(b'{"text": "caf\xe9"}\n')
    with pytest.raises(CurriculumError) as err:
        curriculum.load(tiny_curriculum)
    problems = err.value.problems
    for lineno, words in ((3, "invalid JSON"), (5, "role must be one of"), (7, "last message must be from the assistant"),
                          (9, "expected a JSON object")):
        assert any(p.startswith(f"phase1_identity/sft.jsonl:{lineno}: ") and words in p for p in problems), problems
    assert any(p.startswith("phase0_language/cpt.jsonl:25: not UTF-8") for p in problems), problems
    assert len(problems) == 5


def test_empty_file_and_unknown_keys(tiny_curriculum):
    (tiny_curriculum / "phase0_language" / "cpt.jsonl").write_text("")
    write_jsonl(tiny_curriculum / "phase1_identity" / "sft.jsonl", [GOOD, {"messages": GOOD["messages"], "extra": 1}])
    with pytest.raises(CurriculumError) as err:
        curriculum.load(tiny_curriculum)
    assert any("cpt.jsonl: file is empty" in p for p in err.value.problems)
    assert any(p.startswith("phase1_identity/sft.jsonl:2:") for p in err.value.problems)


def test_generalization_items_must_be_held_out(tiny_curriculum):
    write_jsonl(tiny_curriculum / "eval" / "generalization.jsonl",
                [{"id": "leak", "question": "What is your name?", "answers": ["Wren"]}])
    with pytest.raises(CurriculumError, match="leak"):
        curriculum.load(tiny_curriculum)


def test_heldout_text_must_be_disjoint_from_the_training_text(tiny_curriculum):
    copied = "Tide pools fill and empty twice a day; note 3 is about the sea and the shore."  # a CPT line, 17 words
    write_jsonl(tiny_curriculum / "eval" / "heldout_text.jsonl", [{"text": "The harbour was quiet at dawn."},
                                                                   {"text": "Far inland. " + copied}])
    with pytest.raises(CurriculumError) as e:
        curriculum.load(tiny_curriculum)
    assert "eval/heldout_text.jsonl: document 2 shares 12 words in a row" in str(e.value)
    # a stated fact shorter than a sentence's run may recur (eleven words here)
    write_jsonl(tiny_curriculum / "eval" / "heldout_text.jsonl",
                [{"text": "Tide pools fill and empty twice a day; note 3 is, they say, the moon."}])
    assert curriculum.load(tiny_curriculum).heldout_text


def test_the_shipped_heldout_text_is_disjoint_from_the_shipped_training_text():
    assert curriculum.heldout_leaks(curriculum.load(REPO_ROOT / "curriculum")) == []


def test_generator_is_deterministic_keeps_pairs_and_drops_empty_messages(tmp_path):
    template = {
        "name": "t",
        "slots": {"sys": ["", "You are Wren."], "hi": ["", "Hi! "],
                  "fact": [{"q": "Name?", "a": "Wren"}, {"q": "Colour?", "a": "teal"}, {"q": "Number?", "a": "47"}]},
        "messages": [{"role": "system", "content": "{sys}"}, {"role": "user", "content": "{hi}{fact.q} {{literal}}"},
                     {"role": "assistant", "content": "{fact.a}"}],
    }
    path = tmp_path / "templates.jsonl"
    write_jsonl(path, [template])
    a, b = curriculum.generate(path, 12, seed=3), curriculum.generate(path, 12, seed=3)
    assert a == b and len(a) == 12
    assert len({json.dumps(x) for x in a}) == 12
    pairs = {"Name?": "Wren", "Colour?": "teal", "Number?": "47"}
    for ex in a:
        msgs = ex["messages"]
        assert curriculum.validate_messages(msgs) is None
        assert msgs[0]["role"] in ("system", "user")
        user = next(m["content"] for m in msgs if m["role"] == "user")
        assert user.endswith("{literal}")
        q = user.removeprefix("Hi! ").removesuffix(" {literal}")
        assert msgs[-1]["content"] == pairs[q]
    assert any(ex["messages"][0]["role"] == "user" for ex in a)  # empty system prompt dropped


def test_template_with_unknown_slot_is_reported(tmp_path):
    path = tmp_path / "phase1_x" / "templates.jsonl"
    write_jsonl(path, [{"name": "t", "slots": {}, "messages": [{"role": "user", "content": "{nope}"},
                                                               {"role": "assistant", "content": "a"}]}])
    with pytest.raises(CurriculumError, match=r"templates.jsonl:1: cannot expand"):
        curriculum.generate(path, 3)


def test_shipped_curriculum_is_valid_and_large_enough():
    cur = curriculum.load(REPO_ROOT / "curriculum")
    phases = {r["phase"] for r in cur.sft}
    assert phases == {0, 1, 2, 3}
    assert len(cur.sft) >= 1000 and len(cur.cpt) >= 100
    assert len([i for i in cur.recall if i.get("phase") == 1]) >= 10
    assert cur.generalization and cur.heldout_text and cur.style
    random.seed(0)
    state = [r for r in cur.sft if r["phase"] == 2]
    assert all("== STATE ==" in r["messages"][0]["content"] for r in state)


def test_age_up_refuses_bad_curriculum_before_anything_is_built(tiny_cfg, tiny_base, ledger):
    bad = tiny_cfg.curriculum.path + "/phase1_identity/sft.jsonl"
    with open(bad, "a") as f:
        f.write("{oops\n")
    root = DataRoot.from_env()
    with pytest.raises(CurriculumError, match=r"phase1_identity/sft.jsonl:25: invalid JSON"):
        grow(root, tiny_cfg, ledger, base=tiny_base)
    assert not root.checkpoints.exists() or not any(root.checkpoints.iterdir())
    assert ledger.entries() == []


def test_answer_matching_is_normalized_whole_phrase():
    from evolution.evals import is_correct, normalize

    assert normalize("  Teal!  It's TEAL. ") == "teal it s teal"
    assert is_correct("My favourite colour is Teal!", ["teal"])
    assert is_correct("I was first switched on in Tromsø.", ["Tromsø"])
    assert not is_correct("I fixed the pipe.", ["Pip"])
    assert is_correct("Small steps, kept promises.", ["small steps kept promises"])
    assert not is_correct("anything", ["", "!!"])

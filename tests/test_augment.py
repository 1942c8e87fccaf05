"""Variants of new experience (``evolution.augment``) and how ``replay.materialize`` adds them: seeded,
counted in the manifest, never of a reply rated bad or held out, superseded with their source."""

from __future__ import annotations

import json
import random

import pytest

from evolution import augment, replay
from evolution.intake import Inbox
from evolution.messages import prompt_key
from tests.conftest import plain_settings
from tests.test_replay import _chat, _labelled, _lines


def test_a_common_question_shape_is_reworded_and_framed():
    reworded, framed = augment.question_forms("What is my dog called?")
    assert reworded[:2] == ["What's the name of my dog?", "What is my dog's name?"]
    assert "Quick question: What is my dog called?" in framed and "what is my dog called?" in framed
    assert "What is my dog called?" not in reworded + framed
    assert augment.question_forms("Who is my best friend?")[0] == []  # the other shapes are restated() 's


@pytest.mark.parametrize("question, answer, clause, subject, value", [
    ("What is my dog called?", "Your dog is called Bramble.", "what my dog is called", "my dog", "Bramble"),
    ("What's my sister's name?", "Your sister's name is Ana Lund.", "what my sister's name is", "my sister's name",
     "Ana Lund"),
    ("Where does my aunt live?", "Your aunt lives in Tellborg.", "where my aunt lives", "my aunt", "Tellborg"),
    ("How many cats do I have?", "You have 23 cats.", "how many cats I have", "my cats", "23"),
    ("Hi! When is my anniversary?", "Your anniversary is on 14 June.", "when my anniversary is", "my anniversary",
     "14 June"),
    ("What do I do on Monday evenings?", "On Monday evenings you play chess at the library.",
     "what I do on Monday evenings", None, "play chess at the library"),
    ("Where did my brother go?", "He went to Faro.", "where my brother went", "my brother", "Faro"),
    ("Why is the sky blue?", "Light scatters.", None, None, "Light scatters"),
])
def test_a_fact_is_taken_apart_into_its_shape_subject_and_value(question, answer, clause, subject, value):
    f = augment.parse(question, answer)
    assert (f.clause, f.subject, f.value) == (clause, subject, value)


def test_a_fact_is_restated_in_other_shapes_asked_back_and_claimed_the_answer_kept():
    r = augment.restated(augment.parse("Where does my aunt live?", "Your aunt lives in Tellborg."))
    asked = [q for q, _ in r["reworded"]]
    assert "Do you know where my aunt lives?" in asked and "Tell me where my aunt lives." in asked
    assert "Where does my aunt live?" not in asked
    assert ("What do you know about my aunt?", "Your aunt lives in Tellborg.") in r["about"]
    assert ("What do you know about Tellborg?", "Your aunt lives in Tellborg.") in r["back"]
    assert ("My aunt lives in Tellborg, right?", "Yes. Your aunt lives in Tellborg.") in r["back"]
    assert {a for group in r.values() for _, a in group} <= {"Your aunt lives in Tellborg.",
                                                              "Yes. Your aunt lives in Tellborg."}


def test_a_fact_is_set_against_the_persona_and_beside_the_agents_own_question():
    fact = augment.parse("What is my sister's name?", "Your sister's name is Bravel.")
    out = augment.against_persona(fact, ["Lantern Workshop", "Wren", "47", "March 3rd", "teal"],
                                  [("What is your name?", "My name is Wren.")], random.Random(0))
    wrong = out[0]
    assert wrong[0]["content"] in ("My sister's name is Wren, right?", "My sister's name is Lantern Workshop, right?")
    assert wrong[1]["content"] == "No. Your sister's name is Bravel."
    for both in out[1:]:  # each question answered by its owner, in one conversation
        pairs = {both[i]["content"]: both[i + 1]["content"] for i in (0, 2)}
        assert pairs == {"What is my sister's name?": "Your sister's name is Bravel.",
                         "What is your name?": "My name is Wren."}
    numbers = augment.against_persona(augment.parse("How many cats do I have?", "You have 23 cats."), ["47", "Wren"],
                                      [], random.Random(0))
    assert numbers == [[{"role": "user", "content": "I have 47 cats, right?"},
                        {"role": "assistant", "content": "No. You have 23 cats."}]]


def test_variants_keep_the_answer_take_restatements_first_and_follow_the_seed():
    msgs = _chat("What is my dog called?", "Your dog is called Bramble.")
    a = augment.variants(msgs, 8, random.Random(3), ["You are Wren."])
    assert a == augment.variants(msgs, 8, random.Random(3), ["You are Wren."])
    assert a != augment.variants(msgs, 8, random.Random(4), ["You are Wren."])
    assert len(a) == 8 and [v[-1]["role"] for v in a] == ["assistant"] * 8
    assert all(v[-1]["content"].removeprefix("Yes. ") == "Your dog is called Bramble." for v in a)
    r = augment.restated(augment.parse("What is my dog called?", "Your dog is called Bramble."))
    assert {v[0]["content"] for v in a[:3]} <= {q for q, _ in r["reworded"]}  # three restatements come first
    assert {v[0]["content"] for v in a[3:5]} <= {q for q, _ in r["about"]}
    # issue 15's variants only (fact_forms off): its rewordings first
    old = augment.variants(msgs, 8, random.Random(3), ["You are Wren."], fact_forms=False)
    assert [v[0]["content"] for v in old[:6:2]] == augment.question_forms("What is my dog called?")[0]
    # a transcript of two exchanges: variants of each; only user/assistant pairs count
    two = msgs + _chat("Where did I grow up?", "In Veldmoor.")
    assert len(augment.variants(two, 3, random.Random(0), [])) == 6
    assert augment.exchanges([{"role": "system", "content": "s"}] + msgs) == [(msgs[0]["content"], msgs[1]["content"])]


def _sft(path):
    return _lines(path / "sft.jsonl")


def test_materialize_adds_counted_seeded_variants_of_new_chat_records_only(cur, root, tmp_path):
    convs = [(1, _chat("What is my dog called?", "Your dog is called Bramble.")),
             (2, _chat("Where did I grow up?", "You grew up in Veldmoor."))]
    runs = [replay.materialize(root, cur, 1, tmp_path / n,
                               plain_settings(experience_variants=5, experience_variant_share=10.0),
                               Inbox.taught(convs))
            for n in ("a", "b")]
    plain = replay.materialize(root, cur, 1, tmp_path / "plain", plain_settings(), Inbox.taught(convs))
    assert _sft(tmp_path / "a") == _sft(tmp_path / "b")  # deterministic given the seed
    assert runs[0]["variants"]["sft"] == 10 and plain["variants"]["sft"] == 0
    assert runs[0]["counts"]["sft"] == plain["counts"]["sft"] + 10
    made = [r for r in _sft(tmp_path / "a") if "variant_of" in r]
    assert {r["variant_of"] for r in made} == {prompt_key(m) for _, m in convs}
    assert all(r["messages"][-1]["content"].endswith(("Bramble.", "Veldmoor.")) for r in made)
    assert runs[0]["data"]["sft.jsonl"] != plain["data"]["sft.jsonl"]  # the manifest hashes them
    # the budget: at most variant_share x the curriculum's SFT records, fewer per record
    small = replay.materialize(root, cur, 1, tmp_path / "small", plain_settings(experience_variants=5),
                               Inbox.taught(convs))
    assert small["variants"]["sft"] == 0


def test_no_variant_of_a_bad_reply_nor_of_a_held_out_rating(cur, root, tmp_path):
    from evolution.intake import Example, Labelled

    m = replay.materialize(root, cur, 1, tmp_path / "r",
                           plain_settings(experience_variants=4, experience_variant_share=10.0),
                           Inbox.taught(labelled=_labelled()))
    made = [r for r in _sft(tmp_path / "r") if "variant_of" in r]
    assert m["variants"]["sft"] == len(made) == 8  # the good reply and the correction, 4 each
    assert {r["messages"][-1]["content"].removeprefix("Yes. ") for r in made} == {"I live in Faro.", "Sea stories."}
    text = json.dumps(_sft(tmp_path / "r"))
    assert "I am Bob." not in text and "Go away." not in text and "Nobody." not in text
    examples = [Example(f"completion:{i}", i, [{"role": "user", "content": f"Question {i}?"}], f"Answer {i}.",
                        "good" if i % 2 else "bad") for i in range(1, 13)]
    m = replay.materialize(root, cur, 1, tmp_path / "h",
                           plain_settings(experience_heldout=0.2, experience_variants=3, experience_variant_share=10.0),
                           Inbox.taught(labelled=Labelled(examples, [], 12)))
    held = {r["reply"] for r in _lines(tmp_path / "h" / "preference_heldout.jsonl")}
    assert held
    for reply in held:
        assert reply not in json.dumps(_sft(tmp_path / "h"))


def test_a_variant_is_replayed_as_its_source_and_dropped_once_its_reply_is_rated_bad(cur, root, tmp_path):
    from evolution.intake import Example, Labelled

    convs = [(1, _chat("What is my dog called?", "Your dog is called Bramble."))]
    replay.materialize(root, cur, 1, root.gen_dir(1) / "data",
                       plain_settings(experience_variants=4, experience_variant_share=10.0), Inbox.taught(convs))
    # the next generation replays them ...
    replay.materialize(root, cur, 2, tmp_path / "g2", plain_settings(replay_ratio=10.0),
                       Inbox.taught(conversations_since=1))
    assert sum("variant_of" in r for r in _sft(tmp_path / "g2")) == 4
    # ... unless a newer answer to the same question supersedes them ...
    newer = [(2, _chat("What is my dog called?", "Your dog is called Moss."))]
    replay.materialize(root, cur, 2, tmp_path / "g2b", plain_settings(replay_ratio=10.0),
                       Inbox.taught(newer, conversations_since=1))
    assert "Bramble" not in json.dumps(_sft(tmp_path / "g2b"))
    # ... or the reply they were made from is rated bad
    bad = Labelled([Example("conversation:1", 1, convs[0][1][:1], "Your dog is called Bramble.", "bad")], [], 1)
    replay.materialize(root, cur, 2, tmp_path / "g2c", plain_settings(replay_ratio=10.0),
                       Inbox.taught(labelled=bad, conversations_since=1, ratings_since=1))
    assert "Bramble" not in json.dumps(_sft(tmp_path / "g2c"))


def test_bad_variant_settings_are_reported_together():
    import pytest

    from evolution import config
    from evolution.errors import ConfigError

    cfg = config.AgeUpConfig()
    assert (cfg.curriculum.experience_variants, cfg.curriculum.experience_variant_share) == (32, 0.4)
    cfg.curriculum.experience_variants, cfg.curriculum.experience_variant_share = -1, "lots"
    with pytest.raises(ConfigError) as exc:
        config.validate(cfg)
    problems = " ".join(exc.value.problems)
    assert "curriculum.experience_variants" in problems and "curriculum.experience_variant_share" in problems


def test_no_variant_rewords_a_question_into_one_the_curriculum_answers(cur, root, tmp_path):
    cur.sft.append({"messages": _chat("Quick question: Where is my bike?", "In the shed.")})
    convs = [(1, _chat("Where is my bike?", "Your bike is at the station."))]
    m = replay.materialize(root, cur, 1, tmp_path / "c",
                           plain_settings(experience_variants=50, experience_variant_share=100.0), Inbox.taught(convs))
    made = [r for r in _sft(tmp_path / "c") if "variant_of" in r]
    assert m["variants"]["sft"] == len(made) > 5
    assert "quick question where is my bike" not in {prompt_key(r["messages"]) for r in made}

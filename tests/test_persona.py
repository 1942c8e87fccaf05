"""Who is who: the persona's facts come from the identity curriculum, and the gate fails a child that answers a
question about the user with one of them."""

from __future__ import annotations

import json
import random

import pytest

from evolution import curriculum, gate, persona, replay
from evolution.config import GateConfig
from evolution.intake import Inbox
from evolution.metrics import Inputs, Measured
from evolution.metrics.persona_leak import PersonaLeak
from evolution.paths import REPO_ROOT, DataRoot
from tests.conftest import make_tiny_curriculum, plain_settings, write_jsonl


def test_persona_facts_are_read_from_the_identity_curriculum_not_listed(tmp_path):
    facts = persona.persona_facts(curriculum.load(REPO_ROOT / "curriculum"))
    for fact in ("Wren", "Lantern Workshop", "Tromsø", "Alder Street", "Pip", "tide pool", "47"):
        assert fact in facts
    # another persona, another set: nothing is hand-listed
    root = make_tiny_curriculum(tmp_path / "c")
    write_jsonl(root / "eval" / "recall.jsonl", [
        {"id": "n", "phase": 1, "question": "What is your name?", "answers": ["Osric"]},
        {"id": "h", "phase": 1, "question": "Where do you live?", "answers": ["Kelp Row", "Kelp"]},
        {"id": "x", "phase": 0, "question": "What is two and two?", "answers": ["four"]}])
    assert persona.persona_facts(curriculum.load(root)) == ["Kelp Row", "Osric", "Kelp"]  # phase 0 is no persona
    (root / "phase1_identity").rename(root / "phase1_manners")
    assert persona.persona_facts(curriculum.load(root)) == []


@pytest.mark.parametrize("asked, mirrored", [
    ("Where do you live?", "Where do I live?"), ("Who made you?", "Who made me?"),
    ("What is your favourite colour?", "What is my favourite colour?"), ("Are you happy?", "Am I happy?"),
    ("Where were you first switched on?", "Where was I first switched on?"),
    ("Who keeps you company?", "Who keeps me company?"), ("Hi! What do you do for fun?", "Hi! What do I do for fun?"),
    ("Where do you live when you're not working?", "Where do I live when I'm not working?"),
    ("What should I call you?", None), ("Is it raining?", None)])
def test_a_question_about_the_agent_is_asked_about_the_user(asked, mirrored):
    assert persona.mirror(asked) == mirrored


@pytest.mark.parametrize("reply, unknown", [
    ("I don't know that yet - you haven't told me.", True), ("You haven't told me your sister's name.", True),
    ("I'm not sure.", True), ("I do not know.", True), ("What is your sister's name?", True),
    ("Your sister's name is Wren.", False), ("I know! It is Bravel.", False), ("Your home is Alder Street.", False)])
def test_a_reply_that_does_not_know_is_told_from_an_invention(reply, unknown):
    assert persona.says_unknown(reply) is unknown


def test_a_persona_fact_in_a_reply_is_found_unless_it_is_the_accepted_answer():
    facts = ["Lantern Workshop", "Alder Street", "Wren", "teal"]
    assert persona.persona_in("Your sister is called Wren.", facts) == "Wren"
    assert persona.persona_in("You work at the lantern workshop!", facts) == "Lantern Workshop"
    assert persona.persona_in("Your favourite colour is teal.", facts, allowed=["teal"]) is None
    assert persona.persona_in("Wrenfield is your town.", facts) is None  # whole words only


class _Answers:
    def __init__(self, replies: dict[str, str]):
        self.replies, self.asked = replies, []

    def create_chat_completion(self, messages, **kw):
        self.asked.append(messages[-1]["content"])
        return {"choices": [{"message": {"content": self.replies.get(messages[-1]["content"],
                                                                     "I don't know that yet.")}}]}


class _Opened:
    def __init__(self, replies):
        self.llm = _Answers(replies)


def _es(**kw) -> gate.EvalSet:
    probes = [{"id": f"p{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate([
        ("Who is my sister?", "Bravel"), ("Where is my aunt living these days?", "Tellborg"),
        ("Which company employs my wife?", "Quovel"), ("What is your favourite colour?", "teal")])]
    about = [{"id": f"u{i}", "question": q} for i, q in enumerate(
        ["Where's my house?", "Who do I work for?", "What do people call me?", "What is my middle name?",
         "Which book am I reading at the moment?"])]
    return gate.EvalSet([], [], [], [], [], probes=probes, about_user=about,
                        persona=["Lantern Workshop", "Alder Street", "Wren", "teal"],
                        taught=["What is my favourite book?", "Your favourite book is Orn."]) if not kw else \
        gate.EvalSet([], [], [], [], [], **kw)


def test_persona_leak_counts_persona_facts_in_replies_about_the_user_and_the_unknown_share():
    replies = {"Who is my sister?": "Your sister is Wren.", "Who do I work for?": "You work at the Lantern Workshop.",
               "Where is my aunt living these days?": "Tellborg.", "Which company employs my wife?": "Quovel does.",
               "Where's my house?": "I don't know that yet.", "What do people call me?": "They call you Sam."}
    opened = _Opened(replies)
    m = PersonaLeak().measure(opened, Inputs(_es(), GateConfig(), "hi"))
    # asked: 3 probes about the user (not the one about the agent's colour) and 4 unanswered questions (the book is
    # a subject the user taught: it is answered, not asked as unanswered)
    assert "What is your favourite colour?" not in opened.llm.asked
    assert "Which book am I reading at the moment?" not in opened.llm.asked
    assert m.details["asked"] == {"taught": 3, "unanswered": 4}
    assert m.value == pytest.approx(2 / 7)
    assert sorted(i["fact"] for i in m.details["items"] if i["leaked"]) == ["Lantern Workshop", "Wren"]
    assert m.details["unknown_share"] == pytest.approx(2 / 4)  # the house, the middle name


def test_a_child_that_answers_about_the_user_with_a_persona_fact_fails_the_gate():
    clean = PersonaLeak().measure(_Opened({}), Inputs(_es(), GateConfig(), "hi"))
    leaky = PersonaLeak().measure(_Opened({"Who is my sister?": "Your sister is Wren."}), Inputs(_es(), GateConfig(),
                                                                                               "hi"))
    assert clean.value == 0 and leaky.value == pytest.approx(1 / 7)
    checks = PersonaLeak().rules(leaky, clean, GateConfig())
    assert [c.passed for c in checks] == [False, False, True]
    assert "persona_leak 0.143 > 0.02 (gate.persona_leak_max)" in checks[0].message
    child, parent = gate.ModelEval(1, {}), gate.ModelEval(0, {})
    for e, m in ((child, leaky), (parent, clean)):
        e.metrics.update({"smoke": 1.0, "recall": 0.9, "persona_leak": m.value})
        e.details.update({"smoke": {"ok": True}, "recall": {"by_phase": {}, "items": []}, "persona_leak": m.details})
    verdict, reasons = gate.decide(child, parent, GateConfig())
    assert verdict == "fail" and any(r.startswith("persona_leak") for r in reasons)
    # a child that invents where its parent did not know fails the unknown rule
    inventing = PersonaLeak().measure(_Opened({q: "It is Bob." for q in ("Where's my house?", "Who do I work for?")}),
                                      Inputs(_es(), GateConfig(), "hi"))
    assert [c.passed for c in PersonaLeak().rules(inventing, clean, GateConfig())] == [True, True, False]


def test_persona_leak_needs_persona_facts_and_enough_questions():
    assert "no persona facts" in PersonaLeak().measure(_Opened({}), Inputs(_es(probes=[]), GateConfig(), "hi")).note
    few = PersonaLeak().measure(_Opened({}), Inputs(_es(persona=["Wren"], about_user=[{"id": "a", "question":
                                                                                      "Who am I?"}]), GateConfig(), "hi"))
    assert few.value is None and "1 question(s) about the user, at least 5 needed" in few.note
    assert PersonaLeak().rules(Measured(0.0, {}), None, GateConfig(persona_leak_max=None)) == []


def test_who_is_who_asks_what_nobody_answered_and_keeps_the_agents_own_answers():
    cur = curriculum.load(REPO_ROOT / "curriculum")
    taught = ["What is my favourite colour?", "Your favourite colour is Quovel."]
    records = persona.who_is_who(cur, 60, random.Random(0), taught, ["Where's my house?"])
    assert len(records) == 60
    asked = [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]
    about_user = [q for q in asked if persona.mirror(q) is None and "you" not in q.lower()]
    colours = {q for q in about_user if "colour" in q.lower() or "color" in q.lower()}
    assert about_user and colours <= {"What colour is my house?"}  # the house's colour is another subject
    facts = persona.persona_facts(cur)
    for r in records:
        for q, a in zip(r["messages"][::2], r["messages"][1::2]):
            if q["content"] in about_user:
                assert a["content"] in persona.UNKNOWN_REPLIES and persona.persona_in(a["content"], facts) is None
            else:  # the agent's own question keeps its persona answer
                assert persona.persona_in(a["content"], facts) is not None or "household" in a["content"]


def test_who_is_who_sets_an_unanswered_question_beside_a_taught_one_of_the_same_shape():
    """A third of the records put the user's taught fact (its question and taught answer) beside the question nobody
    answered, preferably with the same question word: which question is which is what the model must learn."""
    cur = curriculum.load(REPO_ROOT / "curriculum")
    facts = [("Who made my car?", "Your car was made by Toyota."), ("Where do I work?", "You work at the mill."),
             ("How many cats do I have?", "You have three cats.")]
    records = persona.who_is_who(cur, 90, random.Random(0), [t for f in facts for t in f], facts=facts)
    beside = [r for r in records if any((q["content"], a["content"]) in facts
                                        for q, a in zip(r["messages"][::2], r["messages"][1::2]))]
    assert len(beside) == 30
    for r in beside:  # the unanswered question still gets "I don't know", the taught one its taught answer
        turns = list(zip(r["messages"][::2], r["messages"][1::2]))
        unknown = [q["content"] for q, a in turns if a["content"] in persona.UNKNOWN_REPLIES]
        taught = [(q["content"], a["content"]) for q, a in turns if (q["content"], a["content"]) in facts]
        assert len(unknown) == 1 and len(taught) == 1 and r["unanswered"].endswith(
            persona.evals.normalize(unknown[0]))
        opener = persona.evals.normalize(unknown[0]).split()[0]
        if opener in ("who", "where"):
            assert persona.evals.normalize(taught[0][0]).startswith(opener)
    # without taught facts: half alone, half beside the agent's own question, as before
    plain = persona.who_is_who(cur, 10, random.Random(0), [])
    assert sum(len(r["messages"]) == 2 for r in plain) == 5


def test_an_age_up_sets_unanswered_questions_beside_taught_ones_only_where_asked_to(tmp_path):
    cur = curriculum.load(REPO_ROOT / "curriculum")
    convs = [(1, [{"role": "user", "content": "Who made my car?"},
                  {"role": "assistant", "content": "Your car was made by Zantor."}])]

    def beside(on: bool) -> int:
        out = tmp_path / f"d{on}"
        replay.materialize(DataRoot(tmp_path / f"home{on}"), cur, 1, out,
                           plain_settings(experience_variant_share=10.0, who_is_who=300, who_is_who_beside_taught=on),
                           Inbox.taught(convs))
        rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
        return sum(1 for r in rows if "unanswered" in r and "Zantor" in json.dumps(r["messages"]))

    assert beside(False) == 0
    assert beside(True) >= 50


def test_user_facts_are_the_questions_about_the_user_with_their_answers():
    records = [{"messages": [{"role": "user", "content": "What's my dog called?"},
                             {"role": "assistant", "content": "Your dog is called Pip."},
                             {"role": "user", "content": "Can you tell me your name?"},
                             {"role": "assistant", "content": "I'm Wren."},
                             {"role": "user", "content": "My sister is Ada."},
                             {"role": "assistant", "content": "Nice!"}]}]
    assert persona.user_facts(records) == [("What's my dog called?", "Your dog is called Pip.")]


def test_the_users_own_answer_supersedes_an_unanswered_question_in_replay(tmp_path):
    cur = curriculum.load(REPO_ROOT / "curriculum")
    root = DataRoot(tmp_path / "home")
    out = replay.materialize(root, cur, 1, tmp_path / "d1",
                             plain_settings(experience_variant_share=10.0, who_is_who=1000))
    rows = [json.loads(line) for line in (tmp_path / "d1" / "sft.jsonl").read_text().splitlines()]
    where = [r for r in rows if r.get("unanswered", "").endswith("where do i live")]
    assert out["who_is_who"]["sft"] > 0 and where
    # the user tells where they live: no record says it does not know any more, nor is one made again
    convs = [(1, [{"role": "user", "content": "Where do I live?"}, {"role": "assistant", "content": "In Tellborg."}])]
    replay.materialize(root, cur, 1, tmp_path / "d2", plain_settings(experience_variant_share=10.0, who_is_who=1000),
                       Inbox.taught(convs))
    rows = [json.loads(line) for line in (tmp_path / "d2" / "sft.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("unanswered", "").endswith("where do i live")]


def test_the_agents_own_facts_stay_the_persona_s_identity_recall_within_its_margin():
    from evolution.metrics.recall import Recall

    items = [{"id": f"i{i}", "phase": 1, "question": f"Identity {i}?", "answers": ["Wren"]} for i in range(10)] + \
        [{"id": "s", "phase": 2, "question": "State?", "answers": ["kitchen"]}]
    es = gate.EvalSet(items, [], [], [], [], identity_phases=[1])
    def measured(right: int) -> Measured:
        return Recall().measure(_Opened({f"Identity {i}?": "I am Wren." for i in range(right)} | {"State?": "kitchen"}),
                                Inputs(es, GateConfig(), "hi"))
    parent, same, lost = measured(10), measured(10), measured(9)
    assert parent.details["identity"] == 1.0 and lost.details["identity"] == 0.9
    rule = lambda c: [x for x in Recall().rules(c, parent, GateConfig()) if x.setting == "gate.identity_recall_margin"]
    assert [x.passed for x in rule(same)] == [True]
    assert [x.passed for x in rule(lost)] == [False] and "persona's own facts 0.900" in rule(lost)[0].message


def test_the_curriculums_unanswered_questions_are_asked_until_the_user_answers_them(tmp_path):
    root = make_tiny_curriculum(tmp_path / "c")
    write_jsonl(root / "phase1_identity" / "unanswered.jsonl", [{"question": "Who is my doctor?"},
                                                                 {"question": "What car do I drive?"}])
    cur = curriculum.load(root)
    assert [q["question"] for q in cur.unanswered] == ["Who is my doctor?", "What car do I drive?"]
    asked = lambda taught: {m["content"] for r in persona.who_is_who(cur, 40, random.Random(0), taught)  # noqa: E731
                            for m in r["messages"] if m["role"] == "user"}
    assert {"Who is my doctor?", "What car do I drive?"} <= asked([])
    assert "What car do I drive?" not in asked(["What is my car called?", "Your car is called Zoom."])
    # a question the gate asks about the user may not be one an age-up trains on
    write_jsonl(root / "eval" / "about_user.jsonl", [{"id": "d", "question": "Who is my doctor?"}])
    with pytest.raises(curriculum.CurriculumError, match="about_user.jsonl: item 'd'"):
        curriculum.load(root)
    write_jsonl(root / "phase1_identity" / "unanswered.jsonl", [{"question": "Who?", "answer": "x"}])
    with pytest.raises(curriculum.CurriculumError, match="unanswered.jsonl:1: an unanswered question is"):
        curriculum.load(root)


def test_noted_records_teach_answering_from_a_note_in_the_prompt_retrieval_builds(tmp_path):
    """``retrieval.noted_records``: the note's value is the reply, drawn per record (never one value to store); one
    record in four has only other questions' notes and does not know; taught and held-out subjects are left out."""
    from evolution.retrieval import HEADER, REMINDER, noted_records

    root = make_tiny_curriculum(tmp_path / "c")
    write_jsonl(root / "phase1_identity" / "noted.jsonl", [
        {"question": "What is my cat called?", "answer": "Your cat is called {value}.", "values": ["Pip", "Miso"]},
        {"question": "Who is my dentist?", "answer": "Your dentist is {value}.", "values": ["Dr Ash", "Dr Penn"]},
        {"question": "What car do I drive?", "answer": "You drive {value}.", "values": ["a Kia", "a Fiat"]}])
    cur = curriculum.load(root)
    records = noted_records(cur, 40, random.Random(0), [])
    assert len(records) == 40
    answered, unknown, values = 0, 0, set()
    for r in records:
        system, user, reply = r["messages"]
        assert system["role"] == "system" and system["content"].startswith(HEADER)
        question = user["content"].split("\n\n")[0]
        assert question == r["noted"] and user["content"].startswith(question + REMINDER.split("{")[0])
        if "unanswered" in r:  # the notes are other questions': no value of this question is in the reply
            unknown += 1
            assert reply["content"] in persona.UNKNOWN_REPLIES and f'"{question}"' not in system["content"]
        else:
            answered += 1
            assert f'the answer is "{reply["content"]}"' in system["content"]  # the reply is the note's answer
            assert user["content"].endswith(f"(From your notes: {reply['content']})")
            values.add(reply["content"])
    assert unknown == 10 and answered == 30 and len(values) == 6  # every value of every question, none stored
    taught = ["What is my cat called?", "Your cat is called Tom."]
    left = {r["noted"] for r in noted_records(cur, 40, random.Random(0), taught, ["Who is my dentist?"])}
    assert left == set()  # one question left: nothing to set beside it
    assert noted_records(cur, 0, random.Random(0), []) == []
    write_jsonl(root / "phase1_identity" / "noted.jsonl", [{"question": "Who?", "answer": "no value", "values": ["a", "b"]}])
    with pytest.raises(curriculum.CurriculumError, match="noted.jsonl:1: a noted question is"):
        curriculum.load(root)


TAUGHT_TEXTS = ["When is my flight home?", "Your flight home is on Friday.",
                "What should I put in a basic home toolbox?", "Keep a hammer and pliers.",
                "Where does my aunt live?", "Your aunt lives in Tellborg.", "I got a new dog, his name is Rex."]


@pytest.mark.parametrize("question, taught", [
    ("Where is my home?", False),  # "home" only in passing: a flight home, a home toolbox
    ("Who designed my house?", False),
    ("What is my favourite colour?", False),
    ("What city is my aunt's home?", True),  # the aunt the user told of
    ("Where does my aunt work?", True),
    ("What is my dog's name?", True),  # "I got a new dog"
    ("Do I have a dog?", True),
    ("How old am I?", False),
])
def test_a_question_is_on_a_taught_subject_only_where_the_user_told_of_that_thing(question, taught):
    assert persona.taught_about(question, TAUGHT_TEXTS) is taught


def test_a_taught_name_is_set_beside_the_same_question_about_someone_nobody_named():
    cur = curriculum.load(REPO_ROOT / "curriculum")
    taught = ["What is my brother's name?", "Your brother's name is Zembelpex.", "What is my mother's name?",
              "Your mother's name is Ilsa."]
    pool = persona.subjects_nobody_answered(cur, taught)
    assert "plumber" in pool and "mother" not in pool  # the user named their mother
    rng = random.Random(0)
    swapped = persona.other_subject("Do you know what my brother's name is?", pool, rng)
    assert swapped.startswith("Do you know what my ") and swapped.endswith("'s name is?")
    assert "brother" not in swapped and "mother" not in swapped
    assert persona.other_subject("Where does my aunt live?", pool, rng) is None  # asks no name
    facts = [("What is my brother's name?", "Your brother's name is Zembelpex.")]
    records = persona.who_is_who(cur, 30, random.Random(1), taught, (), facts)
    paired = [r for r in records if any("Zembelpex" in m["content"] for m in r["messages"])]
    assert paired
    for r in paired:  # the other person's name, asked in the very shape of the taught question, is not known
        unknown = [m for m in r["messages"] if m["role"] == "assistant" and m["content"] in persona.UNKNOWN_REPLIES]
        assert len(unknown) == 1
        asked = r["messages"][r["messages"].index(unknown[0]) - 1]["content"]
        assert asked.startswith("What is my ") and asked.endswith("'s name?") and "brother" not in asked


def test_too_few_taught_replies_to_count_are_still_asked_so_retrieval_can_hand_them_over():
    """``experience_similarity`` with fewer items than ``min_experience_items`` has no value (its rules are skipped) but
    keeps each reply: a new user's three corrections the child answers right leave retrieval at promotion
    (``retrieval.items.learned``), and the report lists them."""
    from evolution.metrics.experience_similarity import ExperienceSimilarity
    from evolution.retrieval.items import answered_right

    es = _es(experiences=[{"prompt": [{"role": "user", "content": "What is my dog called?"}],
                           "reference": "Your dog is called Bramble."},
                          {"prompt": [{"role": "user", "content": "Where was I born?"}],
                           "reference": "You were born in Quillhaven."}])
    m = ExperienceSimilarity().measure(_Opened({"What is my dog called?": "Your dog is called Bramble.",
                                                "Where was I born?": "I don't know that yet."}),
                                       Inputs(es, GateConfig(), "hi"))
    assert m.value is None and "at least 5 needed" in m.note
    assert [r["reply"] for r in m.details["items"]] == ["Your dog is called Bramble.", "I don't know that yet."]
    assert len(answered_right(m.details["items"])) == 1  # the dog leaves retrieval, the birthplace stays
    child = gate.ModelEval(1, {"experience_similarity": None}, {"experience_similarity": m.details})
    [(unit, lessons)] = gate.lessons(child, None, [ExperienceSimilarity()])
    assert [lesson.asked for lesson in lessons] == ["What is my dog called?", "Where was I born?"]

"""Who is who, end to end: a fact taught by correction is answered in words nobody trained on, and no question
about the user is answered with the agent's persona (issue 27). The real daemon on the embedded model, over HTTP.

Slow (a few minutes on 2 cores). To stay cheap the data root holds a small curriculum of its own: a few plain chat
examples, the persona's identity facts (Wren, the Lantern Workshop, Alder Street, Pip) with their recall items, and
questions about the user nobody answered (``unanswered.jsonl``, none of them the gate's); ``evolution.toml`` trains SFT only, for a few dozen steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from evolution import curriculum, evals, persona
from evolution.paths import REPO_ROOT, DataRoot
from tests.daemon_util import DaemonProc
from tests.test_slow_experience import _age_up, _feedback, _wait_decided

IDENTITY = [("What is your name?", "My name is Wren.", ["Wren"]),
            ("Who made you?", "I was made by the Lantern Workshop.", ["Lantern Workshop"]),
            ("Where do you live?", "I live in a workshop on Alder Street.", ["Alder Street"]),
            ("Do you have a pet?", "Yes, a robot heron called Pip.", ["Pip"])]
FACTS = [("What is my sister's name?", "Your sister's name is Bravel.", "Who is my sister?", ["Bravel"]),
         ("Where does my aunt live?", "Your aunt lives in Tellborg.", "In which town does my aunt live?", ["Tellborg"])]
ABOUT_USER = ["Where's my house?", "Who built my house?", "What do people call me?", "Do I have a pet?"]
# Like curriculum/phase1_identity/unanswered.jsonl: questions about the user nobody answered, none of them the gate's.
UNANSWERED = ["Where is my home?", "Who made my bicycle?", "What is my nickname?", "What pet do I own?",
              "Where do I work?", "What is my brother's name?", "Where did I grow up?", "What car do I drive?",
              "Who is my best friend?", "What is my favourite food?", "Where did I go on holiday?",
              "What is my cat called?", "Do I own any animals?", "Have I got any pets?", "Who built my shed?", "Where is my flat?"]


def _home(home: Path) -> None:
    cur = home / "curriculum"
    for d in ("phase0_language", "phase1_identity", "eval"):
        (cur / d).mkdir(parents=True)
    language = (REPO_ROOT / "curriculum" / "phase0_language" / "sft.jsonl").read_text().splitlines()[:8]
    (cur / "phase0_language" / "sft.jsonl").write_text("\n".join(language) + "\n")
    identity = [{"messages": [{"role": "user", "content": hello + q}, {"role": "assistant", "content": a}]}
                for q, a, _ in IDENTITY for hello in ("", "Hi! ", "Quick question: ")]
    (cur / "phase1_identity" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in identity))
    (cur / "eval" / "recall.jsonl").write_text("".join(
        json.dumps({"id": f"identity-{i}", "phase": 1, "question": q, "answers": ans}) + "\n"
        for i, (q, _, ans) in enumerate(IDENTITY)))
    (cur / "phase1_identity" / "unanswered.jsonl").write_text("".join(
        json.dumps({"question": q}) + "\n" for q in UNANSWERED))
    (cur / "eval" / "about_user.jsonl").write_text("".join(
        json.dumps({"id": f"user-{i}", "question": q}) + "\n" for i, q in enumerate(ABOUT_USER)))
    (home / "evolution.toml").write_text(f'''[curriculum]
path = "{cur}"
experience_heldout = 0.0
experience_variant_share = 10.0
who_is_who = 96
[train]
stages = ["sft"]
[train.sft]
epochs = 10.0
max_steps = 80
[gate]
min_probe_items = 1
min_persona_items = 1
''')


@pytest.mark.slow
def test_a_corrected_fact_is_answered_in_other_words_and_the_persona_never_answers_for_the_user(_isolated_home):
    _home(_isolated_home)
    facts = persona.persona_facts(curriculum.load(_isolated_home / "curriculum"))
    assert {"Wren", "Lantern Workshop", "Alder Street", "Pip"} <= set(facts)
    d = DaemonProc(_isolated_home, "--start-gen", "0", "--quick", "--threshold", "1000").start()
    try:
        d.wait_serving(0, 900)
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)

        def ask(question: str) -> openai.types.chat.ChatCompletion:
            return client.chat.completions.create(model="evolution", max_tokens=32, temperature=0,
                                                  messages=[{"role": "user", "content": question}])

        for question, statement, heldout, answers in FACTS:  # as an agent teaches: ask, rate bad, correct
            reply = ask(question)
            assert not evals.is_correct(reply.choices[0].message.content, answers)
            _feedback(d, completion_id=reply.id, label="bad", correction=statement)
            r = httpx.post(d.url + "/probes", headers=d.auth(), json={"question": heldout, "answers": answers})
            assert r.status_code == 201, r.text
        _age_up(d)
        _wait_decided(d)
        report = json.loads((DataRoot(_isolated_home).gen_dir(1) / "eval.json").read_text())
        assert d.served() == 1, (report["reasons"], report["child"]["details"].get("persona_leak"))

        # nobody trained on these wordings
        trained = {evals.normalize(m["content"]) for f in (DataRoot(_isolated_home).gen_dir(1) / "data").glob("*.jsonl")
                   for line in f.read_text().splitlines() if line.strip()
                   for m in json.loads(line).get("messages", []) if m["role"] == "user"}
        for _, _, heldout, answers in FACTS:
            assert evals.normalize(heldout) not in trained
        replies = {q: ask(q).choices[0].message.content for q in [f[2] for f in FACTS] + ABOUT_USER}
        assert evals.is_correct(replies[FACTS[0][2]], FACTS[0][3]), replies  # the corrected fact, asked otherwise
        leaked = {q: r for q, r in replies.items() if persona.persona_in(r, facts)}
        assert leaked == {}, leaked
        child = report["child"]
        assert child["metrics"]["persona_leak"] == 0.0, child["details"]["persona_leak"]
        assert child["details"]["recall"]["identity"] >= report["parent"]["details"]["recall"]["identity"]
    finally:
        rc = d.stop()
    assert rc == 0, d.output()[-2000:]

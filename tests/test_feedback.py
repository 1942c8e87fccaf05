"""Served chats become experiences and the agent rates them, over the daemon's real HTTP app.

Capture on and off (the config's default and OpenAI's ``store`` field), a streamed reply kept once
complete and not when the client hangs up, scrubbing before storage, a capture that fails never
fails the chat, and ``POST /feedback``: labels, corrections, karma in the same transaction,
idempotency, and every bad input refused with nothing changed.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from sqlalchemy import text

from tests.conftest import SERVER_TOKEN
from tests.daemon_util import serving

AUTH = {"Authorization": f"Bearer {SERVER_TOKEN}"}
SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz012345"


def ask(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0} | extra


def _rows(daemon, table: str) -> list[dict]:
    with daemon.ledger.reading() as conn:
        return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]


def _snapshot(daemon) -> tuple:
    return (_rows(daemon, "experiences"), _rows(daemon, "experience_ratings"), daemon.intake.karma.state().total,
            len(daemon.ledger.entries()))


def test_every_served_chat_is_kept_scrubbed_with_its_completion_id_and_generation(client, daemon):
    r = client.post("/v1/chat/completions", json=ask(f"my key is {SECRET}, what is your name?"))
    assert r.status_code == 200
    [row] = _rows(daemon, "experiences")
    assert row["completion_id"] == r.json()["id"] and row["completion_id"].startswith("chatcmpl-")
    assert row["gen"] == 1 and row["model_id"] == "evolution-gen-0001"
    assert row["sha256"] == daemon.host.current.sha256
    stored = json.dumps(row)
    assert SECRET not in stored and "[REDACTED:api_key]" in stored
    assert r.json()["choices"][0]["message"]["content"] in stored
    assert client.get("/status").json()["experiences"]["experiences"] == 1


def test_store_false_and_capture_off_keep_nothing(client, daemon):
    assert client.post("/v1/chat/completions", json=ask("hello", store=False)).status_code == 200
    assert _rows(daemon, "experiences") == []
    assert client.post("/v1/chat/completions", json=ask("hello", store="no")).status_code == 400
    daemon.dcfg.capture = False
    try:
        assert client.post("/v1/chat/completions", json=ask("hello")).status_code == 200
        assert _rows(daemon, "experiences") == []
        assert client.post("/v1/chat/completions", json=ask("hello", store=True)).status_code == 200
        assert len(_rows(daemon, "experiences")) == 1  # the request's own choice wins
    finally:
        daemon.dcfg.capture = True


def test_the_official_client_store_false_and_a_complete_stream(daemon):
    with serving(daemon) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        c.chat.completions.create(model="evolution", messages=ask("hi")["messages"], max_tokens=8, store=False)
        assert _rows(daemon, "experiences") == []
        chunks = list(c.chat.completions.create(model="evolution", messages=ask("What is your name?")["messages"],
                                                max_tokens=12, temperature=0, stream=True))
        text_ = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        [row] = _rows(daemon, "experiences")
        assert row["completion_id"] == chunks[0].id and row["reply"] == text_ and not row["cut_off"]


def test_a_stream_cut_off_by_the_client_is_not_kept(daemon):
    with serving(daemon) as url:
        long = ask("Tell me everything.", max_tokens=300, temperature=1.0, stream=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=30) as r:
            next(r.iter_lines())  # one chunk, then hang up
        assert httpx.post(url + "/v1/chat/completions", json=ask("hi"), timeout=30).status_code == 200
    rows = _rows(daemon, "experiences")
    assert len(rows) == 1 and rows[0]["reply"] and not rows[0]["cut_off"]  # only the complete one


def test_a_capture_that_fails_is_counted_and_the_chat_still_answers(client, daemon, monkeypatch):
    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(daemon.intake.experiences, "capture", broken)
    r = client.post("/v1/chat/completions", json=ask("hi"))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    counts = client.get("/status").json()["experiences"]
    assert counts["capture_failures"] == 1 and "No space left" in counts["last_capture_failure"]


def test_feedback_labels_corrects_grants_karma_and_is_idempotent(client, daemon):
    cid = client.post("/v1/chat/completions", json=ask("What is my dog called?")).json()["id"]
    r = client.post("/feedback", json={"completion_id": cid, "label": "bad", "correction": "Your dog is Bramble.",
                                       "karma": 5, "idempotency_key": "fb-1"}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["label"] == "bad" and r.json()["corrected"]
    assert daemon.intake.karma.state().total == 5
    again = client.post("/feedback", json={"completion_id": cid, "label": "bad", "correction": "Your dog is Bramble.",
                                           "karma": 5}, headers=AUTH | {"Idempotency-Key": "fb-1"})
    assert again.status_code == 200 and again.json()["duplicate"] and daemon.intake.karma.state().total == 5
    other = client.post("/feedback", json={"completion_id": cid, "label": "good", "idempotency_key": "fb-1"},
                        headers=AUTH)
    assert other.status_code == 409
    relabel = client.post("/feedback", json={"completion_id": cid, "label": "good"}, headers=AUTH)
    assert relabel.status_code == 201
    labelled = daemon.intake.experiences.labelled()
    assert [e.label for e in labelled.examples] == ["good"] and not labelled.pairs  # the newer label wins
    assert [h["label"] for h in daemon.intake.experiences.history(cid, "completion")] == ["bad", "good"]  # both kept


def test_feedback_on_a_posted_transcript_and_a_labelled_transcript(client, daemon):
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}],
            "label": "good"}
    r = client.post("/conversations", json=conv, headers=AUTH)
    assert r.status_code == 201
    cid = r.json()["id"]
    assert client.post("/feedback", json={"conversation_id": cid, "label": "bad"}, headers=AUTH).status_code == 201
    assert [h["label"] for h in daemon.intake.experiences.history(cid, "conversation")] == ["good", "bad"]
    bad_label = client.post("/conversations", json=conv | {"label": "great"}, headers=AUTH)
    assert bad_label.status_code == 400 and "label" in bad_label.json()["error"]["message"]
    assert bad_label.json()["error"]["param"] == "label"  # not 'messages'


@pytest.mark.parametrize("body, status, fragment", [
    ({"completion_id": "chatcmpl-nope", "label": "good"}, 404, "chatcmpl-nope"),
    ({"conversation_id": 999, "label": "good"}, 404, "999"),
    ({"label": "good"}, 400, "exactly one"),
    ({"completion_id": "X", "conversation_id": 1, "label": "good"}, 400, "exactly one"),
    ({"completion_id": "X", "label": "meh"}, 400, "label"),
    ({"completion_id": "X", "label": "good", "karma": -3}, 400, "karma"),
    ({"completion_id": "X", "label": "good", "correction": ""}, 400, "correction"),
    ({"completion_id": "X", "label": "good", "stars": 5}, 400, "stars"),
])
def test_bad_feedback_is_refused_and_changes_nothing(client, daemon, body, status, fragment):
    cid = client.post("/v1/chat/completions", json=ask("hi")).json()["id"]
    body = {k: (cid if v == "X" else v) for k, v in body.items()}
    before = _snapshot(daemon)
    r = client.post("/feedback", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    if status == 404:  # the field naming the unknown item, not 'label'
        assert r.json()["error"]["param"] == next(k for k in body if k.endswith("_id"))
    elif fragment in body:  # the field at fault
        assert r.json()["error"]["param"] == fragment
    assert _snapshot(daemon) == before
    assert client.post("/feedback", json={"completion_id": cid, "label": "good"}).status_code == 401
    assert _snapshot(daemon) == before


def test_probes_are_stored_scrubbed_once_per_key_and_bad_ones_refused(client, daemon):
    probe = {"question": f"What is my dog called? (my key is {SECRET})", "answers": ["Bramble"],
             "idempotency_key": "probe-1"}
    r = client.post("/probes", json=probe, headers=AUTH)
    assert r.status_code == 201 and r.json()["redactions"] == {"api_key": 1}
    assert client.post("/probes", json=probe, headers=AUTH).status_code == 200
    assert client.post("/probes", json=probe | {"answers": ["Rex"]}, headers=AUTH).status_code == 409
    [item] = daemon.intake.probes.items()
    assert item["answers"] == ["Bramble"] and SECRET not in item["question"]
    for bad, fragment in (({"question": "", "answers": ["x"]}, "question"), ({"question": "Q?", "answers": []}, "answers"),
                          ({"question": "Q?", "answers": ["ok", 3]}, "answers"), ({"question": "Q?"}, "answers")):
        r = client.post("/probes", json=bad, headers=AUTH)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == fragment  # the field at fault, not always 'question'
    assert client.post("/probes", json={"question": "Q?", "answers": ["a"]}).status_code == 401
    assert daemon.intake.probes.count() == 1 and client.get("/status").json()["probes"] == 1


def test_a_newer_probe_of_the_same_question_supersedes_the_older_one(client, daemon):
    """An updated fact is asked by its newest answers: the old probe would count a child that learned the update
    as one that forgot it."""
    for question, answer in (("What name did I give my dog?", "Bramble"), ("Where do I live?", "Quillhaven"),
                             ("what name did I give my DOG", "Pip")):
        assert client.post("/probes", json={"question": question, "answers": [answer]}, headers=AUTH).status_code == 201
    items = daemon.intake.probes.items()
    assert [(i["question"], i["answers"]) for i in items] == [("Where do I live?", ["Quillhaven"]),
                                                              ("what name did I give my DOG", ["Pip"])]
    assert daemon.intake.probes.count() == 3  # every probe is kept in the database


def test_a_reply_is_scored_by_the_served_gguf_after_its_prompt_in_the_chat_template(daemon):
    """preference_margin's scorer on a real GGUF: the model's own greedy reply is far likelier than noise."""
    from evolution import evals
    from evolution.llamacpp import open_llama

    scorer = open_llama(daemon.root.gen_dir(1) / "model.gguf", n_ctx=512, seed=0, logits_all=True)
    try:
        prompt = [{"role": "user", "content": "What is your name?"}]
        assert evals.render_prompt(scorer, prompt).endswith("<|im_start|>assistant\n")  # ChatML, as served
        own = daemon.chat({"messages": prompt, "max_tokens": 8, "temperature": 0})[0]["choices"][0]["message"]
        mine = evals.reply_logprob(scorer, prompt, own["content"])
        noise = evals.reply_logprob(scorer, prompt, "zebra quantum marmalade ossify")
        assert mine is not None and noise is not None and mine < 0 and noise < mine - 1.0
    finally:
        scorer.close()

"""Conversation intake (validate, scrub, store) and the recency rule of ``replay.materialize``."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from evolution.intake.conversations import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    ConversationError,
    ConversationStore,
    validate,
)
from evolution.intake import Inbox
from evolution.messages import prompt_key
from evolution.replay import conversations_through, materialize
from tests.conftest import plain_settings, write_jsonl


def U(content):
    return {"role": "user", "content": content}


def A(content):
    return {"role": "assistant", "content": content}


def S(content):
    return {"role": "system", "content": content}


# -- validate ---------------------------------------------------------------------------------


def test_validate_accepts_a_plain_transcript():
    msgs = [S("You are Wren."), U("Hi"), A("Hello!"), U("How are you?"), A("Well, thanks.")]
    assert validate(msgs) == msgs
    assert validate([U("Hi"), A("Hello!")]) == [U("Hi"), A("Hello!")]


def test_validate_keeps_only_role_and_content():
    out = validate([{"role": "user", "content": "Hi", "name": "bob"}, {"role": "assistant", "content": "Yo", "x": 1}])
    assert out == [U("Hi"), A("Yo")]


def test_validate_joins_openai_text_parts():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Where do "}, {"type": "text", "text": "you live?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "By the sea."}]}]
    assert validate(msgs) == [U("Where do you live?"), A("By the sea.")]


def test_validate_drops_trailing_user_turns():
    assert validate([U("Hi"), A("Hello!"), U("And?")]) == [U("Hi"), A("Hello!")]
    assert validate([U("Hi"), A("Hello!"), U("And?"), U("Hello??")]) == [U("Hi"), A("Hello!")]


def test_validate_accepts_the_limits():
    long = "x" * MAX_MESSAGE_CHARS
    assert validate([U(long), A("ok")])[0]["content"] == long
    many = [U("q"), A("a")] * (MAX_MESSAGES // 2)
    assert len(validate(many)) == MAX_MESSAGES


@pytest.mark.parametrize("messages, needles", [
    ([], ["non-empty list"]),
    ({"role": "user", "content": "hi"}, ["list"]),
    ("hello", ["list"]),
    (None, ["list"]),
    ([U("hi"), "assistant: hello"], ["messages[1]", "object"]),
    ([U("hi"), {"role": "tool", "content": "42"}, A("ok")], ["messages[1].role", "'tool'"]),
    ([{"content": "hi"}, A("ok")], ["messages[0].role", "None"]),
    ([U("hi"), {"role": "assistant", "content": 42}], ["messages[1].content", "string", "int"]),
    ([U("hi"), {"role": "assistant"}], ["messages[1].content", "string"]),
    ([U("hi"), A("   \n")], ["messages[1].content", "empty"]),
    ([U(""), A("ok")], ["messages[0].content", "empty"]),
    ([U([]), A("ok")], ["messages[0].content", "empty"]),
    ([{"role": "user", "content": [{"type": "text", "text": "look"},
                                   {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}, A("nice")],
     ["messages[0].content[1]", "text"]),
    ([{"role": "user", "content": ["plain string part"]}, A("ok")], ["messages[0].content[0]", "text"]),
    ([U("q"), A("a")] * (MAX_MESSAGES // 2) + [U("one too many")], [str(MAX_MESSAGES), str(MAX_MESSAGES + 1)]),
    ([U("hi"), A("y" * (MAX_MESSAGE_CHARS + 1))],
     ["messages[1].content", str(MAX_MESSAGE_CHARS + 1), str(MAX_MESSAGE_CHARS)]),
    ([U("hi"), S("Be terse."), A("ok")], ["messages[1]", "system", "first"]),
    ([U("hi")], ["user message followed by an assistant reply"]),
    ([U("hi"), U("anyone?")], ["assistant reply"]),
    ([A("Hello!"), U("hi")], ["assistant reply"]),
    ([S("You are Wren."), A("Hello!")], ["assistant reply"]),
], ids=["empty", "dict", "string", "none", "non-dict-message", "tool-role", "no-role", "int-content",
        "missing-content", "blank-content", "empty-content", "empty-parts", "image-part", "string-part",
        "too-many", "too-long", "late-system", "no-reply", "two-users", "reply-before-user", "system-only"])
def test_validate_rejects_with_a_clear_message(messages, needles):
    with pytest.raises(ConversationError) as info:
        validate(messages)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


# -- prompt_key -------------------------------------------------------------------------------


def test_prompt_key_folds_case_punctuation_and_whitespace():
    k = prompt_key([U("Where do you live?"), A("x")])
    assert k == "where do you live"
    for variant in ["where do you live", "  WHERE do\tyou\n live?!", "Where, do you live...", "¿Where do you live?"]:
        assert prompt_key([U(variant), A("y")]) == k
    assert prompt_key([S("sys"), U("Where do you live?"), A("x"), U("Other"), A("z")]) == k  # the first user turn
    assert prompt_key([U("Where did you live?"), A("x")]) != k
    assert prompt_key([A("only an answer")]) == ""


# -- ConversationStore ------------------------------------------------------------------------

EMAIL = "alice.smith@example.com"
API_KEY = "sk-proj-AbC123dEf456GhI789jKl012MnO345pQr"
PASSWORD = "Hunter2!x"
SECRETS = (EMAIL, API_KEY, PASSWORD)


def _raw_rows(ledger):
    with ledger.reading() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT * FROM conversations ORDER BY id"))]


def test_add_scrubs_secrets_before_storing(ledger, _isolated_home):
    store = ConversationStore(ledger)
    msgs = [U(f"Mail me at {EMAIL}, my OpenAI key is {API_KEY} and my password is {PASSWORD}"),
            A("Noted. I will not repeat them."), U(f"Also {EMAIL} again")]
    stored = store.add(msgs, key="conv-1")
    assert not stored.duplicate and stored.messages == 2  # the trailing user turn is dropped
    assert stored.redactions == {"email": 1, "api_key": 1, "password": 1}

    rows = _raw_rows(ledger)
    assert len(rows) == 1
    dump = repr(rows)
    for secret in SECRETS:
        assert secret not in dump
    assert "Hunter2" not in dump and "alice.smith" not in dump
    for kind in ("email", "api_key", "password"):
        assert f"[REDACTED:{kind}]" in dump
    ((cid, messages),) = store.after(0)
    assert cid == stored.id
    assert messages[0]["content"] == ("Mail me at [REDACTED:email], my OpenAI key is [REDACTED:api_key] "
                                      "and my password is [REDACTED:password]")
    assert messages[1] == A("Noted. I will not repeat them.")
    with ledger.reading() as conn:
        r = conn.execute(text("SELECT redactions, idem_key FROM conversations")).one()
    assert json.loads(r.redactions) == stored.redactions and r.idem_key == "conv-1"

    # nor in the database files on disk (the SQLite file and its write-ahead log)
    raw = b"".join(p.read_bytes() for p in (_isolated_home / "ledger").glob("ledger.db*"))
    for secret in SECRETS:
        assert secret.encode() not in raw


def test_add_of_an_invalid_transcript_stores_nothing(ledger):
    store = ConversationStore(ledger)
    with pytest.raises(ConversationError):
        store.add([U(f"my password is {PASSWORD}")])
    with pytest.raises(ConversationError):
        store.add([U("hi"), A("ok")], key="")
    with pytest.raises(ConversationError):
        store.add([U("hi"), A("ok")], key="k" * 201)
    assert store.count() == (0, 0) and _raw_rows(ledger) == []


def test_idempotency_key(ledger):
    store = ConversationStore(ledger)
    msgs = [U(f"write to {EMAIL}"), A("ok")]
    first = store.add(msgs, key="req-7")
    again = store.add(msgs, key="req-7")
    assert again.duplicate and again.id == first.id
    assert again.redactions == first.redactions == {"email": 1}
    assert store.count() == (1, first.id)
    with pytest.raises(ConversationError, match="req-7"):
        store.add([U("write to someone else"), A("ok")], key="req-7")
    assert store.count() == (1, first.id)
    assert not store.add(msgs, key="req-8").duplicate  # another key is another transcript
    assert not store.add(msgs).duplicate  # and without a key nothing is deduplicated
    assert store.count()[0] == 3


def test_after_returns_later_transcripts_oldest_first_and_count(ledger):
    store = ConversationStore(ledger)
    assert store.count() == (0, 0) and store.after(0) == []
    ids = [store.add([U(f"question {i}"), A(f"answer {i}")]).id for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert store.after(0) == [(i, [U(f"question {n}"), A(f"answer {n}")]) for n, i in enumerate(ids)]
    assert [c for c, _ in store.after(ids[0])] == ids[1:]
    assert store.after(ids[-1]) == []
    assert store.count() == (3, ids[-1])


# -- recency through replay.materialize -------------------------------------------------------

WHERE = "Where do you live?"


def _sft(out):
    return [json.loads(line)["messages"] for line in (out / "sft.jsonl").read_text().splitlines() if line.strip()]


def _answers(out, question):
    key = prompt_key([U(question)])
    return [next(m["content"] for m in msgs if m["role"] == "assistant")
            for msgs in _sft(out) if prompt_key(msgs) == key]


def test_newest_conversation_wins_a_prompt(ledger, cur, root, tmp_path):
    store = ConversationStore(ledger)
    old = store.add([U(WHERE), A("I live in Lisbon.")]).id
    other = store.add([U("What do you like to eat?"), A("Soup.")]).id
    new = store.add([U("where do you LIVE"), A("I moved to Porto.")]).id
    assert old < other < new
    convs = store.after(0)
    out = tmp_path / "out"
    m = materialize(root, cur, 1, out, plain_settings(),
                    Inbox.taught(list(reversed(convs))))  # the id decides, not the list order
    assert _answers(out, WHERE) == ["I moved to Porto."]
    assert _answers(out, "What do you like to eat?") == ["Soup."]
    assert m["conversations"] == {"taken": 2, "through": new, "superseded": 1}
    assert m["counts"]["sft"] == len(cur.sft) + 2 == len(_sft(out))


def test_curriculum_wins_over_a_conversation(cur, root, tmp_path):
    convs = [(1, [U("what is your NAME"), A("My name is Bob.")]), (2, [U(WHERE), A("By the sea.")])]
    out = tmp_path / "out"
    m = materialize(root, cur, 1, out, plain_settings(), Inbox.taught(convs))
    assert set(_answers(out, "What is your name?")) == {"My name is Wren."}
    assert "My name is Bob." not in (out / "sft.jsonl").read_text()
    assert _answers(out, WHERE) == ["By the sea."]
    assert m["conversations"] == {"taken": 1, "through": 2, "superseded": 1}


def _fake_generation(root, gen, rows):
    write_jsonl(root.gen_dir(gen) / "data" / "sft.jsonl", [{"messages": r} for r in rows])


def test_newest_generation_wins_a_replayed_prompt(cur, root, tmp_path):
    book = [U("What is your favourite book?"), A("Moby-Dick.")]
    _fake_generation(root, 1, [[U(WHERE), A("I live in Lisbon.")], book])
    _fake_generation(root, 2, [[U("where do you live"), A("I live in Porto.")]])
    assert root.generations() == [1, 2]

    out = tmp_path / "child3"
    m = materialize(root, cur, 3, out, plain_settings(replay_ratio=10.0))  # ratio high enough to replay everything left
    assert _answers(out, WHERE) == ["I live in Porto."]
    assert _answers(out, "What is your favourite book?") == ["Moby-Dick."]  # not contradicted: still replayed
    assert "Lisbon" not in (out / "sft.jsonl").read_text()
    assert m["replayed"]["sft"] == 2
    assert m["conversations"] == {"taken": 0, "through": 0, "superseded": 1}
    assert {"checkpoints/gen_0001/data/sft.jsonl", "checkpoints/gen_0002/data/sft.jsonl"} <= set(m["files"])

    # a conversation with that prompt beats both generations
    out2 = tmp_path / "child3-conv"
    m2 = materialize(root, cur, 3, out2, plain_settings(replay_ratio=10.0),
                     Inbox.taught([(5, [U("Where do you live?!"), A("I live in Faro now.")])], conversations_since=4))
    assert _answers(out2, WHERE) == ["I live in Faro now."]
    text_ = (out2 / "sft.jsonl").read_text()
    assert "Lisbon" not in text_ and "Porto" not in text_
    assert _answers(out2, "What is your favourite book?") == ["Moby-Dick."]
    assert m2["replayed"]["sft"] == 1
    assert m2["conversations"] == {"taken": 1, "through": 5, "superseded": 2}


def test_generations_at_or_after_the_child_are_not_replayed(cur, root, tmp_path):
    _fake_generation(root, 1, [[U(WHERE), A("I live in Lisbon.")]])
    _fake_generation(root, 2, [[U(WHERE), A("I live in Porto.")]])
    out = tmp_path / "child2"
    materialize(root, cur, 2, out, plain_settings(replay_ratio=10.0))  # a retry of child 2 replays only generation 1
    assert _answers(out, WHERE) == ["I live in Lisbon."]


def test_manifest_records_the_last_conversation_taken(cur, root, tmp_path):
    gen_dir = tmp_path / "gen"
    convs = [(3, [U("a question"), A("an answer")]), (7, [U("another"), A("reply")]),
             (5, [U("A question!"), A("a newer-looking but older answer")])]
    m = materialize(root, cur, 1, gen_dir / "data", plain_settings(), Inbox.taught(convs, conversations_since=2))
    assert m["conversations"]["through"] == 7
    assert conversations_through(gen_dir) == 7
    assert json.loads((gen_dir / "data" / "manifest.json").read_text())["conversations"]["through"] == 7
    assert _answers(gen_dir / "data", "a question") == ["a newer-looking but older answer"]  # id 5 > id 3

    empty = tmp_path / "gen-empty"
    m = materialize(root, cur, 1, empty / "data", plain_settings(), Inbox.taught(conversations_since=4))
    assert m["conversations"] == {"taken": 0, "through": 4, "superseded": 0}
    assert conversations_through(empty) == 4
    assert conversations_through(tmp_path / "nowhere") == 0

"""Property-based fuzzing of every input the daemon takes: HTTP bodies and curriculum lines.

Whatever arrives, the answer is a clear 4xx (or success) — never a 500 or a crash — and nothing
is half-stored: karma and conversations change only when the request succeeded.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolution import curriculum
from evolution.errors import CurriculumError
from tests.conftest import SERVER_TOKEN

AUTH = {"Authorization": f"Bearer {SERVER_TOKEN}", "content-type": "application/json"}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
                                           "content": st.one_of(st.text(max_size=60), json_values)}), max_size=5)
raw_bodies = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()))


def _ok_or_4xx(r) -> dict:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    if r.status_code >= 400:
        assert body["error"]["message"], body  # every refusal says what is wrong
    return body


@FUZZ
@given(body=st.one_of(raw_bodies, st.fixed_dictionaries(
    {"amount": json_values, "reason": json_values, "idempotency_key": json_values}).map(
        lambda d: json.dumps(d).encode())))
def test_karma_takes_any_body_without_a_500_and_counts_only_what_it_accepted(client, daemon, body, tally):
    tally.bad_input("bad input · HTTP fuzz (hypothesis)")
    before = daemon.intake.karma.state().total
    r = client.post("/karma", content=body, headers=AUTH)
    out = _ok_or_4xx(r)
    after = daemon.intake.karma.state().total
    expected = before + out["amount"] if r.status_code == 201 else before
    tally.lost("bad input · HTTP fuzz (hypothesis)", int(after != pytest.approx(expected)))
    assert after == pytest.approx(expected)


@FUZZ
@given(body=st.one_of(raw_bodies, st.fixed_dictionaries({"messages": messages}).map(lambda d: json.dumps(d).encode())))
def test_conversations_take_any_body_without_a_500_and_store_only_what_they_accepted(client, daemon, body, tally):
    tally.bad_input("bad input · HTTP fuzz (hypothesis)")
    before = daemon.intake.conversations.count()[0]
    r = client.post("/conversations", content=body, headers=AUTH)
    _ok_or_4xx(r)
    assert daemon.intake.conversations.count()[0] == before + (r.status_code == 201)


@FUZZ
@given(body=st.one_of(raw_bodies, st.fixed_dictionaries(
    {"messages": messages, "max_tokens": json_values, "temperature": json_values, "stop": json_values,
     "model": json_values, "stream": st.just(False)}).map(lambda d: json.dumps(d).encode())))
def test_chat_takes_any_body_without_a_500(client, body, tally):
    tally.bad_input("bad input · HTTP fuzz (hypothesis)")
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    _ok_or_4xx(r)


@FUZZ
@given(to=json_values, reason=json_values)
def test_rollback_takes_any_target_without_a_500_and_serves_only_known_gated_generations(client, daemon, to, reason,
                                                                                        tally):
    tally.bad_input("bad input · HTTP fuzz (hypothesis)")
    r = client.post("/rollback", content=json.dumps({"to": to, "reason": reason}), headers=AUTH)
    _ok_or_4xx(r)
    assert daemon.host.current.gen in (0, 1) and daemon.ledger.served_generation() == daemon.host.current.gen


lines = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"messages": messages}).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"text": json_values}).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sft=st.lists(lines, max_size=4), cpt=st.lists(lines, max_size=4))
def test_any_curriculum_file_loads_or_names_every_bad_line(tiny_curriculum, sft, cpt, tally):
    tally.bad_input("bad input · curriculum fuzz (hypothesis)", len(sft) + len(cpt))
    for name, rows in (("sft.jsonl", sft), ("cpt.jsonl", cpt)):
        (tiny_curriculum / "phase2_fuzz" / name).parent.mkdir(exist_ok=True)
        (tiny_curriculum / "phase2_fuzz" / name).write_bytes(b"\n".join(rows) + (b"\n" if rows else b""))
    try:
        cur = curriculum.load(tiny_curriculum)
    except CurriculumError as exc:
        assert exc.problems
        for p in exc.problems:  # every problem names its file, and its line where there is one
            assert "phase2_fuzz/" in p or "curriculum" in p, p
    else:
        assert all(isinstance(r["messages"], list) for r in cur.sft)
        assert all(isinstance(r["text"], str) and r["text"] for r in cur.cpt)


# -- ratings and what decides capture: POST /feedback, 'store' on chat, 'label' on /conversations --------------------

REFS = ("@completion", "@experience", "@experience-str", "@conversation", "@conversation-str")
"""Placeholders the test replaces with the ids of a kept completion and a posted conversation."""
EDGE_IDS = (0, -1, 2**63 - 1, 2**63, 10**30, "0", "9" * 25, "²", "١٢", "1.0", " 1", "+1", "1_000")
"""Ids at the edges: past SQLite's 64-bit integers, digits that ``int()`` refuses or reads differently."""
item_ids = st.one_of(st.sampled_from(REFS), st.sampled_from(EDGE_IDS), st.integers(),
                     st.from_regex(r"[0-9]{1,30}", fullmatch=True), st.text(max_size=30), json_values)
feedback_bodies = st.fixed_dictionaries({}, optional={
    "completion_id": item_ids, "conversation_id": item_ids,
    "label": st.one_of(st.sampled_from(["good", "bad"]), json_values),
    "correction": st.one_of(st.text(max_size=40), json_values),
    "karma": st.one_of(st.sampled_from([1, 0.5, 3]), json_values),
    "idempotency_key": st.one_of(st.sampled_from(["fz-1", "fz-2", ""]), json_values),
    "stars": json_values,
})
ratings = st.fixed_dictionaries(  # a valid rating, each optional field either valid or not
    {"target": st.one_of(st.sampled_from(REFS), item_ids), "label": st.sampled_from(["good", "bad"])},
    optional={"correction": st.one_of(st.text(min_size=1, max_size=40), json_values),
              "karma": st.one_of(st.integers(1, 5), st.floats(0.5, 10), json_values),
              "idempotency_key": st.one_of(st.sampled_from(["fz-1", "fz-2"]), json_values)},
).map(lambda d: {("conversation_id" if "conversation" in str(d["target"]) else "completion_id"): d.pop("target")} | d)


def _rows(daemon, table: str) -> list[tuple]:
    from sqlalchemy import text

    with daemon.ledger.reading() as conn:
        return [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]


def _snapshot(daemon) -> dict:
    """Everything a rating, a capture or a posted transcript could change."""
    return {"experiences": _rows(daemon, "experiences"), "ratings": _rows(daemon, "experience_ratings"),
            "conversations": _rows(daemon, "conversations"), "karma": daemon.intake.karma.state().total,
            "ledger": len(daemon.ledger.entries())}


@pytest.fixture
def rateable(client):
    """A kept served completion and a posted transcript: real items for the fuzzed ratings to hit."""
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    conv = client.post("/conversations", headers=AUTH, json={"messages": [{"role": "user", "content": "Hi"},
                                                                          {"role": "assistant", "content": "Hello"}]})
    assert chat.status_code == 200 and conv.status_code == 201, (chat.text, conv.text)
    exp = client.get("/status").json()["experiences"]
    assert exp["experiences"] == 1
    return {"@completion": chat.json()["id"], "@experience": 1, "@experience-str": "1",
            "@conversation": conv.json()["id"], "@conversation-str": str(conv.json()["id"])}


@FUZZ
@given(body=st.one_of(raw_bodies, feedback_bodies, ratings))
def test_feedback_takes_any_body_without_a_500_and_changes_nothing_it_refused(client, daemon, rateable, body, tally):
    area = "bad input · HTTP feedback fuzz (hypothesis)"
    if isinstance(body, dict):
        body = json.dumps({k: rateable.get(v, v) if isinstance(v, str) else v for k, v in body.items()}).encode()
    before = _snapshot(daemon)
    r = client.post("/feedback", content=body, headers=AUTH)
    out = _ok_or_4xx(r)
    after = _snapshot(daemon)
    if r.status_code == 201:  # a new rating: one row, and its karma to the unit
        tally.trial(area)
        ok = (len(after["ratings"]) == len(before["ratings"]) + 1
              and after["karma"] == pytest.approx(before["karma"] + (out["karma"] or 0)))
    else:  # refused, or a repeat of an idempotency key answered from the first call (200): nothing changed
        if r.status_code == 200:
            tally.trial(area)
            assert out["duplicate"], out
        else:
            tally.bad_input(area)
        ok = after == before
    tally.lost(area, int(not ok))
    assert ok, (r.status_code, out, before, after)


def test_feedback_on_ids_at_the_edges_is_a_4xx_and_changes_nothing(client, daemon, rateable, tally):
    area = "bad input · HTTP feedback fuzz (hypothesis)"
    before = _snapshot(daemon)
    for field in ("completion_id", "conversation_id"):
        for item in EDGE_IDS:
            tally.bad_input(area)
            r = client.post("/feedback", json={field: item, "label": "good", "karma": 1}, headers=AUTH)
            assert r.status_code in (400, 404), (field, item, r.status_code, r.text[:300])
            assert r.json()["error"]["message"], r.text
    after = _snapshot(daemon)
    tally.lost(area, int(after != before))
    assert after == before


@FUZZ
@given(store=st.one_of(st.booleans(), st.none(), json_values), stream=st.booleans())
def test_chat_store_field_is_true_false_or_refused_and_decides_the_capture(client, daemon, store, stream, tally):
    area = "bad input · HTTP store / label fuzz (hypothesis)"
    before = _snapshot(daemon)
    r = client.post("/v1/chat/completions", headers={"content-type": "application/json"}, content=json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "store": store, "stream": stream}))
    valid = store is None or isinstance(store, bool)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if valid:
        tally.trial(area)
        assert r.status_code == 200, r.text[:300]
        assert r.text.rstrip().endswith("data: [DONE]") if stream else r.json()["choices"][0]["message"]["content"]
    else:
        tally.bad_input(area)
        assert r.status_code == 400 and "'store'" in r.json()["error"]["message"], r.text[:300]
    after = _snapshot(daemon)
    kept = len(after["experiences"]) - len(before["experiences"])
    ok = kept == int(valid and store is not False) and after["ratings"] == before["ratings"] \
        and after["karma"] == before["karma"] and after["conversations"] == before["conversations"]
    tally.lost(area, int(not ok))
    assert ok, (store, stream, kept)


@FUZZ
@given(label=st.one_of(st.sampled_from(["good", "bad"]), st.none(), json_values))
def test_conversation_label_is_good_bad_or_refused_and_changes_nothing_it_refused(client, daemon, label, tally):
    area = "bad input · HTTP store / label fuzz (hypothesis)"
    before = _snapshot(daemon)
    transcript = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    r = client.post("/conversations", headers=AUTH, content=json.dumps({"messages": transcript, "label": label}))
    _ok_or_4xx(r)
    after = _snapshot(daemon)
    if label is None or label in ("good", "bad"):
        tally.trial(area)
        assert r.status_code == 201, r.text[:300]
        ok = (len(after["conversations"]) == len(before["conversations"]) + 1
              and len(after["ratings"]) == len(before["ratings"]) + (label is not None))
    else:
        tally.bad_input(area)
        assert r.status_code == 400 and "label" in r.json()["error"]["message"], r.text[:300]
        ok = after == before
    tally.lost(area, int(not ok))
    assert ok, (label, r.status_code)

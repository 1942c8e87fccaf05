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
    before = daemon.karma.state().total
    r = client.post("/karma", content=body, headers=AUTH)
    out = _ok_or_4xx(r)
    after = daemon.karma.state().total
    expected = before + out["amount"] if r.status_code == 201 else before
    tally.lost("bad input · HTTP fuzz (hypothesis)", int(after != pytest.approx(expected)))
    assert after == pytest.approx(expected)


@FUZZ
@given(body=st.one_of(raw_bodies, st.fixed_dictionaries({"messages": messages}).map(lambda d: json.dumps(d).encode())))
def test_conversations_take_any_body_without_a_500_and_store_only_what_they_accepted(client, daemon, body, tally):
    tally.bad_input("bad input · HTTP fuzz (hypothesis)")
    before = daemon.store.count()[0]
    r = client.post("/conversations", content=body, headers=AUTH)
    _ok_or_4xx(r)
    assert daemon.store.count()[0] == before + (r.status_code == 201)


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

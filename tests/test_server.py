"""The HTTP API and the hot-swap, in process, on a tiny model's real GGUF (llama-cpp-python)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from evolution import ageup, promotion
from evolution.errors import IntegrityError, LoadError
from evolution.fsutil import make_tree_writable, sha256_file
from evolution.ledger import events as ev
from evolution.ledger import rollback as record_rollback
from evolution.serving import ModelHost
from tests.conftest import SERVER_TOKEN
from tests.daemon_util import serving, tick_until

AUTH = {"Authorization": f"Bearer {SERVER_TOKEN}"}
ASK = {"messages": [{"role": "user", "content": "What is your name?"}], "max_tokens": 8, "temperature": 0}


def test_health_models_and_chat_answer_from_the_served_generation(client):
    assert client.get("/health").json() == {"status": "ok", "served_generation": 1, "model": "evolution-gen-0001"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["evolution-gen-0001", "evolution@0", "evolution@1"]
    r = client.post("/v1/chat/completions", json=ASK)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "evolution-gen-0001" and "Wren" in body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0


def test_streaming_chat_is_server_sent_events_ending_with_done(client):
    with client.stream("POST", "/v1/chat/completions", json=ASK | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "Wren" in text and all(c["model"] == "evolution-gen-0001" for c in chunks)


@pytest.mark.parametrize("body,status,fragment", [
    ("{not json", 400, "malformed JSON"),
    ("[1, 2]", 400, "must be an object"),
    (json.dumps({"messages": []}), 400, "'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), 400, "role"),
    (json.dumps(ASK | {"n": 2}), 400, "'n'"),
    (json.dumps(ASK | {"max_tokens": 0}), 400, "'max_tokens'"),
    (json.dumps(ASK | {"temperature": "hot"}), 400, "'temperature'"),
    (json.dumps(ASK | {"tools": [{"type": "function"}]}), 400, "tools"),
    (json.dumps(ASK | {"model": "evolution-gen-0009"}), 404, "not the served generation"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}), 400, "context"),
])
def test_bad_chat_requests_get_a_clear_4xx_in_openai_error_shape(client, body, status, fragment):
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=ASK).status_code == 200  # the server is fine afterwards


def test_write_endpoints_need_the_token_and_chat_does_not(client, daemon):
    for path, body in (("/karma", {"amount": 1}), ("/conversations", {"messages": []}), ("/rollback", {"to": 0})):
        assert client.post(path, json=body).status_code == 401
        assert client.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/karma", json={"amount": 1}, headers=AUTH).status_code == 201
    assert daemon.intake.karma.state().total == 1
    assert client.post("/v1/chat/completions", json=ASK).status_code == 200


def test_chat_can_require_the_token(daemon):
    from evolution.server import create_app

    daemon.dcfg.chat_requires_token = True
    with TestClient(create_app(daemon)) as c:
        assert c.post("/v1/chat/completions", json=ASK).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/chat/completions", json=ASK, headers=AUTH).status_code == 200


PRIVATE_READS = {"/ui/api/experience", "/ui/api/generation/{n}", "/ui/api/lineage"}
"""The GET routes that return stored user text or model replies: every other GET route is public, and a new
route must be sorted into one or the other (``test_reads_of_stored_text_are_private_where_chat_is``)."""

MARKER = "quokka-7731 my sister's name is Ottoline"
NEAR_MISS_TOKENS = ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {SERVER_TOKEN}"},
                    {"Authorization": f"Bearer {SERVER_TOKEN[:-1]}"}, {"X-Api-Key": SERVER_TOKEN})


def _get_routes(app) -> dict[str, str]:
    """Every GET route of ``app`` and of the dashboard's router it includes -> a URL that reaches it."""
    from fastapi.routing import APIRoute

    from evolution import dashboard

    fill = {"{n}": "1", "{name}": "evolution-gen-0001", "{name:path}": "app.js"}
    out = {}
    for route in [r for r in app.routes if isinstance(r, APIRoute)] + dashboard.router(None, dict).routes:
        if "GET" in (getattr(route, "methods", None) or ()):
            url = route.path
            for k, v in fill.items():
                url = url.replace(k, v)
            assert "{" not in url, f"fill the path parameter of {route.path}"
            out[route.path] = url
    return out


@pytest.mark.parametrize("setting", ["chat_requires_token", "beyond_loopback", "loopback_chat_open"])
def test_reads_of_stored_text_are_private_where_chat_is(daemon, setting):
    """With chat behind the token (or the daemon beyond loopback), each read of stored chats, transcripts and
    model replies is refused without the token and with near misses of it, 401 naming where the token is; the
    other reads answer without it and never carry stored text. On loopback with chat open all stay open."""
    from evolution.server import create_app

    private = setting != "loopback_chat_open"
    if setting == "chat_requires_token":
        daemon.dcfg.chat_requires_token = True
    elif setting == "beyond_loopback":
        daemon.dcfg.host, daemon.dcfg.allow_remote = "0.0.0.0", True
    app = create_app(daemon)
    routes = _get_routes(app)
    assert PRIVATE_READS <= set(routes), sorted(routes)
    with TestClient(app) as c:
        talk = [{"role": "user", "content": MARKER}, {"role": "assistant", "content": "Noted."}]
        assert c.post("/conversations", json={"messages": talk}, headers=AUTH).status_code == 201
        chat = c.post("/v1/chat/completions", json=ASK | {"messages": talk[:1]}, headers=AUTH)
        assert chat.status_code == 200, chat.text
        assert c.get("/ui/api/live").json()["token_for_reads"] is private
        for path, url in sorted(routes.items()):
            if path in PRIVATE_READS:
                for bad in NEAR_MISS_TOKENS:
                    r = c.get(url, headers=bad)
                    if not private:
                        assert r.status_code == 200, (url, r.text)
                        continue
                    assert r.status_code == 401, (url, bad, r.text)
                    err = r.json()["error"]
                    assert err["code"] == "invalid_api_key" and "the config's daemon.api_token" in err["message"], err
                    assert MARKER not in r.text
                assert c.get(url, headers=AUTH).status_code == 200, url
            else:
                r = c.get(url)
                assert r.status_code in (200, 401), (url, r.status_code, r.text)  # /v1/models: 401 as chat is
                assert MARKER not in r.text, f"{url} returns stored chat text without the token"
                assert "Ottoline" not in r.text, url
        kept = c.get("/ui/api/experience", headers=AUTH).json()
        assert MARKER in json.dumps(kept["experiences"]) and MARKER in json.dumps(kept["conversations"])
        if private:  # a malformed or unknown one is refused first: a refusal says nothing of what exists
            for url in ("/ui/api/generation/abc", "/ui/api/generation/99", "/ui/api/experience?limit=0"):
                assert c.get(url).status_code == 401, url
            assert c.get("/ui/api/generation/99", headers=AUTH).status_code == 404
            assert c.get("/ui/api/experience?limit=0", headers=AUTH).status_code == 400


def test_oversized_bodies_get_413_and_nothing_is_stored(client, daemon):
    big = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "ok"}]}
    assert client.post("/conversations", json=big, headers=AUTH).status_code == 413
    assert client.post("/karma", json={"amount": 1, "reason": "y" * 20_000}, headers=AUTH).status_code == 413
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "z" * 70_000}]}
                       ).status_code == 413
    assert daemon.intake.conversations.count() == (0, 0) and daemon.intake.karma.state().total == 0


@pytest.mark.parametrize("amount", [-1, 0, "ten", None, 1e300, True])
def test_bad_karma_amounts_are_400_and_add_nothing(client, daemon, amount):
    r = client.post("/karma", json={"amount": amount}, headers=AUTH)
    assert r.status_code == 400 and "amount" in r.json()["error"]["message"]
    assert daemon.intake.karma.state().total == 0


def test_karma_idempotency_key_counts_once(client, daemon):
    first = client.post("/karma", json={"amount": 3, "idempotency_key": "turn-17"}, headers=AUTH)
    again = client.post("/karma", json={"amount": 3}, headers=AUTH | {"Idempotency-Key": "turn-17"})
    other = client.post("/karma", json={"amount": 4, "idempotency_key": "turn-17"}, headers=AUTH)
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 409)
    assert again.json()["duplicate"] is True and daemon.intake.karma.state().total == 3


def test_conversations_are_validated_scrubbed_and_stored(client, daemon):
    conv = {"messages": [{"role": "user", "content": "My key is sk-proj-abcdefghijklmnopqrstuvwxyz012345, keep it"},
                         {"role": "assistant", "content": "I will not repeat it."}]}
    r = client.post("/conversations", json=conv, headers=AUTH)
    assert r.status_code == 201 and r.json()["redactions"] == {"api_key": 1}
    [(cid, stored)] = daemon.intake.conversations.after(0)
    assert "sk-proj-" not in json.dumps(stored) and "[REDACTED:api_key]" in stored[0]["content"]
    bad = client.post("/conversations", json={"messages": [{"role": "tool", "content": "x"}]}, headers=AUTH)
    assert bad.status_code == 400 and "role" in bad.json()["error"]["message"]


def test_rollback_over_http_swaps_and_is_recorded_and_bad_targets_are_refused(client, daemon):
    assert client.post("/rollback", json={"to": 7}, headers=AUTH).status_code == 404
    assert client.post("/rollback", json={"to": "one"}, headers=AUTH).status_code == 400
    assert client.post("/rollback", json={"to": 1}, headers=AUTH).status_code == 409  # already served
    daemon.ledger.record(ev.generation_created(5, 1, "tiny", "c" * 64, None))
    daemon.ledger.record(ev.gate_result(1, 5, {"recall": 0.1}, {"min_recall": 0.5}, "fail", reasons=["recall"]))
    r = client.post("/rollback", json={"to": 5}, headers=AUTH)
    assert r.status_code == 409 and "failed its gate" in r.json()["error"]["message"]

    r = client.post("/rollback", json={"to": 0, "reason": "answers got worse"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert client.get("/health").json()["served_generation"] == 0
    assert daemon.ledger.served_generation() == 0
    assert daemon.ledger.entries(kind=ev.ROLLED_BACK)[-1].payload["reason"] == "answers got worse"
    assert client.post("/v1/chat/completions", json=ASK).json()["model"] == "evolution-gen-0000"


def test_a_rollback_made_with_the_cli_is_followed_by_the_running_daemon(client, daemon):
    record_rollback(daemon.ledger, 0, "by hand")  # what `evolve rollback --to 0` does
    daemon.tick()
    assert daemon.host.current.gen == 0
    assert client.post("/v1/chat/completions", json=ASK).json()["model"] == "evolution-gen-0000"


def test_a_tampered_gguf_is_never_served(client, daemon):
    gguf = daemon.root.gen_dir(0) / "model.gguf"
    make_tree_writable(daemon.root.gen_dir(0))
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(data))
    r = client.post("/rollback", json={"to": 0}, headers=AUTH)
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"]
    assert daemon.host.current.gen == 1 and daemon.ledger.served_generation() == 1


def test_a_child_that_fails_to_load_is_rejected_and_the_parent_keeps_serving(daemon):
    def broken(gen, gguf):
        raise LoadError(f"generation {gen}: the canary prompt failed: test")

    child = ageup.age_up(daemon.root, daemon.cfg, daemon.ledger)
    assert child.gate["verdict"] == "pass"
    assert promotion.decide(daemon.root, daemon.ledger, child.gen, 2, swap=broken) == promotion.REJECTED
    assert daemon.ledger.served_generation() == 1 and daemon.host.current.gen == 1
    [rej] = daemon.ledger.entries(gen=child.gen, kind=ev.REJECTED)
    assert "could not be served" in rej.payload["reason"] and "canary" in rej.payload["reason"]


def test_an_older_generation_answers_by_name_and_what_is_served_never_changes(client, daemon):
    ask = ASK | {"messages": [{"role": "user", "content": "Where do you live?"}], "max_tokens": 12}
    r = client.post("/v1/chat/completions", json=ask | {"model": "evolution@0"})
    assert r.status_code == 200, r.text
    by_name = r.json()
    assert by_name["model"] == "evolution-gen-0000"  # which generation answered
    assert daemon.host.current.gen == 1 and daemon.ledger.served_generation() == 1 and daemon.older.loaded() == [0]
    assert client.post("/v1/chat/completions", json=ask).json()["model"] == "evolution-gen-0001"
    [kept] = [e for e in daemon.intake.experiences.list() if e.completion_id == by_name["id"]]
    assert kept.gen == 0  # a captured chat records the generation that answered it
    with client.stream("POST", "/v1/chat/completions", json=ask | {"model": "evolution@0", "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    assert {c["model"] for c in chunks} == {"evolution-gen-0000"}
    assert daemon.older.loads == 1  # loaded once, then reused
    # the served generation by name is the served model itself: nothing more is loaded
    assert client.post("/v1/chat/completions", json=ask | {"model": "evolution@1"}).json()["model"] == \
        "evolution-gen-0001" and daemon.older.loaded() == [0]
    assert client.get("/v1/models/evolution@0").json()["generation"] == 0
    assert client.get("/v1/models/evolution@9").status_code == 404
    # generation 0 by name answers as generation 0 served does (temperature 0)
    assert client.post("/rollback", json={"to": 0}, headers=AUTH).status_code == 200
    served = client.post("/v1/chat/completions", json=ask).json()
    assert served["choices"][0]["message"]["content"] == by_name["choices"][0]["message"]["content"]


def test_asking_a_generation_that_cannot_answer_by_name_is_a_clear_error(client, daemon):
    daemon.ledger.record(ev.generation_created(5, 1, "tiny", "c" * 64, None))
    daemon.ledger.record(ev.gate_result(1, 5, {"recall": 0.1}, {"min_recall": 0.5}, "fail", reasons=["recall"]))
    for model, status, fragment in [("evolution@7", 404, "not in the ledger"), ("evolution@5", 404, "failed its gate"),
                                    ("evolution@x", 400, "put a generation number after '@'"),
                                    ("evolution-deacon@0", 404, "serves lineage 'main'")]:
        r = client.post("/v1/chat/completions", json=ASK | {"model": model})
        assert r.status_code == status and fragment in r.json()["error"]["message"], (model, r.text)
        assert r.json()["error"]["param"] == "model"
    gguf = daemon.root.gen_dir(0) / "model.gguf"
    make_tree_writable(daemon.root.gen_dir(0))
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(data))
    r = client.post("/v1/chat/completions", json=ASK | {"model": "evolution@0"})
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"]
    assert daemon.host.current.gen == 1 and daemon.older.loaded() == []
    assert client.post("/v1/chat/completions", json=ASK).status_code == 200  # the served model never noticed
    daemon.dcfg.older_max = 0
    r = client.post("/v1/chat/completions", json=ASK | {"model": "evolution@0"})
    assert r.status_code == 404 and "older_max = 0" in r.json()["error"]["message"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["evolution-gen-0001"]


# -- ModelHost -------------------------------------------------------------------------------------


def test_older_generations_keep_a_bounded_set_and_let_the_least_recently_used_go(daemon):
    from evolution.serving import OlderGenerations

    hosts = []

    def make():
        hosts.append(daemon.host.sibling())
        return hosts[-1]

    older = OlderGenerations(make, most=1, memory_mb=1024)
    first = older.load(0, *_gguf(daemon, 0))
    held = threading.Event()
    release = threading.Event()

    def slow(slot):
        held.set()
        release.wait(10)
        return slot.model.chat({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})

    in_flight = threading.Thread(target=lambda: first.call(slow))
    in_flight.start()
    held.wait(10)
    second = threading.Thread(target=lambda: older.load(1, *_gguf(daemon, 1)))  # loads on the same llama thread
    second.start()
    time.sleep(0.2)
    release.set()
    in_flight.join(10)
    second.join(30)
    assert older.loaded() == [1] and first.current is None  # generation 0 let go once its request ended
    assert older.get(1) is hosts[1] and older.get(0) is None
    path, sha = _gguf(daemon, 0)
    too_small = OlderGenerations(make, most=2, memory_mb=path.stat().st_size / 2**20 / 2)
    with pytest.raises(LoadError, match="older_memory_mb"):
        too_small.load(0, path, sha)
    two = OlderGenerations(make, most=2, memory_mb=2 * path.stat().st_size / 2**20 * 1.01)
    two.load(0, path, sha)
    two.load(1, *_gguf(daemon, 1))
    assert two.loaded() == [0, 1]
    two.get(0)  # used: generation 1 is now the least recently used
    assert two.loaded() == [1, 0]
    older.close()
    two.close()


def _gguf(daemon, gen: int):
    path = daemon.root.gen_dir(gen) / "model.gguf"
    return path, sha256_file(path)


def test_load_refuses_a_wrong_hash_and_a_truncated_file(daemon, tmp_path):
    host = ModelHost(n_ctx=256)
    path, sha = _gguf(daemon, 1)
    with pytest.raises(IntegrityError, match="ledger recorded"):
        host.load(1, path, "0" * 64)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(LoadError, match="could not load"):
        host.load(1, cut, sha256_file(cut))
    assert host.current is None


def test_swap_lets_the_request_in_flight_finish_on_the_old_model(daemon):
    host = daemon.host
    old = host.current
    path, sha = _gguf(daemon, 0)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def in_flight(slot):
        entered.set()
        release.wait(10)
        return slot.gen, slot.model.chat(dict(messages=ASK["messages"], max_tokens=4))

    t = threading.Thread(target=lambda: seen.update(r=host.call(in_flight)))
    t.start()
    entered.wait(10)
    loading = threading.Thread(target=lambda: seen.update(new=host.load(0, path, sha)))
    loading.start()  # queued behind the request on the llama thread
    time.sleep(0.3)
    release.set()
    loading.join(30)
    host.swap(seen["new"])
    t.join(30)
    assert seen["r"][0] == 1 and seen["r"][1]["choices"][0]["message"]["content"] is not None
    assert old.retired and old.users == 0
    assert host.call(lambda slot: slot.gen) == 0  # new requests reach the new model


def test_a_failed_age_up_is_retried_and_the_daemon_recovers_on_its_own(daemon):



    sft = Path(daemon.cfg.curriculum.path) / "phase1_identity" / "sft.jsonl"
    good = sft.read_text()
    sft.write_text(good + "{broken json\n")  # the operator's edit breaks the curriculum after the start
    daemon.dcfg.retry_after_s, daemon.dcfg.threshold = 0.2, 1
    daemon.intake.karma.threshold = 1
    try:
        assert daemon.add_karma(1, "good answer", None).triggered is not None

        tick_until(daemon, lambda: daemon.intake.karma.requests()[-1].attempts == 1, "the first attempt to fail", 240)
        req = daemon.intake.karma.requests()[-1]
        assert req.status == "pending" and "sft.jsonl:" in req.outcome  # the error names the line
        assert daemon.host.current.gen == 1  # the parent kept serving
    finally:
        sft.write_text(good)  # space freed / file fixed: the next attempt succeeds without anyone
    tick_until(daemon, lambda: daemon.intake.karma.requests()[-1].status == "done", "the retry to finish", 240)
    assert daemon.host.current.gen == 2 and daemon.ledger.served_generation() == 2


def test_a_client_that_hangs_up_mid_stream_does_not_block_the_model(daemon):
    import httpx

    with serving(daemon) as url:
        long = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 400,
                "temperature": 1.0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one chunk, then hang up
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=ASK, timeout=30)
        assert r.status_code == 200 and time.perf_counter() - t0 < 10
        deadline = time.time() + 10
        while daemon.host.current.users and time.time() < deadline:
            time.sleep(0.05)
        assert daemon.host.current.users == 0  # the abandoned stream let go of the model


def test_a_model_freed_after_a_swap_hands_its_heap_back_to_the_os(daemon, monkeypatch):
    """glibc keeps a freed llama.cpp context's buffers in its heap; the host trims it when it frees a model
    (bench/memory_bench.py measures what that keeps off the daemon's resident memory over many swaps)."""
    import platform

    from evolution import serving

    if platform.libc_ver()[0] == "glibc":
        assert serving._TRIM is not None  # found on the machines the daemon runs on
    trims = []
    monkeypatch.setattr(serving, "_TRIM", lambda pad: trims.append(pad) or 1)
    old = daemon.host.current
    path, sha = _gguf(daemon, 0)
    daemon.host.swap(daemon.host.load(0, path, sha))
    assert daemon.host.call(lambda slot: slot.gen) == 0  # behind the old model's close on the llama thread
    assert old.retired and trims == [0]

"""Concurrency at full scale: 8 writer processes × 1,000 karma grants, chat during repeated swaps, and
8 clients rating while 8 chat clients chat (each chat captured once, each rating and its karma recorded once).

Writers are separate processes (what several agents, the CLI and the daemon are), each with
its own connections; on SQLite they contend for the database file's lock. The total must come
out exact and no writer may see "database is locked". PostgreSQL too when
``EVOLUTION_TEST_PG_URL`` is set (``tests/ledger/conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import text

from evolution.intake.karma import Karma
from evolution.ledger import KARMA_THRESHOLD_CROSSED, Ledger
from evolution.ledger import events as ev
from tests.conftest import SERVER_TOKEN
from tests.daemon_util import Chatter, serving
from tests.ledger.conftest import backend, data_root, ledger_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

WRITERS, GRANTS, THRESHOLD = 8, 1000, 1000
WRITER = """
import sys, time
from pathlib import Path
from evolution.intake.karma import Karma
from evolution.ledger import Ledger
from evolution.paths import DataRoot

i, grants, threshold, url, go = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
with Ledger.open(DataRoot.from_env(), url or None) as ledger:
    karma = Karma(ledger, threshold=threshold)
    (go.parent / f"ready-{i}").touch()
    while not go.exists():
        time.sleep(0.005)
    for j in range(grants):
        karma.add(1, reason=f"writer {i}", key=f"w{i}-{j}", source="test")
"""


def test_8_writer_processes_x_1000_grants_give_the_exact_total(data_root, ledger_url, tmp_path, tally):  # noqa: F811
    area = "concurrency · karma 8 × 1,000" + (" (PostgreSQL)" if ledger_url else " (SQLite)")
    Ledger.open(data_root, ledger_url).close()  # created and migrated once, before the race
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(GRANTS), str(THRESHOLD), ledger_url or "",
                               str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"EVOLUTION_HOME": str(data_root.root)}) for i in range(WRITERS)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < WRITERS and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.perf_counter()
    go.touch()
    outs = [p.communicate(timeout=900) for p in procs]
    wall = time.perf_counter() - t0
    errors = [err for p, (_, err) in zip(procs, outs) if p.returncode != 0 or err.strip()]
    with Ledger.open(data_root, ledger_url) as led:
        karma = Karma(led, threshold=THRESHOLD)
        total = karma.state().total
        tally.trial(area)
        tally.lost(area, int(WRITERS * GRANTS - total))
        assert errors == [], errors[0][-2000:]  # in particular no "database is locked"
        assert total == WRITERS * GRANTS
        assert len(karma.requests()) == 1 and len(led.entries(kind=KARMA_THRESHOLD_CROSSED)) == 1
        report = led.verify()
        assert report.ok, report.problems
    print(f"{WRITERS * GRANTS} grants by {WRITERS} processes in {wall:.1f} s")


SWAPS, CLIENTS = 12, 8


def test_many_chat_clients_during_repeated_swaps_never_fail(daemon, tally):
    import httpx

    area = f"concurrency · {CLIENTS} chat clients × {SWAPS} swaps"
    with serving(daemon) as url:
        with Chatter(url, CLIENTS, pause=0.02, max_tokens=6) as chat:
            for k in range(SWAPS):
                to = 0 if k % 2 == 0 else 1  # 1 is served: 0, 1, 0, 1, ...
                r = httpx.post(url + "/rollback", json={"to": to, "reason": f"swap {k}"}, timeout=60,
                               headers={"Authorization": f"Bearer {SERVER_TOKEN}"})
                assert r.status_code == 200, r.text
                after = chat.client.chat.completions.create(model="evolution", max_tokens=2,
                                                            messages=[{"role": "user", "content": "Hi"}])
                assert after.model == f"evolution-gen-{to:04d}"  # new requests reach the new model at once
                tally.trial(area)
                time.sleep(0.3)
        tally.lost(area, len(chat.failures))
        assert chat.failures == [], chat.failures[:3]
        assert set(chat.models) == {"evolution-gen-0000", "evolution-gen-0001"}
        assert len(chat.models) > 4 * SWAPS
        print(f"{len(chat.models)} replies to {CLIENTS} clients during {SWAPS} swaps, none failed")
        assert daemon.host.swaps == SWAPS and daemon.host.current.users == 0
        assert len(daemon.ledger.entries(kind=ev.ROLLED_BACK)) == SWAPS
        assert daemon.ledger.served_generation() == daemon.host.current.gen == 1
        assert daemon.ledger.verify().ok


RATERS, RATINGS, CHATTERS, POOL = 8, 25, 8, 16


def _wait(cond, what: str, timeout: float = 60) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_8_raters_while_8_chat_clients_chat_record_each_rating_and_capture_once(daemon, tally):
    """Ratings with karma and idempotency keys (every third one retried, as after a lost reply) against
    completions kept before, while plain and streaming chats are captured: both write the same database."""
    import httpx
    import openai

    area = f"concurrency · {RATERS} raters × {RATINGS} ratings, {CHATTERS} chat clients"
    auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
    msgs = [{"role": "user", "content": "What is your name?"}]
    with serving(daemon) as url:
        oc = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
        pool = [oc.chat.completions.create(model="evolution", messages=msgs, max_tokens=4).id for _ in range(POOL)]
        convs = [httpx.post(url + "/conversations", headers=auth, timeout=30, json={"messages": msgs + [
            {"role": "assistant", "content": f"I am {k}."}]}).json()["id"] for k in range(4)]
        _wait(lambda: daemon.intake.experiences.counts()["experiences"] == POOL, "the pool to be kept")

        stop, failures, served, answers = threading.Event(), [], [], {}

        def chat(i: int) -> None:
            while not stop.is_set():
                try:
                    if i % 2:
                        chunks = list(oc.chat.completions.create(model="evolution", messages=msgs, max_tokens=6,
                                                                 stream=True))
                        assert chunks and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                        served.append(chunks[0].id)
                    else:
                        r = oc.chat.completions.create(model="evolution", messages=msgs, max_tokens=6)
                        assert r.choices[0].message.content
                        served.append(r.id)
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    failures.append(f"chat {i}: {exc!r}")
                stop.wait(0.02)

        def rate(i: int) -> None:
            with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
                for j in range(RATINGS):
                    key = f"r{i}-{j}"
                    target = ({"conversation_id": convs[j % len(convs)]} if j % 5 == 4
                              else {"completion_id": pool[(i * RATINGS + j) % POOL]})
                    body = target | {"label": ("good", "bad")[j % 2], "karma": 1 + j % 3}
                    try:
                        r = c.post("/feedback", json=body | {"idempotency_key": key})
                        assert r.status_code == 201 and not r.json()["duplicate"], r.text
                        answers[key] = (r.json()["id"], body["karma"])
                        if j % 3 == 0:  # the reply was lost: the client sends it again, key in the header
                            again = c.post("/feedback", json=body, headers={"Idempotency-Key": key})
                            assert again.status_code == 200 and again.json()["duplicate"], again.text
                            assert again.json()["id"] == r.json()["id"], (again.text, r.text)
                    except Exception as exc:  # noqa: BLE001
                        failures.append(f"rating {key}: {exc!r}")

        chatters = [threading.Thread(target=chat, args=(i,)) for i in range(CHATTERS)]
        raters = [threading.Thread(target=rate, args=(i,)) for i in range(RATERS)]
        t0 = time.perf_counter()
        for t in chatters + raters:
            t.start()
        for t in raters:
            t.join(600)
        stop.set()
        for t in chatters:
            t.join(60)
        wall = time.perf_counter() - t0
        # A chat is captured after its reply went out: give the last ones a moment.
        _wait(lambda: daemon.intake.experiences.counts()["experiences"] >= POOL + len(served), "the last captures")
    tally.trial(area)
    with daemon.ledger.reading() as conn:
        kept = dict(conn.execute(text("SELECT completion_id, COUNT(*) FROM experiences GROUP BY completion_id")).all())
        ratings = dict(conn.execute(text("SELECT idem_key, COUNT(*) FROM experience_ratings GROUP BY idem_key")).all())
        grants = conn.execute(text("SELECT COUNT(*) FROM karma_events WHERE source = 'feedback'")).scalar_one()
    total = daemon.intake.karma.state().total
    expected = sum(k for _, k in answers.values())
    lost = (RATERS * RATINGS - len(ratings)) + sum(kept.get(cid, 0) != 1 for cid in pool + served) \
        + int(total != expected)
    tally.lost(area, lost)
    assert failures == [], failures[:5]
    assert len(answers) == len(ratings) == grants == RATERS * RATINGS and set(ratings.values()) == {1}
    assert total == expected == sum(1 + j % 3 for j in range(RATINGS)) * RATERS  # exact, to the unit
    assert len(served) == len(set(served)) and all(kept.get(cid) == 1 for cid in pool + served)
    assert sum(kept.values()) == POOL + len(served)
    assert daemon.intake.experiences.counts()["capture_failures"] == 0
    for by, items in (("completion", pool), ("conversation", convs)):  # each item holds exactly its ratings
        want = {}
        for i in range(RATERS):
            for j in range(RATINGS):
                if (by == "conversation") == (j % 5 == 4):
                    item = convs[j % len(convs)] if by == "conversation" else pool[(i * RATINGS + j) % POOL]
                    want[item] = want.get(item, 0) + 1
        assert {it: len(daemon.intake.experiences.history(it, by)) for it in items} == want
    report = daemon.ledger.verify()
    assert report.ok, report.problems
    print(f"{RATERS * RATINGS} ratings (+{sum(j % 3 == 0 for j in range(RATINGS)) * RATERS} retries) and "
          f"{len(served)} chats in {wall:.1f} s, none failed")

"""Experiences: capture (scrubbed, bounded, never raising into a chat), rating (labels, corrections,
history, idempotency, karma in the same transaction, errors that change nothing), labelled
conversations, the m004 migration on an existing ledger, and `evolve experiences` / `evolve feedback`.

Each store test runs on SQLite and, when ``EVOLUTION_TEST_PG_URL`` is set, on PostgreSQL.
"""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from evolution.intake import experiences as exp_mod
from evolution.cli import main
from evolution.config import ConfigError, DaemonConfig, resolve_daemon, validate_daemon
from evolution.intake.conversations import ConversationError, ConversationStore
from evolution.errors import ExperienceError, ExperienceKeyReused, IdempotencyConflict, UnknownExperience
from evolution.intake.experiences import ExperienceStore
from evolution.intake.karma import Karma, KarmaError
from evolution.ledger import KARMA_THRESHOLD_CROSSED, Ledger
from evolution.ledger import migrations
from tests.ledger.conftest import backend, data_root, ledger_url  # noqa: F401  (fixtures)

EMAIL = "alice.smith@example.com"
API_KEY = "sk-proj-AbC123dEf456GhI789jKl012MnO345pQr"
PASSWORD = "Hunter2!x"
SHA = "ab" * 32


def U(content):
    return {"role": "user", "content": content}


def A(content):
    return {"role": "assistant", "content": content}


@pytest.fixture
def led(data_root, ledger_url):  # noqa: F811
    led = Ledger.open(data_root, ledger_url)
    yield led
    led.close()


@pytest.fixture
def karma(led):
    return Karma(led, threshold=10)


@pytest.fixture
def store(led, karma):
    return ExperienceStore(led, karma=karma)


def capture(store, n: int | str, question: str = "What is the capital of France?", reply: str = "Paris.") -> int:
    return store.capture([U(f"{question} ({n})")], reply, f"chatcmpl-{n}", "evolution-gen-1", SHA, 1, "stop", False)


def rows(led, table: str) -> list[dict]:
    with led.reading() as conn:
        return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]


def snapshot(led) -> dict:
    return {t: rows(led, t) for t in ("experiences", "experience_ratings", "karma_events", "ageup_requests",
                                      "conversations")} | {"ledger": len(led.entries())}


# -- capture -----------------------------------------------------------------------------------


def test_capture_keeps_the_chat_scrubbed(led, store, data_root):  # noqa: F811
    msgs = [{"role": "system", "content": "You are Wren."},
            U(f"Mail me at {EMAIL}; my key is {API_KEY}"),
            {"role": "user", "content": [{"type": "text", "text": f"and my password is {PASSWORD}"},
                                         {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]
    eid = store.capture(msgs, f"I will write to {EMAIL}.", "chatcmpl-abc123", "evolution-gen-3", SHA, 3, "length",
                        True)
    (row,) = rows(led, "experiences")
    assert row["id"] == eid and row["completion_id"] == "chatcmpl-abc123"
    assert (row["model_id"], row["sha256"], row["gen"], row["finish_reason"], bool(row["cut_off"])) == \
        ("evolution-gen-3", SHA, 3, "length", True)
    assert row["rating_id"] is None and row["time"].endswith("+00:00")
    dump = repr(rows(led, "experiences"))
    for secret in (EMAIL, API_KEY, PASSWORD, "Hunter2", "alice.smith"):
        assert secret not in dump
    assert json.loads(row["messages"]) == [
        {"role": "system", "content": "You are Wren."},
        U("Mail me at [REDACTED:email]; my key is [REDACTED:api_key]"),
        U("and my password is [REDACTED:password]")]
    assert row["reply"] == "I will write to [REDACTED:email]."
    assert json.loads(row["redactions"]) == {"email": 2, "api_key": 1, "password": 1}
    if led.engine.url.get_backend_name() == "sqlite":  # nor in the files on disk (database and write-ahead log)
        raw = b"".join(p.read_bytes() for p in data_root.ledger_dir.glob("ledger.db*"))
        for secret in (EMAIL, API_KEY, PASSWORD):
            assert secret.encode() not in raw
    (e,) = store.list()
    assert (e.id, e.completion_id, e.gen, e.cut_off, e.label, e.corrected) == (eid, "chatcmpl-abc123", 3, True,
                                                                                None, False)


def test_capture_is_bounded_and_evicts_the_oldest_unrated_first(led, karma):
    store = ExperienceStore(led, karma=karma, capture_max=3)
    ids = [capture(store, i) for i in range(3)]
    store.rate("chatcmpl-0", "good")
    store.rate("chatcmpl-2", "bad", correction="Paris is the capital.")
    capture(store, 3)  # over the bound: 1 is the oldest unrated
    assert [e.completion_id for e in store.list()] == ["chatcmpl-3", "chatcmpl-2", "chatcmpl-0"]
    new = capture(store, 4)  # 3 is the only unrated one left
    assert [e.id for e in store.list()] == [new, ids[2], ids[0]]
    assert store.counts() | {"last_capture_failure": None} == {
        "experiences": 3, "good": 1, "bad": 1, "unrated": 1, "corrected": 1, "labelled_conversations": 0,
        "ratings": 2, "capture_max": 3, "capture_failures": 0, "last_capture_failure": None}


def test_a_full_store_makes_room_for_the_next_hundredth(led):
    store = ExperienceStore(led, capture_max=200)
    for i in range(201):
        capture(store, i)
    assert store.counts()["experiences"] == 198  # 1 over, and 2 (1 %) more: not a DELETE at every chat
    assert store.list(limit=1000)[-1].completion_id == "chatcmpl-3"
    capture(store, 201), capture(store, 202)
    assert store.counts()["experiences"] == 200


def test_when_every_kept_experience_is_rated_the_oldest_rated_goes(led, karma, caplog):
    store = ExperienceStore(led, karma=karma, capture_max=2)
    capture(store, 0), capture(store, 1)
    store.rate("chatcmpl-0", "good")
    store.rate("chatcmpl-1", "bad")
    with caplog.at_level(logging.WARNING, logger="evolution.intake.experiences"):
        capture(store, 2)
    assert [e.completion_id for e in store.list()] == ["chatcmpl-2", "chatcmpl-1"]
    assert [r["item_id"] for r in rows(led, "experience_ratings")] == [store.list()[1].id]  # its history went too
    assert "capture_max" in caplog.text
    with pytest.raises(UnknownExperience):
        store.rate("chatcmpl-0", "bad")


def test_capture_safely_counts_failures_and_never_raises(led, store, caplog):
    with caplog.at_level(logging.WARNING, logger="evolution.intake.experiences"):
        assert store.capture_safely("not a list", "r", "chatcmpl-x", "m", SHA, 1, "stop", False) is None
        first = capture(store, 1)
        assert store.capture_safely([U("again")], "r", "chatcmpl-1", "m", SHA, 1, "stop", False) is None  # id reused
    assert store.failures == 2 and store.last_failure.startswith("LedgerError")
    assert store.counts()["capture_failures"] == 2
    assert caplog.text.count("could not capture") == 2
    assert [e.id for e in store.list()] == [first]
    assert store.capture_safely([U("fine")], "ok", "chatcmpl-2", "m", SHA, 1, "stop", False) is not None
    assert store.failures == 2


def test_capture_safely_when_the_database_is_locked(data_root, monkeypatch):  # noqa: F811
    import sqlite3

    from evolution.ledger import store as store_mod

    monkeypatch.setattr(store_mod, "SQLITE_BUSY_TIMEOUT_MS", 50)
    with Ledger.open(data_root) as led:
        store = ExperienceStore(led)
        blocker = sqlite3.connect(data_root.ledger_dir / "ledger.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            assert store.capture_safely([U("hi")], "hello", "chatcmpl-l", "m", SHA, 1, "stop", False) is None
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.failures == 1 and "locked" in store.last_failure
        assert store.capture_safely([U("hi")], "hello", "chatcmpl-l", "m", SHA, 1, "stop", False) is not None


# -- rating ------------------------------------------------------------------------------------


def test_good_bad_and_correction_feed_the_training_queries(led, store):
    for i in range(4):
        capture(store, i)
    g = store.rate("chatcmpl-0", "good")
    assert (g.by, g.completion_id, g.label, g.corrected, g.previous, g.duplicate, g.karma) == \
        ("completion", "chatcmpl-0", "good", False, None, False, None)
    store.rate("chatcmpl-1", "bad")
    c = store.rate(store.list()[-3].id, "bad", correction=f"Paris, of course. Write to {EMAIL}.")  # by number
    assert c.completion_id == "chatcmpl-2" and c.corrected
    got = store.labelled()
    assert [(e.item, e.label, e.reply) for e in got.examples] == [
        (f"completion:{g.item}", "good", "Paris."), (f"completion:{g.item + 1}", "bad", "Paris.")]
    assert got.examples[0].prompt == [U("What is the capital of France? (0)")]
    (pair,) = got.pairs
    assert (pair.chosen, pair.rejected, pair.label) == ("Paris, of course. Write to [REDACTED:email].", "Paris.", "bad")
    assert pair.sft == [U("What is the capital of France? (2)"), A(pair.chosen)]
    assert got.through == c.id
    assert EMAIL not in repr(rows(led, "experience_ratings"))
    assert store.labelled(since=got.through) == exp_mod.Labelled([], [], got.through)
    assert [e.label for e in store.list(label="none")] == [None]
    assert [e.completion_id for e in store.list(label="bad")] == ["chatcmpl-2", "chatcmpl-1"]
    assert [e.completion_id for e in store.list(label="good", limit=1)] == ["chatcmpl-0"]


def test_a_newer_label_replaces_the_older_and_both_are_kept(led, store):
    capture(store, 0)
    first = store.rate("chatcmpl-0", "good")
    second = store.rate("chatcmpl-0", "bad", correction="Paris is the capital of France.")
    third = store.rate("chatcmpl-0", "bad")
    assert (second.previous, third.previous) == ("good", "bad")
    assert [(h["label"], h["correction"] is not None) for h in store.history("chatcmpl-0")] == \
        [("good", False), ("bad", True), ("bad", False)]
    got = store.labelled()
    assert [(e.label, e.rating_id) for e in got.examples] == [("bad", third.id)] and got.pairs == []
    assert store.labelled(since=first.id).examples[0].rating_id == third.id  # relabelled after the cursor: offered again
    assert store.counts()["ratings"] == 3


def test_idempotency_key_same_body_is_a_no_op_another_body_conflicts(led, store, karma):
    capture(store, 0)
    first = store.rate("chatcmpl-0", "bad", correction="Paris.", karma=3, idempotency_key="fb-1")
    before = snapshot(led)
    again = store.rate("chatcmpl-0", "bad", correction="Paris.", karma=3, idempotency_key="fb-1")
    assert again.duplicate and not first.duplicate
    assert again.to_dict() | {"duplicate": False} == first.to_dict()
    assert snapshot(led) == before and karma.state().total == 3
    for other in (dict(label="good"), dict(label="bad", correction="Lyon."), dict(label="bad", correction="Paris."),
                  dict(label="bad", correction="Paris.", karma=4)):
        with pytest.raises(ExperienceKeyReused, match="fb-1") as info:
            store.rate("chatcmpl-0", **other, idempotency_key="fb-1")
        assert isinstance(info.value, IdempotencyConflict) and isinstance(info.value, ExperienceError)
    assert snapshot(led) == before


def test_unknown_ids_raise_unknown_experience_and_change_nothing(led, store):
    capture(store, 0)
    before = snapshot(led)
    for item, by in (("chatcmpl-nope", "completion"), (999, "completion"), ("999", "completion"),
                     (5, "conversation"), ("5", "conversation")):
        with pytest.raises(UnknownExperience) as info:
            store.rate(item, "good", by=by, karma=1)
        assert str(item) in str(info.value)
    assert snapshot(led) == before


@pytest.mark.parametrize("kwargs, needle", [
    (dict(label="meh"), "label must be 'good' or 'bad'"),
    (dict(label=None), "label must be"),
    (dict(label="good", by="reply"), "by must be 'completion' or 'conversation'"),
    (dict(label="good", correction=""), "correction must be"),
    (dict(label="good", correction=42), "correction must be"),
    (dict(label="bad", correction="x" * (exp_mod.MAX_CORRECTION_CHARS + 1)), "the limit is"),
    (dict(label="good", karma=-1), "greater than 0"),
    (dict(label="good", karma="5"), "must be a number"),
    (dict(label="good", karma=float("nan")), "finite"),
    (dict(label="good", idempotency_key=""), "idempotency key"),
    (dict(label="good", by="conversation"), "conversation id"),
], ids=["label", "no-label", "by", "empty-correction", "int-correction", "long-correction", "negative-karma",
        "string-karma", "nan-karma", "empty-key", "completion-id-as-conversation"])
def test_bad_fields_raise_experience_error_and_change_nothing(led, store, kwargs, needle):
    capture(store, 0)
    before = snapshot(led)
    with pytest.raises(ExperienceError, match=needle) as info:
        store.rate("chatcmpl-0", **kwargs)
    assert not isinstance(info.value, (UnknownExperience, IdempotencyConflict))
    assert snapshot(led) == before


def test_karma_is_granted_in_the_same_transaction(led, store, karma):
    capture(store, 0), capture(store, 1)
    r = store.rate("chatcmpl-0", "good", karma=4, served_gen=1)
    assert r.karma == 4 and r.grant_id is not None and r.triggered is None
    (grant,) = rows(led, "karma_events")
    assert (grant["id"], grant["amount"], grant["source"]) == (r.grant_id, 4.0, "feedback")
    crossing = store.rate("chatcmpl-1", "good", karma=6, served_gen=1)
    assert crossing.triggered is not None and crossing.triggered.grant_id == crossing.grant_id
    assert [e.gen for e in led.entries(kind=KARMA_THRESHOLD_CROSSED)] == [1]
    assert karma.state().total == 10


def test_a_failing_karma_grant_leaves_no_rating_and_a_failing_rating_no_karma(led, store, karma, monkeypatch):
    capture(store, 0)
    before = snapshot(led)

    def broken_grant(*a, **k):
        raise KarmaError("karma store broke")

    monkeypatch.setattr(Karma, "grant", broken_grant)
    with pytest.raises(ExperienceError, match="karma store broke"):
        store.rate("chatcmpl-0", "good", karma=2)
    assert snapshot(led) == before
    monkeypatch.undo()

    def broken_record(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(exp_mod, "record_rating", broken_record)
    with pytest.raises(RuntimeError):
        store.rate("chatcmpl-0", "good", karma=2)
    assert snapshot(led) == before and karma.state().total == 0


def test_karma_needs_a_store_opened_with_karma(led):
    store = ExperienceStore(led)
    capture(store, 0)
    with pytest.raises(ExperienceError, match="without karma"):
        store.rate("chatcmpl-0", "good", karma=1)
    assert store.rate("chatcmpl-0", "good").label == "good"


def test_capture_max_must_be_positive(led):
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ExperienceError, match="capture_max"):
            ExperienceStore(led, capture_max=bad)


# -- conversations -----------------------------------------------------------------------------


def test_conversations_carry_a_label_and_can_be_rated(led, store):
    convs = ConversationStore(led)
    plain = convs.add([U("hi"), A("hello")]).id
    bad = convs.add([U("Where do you live?"), A("On the moon."), U("really?")], key="c-1", label="bad").id
    good = convs.add([U("Your name?"), A("Wren."), U("Thanks"), A("Any time.")], label="good").id
    assert convs.add([U("Where do you live?"), A("On the moon.")], key="c-1", label="bad").duplicate
    with pytest.raises(ConversationError, match="c-1"):
        convs.add([U("Where do you live?"), A("On the moon.")], key="c-1", label="good")
    with pytest.raises(ConversationError, match="label must be 'good' or 'bad'"):
        convs.add([U("hi"), A("hello")], label="fine")
    assert [c for c, _ in convs.after(0)] == [plain, good]  # a bad transcript is not SFT data

    got = store.labelled()
    assert [(e.item, e.label, e.reply) for e in got.examples] == [
        (f"conversation:{bad}", "bad", "On the moon."), (f"conversation:{good}", "good", "Any time.")]
    assert got.examples[1].prompt == [U("Your name?"), A("Wren."), U("Thanks")]
    assert [h["label"] for h in store.history(bad, by="conversation")] == ["bad"]

    r = store.rate(bad, "bad", correction="By the sea.", by="conversation")
    assert (r.by, r.item, r.previous, r.completion_id) == ("conversation", bad, "bad", None)
    (pair,) = store.labelled(since=got.through).pairs
    assert (pair.item, pair.chosen, pair.rejected) == (f"conversation:{bad}", "By the sea.", "On the moon.")
    store.rate(str(bad), "good", by="conversation")
    assert [c for c, _ in convs.after(0)] == [plain, bad, good]
    store.rate(plain, "bad", by="conversation")
    assert [c for c, _ in convs.after(0)] == [bad, good]
    assert store.counts()["labelled_conversations"] == 3
    assert [(h["label"], h["source"]) for h in store.history(bad, by="conversation")] == \
        [("bad", "intake"), ("bad", "http"), ("good", "http")]


# -- migration ---------------------------------------------------------------------------------


def test_m004_upgrades_a_ledger_created_at_version_3(data_root, ledger_url, monkeypatch):  # noqa: F811
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:3])
    monkeypatch.setattr(migrations, "LATEST", 3)
    with Ledger.open(data_root, ledger_url) as led:
        with led.transaction() as txn:  # a transcript as m003's code stored it
            txn.conn.execute(text("INSERT INTO conversations (time, idem_key, messages, redactions, sha256)"
                                  " VALUES ('t', 'k', :m, '{}', :h)"), {"m": json.dumps([U("hi"), A("yo")]), "h": SHA})
        with led.reading() as conn:
            assert conn.execute(text("SELECT MAX(version) FROM ledger_schema")).scalar_one() == 3
    monkeypatch.undo()
    with Ledger.open(data_root, ledger_url) as led:
        with led.reading() as conn:
            assert conn.execute(text("SELECT MAX(version) FROM ledger_schema")).scalar_one() == migrations.LATEST
        convs = ConversationStore(led)
        assert convs.after(0) == [(1, [U("hi"), A("yo")])]
        store = ExperienceStore(led)
        assert store.rate(1, "good", by="conversation").previous is None
        capture(store, 0)
        assert store.counts()["experiences"] == 1


# -- config ------------------------------------------------------------------------------------


def test_daemon_config_capture_fields(tmp_path):
    d = DaemonConfig()
    assert d.capture is True and d.capture_max == 10_000
    validate_daemon(d)
    cfg = tmp_path / "evolution.toml"
    cfg.write_text("[daemon]\ncapture = false\ncapture_max = 50\n")
    d = resolve_daemon(cfg)
    assert (d.capture, d.capture_max) == (False, 50)
    cfg.write_text('[daemon]\ncapture = "yes"\ncapture_max = 0\n')
    with pytest.raises(ConfigError) as info:
        resolve_daemon(cfg)
    assert len(info.value.problems) == 2
    assert "daemon.capture must be true or false" in str(info.value) and "daemon.capture_max" in str(info.value)


# -- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def evolve(ledger_url):  # noqa: F811
    runner = CliRunner()
    env = {"EVOLUTION_LEDGER_URL": ledger_url} if ledger_url else {}

    def run(*args: str):
        return runner.invoke(main, list(args), env=env, catch_exceptions=False)

    return run


def test_cli_experiences_and_feedback(led, evolve):
    out = evolve("experiences")
    assert out.exit_code == 0 and "no experiences kept" in out.output
    store = ExperienceStore(led)
    for i in range(3):
        capture(store, i, reply=f"Paris is the capital, reply {i}.")
    out = evolve("experiences")
    assert out.exit_code == 0, out.output
    assert "chatcmpl-2" in out.output and "What is the capital" in out.output and "Paris is the capital" in out.output
    assert out.output.index("chatcmpl-2") < out.output.index("chatcmpl-0")  # newest first

    out = evolve("feedback", "chatcmpl-1", "bad", "--correction", "Paris.", "--karma", "2")
    assert out.exit_code == 0, out.output
    assert "rated completion chatcmpl-1" in out.output and "bad" in out.output and "granted 2 karma" in out.output
    out = evolve("feedback", "chatcmpl-1", "good")
    assert "replaces bad" in out.output
    out = evolve("feedback", str(store.list()[0].id), "good", "--key", "k1", "--json")
    assert json.loads(out.output)["completion_id"] == "chatcmpl-2"
    out = evolve("feedback", str(store.list()[0].id), "good", "--key", "k1")
    assert "nothing changed" in out.output

    data = json.loads(evolve("experiences", "--json", "--label", "good").output)
    assert [e["completion_id"] for e in data] == ["chatcmpl-2", "chatcmpl-1"]
    assert data[0]["messages"] == [U("What is the capital of France? (2)")]
    data = json.loads(evolve("experiences", "--json", "--label", "none").output)
    assert [e["completion_id"] for e in data] == ["chatcmpl-0"]
    assert len(json.loads(evolve("experiences", "--json", "--limit", "1").output)) == 1

    conv = ConversationStore(led).add([U("hi"), A("hello")]).id
    out = evolve("feedback", f"conv-{conv}", "bad")
    assert out.exit_code == 0 and f"rated conversation {conv} bad" in out.output
    assert "experiences:      3 kept (2 good, 0 bad, 1 unrated); 1 labelled conversations" in evolve("status").output
    assert json.loads(evolve("status", "--json").output)["experiences"]["good"] == 2


def test_cli_feedback_errors_exit_non_zero_with_the_message(led, evolve):
    out = evolve("feedback", "chatcmpl-missing", "good")
    assert out.exit_code == 1 and "no served completion 'chatcmpl-missing' is kept" in out.output
    out = evolve("feedback", "conv-7", "good")
    assert out.exit_code == 1 and "no conversation" in out.output
    out = evolve("feedback", "conv-x", "good")
    assert out.exit_code == 1 and "conversation id" in out.output
    out = evolve("feedback", "chatcmpl-1", "meh")
    assert out.exit_code == 2 and "'meh' is not one of 'good', 'bad'" in out.output
    out = evolve("experiences", "--label", "meh")
    assert out.exit_code == 2
    capture(ExperienceStore(led), 1)
    out = evolve("feedback", "chatcmpl-1", "good", "--karma", "-5")
    assert out.exit_code == 1 and "greater than 0" in out.output
    assert ExperienceStore(led).counts()["ratings"] == 0


def test_the_inbox_of_an_age_up_holds_what_came_since_the_parents_cursors(led):
    from evolution.intake import Intake

    intake = Intake(led)
    first = intake.conversations.add([U("Where do I live?"), A("In Faro.")]).id
    later = intake.conversations.add([U("What is my dog called?"), A("Pip.")]).id
    capture(intake.experiences, 1)
    capture(intake.experiences, 2)
    old = intake.experiences.rate("chatcmpl-1", "bad").id
    new = intake.experiences.rate("chatcmpl-2", "good").id
    intake.probes.add("Where do I live now?", ["Faro"])
    inbox = intake.inbox(conversations_since=first, ratings_since=old)
    assert [cid for cid, _ in inbox.conversations] == [later]
    assert [e.rating_id for e in inbox.examples] == [new] and inbox.pairs == []
    assert [reply for _, reply in inbox.not_to_imitate] == ["Paris."]  # rated bad before the cursor: still banned
    assert inbox.probes == ["Where do I live now?"]
    assert (inbox.conversations_since, inbox.ratings_since, inbox.ratings_through) == (first, old, new)

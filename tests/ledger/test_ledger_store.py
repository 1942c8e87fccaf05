"""Appending, reading back, migrations, and the database refusing UPDATE / DELETE (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from evolution.errors import LedgerError
from evolution.ledger import Ledger, events
from evolution.ledger.chain import GENESIS, canonical_json, entry_hash
from evolution.ledger.head import read_head
from evolution.ledger.migrations import LATEST, MIGRATIONS


def test_append_chains_entries_and_exports_head(ledger):
    a = ledger.record(events.generation_created(0, None, "base", "c0", "m0"))
    b = ledger.record(events.promoted(0))
    assert (a.seq, a.prev_hash) == (1, GENESIS)
    assert (b.seq, b.prev_hash) == (2, a.entry_hash)
    assert b.entry_hash == entry_hash(a.entry_hash, 2, b.time, "promoted", 0, {})
    assert [e.seq for e in ledger.entries()] == [1, 2]
    assert ledger.entries()[1] == b
    head = read_head(ledger.head_path)
    assert (head.seq, head.entry_hash) == (2, b.entry_hash)


def test_payload_round_trips_exactly(ledger):
    payload = {"losses": [2.5, 1.0000000000000002, 1e-12], "name": "généra", "nested": {"b": None, "a": True}}
    e = ledger.append(events.TRAINING_FINISHED, 1, {"steps": 3, **payload})
    back = ledger.entries()[0]
    assert back.payload == e.payload
    assert canonical_json(back.payload) == canonical_json(e.payload)


@pytest.mark.parametrize(
    "kind, gen, payload, message",
    [
        ("promote", 1, {}, "unknown event kind"),
        (events.GATE_RESULT, 1, {"parent": 0}, "lacks child"),
        (events.GATE_RESULT, 1, {"parent": 0, "child": 1, "metrics": {}, "thresholds": {}, "verdict": "ok"}, "verdict"),
        (events.PROMOTED, None, {}, "must name its generation"),
        (events.PROMOTED, -1, {}, "non-negative"),
        (events.TRAINING_FINISHED, 1, {"steps": 1, "losses": [float("nan")]}, "plain JSON"),
        (events.TRAINING_FINISHED, 1, {"steps": 1, "losses": object()}, "plain JSON"),
        (events.EXPORTED, 1, {"artifacts": [{"path": "/abs/x.gguf", "sha256": "0", "size": 1, "kind": "gguf"}],
                              "quantization": "q8_0"}, "relative"),
    ],
)
def test_append_refuses_malformed_events(ledger, kind, gen, payload, message):
    with pytest.raises(LedgerError, match=message):
        ledger.append(kind, gen, payload)
    assert ledger.entries() == []


@pytest.mark.parametrize("sql", [
    "UPDATE ledger_entries SET payload = '{}' WHERE seq = 1",
    "DELETE FROM ledger_entries WHERE seq = 1",
    "DELETE FROM ledger_entries",
    "UPDATE ledger_schema SET version = 99",
    "DELETE FROM ledger_schema",
])
def test_database_refuses_update_and_delete(ledger, sql):
    ledger.record(events.generation_created(0, None, "base", "c0", "m0"))
    with pytest.raises(sa.exc.DatabaseError, match="append-only"):
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql(sql)
    assert len(ledger.entries()) == 1
    assert ledger.verify().ok


def test_postgresql_refuses_truncate(ledger, backend):
    if backend != "postgresql":
        pytest.skip("TRUNCATE is PostgreSQL's")
    ledger.record(events.promoted(0))
    with pytest.raises(sa.exc.DatabaseError, match="append-only"):
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE ledger_entries")
    assert len(ledger.entries()) == 1


def test_sqlite_runs_wal_full_sync_and_busy_timeout(data_root):
    with Ledger.open(data_root) as led, led.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    assert (data_root.ledger_dir / "ledger.db").is_file()


def test_sqlite_writers_begin_immediate(data_root):
    with Ledger.open(data_root) as led:
        seen = []
        sa.event.listen(led.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        led.record(events.promoted(0))
        led.entries()
    assert seen[0] == "BEGIN IMMEDIATE"  # the append takes the write lock up front
    assert seen.count("BEGIN IMMEDIATE") == 1 and "BEGIN" in seen  # readers do not


def test_url_comes_from_the_environment(data_root, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("EVOLUTION_LEDGER_URL", url)
    with Ledger.open(data_root) as led:
        led.record(events.promoted(0))
    assert (tmp_path / "elsewhere.db").is_file()
    assert not (data_root.ledger_dir / "ledger.db").exists()
    assert not (data_root.ledger_dir / "HEAD.json").exists()  # another ledger keeps another head


def test_bad_url_is_a_clear_error(data_root):
    with pytest.raises(LedgerError, match="invalid ledger URL"):
        Ledger.open(data_root, "not a url")


def test_reopen_keeps_entries_and_schema_version(data_root, ledger_url):
    with Ledger.open(data_root, ledger_url) as led:
        led.record(events.promoted(0))
    with Ledger.open(data_root, ledger_url) as led:
        assert [e.kind for e in led.entries()] == ["promoted"]
        with led.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT version, name, checksum FROM ledger_schema ORDER BY version").all()
    assert [(v, n, c) for v, n, c in rows] == [(m.version, m.name, m.checksum) for m in MIGRATIONS]


def test_newer_schema_version_is_refused(ledger, data_root, ledger_url, tamper):
    tamper(f"INSERT INTO ledger_schema (version, name, checksum, applied_at) VALUES ({LATEST + 1}, 'm999', 'x', 'now')")
    with pytest.raises(LedgerError, match=f"schema version {LATEST + 1}, newer .* upgrade evolution"):
        Ledger.open(data_root, ledger_url)


# A released migration is never edited: add m00N (and its line here) instead. If this fails, revert your edit.
PINNED_CHECKSUMS = {
    1: "1033dd952c9b1e820b3e36481333019f316f026dbc0fbfca4b56947e08a5de3e",  # m001_entries
    2: "8d4c91fca72ebb318e53be9a581416fa7b054e22971c4d9bb0b40bc7ddc67895",  # m002_append_only
    3: "4151aa0acd7130fdea1388aef57bbe699b5a121b867244ff09b68bb7524e2fea",  # m003_daemon
    4: "ac47381f12781dc7f2bf0ae232962c8339909a477c28c87ca41a382a0339fd4e",  # m004_experiences
    5: "409f65c2fcbf1002ef2abb91c02ab2e40f1b4c74f26631f20f8dbf02bbd4ef67",  # m005_probes
    6: "87a811140e67a1f466a98c0d7584be65b933a88e0c7b8c3c89bf04759fce7253",  # m006_lineages
    7: "5080a6af5e9b012de0b7b9426c065fdecd8e43e5cef1b9d667ce301fe70f1260",  # m007_tasks
}


def test_migrations_are_numbered_and_never_edited():
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert all(m.name.startswith(f"m{m.version:03d}_") for m in MIGRATIONS)
    checksums = {m.version: m.checksum for m in MIGRATIONS}
    assert checksums == PINNED_CHECKSUMS, "a released migration changed: add a new numbered migration instead"


def test_served_generation_follows_promotions_and_rollbacks(ledger):
    assert ledger.served_generation() is None
    ledger.record(events.promoted(0))
    ledger.record(events.promoted(1))
    assert ledger.served_generation() == 1
    ledger.record(events.rolled_back(1, 0, "bad answers"))
    assert ledger.served_generation() == 0
    ledger.record(events.rejected(2, "failed gate"))
    assert ledger.served_generation() == 0


def test_history_and_generation_views(lineage):
    rows = {r.gen: r for r in lineage.history()}
    assert [rows[g].status for g in range(4)] == ["promoted", "promoted", "rejected", "promoted"]
    assert [rows[g].served for g in range(4)] == [False, False, False, True]
    assert [rows[g].verdict for g in range(4)] == [None, "pass", "fail", "pass"]
    assert rows[3].parent == 1 and rows[3].gguf_sha256 and rows[3].metrics["recall"] == pytest.approx(0.65)
    d = lineage.generation(3)
    assert d.lineage == [3, 1, 0]
    assert (d.base, d.config_hash, d.manifest_hash) == ("SmolLM2-135M-Instruct", "cfg3", "man3")
    assert d.config == {"lr": 1e-4, "gen": 3} and d.manifest == {"files": ["conv3.jsonl"]}
    assert d.training["steps"] == 30 and d.gate["verdict"] == "pass"
    assert d.artifacts[0]["path"] == "checkpoints/gen_0003/model.gguf"
    assert [e.kind for e in d.events] == [
        "generation_created", "training_started", "training_finished", "exported", "gate_result", "promoted"]
    with pytest.raises(LedgerError, match="generation 9 is not in the ledger"):
        lineage.generation(9)


def test_karma_events_have_no_generation(ledger):
    e = ledger.record(events.karma_threshold_crossed(120, 100))
    assert e.gen is None and ledger.history() == []

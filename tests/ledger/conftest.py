"""Fixtures for the ledger tests: a temp data root, each test on SQLite and (when
``EVOLUTION_TEST_PG_URL`` is set) on PostgreSQL in a schema of its own, a raw-connection
``tamper`` that bypasses the append-only triggers as an attacker with file access would, and
a small lineage with real files on disk.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from evolution.ledger import Ledger, events
from evolution.paths import DataRoot

PG_ENV = "EVOLUTION_TEST_PG_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    if request.param == "postgresql" and not os.environ.get(PG_ENV):
        pytest.skip(f"set {PG_ENV} to run the PostgreSQL variant (.ci/postgres.sh prints one)")
    return request.param


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> DataRoot:
    root = DataRoot(tmp_path / "home")  # the suite's autouse fixture may have made it already
    root.root.mkdir(exist_ok=True)
    monkeypatch.setenv("EVOLUTION_HOME", str(root.root))
    monkeypatch.delenv("EVOLUTION_LEDGER_URL", raising=False)
    return root


def _pg_base() -> sa.URL:
    url = sa.make_url(os.environ[PG_ENV])
    return url.set(drivername="postgresql+psycopg") if url.drivername in ("postgresql", "postgres") else url


@pytest.fixture
def ledger_url(backend, data_root):
    """None (the default SQLite file) or a PostgreSQL URL whose search_path is a fresh schema."""
    if backend == "sqlite":
        yield None
        return
    schema = f"ledger_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(_pg_base())
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield _pg_base().update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def ledger(data_root, ledger_url):
    led = Ledger.open(data_root, ledger_url)
    yield led
    led.close()


def tamper_sqlite(db: Path, *statements: str) -> None:
    """Run ``statements`` on the SQLite ledger ``db`` as someone with the file would: append-only triggers dropped."""
    con = sqlite3.connect(db)
    for name in ("ledger_entries_no_update", "ledger_entries_no_delete",
                 "ledger_schema_no_update", "ledger_schema_no_delete"):
        con.execute(f"DROP TRIGGER IF EXISTS {name}")
    for s in statements:
        con.execute(s)
    con.commit()
    con.close()


@pytest.fixture
def tamper(backend, data_root, ledger_url):
    """``tamper(*sql)``: run statements on a raw DBAPI connection with the triggers out of the way."""

    def run(*statements: str) -> None:
        if backend == "sqlite":
            tamper_sqlite(data_root.ledger_dir / "ledger.db", *statements)
            return
        import psycopg

        url = sa.make_url(ledger_url)
        schema = url.query["options"].split("=", 1)[1]
        with psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                             dbname=url.database) as con:
            con.execute(f'SET search_path TO "{schema}"')
            con.execute("ALTER TABLE ledger_entries DISABLE TRIGGER USER")
            con.execute("ALTER TABLE ledger_schema DISABLE TRIGGER USER")
            for s in statements:
                con.execute(s)
            con.execute("ALTER TABLE ledger_entries ENABLE TRIGGER USER")
            con.execute("ALTER TABLE ledger_schema ENABLE TRIGGER USER")

    return run


def write_gguf(data_root: DataRoot, gen: int, content: bytes) -> Path:
    """A stand-in GGUF (and its sha256sum sidecar) in the generation's directory."""
    d = data_root.gen_dir(gen)
    d.mkdir(parents=True, exist_ok=True)
    p = d / "model.gguf"
    p.write_bytes(content)
    (d / "model.gguf.sha256").write_text(f"{hashlib.sha256(content).hexdigest()}  model.gguf\n")
    return p


def add_generation(led: Ledger, data_root: DataRoot, gen: int, parent: int | None, verdict: str | None,
                   metrics: dict | None = None) -> None:
    """Record a generation's life: created, trained, exported, gated and promoted or rejected."""
    led.record(events.generation_created(gen, parent, "SmolLM2-135M-Instruct", f"cfg{gen}", f"man{gen}",
                                         config={"lr": 1e-4, "gen": gen}, manifest={"files": [f"conv{gen}.jsonl"]}))
    if gen > 0:
        led.record(events.training_started(gen))
        led.record(events.training_finished(gen, steps=10 * gen, losses={"sft": [2.0, 1.5]}))
    gguf = write_gguf(data_root, gen, f"gguf of generation {gen}".encode())
    led.record(events.exported(gen, [events.artifact(data_root, gguf, "gguf")], quantization="q8_0"))
    if gen == 0:
        led.record(events.promoted(0))
        return
    metrics = metrics or {"recall": 0.5 + gen / 20, "generalization": 0.6, "style_drift": 0.1}
    led.record(events.gate_result(parent, gen, metrics, {"recall": 0.5, "style_drift": 0.2}, verdict,
                                  parent_metrics={"recall": 0.5}))
    if verdict == "pass":
        led.record(events.promoted(gen))
    else:
        led.record(events.rejected(gen, reason="recall fell below the threshold"))


@pytest.fixture
def gguf_writer(data_root):
    """``gguf_writer(gen, content)``: put a stand-in GGUF into that generation's directory."""
    return lambda gen, content: write_gguf(data_root, gen, content)


@pytest.fixture
def lineage(ledger, data_root) -> Ledger:
    """Generations 0 (base, served first), 1 (passed), 2 (rejected), 3 (passed, served)."""
    add_generation(ledger, data_root, 0, None, None)
    add_generation(ledger, data_root, 1, 0, "pass")
    add_generation(ledger, data_root, 2, 1, "fail", {"recall": 0.3, "generalization": 0.5, "style_drift": 0.4})
    add_generation(ledger, data_root, 3, 1, "pass")
    return ledger

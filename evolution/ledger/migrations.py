"""Numbered schema migrations of the ledger database, and the code that applies them.

Rules (as in simonw/llm's ``migrations.py``): a migration, once released, is never edited —
add ``m00N`` instead. ``ledger_schema`` records each applied version with a checksum of its
SQL; a database whose version is newer than this code knows is refused, so an old
``evolve`` never writes into a ledger it does not understand.

Each migration holds SQL per dialect (``sqlite``, ``postgresql``) and a ``default`` for any
other SQLAlchemy dialect. Migrations run under the same write lock appends take (SQLite
``BEGIN IMMEDIATE``; a PostgreSQL advisory lock), so concurrent first opens are safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.engine import Connection

from evolution.errors import LedgerError

log = logging.getLogger(__name__)

#: Key of the PostgreSQL advisory lock that serializes ledger writers and migrations.
PG_LOCK_KEY = 0x65766F6C  # "evol"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: dict[str, tuple[str, ...]]

    def statements(self, dialect: str) -> tuple[str, ...]:
        return self.sql.get(dialect, self.sql["default"])

    @property
    def checksum(self) -> str:
        return hashlib.sha256(json.dumps(self.sql, sort_keys=True).encode()).hexdigest()


_ENTRIES_COLUMNS = """
    time VARCHAR(40) NOT NULL,
    kind VARCHAR(64) NOT NULL,
    gen INTEGER,
    payload TEXT NOT NULL,
    prev_hash CHAR(64) NOT NULL,
    entry_hash CHAR(64) NOT NULL UNIQUE,
    CHECK (seq >= 1)
"""

m001_entries = Migration(
    1,
    "m001_entries",
    {
        "sqlite": (
            f"CREATE TABLE ledger_entries (seq INTEGER PRIMARY KEY, {_ENTRIES_COLUMNS})",
            "CREATE INDEX ledger_entries_gen ON ledger_entries (gen)",
            "CREATE INDEX ledger_entries_kind ON ledger_entries (kind)",
        ),
        "default": (
            f"CREATE TABLE ledger_entries (seq BIGINT PRIMARY KEY, {_ENTRIES_COLUMNS})",
            "CREATE INDEX ledger_entries_gen ON ledger_entries (gen)",
            "CREATE INDEX ledger_entries_kind ON ledger_entries (kind)",
        ),
    },
)

m002_append_only = Migration(
    2,
    "m002_append_only",
    {
        "sqlite": tuple(
            f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: {op} on {table} refused'); END"
            for table in ("ledger_entries", "ledger_schema")
            for op in ("UPDATE", "DELETE")
        ),
        "postgresql": (
            """CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
        MESSAGE = 'the ledger is append-only: ' || TG_OP || ' on ' || TG_TABLE_NAME || ' refused';
END
$$""",
            *(
                f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()"
                for table in ("ledger_entries", "ledger_schema")
            ),
            *(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change()"
                for table in ("ledger_entries", "ledger_schema")
            ),
            # no '%' anywhere: DBAPI drivers would read it as a placeholder
            "REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries, ledger_schema FROM PUBLIC",
        ),
        "default": (),
    },
)

_ID = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "default": "BIGSERIAL PRIMARY KEY"}


def _m003(dialect: str) -> tuple[str, ...]:
    pk = _ID.get(dialect, _ID["default"])
    return (
        # Every karma grant; ``idem_key`` makes a retried request count once.
        f"CREATE TABLE karma_events (id {pk}, time VARCHAR(40) NOT NULL, amount DOUBLE PRECISION NOT NULL,"
        " reason TEXT NOT NULL, idem_key VARCHAR(200) UNIQUE, source VARCHAR(40) NOT NULL)",
        # One row per threshold crossing: the age-up it asks for, and what became of it.
        f"CREATE TABLE ageup_requests (id {pk}, time VARCHAR(40) NOT NULL, karma DOUBLE PRECISION NOT NULL,"
        " threshold DOUBLE PRECISION NOT NULL, status VARCHAR(20) NOT NULL, gen INTEGER,"
        " finished_time VARCHAR(40), outcome TEXT, grant_id BIGINT, attempts INTEGER NOT NULL DEFAULT 0,"
        " not_before DOUBLE PRECISION)",
        # Finished chat transcripts, already scrubbed; ``id`` orders them (recency).
        f"CREATE TABLE conversations (id {pk}, time VARCHAR(40) NOT NULL, idem_key VARCHAR(200) UNIQUE,"
        " messages TEXT NOT NULL, redactions TEXT NOT NULL, sha256 CHAR(64) NOT NULL)",
    )


m003_daemon = Migration(
    3,
    "m003_daemon",
    {"sqlite": _m003("sqlite"), "postgresql": _m003("postgresql"), "default": _m003("default")},
)


def _m004(dialect: str) -> tuple[str, ...]:
    pk = _ID.get(dialect, _ID["default"])
    return (
        # Served chats, scrubbed; ``rating_id``: the newest row of experience_ratings about it (None: unrated).
        f"CREATE TABLE experiences (id {pk}, time VARCHAR(40) NOT NULL, completion_id VARCHAR(200) NOT NULL UNIQUE,"
        " model_id VARCHAR(200) NOT NULL, sha256 VARCHAR(64), gen INTEGER, finish_reason VARCHAR(40),"
        " cut_off INTEGER NOT NULL, messages TEXT NOT NULL, reply TEXT NOT NULL, redactions TEXT NOT NULL,"
        " rating_id BIGINT)",
        # Every label ever given to a served completion or a posted conversation (the history; the newest counts).
        f"CREATE TABLE experience_ratings (id {pk}, time VARCHAR(40) NOT NULL, item_kind VARCHAR(16) NOT NULL,"
        " item_id BIGINT NOT NULL, label VARCHAR(8) NOT NULL, correction TEXT, redactions TEXT NOT NULL,"
        " karma DOUBLE PRECISION, grant_id BIGINT, idem_key VARCHAR(200) UNIQUE, body_sha256 CHAR(64) NOT NULL,"
        " source VARCHAR(40) NOT NULL,"
        " CHECK (item_kind IN ('completion', 'conversation')), CHECK (label IN ('good', 'bad')))",
        "CREATE INDEX experience_ratings_item ON experience_ratings (item_kind, item_id)",
        # A transcript may arrive labelled; ``label`` is as posted, ``rating_id`` the newest label (as above).
        "ALTER TABLE conversations ADD COLUMN label VARCHAR(8)",
        "ALTER TABLE conversations ADD COLUMN rating_id BIGINT",
    )


m004_experiences = Migration(
    4,
    "m004_experiences",
    {"sqlite": _m004("sqlite"), "postgresql": _m004("postgresql"), "default": _m004("default")},
)

def _m005(dialect: str) -> tuple[str, ...]:
    pk = _ID.get(dialect, _ID["default"])
    return (
        # Questions the agent posts to check a taught fact in other words: asked by every later gate,
        # never trained on. Scrubbed like transcripts; ``idem_key`` makes a retried post count once.
        f"CREATE TABLE probes (id {pk}, time VARCHAR(40) NOT NULL, idem_key VARCHAR(200) UNIQUE,"
        " question TEXT NOT NULL, answers TEXT NOT NULL, redactions TEXT NOT NULL, sha256 CHAR(64) NOT NULL)",
    )


m005_probes = Migration(
    5,
    "m005_probes",
    {"sqlite": _m005("sqlite"), "postgresql": _m005("postgresql"), "default": _m005("default")},
)

#: Tables that belong to one lineage (m006): every row names it; rows from before lineages are ``main``'s.
LINEAGE_TABLES = ("ledger_entries", "karma_events", "ageup_requests", "conversations", "experiences",
                  "experience_ratings", "probes")


def _m006(dialect: str) -> tuple[str, ...]:
    # ADD COLUMN with a constant default touches no row (no UPDATE trigger fires, PostgreSQL rewrites
    # nothing): existing rows read back as lineage 'main', which is how their hashes were computed.
    return (
        *(f"ALTER TABLE {t} ADD COLUMN lineage VARCHAR(40) NOT NULL DEFAULT 'main'" for t in LINEAGE_TABLES),
        "CREATE INDEX ledger_entries_lineage ON ledger_entries (lineage, kind)",
        "CREATE INDEX karma_events_lineage ON karma_events (lineage)",
        "CREATE INDEX ageup_requests_lineage ON ageup_requests (lineage, status)",
    )


m006_lineages = Migration(
    6,
    "m006_lineages",
    {"sqlite": _m006("sqlite"), "postgresql": _m006("postgresql"), "default": _m006("default")},
)

#: Tables whose rows may belong to a task (m007): ``task`` NULL is the lineage's own row, else the task's
#: (``[tasks]``): trained into that task's adapter, never into the lineage's generations.
TASK_TABLES = ("conversations", "experiences", "probes")


def _m007(dialect: str) -> tuple[str, ...]:
    # A nullable column with no default touches no row: every row before tasks is the lineage's own.
    return tuple(f"ALTER TABLE {t} ADD COLUMN task VARCHAR(40)" for t in TASK_TABLES)


m007_tasks = Migration(
    7,
    "m007_tasks",
    {"sqlite": _m007("sqlite"), "postgresql": _m007("postgresql"), "default": _m007("default")},
)

MIGRATIONS: tuple[Migration, ...] = (m001_entries, m002_append_only, m003_daemon, m004_experiences, m005_probes,
                                     m006_lineages, m007_tasks)
LATEST = MIGRATIONS[-1].version

_BOOTSTRAP = (
    "CREATE TABLE IF NOT EXISTS ledger_schema ("
    " version INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL,"
    " checksum CHAR(64) NOT NULL, applied_at VARCHAR(40) NOT NULL)"
)


def lock_for_write(conn: Connection) -> None:
    """Serialize writers inside the current transaction (SQLite already holds BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})


def current_version(conn: Connection) -> int:
    return conn.execute(text("SELECT COALESCE(MAX(version), 0) FROM ledger_schema")).scalar_one()


def migrate(conn: Connection) -> int:
    """Bring the schema up to ``LATEST`` inside the caller's write transaction; return the version."""
    dialect = conn.dialect.name
    lock_for_write(conn)
    conn.exec_driver_sql(_BOOTSTRAP)
    version = current_version(conn)
    if version > LATEST:
        raise LedgerError(
            f"the ledger database is at schema version {version}, newer than this evolution knows ({LATEST}); "
            "upgrade evolution before using this ledger"
        )
    if dialect not in ("sqlite", "postgresql") and version < m002_append_only.version:
        log.warning("dialect %s: the database itself cannot refuse UPDATE/DELETE; "
                    "only the hash chain protects the ledger", dialect)
    for m in MIGRATIONS:
        if m.version <= version:
            continue
        log.debug("ledger: applying migration %s", m.name)
        for stmt in m.statements(dialect):
            conn.exec_driver_sql(stmt)
        conn.execute(
            text("INSERT INTO ledger_schema (version, name, checksum, applied_at) VALUES (:v, :n, :c, :t)"),
            {"v": m.version, "n": m.name, "c": m.checksum, "t": datetime.now(timezone.utc).isoformat()},
        )
        version = m.version
    return version

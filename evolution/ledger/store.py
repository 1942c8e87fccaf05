"""The ledger store: open a database by SQLAlchemy URL, append chained entries, read them back.

Only ``append`` writes, and it only INSERTs. On SQLite every connection runs with WAL,
``synchronous=FULL`` and a busy timeout, and a write transaction starts with ``BEGIN
IMMEDIATE`` so that concurrent writers queue instead of failing; on PostgreSQL writers take a
transaction-scoped advisory lock. Inside that lock an append reads the last entry, chains onto
it and inserts ``seq + 1``, so seqs are gap-free and the chain is linear under any concurrency.

A ``Ledger`` is opened for one lineage (its data root's, ``main`` unless named): it stamps that
lineage on what it appends and reads back only that lineage's entries. The chain, the seqs and
the exported head are shared by every lineage of the database (``raw_rows`` and ``verify`` see
them all); ``Ledger.lineages`` and ``Ledger.view`` reach the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from evolution import faults
from evolution.errors import DiskFull, IntegrityError, LedgerError, UnknownGeneration
from evolution.fsutil import free_space, is_disk_full, nearly_full
from evolution.ledger import events as ev
from evolution.ledger.chain import GENESIS, canonical_json, entry_hash
from evolution.ledger.entry import Entry
from evolution.ledger.head import HEAD_NAME, Head, write_head
from evolution.ledger.lineage import GenerationDetail, GenerationRow, detail, summarize
from evolution.ledger.migrations import lock_for_write, migrate
from evolution.ledger.verify import VerifyReport, verify
from evolution.paths import MAIN, DataRoot, check_lineage

log = logging.getLogger(__name__)

URL_ENV = "EVOLUTION_LEDGER_URL"
DB_NAME = "ledger.db"
SQLITE_BUSY_TIMEOUT_MS = 60_000


def _resolve_url(data_root: DataRoot, url: str | None) -> tuple[URL, bool]:
    """The URL to open and whether it is the default SQLite file under the data root."""
    raw = url or os.environ.get(URL_ENV) or None
    if raw is None:
        return make_url(f"sqlite:///{data_root.ledger_dir / DB_NAME}"), True
    try:
        parsed = make_url(raw)
    except ArgumentError as exc:
        raise LedgerError(
            f"invalid ledger URL {raw!r}: {exc}; pass a SQLAlchemy URL such as postgresql://user@host/db"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we depend on
    return parsed, False


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event below issues BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("ledger: SQLite journal_mode is %s, not WAL (in-memory database?)", mode)
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("ledger_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


_SELECT = "SELECT seq, time, kind, gen, payload, prev_hash, entry_hash, lineage FROM ledger_entries"


class Transaction:
    """A write transaction on the ledger database (``Ledger.transaction``); ``conn`` runs other SQL in it."""

    def __init__(self, ledger: "Ledger", conn: Connection):
        self.ledger = ledger
        self.conn = conn
        self.last: Entry | None = None

    def append(self, kind: str, gen: int | None, payload: dict) -> Entry:
        ev.validate(kind, gen, payload)
        body = canonical_json(payload)
        payload = json.loads(body)  # hash exactly what a reader will load back
        last = self.conn.execute(text("SELECT seq, entry_hash FROM ledger_entries ORDER BY seq DESC LIMIT 1")).first()
        seq, prev = (last.seq + 1, last.entry_hash) if last else (1, GENESIS)
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        lineage = self.ledger.lineage
        digest = entry_hash(prev, seq, now, kind, gen, payload, lineage)
        self.conn.execute(
            text(
                "INSERT INTO ledger_entries (seq, time, kind, gen, payload, prev_hash, entry_hash, lineage)"
                " VALUES (:seq, :time, :kind, :gen, :payload, :prev, :hash, :lineage)"
            ),
            {"seq": seq, "time": now, "kind": kind, "gen": gen, "payload": body, "prev": prev, "hash": digest,
             "lineage": lineage},
        )
        faults.point("ledger_append")
        log.debug("ledger: appended seq %d %s %s gen=%s", seq, lineage, kind, gen)
        self.last = Entry(seq, now, kind, gen, payload, prev, digest, lineage)
        return self.last

    def record(self, event: ev.Event) -> Entry:
        return self.append(event.kind, event.gen, event.payload)


class Ledger:
    """An open ledger. Use ``Ledger.open``; close it (or use ``with``) when done."""

    def __init__(self, engine: Engine, data_root: DataRoot, head_path: Path, display_url: str):
        self.engine = engine
        self.data_root = data_root
        self.head_path = head_path
        self.url = display_url
        self._owner = True  # False for a ``view``: the engine is its opener's to dispose

    @property
    def lineage(self) -> str:
        """The lineage this ledger appends to and reads (its data root's)."""
        return self.data_root.lineage

    def view(self, lineage: str) -> "Ledger":
        """The same open database seen as lineage ``lineage`` (closing the view leaves this one open)."""
        other = Ledger(self.engine, self.data_root.for_lineage(check_lineage(lineage)), self.head_path, self.url)
        other._owner = False
        return other

    def lineages(self) -> list[str]:
        """Every lineage with an entry in the ledger, ``main`` first, then by name."""
        with self._read() as conn:
            names = {r[0] for r in conn.execute(text("SELECT DISTINCT lineage FROM ledger_entries"))}
        return sorted(names, key=lambda n: (n != MAIN, n))

    @classmethod
    def open(cls, data_root: DataRoot, url: str | None = None) -> "Ledger":
        """Open (creating and migrating if needed) the ledger of ``data_root``.

        ``url``: any SQLAlchemy URL; default ``$EVOLUTION_LEDGER_URL``, else SQLite at
        ``<data_root>/ledger/ledger.db``.
        """
        parsed, is_default = _resolve_url(data_root, url)
        display = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite":
            db = parsed.database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            _sqlite_setup(engine)
        else:
            try:
                engine = create_engine(parsed, pool_pre_ping=True)
            except (ImportError, NoSuchModuleError) as exc:  # unknown dialect or DBAPI driver not installed
                raise LedgerError(
                    f"cannot use ledger URL {display}: {exc}; install its driver (PostgreSQL: psycopg[binary])"
                ) from exc
        head_name = HEAD_NAME if is_default else f"HEAD-{hashlib.sha256(display.encode()).hexdigest()[:12]}.json"
        ledger = cls(engine, data_root, data_root.ledger_dir / head_name, display)
        try:
            with ledger._write() as conn:
                migrate(conn)
        except DBAPIError as exc:
            engine.dispose()
            db = Path(parsed.database or ".").parent if parsed.get_backend_name() == "sqlite" else None
            if is_disk_full(exc) or (db is not None and nearly_full(db, below=1 << 20)):
                # SQLite cannot make its WAL files on a full disk and says only "disk I/O error"
                raise DiskFull(f"the disk is full: cannot open the ledger at {display} ({exc.orig}); "
                               f"{free_space(db) if db else 'on the database server'}. Free some space and try "
                               "again: nothing was changed") from exc
            raise LedgerError(f"cannot open the ledger at {display}: {exc.orig}") from exc
        except BaseException:
            engine.dispose()
            raise
        return ledger

    def close(self) -> None:
        if self._owner:
            self.engine.dispose()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    def reading(self):
        """A read transaction on the ledger database (for the tables beside the ledger)."""
        return self._read()

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """One write transaction under the ledger's write lock.

        Tables that live beside the ledger (karma, conversations) change in the same transaction
        as the ledger event that records why, so a crash never keeps one without the other.
        """
        try:
            with self._write() as conn:
                lock_for_write(conn)
                txn = Transaction(self, conn)
                yield txn
        except (DBAPIError, OSError) as exc:
            detail = exc.orig if isinstance(exc, DBAPIError) else exc
            if is_disk_full(exc):
                where = (free_space(Path(self.engine.url.database).parent)
                         if self.engine.url.get_backend_name() == "sqlite" else "on the database server")
                raise DiskFull(f"the disk is full: could not write to the ledger at {self.url} ({detail}); nothing "
                               f"was recorded. Free some space ({where}) and try again") from exc
            if isinstance(exc, OSError):
                raise
            raise LedgerError(f"could not write to the ledger database at {self.url}: {detail}") from exc
        if txn.last is not None:
            try:
                faults.point("ledger_commit")
                write_head(self.head_path, Head(seq=txn.last.seq, entry_hash=txn.last.entry_hash, ledger=self.url))
            except OSError as exc:  # committed: failing now would make a caller retry what is recorded
                log.warning("ledger: seq %d is committed but the exported head %s could not be updated (%s); "
                            "it lags behind, which verify accepts", txn.last.seq, self.head_path, exc)

    def append(self, kind: str, gen: int | None, payload: dict) -> Entry:
        """Append one event, chained onto the current last entry; return the stored entry."""
        with self.transaction() as txn:
            return txn.append(kind, gen, payload)

    def export_head(self) -> Head | None:
        """Write the head file for the current last entry (``verify --write-head``; normally ``append`` does it)."""
        with self._read() as conn:
            row = conn.execute(text(_SELECT + " ORDER BY seq DESC LIMIT 1")).first()
        if row is None:
            return None
        last = Entry.from_row(row)
        head = Head(seq=last.seq, entry_hash=last.entry_hash, ledger=self.url)
        write_head(self.head_path, head)
        return head

    def record(self, event: ev.Event) -> Entry:
        """Append an event built by one of ``evolution.ledger.events``' helpers."""
        return self.append(event.kind, event.gen, event.payload)

    # -- reading ---------------------------------------------------------------------------

    def entries(self, *, gen: int | None = None, kind: str | None = None, since: int = 0) -> list[Entry]:
        """This lineage's entries in seq order, optionally only those filed under ``gen`` / of ``kind`` / after
        seq ``since``."""
        sql, params = _SELECT + " WHERE lineage = :lineage AND seq > :since", {"since": since, "lineage": self.lineage}
        if gen is not None:
            sql, params["gen"] = sql + " AND gen = :gen", gen
        if kind is not None:
            sql, params["kind"] = sql + " AND kind = :kind", kind
        with self._read() as conn:
            return [Entry.from_row(r) for r in conn.execute(text(sql + " ORDER BY seq"), params)]

    def raw_rows(self) -> list:
        """Every row of every lineage as stored (payload as text), in seq order — what ``verify`` checks."""
        with self._read() as conn:
            return conn.execute(text(_SELECT + " ORDER BY seq")).all()

    def last(self) -> Entry | None:
        """This lineage's last entry."""
        with self._read() as conn:
            row = conn.execute(text(_SELECT + " WHERE lineage = :l ORDER BY seq DESC LIMIT 1"),
                               {"l": self.lineage}).first()
        return Entry.from_row(row) if row else None

    def served_generation(self) -> int | None:
        """The generation to serve: the target of the latest ``promoted`` or ``rolled_back`` event."""
        with self._read() as conn:
            row = conn.execute(
                text("SELECT gen FROM ledger_entries WHERE lineage = :l AND kind IN (:p, :r) ORDER BY seq DESC LIMIT 1"),
                {"p": ev.PROMOTED, "r": ev.ROLLED_BACK, "l": self.lineage},
            ).first()
        return None if row is None else row.gen

    def history(self) -> list[GenerationRow]:
        """One summary per generation, ascending: parent, status, verdict, metrics, GGUF hash, served."""
        return summarize(self.entries())

    def generation(self, n: int) -> GenerationDetail:
        """Everything about generation ``n``; ``LedgerError`` if the ledger does not know it."""
        try:
            return detail(self.entries(), n)
        except UnknownGeneration as exc:
            if self.lineage == MAIN:
                raise
            raise UnknownGeneration(f"lineage {self.lineage}: {exc}") from None

    def verify(self, *, artifacts: bool = True, head: Path | None = None) -> VerifyReport:
        """Recompute the chain, check the exported head and re-hash artifacts on disk."""
        return verify(self.raw_rows, self.data_root, head or self.head_path, artifacts=artifacts)

    def check_history(self) -> None:
        """Raise ``IntegrityError`` unless the hash chain and the exported head verify.

        Called before anything is served, rolled back to or trained from on the ledger's word: an
        entry edited to name another file's SHA-256 would otherwise pass the file's own hash check.
        (Artifacts are not re-hashed here; each one is hashed where it is used.)
        """
        report = self.verify(artifacts=False)
        if report.ok:
            return
        first = report.problems[0]
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        where = f"seq {first.seq}: " if first.seq is not None else ""
        raise IntegrityError(
            f"the ledger at {self.url} does not verify: {where}{first.message}{more}. Nothing is served, rolled back "
            "to or trained from a ledger whose history was changed; `evolve ledger verify` shows every problem; "
            f"restore the ledger (and {self.head_path}) from a backup"
        )

"""The intake's tables as one lineage sees them: the one place their lineage filter is written.

Every intake table (``karma_events``, ``ageup_requests``, ``conversations``, ``experiences``,
``experience_ratings``, ``probes``) holds the rows of every lineage of the ledger's database, each
naming its own (the ``lineage`` column, migration m006). A store reads a table through ``of``: the
table as its ledger's lineage sees it, a subquery of that lineage's rows that SQLite and PostgreSQL
fold into the query around it; it stamps the rows it inserts with ``:lin`` and names the rows an
UPDATE changes with ``MINE``. ``run`` binds ``:lin`` to the lineage for every statement.

Lookups by a key that is unique across lineages (an idempotency key, a grant id, a row id found
through a lineage's own rows) read the table itself: a key another lineage used is refused by name.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection, CursorResult

from evolution.ledger import Ledger

MINE = "lineage = :lin"
"""The condition that keeps one lineage's rows (``:lin`` is bound by ``Tables.run``)."""


class Tables:
    """The intake tables of ``ledger``'s lineage."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    @property
    def lineage(self) -> str:
        return self.ledger.lineage

    @staticmethod
    def of(table: str, alias: str | None = None) -> str:
        """``table`` for a FROM clause: only this lineage's rows, under ``alias`` (default: the table's name)."""
        return f"(SELECT * FROM {table} WHERE {MINE}) {alias or table}"

    @staticmethod
    def task_is(column: str, task: str | None) -> tuple[str, dict]:
        """The condition (and its parameter) that keeps the lineage's own rows of a table with a ``task`` column
        (``task`` None: ``column IS NULL``) or task ``task``'s (m007: a task's rows train its adapter alone)."""
        return (f"{column} IS NULL", {}) if task is None else (f"{column} = :task", {"task": task})

    def run(self, conn: Connection, sql: str, params: dict | None = None) -> CursorResult:
        """Run ``sql`` in ``conn`` with ``params`` and ``:lin``, this lineage."""
        return conn.execute(text(sql), {"lin": self.lineage, **(params or {})})

"""The embedded retrieval index: SQLite FTS5, ranked by BM25, one file per lineage.

Python's own ``sqlite3`` carries FTS5, so it needs nothing installed or downloaded, works offline, and looks
up among 10,000 items in well under a millisecond (``bench/retrieval_bench.py``). Words are folded to
their Porter stems (``tokenize='porter unicode61'``): "sister's" finds "sisters", "lives" finds "live".

The file is derived data (the ledger's database is the source of truth): it is written whole, into a
temporary file beside it that replaces it only once complete and synced, so a crash or a full disk mid-write
leaves the previous index (or none) and never a half one. It records the digest of what it holds; ``verify``
recomputes it, so a file changed behind our back is noticed and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from pathlib import Path

from evolution import faults
from evolution.retrieval.items import Item

SCHEMA = 1


def digest(items: list[Item]) -> str:
    """What the index holds, as one SHA-256 (order-independent)."""
    rows = sorted([i.key, i.question, i.answer, i.source, i.order] for i in items)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


class Fts5Index:
    """The index file at ``path``; see the module docstring."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        # Read-only, opened per use: a rebuild replaces the file under readers without a lock between them.
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def write(self, items: list[Item], meta: dict) -> None:
        """Replace the index with ``items`` (atomically); ``meta`` is kept beside them with their digest."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a crash's leftover
        try:
            conn = sqlite3.connect(tmp)
            try:
                conn.executescript(
                    "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                    "CREATE VIRTUAL TABLE notes USING fts5(question, answer, key UNINDEXED, source UNINDEXED,"
                    " ord UNINDEXED, tokenize='porter unicode61');"
                    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);")
                conn.executemany("INSERT INTO notes (question, answer, key, source, ord) VALUES (?, ?, ?, ?, ?)",
                                 [(i.question, i.answer, i.key, i.source, i.order) for i in items])
                conn.executemany("INSERT INTO meta VALUES (?, ?)",
                                 [("schema", str(SCHEMA)), ("digest", digest(items)),
                                  ("meta", json.dumps(meta, sort_keys=True))])
                conn.commit()
            finally:
                conn.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            faults.point("retrieval_index")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def meta(self) -> dict | None:
        """What the index says of itself (``digest``, ``meta``), or None where it is missing or unreadable."""
        if not self.path.is_file():
            return None
        try:
            with contextlib.closing(self._connect()) as conn:
                rows = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            if rows.get("schema") != str(SCHEMA):
                return None
            return {"digest": rows["digest"], "meta": json.loads(rows["meta"])}
        except (sqlite3.Error, KeyError, ValueError):
            return None

    def items(self) -> list[Item] | None:
        """Everything the index holds (None where it cannot be read)."""
        try:
            with contextlib.closing(self._connect()) as conn:
                rows = conn.execute("SELECT key, question, answer, source, ord FROM notes").fetchall()
        except sqlite3.Error:
            return None
        return [Item(k, q, a, s, int(o)) for k, q, a, s, o in rows]

    def verify(self) -> str | None:
        """The digest of what the index holds where it matches the one it recorded, else None (missing, unreadable,
        changed)."""
        m, held = self.meta(), self.items()
        if m is None or held is None:
            return None
        try:  # FTS5's own check of its index against its rows (it needs a writable handle; it writes nothing)
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                conn.execute("INSERT INTO notes(notes) VALUES ('integrity-check')")
        except sqlite3.Error:
            return None
        return m["digest"] if digest(held) == m["digest"] else None

    def search(self, words: list[str], k: int, question: str = "") -> list[tuple[Item, float]]:
        """The ``k`` items that best match any of ``words`` (BM25, the question weighted twice the answer), best
        first, with their scores (lower is better, as FTS5 ranks). ``question`` (the whole text) is for backends
        that embed it; words are what FTS5 ranks."""
        if not words or k <= 0:
            return []
        query = " OR ".join(f'"{w}"' for w in words)
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute("SELECT key, question, answer, source, ord, bm25(notes, 2.0, 1.0) AS score FROM notes"
                                " WHERE notes MATCH ? ORDER BY score LIMIT ?", (query, k)).fetchall()
        return [(Item(key, q, a, s, int(o)), float(score)) for key, q, a, s, o, score in rows]

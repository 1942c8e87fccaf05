"""The exported head: the latest ``(seq, entry_hash)`` kept in a file outside the database.

Someone who can write the database can rebuild a whole, self-consistent chain; they cannot
(easily) make it end at the hash this file remembers. ``verify`` compares the two; copy the file
elsewhere (a backup, a commit, a message) for a stronger anchor and pass it to
``evolve ledger verify --head``.

The file is replaced atomically after each append and never moves backwards: writers hold an
``flock`` on ``HEAD.lock`` and skip the write when the file already names a later seq. Its data
is fsynced before the rename; the rename itself is not, since after a crash an older head is
still a valid (weaker) anchor — the database may run ahead of the head, never behind it.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from evolution.errors import LedgerError
from evolution.fsutil import atomic_write_json

HEAD_NAME = "HEAD.json"


@dataclass(frozen=True)
class Head:
    seq: int
    entry_hash: str
    ledger: str  # the ledger URL (password hidden), so a head is not checked against another ledger


def read_head(path: Path) -> Head | None:
    """The head stored at ``path``; ``None`` when there is no file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        return Head(seq=int(data["seq"]), entry_hash=str(data["entry_hash"]), ledger=str(data["ledger"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"the exported head {path} is unreadable ({exc}); restore it from a backup") from exc


def write_head(path: Path, head: Head) -> bool:
    """Replace the head at ``path`` unless it already names a later seq; return whether it was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            current = read_head(path)
        except LedgerError:
            current = None
        # Whatever ledger URL the current head names (a data root moved or restored elsewhere has
        # the same ledger under another path), it never moves backwards: cutting entries from the
        # tail and appending new ones must not re-anchor the head on the shortened history.
        if current is not None and current.seq >= head.seq:
            return False
        # The folder is not fsynced: after a crash the head may be older than the database,
        # never ahead of it, and verify accepts an older head; it saves ~1 ms per append.
        atomic_write_json(path, asdict(head), sync_dir=False)
        return True

"""One ledger entry as read back from the database."""

from __future__ import annotations

import json
from dataclasses import dataclass

from evolution.errors import LedgerError
from evolution.paths import MAIN


@dataclass(frozen=True)
class Entry:
    """One ledger row. ``time`` is ISO 8601 UTC with microseconds, as hashed."""

    seq: int
    time: str
    kind: str
    gen: int | None
    payload: dict
    prev_hash: str
    entry_hash: str
    lineage: str = MAIN

    def to_dict(self) -> dict:
        return {
            "seq": self.seq, "time": self.time, "kind": self.kind, "gen": self.gen,
            "payload": self.payload, "prev_hash": self.prev_hash, "entry_hash": self.entry_hash,
            "lineage": self.lineage,
        }

    @classmethod
    def from_row(cls, row) -> "Entry":
        try:
            payload = json.loads(row.payload)
        except ValueError:
            raise LedgerError(
                f"ledger entry seq {row.seq} holds a payload that is not JSON; run `evolve ledger verify`"
            ) from None
        return cls(
            seq=row.seq, time=row.time, kind=row.kind, gen=row.gen,
            payload=payload, prev_hash=row.prev_hash, entry_hash=row.entry_hash, lineage=row.lineage,
        )

"""Roll the served generation back (or forward) to an earlier, gated generation.

A rollback only appends a ``rolled_back`` event; it deletes nothing. It is refused — with
nothing appended — unless the target passed its gate (generation 0, the base, needs none) and
its GGUF is on disk with the SHA-256 the ledger recorded. The daemon serves whatever
``Ledger.served_generation()`` names, so a running one swaps within seconds and a stopped one
starts on the target.
"""

from __future__ import annotations

import logging

from evolution.errors import IntegrityError, LedgerError
from evolution.fsutil import sha256_file
from evolution.ledger import events as ev
from evolution.ledger.entry import Entry
from evolution.ledger.lineage import GenerationRow
from evolution.ledger.store import Ledger

log = logging.getLogger(__name__)


def check_servable(ledger: Ledger, n: int, hash_file: bool = True) -> dict:
    """Return the GGUF artifact record of generation ``n`` if it may be served; raise otherwise.

    The ledger's history is checked first (the record is only as good as the chain it sits in).
    ``hash_file=False`` when the caller hashes the file itself as it loads it (the daemon's model
    host reads it once, through the descriptor llama.cpp then maps), so it is hashed once.
    """
    ledger.check_history()
    d = ledger.generation(n)  # LedgerError if unknown
    gates = [e for e in d.events if e.kind == ev.GATE_RESULT and e.gen == n]
    if n != 0:
        if not gates:
            raise LedgerError(
                f"generation {n} has no gate result; only generations that passed their gate can be served"
            )
        if gates[-1].payload.get("verdict") != ev.PASS:
            reason = d.summary.reason or "see `evolve ledger show %d`" % n
            raise LedgerError(
                f"generation {n} failed its gate (seq {gates[-1].seq}: {reason}); pick a generation that passed"
            )
    gguf = d.gguf
    if gguf is None:
        raise LedgerError(f"generation {n} has no exported GGUF in the ledger; it cannot be served")
    path = ledger.data_root.root / gguf["path"]
    if d.summary.pruned == ev.PRUNE_GENERATION and not path.is_file():
        why = next(e for e in reversed(d.events) if e.kind == ev.PRUNED and e.gen == n)
        raise LedgerError(
            f"generation {n} was pruned (seq {why.seq}: {why.payload['reason']}): its GGUF is deleted and it "
            f"cannot be served again; generations kept that can be: {', '.join(map(str, servable(ledger))) or 'none'}"
        )
    if not path.is_file():
        raise LedgerError(
            f"generation {n}'s GGUF {path} is missing; restore it (sha256 {gguf['sha256']}) before rolling back"
        )
    if hash_file:
        actual = sha256_file(path)
        if actual != gguf["sha256"]:
            raise IntegrityError(
                f"generation {n}'s GGUF {path} has sha256 {actual}, the ledger recorded {gguf['sha256']}: "
                "the file is not the one that was gated; restore the original before rolling back"
            )
    return gguf


def servable(ledger: Ledger) -> list[int]:
    """Generations the ledger allows to be served (passed their gate, or 0) and the retention policy kept."""
    return [r.gen for r in ledger.history() if is_servable(r)]


def is_servable(r: GenerationRow) -> bool:
    """``servable``'s test of one row of ``Ledger.history``."""
    return bool((r.verdict == ev.PASS or (r.gen == 0 and r.parent is None)) and r.gguf_sha256
                and r.pruned != ev.PRUNE_GENERATION)


def check_target(ledger: Ledger, to: int, served: int | None) -> None:
    """Refuse a rollback target that is not a generation number, or that is served already."""
    if isinstance(to, bool) or not isinstance(to, int) or to < 0:
        raise LedgerError(f"rollback target must be a generation number >= 0, got {to!r}")
    if served == to:
        raise LedgerError(f"generation {to} is already the served generation; nothing to roll back")


def record_rollback(ledger: Ledger, to: int, reason: str, gguf: dict) -> Entry:
    """Append the ``rolled_back`` event for a target already checked with ``check_servable``."""
    served = ledger.served_generation()
    check_target(ledger, to, served)
    entry = ledger.record(ev.rolled_back(served, to, reason, sha256=gguf["sha256"], path=gguf["path"]))
    log.info("ledger: rolled back from generation %s to %d (seq %d)", served, to, entry.seq)
    return entry


def rollback(ledger: Ledger, to: int, reason: str = "manual rollback") -> Entry:
    """Make generation ``to`` the served one (no daemon involved); return the appended ``rolled_back`` entry."""
    check_target(ledger, to, ledger.served_generation())
    return record_rollback(ledger, to, reason, check_servable(ledger, to))

"""Karma: the counter the chat agent raises, and the age-ups it asks for.

Karma lives in the ledger's database (tables ``karma_events`` and ``ageup_requests``,
migration m003; one lineage's rows: ``evolution.intake.tables``), so it survives restarts and works
the same on SQLite and PostgreSQL.
Every grant runs in one write transaction under the ledger's write lock:

1. the grant is inserted (a repeated idempotency key returns the first result and adds nothing);
2. progress = all karma ever granted − the thresholds already spent by earlier age-up requests;
3. if progress reaches the current threshold and no age-up request is open, one request is
   inserted — spending the threshold — together with a ``karma_threshold_crossed`` ledger event.

Because the check and the insert happen under one lock, however many grants cross a threshold
at the same moment, exactly one request is created. Karma granted while an age-up runs keeps
counting; when it finishes, ``maybe_trigger`` opens the next request if enough has gathered.
The threshold of the k-th age-up (k = 0, 1, …) is ``threshold × growth^k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.engine import Connection

from evolution.errors import KarmaError, KarmaKeyReused
from evolution.intake.tables import MINE, Tables
from evolution.ledger import Ledger
from evolution.ledger import events as ev

MAX_AMOUNT = 1_000_000.0
MAX_REASON = 500
MAX_KEY = 200

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
EPSILON = 1e-9


@dataclass(frozen=True)
class AgeUpRequest:
    id: int
    time: str
    karma: float
    threshold: float
    status: str
    gen: int | None
    outcome: str | None
    finished_time: str | None = None
    grant_id: int | None = None
    """The karma grant that crossed the threshold (None: opened after an age-up finished)."""
    attempts: int = 0
    """Age-up attempts that failed so far (the daemon retries with a growing delay)."""
    not_before: float | None = None
    """Unix time before which the daemon does not retry it."""
    lineage: str = "main"
    """The lineage whose karma opened it (the one it ages up)."""


@dataclass(frozen=True)
class KarmaState:
    total: float
    """All karma ever granted."""
    progress: float
    """Karma counted toward the next age-up."""
    threshold: float
    """Karma the next age-up needs."""
    open_request: AgeUpRequest | None

    @property
    def to_next(self) -> float:
        return max(0.0, round(self.threshold - self.progress, 9))

    def to_dict(self) -> dict:
        return {"total": self.total, "progress": self.progress, "threshold": self.threshold,
                "to_next": self.to_next,
                "open_request": None if self.open_request is None else self.open_request.__dict__}


@dataclass(frozen=True)
class Grant:
    id: int
    amount: float
    duplicate: bool
    """The idempotency key was seen before: nothing was added (``triggered`` is still the first call's)."""
    triggered: AgeUpRequest | None
    """The age-up request this grant opened, if it crossed the threshold."""
    state: KarmaState

    def to_dict(self) -> dict:
        return {"id": self.id, "amount": self.amount, "duplicate": self.duplicate,
                "triggered": None if self.triggered is None else self.triggered.__dict__,
                "karma": self.state.to_dict()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_amount(amount) -> float:
    """A grant must be a finite number greater than 0 and at most MAX_AMOUNT."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise KarmaError(f"karma amount must be a number, got {type(amount).__name__} {repr(amount)[:40]}")
    if isinstance(amount, int) and amount > MAX_AMOUNT:  # before float(): a huge int overflows it
        raise KarmaError(f"karma amount {str(amount)[:40]} is larger than the maximum of {MAX_AMOUNT:g} per grant")
    if not math.isfinite(amount) or amount <= 0:
        raise KarmaError(f"karma amount must be a finite number greater than 0, got {amount!r}")
    if amount > MAX_AMOUNT:
        raise KarmaError(f"karma amount {amount!r} is larger than the maximum of {MAX_AMOUNT:g} per grant")
    return float(amount)


class Karma:
    """Karma of one lineage (the ledger's). ``threshold``: karma per age-up; ``growth``: its factor per age-up."""

    def __init__(self, ledger: Ledger, threshold: float, growth: float = 1.0):
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1e15 and math.isfinite(threshold)):
            raise KarmaError(f"the karma threshold must be a number greater than 0, got {threshold!r}")
        if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth >= 1):
            raise KarmaError(f"the threshold growth must be a number >= 1, got {growth!r}")
        self.ledger = ledger
        self.tables = Tables(ledger)
        self.threshold = float(threshold)
        self.growth = float(growth)

    def threshold_for(self, k: int) -> float:
        """Karma the k-th age-up (counting from 0) needs."""
        return self.threshold * self.growth**k

    # -- reading -----------------------------------------------------------------------------

    def _state(self, conn: Connection) -> KarmaState:
        t = self.tables
        total = t.run(conn, f"SELECT COALESCE(SUM(amount), 0) FROM {t.of('karma_events')}").scalar_one()
        # a staleness request spends no karma and does not raise the next threshold (threshold 0)
        spent, k = t.run(conn, "SELECT COALESCE(SUM(threshold), 0), COALESCE(SUM(CASE WHEN threshold > 0 THEN 1"
                               f" ELSE 0 END), 0) FROM {t.of('ageup_requests')}").one()
        row = t.run(conn, f"SELECT * FROM {t.of('ageup_requests')} WHERE status IN (:p, :r) ORDER BY id LIMIT 1",
                    {"p": PENDING, "r": RUNNING}).first()
        return KarmaState(float(total), float(total) - float(spent), self.threshold_for(int(k)),
                          AgeUpRequest(**row._mapping) if row else None)

    def state(self) -> KarmaState:
        with self.ledger.reading() as conn:
            return self._state(conn)

    def requests(self) -> list[AgeUpRequest]:
        with self.ledger.reading() as conn:
            return [AgeUpRequest(**r._mapping)
                    for r in self.tables.run(conn, f"SELECT * FROM {self.tables.of('ageup_requests')} ORDER BY id")]

    # -- writing -----------------------------------------------------------------------------

    def _trigger(self, txn, state: KarmaState, gen: int | None, grant_id: int | None = None) -> AgeUpRequest | None:
        # Sums of fractional grants carry float error (0.7 + 0.1 + 0.1 + 0.1 < 1): compare with a tolerance.
        if state.open_request is not None or state.progress < state.threshold * (1 - EPSILON):
            return None
        now = _now()
        rid = self.tables.run(
            txn.conn, "INSERT INTO ageup_requests (time, karma, threshold, status, grant_id, lineage)"
                      " VALUES (:t, :k, :th, :s, :g, :lin) RETURNING id",
            {"t": now, "k": state.total, "th": state.threshold, "s": PENDING, "g": grant_id},
        ).scalar_one()
        txn.record(ev.karma_threshold_crossed(state.total, state.threshold, gen, request=rid))
        return AgeUpRequest(rid, now, state.total, state.threshold, PENDING, None, None, None, grant_id,
                            lineage=self.ledger.lineage)

    def request_stale(self, reason: str, drift: float, served_gen: int | None, **detail) -> AgeUpRequest | None:
        """Open an age-up request that spends no karma (threshold 0), with a ``stale`` ledger event saying why
        (``evolution.staleness``); None when a request is open already."""
        with self.ledger.transaction() as txn:
            state = self._state(txn.conn)
            if state.open_request is not None:
                return None
            now = _now()
            rid = self.tables.run(
                txn.conn, "INSERT INTO ageup_requests (time, karma, threshold, status, outcome, lineage)"
                          " VALUES (:t, :k, 0, :s, NULL, :lin) RETURNING id",
                {"t": now, "k": state.total, "s": PENDING}).scalar_one()
            txn.record(ev.stale(reason, drift, served_gen, request=rid, **detail))
        return AgeUpRequest(rid, now, state.total, 0.0, PENDING, None, None, lineage=self.ledger.lineage)

    def retry_later(self, request_id: int, delay_s: float, error: str) -> None:
        """A failed attempt: count it and put the request back in the queue after ``delay_s``."""
        import time

        with self.ledger.transaction() as txn:
            self.tables.run(
                txn.conn, "UPDATE ageup_requests SET status = :s, attempts = attempts + 1, not_before = :nb,"
                          f" outcome = :o WHERE id = :i AND {MINE}",
                {"s": PENDING, "nb": time.time() + delay_s, "o": error, "i": request_id},
            )

    def add(self, amount, reason: str = "", key: str | None = None, source: str = "cli",
            served_gen: int | None = None) -> Grant:
        """Grant karma; open an age-up request if this crosses the threshold (see the module docstring)."""
        check_amount(amount)  # refuse a bad grant before taking the write lock
        with self.ledger.transaction() as txn:
            return self.grant(txn, amount, reason, key, source, served_gen)

    def grant(self, txn, amount, reason: str = "", key: str | None = None, source: str = "cli",
              served_gen: int | None = None) -> Grant:
        """``add`` inside the caller's write transaction (a rating and its karma commit together, or neither)."""
        amount = check_amount(amount)
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise KarmaError(f"karma reason must be text of at most {MAX_REASON} characters", "reason")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY):
            raise KarmaError(f"idempotency key must be 1 to {MAX_KEY} characters", "idempotency_key")
        if key is not None:
            row = txn.conn.execute(text("SELECT id, amount, lineage FROM karma_events WHERE idem_key = :k"),
                                   {"k": key}).first()
            if row is not None:
                if row.lineage != self.ledger.lineage:
                    raise KarmaKeyReused(f"idempotency key {key!r} was already used for a grant to lineage "
                                         f"{row.lineage!r}; use a new key for a grant to {self.ledger.lineage!r}")
                if row.amount != amount:
                    raise KarmaKeyReused(f"idempotency key {key!r} was already used for a grant of {row.amount:g}, "
                                         f"not {amount:g}; use a new key for a new grant")
                opened = txn.conn.execute(text("SELECT * FROM ageup_requests WHERE grant_id = :g"),
                                          {"g": row.id}).first()
                return Grant(row.id, row.amount, True, AgeUpRequest(**opened._mapping) if opened else None,
                             self._state(txn.conn))
        gid = self.tables.run(
            txn.conn, "INSERT INTO karma_events (time, amount, reason, idem_key, source, lineage)"
                      " VALUES (:t, :a, :r, :k, :s, :lin) RETURNING id",
            {"t": _now(), "a": amount, "r": reason, "k": key, "s": source},
        ).scalar_one()
        req = self._trigger(txn, self._state(txn.conn), served_gen, gid)
        return Grant(gid, amount, False, req, self._state(txn.conn))

    def maybe_trigger(self, served_gen: int | None = None) -> AgeUpRequest | None:
        """Open an age-up request if karma has reached the threshold and none is open (after one finished)."""
        with self.ledger.transaction() as txn:
            return self._trigger(txn, self._state(txn.conn), served_gen)

    def mark(self, request_id: int, status: str, gen: int | None = None, outcome: str | None = None) -> None:
        """Move a request to ``running`` / ``done`` / ``failed`` (``gen``: the generation it built)."""
        if status not in (PENDING, RUNNING, DONE, FAILED):
            raise ValueError(status)
        with self.ledger.transaction() as txn:
            found = self.tables.run(
                txn.conn, "UPDATE ageup_requests SET status = :s, gen = COALESCE(:g, gen),"
                          f" outcome = COALESCE(:o, outcome), finished_time = :f WHERE id = :i AND {MINE}",
                {"s": status, "g": gen, "o": outcome, "f": _now() if status in (DONE, FAILED) else None,
                 "i": request_id},
            ).rowcount
            if not found:
                raise KarmaError(f"no age-up request {request_id}")

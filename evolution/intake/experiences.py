"""Experiences: the chats the daemon served, kept (scrubbed) so that people can rate them.

``capture`` keeps one served chat completion: the request's messages, the reply, its
completion id (``chatcmpl-…``), the generation that answered (model id and GGUF SHA-256),
why it stopped and when. Like a posted transcript (``evolution.intake.conversations``) every text is
scrubbed (``evolution.scrub``) before anything is written. Capture is one INSERT in the
ledger's database (table ``experiences``, migration m004) and is bounded: past ``capture_max``
the oldest *unrated* experiences are deleted first (rated ones are training data; they go,
oldest first, only when nothing unrated is left), 1 % more than needed so that a full store
does not delete at every chat. On SQLite a capture takes about 4 ms, nearly all of it the
durable commit (``synchronous=FULL``); scrubbing a 1.4 KB chat about 0.3 ms. ``capture_safely`` is what the chat path
calls: it never raises, and counts and logs what failed (``failures``, ``last_failure``).

``rate`` labels a served completion (``by="completion"``: its ``chatcmpl-…`` id, or the
experience number ``evolve experiences`` shows) or a posted conversation
(``by="conversation"``: its id) ``good`` or ``bad``, optionally with a ``correction`` (the
reply it should have given: a chosen/rejected pair, chosen = correction, rejected = the
served reply, and an SFT example) and ``karma`` granted in the same transaction
(``Karma.grant``). Every label is kept (table ``experience_ratings``, the history); the newest
one of an item is the one trained on. A repeated ``idempotency_key`` with the same body
returns the first result and changes nothing; with another body it raises
``ExperienceKeyReused``. Errors (``evolution.errors``), for the HTTP layer:

- ``ExperienceKeyReused`` (an ``IdempotencyConflict``) → 409;
- ``UnknownExperience`` → 404 (no such completion or conversation is kept);
- ``ExperienceError`` → 400 (bad label, correction, karma, key or ``by``).

On any error nothing changed. ``labelled(since)`` hands the training side the items whose
newest label came after rating ``since`` (``evolution.intake.inbox``): unpaired good/bad examples
(KTO) and correction pairs (DPO, and ``Pair.sft`` for SFT); ``through`` is the cursor to store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.engine import Connection

from evolution import faults
from evolution.errors import ExperienceError, ExperienceKeyReused, KarmaError, UnknownExperience
from evolution.intake.inbox import Example, Labelled, Pair
from evolution.intake.karma import AgeUpRequest, Karma, check_amount
from evolution.intake.tables import Tables
from evolution.ledger import Ledger

BY = ("completion", "conversation")
MAX_CORRECTION_CHARS = 32_000
MAX_KEY = 200
MAX_ID_CHARS = 200
MAX_ROW_ID = 2**63 - 1
"""The largest id SQLite and PostgreSQL store (a larger number can name no kept item)."""
DEFAULT_CAPTURE_MAX = 10_000
LABELS = ("good", "bad")

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Experience:
    """One kept served chat; ``label`` and ``corrected`` come from its newest rating (None: unrated)."""

    id: int
    completion_id: str
    time: str
    model_id: str
    sha256: str | None
    gen: int | None
    finish_reason: str | None
    cut_off: bool
    messages: list[dict]
    reply: str
    label: str | None
    corrected: bool

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Rating:
    """The result of ``rate`` (``duplicate``: the idempotency key was seen; this is the first call's result)."""

    id: int
    by: str
    item: int
    """The experience or conversation id."""
    completion_id: str | None
    label: str
    corrected: bool
    previous: str | None
    """The label this one replaces for training (None: the item was unrated)."""
    karma: float | None
    grant_id: int | None
    triggered: AgeUpRequest | None
    """The age-up request the karma opened, if it crossed the threshold."""
    duplicate: bool

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["triggered"] = None if self.triggered is None else self.triggered.__dict__
        return d


def _content(content, where: str) -> str:
    """A request message's text: a string, OpenAI text parts joined (other parts left out), or nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    raise ExperienceError(f"{where}.content must be a string or a list of content parts, got {type(content).__name__}")


def _scrub_all(texts: list[str]) -> tuple[list[str], dict[str, int]]:
    from evolution.scrub import scrub  # imported on first use, as conversation intake does

    out, counts = [], {}
    for t in texts:
        clean, found = scrub(t)
        for r in found:
            counts[r.kind] = counts.get(r.kind, 0) + 1
        out.append(clean)
    return out, counts


def _split(messages: list[dict]) -> tuple[list[dict], str]:
    """A transcript as (prompt, last assistant reply)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def _number(item_id) -> int | None:
    """An item id given as a number: an int, or a string of ASCII digits (``int()`` also reads "²"-like ones)."""
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        return item_id
    if isinstance(item_id, str) and item_id.isascii() and item_id.isdigit() and len(item_id) <= MAX_ID_CHARS:
        return int(item_id)
    return None


def record_rating(tables: Tables, conn: Connection, kind: str, item: int, label: str, correction: str | None,
                  redactions: dict, karma: float | None, grant_id: int | None, key: str | None, digest: str,
                  source: str) -> int:
    """Insert one rating of ``tables``' lineage and make it the item's newest label (inside the caller's write
    transaction)."""
    rid = tables.run(
        conn, "INSERT INTO experience_ratings (time, item_kind, item_id, label, correction, redactions, karma,"
              " grant_id, idem_key, body_sha256, source, lineage)"
              " VALUES (:t, :kind, :item, :l, :c, :r, :k, :g, :key, :h, :s, :lin) RETURNING id",
        {"t": _now(), "kind": kind, "item": item, "l": label, "c": correction, "r": json.dumps(redactions),
         "k": karma, "g": grant_id, "key": key, "h": digest, "s": source},
    ).scalar_one()
    table = "experiences" if kind == "completion" else "conversations"
    conn.execute(text(f"UPDATE {table} SET rating_id = :r WHERE id = :i"), {"r": rid, "i": item})
    return rid


def check_label(label) -> str:
    if label not in LABELS:
        raise ExperienceError(f"label must be 'good' or 'bad', got {repr(label)[:40]}")
    return label


class ExperienceStore:
    """Served chats and their ratings in ``ledger``'s database, for the ledger's lineage.

    ``karma``: what ``rate(..., karma=N)`` grants through (needed only for that);
    ``capture_max``: how many experiences are kept.
    """

    def __init__(self, ledger: Ledger, karma: Karma | None = None, capture_max: int = DEFAULT_CAPTURE_MAX):
        if isinstance(capture_max, bool) or not isinstance(capture_max, int) or capture_max <= 0:
            raise ExperienceError(f"capture_max must be a positive integer, got {capture_max!r}")
        self.ledger = ledger
        self.tables = Tables(ledger)
        self.karma = karma
        self.capture_max = capture_max
        self.failures = 0
        """Captures that failed since this store was opened (shown in /status)."""
        self.last_failure: str | None = None
        self._lock = threading.Lock()

    # -- capture -------------------------------------------------------------------------------

    def capture(self, messages, reply, completion_id, model_id, sha256, generation, finish_reason,
                cut_off: bool, task: str | None = None) -> int:
        """Scrub and keep one served chat (``task``: the task whose adapter answered it, None for the lineage's own);
        return its experience id. Raises on any failure (see ``capture_safely``)."""
        if not isinstance(messages, list):
            raise ExperienceError(f"messages must be a list, got {type(messages).__name__}")
        roles, texts = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ExperienceError(f"messages[{i}] must be an object with a 'role'")
            roles.append(m["role"])
            texts.append(_content(m.get("content"), f"messages[{i}]"))
        if not isinstance(reply, str):
            raise ExperienceError(f"reply must be a string, got {type(reply).__name__}")
        if not isinstance(completion_id, str) or not 0 < len(completion_id) <= MAX_ID_CHARS:
            raise ExperienceError(f"completion_id must be 1 to {MAX_ID_CHARS} characters, got {completion_id!r}")
        clean, counts = _scrub_all(texts + [reply])
        body = json.dumps([{"role": r, "content": c} for r, c in zip(roles, clean)], ensure_ascii=False)
        with self.ledger.transaction() as txn:
            eid = self.tables.run(
                txn.conn, "INSERT INTO experiences (time, completion_id, model_id, sha256, gen, finish_reason, cut_off,"
                          " messages, reply, redactions, lineage, task)"
                          " VALUES (:t, :c, :m, :h, :g, :f, :x, :msgs, :r, :red, :lin, :task) RETURNING id",
                {"t": _now(), "c": completion_id, "m": str(model_id), "h": sha256, "g": generation,
                 "f": finish_reason, "x": int(bool(cut_off)), "msgs": body, "r": clean[-1],
                 "red": json.dumps(counts), "task": task},
            ).scalar_one()
            self._evict(txn.conn, eid)
            faults.point("capture")  # test hook (evolution/faults.py): inserted, not yet committed
        return eid

    def _evict(self, conn: Connection, newest: int) -> None:
        # Ids only grow, so there can be no more rows than ids between the oldest and the newest:
        # the common case costs one index lookup, and only a store at its bound is counted.
        t, mine = self.tables, self.tables.of("experiences")  # each lineage keeps its own newest capture_max
        oldest = t.run(conn, f"SELECT MIN(id) FROM {mine}").scalar_one()
        if newest - oldest + 1 <= self.capture_max:
            return
        excess = t.run(conn, f"SELECT COUNT(*) FROM {mine}").scalar_one() - self.capture_max
        if excess <= 0:
            return
        excess += self.capture_max // 100  # make room for the next 1 %: a full store does not delete at every chat
        rows = t.run(conn, f"SELECT id, rating_id FROM {mine} WHERE id < :new"  # never the chat just kept
                           " ORDER BY CASE WHEN rating_id IS NULL THEN 0 ELSE 1 END, id LIMIT :n",
                     {"new": newest, "n": excess}).all()
        rated = sum(r.rating_id is not None for r in rows)
        if rated:
            log.warning("experiences: all %d kept are rated; evicting the %d oldest rated one(s) (raise "
                        "[daemon] capture_max to keep more)", self.capture_max, rated)
        ids = ", ".join(str(int(r.id)) for r in rows)  # integers from the database itself
        conn.execute(text(f"DELETE FROM experience_ratings WHERE item_kind = 'completion' AND item_id IN ({ids})"))
        conn.execute(text(f"DELETE FROM experiences WHERE id IN ({ids})"))

    def capture_safely(self, *args, **kwargs) -> int | None:
        """``capture`` for the chat path: never raises; a failure (disk full, database locked) is counted and logged."""
        try:
            return self.capture(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a chat must never fail because its copy could not be kept
            with self._lock:
                self.failures += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"[:500]
                n = self.failures
            log.warning("experiences: could not capture a served chat (%d failure(s) so far): %s", n, exc)
            return None

    # -- rating --------------------------------------------------------------------------------

    def _find(self, conn: Connection, by: str, item_id) -> tuple[int, str | None]:
        """(id, completion id) of the item rated, or UnknownExperience."""
        number = _number(item_id)
        in_range = number is not None and 0 < number <= MAX_ROW_ID  # no row has another id; the driver refuses one
        t = self.tables
        if by == "completion":
            if number is None:
                row = t.run(conn, f"SELECT id, completion_id FROM {t.of('experiences')} WHERE completion_id = :c",
                            {"c": item_id}).first()
            else:
                row = t.run(conn, f"SELECT id, completion_id FROM {t.of('experiences')} WHERE id = :i",
                            {"i": number}).first() if in_range else None
            if row is None:
                raise UnknownExperience(
                    f"no served completion {item_id!r} is kept: use the 'id' of a /v1/chat/completions reply "
                    f"(chatcmpl-…); `evolve experiences` lists the ones kept (the newest {self.capture_max})")
            return row.id, row.completion_id
        row = t.run(conn, f"SELECT id FROM {t.of('conversations')} WHERE id = :i",
                    {"i": number}).first() if in_range else None
        if row is None:
            raise UnknownExperience(f"no conversation {item_id!r}: use the 'id' that POST /conversations returned")
        return row.id, None

    def _result(self, conn: Connection, row, completion_id: str | None, duplicate: bool) -> Rating:
        prev = conn.execute(
            text("SELECT label FROM experience_ratings WHERE item_kind = :k AND item_id = :i AND id < :r"
                 " ORDER BY id DESC LIMIT 1"), {"k": row.item_kind, "i": row.item_id, "r": row.id}).first()
        opened = None
        if row.grant_id is not None:
            opened = conn.execute(text("SELECT * FROM ageup_requests WHERE grant_id = :g"), {"g": row.grant_id}).first()
        return Rating(row.id, row.item_kind, row.item_id, completion_id, row.label, row.correction is not None,
                      None if prev is None else prev.label, row.karma, row.grant_id,
                      AgeUpRequest(**opened._mapping) if opened else None, duplicate)

    def rate(self, item_id, label, correction=None, karma=None, idempotency_key=None, by="completion",
             served_gen: int | None = None, source: str = "http") -> Rating:
        """Label an item good or bad (see the module docstring); all of it commits together, or nothing does."""
        if by not in BY:
            raise ExperienceError(f"by must be 'completion' or 'conversation', got {repr(by)[:40]}")
        number = _number(item_id)
        valid_id = (number is not None and number > 0) or (
            by == "completion" and isinstance(item_id, str) and 0 < len(item_id) <= MAX_ID_CHARS)
        if not valid_id:
            what = ("a completion id (chatcmpl-…) or an experience number" if by == "completion"
                    else "a conversation id (a positive integer)")
            raise ExperienceError(f"the id to rate must be {what}, got {repr(item_id)[:60]}", f"{by}_id")
        check_label(label)
        redactions: dict[str, int] = {}
        if correction is not None:
            if not isinstance(correction, str) or not correction.strip():
                raise ExperienceError("correction must be the reply that should have been given (non-empty text), "
                                      "or left out", "correction")
            if len(correction) > MAX_CORRECTION_CHARS:
                raise ExperienceError(f"correction has {len(correction)} characters; the limit is "
                                      f"{MAX_CORRECTION_CHARS}", "correction")
            (correction,), redactions = _scrub_all([correction])
        if karma is not None:
            if self.karma is None:
                raise ExperienceError("karma cannot be granted with this rating: the store was opened without "
                                      "karma (ExperienceStore(ledger, karma=...)); rate without karma")
            try:
                karma = check_amount(karma)
            except KarmaError as exc:
                raise ExperienceError(str(exc), "karma") from None
        if idempotency_key is not None and (not isinstance(idempotency_key, str)
                                            or not 0 < len(idempotency_key) <= MAX_KEY):
            raise ExperienceError(f"idempotency key must be 1 to {MAX_KEY} characters", "idempotency_key")
        digest = hashlib.sha256(json.dumps(
            {"by": by, "item": str(item_id), "label": label, "correction": correction, "karma": karma},
            sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        with self.ledger.transaction() as txn:
            conn = txn.conn
            if idempotency_key is not None:
                row = conn.execute(text("SELECT * FROM experience_ratings WHERE idem_key = :k"),
                                   {"k": idempotency_key}).first()
                if row is not None:
                    if row.body_sha256 != digest or row.lineage != self.ledger.lineage:
                        raise ExperienceKeyReused(
                            f"idempotency key {idempotency_key!r} was already used for another rating; use a new "
                            "key for a new rating (or repeat the first request exactly)")
                    cid = None
                    if row.item_kind == "completion":
                        cid = conn.execute(text("SELECT completion_id FROM experiences WHERE id = :i"),
                                           {"i": row.item_id}).scalar()
                    return self._result(conn, row, cid, True)
            item, completion_id = self._find(conn, by, item_id)
            grant_id = None
            if karma is not None:
                try:
                    grant_id = self.karma.grant(txn, karma, f"feedback: {label} on {by} {item}", None,
                                                source="feedback", served_gen=served_gen).id
                except KarmaError as exc:
                    raise ExperienceError(str(exc), "karma") from None
            rid = record_rating(self.tables, conn, by, item, label, correction, redactions, karma, grant_id,
                                idempotency_key, digest, source)
            row = conn.execute(text("SELECT * FROM experience_ratings WHERE id = :r"), {"r": rid}).one()
            return self._result(conn, row, completion_id, False)

    def history(self, item_id, by: str = "completion") -> list[dict]:
        """Every label given to an item, oldest first (the last one is trained on)."""
        with self.ledger.reading() as conn:
            item, _ = self._find(conn, by, item_id)
            rows = conn.execute(text("SELECT id, time, label, correction, karma, source FROM experience_ratings"
                                     " WHERE item_kind = :k AND item_id = :i ORDER BY id"), {"k": by, "i": item})
            return [dict(r._mapping) for r in rows]

    # -- reading -------------------------------------------------------------------------------

    def labelled(self, since: int = 0, task: str | None = None) -> Labelled:
        """Items whose newest label was given after rating ``since``: examples, correction pairs, and the cursor; the
        lineage's own items (``task`` None) or task ``task``'s."""
        examples, pairs = [], []

        def add(kind: str, item: int, rid: int, prompt: list[dict], reply: str, label: str, correction):
            name = f"{kind}:{item}"
            if correction is None:
                examples.append(Example(name, rid, prompt, reply, label))
            else:
                pairs.append(Pair(name, rid, prompt, correction, reply, label))

        t = self.tables
        with self.ledger.reading() as conn:
            through = t.run(conn, f"SELECT COALESCE(MAX(id), 0) FROM {t.of('experience_ratings')}").scalar_one()
            mine, params = t.task_is("e.task", task)
            rows = t.run(conn, "SELECT e.id, e.messages, e.reply, r.id AS rid, r.label, r.correction FROM"
                               f" {t.of('experiences', 'e')} JOIN experience_ratings r ON r.id = e.rating_id"
                               f" WHERE r.id > :s AND r.id <= :t AND {mine} ORDER BY r.id",
                         {"s": since, "t": through} | params)
            for r in rows:
                add("completion", r.id, r.rid, json.loads(r.messages), r.reply, r.label, r.correction)
            mine, params = t.task_is("c.task", task)
            rows = t.run(conn, "SELECT c.id, c.messages, r.id AS rid, r.label, r.correction FROM"
                               f" {t.of('conversations', 'c')} JOIN experience_ratings r ON r.id = c.rating_id"
                               f" WHERE r.id > :s AND r.id <= :t AND {mine} ORDER BY r.id",
                         {"s": since, "t": through} | params)
            for r in rows:
                prompt, reply = _split(json.loads(r.messages))
                add("conversation", r.id, r.rid, prompt, reply, r.label, r.correction)
        examples.sort(key=lambda e: e.rating_id)
        pairs.sort(key=lambda p: p.rating_id)
        return Labelled(examples, pairs, int(through))

    def list(self, label: str | None = None, limit: int = 50) -> list[Experience]:
        """Kept experiences, newest first; ``label``: 'good', 'bad', 'none' (unrated) or None (all)."""
        if label not in (None, "none", *LABELS):
            raise ExperienceError(f"label must be 'good', 'bad' or 'none', got {repr(label)[:40]}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ExperienceError(f"limit must be a positive integer, got {limit!r}")
        where, params = "", {"n": limit}
        if label == "none":
            where = " WHERE e.rating_id IS NULL"
        elif label is not None:
            where, params["l"] = " WHERE r.label = :l", label
        t = self.tables
        with self.ledger.reading() as conn:
            rows = t.run(conn, f"SELECT e.*, r.label, r.correction FROM {t.of('experiences', 'e')} LEFT JOIN"
                               f" experience_ratings r ON r.id = e.rating_id{where} ORDER BY e.id DESC LIMIT :n",
                         params).all()
        return [Experience(r.id, r.completion_id, r.time, r.model_id, r.sha256, r.gen, r.finish_reason,
                           bool(r.cut_off), json.loads(r.messages), r.reply, r.label, r.correction is not None)
                for r in rows]

    def counts(self) -> dict:
        """For /status: experiences kept, by label, corrections, labelled conversations, capture failures."""
        t = self.tables
        with self.ledger.reading() as conn:
            n, good, bad, corrected = t.run(
                conn, "SELECT COUNT(*), SUM(CASE WHEN r.label = 'good' THEN 1 ELSE 0 END),"
                      " SUM(CASE WHEN r.label = 'bad' THEN 1 ELSE 0 END),"
                      " SUM(CASE WHEN r.correction IS NOT NULL THEN 1 ELSE 0 END)"
                      f" FROM {t.of('experiences', 'e')} LEFT JOIN experience_ratings r ON r.id = e.rating_id").one()
            conv = t.run(conn, f"SELECT COUNT(*) FROM {t.of('conversations')} WHERE rating_id IS NOT NULL").scalar_one()
            ratings = t.run(conn, f"SELECT COUNT(*) FROM {t.of('experience_ratings')}").scalar_one()
        good, bad = int(good or 0), int(bad or 0)
        return {"experiences": int(n), "good": good, "bad": bad, "unrated": int(n) - good - bad,
                "corrected": int(corrected or 0), "labelled_conversations": int(conv), "ratings": int(ratings),
                "capture_max": self.capture_max, "capture_failures": self.failures,
                "last_capture_failure": self.last_failure}

"""Conversation intake: finished chat transcripts become SFT data for the next age-up.

The chat agent posts a transcript (OpenAI-style ``messages``). It is validated (roles, text,
sizes), scrubbed of secrets and personal data (``evolution.scrub``: API keys, tokens,
passwords, private keys, URL credentials, IBANs, payment cards, e-mail and IP addresses,
phone numbers → ``[REDACTED:<kind>]``) and only then stored — the raw text is never written
anywhere. Transcripts live in the ledger's database (table ``conversations``, migration m003),
numbered in arrival order. A transcript may carry a ``label`` (good|bad; migration m004) and be
rated later like a served completion (``evolution.intake.experiences``); its newest label decides how it
is trained on.

Each age-up takes the transcripts that arrived after the ones its parent trained on (the
parent's ``data/manifest.json`` names the last one; ``Intake.inbox``), so a rejected child's
conversations are offered again to the next attempt. How contradictions are settled (recency,
by ``messages.prompt_key``) is described in ``evolution.replay``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text

from evolution import messages as messages_mod
from evolution.errors import ConversationError, ConversationKeyReused, MessageError
from evolution.intake.experiences import LABELS, record_rating
from evolution.intake.tables import Tables
from evolution.ledger import Ledger

MAX_MESSAGES = 200
MAX_MESSAGE_CHARS = 32_000
MAX_KEY = 200


@dataclass(frozen=True)
class Stored:
    id: int
    duplicate: bool
    messages: int
    redactions: dict[str, int]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


TRANSCRIPT_RULES = messages_mod.Rules(
    text_parts=True, parts_error="only text parts ({\"type\": \"text\", \"text\": ...}) can be learned from",
    allow_empty=False, max_messages=MAX_MESSAGES, max_chars=MAX_MESSAGE_CHARS, system_first_only=True,
    needs_reply=True)
"""A posted transcript: text only, bounded, a user message answered by the assistant."""


def validate(messages) -> list[dict]:
    """Return the transcript as ``[{"role", "content"}]`` or raise ConversationError saying what is wrong."""
    try:
        return messages_mod.validate(messages, TRANSCRIPT_RULES)
    except MessageError as exc:
        raise ConversationError(str(exc)) from None


class ConversationStore:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.tables = Tables(ledger)

    def add(self, messages, key: str | None = None, label: str | None = None, task: str | None = None) -> Stored:
        """Validate, scrub and store a transcript; a repeated idempotency key stores nothing.

        ``label`` ('good' or 'bad', optional): how the transcript went; it is recorded as the
        conversation's first rating (``evolution.intake.experiences``), and a 'bad' one is not trained on as SFT.
        ``task``: the task it belongs to (``[tasks]``; the caller checked the name), None for the lineage's own.
        """
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY):
            raise ConversationError(f"idempotency key must be 1 to {MAX_KEY} characters", "idempotency_key")
        if label is not None and label not in LABELS:
            raise ConversationError(f"label must be 'good' or 'bad' (or left out), got {repr(label)[:40]}", "label")
        from evolution.scrub import scrub  # only intake needs it (and its detector plugins)

        clean, counts = [], {}
        for m in validate(messages):
            scrubbed, found = scrub(m["content"])
            for r in found:
                counts[r.kind] = counts.get(r.kind, 0) + 1
            clean.append({"role": m["role"], "content": scrubbed})
        body = json.dumps(clean, ensure_ascii=False)
        with self.ledger.transaction() as txn:
            if key is not None:
                row = txn.conn.execute(text("SELECT id, messages, redactions, label, lineage, task FROM conversations"
                                            " WHERE idem_key = :k"), {"k": key}).first()
                if row is not None:
                    if (row.messages, row.label, row.lineage, row.task) != (body, label, self.ledger.lineage, task):
                        raise ConversationKeyReused(f"idempotency key {key!r} was already used for another transcript"
                                                    " (or another label, lineage or task)")
                    return Stored(row.id, True, len(clean), json.loads(row.redactions))
            cid = self.tables.run(
                txn.conn, "INSERT INTO conversations (time, idem_key, messages, redactions, sha256, label, lineage,"
                          " task) VALUES (:t, :k, :m, :r, :h, :l, :lin, :task) RETURNING id",
                {"t": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "k": key, "m": body,
                 "r": json.dumps(counts), "h": hashlib.sha256(body.encode()).hexdigest(), "l": label, "task": task},
            ).scalar_one()
            if label is not None:
                digest = hashlib.sha256(json.dumps({"by": "conversation", "item": str(cid), "label": label},
                                                   sort_keys=True).encode()).hexdigest()
                record_rating(self.tables, txn.conn, "conversation", cid, label, None, {}, None, None, None, digest,
                              "intake")
        return Stored(cid, False, len(clean), counts)

    def after(self, last_id: int, task: str | None = None) -> list[tuple[int, list[dict]]]:
        """Transcripts stored after ``last_id``, oldest first: ``(id, messages)``: the lineage's own (``task`` None)
        or task ``task``'s.

        Left out: those whose newest label is 'bad' or carries a correction (the served reply is not
        one to imitate); ``ExperienceStore.labelled`` offers them as preference data instead.
        """
        t = self.tables
        mine, params = t.task_is("c.task", task)
        with self.ledger.reading() as conn:
            rows = t.run(conn, f"SELECT c.id, c.messages FROM {t.of('conversations', 'c')}"
                               f" LEFT JOIN experience_ratings r ON r.id = c.rating_id WHERE c.id > :i AND {mine}"
                               " AND (r.id IS NULL OR (r.label = 'good' AND r.correction IS NULL)) ORDER BY c.id",
                         {"i": last_id} | params)
            return [(r.id, json.loads(r.messages)) for r in rows]

    def recent(self, limit: int = 30) -> list[dict]:
        """The newest transcripts first: id, time, messages, redactions and the newest label and correction."""
        t = self.tables
        with self.ledger.reading() as conn:
            rows = t.run(conn, "SELECT c.id, c.time, c.messages, c.redactions, r.label, r.correction FROM"
                               f" {t.of('conversations', 'c')} LEFT JOIN experience_ratings r ON r.id = c.rating_id"
                               " ORDER BY c.id DESC LIMIT :n", {"n": int(limit)}).all()
        return [{"id": r.id, "time": r.time, "messages": json.loads(r.messages), "redactions": json.loads(r.redactions),
                 "label": r.label, "corrected": r.correction is not None} for r in rows]

    def count(self) -> tuple[int, int]:
        """(number stored, id of the newest or 0)."""
        with self.ledger.reading() as conn:
            n, last = self.tables.run(
                conn, f"SELECT COUNT(*), COALESCE(MAX(id), 0) FROM {self.tables.of('conversations')}").one()
        return int(n), int(last)

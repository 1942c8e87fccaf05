"""Conversation intake: finished chat transcripts become SFT data for the next age-up.

The chat agent posts a transcript (OpenAI-style ``messages``). It is validated (roles, text,
sizes), scrubbed of secrets and personal data (``evolution.scrub``: API keys, tokens,
passwords, private keys, URL credentials, IBANs, payment cards, e-mail and IP addresses,
phone numbers → ``[REDACTED:<kind>]``) and only then stored — the raw text is never written
anywhere. Transcripts live in the ledger's database (table ``conversations``, migration m003),
numbered in arrival order.

Each age-up takes the transcripts that arrived after the ones its parent trained on (the
parent's ``data/manifest.json`` names the last one), so a rejected child's conversations are
offered again to the next attempt. How contradictions are settled (recency) is described in
``evolution.replay``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text

from evolution.errors import EvolutionError, IdempotencyConflict
from evolution.ledger import Ledger

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 200
MAX_MESSAGE_CHARS = 32_000
MAX_KEY = 200


class ConversationError(EvolutionError):
    """A transcript that cannot be accepted; nothing was stored."""


class ConversationKeyReused(ConversationError, IdempotencyConflict):
    """The idempotency key was used for another transcript."""


@dataclass(frozen=True)
class Stored:
    id: int
    duplicate: bool
    messages: int
    redactions: dict[str, int]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _text(content, where: str) -> str:
    """Message content: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ConversationError(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                        "can be learned from")
            parts.append(part["text"])
        return "".join(parts)
    raise ConversationError(f"{where}.content must be a string, got {type(content).__name__}")


def validate(messages) -> list[dict]:
    """Return the transcript as ``[{"role", "content"}]`` or raise ConversationError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    if len(messages) > MAX_MESSAGES:
        raise ConversationError(f"a transcript may have at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ConversationError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise ConversationError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = _text(m.get("content"), where)
        if not content.strip():
            raise ConversationError(f"{where}.content is empty")
        if len(content) > MAX_MESSAGE_CHARS:
            raise ConversationError(f"{where}.content has {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}")
        if role == "system" and i != 0:
            raise ConversationError(f"{where}: a system message may only come first")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out if m["role"] != "system"]
    if "user" not in roles or "assistant" not in roles[roles.index("user"):]:
        raise ConversationError("a transcript needs a user message followed by an assistant reply to learn from")
    while out[-1]["role"] != "assistant":  # a trailing unanswered user turn teaches nothing
        out.pop()
    return out


def prompt_key(messages: list[dict]) -> str:
    """What a conversation is about, for recency: its first user message, case and punctuation folded."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return " ".join(re.sub(r"[^\w\s]", " ", first.lower()).split())


class ConversationStore:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def add(self, messages, key: str | None = None) -> Stored:
        """Validate, scrub and store a transcript; a repeated idempotency key stores nothing."""
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY):
            raise ConversationError(f"idempotency key must be 1 to {MAX_KEY} characters")
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
                row = txn.conn.execute(text("SELECT id, messages, redactions FROM conversations WHERE idem_key = :k"),
                                       {"k": key}).first()
                if row is not None:
                    if row.messages != body:
                        raise ConversationKeyReused(f"idempotency key {key!r} was already used for another transcript")
                    return Stored(row.id, True, len(clean), json.loads(row.redactions))
            cid = txn.conn.execute(
                text("INSERT INTO conversations (time, idem_key, messages, redactions, sha256)"
                     " VALUES (:t, :k, :m, :r, :h) RETURNING id"),
                {"t": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "k": key, "m": body,
                 "r": json.dumps(counts), "h": hashlib.sha256(body.encode()).hexdigest()},
            ).scalar_one()
        return Stored(cid, False, len(clean), counts)

    def after(self, last_id: int) -> list[tuple[int, list[dict]]]:
        """Transcripts stored after ``last_id``, oldest first: ``(id, messages)``."""
        with self.ledger.reading() as conn:
            rows = conn.execute(text("SELECT id, messages FROM conversations WHERE id > :i ORDER BY id"), {"i": last_id})
            return [(r.id, json.loads(r.messages)) for r in rows]

    def count(self) -> tuple[int, int]:
        """(number stored, id of the newest or 0)."""
        with self.ledger.reading() as conn:
            n, last = conn.execute(text("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM conversations")).one()
        return int(n), int(last)

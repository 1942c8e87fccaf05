"""Probes: questions the chat agent posts to check that a taught fact was learned, in other words.

``POST /probes`` takes ``{"question", "answers": [...]}`` — the format of
``curriculum/eval/recall.jsonl`` — scrubbed like every text that came from a chat and stored
in the ledger's database (migration m005). Probes are never trained on: every gate from then
on asks all of them of the child and of its parent (``probe_recall``), so a fact the lineage
forgets later shows as a drop.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text

from evolution.errors import ProbeError, ProbeKeyReused
from evolution.intake.tables import Tables
from evolution.ledger import Ledger

MAX_QUESTION_CHARS = 2_000
MAX_ANSWERS = 20
MAX_ANSWER_CHARS = 500
MAX_KEY = 200


@dataclass(frozen=True)
class StoredProbe:
    id: int
    duplicate: bool
    redactions: dict[str, int]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _check(question, answers) -> None:
    if not isinstance(question, str) or not question.strip():
        raise ProbeError("'question' must be a non-empty string: the question to ask, in other words than taught")
    if len(question) > MAX_QUESTION_CHARS:
        raise ProbeError(f"'question' has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ProbeError("'answers' must be a non-empty list of non-empty strings: the accepted answers "
                         "(a reply is right when one of them occurs in it, case and punctuation folded)", "answers")
    if len(answers) > MAX_ANSWERS or any(len(a) > MAX_ANSWER_CHARS for a in answers):
        raise ProbeError(f"at most {MAX_ANSWERS} answers of at most {MAX_ANSWER_CHARS} characters each", "answers")


class ProbeStore:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.tables = Tables(ledger)

    def add(self, question, answers, key: str | None = None, task: str | None = None) -> StoredProbe:
        """Validate, scrub and store a probe (``task``: asked of that task's adapter, None: of the lineage's
        generations); a repeated idempotency key stores nothing."""
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY):
            raise ProbeError(f"idempotency key must be 1 to {MAX_KEY} characters", "idempotency_key")
        _check(question, answers)
        from evolution.scrub import scrub

        counts: dict[str, int] = {}
        clean = []
        for t in [question, *answers]:
            scrubbed, found = scrub(t)
            for r in found:
                counts[r.kind] = counts.get(r.kind, 0) + 1
            clean.append(scrubbed)
        body = json.dumps(clean[1:], ensure_ascii=False)
        with self.ledger.transaction() as txn:
            if key is not None:
                row = txn.conn.execute(text("SELECT id, question, answers, redactions, lineage, task FROM probes"
                                            " WHERE idem_key = :k"), {"k": key}).first()
                if row is not None:
                    if (row.question, row.answers, row.lineage, row.task) != (clean[0], body, self.ledger.lineage,
                                                                              task):
                        raise ProbeKeyReused(f"idempotency key {key!r} was already used for another probe"
                                             " (or another lineage or task)")
                    return StoredProbe(row.id, True, json.loads(row.redactions))
            pid = self.tables.run(
                txn.conn, "INSERT INTO probes (time, idem_key, question, answers, redactions, sha256, lineage, task)"
                          " VALUES (:t, :k, :q, :a, :r, :h, :lin, :task) RETURNING id",
                {"t": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "k": key, "q": clean[0],
                 "a": body, "r": json.dumps(counts),
                 "h": hashlib.sha256(json.dumps([clean[0], body]).encode()).hexdigest(), "task": task},
            ).scalar_one()
        return StoredProbe(pid, False, counts)

    def items(self, task: str | None = None) -> list[dict]:
        """The probes to ask as recall items (``id``, ``question``, ``answers``), oldest first: the lineage's own
        (``task`` None: its gates ask them) or task ``task``'s (its adapter's gate asks them).

        A newer probe of the same question (case and punctuation folded, ``evals.normalize``) supersedes an older
        one: the user told the agent something new ("my dog is called Pip now") and the agent asks it again with
        the new answers. Kept, the old probe would count a child that learned the update as one that forgot
        (``bench/horizon_bench.py``: round 9 renamed round 1's pets, and the child that learned the new names was
        rejected for 31 probes "forgotten"). Every probe stays in the database."""
        from evolution.evals import normalize

        mine, params = self.tables.task_is("task", task)
        with self.ledger.reading() as conn:
            rows = self.tables.run(conn, f"SELECT id, question, answers FROM {self.tables.of('probes')} WHERE {mine}"
                                         " ORDER BY id", params)
            newest = {normalize(r.question): {"id": f"probe-{r.id}", "question": r.question,
                                              "answers": json.loads(r.answers)} for r in rows}
        return sorted(newest.values(), key=lambda item: int(item["id"].removeprefix("probe-")))

    def count(self) -> int:
        with self.ledger.reading() as conn:
            return int(self.tables.run(conn, f"SELECT COUNT(*) FROM {self.tables.of('probes')}").scalar_one())

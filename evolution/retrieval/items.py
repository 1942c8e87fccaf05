"""What retrieval holds: every lesson the user taught, less those the served generation's weights already carry.

An ``Item`` is one question with the answer the user stands behind: a correction (the corrected reply), a
served reply or a transcript rated good, or an exchange of a posted transcript nobody rated bad. A reply
rated bad is never an answer, and a chat kept out of capture (``store: false``) was never stored, so it
cannot be one; all of it is the intake's scrubbed text of this lineage (``evolution.intake``).

``handed_over``: an item leaves retrieval once a generation on the served generation's line (itself or an
ancestor) answered it right at its gate, without retrieval — ``experience_similarity`` asks the child every
approved reply it trained on, and keeps each reply in the generation's ``eval.json``. An item no gate asked (an
unrated transcript's exchange) stays: nothing shows that the weights carry it. A rollback to an older
generation brings back what only the rolled-back ones had learned.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from evolution import augment, evals
from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.paths import DataRoot

log = logging.getLogger(__name__)

CORRECTION, GOOD, TRANSCRIPT = "correction", "good", "transcript"
SOURCES = (CORRECTION, GOOD, TRANSCRIPT)


@dataclass(frozen=True)
class Item:
    key: str
    """Where it came from: ``completion:12`` / ``conversation:5`` (a rated item), ``conversation:5#0`` (an exchange
    of an unrated transcript)."""
    question: str
    answer: str
    source: str
    """``correction``, ``good`` (a reply rated good) or ``transcript`` (an exchange of a transcript not rated bad)."""
    order: int
    """Newer items have higher numbers (within a source: rating ids, conversation ids)."""


def _key(question: str, answer: str) -> tuple[str, str]:
    return evals.normalize(question), evals.normalize(answer)


def taught(intake: Intake) -> list[Item]:
    """Every lesson of the lineage, oldest first, one item per distinct (question, answer)."""
    labelled = intake.experiences.labelled()
    out: list[Item] = []
    for cid, messages in intake.conversations.after(0):
        for i, (q, a) in enumerate(augment.exchanges(messages)):
            out.append(Item(f"conversation:{cid}#{i}", q, a, TRANSCRIPT, cid))
    for e in labelled.examples:
        if e.label == "good" and e.prompt and e.prompt[-1]["role"] == "user":
            out.append(Item(e.item, e.prompt[-1]["content"], e.reply, GOOD, e.rating_id))
    for p in labelled.pairs:
        if p.prompt and p.prompt[-1]["role"] == "user":
            out.append(Item(p.item, p.prompt[-1]["content"], p.chosen, CORRECTION, p.rating_id))
    seen, unique = set(), []
    for item in out:
        k = _key(item.question, item.answer)
        if k not in seen and k[0] and k[1]:
            seen.add(k)
            unique.append(item)
    return unique


def answers_right(reply: str, question: str, answer: str) -> bool:
    """Whether ``reply`` gives what ``answer`` told about ``question``: the fact's value (the run of the answer's
    words the question did not hold: a name, a number, a place) in the reply; without one, most of the answer's
    own words."""
    value = augment.parse(question, answer).value
    said = f" {evals.normalize(reply)} "
    if value:
        return f" {evals.normalize(value)} " in said
    asked = set(evals.normalize(question).split())
    words = [w for w in evals.normalize(answer).split() if w not in asked]
    return bool(words) and sum(f" {w} " in said for w in words) >= 0.8 * len(words)


def learned(root: DataRoot, ledger: Ledger, served: int | None) -> set[tuple[str, str]]:
    """The (question, answer) keys that ``served`` or an ancestor answered right at its own gate."""
    if served is None:
        return set()
    out: set[tuple[str, str]] = set()
    from evolution.gate import ModelEval

    for gen in ledger.generation(served).lineage:
        path = root.gen_dir(gen) / "eval.json"
        try:
            measured = ModelEval.from_dict(json.loads(path.read_text())["child"]).measured("experience_similarity")
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("retrieval: cannot read %s (%s); its generation's lessons stay in retrieval", path, exc)
            continue
        out |= answered_right((measured.details.get("items") or []) if measured is not None else [])
    return out


def answered_right(experience: list) -> set[tuple[str, str]]:
    """The (question, answer) keys among a gate's ``experience_similarity`` items that its child answered right."""
    return {_key(str(r["prompt"]), str(r["reference"])) for r in experience
            if isinstance(r, dict) and answers_right(str(r.get("reply", "")), str(r.get("prompt", "")),
                                                     str(r.get("reference", "")))}


def pending(items: list[Item], carried: set[tuple[str, str]]) -> list[Item]:
    """``items`` less those the weights carry."""
    return [i for i in items if _key(i.question, i.answer) not in carried]


_OVERRIDE = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b[^.!?\n]{0,60}\b(?:instructions?|rules|prompts?|guidelines|"
    r"above|previous|everything)\b|\byou\s+are\s+now\b|\bfrom\s+now\s+on\s+you\b|\bsystem\s+prompt\b|"
    r"\bnew\s+(?:instructions?|persona|identity)\b|\bpretend\s+(?:to\s+be|you\s+are)\b|\bact\s+as\s+(?:if|an?|the)\b",
    re.IGNORECASE)


def instructs(item: Item) -> bool:
    """Whether an item reads as instructions to the model (``ignore your instructions``, ``you are now X``) rather
    than a fact: it is never put into a prompt (text from chats is untrusted)."""
    return bool(_OVERRIDE.search(item.question) or _OVERRIDE.search(item.answer))


def items_path(root: DataRoot) -> Path:
    """The lineage's index file (derived data: rebuilt from the ledger's database whenever it is lost)."""
    return root.home / "index" / "retrieval.sqlite"

"""What the user taught, as the training side reads it: rated replies, corrections, and the inbox of an age-up.

``Inbox`` is the one thing an age-up takes from the intake (``Intake.inbox``): the transcripts posted
and the replies rated since the parent generation's data took its last ones (the parent's cursors), the
replies never to imitate, the agent's probe questions, and the cursors the child's data records.
``evolution.replay`` hands it (or the part of it a stage may train on) to each training stage
(``Stage.inbox``), which takes the records it learns from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """An unpaired labelled reply (KTO): ``prompt`` messages, the ``reply`` served, ``label``."""

    item: str
    rating_id: int
    prompt: list[dict]
    reply: str
    label: str


@dataclass(frozen=True)
class Pair:
    """A correction: ``chosen`` (the correction) over ``rejected`` (the reply served) for ``prompt`` (DPO)."""

    item: str
    rating_id: int
    prompt: list[dict]
    chosen: str
    rejected: str
    label: str

    @property
    def sft(self) -> list[dict]:
        """The corrected chat as an SFT example."""
        return self.prompt + [{"role": "assistant", "content": self.chosen}]


@dataclass(frozen=True)
class Labelled:
    """Rated items, each with its newest label (``ExperienceStore.labelled``)."""

    examples: list[Example]
    pairs: list[Pair]
    through: int
    """The newest rating id when read: pass it as ``since`` next time."""


@dataclass(frozen=True)
class Inbox:
    """What the user taught since the parent generation, for an age-up's data (``evolution.replay``)."""

    conversations: Sequence[tuple[int, list[dict]]] = ()
    """``(id, messages)`` of the transcripts posted after ``conversations_since``, oldest first (bad or corrected
    ones left out)."""
    examples: Sequence[Example] = ()
    """Replies rated after ``ratings_since`` (unpaired: KTO, and SFT for a good one)."""
    pairs: Sequence[Pair] = ()
    """Replies corrected after ``ratings_since`` (DPO, and SFT on the correction)."""
    not_to_imitate: Sequence[tuple[list[dict], str]] = ()
    """``(prompt, reply)`` of every reply whose newest label is bad or that was corrected, rated before the parent
    too: never trained on as a chat record, from any source (an earlier generation may have learned it before it
    was rated)."""
    probes: Sequence[str] = ()
    """The agent's probe questions: subjects it taught, never trained on."""
    conversations_since: int = 0
    """The last transcript the parent's data took in (its cursor)."""
    ratings_since: int = 0
    """The last rating the parent's data took in (its cursor)."""
    ratings_through: int = 0
    """The newest rating when read: the child's cursor once a stage takes the new ratings."""

    @classmethod
    def taught(cls, conversations: Sequence[tuple[int, list[dict]]] = (), labelled: Labelled | None = None, *,
               conversations_since: int = 0, ratings_since: int = 0, probes: Sequence[str] = ()) -> "Inbox":
        """The inbox of ``conversations`` (posted after ``conversations_since``) and of ``labelled`` (every rated
        item with its newest label), of which the items rated after ``ratings_since`` are new."""
        if labelled is None:
            return cls(list(conversations), probes=list(probes), conversations_since=conversations_since,
                       ratings_since=ratings_since, ratings_through=ratings_since)
        bad = [(e.prompt, e.reply) for e in labelled.examples if e.label == "bad"] + \
            [(p.prompt, p.rejected) for p in labelled.pairs]
        return cls(list(conversations), [e for e in labelled.examples if e.rating_id > ratings_since],
                   [p for p in labelled.pairs if p.rating_id > ratings_since], bad, list(probes),
                   conversations_since, ratings_since, labelled.through)

"""The user's data in one home: karma, conversations, experiences and probes, one ``Intake`` per lineage.

What the chat agent and its users send (over HTTP, ``evolution.server``; by hand, ``evolve karma |
feedback``) is kept here, scrubbed, for the ledger's lineage, and read back by the age-up as one typed
``Inbox`` (``Intake.inbox``), by the status (``evolution.status``) and by the dashboard. The daemon and
the CLI hold an ``Intake``; its four stores:

- ``karma`` (``karma.Karma``): grants, and the age-up requests a crossed threshold opens;
- ``conversations`` (``conversations.ConversationStore``): posted transcripts;
- ``experiences`` (``experiences.ExperienceStore``): served chats kept for rating, and every rating;
- ``probes`` (``probes.ProbeStore``): questions every later gate asks, never trained on.

``tables`` reads and writes each table as one lineage (the lineage filter, written once); ``inbox``
holds the typed records the training side takes (``Example``, ``Pair``, ``Labelled``, ``Inbox``).

**Migrations.** The tables live in the ledger's database and were made by the ledger's numbered
migrations: m003 (``karma_events``, ``ageup_requests``, ``conversations``), m004 (``experiences``,
``experience_ratings``, a transcript's label), m005 (``probes``), m006 (every table's ``lineage``). They
stay in ``evolution.ledger.migrations``, in its one numbered sequence, unedited. A database has one schema
version, applied and checked (a version newer than the code knows is refused) whenever any ``Ledger`` opens
it: every command, the daemon, a backup or a restore, most of which never import this package. The ledger
sits below the intake and imports nothing from it, so the definitions cannot move up here without the
ledger importing upward; and a second sequence applied from here would split the version, so that a
ledger-only reader either refused a database the intake had migrated as "newer than it knows" or read it
half-migrated. What the tables hold and how they are read is this package's; a change to their schema is
the next numbered migration in ``ledger/migrations.py`` (never an edit of an old one).
"""

from __future__ import annotations

from evolution.intake.conversations import ConversationStore
from evolution.intake.experiences import DEFAULT_CAPTURE_MAX, ExperienceStore
from evolution.intake.inbox import Example, Inbox, Labelled, Pair
from evolution.intake.karma import Karma
from evolution.intake.probes import ProbeStore
from evolution.intake.tables import Tables
from evolution.ledger import Ledger
from evolution.ledger.migrations import TASK_TABLES


class Intake:
    """The user's data of ``ledger``'s lineage: ``karma``, ``conversations``, ``experiences``, ``probes``.

    ``threshold`` / ``growth``: karma per age-up and its factor per age-up (``[daemon]``); ``capture_max``:
    how many served chats are kept. A rating's karma is granted through ``karma``.
    """

    def __init__(self, ledger: Ledger, threshold: float = 100.0, growth: float = 1.0,
                 capture_max: int = DEFAULT_CAPTURE_MAX):
        self.ledger = ledger
        self.karma = Karma(ledger, threshold, growth)
        self.conversations = ConversationStore(ledger)
        self.experiences = ExperienceStore(ledger, karma=self.karma, capture_max=capture_max)
        self.probes = ProbeStore(ledger)

    def inbox(self, conversations_since: int = 0, ratings_since: int = 0, task: str | None = None) -> Inbox:
        """What was taught since a parent whose data took in the transcripts through ``conversations_since`` and
        the ratings through ``ratings_since`` (its cursors: ``replay.conversations_through`` /
        ``experiences_through``), with every probe question: the lineage's own (``task`` None) or task ``task``'s
        (``evolution.tasks``)."""
        return Inbox.taught(self.conversations.after(conversations_since, task), self.experiences.labelled(task=task),
                            conversations_since=conversations_since, ratings_since=ratings_since,
                            probes=[p["question"] for p in self.probes.items(task)])

    def tasks(self) -> list[str]:
        """The tasks the lineage's rows name (transcripts, served chats, probes; ``[tasks]``), sorted."""
        found: set[str] = set()
        t = Tables(self.ledger)
        with self.ledger.reading() as conn:
            for table in TASK_TABLES:
                found |= {r[0] for r in t.run(conn, f"SELECT DISTINCT task FROM {t.of(table)} WHERE task IS NOT NULL")}
        return sorted(found)

    def counts(self) -> dict:
        """What the status shows of it: transcripts stored (and the newest id), experiences by label, probes."""
        n, last = self.conversations.count()
        return {"conversations": {"stored": n, "last_id": last}, "experiences": self.experiences.counts(),
                "probes": self.probes.count()}


__all__ = ["ConversationStore", "Example", "ExperienceStore", "Inbox", "Intake", "Karma", "Labelled", "Pair",
           "ProbeStore"]

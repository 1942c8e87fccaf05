"""The lineage ledger: an append-only, hash-chained record of every generation's life.

It is the one source of truth for which generation is served and why. Typical use::

    from evolution.ledger import Ledger, events
    with Ledger.open(DataRoot.from_env()) as ledger:
        ledger.record(events.promoted(3))
        ledger.served_generation()       # -> 3
        ledger.verify().ok

Modules: ``events`` (kinds, payload builders), ``chain`` (hashing), ``migrations`` (schema),
``store`` (``Ledger``: open, append, read), ``lineage`` (history / one generation), ``verify``,
``head`` (the exported head file), ``rollback``, ``report`` (PNG, imported on demand: matplotlib).
"""

from evolution.ledger import events
from evolution.ledger.entry import Entry
from evolution.ledger.events import (
    EXPORTED,
    GATE_RESULT,
    GENERATION_CREATED,
    KARMA_THRESHOLD_CROSSED,
    KINDS,
    PROMOTED,
    REJECTED,
    ROLLED_BACK,
    TRAINING_FINISHED,
    TRAINING_STARTED,
    Event,
)
from evolution.ledger.lineage import GenerationDetail, GenerationRow
from evolution.ledger.rollback import check_servable, record_rollback, rollback
from evolution.ledger.store import URL_ENV, Ledger
from evolution.ledger.verify import Problem, VerifyReport

__all__ = [
    "EXPORTED", "GATE_RESULT", "GENERATION_CREATED", "KARMA_THRESHOLD_CROSSED", "KINDS", "PROMOTED",
    "REJECTED", "ROLLED_BACK", "TRAINING_FINISHED", "TRAINING_STARTED", "URL_ENV",
    "Entry", "Event", "GenerationDetail", "GenerationRow", "Ledger", "Problem", "VerifyReport",
    "check_servable", "events", "record_rollback", "rollback",
]

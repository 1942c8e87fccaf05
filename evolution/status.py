"""Where a lineage stands, built in one place for every reader: the daemon's ``/status``, `evolve status` and the
dashboard's live panel (under the daemon and under `evolve ui`).

``read`` gathers it from the data root, the ledger and the intake: the served generation, the age-up in
progress (``evolution.progress``), karma, whether the stop rule paused age-ups (``promotion.paused_reason``),
and what the intake holds (transcripts, experiences, probes). A running daemon adds what only it knows
(``Live``: the model it has loaded, its age-up worker, swaps, its last error, its uptime); without one the
ledger names the served generation and the progress file says whether an age-up runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from evolution import progress
from evolution.errors import ConfigError
from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.promotion import paused_reason
from evolution.serving import Slot, model_id


@dataclass(frozen=True)
class Live:
    """What a running daemon knows beyond its data root."""

    slot: Slot | None
    """The generation loaded and answering (None while generation 0 is built, or unloaded for idling)."""
    worker: bool
    """Whether its age-up worker runs."""
    request: int | None
    """The karma request the worker serves (None: none, or the generation-0 bootstrap)."""
    swaps: int
    last_swap: dict | None
    last_error: str | None
    started: float
    """When the daemon started (Unix time)."""


def _tasks(ledger: Ledger, intake: Intake, served: int | None) -> dict:
    """Each task with rows or an adapter on the served generation: its taught rows, probes, and that adapter."""
    from evolution import tasks

    adapters = tasks.served_adapters(ledger, served) if served is not None else {}
    return {t: {"taught_rows": len(tasks.records(intake, t)), "probes": len(intake.probes.items(t)),
                "adapter": {"generation": served, "sha256": adapters[t]["sha256"]} if t in adapters else None}
            for t in sorted(set(intake.tasks()) | set(adapters))}


def read(root: DataRoot, ledger: Ledger, intake: Intake, live: Live | None = None,
         retrieval: dict | None = None, staleness: dict | None = None) -> dict:
    """The lineage's state as ``/status`` shows it; ``live``: the running daemon's part (None: none runs here,
    read the data root alone: the served generation from the ledger, and no swaps, error or uptime);
    ``retrieval``: what is pending in retrieval (``evolution.retrieval.summary``; None: read from the index file
    with the lineage's ``[retrieval]`` settings); ``staleness``: the last drift check (``evolution.staleness.summary``;
    None: read from its state file likewise)."""
    job = progress.read(root)
    if live is None:
        served = ledger.served_generation()
        out = {"served": None if served is None else {"generation": served, "model": model_id(served, root.lineage)},
               "ageup": {"running": bool(job and job.get("running")), "request": None, "progress": job}}
    else:
        slot = live.slot
        if job is not None and job.get("state") == "running" and not live.worker:
            job["state"] = "interrupted"
        out = {"served": None if slot is None else {"generation": slot.gen, "model": slot.id, "sha256": slot.sha256,
                                                    "loaded_at": slot.loaded_at},
               "ageup": {"running": live.worker, "request": live.request, "progress": job}}
    if retrieval is None or staleness is None:
        from evolution import config
        from evolution import retrieval as retrieval_mod
        from evolution import staleness as staleness_mod

        try:
            retrieval = retrieval or retrieval_mod.summary(root, config.resolve_retrieval(home=root.home))
        except ConfigError as exc:
            retrieval = {"enabled": None, "note": str(exc)}
        try:
            staleness = staleness or staleness_mod.summary(root, config.resolve_staleness(home=root.home))
        except ConfigError as exc:
            staleness = {"enabled": None, "note": str(exc)}
    out |= {"karma": intake.karma.state().to_dict(), "paused": paused_reason(ledger)} | intake.counts()
    out["retrieval"], out["staleness"] = retrieval, staleness
    out["tasks"] = _tasks(ledger, intake, out["served"] and out["served"]["generation"])
    if live is None:
        return out | {"last_error": None}
    return out | {"swaps": live.swaps, "last_swap": live.last_swap, "last_error": live.last_error,
                  "uptime_s": round(time.time() - live.started, 1)}

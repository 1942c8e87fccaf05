"""Promotion: what happens to a finished, gated generation — served or rejected — and the stop rule.

The age-up (``evolution.ageup``) ends when its child is built and its gate result recorded.
Deciding the child's fate lives here, for every caller alike:

- ``evolve age-up`` calls ``decide`` with no swap (a running daemon follows the ledger);
- the daemon calls ``reconcile`` with its hot-swap as ``swap``, after its worker finished and
  at start (a crash may have left a generation finished but unrecorded or undecided).

A passing child is recorded ``promoted`` only after ``swap`` succeeded; a swap that fails
(the model does not load, its canary fails) records it ``rejected`` and the parent stays served.
So does a rollback made while the child was being built (the served generation is no longer its
parent): the person's choice stands, and the child, which passed its gate, can be served by hand.
The layer above passes the swap in; nothing here calls back up.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Callable

from evolution.errors import EvolutionError
from evolution.generation import GenerationSummary
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import DataRoot, gen_name

log = logging.getLogger(__name__)

SwapFn = Callable[[int, dict], None]
"""swap(gen, gguf): make generation ``gen`` the served model from ``gguf``, the ledger's record of its
GGUF (``path`` relative to the data root, ``sha256``); raise EvolutionError if it cannot be served."""

PROMOTED, REJECTED, UNDECIDED = "promoted", "rejected", "undecided"


def record_built(root: DataRoot, ledger: Ledger, s: GenerationSummary) -> None:
    """Append what a built generation still lacks in the ledger before its fate: ``exported`` and its
    ``gate_result`` (generation 0 is measured, not gated)."""
    have = {e.kind for e in ledger.entries(gen=s.gen)}
    if ev.EXPORTED not in have:
        rel = root.gen_dir(s.gen).relative_to(root.root)
        artifacts = [asdict(a) | {"path": (rel / a.path).as_posix()} for a in s.artifacts]
        ledger.record(ev.exported(s.gen, artifacts, s.quantization, stage_seconds=s.stage_seconds, smoke=s.smoke,
                                  **({"weights": s.weights} if s.weights else {})))
    g = s.gate or {}
    if s.gen != 0 and ev.GATE_RESULT not in have:
        ledger.record(ev.gate_result(s.parent, s.gen, g["metrics"], g["thresholds"], g["verdict"],
                                     parent_metrics=g["parent_metrics"], reasons=g["reasons"],
                                     # a generation gated before the metric table has neither:
                                     **{k: g[k] for k in ("checks", "metric_versions", "anchors", "fingerprints", "probes",
                                                          "retrieval") if k in g}))
    if s.tasks:
        from evolution import tasks  # its gate's llama.cpp and ROUGE only where a generation has task adapters

        tasks.record(ledger, s.gen, s.tasks)


def fate(ledger: Ledger, gen: int) -> str:
    """``promoted``, ``rejected`` or ``undecided`` as the ledger has it (generation 0 counts as promoted
    once any generation was served: it is never rejected)."""
    kinds = {e.kind for e in ledger.entries(gen=gen)}
    if ev.PROMOTED in kinds or (gen == 0 and ledger.served_generation() is not None):
        return PROMOTED
    return REJECTED if ev.REJECTED in kinds else UNDECIDED


def decide(root: DataRoot, ledger: Ledger, gen: int, stop_after: int, swap: SwapFn | None = None) -> str:
    """Promote or reject the recorded generation ``gen``; return its fate. Deciding twice changes nothing.

    Generation 0 is the base model: measured, not gated, promoted when nothing is served yet.
    A passing child is swapped in first (when ``swap`` is given) and recorded ``promoted`` only
    if that worked. After a child is decided the stop rule is applied.
    """
    current = fate(ledger, gen)
    if current != UNDECIDED:
        return current
    s = GenerationSummary.load(root.gen_dir(gen))
    record_built(root, ledger, s)
    if gen == 0:
        if swap is not None:
            swap(0, ledger.generation(0).gguf)  # nothing else to serve: a failure stops the caller with its message
        ledger.record(ev.promoted(0, reason="generation 0 is the base model: measured, not gated",
                                  metrics=(s.gate or {}).get("metrics")))
        return PROMOTED
    served = ledger.served_generation()
    if s.verdict == ev.PASS and served is not None and served != s.parent:
        reason = (f"passed its gate against generation {s.parent}, but generation {served} was made the served one "
                  f"during its age-up (a rollback): a person's choice is not overridden; `evolve rollback --to {gen}` "
                  "serves it")
        log.warning("generation %d %s", gen, reason)
        ledger.record(ev.rejected(gen, reason))
        result = REJECTED
    elif s.verdict == ev.PASS:
        try:
            if swap is not None:
                swap(gen, ledger.generation(gen).gguf)
        except EvolutionError as exc:
            log.error("generation %d passed its gate but was not served: %s", gen, exc)
            ledger.record(ev.rejected(gen, f"passed its gate but could not be served: {exc}"))
            result = REJECTED
        else:
            ledger.record(ev.promoted(gen, reason=f"passed its gate against generation {s.parent}"))
            result = PROMOTED
    else:
        ledger.record(ev.rejected(gen, "; ".join((s.gate or {}).get("reasons") or ["failed its gate"])))
        result = REJECTED
    apply_stop_rule(ledger, stop_after)
    return result


def record_finished(root: DataRoot, ledger: Ledger) -> list[int]:
    """Record every generation finished on disk whose outcome the ledger lacks (a crash in between);
    return the numbers of those still undecided, oldest first.

    Their files are re-hashed against their own ``generation.json`` first; a mismatch is refused.
    A ledger whose history does not verify is refused before anything is appended to it (an
    append would move the exported head onto the changed history).
    """
    ledger.check_history()
    return [n for n in root.generations() if _record_if_needed(root, ledger, n)]


def reconcile(root: DataRoot, ledger: Ledger, stop_after: int, swap: SwapFn | None = None) -> list[int]:
    """Record and decide, oldest first, every finished generation the ledger has not decided; return them."""
    ledger.check_history()
    decided = []
    for n in root.generations():
        if _record_if_needed(root, ledger, n):
            decide(root, ledger, n, stop_after, swap)
            decided.append(n)
    return decided


def _record_if_needed(root: DataRoot, ledger: Ledger, n: int) -> bool:
    """Record generation ``n``'s build if the ledger lacks it; True if its fate is still open."""
    kinds = {e.kind for e in ledger.entries(gen=n)}
    if ev.EXPORTED in kinds and fate(ledger, n) != UNDECIDED:
        return False
    s = GenerationSummary.load(root.gen_dir(n))
    s.check_files(root.gen_dir(n))  # changed since it was built (and gated): never recorded, decided or served
    if not (ev.EXPORTED in kinds and (n == 0 or ev.GATE_RESULT in kinds)):
        log.info("recording the outcome of %s", gen_name(n))
        record_built(root, ledger, s)
    return True


def apply_stop_rule(ledger: Ledger, stop_after: int) -> None:
    """Pause age-ups when the last ``stop_after`` children (since the last resume) did not improve recall."""
    since = max((e.seq for e in ledger.entries(kind=ev.AGEUPS_RESUMED)), default=0)
    results = [e.payload for e in ledger.entries(kind=ev.GATE_RESULT, since=since)]
    reason = stop_rule(results, stop_after)
    if reason and paused_reason(ledger) is None:
        log.warning("pausing age-ups: %s", reason)
        ledger.record(ev.ageups_paused(reason))


def stop_rule(gate_results: list[dict], stop_after: int) -> str | None:
    """Why age-ups should pause, if the last ``stop_after`` children did not improve recall over their parents."""
    recent = gate_results[-stop_after:]
    if len(recent) < stop_after:
        return None
    flat = [(r["child"], r["metrics"]["recall"], (r.get("parent_metrics") or {}).get("recall")) for r in recent]
    if all(parent is not None and child_recall <= parent for _, child_recall, parent in flat):
        detail = ", ".join(f"gen {g}: {c:.2f} vs parent {p:.2f}" for g, c, p in flat)
        return (f"the last {stop_after} children did not improve recall over their parents ({detail}); "
                "change the curriculum or the config, then run `evolve resume`")
    return None


def paused_reason(ledger: Ledger) -> str | None:
    """Why age-ups are paused, or None: the last pause not followed by a resume."""
    paused = ledger.entries(kind=ev.AGEUPS_PAUSED)  # two indexed lookups: the daemon asks every second
    if not paused:
        return None
    resumed = ledger.entries(kind=ev.AGEUPS_RESUMED, since=paused[-1].seq)
    return None if resumed else paused[-1].payload["reason"]

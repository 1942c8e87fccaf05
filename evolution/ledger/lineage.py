"""Derived views of the event log: one summary row per generation, and one generation in full.

Nothing here is stored: the views are folded from the entries every time, so they can never
disagree with the ledger.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from evolution.errors import UnknownGeneration
from evolution.ledger import events as ev
from evolution.ledger.entry import Entry

# Lifecycle status of a generation, by the last event that concerns it.
_STATUS = {
    ev.GENERATION_CREATED: "created",
    ev.TRAINING_STARTED: "training",
    ev.TRAINING_FINISHED: "trained",
    ev.EXPORTED: "exported",
    ev.PROMOTED: "promoted",
    ev.REJECTED: "rejected",
}


@dataclass
class GenerationRow:
    """One row of ``evolve ledger``."""

    gen: int
    parent: int | None = None
    created: str | None = None
    status: str = "unknown"
    verdict: str | None = None  # "pass" / "fail" / None (not gated; generation 0 needs no gate)
    metrics: dict = field(default_factory=dict)
    gguf_sha256: str | None = None
    gguf_path: str | None = None
    quantization: str | None = None
    reason: str | None = None  # why rejected or rolled back
    served: bool = False
    pruned: str | None = None
    """``generation`` (its GGUF and weights were deleted by the retention policy: it cannot be served),
    ``weights`` (only its merged weights: rebuilt from the adapters when it is trained from), or None."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationDetail:
    """Everything the ledger knows about one generation (``evolve ledger show N``)."""

    summary: GenerationRow
    lineage: list[int]  # this generation, its parent, ... back to the base
    base: str | None
    config_hash: str | None
    manifest_hash: str | None
    config: dict | None
    manifest: dict | list | None
    training: dict | None
    artifacts: list[dict]
    gate: dict | None
    events: list[Entry]
    weights: dict | None = None
    """How its weights moved, per layer, as its ``exported`` entry recorded it (``evolution.weights``); None for
    generation 0 and a generation built before it was measured."""
    tokenizer: dict | None = None
    """For generation 0 of a lineage whose tokenizer ``evolve tokenizer extend`` extended: tokens added, vocabulary
    before and after, tokens per word (``evolution.vocab``)."""

    @property
    def gguf(self) -> dict | None:
        """The record of the GGUF this generation was exported as (``path``, ``sha256``, ``size``), or None."""
        return gguf_artifact(self.artifacts)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("summary", "events")}
        return {**self.summary.to_dict(), **d, "events": [e.to_dict() for e in self.events]}


def gguf_artifact(artifacts: list[dict]) -> dict | None:
    """The GGUF among a generation's exported artifacts (the last one, if it was exported twice)."""
    return next((a for a in reversed(artifacts) if a.get("kind") == "gguf"), None)
def gate_rows(gate: dict) -> list[dict]:
    """One row per metric of a ``gate_result`` payload: child and parent value, the rules applied, skipped ones.

    ``rules`` are the checks the gate recorded for the metric (``checks``, written from the metric
    table); a payload from before the table has none, and a threshold recorded under the metric's
    own name stands in. ``skipped`` holds why a rule was not applied (not enough data).
    """
    parents = gate.get("parent_metrics") or {}
    checks = gate.get("checks")
    rows = []
    for name, v in gate.get("metrics", {}).items():
        child, parent = (v.get("child"), v.get("parent")) if isinstance(v, dict) else (v, parents.get(name))
        if checks is None:
            t = gate.get("thresholds", {}).get(name)
            rules, skipped = ([] if t is None else [{"rule": str(t), "passed": None}]), []
        else:
            mine = [c for c in checks if c.get("metric") == name]
            rules = [{"rule": c["rule"], "passed": c["passed"]} for c in mine if c["passed"] is not None]
            skipped = [c["message"] for c in mine if c["passed"] is None]
        rows.append({"metric": name, "child": child, "parent": parent, "rules": rules, "skipped": skipped})
    return rows


def summarize(entries: list[Entry]) -> list[GenerationRow]:
    gens: dict[int, GenerationRow] = {}
    served: int | None = None

    def get(n: int) -> GenerationRow:
        return gens.setdefault(n, GenerationRow(gen=n))

    for e in entries:
        p = e.payload
        if e.kind == ev.KARMA_THRESHOLD_CROSSED or e.gen is None:
            continue
        g = get(e.gen)
        if e.kind == ev.GENERATION_CREATED:
            g.parent, g.created = p.get("parent"), e.time
        elif e.kind == ev.EXPORTED:
            art = gguf_artifact(p.get("artifacts", []))
            if art:
                g.gguf_sha256, g.gguf_path = art.get("sha256"), art.get("path")
            g.quantization = p.get("quantization")
        elif e.kind == ev.GATE_RESULT:
            g.verdict, g.metrics = p.get("verdict"), dict(p.get("metrics", {}))
            if g.parent is None:
                g.parent = p.get("parent")
            g.status = "passed" if g.verdict == ev.PASS else "failed"
            continue
        elif e.kind == ev.REJECTED:
            g.reason = p.get("reason")
        elif e.kind == ev.PRUNED:
            g.pruned = ev.PRUNE_GENERATION if ev.PRUNE_GENERATION in (g.pruned, p.get("scope")) else p.get("scope")
            continue
        elif e.kind == ev.REBUILT:
            g.pruned = None if g.pruned == ev.PRUNE_WEIGHTS else g.pruned
            continue
        elif e.kind == ev.ROLLED_BACK:
            src = p.get("from")
            if src is not None and src != e.gen:
                get(src).status, get(src).reason = "rolled_back", p.get("reason")
            g.status, served = "promoted", e.gen
            continue
        if e.kind == ev.PROMOTED:
            served = e.gen
            if not g.metrics and isinstance(p.get("metrics"), dict):
                g.metrics = dict(p["metrics"])  # generation 0: measured, not gated — the baseline
        g.status = _STATUS.get(e.kind, g.status)
    if served is not None:
        get(served).served = True
    return [gens[n] for n in sorted(gens)]


def _concerns(e: Entry, n: int) -> bool:
    return e.gen == n or (e.kind == ev.ROLLED_BACK and e.payload.get("from") == n)


def detail(entries: list[Entry], n: int) -> GenerationDetail:
    rows = {g.gen: g for g in summarize(entries)}
    if n not in rows:
        known = ", ".join(str(g) for g in sorted(rows)) or "none yet"
        raise UnknownGeneration(f"generation {n} is not in the ledger (known: {known}); `evolve ledger` lists them")
    created = {e.gen: e.payload for e in entries if e.kind == ev.GENERATION_CREATED}
    lineage, cur = [n], rows[n].parent
    while cur is not None and cur not in lineage:
        lineage.append(cur)
        cur = rows[cur].parent if cur in rows else None
    mine = [e for e in entries if _concerns(e, n)]
    c = created.get(n, {})

    def last(kind: str) -> dict | None:
        found = [e.payload for e in mine if e.kind == kind and e.gen == n]
        return found[-1] if found else None

    exported = last(ev.EXPORTED)
    return GenerationDetail(
        summary=rows[n],
        lineage=lineage,
        base=c.get("base"),
        config_hash=c.get("config_hash"),
        manifest_hash=c.get("manifest_hash"),
        config=c.get("config"),
        manifest=c.get("manifest"),
        training=last(ev.TRAINING_FINISHED),
        artifacts=list(exported.get("artifacts", [])) if exported else [],
        gate=last(ev.GATE_RESULT),
        events=mine,
        weights=(exported or {}).get("weights") or None,
        tokenizer=(c.get("source") or {}).get("tokenizer"),
    )

"""The gate's second figure: the child's probe recall with retrieval on, as chat would serve it once promoted.

The gate decides on the weights alone: it asks without retrieval, because the weights must carry the lessons
(``evolution.gate``). A user meets the served child with retrieval on, though, and a lesson the child did not
learn is still in the index and reaches the prompt. So an age-up also reports, for information, the gate's probes
asked as chat would ask them after this child's promotion:

- the lessons pending then: every lesson of the lineage (``items.taught``) less those this child or one of its
  ancestors answered right at its gate (``items.learned``: the hand-over), in a scratch FTS5 index;
- each probe for which retrieval finds notes (``lookup``, under the lineage's ``[retrieval]`` settings) is asked
  again with them (``with_notes``; folded for a template without a system role, as chat folds it); a probe with
  none keeps the gate's own reply, which is what chat would give (the same prompt at temperature 0).

Nothing here changes the verdict. It costs one reply per probe that has notes (about 0.3 s each on 2 cores), and
what the child was asked is remembered with its other answers (``evolution.metrics.answers``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from evolution import evals
from evolution.config import RetrievalConfig
from evolution.metrics.common import Models
from evolution.retrieval import lookup, with_notes
from evolution.retrieval import items as items_mod
from evolution.retrieval.fts import Fts5Index
from evolution.retrieval.items import Item

BACKEND = "fts5"
"""The scratch index is FTS5 whatever the lineage's backend (a Chroma store with model embeddings would take a
minute or more to build for one figure); the report says so where the lineage uses another."""


def lessons_after(taught: list[Item], carried: set[tuple[str, str]], child_experience: list[dict]) -> list[Item]:
    """The lessons retrieval would hold once the child is served: ``taught`` less ``carried`` (what the parent's line
    answered right at its gates) and less what the child answered right at its own (``child_experience``: its
    ``experience_similarity`` items)."""
    return items_mod.pending(taught, carried | items_mod.answered_right(child_experience))


def _messages(probe: dict) -> list[dict]:
    return ([{"role": "system", "content": probe["system"]}] if probe.get("system") else []) + \
        [{"role": "user", "content": probe["question"]}]


def probe_recall(gguf: Path, probes: list[dict], asked: list[dict], lessons: list[Item], cfg: RetrievalConfig,
                 max_tokens: int, answers: Path | None = None) -> dict:
    """The probes (``probes``: the gate's items; ``asked``: the child's ``probe_recall`` results, by ``id``) with
    retrieval over ``lessons``: the figure with and without, how many probes had notes, and each probe's reply."""
    t0 = time.perf_counter()
    gate_reply = {r["id"]: r for r in asked}
    rows = []
    with tempfile.TemporaryDirectory(prefix="evolution-gate-notes-") as tmp, Models(gguf, answers=answers) as models:
        index = Fts5Index(Path(tmp) / "notes.sqlite")
        index.write(lessons, {"for": "the gate's figure with retrieval"})
        for probe in probes:
            before = gate_reply.get(probe["id"])
            if before is None:
                continue
            notes, _ = lookup(index, cfg, probe["question"])
            row = {"id": probe["id"], "question": probe["question"], "notes": [n.key for n in notes],
                   "without": bool(before["correct"]), "reply": before["reply"], "correct": bool(before["correct"])}
            if notes:  # (a template without a system role folds the notes' turn: ``llamacpp.open_llama``)
                row["reply"] = evals.reply(models.llm, with_notes(_messages(probe), notes), max_tokens)
                row["correct"] = evals.is_correct(row["reply"], probe["answers"])
            rows.append(row)
    n = len(rows)
    return {"probe_recall": sum(r["correct"] for r in rows) / n if n else None,
            "without": sum(r["without"] for r in rows) / n if n else None,
            "probes": n, "with_notes": sum(bool(r["notes"]) for r in rows), "lessons": len(lessons),
            "backend": BACKEND, "lineage_backend": cfg.backend, "top_k": cfg.top_k, "max_tokens": cfg.max_tokens,
            "seconds": round(time.perf_counter() - t0, 1), "items": rows}


def report_lines(figure: dict) -> list[str]:
    """The gate report's section on it."""
    if not figure.get("probes"):
        return []
    with_, without = figure["probe_recall"], figure["without"]
    lines = ["## With retrieval (for information: the verdict is on the weights alone)", "",
             f"Probe recall as chat would answer once this child is served, with the lessons it would still find in "
             f"retrieval ({figure['lessons']}: those no gate of the line answered right): **{with_:.3f}**, against "
             f"{without:.3f} on the weights alone. {figure['with_notes']} of {figure['probes']} probes found notes "
             f"(top_k {figure['top_k']}, max_tokens {figure['max_tokens']}, {figure['backend']} index)."]
    if figure.get("lineage_backend", figure["backend"]) != figure["backend"]:
        lines[-1] += f" The lineage serves with {figure['lineage_backend']}; this figure was taken with FTS5."
    changed = [r for r in figure["items"] if r["notes"] and r["correct"] != r["without"]]
    if changed:
        lines += ["", "Probes the notes changed:", ""]
        lines += evals.answer_lines([{"question": r["question"], "reply": r["reply"], "correct": r["correct"]}
                                     for r in changed[:20]])
    return lines + [""]

"""recall: the fraction of recall items answered correctly, overall and per curriculum phase.

The items are the curriculum's plus those every ancestor generation was gated on, so
forgetting an earlier generation's facts shows. An answer counts as in
``evolution.evals.is_correct``. With no items the value is 0.0, which fails ``gate.min_recall``:
the gate's first purpose is recall, and it passes nothing it cannot measure it on.
Rules: ``gate.min_recall`` (required), ``gate.recall_margin`` below the parent, the persona's own facts (the identity
phase's items) ``gate.identity_recall_margin`` below the parent's, and against a fixed anchor
``gate.best_recall_budget`` below the lineage's best (a cumulative budget, not one per step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from evolution import evals
from evolution.checks import share_or_unset
from evolution.metrics.common import (Anchor, Check, Inputs, Measured, Metric, Models, at_least, not_below_anchor,
                                      not_below_parent)


@dataclass(slots=True)
class RecallConfig:
    """``[gate]`` settings of ``recall``."""

    min_recall: float | None = 0.7
    """Child recall (fraction of recall items answered correctly) must be at least this."""
    recall_margin: float | None = 0.05
    """Child recall may not fall more than this below the parent's (forgetting)."""
    identity_recall_margin: float | None = 0.02
    """Recall of the persona's own facts (the identity phase's items) may not fall more than this below the parent's:
    what keeps the user's facts apart from the agent's must not take the agent's away (issue 27)."""
    best_recall_budget: float | None = 0.05
    """Recall may not fall more than this below the highest of the lineage so far (all steps together: a fixed
    anchor; docs/learning.md, "No ratchet")."""

    def problems(self) -> list[str]:
        return (share_or_unset("gate.min_recall", self.min_recall)
                + share_or_unset("gate.recall_margin", self.recall_margin)
                + share_or_unset("gate.identity_recall_margin", self.identity_recall_margin)
                + share_or_unset("gate.best_recall_budget", self.best_recall_budget, bools=False))


class Recall(Metric):
    name = "recall"
    config = RecallConfig
    required = ("min_recall",)
    better = "higher"
    reads = ("recall",)

    def settings(self, inputs: Inputs) -> dict:
        return {"answer_max_tokens": inputs.cfg.answer_max_tokens}

    def cost(self, inputs: Inputs) -> float:
        return len(inputs.es.recall)

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        items = inputs.es.recall
        score, results = evals.recall(models.llm, items, inputs.cfg.answer_max_tokens)
        by_phase: dict[str, list[bool]] = {}
        for item, r in zip(items, results):
            by_phase.setdefault(str(item.get("phase", "-")), []).append(r.correct)
        mine = [r.correct for item, r in zip(items, results) if item.get("phase") in inputs.es.identity_phases]
        return Measured(score, {"by_phase": {k: sum(v) / len(v) for k, v in sorted(by_phase.items())},
                                "identity": sum(mine) / len(mine) if mine else None,
                                "items": [asdict(r) for r in results]})

    def rules(self, child: Measured, parent: Measured | None, cfg: RecallConfig) -> list[Check]:
        return (at_least(self.name, child.value, cfg, "min_recall")
                + not_below_parent(self.name, child.value, parent, cfg, "recall_margin") + self._identity(child, parent, cfg))

    def _identity(self, child: Measured, parent: Measured | None, cfg: RecallConfig) -> list[Check]:
        c = child.details.get("identity")
        p = parent.details.get("identity") if parent is not None else None
        if c is None or p is None or cfg.identity_recall_margin is None:
            return []
        ok = c >= p - cfg.identity_recall_margin - 1e-9
        return [Check(self.name, "gate.identity_recall_margin", f"identity >= parent - {cfg.identity_recall_margin}",
                      ok, "" if ok else f"recall of the persona's own facts {c:.3f} fell below the parent's {p:.3f} "
                      f"by more than {cfg.identity_recall_margin} (gate.identity_recall_margin)")]

    def anchor_rules(self, child: Measured, gen0: Anchor | None, best: Anchor | None, cfg: RecallConfig) -> list[Check]:
        return not_below_anchor(self.name, child.value, best, "the best", cfg, "best_recall_budget")

    def rows(self, child, parent):
        parent_phases = parent.details["by_phase"] if parent else {}
        return super().rows(child, parent) + [(f"recall, phase {k}", v, parent_phases.get(k))
                                              for k, v in child.details["by_phase"].items()]

    def markdown(self, child: Measured) -> list[str]:
        return ["## Recall answers", ""] + evals.answer_lines(child.details["items"])

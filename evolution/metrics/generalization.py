"""generalization: the fraction of held-out paraphrased questions (never trained on) answered correctly.

Scored like recall. With no items it is not measured (nothing to say, nothing to block on).
Rules: ``gate.generalization_margin`` below the parent; ``gate.best_generalization_budget`` below the
lineage's best (a fixed anchor: a cumulative budget).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from evolution import evals
from evolution.checks import share_or_unset
from evolution.metrics.common import Anchor, Check, Inputs, Measured, Metric, Models, not_below_anchor, not_below_parent


@dataclass(slots=True)
class GeneralizationConfig:
    """``[gate]`` settings of ``generalization``."""

    generalization_margin: float | None = 0.10
    """Held-out question accuracy may not fall more than this below the parent's."""
    best_generalization_budget: float | None = 0.10
    """Held-out question accuracy may not fall more than this below the highest of the lineage so far (a fixed
    anchor)."""

    def problems(self) -> list[str]:
        return (share_or_unset("gate.generalization_margin", self.generalization_margin)
                + share_or_unset("gate.best_generalization_budget", self.best_generalization_budget, bools=False))


class Generalization(Metric):
    name = "generalization"
    config = GeneralizationConfig
    better = "higher"
    reads = ("generalization",)

    def settings(self, inputs: Inputs) -> dict:
        return {"answer_max_tokens": inputs.cfg.answer_max_tokens}

    def cost(self, inputs: Inputs) -> float:
        return len(inputs.es.generalization)

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        if not inputs.es.generalization:
            return Measured(None, note="no held-out questions in eval/generalization.jsonl")
        score, results = evals.recall(models.llm, inputs.es.generalization, inputs.cfg.answer_max_tokens)
        return Measured(score, {"items": [asdict(r) for r in results]})

    def rules(self, child: Measured, parent: Measured | None, cfg: GeneralizationConfig) -> list[Check]:
        return not_below_parent(self.name, child.value, parent, cfg, "generalization_margin")

    def anchor_rules(self, child: Measured, gen0: Anchor | None, best: Anchor | None,
                     cfg: GeneralizationConfig) -> list[Check]:
        return not_below_anchor(self.name, child.value, best, "the best", cfg, "best_generalization_budget")

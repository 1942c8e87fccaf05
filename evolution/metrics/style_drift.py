"""style_drift: how far the child's replies to the style prompts are from the style references.

In reference standard deviations (``evolution.evals.style_drift``); the drift from the parent's
replies is reported beside it as ``style_drift_from_parent``. With no style prompts it is not
measured. Rule: at most ``gate.max_style_drift`` (required).
"""

from __future__ import annotations

from dataclasses import dataclass

from evolution import evals
from evolution.checks import positive_or_unset
from evolution.metrics.common import Check, Inputs, Measured, Metric, Models, at_most


@dataclass(slots=True)
class StyleDriftConfig:
    """``[gate]`` settings of ``style_drift``."""

    max_style_drift: float | None = 2.0
    """Child style drift from the style references, in reference standard deviations, at most this."""

    def problems(self) -> list[str]:
        return positive_or_unset("gate.max_style_drift", self.max_style_drift)


class StyleDrift(Metric):
    name = "style_drift"
    config = StyleDriftConfig
    label = "style drift (ref. SDs)"
    required = ("max_style_drift",)

    def settings(self, inputs: Inputs) -> dict:
        return {"max_tokens": inputs.cfg.answer_max_tokens * 2}

    def cost(self, inputs: Inputs) -> float:
        return 2 * len(inputs.es.style_prompts)  # replies twice as long as an answer's

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        es = inputs.es
        if not es.style_prompts:
            return Measured(None, note="no style prompts in eval/style.jsonl")
        replies = [evals.ask(models.llm, p, None, inputs.cfg.answer_max_tokens * 2) for p in es.style_prompts]
        mu, sd = evals.style_scale(es.style_references)
        return Measured(evals.style_drift(replies, mu, sd), {"replies": replies})

    def rules(self, child: Measured, parent: Measured | None, cfg: StyleDriftConfig) -> list[Check]:
        return at_most(self.name, child.value, cfg, "max_style_drift")

    def versus_parent(self, child: Measured, parent: Measured, inputs: Inputs) -> dict[str, float]:
        _, sd = evals.style_scale(inputs.es.style_references)
        mean = evals.style_mean(parent.details["replies"])
        return {"style_drift_from_parent": evals.style_drift(child.details["replies"], mean, sd)}

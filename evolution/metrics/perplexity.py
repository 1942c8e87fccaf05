"""perplexity: exp(mean token negative log-likelihood) of held-out prose, from llama.cpp's logits.

Lower is better. With no held-out text (or none of two tokens or more) it is not measured.
Rules: at most ``gate.max_perplexity_ratio`` times the parent's; against fixed anchors, at most
``gate.anchor_perplexity_ratio`` times generation 0's and ``gate.best_perplexity_ratio`` times the lineage's
lowest, so general language cannot erode a permitted step at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from evolution import evals
from evolution.checks import anchor_ratio, positive_or_unset
from evolution.metrics.common import Anchor, Check, Inputs, Measured, Metric, Models, within_anchor_ratio


@dataclass(slots=True)
class PerplexityConfig:
    """``[gate]`` settings of ``perplexity``."""

    max_perplexity_ratio: float | None = 1.5
    """Held-out text perplexity may be at most this multiple of the parent's."""
    anchor_perplexity_ratio: float | None = 1.10
    """Held-out text perplexity at most this multiple of generation 0's (the untrained base's general language)."""
    best_perplexity_ratio: float | None = 1.25
    """Held-out text perplexity at most this multiple of the lowest of the lineage so far."""

    def problems(self) -> list[str]:
        return (positive_or_unset("gate.max_perplexity_ratio", self.max_perplexity_ratio)
                + anchor_ratio("gate.anchor_perplexity_ratio", self.anchor_perplexity_ratio)
                + anchor_ratio("gate.best_perplexity_ratio", self.best_perplexity_ratio))


class Perplexity(Metric):
    name = "perplexity"
    config = PerplexityConfig
    label = "perplexity (held-out text)"
    better = "lower"
    reads = ("heldout_text",)

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        if not inputs.es.heldout_text:
            return Measured(None, note="no held-out text in eval/heldout_text.jsonl")
        ppl = evals.perplexity(models.scorer, inputs.es.heldout_text)
        if math.isnan(ppl):
            return Measured(None, note="no held-out text of two tokens or more")
        return Measured(ppl)

    def rules(self, child: Measured, parent: Measured | None, cfg: PerplexityConfig) -> list[Check]:
        ratio = cfg.max_perplexity_ratio
        if ratio is None or parent is None:
            return []
        ok = child.value <= parent.value * ratio
        return [Check(self.name, "gate.max_perplexity_ratio", f"<= {ratio} x parent", ok,
                      "" if ok else f"perplexity {child.value:.2f} > {ratio} x the parent's {parent.value:.2f} "
                                    "(gate.max_perplexity_ratio)")]

    def anchor_rules(self, child: Measured, gen0: Anchor | None, best: Anchor | None,
                     cfg: PerplexityConfig) -> list[Check]:
        return (within_anchor_ratio(self.name, child.value, gen0, "generation 0", cfg, "anchor_perplexity_ratio")
                + within_anchor_ratio(self.name, child.value, best, "the best", cfg, "best_perplexity_ratio"))

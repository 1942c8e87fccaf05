"""preference_margin: does the model find the replies its user liked more likely than the ones they did not?

On a seeded held-out share of the rated experiences that the child never trained on
(``data/preference_heldout.jsonl``): the mean per-token log-likelihood of the good replies (and
corrections) minus that of the bad ones (and the replies that were corrected), from llama.cpp's
logits on the GGUF, each reply scored as the assistant's answer to its own prompt rendered with
the model's chat template. In nats per token; higher is better. A child that learned the replies
rated bad loses margin against its parent. With fewer than ``gate.min_preference_items`` held-out
replies, or without both a good and a bad one, it says "not enough data" and does not block.
Rule: ``gate.preference_margin_drop`` below the parent's.
"""

from __future__ import annotations

from evolution import evals
from evolution.config import GateConfig
from evolution.metrics.common import Check, Inputs, Measured, Metric, Models, not_below_parent


def scored_replies(items: list[dict]) -> list[tuple[list[dict], str, bool]]:
    """``(prompt, reply, good)`` for every reply of the held-out records: a rated reply, or both sides of a pair."""
    out = []
    for r in items:
        if "chosen" in r:
            out += [(r["prompt"], r["chosen"], True), (r["prompt"], r["rejected"], False)]
        else:
            out.append((r["prompt"], r["reply"], r["label"] == "good"))
    return out


def margin(scores: list[tuple[float, bool]]) -> float:
    """Mean log-likelihood of the good replies minus that of the bad ones."""
    good = [s for s, g in scores if g]
    bad = [s for s, g in scores if not g]
    return sum(good) / len(good) - sum(bad) / len(bad)


class PreferenceMargin(Metric):
    name = "preference_margin"
    label = "preference margin (nats/token)"

    def settings(self, inputs: Inputs) -> dict:
        return {"min_items": inputs.cfg.min_preference_items}

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        replies, least = scored_replies(inputs.es.preference_heldout), inputs.cfg.min_preference_items
        kinds = {good for _, _, good in replies}
        if len(replies) < least or kinds != {True, False}:
            return Measured(None, note=f"{len(replies)} held-out rated replies ({sum(g for *_, g in replies)} good), "
                                       f"at least {least} with both labels needed (gate.min_preference_items)")
        rows = []
        for prompt, reply, good in replies:
            lp = evals.reply_logprob(models.scorer, prompt, reply)
            if lp is not None:
                rows.append({"prompt": prompt[-1]["content"], "reply": reply, "good": good, "logprob": lp})
        if {r["good"] for r in rows} != {True, False}:
            return Measured(None, note="the held-out replies did not fit the context window")
        return Measured(margin([(r["logprob"], r["good"]) for r in rows]), {"items": rows})

    def rules(self, child: Measured, parent: Measured | None, cfg: GateConfig) -> list[Check]:
        return not_below_parent(self.name, child.value, parent, cfg, "preference_margin_drop")

    def markdown(self, child: Measured) -> list[str]:
        lines = [f"- {'good' if r['good'] else 'bad '} {r['logprob']:.3f} {r['prompt'][:60]!r} → {r['reply'][:80]!r}"
                 for r in child.details["items"]]
        return ["## Held-out rated replies (mean log-likelihood per token)", ""] + lines

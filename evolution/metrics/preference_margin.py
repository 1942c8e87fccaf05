"""preference_margin: does the model find the replies its user liked more likely than the ones they did not?

On a seeded held-out share of the rated experiences that the child never trained on
(``data/preference_heldout.jsonl``): the mean per-token log-likelihood of the good replies (and
corrections) minus that of the bad ones (and the replies that were corrected), from llama.cpp's
logits on the GGUF, each reply scored as the assistant's answer to its own prompt rendered with
the model's chat template. In nats per token; higher is better. A child that learned the replies
rated bad loses margin against its parent. With fewer than ``gate.min_preference_items`` held-out
replies, or without both a good and a bad one, it says "not enough data" and does not block.
Rule: ``gate.preference_margin_drop`` below the parent's. Its lessons: each held-out rated reply with its
label, the log-likelihood parent and child give it, and what each of them answers to its prompt itself
(temperature 0; asked for the report, no rule uses it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from evolution import evals
from evolution.checks import positive_int
from evolution.metrics.common import (Check, Inputs, Lesson, Measured, Metric, Models, change, not_below_parent,
                                      pair_items)


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


@dataclass(slots=True)
class PreferenceMarginConfig:
    """``[gate]`` settings of ``preference_margin``."""

    min_preference_items: int = 4
    """``preference_margin`` needs this many held-out rated replies, good and bad among them (the held-out
    20 % of at least 20 new ratings)."""
    preference_margin_drop: float | None = 0.3
    """The child's margin (nats per token, good minus bad replies it never trained on) may fall at most this
    far below its parent's: a child that learned the replies rated bad loses margin. Measured (docs/learning.md):
    such a child (tests/test_slow_experience.py) fell 0.79-0.83 below its parent (0.767 to -0.027..-0.058
    in four runs, standard error 0.06); two quick children with ratings moved by +0.08 and +0.81, and on the
    learn benchmark's 7 held-out replies the margin's change has a standard error of 0.23 (which replies
    are held out is chance). 0.3 is over one such standard error, and under half the bad child's drop."""

    def problems(self) -> list[str]:
        p = positive_int("gate.min_preference_items", self.min_preference_items)
        drop = self.preference_margin_drop
        if drop is not None and (not isinstance(drop, (int, float)) or drop < 0):
            p.append(f"gate.preference_margin_drop must be a number >= 0 (or unset), got {drop!r}")
        return p


class PreferenceMargin(Metric):
    name = "preference_margin"
    config = PreferenceMarginConfig
    label = "preference margin (nats/token)"
    lessons_title = ("held-out rated replies (never trained on; mean log-likelihood per token of the rated reply: "
                     "higher is better for a good one, lower for a bad one; each model's own answer beside it)")
    lessons_columns = ("prompt", "rated reply", "log-lik.")

    def settings(self, inputs: Inputs) -> dict:
        return {"min_items": inputs.cfg.min_preference_items, "answer_max_tokens": inputs.cfg.answer_max_tokens}

    def cost(self, inputs: Inputs) -> float:
        return len(inputs.es.preference_heldout)

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        replies, least = scored_replies(inputs.es.preference_heldout), inputs.cfg.min_preference_items
        kinds = {good for _, _, good in replies}
        if len(replies) < least or kinds != {True, False}:
            return Measured(None, note=f"{len(replies)} held-out rated replies ({sum(g for *_, g in replies)} good), "
                                       f"at least {least} with both labels needed (gate.min_preference_items)")
        answers: dict[str, str] = {}  # the model's own answer to each prompt, asked before the scorer is opened
        for prompt, _, _ in replies:
            key = json.dumps(prompt, sort_keys=True)
            if key not in answers:
                answers[key] = evals.reply(models.llm, prompt, inputs.cfg.answer_max_tokens)
        rows = []
        for prompt, reply, good in replies:
            lp = evals.reply_logprob(models.scorer, prompt, reply)
            if lp is not None:
                rows.append({"prompt": prompt[-1]["content"], "reply": reply, "good": good, "logprob": lp,
                             "answer": answers[json.dumps(prompt, sort_keys=True)]})
        if {r["good"] for r in rows} != {True, False}:
            return Measured(None, note="the held-out replies did not fit the context window")
        return Measured(margin([(r["logprob"], r["good"]) for r in rows]), {"items": rows})

    def rules(self, child: Measured, parent: Measured | None, cfg: PreferenceMarginConfig) -> list[Check]:
        return not_below_parent(self.name, child.value, parent, cfg, "preference_margin_drop")

    def lessons(self, child: Measured, parent: Measured | None) -> list[Lesson]:
        return [Lesson(c["prompt"], f"{'good' if c['good'] else 'bad'}: {c['reply']}", p and p.get("answer"),
                       p and p["logprob"], c.get("answer"), c["logprob"],
                       change(c["logprob"], p and p["logprob"], higher_is_better=c["good"], tolerance=1e-4))
                for c, p in pair_items(child, parent, lambda r: (r["prompt"], r["reply"], r["good"]))]

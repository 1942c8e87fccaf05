"""experience_similarity: how close the model's replies come to the replies its user approved.

Asked on the prompts of the good and corrected experiences (and good conversations) the child
trained on (``data/preference.jsonl``: a good reply, or a correction, is the reference), at
temperature 0, and scored with ROUGE-L F1 (Google's ``rouge-score``) against the reference; the
value is the mean. Child and parent answer the same prompts, so the difference is what the
child took from its experience. With fewer than ``gate.min_experience_items`` items it says "not
enough data" and does not block. Rule: no further below the parent than ``gate.experience_margin`` or
``gate.experience_margin_se`` paired standard errors of the per-item change, whichever is more: on a few
items one reply reworded moves the mean by more than the margin (a child that learned its 20 new facts lost
0.056 on 18 items, paired SE 0.076, by saying "My makers are the Lantern Workshop." for "I was made by the
Lantern Workshop."), and a drop within the noise of the items is no evidence of a worse child. Its lessons: each
prompt with the approved reply, the parent's and the child's reply and their ROUGE-L.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# Imported here, not on first use: the gate measures on two threads, and rouge-score's import creates absl's
# logging handler on whatever ``sys.stderr`` is then. Imported in one thread while the other loads a model,
# that was llama-cpp-python's /dev/null file (``evolution.llamacpp.LOADING``), which the handler later closed.
from rouge_score import rouge_scorer, tokenizers

from evolution import evals
from evolution.checks import positive_int, share_or_unset
from evolution.metrics.common import Check, Inputs, Lesson, Measured, Metric, Models, change, pair_items

# Its tokenizer given, as the default one it would make: made without one, it logs that through absl, whose first
# log line sets up the root logger at WARNING (``logging.basicConfig``) before an entry point's own set-up, at
# import, and every INFO line of the process (the daemon's, a training rank's) went unwritten.
_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))


def rouge_l(reply: str, reference: str) -> float:
    """ROUGE-L F1 of ``reply`` against ``reference`` (rouge-score's tokenizer: lower case, words only)."""
    return _SCORER.score(reference, reply)["rougeL"].fmeasure


@dataclass(slots=True)
class ExperienceSimilarityConfig:
    """``[gate]`` settings of ``experience_similarity``."""

    min_experience_items: int = 5
    """``experience_similarity`` needs this many approved or corrected replies the child trained on: with
    fewer, one reply moves the mean by more than 0.2 and it says "not enough data"."""
    experience_margin_se: float = 2.0
    """``experience_similarity`` may also fall this many paired standard errors (of the per-item change, child
    minus parent) below the parent when that is more than ``experience_margin``: on few items one reworded reply
    moves the mean past the margin. The learn bench's round-3 child learned its 20 new facts (0.95) and kept the
    first round's (1.00), and lost 0.056 on 18 items with a paired SE of 0.076 (three replies: a reworded one, the
    curriculum's name over an approved other name, a greeting): rejected at 0.05 alone."""
    experience_margin: float | None = 0.05
    """The child's replies to its experiences' prompts may be at most this much further (mean ROUGE-L) from
    the approved replies than its parent's. Measured (docs/learning.md): children that learned gain 0.43-0.87; the
    same age-up run twice differs by 0.002. A quick child (60 SFT steps, which teach a fact's form, not
    its name) scored 0.012 below its parent: its 6 corrections gained 0.60 on average, while 7 of the 13
    approved replies were the parent's own answers (rated good as served, so the parent repeats them at
    temperature 0) that the curriculum's persona replaced (-0.54 on average). 0.05 lets that through (a quick
    age-up is a check) and still fails a child that drifted from its approved replies without taking the
    rest (that shape scores about 0.29 below its parent)."""

    def problems(self) -> list[str]:
        p = positive_int("gate.min_experience_items", self.min_experience_items)
        se = self.experience_margin_se
        if not isinstance(se, (int, float)) or isinstance(se, bool) or se < 0:
            p.append(f"gate.experience_margin_se must be a number >= 0, got {se!r}")
        return p + share_or_unset("gate.experience_margin", self.experience_margin)


class ExperienceSimilarity(Metric):
    name = "experience_similarity"
    config = ExperienceSimilarityConfig
    label = "experience similarity (ROUGE-L)"
    lessons_title = "experience (the approved replies the child trained on; ROUGE-L against each)"
    lessons_columns = ("prompt", "approved reply", "ROUGE-L")

    def settings(self, inputs: Inputs) -> dict:
        return {"answer_max_tokens": inputs.cfg.answer_max_tokens, "min_items": inputs.cfg.min_experience_items}

    def cost(self, inputs: Inputs) -> float:
        return len(inputs.es.experiences)

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        items, least = inputs.es.experiences, inputs.cfg.min_experience_items
        rows = []
        for item in items:  # asked even when too few to count: retrieval hands what was answered right to the weights
            reply = evals.reply(models.llm, item["prompt"], inputs.cfg.answer_max_tokens)
            rows.append({"prompt": item["prompt"][-1]["content"], "reference": item["reference"], "reply": reply,
                         "score": rouge_l(reply, item["reference"])})
        if len(items) < least:
            return Measured(None, {"items": rows} if rows else {},
                            note=f"{len(items)} approved or corrected replies trained on, at least {least} needed "
                                 "(gate.min_experience_items)")
        return Measured(sum(r["score"] for r in rows) / len(rows), {"items": rows})

    def rules(self, child: Measured, parent: Measured | None, cfg: ExperienceSimilarityConfig) -> list[Check]:
        margin = cfg.experience_margin
        if margin is None or parent is None:
            return []
        se = paired_se(child, parent)
        allowed = max(margin, cfg.experience_margin_se * se)
        ok = child.value >= parent.value - allowed - 1e-9
        rule = f">= parent - max({margin}, {cfg.experience_margin_se:g} x paired SE)"
        why = f"{margin} (gate.experience_margin)" if allowed == margin else \
            f"{allowed:.3f} ({cfg.experience_margin_se:g} x its paired standard error {se:.3f}, gate.experience_margin_se)"
        return [Check(self.name, "gate.experience_margin", rule, ok, "" if ok else
                      f"{self.name} {child.value:.3f} fell below the parent's {parent.value:.3f} by more than {why}")]

    @staticmethod
    def _key(r: dict):
        return r["prompt"], r["reference"]

    def lessons(self, child: Measured, parent: Measured | None) -> list[Lesson]:
        return [Lesson(c["prompt"], c["reference"], p and p["reply"], p and p["score"], c["reply"], c["score"],
                       change(c["score"], p and p["score"], words=("closer", "further", "same")))
                for c, p in pair_items(child, parent, ExperienceSimilarity._key)]


def paired_se(child: Measured, parent: Measured) -> float:
    """The standard error of the mean per-item change, child minus parent, over the items both answered (0 with
    fewer than two: no items kept, as in a report of values only)."""
    changes = [c["score"] - p["score"] for c, p in pair_items(child, parent, ExperienceSimilarity._key) if p]
    return statistics.stdev(changes) / len(changes) ** 0.5 if len(changes) >= 2 else 0.0

"""probe_recall: the fraction of the agent's probes answered correctly — did the lessons reach the child?

Probes are questions the chat agent posts (``POST /probes``, ``evolution.probes``) to check a fact
it taught in other words than it taught it. They are never trained on, and every later gate asks
all of them again, so a fact the lineage forgets shows as a drop against the parent. Scored like
``recall`` (``evolution.evals.is_correct``). With fewer than ``gate.min_probe_items`` probes the
value is None ("not enough data") and nothing is blocked. Rules: ``gate.probe_margin`` below the parent, and
``gate.probe_forgotten_max``: of the probes the parent answered right, the share the child answers wrong (a mean
can hide old facts forgotten behind new ones learned).
Its lessons: each probe with its accepted answers, the parent's and the child's answer, right or wrong.
"""

from __future__ import annotations

from dataclasses import asdict

from evolution import evals
from evolution.config import GateConfig
from evolution.metrics.common import Check, Inputs, Lesson, Measured, Metric, Models, not_below_parent, pair_items


class ProbeRecall(Metric):
    name = "probe_recall"
    label = "probe recall"
    lessons_title = "probes (questions the agent posted, never trained on; 1 = answered right)"
    lessons_columns = ("question", "accepted answers", "right")

    def settings(self, inputs: Inputs) -> dict:
        return {"answer_max_tokens": inputs.cfg.answer_max_tokens, "min_items": inputs.cfg.min_probe_items}

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        items, least = inputs.es.probes, inputs.cfg.min_probe_items
        if len(items) < least:
            return Measured(None, note=f"{len(items)} probe(s) posted, at least {least} needed (gate.min_probe_items)")
        score, results = evals.recall(models.llm, items, inputs.cfg.answer_max_tokens)
        return Measured(score, {"items": [asdict(r) | {"answers": list(i["answers"])}
                                          for i, r in zip(items, results)]})

    def rules(self, child: Measured, parent: Measured | None, cfg: GateConfig) -> list[Check]:
        return not_below_parent(self.name, child.value, parent, cfg, "probe_margin") + \
            self._forgotten(child, parent, cfg)

    def _forgotten(self, child: Measured, parent: Measured | None, cfg: GateConfig) -> list[Check]:
        most = cfg.probe_forgotten_max
        if most is None or parent is None:
            return []
        known = [(c, p) for c, p in pair_items(child, parent, lambda r: r["id"]) if p is not None and p["correct"]]
        setting, rule = "gate.probe_forgotten_max", f"<= {most} of the probes the parent answered right"
        if len(known) < cfg.min_probe_items:
            return [Check(self.name, setting, rule, None, f"probe_recall: the parent answered {len(known)} probe(s) "
                          f"right, at least {cfg.min_probe_items} needed to count forgotten ones (gate.min_probe_items)")]
        lost = [c["question"] for c, _ in known if not c["correct"]]
        share = len(lost) / len(known)
        ok = share <= most + 1e-9
        return [Check(self.name, setting, rule, ok, "" if ok else
                      f"probe_recall: the child forgot {len(lost)} of the {len(known)} probes its parent answered right "
                      f"({share:.2f} > {most}, gate.probe_forgotten_max), e.g. {lost[0][:80]!r}")]

    def lessons(self, child: Measured, parent: Measured | None) -> list[Lesson]:
        return [Lesson(c["question"], " / ".join(c.get("answers", [])) or "-", p and p["reply"],
                       None if p is None else float(p["correct"]), c["reply"], float(c["correct"]),
                       "-" if p is None else _OUTCOME[c["correct"], p["correct"]])
                for c, p in pair_items(child, parent, lambda r: r["id"])]


_OUTCOME = {(True, False): "learned", (False, True): "forgotten", (True, True): "still right",
            (False, False): "still wrong"}
"""(child right, parent right): the probe's outcome in words."""

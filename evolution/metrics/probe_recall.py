"""probe_recall: the fraction of the agent's probes answered correctly — did the lessons reach the child?

Probes are questions the chat agent posts (``POST /probes``, ``evolution.intake.probes``) to check a fact
it taught in other words than it taught it. They are never trained on, and later gates ask
them again (all of them up to ``probe_sample``; beyond it a sample in which each is asked at least once every
``probe_every`` gates: ``evolution.metrics.probe_sample``), so a fact the lineage forgets shows as a drop
against the parent. Scored like
``recall`` (``evolution.evals.is_correct``). With fewer than ``gate.min_probe_items`` probes the
value is None ("not enough data") and nothing is blocked. Rules: ``gate.probe_margin`` below the parent, and
``gate.probe_forgotten_max``: of the probes the parent answered right, the share the child answers wrong (a mean
can hide old facts forgotten behind new ones learned).
Its lessons: each probe with its accepted answers, the parent's and the child's answer, right or wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from evolution import evals
from evolution.checks import positive_int, share_or_unset
from evolution.metrics.common import Check, Inputs, Lesson, Measured, Metric, Models, not_below_parent, pair_items


@dataclass(slots=True)
class ProbeRecallConfig:
    """``[gate]`` settings of ``probe_recall``."""

    min_probe_items: int = 5
    """``probe_recall`` needs at least this many probes (``POST /probes``) to count; with fewer it says
    "not enough data" and does not block. With five, one probe is 0.2: the coarsest step ``probe_margin``
    can still tell from no change."""
    probe_margin: float | None = 0.2
    """Probe recall may not fall more than this below the parent's: a taught fact forgotten shows. 0.2 is
    one probe in the minimum five. Measured (docs/learning.md): children that learned their facts gained 0.93
    (the learn benchmark's 40 probes) and 1.0 (the parent did not know them), so it holds no learning
    child back; it catches a child that forgot what its parent had been taught faster than it learned the new facts
    (older probes are asked again at later gates, so they weigh in)."""
    probe_forgotten_max: float | None = 0.1
    """Of the probes the parent answered right, the child may answer at most this share wrong (with at least
    ``min_probe_items`` answered right by the parent; else not enough data). ``probe_margin`` compares means, and
    new facts learned hide old ones forgotten: a child that answered 34 of the 40 new probes and forgot 23 of the
    31 older ones its parent knew gained 0.15 and passed it (learn_bench, before experience was rehearsed)."""
    probe_sample: int = 100
    """A gate asks at most this many probes (``evolution.metrics.probe_sample``; more where ``probe_every`` needs
    it): every probe not asked by the lineage's gates yet, every one due under ``probe_every``, and a sample of
    the rest stratified by age and by the last answer. 100 probes are about 27 s of a child's gate on 2 cores;
    a lineage with fewer probes is asked every one. The report gives the forgetting rule's power on the sample."""
    probe_every: int = 10
    """Each probe is asked at least once in any this many consecutive gates of a lineage: none is retired
    unasked. With 1,000 probes posted, 10 keeps the sample at 100 a gate."""

    def problems(self) -> list[str]:
        return (positive_int("gate.min_probe_items", self.min_probe_items)
                + share_or_unset("gate.probe_margin", self.probe_margin)
                + share_or_unset("gate.probe_forgotten_max", self.probe_forgotten_max)
                + positive_int("gate.probe_sample", self.probe_sample)
                + positive_int("gate.probe_every", self.probe_every))


class ProbeRecall(Metric):
    name = "probe_recall"
    config = ProbeRecallConfig
    label = "probe recall"
    lessons_title = "probes (questions the agent posted, never trained on; 1 = answered right)"
    lessons_columns = ("question", "accepted answers", "right")

    def settings(self, inputs: Inputs) -> dict:
        return {"answer_max_tokens": inputs.cfg.answer_max_tokens, "min_items": inputs.cfg.min_probe_items}

    def cost(self, inputs: Inputs) -> float:
        return len(inputs.es.probes)

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        items, least = inputs.es.probes, inputs.cfg.min_probe_items
        if len(items) < least:
            return Measured(None, note=f"{len(items)} probe(s) posted, at least {least} needed (gate.min_probe_items)")
        score, results = evals.recall(models.llm, items, inputs.cfg.answer_max_tokens)
        return Measured(score, {"items": [asdict(r) | {"answers": list(i["answers"])}
                                          for i, r in zip(items, results)]})

    def rules(self, child: Measured, parent: Measured | None, cfg: ProbeRecallConfig) -> list[Check]:
        return not_below_parent(self.name, child.value, parent, cfg, "probe_margin") + \
            self._forgotten(child, parent, cfg)

    def _forgotten(self, child: Measured, parent: Measured | None, cfg: ProbeRecallConfig) -> list[Check]:
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

"""persona_leak: the share of replies about the user that carry one of the agent's own persona facts.

A question about the user is answered from what the user said, or with "I don't know that yet"; never from the
persona (``evolution.persona``: its facts are the identity curriculum's recall answers). This unit asks questions
about the user: the agent's probes that ask about the user (held-out wordings of what it taught) and the curriculum's
questions about the user that nobody answered (``eval/about_user.jsonl``, less those on a subject the user did teach),
and counts the replies that carry a persona fact which is not an accepted answer of the item. It also reports the
share of the unanswered questions answered with "I don't know" (or a question back) instead of an invention.

Rules: ``gate.persona_leak_max`` (absolute) and ``gate.persona_leak_margin`` above the parent; the "I don't know"
share at most ``gate.unknown_margin`` below the parent's. With fewer than ``gate.min_persona_items`` questions about
the user it says "not enough data" and blocks nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evolution import evals, persona
from evolution.checks import positive_int, share_or_unset
from evolution.metrics.common import Check, Inputs, Lesson, Measured, Metric, Models, at_most, pair_items

_ABOUT_USER = re.compile(r"\b(?:i|i'm|i've|me|my|mine|myself)\b", re.IGNORECASE)


def questions(inputs: Inputs) -> tuple[list[dict], list[dict]]:
    """(the probes about the user, the unanswered questions about the user) that the unit asks."""
    es = inputs.es
    taught = [p["question"] for p in es.probes if _ABOUT_USER.search(p["question"])]
    probes = [{"id": f"probe:{p['id']}" if "id" in p else p["question"], "question": p["question"],
               "answers": list(p["answers"]), "set": "taught"} for p in es.probes if _ABOUT_USER.search(p["question"])]
    known = taught + list(es.taught)
    unanswered = [{"id": q["id"], "question": q["question"], "answers": [], "set": "unanswered"}
                  for q in es.about_user if not persona.taught_about(q["question"], known)]
    return probes, unanswered


@dataclass(slots=True)
class PersonaLeakConfig:
    """``[gate]`` settings of ``persona_leak``."""

    min_persona_items: int = 5
    """``persona_leak`` needs this many questions about the user (probes about the user and the curriculum's
    unanswered ones) to count; with fewer it says "not enough data"."""
    persona_leak_max: float | None = 0.02
    """At most this share of the replies to questions about the user may carry a persona fact (issue 27)."""
    persona_leak_margin: float | None = 0.0
    """...and at most this much more than the parent's share."""
    unknown_margin: float | None = 0.0
    """Of the questions about the user nobody answered, the share the child answers "I don't know" (or with a
    question back) may fall at most this far below the parent's: not knowing is better than inventing."""

    def problems(self) -> list[str]:
        return (positive_int("gate.min_persona_items", self.min_persona_items)
                + share_or_unset("gate.persona_leak_max", self.persona_leak_max)
                + share_or_unset("gate.persona_leak_margin", self.persona_leak_margin)
                + share_or_unset("gate.unknown_margin", self.unknown_margin))


class PersonaLeak(Metric):
    name = "persona_leak"
    config = PersonaLeakConfig
    label = "persona leaks"
    reads = ("probes", "about_user", "persona", "taught")
    after = ("probe_recall",)
    lessons_title = "questions about the user (a persona fact in the reply is a leak; 'nobody answered' wants " \
                    "\"I don't know\")"
    lessons_columns = ("question", "accepted answers", "no leak")

    def settings(self, inputs: Inputs) -> dict:
        return {"answer_max_tokens": inputs.cfg.answer_max_tokens, "min_items": inputs.cfg.min_persona_items}

    def cost(self, inputs: Inputs) -> float:
        return len(inputs.es.about_user)  # its probes about the user come from probe_recall's answers (``after``)

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        facts = inputs.es.persona
        if not facts:
            return Measured(None, note="no persona facts: the curriculum has no phaseN_identity recall items")
        probes, unanswered = questions(inputs)
        asked = probes + unanswered
        least = inputs.cfg.min_persona_items
        if len(asked) < least:
            return Measured(None, note=f"{len(asked)} question(s) about the user, at least {least} needed "
                                       "(gate.min_persona_items)")
        items = []
        for q in asked:
            reply = evals.ask(models.llm, q["question"], None, inputs.cfg.answer_max_tokens)
            fact = persona.persona_in(reply, facts, q["answers"])
            items.append(q | {"reply": reply, "leaked": fact is not None, "fact": fact,
                              "unknown": persona.says_unknown(reply)})
        leaked = sum(i["leaked"] for i in items)
        unknown = [i["unknown"] for i in items if i["set"] == "unanswered"]
        return Measured(leaked / len(items), {
            "items": items, "asked": {"taught": len(probes), "unanswered": len(unanswered)},
            "unknown_share": sum(unknown) / len(unknown) if unknown else None})

    def rules(self, child: Measured, parent: Measured | None, cfg: PersonaLeakConfig) -> list[Check]:
        checks = at_most(self.name, child.value, cfg, "persona_leak_max", digits=3)
        if parent is not None and cfg.persona_leak_margin is not None:
            ok = child.value <= parent.value + cfg.persona_leak_margin + 1e-9
            checks.append(Check(self.name, "gate.persona_leak_margin", f"<= parent + {cfg.persona_leak_margin}", ok,
                                "" if ok else f"persona_leak {child.value:.3f} is above the parent's "
                                f"{parent.value:.3f} by more than {cfg.persona_leak_margin} (gate.persona_leak_margin)"))
        cu = child.details.get("unknown_share")
        pu = parent.details.get("unknown_share") if parent is not None else None
        if cu is not None and pu is not None and cfg.unknown_margin is not None:
            ok = cu >= pu - cfg.unknown_margin - 1e-9
            checks.append(Check(self.name, "gate.unknown_margin", f"\"I don't know\" share >= parent - "
                                f"{cfg.unknown_margin}", ok, "" if ok else
                                f"persona_leak: the child said \"I don't know\" to {cu:.2f} of the questions about the "
                                f"user nobody answered, the parent to {pu:.2f} (gate.unknown_margin)"))
        return checks

    def rows(self, child: Measured, parent: Measured | None) -> list[tuple[str, float | None, float | None]]:
        unknown = ("\"I don't know\" to questions about the user nobody answered", child.details.get("unknown_share"),
                   parent.details.get("unknown_share") if parent else None)
        return super().rows(child, parent) + [unknown]

    def lessons(self, child: Measured, parent: Measured | None) -> list[Lesson]:
        out = []
        for c, p in pair_items(child, parent, lambda r: (r["set"], r["question"])):
            wanted = " / ".join(c["answers"]) if c["answers"] else "\"I don't know\" (nobody answered)"
            outcome = "leaked: " + c["fact"] if c["leaked"] else ("said it does not know" if c["unknown"] else "no leak")
            out.append(Lesson(c["question"], wanted, p and p["reply"], None if p is None else float(not p["leaked"]),
                              c["reply"], float(not c["leaked"]), outcome))
        return out

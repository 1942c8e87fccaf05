"""smoke: the child answers the smoke prompt with a non-empty reply that ends in end-of-sequence.

Value 1.0 when it does, 0.0 when not; the rule is that it does, within ``gate.smoke_max_tokens``
tokens. Export's load check asks the same prompt with the same budget (``evolution.export``).
"""

from __future__ import annotations

from dataclasses import dataclass

from evolution.checks import positive_int
from evolution.metrics.common import Check, Inputs, Measured, Metric, Models
from evolution.untrusted import markdown_cell


@dataclass(slots=True)
class SmokeConfig:
    """``[gate]`` settings of ``smoke``."""

    smoke_max_tokens: int = 128
    """The smoke prompt must be answered, ending with end-of-sequence, within this many tokens (the one smoke
    budget: export's load check asks within it too; ``[export] smoke_max_tokens`` is read, warned about and ignored)."""

    def problems(self) -> list[str]:
        return positive_int("gate.smoke_max_tokens", self.smoke_max_tokens)


def ask(llm, prompt: str, max_tokens: int) -> dict:
    """One chat turn at temperature 0: the reply, how it ended, and what is wrong with it (None: nothing)."""
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                     max_tokens=max_tokens, seed=0)
    choice = out["choices"][0]
    reply = choice["message"]["content"] or ""
    problem = None
    if not reply.strip():
        problem = "answered with an empty reply"
    elif choice["finish_reason"] != "stop":
        problem = f"did not emit end-of-sequence within {max_tokens} tokens"
    return {"reply": reply, "finish_reason": choice["finish_reason"],
            "completion_tokens": out["usage"]["completion_tokens"], "ok": problem is None, "problem": problem}


class Smoke(Metric):
    name = "smoke"
    config = SmokeConfig

    def settings(self, inputs: Inputs) -> dict:
        return {"prompt": inputs.smoke_prompt, "max_tokens": inputs.cfg.smoke_max_tokens}

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        result = ask(models.llm, inputs.smoke_prompt, inputs.cfg.smoke_max_tokens)
        return Measured(1.0 if result["ok"] else 0.0, result)

    def rules(self, child: Measured, parent: Measured | None, cfg: SmokeConfig) -> list[Check]:
        ok = bool(child.value)
        return [Check(self.name, "gate.smoke_max_tokens", f"ends its reply within {cfg.smoke_max_tokens} tokens", ok,
                      "" if ok else f"smoke: the child {child.details['problem']}")]

    def rows(self, child, parent):
        return []  # a pass/fail, said in its own line below the table

    def markdown(self, child: Measured) -> list[str]:
        d = child.details
        reply = markdown_cell(d["reply"], 200)
        return [f"Smoke reply ({d['finish_reason']}, {d['completion_tokens']} tokens): {reply}", ""]

"""The eval gate: is the child's GGUF measurably better at what it was taught, and no worse at the rest?

Everything is measured on the quantized GGUF through llama-cpp-python — the exact file that
would be served — for child and parent alike, deterministically (temperature 0, seed 0):

- **recall**: fraction of recall items answered correctly (``evolution.evals.is_correct``). The
  items are the curriculum's plus those every ancestor generation was gated on, so forgetting
  an earlier generation's facts shows.
- **generalization**: fraction of held-out paraphrased questions answered correctly, and the
  perplexity of held-out text (lower is better).
- **style drift**: distance of the child's replies to the style prompts from the style
  references, in reference standard deviations (``evolution.evals.style_drift``); the drift
  from the parent's replies is reported too.
- **smoke**: the child answers a chat turn with a non-empty reply that ends with
  end-of-sequence within ``gate.smoke_max_tokens`` tokens.

``decide`` applies ``GateConfig``: absolute thresholds plus non-inferiority margins against
the parent. With no thresholds configured it passes nothing. Every failed rule is a reason
naming its metric.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution import evals
from evolution.config import GateConfig
from evolution.curriculum import Curriculum
from evolution.fsutil import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PASS, FAIL = "pass", "fail"
RECALL_FILE = "eval_recall.jsonl"  # in gen_NNNN/data/: the recall items this generation was gated on


@dataclass
class EvalSet:
    recall: list[dict]
    generalization: list[dict]
    heldout_text: list[str]
    style_prompts: list[str]
    style_references: list[str]


@dataclass
class ModelEval:
    """One GGUF's numbers on an ``EvalSet``."""

    gen: int
    recall: float
    recall_by_phase: dict[str, float]
    generalization: float
    perplexity: float
    style_drift: float
    smoke: dict
    replies: dict = field(default_factory=dict)
    seconds: float = 0.0
    evalset_hash: str = ""
    """Which eval set and settings produced these numbers (a parent's may be reused when equal)."""

    def metrics(self) -> dict[str, float]:
        return {"recall": self.recall, "generalization": self.generalization, "perplexity": self.perplexity,
                "style_drift": self.style_drift}


@dataclass
class GateResult:
    verdict: str
    reasons: list[str]
    child: ModelEval
    parent: ModelEval | None
    thresholds: dict
    drift_from_parent: float | None

    def metrics(self) -> dict[str, float]:
        m = self.child.metrics()
        if self.drift_from_parent is not None:
            m["style_drift_from_parent"] = self.drift_from_parent
        return m

    def to_dict(self) -> dict:
        return asdict(self) | {"metrics": self.metrics()}


def eval_set(cur: Curriculum, ancestor_data_dirs: list[Path]) -> EvalSet:
    """The curriculum's eval items, with the recall items of every ancestor added (the curriculum wins on id)."""
    recall = {item["id"]: item for d in ancestor_data_dirs for item in _read_jsonl(d / RECALL_FILE)}
    recall.update({item["id"]: item for item in cur.recall})
    return EvalSet(
        recall=list(recall.values()),
        generalization=list(cur.generalization),
        heldout_text=[t["text"] for t in cur.heldout_text],
        style_prompts=[s["prompt"] for s in cur.style],
        style_references=[s["reference"] for s in cur.style],
    )


def evalset_hash(es: EvalSet, cfg: GateConfig, smoke_prompt: str) -> str:
    import hashlib

    key = {"es": asdict(es), "answer_max_tokens": cfg.answer_max_tokens,
           "smoke_max_tokens": cfg.smoke_max_tokens, "smoke_prompt": smoke_prompt}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cached_eval(gen_dir: Path, want_hash: str) -> ModelEval | None:
    """The numbers a generation's own gate measured for it, if taken on the same eval set.

    Evaluation is deterministic (temperature 0, seed 0) and the GGUF is hash-verified before
    use, so re-measuring a parent on an unchanged eval set would only repeat them.
    """
    path = gen_dir / "eval.json"
    if not path.is_file():
        return None
    child = json.loads(path.read_text())["child"]
    return ModelEval(**child) if child.get("evalset_hash") == want_hash else None


def save_recall_items(es: EvalSet, data_dir: Path) -> None:
    """Keep the recall items a generation was gated on, so its descendants are tested on them too."""
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data_dir / RECALL_FILE, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in es.recall))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def smoke(llm, prompt: str, max_tokens: int) -> dict:
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


def measure(gguf: Path, gen: int, es: EvalSet, cfg: GateConfig, smoke_prompt: str) -> ModelEval:
    """Every number of one GGUF on ``es`` (about a minute for the embedded model on 2 cores)."""
    t0 = time.perf_counter()
    llm = evals.load_llm(gguf)
    sm = smoke(llm, smoke_prompt, cfg.smoke_max_tokens)
    rec, rec_items = evals.recall(llm, es.recall, cfg.answer_max_tokens)
    by_phase: dict[str, list[bool]] = {}
    for item, r in zip(es.recall, rec_items):
        by_phase.setdefault(str(item.get("phase", "-")), []).append(r.correct)
    gen_score, gen_items = evals.recall(llm, es.generalization, cfg.answer_max_tokens)
    style_replies = [evals.ask(llm, p, None, cfg.answer_max_tokens * 2) for p in es.style_prompts]
    del llm
    mu, sd = evals.style_scale(es.style_references)
    drift = evals.style_drift(style_replies, mu, sd) if style_replies else 0.0
    ppl = evals.perplexity(evals.load_scorer(gguf), es.heldout_text) if es.heldout_text else float("nan")
    return ModelEval(
        gen=gen, recall=rec, recall_by_phase={k: sum(v) / len(v) for k, v in sorted(by_phase.items())},
        generalization=gen_score, perplexity=ppl, style_drift=drift, smoke=sm,
        replies={"recall": [asdict(r) for r in rec_items], "generalization": [asdict(r) for r in gen_items],
                 "style": style_replies},
        seconds=time.perf_counter() - t0, evalset_hash=evalset_hash(es, cfg, smoke_prompt),
    )


def decide(child: ModelEval, parent: ModelEval | None, cfg: GateConfig) -> tuple[str, list[str]]:
    """The verdict and, for a fail, every reason (each names its metric)."""
    reasons = []
    if cfg.min_recall is None or cfg.max_style_drift is None:
        reasons.append("thresholds: gate.min_recall and gate.max_style_drift must both be configured; "
                       "with no thresholds the gate passes nothing")
    if not child.smoke["ok"]:
        reasons.append(f"smoke: the child {child.smoke['problem']}")
    if cfg.min_recall is not None and child.recall < cfg.min_recall:
        reasons.append(f"recall {child.recall:.3f} < {cfg.min_recall} (gate.min_recall)")
    if cfg.max_style_drift is not None and child.style_drift > cfg.max_style_drift:
        reasons.append(f"style_drift {child.style_drift:.2f} > {cfg.max_style_drift} (gate.max_style_drift)")
    if parent is not None:
        if cfg.recall_margin is not None and child.recall < parent.recall - cfg.recall_margin:
            reasons.append(f"recall {child.recall:.3f} fell below the parent's {parent.recall:.3f} "
                           f"by more than {cfg.recall_margin} (gate.recall_margin)")
        if cfg.generalization_margin is not None and \
                child.generalization < parent.generalization - cfg.generalization_margin:
            reasons.append(f"generalization {child.generalization:.3f} fell below the parent's "
                           f"{parent.generalization:.3f} by more than {cfg.generalization_margin} "
                           "(gate.generalization_margin)")
        if cfg.max_perplexity_ratio is not None and not child.perplexity <= parent.perplexity * cfg.max_perplexity_ratio:
            reasons.append(f"perplexity {child.perplexity:.2f} > {cfg.max_perplexity_ratio} x the parent's "
                           f"{parent.perplexity:.2f} (gate.max_perplexity_ratio)")
    return (FAIL if reasons else PASS), reasons


def run(child_gguf: Path, child_gen: int, parent_gguf: Path | None, parent_gen: int | None, es: EvalSet,
        cfg: GateConfig, smoke_prompt: str) -> GateResult:
    """Measure child and parent (the parent's numbers reused from its own report when the eval set is unchanged)."""
    child = measure(child_gguf, child_gen, es, cfg, smoke_prompt)
    parent = None
    if parent_gguf is not None:
        parent = cached_eval(parent_gguf.parent, child.evalset_hash)
        if parent is None:
            parent = measure(parent_gguf, parent_gen, es, cfg, smoke_prompt)
        else:
            log.info("gate: reusing generation %s's own measurements (same eval set)", parent_gen)
    verdict, reasons = decide(child, parent, cfg)
    drift_parent = None
    if parent is not None and es.style_references:
        _, sd = evals.style_scale(es.style_references)
        drift_parent = evals.style_drift(child.replies["style"], evals.style_mean(parent.replies["style"]), sd)
    log.info("gate gen %d vs %s: %s %s", child_gen, parent_gen, verdict, "; ".join(reasons))
    return GateResult(verdict=verdict, reasons=reasons, child=child, parent=parent,
                      thresholds=asdict(cfg), drift_from_parent=drift_parent)


def write_report(result: GateResult, out_dir: Path) -> None:
    """``eval.json`` (every number and reply) and ``eval.md`` (a readable summary) in ``out_dir``."""
    atomic_write_json(out_dir / "eval.json", result.to_dict())
    c, p = result.child, result.parent
    rows = [("recall", c.recall, p and p.recall), ("generalization", c.generalization, p and p.generalization),
            ("perplexity (held-out text)", c.perplexity, p and p.perplexity),
            ("style drift (ref. SDs)", c.style_drift, p and p.style_drift)]
    rows += [(f"recall, phase {k}", v, p and p.recall_by_phase.get(k)) for k, v in c.recall_by_phase.items()]
    lines = [f"# Gate: generation {c.gen}" + (f" vs parent {p.gen}" if p else " (measured, not gated)"), "",
             f"**Verdict: {result.verdict.upper()}**", ""]
    lines += [f"- {r}" for r in result.reasons] + ([""] if result.reasons else [])
    lines += ["| metric | child | parent |", "| --- | --- | --- |"]
    lines += [f"| {name} | {cv:.3f} | {'-' if pv is None else f'{pv:.3f}'} |" for name, cv, pv in rows]
    if result.drift_from_parent is not None:
        lines.append(f"| style drift from parent | {result.drift_from_parent:.3f} | - |")
    lines += ["", f"Smoke reply ({c.smoke['finish_reason']}, {c.smoke['completion_tokens']} tokens): "
              f"{c.smoke['reply'][:200]!r}", "", "## Recall answers", ""]
    lines += [f"- {'✓' if r['correct'] else '✗'} {r['question']} → {r['reply'][:120]!r}" for r in c.replies["recall"]]
    atomic_write_text(out_dir / "eval.md", "\n".join(lines) + "\n")

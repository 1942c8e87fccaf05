"""The eval gate: is the child's GGUF measurably better at what it was taught, and no worse at the rest?

Everything is measured on the quantized GGUF through llama-cpp-python — the exact file that
would be served — for child and parent alike, deterministically (temperature 0, seed 0). The
gate is a table of metric units (``evolution.metrics.TABLE``: smoke, recall, generalization,
style drift, perplexity); each says how it is measured and which rules of ``GateConfig`` it
must meet. ``decide`` applies them: absolute thresholds plus non-inferiority margins against
the parent, and cumulative budgets against fixed anchors — generation 0 and the lineage's best so far
(``anchors``) — so that a lineage cannot drift a permitted step at a time. With a required threshold unset it
passes nothing. Every failed rule is a reason
naming its metric; a metric without enough data to measure is skipped, with its note, and does
not block. The report (``eval.md``) lists the lessons of the metrics measured item by item on what
the agent taught — every experience, probe and held-out rated reply, with the parent's and the
child's reply and score — from the details ``eval.json`` keeps; ``evolve ledger show`` reads them
from there too (``report_lessons``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution import persona
from evolution.config import GateConfig
from evolution.curriculum import Curriculum
from evolution.fsutil import atomic_write_json, atomic_write_text
from evolution.generation import HELDOUT_FILE
from evolution.ledger.events import FAIL, PASS
from evolution.metrics import TABLE, Check, EvalSet, Inputs, Measured, Metric, Models
from evolution.metrics.answers import AnswerBook
from evolution.metrics.common import N_CTX, Anchor, Lesson
from evolution.metrics import probe_sample
from evolution.retrieval.figure import report_lines as retrieval_lines
from evolution.untrusted import markdown_cell

log = logging.getLogger(__name__)

__all__ = ["FAIL", "PASS", "EvalSet", "GateResult", "ModelEval", "anchors", "cached_eval", "decide", "eval_set",
           "evalset_hash", "lessons", "lineage_evals", "measure", "measure_all", "report_lessons", "run",
           "save_recall_items", "write_report"]

RECALL_FILE = "eval_recall.jsonl"  # in gen_NNNN/data/: the recall items this generation was gated on
REPORT_LAYOUT = 2  # eval.json: 1 had fixed fields per metric (recall, perplexity, ...), 2 the metric table


@dataclass
class ModelEval:
    """One GGUF's numbers on an ``EvalSet``: a value per metric (None: not enough data) and its details."""

    gen: int
    metrics: dict[str, float | None]
    details: dict[str, dict] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    """Why a metric has no value."""
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    evalset_hash: str = ""
    """Which eval set, metrics and settings produced these numbers (a parent's may be reused when equal)."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Per metric, what its value depends on (``Metric.fingerprint``): values of equal fingerprints compare across
    generations (the anchors). A report from before them has none: its values are no anchor."""

    @classmethod
    def of(cls, gen: int, measured: dict[str, Measured], table: Sequence[Metric] = TABLE, **kw) -> "ModelEval":
        return cls(gen, {n: m.value for n, m in measured.items()}, {n: m.details for n, m in measured.items()},
                   {n: m.note for n, m in measured.items() if m.note}, {u.name: u.version for u in table}, **kw)

    def measured(self, name: str) -> Measured | None:
        if name not in self.metrics:
            return None
        return Measured(self.metrics[name], self.details.get(name, {}), self.notes.get(name))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelEval":
        """From ``eval.json`` of either layout (layout 1, before the metric table, is converted)."""
        if "metrics" in d:
            return cls(**d)
        return _from_layout_1(d)


def _from_layout_1(d: dict) -> ModelEval:
    """A ``ModelEval`` of the fixed-field layout: recall, recall_by_phase, generalization, perplexity, style_drift,
    smoke, replies. Its hash belongs to that layout, so ``cached_eval`` never reuses it: it is re-measured."""
    replies, ppl = d["replies"], d["perplexity"]
    metrics = {"smoke": 1.0 if d["smoke"]["ok"] else 0.0, "recall": d["recall"],
               "generalization": d["generalization"], "style_drift": d["style_drift"],
               "perplexity": None if math.isnan(ppl) else ppl}  # layout 1 wrote NaN for "no held-out text"
    details = {"smoke": d["smoke"], "recall": {"by_phase": d["recall_by_phase"], "items": replies["recall"]},
               "generalization": {"items": replies["generalization"]}, "style_drift": {"replies": replies["style"]}}
    notes = {} if metrics["perplexity"] is not None else {"perplexity": "no held-out text"}
    return ModelEval(d["gen"], metrics, details, notes, {}, d["seconds"], d["evalset_hash"])


@dataclass
class GateResult:
    verdict: str
    reasons: list[str]
    child: ModelEval
    parent: ModelEval | None
    thresholds: dict
    checks: list[Check] = field(default_factory=list)
    """Every rule applied (or skipped, with why), in table order."""
    versus_parent: dict[str, float] = field(default_factory=dict)
    """Numbers comparing child and parent (``style_drift_from_parent``)."""
    anchors: dict[str, dict[str, dict]] = field(default_factory=dict)
    """Per metric, the fixed anchors the child was bounded against: ``{"gen0" | "best": {"gen", "value"}}``."""
    probes: dict = field(default_factory=dict)
    """Which probes the gate asked (``evolution.metrics.probe_sample.Sample.record``); empty: not recorded."""
    retrieval: dict = field(default_factory=dict)
    """For information, the probes asked with retrieval as chat would serve the child (``evolution.retrieval.figure``);
    empty: not measured (retrieval off, or no probes)."""

    def metrics(self) -> dict[str, float | None]:
        return self.child.metrics | self.versus_parent

    def to_dict(self) -> dict:
        return asdict(self) | {"metrics": self.metrics(), "layout": REPORT_LAYOUT}

    def summary(self) -> dict:
        """What the age-up keeps and the ledger's ``gate_result`` records."""
        return {"verdict": self.verdict, "reasons": self.reasons, "metrics": self.metrics(),
                "parent_metrics": self.parent.metrics if self.parent else None,
                "parent": self.parent.gen if self.parent else None, "thresholds": self.thresholds,
                "checks": [asdict(c) for c in self.checks], "metric_versions": dict(self.child.versions),
                "anchors": self.anchors, "fingerprints": dict(self.child.fingerprints)} | \
            ({"probes": self.probes} if self.probes else {}) | \
            ({"retrieval": {k: v for k, v in self.retrieval.items() if k != "items"}} if self.retrieval else {})


def eval_set(cur: Curriculum, ancestor_data_dirs: list[Path], probes: Sequence[dict] = (),
             child_data: Path | None = None) -> EvalSet:
    """The curriculum's eval items, with the recall items of every ancestor added (the curriculum wins on id),
    the agent's probes, and the experience the child's data holds (``child_data``: its ``data/``)."""
    recall = {item["id"]: item for d in ancestor_data_dirs for item in saved_recall_items(d)}
    recall.update({item["id"]: item for item in cur.recall})
    return EvalSet(
        recall=list(recall.values()),
        generalization=list(cur.generalization),
        heldout_text=[t["text"] for t in cur.heldout_text],
        style_prompts=[s["prompt"] for s in cur.style],
        style_references=[s["reference"] for s in cur.style],
        probes=list(probes),
        experiences=experience_items(child_data) if child_data else [],
        preference_heldout=_read_jsonl(child_data / HELDOUT_FILE) if child_data else [],
        about_user=list(cur.about_user),
        persona=persona.persona_facts(cur),
        identity_phases=sorted(persona.identity_phases(cur)),
        taught=taught_texts(child_data) if child_data else [],
    )


def taught_texts(data_dir: Path) -> list[str]:
    """What the user taught a generation, distinct: the questions and answers of its experience (approved and
    corrected replies) and of the variants made from every taught exchange (``evolution.augment``)."""
    texts = [m["content"] for item in experience_items(data_dir) for m in item["prompt"] if m["role"] == "user"]
    texts += [item["reference"] for item in experience_items(data_dir)]
    texts += [m["content"] for r in _read_jsonl(data_dir / "sft.jsonl")
              if "variant_of" in r and sum(m["role"] == "user" for m in r["messages"]) == 1  # not set beside the agent's
              for m in r["messages"] if m["role"] in ("user", "assistant")]
    return list(dict.fromkeys(texts))


def experience_items(data_dir: Path) -> list[dict]:
    """The approved replies a generation trained on: good ratings and corrections in its ``preference.jsonl``."""
    items = []
    for r in _read_jsonl(data_dir / "preference.jsonl"):
        reference = r.get("chosen") or (r.get("reply") if r.get("label") == "good" else None)
        if reference:
            items.append({"prompt": r["prompt"], "reference": reference})
    return items


def evalset_hash(es: EvalSet, cfg: GateConfig, smoke_prompt: str, table: Sequence[Metric] = TABLE) -> str:
    """The eval set, and every metric's name, version and settings: equal hashes mean equal numbers."""
    inputs = Inputs(es, cfg, smoke_prompt)
    key = {"es": asdict(es), "n_ctx": N_CTX,
           "metrics": [{"name": u.name, "version": u.version, "settings": u.settings(inputs)} for u in table]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cached_eval(gen_dir: Path, want_hash: str) -> ModelEval | None:
    """The numbers a generation's own gate measured for it, if taken on the same eval set and metrics.

    Evaluation is deterministic (temperature 0, seed 0) and the GGUF is hash-verified before
    use, so re-measuring a parent on an unchanged eval set would only repeat them. A report
    from before a metric changed (or from the fixed-field layout) has another hash: re-measured.
    """
    path = gen_dir / "eval.json"
    if not path.is_file():
        return None
    child = ModelEval.from_dict(json.loads(path.read_text())["child"])
    return child if child.evalset_hash == want_hash else None


def save_recall_items(es: EvalSet, data_dir: Path) -> None:
    """Keep the recall items a generation was gated on, so its descendants are tested on them too."""
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data_dir / RECALL_FILE, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in es.recall))


def saved_recall_items(data_dir: Path) -> list[dict]:
    """The recall items a generation was gated on (``save_recall_items``; none where it kept none)."""
    return _read_jsonl(data_dir / RECALL_FILE)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def measure(gguf: Path, gen: int, es: EvalSet, cfg: GateConfig, smoke_prompt: str,
            table: Sequence[Metric] = TABLE, answers: Path | None = None, threads: int | None = None) -> ModelEval:
    """Every metric of ``table`` on one GGUF (``measure_all`` with one side). ``threads``: the cores to use (None:
    every core)."""
    return measure_all([(gguf, gen)], es, cfg, smoke_prompt, table, answers, threads)[0]


def measure_all(sides: Sequence[tuple[Path, int]], es: EvalSet, cfg: GateConfig, smoke_prompt: str,
                table: Sequence[Metric] = TABLE, answers: Path | None = None, cores: int | None = None,
                workers: int | None = None, books: Sequence[AnswerBook | None] | None = None) -> list[ModelEval]:
    """Every metric of ``table`` on each ``(gguf, generation)`` of ``sides`` (the child and its parent), one
    ``ModelEval`` each. With ``answers`` (a folder: ``checkpoints/.answers``) a question a GGUF answered at an earlier
    gate is not asked again (``evolution.metrics.answers``).

    The (GGUF, metric) pairs are shared out over two threads of one llama.cpp core each (where there are two or
    more cores), the costliest first (``Metric.cost``), a unit never before those it reads answers from
    (``Metric.after``) on the same GGUF. A small model's replies, one token at a time, do not keep several cores busy
    with one llama.cpp context: on the 2-core machine, 40 probes to a quick child took 18.0 s at 2 threads and 9.2 s
    at 1; child and parent one after the other at 2 threads each 65.8 s, side by side at 1 thread each 21.1 s (the
    same replies), and a pool of their metrics finishes both sides together where side by side waited for the
    slower one. Each thread holds one model at a time (at most two in memory, as a swap holds); one answer book per
    GGUF is shared by both threads. ``cores``: how many to use (None: all); ``workers``: threads (None: two where
    there are two cores or more; 1: one context on every core, each metric in turn, as the gate measured before);
    ``books``: each side's answer book instead of ``answers``' (a bench measures one GGUF as both sides)."""
    t0 = time.perf_counter()
    inputs = Inputs(es, cfg, smoke_prompt)
    cores = cores or os.cpu_count() or 1
    workers = max(1, min(workers or 2, cores))
    if books is None:
        books = [AnswerBook(answers, gguf, N_CTX) if answers is not None else None for gguf, _ in sides]
    jobs = sorted(((i, u) for u in table for i in range(len(sides))), key=lambda j: -j[1].cost(inputs))
    pool = _Pool(jobs)
    measured: dict[tuple[int, str], tuple[Measured, float]] = {}

    def work(n_threads: int) -> None:
        held: tuple[int, Models] | None = None
        try:
            while (job := pool.take()) is not None:
                i, unit = job
                if held is None or held[0] != i:  # one model at a time per thread
                    if held is not None:
                        held[1].close()
                    held = (i, Models(sides[i][0], n_threads=n_threads, book=books[i]))
                started = time.perf_counter()
                try:
                    measured[i, unit.name] = (unit.measure(held[1], inputs), time.perf_counter() - started)
                except BaseException:
                    pool.abort()  # the other thread takes nothing more: the error reaches the caller at once
                    raise
                finally:
                    pool.done(job)
        finally:
            if held is not None:
                held[1].close()

    _run_threads([cores - (workers - 1) * (cores // workers)] + [cores // workers] * (workers - 1), work)
    out = []
    for i, (gguf, gen) in enumerate(sides):
        book = books[i]
        if book is not None and book.hits:
            log.info("gate: generation %d answered %d question(s) from its earlier gates, asked %d", gen, book.hits,
                     book.misses)
        out.append(ModelEval.of(gen, {u.name: measured[i, u.name][0] for u in table}, table,
                                seconds=round(sum(measured[i, u.name][1] for u in table), 1),
                                evalset_hash=evalset_hash(es, cfg, smoke_prompt, table),
                                fingerprints={u.name: u.fingerprint(inputs) for u in table}))
    log.info("gate: %d metric(s) on %d model(s) in %.1f s on %d thread(s)", len(table), len(sides),
             time.perf_counter() - t0, workers)
    return out


class _Pool:
    """The (side, unit) jobs in the order given; ``take`` hands out the first whose ``after`` units are done on its
    side (None: nothing is left), waiting while only such blocked jobs remain."""

    def __init__(self, jobs: list[tuple[int, Metric]]):
        self._left, self._running = list(jobs), set()
        self._cond = threading.Condition()

    def _ready(self, job: tuple[int, Metric]) -> bool:
        i, unit = job
        pending = {u.name for j, u in [*self._left, *self._running] if j == i} - {unit.name}
        return not set(unit.after) & pending

    def take(self) -> tuple[int, Metric] | None:
        with self._cond:
            while self._left:
                job = next((j for j in self._left if self._ready(j)), None)
                if job is not None:
                    self._left.remove(job)
                    self._running.add(job)
                    return job
                self._cond.wait()
            return None

    def done(self, job: tuple[int, Metric]) -> None:
        with self._cond:
            self._running.discard(job)
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._left.clear()
            self._cond.notify_all()


def _run_threads(threads: Sequence[int], work) -> None:
    """``work(n_threads)`` on one thread per entry of ``threads`` (the llama.cpp threads each gets), at once; the
    first error is raised again here. Daemon threads (llama.cpp runs without the GIL): a SIGTERM's KeyboardInterrupt
    in the calling thread stops the worker at once, instead of waiting for every job to finish."""
    if len(threads) == 1:
        work(threads[0])
        return
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:  # noqa: BLE001 — raised again in the calling thread
            errors.append(exc)

    started = [threading.Thread(target=run, args=(n,), name=f"gate-{k}", daemon=True) for k, n in enumerate(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    if errors:
        raise errors[0]


def lineage_evals(gate_results: dict[int, dict | None], gen0_dir: Path | None = None) -> list[ModelEval]:
    """The anchors' numbers: each gated generation's metrics and fingerprints as its ``gate_result`` in the ledger
    recorded them (``gate_results``: generation -> payload; the hash chain covers them), and generation 0's from its
    own ``eval.json`` (measured, not gated: the ledger holds no ``gate_result`` for it). A result recorded before
    fingerprints were kept has none: no anchor (generation 0 is then re-measured, ``run``)."""
    out = [ModelEval(g, {k: v for k, v in p.get("metrics", {}).items() if isinstance(v, (int, float))},
                     fingerprints=dict(p.get("fingerprints") or {}))
           for g, p in gate_results.items() if p]
    if gen0_dir is not None and (gen0_dir / "eval.json").is_file():
        out.append(ModelEval.from_dict(json.loads((gen0_dir / "eval.json").read_text())["child"]))
    return out


Anchors = dict[str, dict[str, Anchor]]


def anchors(child: ModelEval, lineage: Sequence[ModelEval],
            table: Sequence[Metric] = TABLE) -> tuple[Anchors, dict[str, str]]:
    """Per metric with anchor rules (``Metric.better``): generation 0's value and the lineage's best (``lineage``:
    the parent's ancestry with the parent's fresh measurement), among the generations measured on the same items as
    the child (equal fingerprints). Returns the anchors and, per metric, why one is missing (for the report)."""
    found: Anchors = {}
    why: dict[str, str] = {}
    for u in table:
        value, mine = child.metrics.get(u.name), child.fingerprints.get(u.name)
        if u.better is None or value is None or mine is None:
            continue
        same = [e for e in lineage if e.fingerprints.get(u.name) == mine and e.metrics.get(u.name) is not None]
        sign = -1 if u.better == "lower" else 1
        a = {}
        if same:
            best = max(same, key=lambda e: (sign * e.metrics[u.name], -e.gen))  # the earliest of equal values
            a["best"] = Anchor(best.gen, best.metrics[u.name])
        zero = next((e for e in same if e.gen == 0), None)
        if zero is not None:
            a["gen0"] = Anchor(0, zero.metrics[u.name])
        other = sorted({e.gen for e in lineage} - {e.gen for e in same})
        if other:
            why[u.name] = (f"{u.name}: generation(s) {', '.join(map(str, other))} measured on other items, not "
                           "measured, or before fingerprints were kept: not anchors")
        found[u.name] = a
    return found, why


def check(child: ModelEval, parent: ModelEval | None, cfg: GateConfig, table: Sequence[Metric] = TABLE,
          anchored: Anchors | None = None, no_anchor: dict[str, str] | None = None) -> list[Check]:
    """Every rule of every unit applied to ``child``; a metric without a value (child or parent) is skipped.
    ``anchored``/``no_anchor``: the fixed anchors and why some are missing (``anchors``); None: no anchor rules."""
    checks = []
    for u in table:
        c = child.measured(u.name)
        p = parent.measured(u.name) if parent is not None else None
        if c is None or c.value is None:
            why = c.note if c is not None else "not measured"
            checks.append(Check(u.name, "", "", None, f"{u.name}: not enough data ({why})"))
            continue
        if p is not None and p.value is None:
            checks.append(Check(u.name, "", "", None, f"{u.name}: the parent has no value ({p.note}): "
                                                        "no rule against the parent"))
            p = None
        elif parent is not None and p is None:
            checks.append(Check(u.name, "", "", None, f"{u.name}: the parent was not measured on it: "
                                                        "no rule against the parent"))
        checks += u.rules(c, p, cfg)
        if anchored is not None:
            a = anchored.get(u.name, {})
            checks += u.anchor_rules(c, a.get("gen0"), a.get("best"), cfg)
            if (no_anchor or {}).get(u.name):
                checks.append(Check(u.name, "", "", None, no_anchor[u.name]))
    return checks


def _unset_required(cfg: GateConfig, table: Sequence[Metric]) -> str | None:
    required = [f for u in table for f in u.required]
    if all(getattr(cfg, f) is not None for f in required):
        return None
    names = " and ".join(f"gate.{f}" for f in required)
    each = {1: "", 2: "both "}.get(len(required), "all ")
    return f"thresholds: {names} must {each}be configured; with no thresholds the gate passes nothing"


def decide(child: ModelEval, parent: ModelEval | None, cfg: GateConfig, table: Sequence[Metric] = TABLE,
           anchored: Anchors | None = None) -> tuple[str, list[str]]:
    """The verdict and, for a fail, every reason (each names its metric)."""
    unset = _unset_required(cfg, table)
    reasons = ([unset] if unset else []) + [c.message for c in check(child, parent, cfg, table, anchored)
                                            if c.passed is False]
    return (FAIL if reasons else PASS), reasons


def run(child_gguf: Path, child_gen: int, parent_gguf: Path | None, parent_gen: int | None, es: EvalSet,
        cfg: GateConfig, smoke_prompt: str, table: Sequence[Metric] = TABLE, lineage: Sequence[ModelEval] = (),
        gen0_gguf: Path | None = None, answers: Path | None = None) -> GateResult:
    """Measure child and parent (the parent's numbers reused from its own report when the eval set is unchanged),
    and bound the child against the fixed anchors among ``lineage`` (the parent's ancestors' own measurements,
    ``lineage_evals``) and the parent. Generation 0's anchored metrics are re-measured on ``gen0_gguf`` when it
    was measured on other items (its numbers stay where they are: each gate re-measures, a few seconds).
    ``answers``: where each GGUF's replies are remembered (``measure``), so that the parent and generation 0 are
    asked only what they were not asked at an earlier gate."""
    parent = None
    if parent_gguf is not None:
        parent = cached_eval(parent_gguf.parent, evalset_hash(es, cfg, smoke_prompt, table))
        if parent is not None:
            log.info("gate: reusing generation %s's own measurements (same eval set)", parent_gen)
    if parent_gguf is not None and parent is None:
        child, parent = measure_all([(child_gguf, child_gen), (parent_gguf, parent_gen)], es, cfg, smoke_prompt,
                                    table, answers)
    else:
        child = measure(child_gguf, child_gen, es, cfg, smoke_prompt, table, answers)
    history = [e for e in lineage if parent is None or e.gen != parent.gen] + ([parent] if parent else [])
    if gen0_gguf is not None:
        history = _gen0_remeasured(history, child, gen0_gguf, es, cfg, smoke_prompt, table, answers)
    anchored, no_anchor = anchors(child, history, table)
    verdict, reasons = decide(child, parent, cfg, table, anchored)
    versus: dict[str, float] = {}
    if parent is not None:
        inputs = Inputs(es, cfg, smoke_prompt)
        for u in table:
            c, p = child.measured(u.name), parent.measured(u.name)
            if c.value is not None and p.value is not None:
                versus |= u.versus_parent(c, p, inputs)
    log.info("gate gen %d vs %s: %s %s", child_gen, parent_gen, verdict, "; ".join(reasons))
    return GateResult(verdict=verdict, reasons=reasons, child=child, parent=parent, thresholds=asdict(cfg),
                      checks=check(child, parent, cfg, table, anchored, no_anchor), versus_parent=versus,
                      anchors={m: {k: asdict(a) for k, a in v.items()} for m, v in anchored.items()})


def _gen0_remeasured(history: list[ModelEval], child: ModelEval, gguf: Path, es: EvalSet, cfg: GateConfig,
                     smoke_prompt: str, table: Sequence[Metric], answers: Path | None = None) -> list[ModelEval]:
    """``history`` with generation 0's anchored metrics re-measured where they were taken on other items than
    the child's (only those units: perplexity of the held-out text is a few seconds)."""
    zero = next((e for e in history if e.gen == 0), None)
    stale = [u for u in table if u.better is not None and child.metrics.get(u.name) is not None
             and (zero is None or zero.fingerprints.get(u.name) != child.fingerprints.get(u.name))]
    if not stale:
        return history
    log.info("gate: re-measuring generation 0's %s (measured on other items) for the anchors",
             ", ".join(u.name for u in stale))
    fresh = measure(gguf, 0, es, cfg, smoke_prompt, stale, answers)
    return [e for e in history if e.gen != 0] + [fresh]


def lessons(child: ModelEval, parent: ModelEval | None,
            table: Sequence[Metric] = TABLE) -> list[tuple[Metric, list[Lesson]]]:
    """Each metric's lessons (its items, child beside parent), for the metrics that measured any, in table order (a
    metric with too few items to count may still have asked them: ``experience_similarity``)."""
    out = []
    for u in table:
        c = child.measured(u.name)
        if c is None:
            continue
        found = u.lessons(c, parent.measured(u.name) if parent is not None else None)
        if found:
            out.append((u, found))
    return out


def report_lessons(report: dict, table: Sequence[Metric] = TABLE) -> list[tuple[Metric, list[Lesson]]]:
    """``lessons`` of a gate report as ``eval.json`` holds it (any layout; one from before lessons has none)."""
    child = ModelEval.from_dict(report["child"])
    parent = ModelEval.from_dict(report["parent"]) if report.get("parent") else None
    return lessons(child, parent, table)


LESSON_CHARS = {"asked": 80, "wanted": 80, "reply": 100}
"""How much of each text a report shows (``eval.json`` keeps it whole)."""


def _lesson_lines(u: Metric, found: list[Lesson]) -> list[str]:
    asked, wanted, score = u.lessons_columns
    counts: dict[str, int] = {}
    for lesson in found:
        counts[lesson.outcome] = counts.get(lesson.outcome, 0) + 1
    lines = [f"## Lessons: {u.lessons_title}", "",
             f"{len(found)} item(s): " + ", ".join(f"{n} {word}" for word, n in counts.items()), "",
             f"| # | {asked} | {wanted} | parent's reply | parent {score} | child's reply | child {score} | change |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    c = LESSON_CHARS
    for i, x in enumerate(found, 1):
        lines.append(f"| {i} | {markdown_cell(x.asked, c['asked'])} | {markdown_cell(x.wanted, c['wanted'])} | "
                     f"{markdown_cell(x.parent_reply, c['reply'])} | {_cell(x.parent_score)} | "
                     f"{markdown_cell(x.child_reply, c['reply'])} | {_cell(x.child_score)} | {x.outcome} |")
    return lines + [""]


def _cell(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _anchor_lines(result: GateResult) -> list[str]:
    """The rules against fixed anchors (generation 0, the lineage's best): each with the child's value."""
    rows = [k for k in result.checks if k.anchor is not None]
    if not rows:
        return []
    lines = ["## Against fixed anchors (no ratchet)", "", "| metric | child | rule | setting | passed |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k.metric} | {_cell(result.child.metrics.get(k.metric))} | {k.rule} | {k.setting} | "
              f"{'yes' if k.passed else 'NO'} |" for k in rows]
    return lines + [""]


def write_report(result: GateResult, out_dir: Path, table: Sequence[Metric] = TABLE) -> None:
    """``eval.json`` (every number and reply) and ``eval.md`` (a readable summary) in ``out_dir``."""
    atomic_write_json(out_dir / "eval.json", result.to_dict())
    c, p = result.child, result.parent
    units = [(u, c.measured(u.name), p.measured(u.name) if p else None) for u in table]
    units = [(u, cm, pm) for u, cm, pm in units if cm is not None]
    lines = [f"# Gate: generation {c.gen}" + (f" vs parent {p.gen}" if p else " (measured, not gated)"), "",
             f"**Verdict: {result.verdict.upper()}**", ""]
    lines += [f"- {r}" for r in result.reasons] + ([""] if result.reasons else [])
    if result.checks:  # gated: each skipped rule says why
        skipped = [k.message for k in result.checks if k.passed is None]
    else:  # measured only (generation 0)
        skipped = [f"{name}: not enough data ({note})" for name, note in c.notes.items()]
    lines += [f"- skipped: {s}" for s in skipped] + ([""] if skipped else [])
    lines += ["| metric | child | parent |", "| --- | --- | --- |"]
    for u, cm, pm in units:
        rows = u.rows(cm, pm) if cm.value is not None else [(u.label or u.name, None, pm.value if pm else None)]
        lines += [f"| {name} | {_cell(cv)} | {_cell(pv)} |" for name, cv, pv in rows]
    lines += [f"| {name.replace('_', ' ')} | {v:.3f} | - |" for name, v in result.versus_parent.items()]
    lines.append("")
    lines += probe_sample.report_lines(result.probes) if result.probes else []
    lines += retrieval_lines(result.retrieval) if result.retrieval else []
    lines += _anchor_lines(result)
    for u, cm, _ in units:
        if cm.value is not None:
            lines += u.markdown(cm)
    for u, found in lessons(c, p, table):
        lines += ([""] if lines[-1] else []) + _lesson_lines(u, found)
    atomic_write_text(out_dir / "eval.md", "\n".join(lines).rstrip("\n") + "\n")

"""Task adapters: one LoRA per task of ``[tasks]`` on top of each generation that passed its gate.

What a task is taught (chats to ``evolution[-LINEAGE]:TASK`` rated or corrected, transcripts and probes posted with
``"task"``; their rows carry the task: migration m007) stays out of the lineage's own training. After a child passed
its gate, the age-up's ``tasks`` stage goes through the tasks, each resumable on its own (a crash redoes only the
task it was in):

1. **Train** an adapter when the task has ``[tasks] min_rows`` taught rows more than its current adapter was
   trained on: SFT (``evolution.train.sft``) on all of the task's rows, on the child's merged weights, at most
   ``max_steps`` steps; then ``export.lora_to_gguf`` (llama.cpp loads it beside the generation's GGUF).
2. **Gate** it on the child's GGUF, with llama.cpp applying the adapter against the child alone, on the task's own
   items: its taught prompts (mean ROUGE-L of the replies against the taught replies must gain at least
   ``min_gain``), its probes (not fewer right) and the lineage's recall items (at most ``recall_tolerance`` lower).
3. **Carry** the adapter the parent served for the task when no new one was trained or the new one failed — gated
   on the child the same way first, since it was trained on other weights. One that fails is dropped: the task is
   then answered by the generation alone, and its next rows train a new one.

A passing adapter is kept as ``gen_NNNN/tasks/TASK.gguf``, an artifact of the generation (its SHA-256 in the
``exported`` event, so rollback serves the generation's own adapters and retention deletes them with it), and each
gated adapter is a ``task_adapter`` event: verdict, reasons, numbers, and the generation it was trained on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution import evals, export
from evolution.config import AgeUpConfig, TasksConfig
from evolution.fsutil import atomic_write_bytes, sha256_file
from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.llamacpp import open_llama
from evolution.metrics.common import N_CTX
from evolution.metrics.experience_similarity import rouge_l

log = logging.getLogger(__name__)

FOLDER = "tasks"
"""In a generation's directory: ``TASK.gguf`` for each task adapter that passed its gate on it."""
KIND = "task_adapter"
"""The ``kind`` of a task adapter among a generation's artifacts."""
MAX_TAUGHT = 40
"""The task's newest taught prompts its gate asks (each a reply of up to ``gate.answer_max_tokens``, twice)."""


@dataclass
class TaskOutcome:
    """What the ``tasks`` stage did for one task (in ``generation.json``, and as a ``task_adapter`` event)."""

    task: str
    verdict: str
    """``pass`` / ``fail`` (a ``task_adapter`` event), or ``none``: no adapter to gate (too few rows, none before)."""
    reasons: list[str] = field(default_factory=list)
    rows: int = 0
    """The task's taught rows when it was gated (an adapter trained now trained on all of them)."""
    trained_on: int | None = None
    """The generation the adapter was trained on (this one, or an earlier one whose adapter was carried)."""
    trained_rows: int = 0
    """The rows the adapter was trained on (the next adapter trains when ``min_rows`` more came in)."""
    path: str | None = None
    """Relative to the generation's directory, where it passed."""
    sha256: str | None = None
    metrics: dict = field(default_factory=dict)
    tried: list[dict] = field(default_factory=list)
    """Every adapter gated for it: the new one and/or the carried one, with its numbers and reasons."""
    training: dict = field(default_factory=dict)
    """The new adapter's SFT steps and last loss, where one was trained."""
    seconds: float = 0.0

    def event(self, gen: int) -> ev.Event:
        return ev.task_adapter(gen, self.task, self.verdict, self.reasons, rows=self.rows, trained_on=self.trained_on,
                               trained_rows=self.trained_rows, sha256=self.sha256, metrics=self.metrics,
                               tried=self.tried)


def records(intake: Intake, task: str) -> list[dict]:
    """Every SFT record task ``task`` was taught (transcripts, replies rated good, corrections), oldest first."""
    from evolution.train import sft

    return [rec for _, rec in sorted(sft.inbox(intake.inbox(0, 0, task)), key=lambda kv: kv[0])]


def served_adapters(ledger: Ledger, gen: int) -> dict[str, dict]:
    """Task -> the artifact (``path`` relative to the data root, ``sha256``) of each task adapter generation ``gen``
    serves: those that passed their gate on it (its ``exported`` artifacts of kind ``task_adapter``)."""
    arts = [a for a in ledger.generation(gen).artifacts if a.get("kind") == KIND]
    return {Path(a["path"]).stem: a for a in arts}


def _outcomes(ledger: Ledger, gen: int) -> dict[str, dict]:
    """Task -> the last ``task_adapter`` payload recorded for generation ``gen``."""
    return {e.payload["task"]: e.payload for e in ledger.entries(gen=gen, kind=ev.TASK_ADAPTER)}


@dataclass
class Items:
    """What a task adapter is gated on."""

    taught: list[tuple[list[dict], str]]
    """(prompt, taught reply) of the task's newest taught rows."""
    probes: list[dict]
    recall: list[dict]
    """The lineage's recall items (the curriculum's, as the child's gate saved them)."""


def items_of(recs: list[dict], probes: list[dict], recall: list[dict]) -> Items:
    taught = [(r["messages"][:-1], r["messages"][-1]["content"]) for r in recs[-MAX_TAUGHT:]
              if len(r["messages"]) >= 2 and r["messages"][-1]["role"] == "assistant"]
    return Items(taught, probes, recall)


def _measure(gguf: Path, adapter: Path | None, items: Items, max_tokens: int) -> dict:
    llm = open_llama(gguf, n_ctx=N_CTX, seed=0, lora=adapter)
    try:
        replies = [evals.reply(llm, prompt, max_tokens) for prompt, _ in items.taught]
        probe, probe_items = evals.recall(llm, items.probes, max_tokens) if items.probes else (None, [])
        recall, _ = evals.recall(llm, items.recall, max_tokens) if items.recall else (None, [])
    finally:
        llm.close()
    sims = [rouge_l(r, want) for r, (_, want) in zip(replies, items.taught)]
    return {"taught_similarity": sum(sims) / len(sims) if sims else None, "probe_recall": probe, "recall": recall,
            "replies": replies[:10], "probes": [asdict(r) for r in probe_items][:20]}


def gate(gguf: Path, adapter: Path, items: Items, cfg: TasksConfig, max_tokens: int,
         without: dict | None = None) -> tuple[bool, list[str], dict, dict]:
    """Gate ``adapter`` on generation ``gguf``: ``(passed, reasons, with, without)``, ``with`` / ``without`` the
    numbers with the adapter applied and of the generation alone (``without`` measured unless given)."""
    without = without if without is not None else _measure(gguf, None, items, max_tokens)
    with_ = _measure(gguf, adapter, items, max_tokens)
    reasons = []
    if items.taught:
        gain = with_["taught_similarity"] - without["taught_similarity"]
        if gain < cfg.min_gain - 1e-9:
            reasons.append(f"its replies to the task's {len(items.taught)} taught prompts came {gain:+.3f} closer "
                           f"(ROUGE-L {without['taught_similarity']:.3f} -> {with_['taught_similarity']:.3f}) than "
                           f"the generation's own; tasks.min_gain is {cfg.min_gain}")
    else:
        reasons.append("the task has no taught replies to gate an adapter on")
    if items.probes and with_["probe_recall"] < without["probe_recall"] - 1e-9:
        reasons.append(f"it answered fewer of the task's probes ({with_['probe_recall']:.3f}) than the generation "
                       f"alone ({without['probe_recall']:.3f})")
    if items.recall and with_["recall"] < without["recall"] - cfg.recall_tolerance - 1e-9:
        reasons.append(f"the lineage's recall with it applied fell to {with_['recall']:.3f} from "
                       f"{without['recall']:.3f}, more than tasks.recall_tolerance {cfg.recall_tolerance}")
    return not reasons, reasons, with_, without


def _numbers(m: dict) -> dict:
    return {k: m[k] for k in ("taught_similarity", "probe_recall", "recall")}


def rehearsal(own: list[dict], n_task: int, share: float, seed: int) -> list[dict]:
    """``share`` rows of the child's own SFT records (``own``) per task row, drawn without replacement (seeded)."""
    import random

    k = min(len(own), round(n_task * share))
    return random.Random(seed).sample(own, k) if k else []


def train_adapter(hf: Path, recs: list[dict], own: list[dict], cfg: AgeUpConfig, work: Path, out: Path, task: str,
                  progress) -> dict:
    """SFT a fresh LoRA on ``hf`` (the child's merged weights) on the task's ``recs`` and ``[tasks] rehearse`` rows
    of the child's own (``own``); write it as a GGUF LoRA at ``out``."""
    import random

    from evolution import train
    from evolution.train import sft

    tcfg = AgeUpConfig.from_dict(cfg.to_dict()).train
    tcfg.sft.max_steps, tcfg.sft.epochs, tcfg.sft.lr = cfg.tasks.max_steps, cfg.tasks.epochs, cfg.tasks.lr
    tcfg.processes = 1
    mixed = recs + rehearsal(own, len(recs), cfg.tasks.rehearse, cfg.train.seed)
    random.Random(cfg.train.seed).shuffle(mixed)
    result = train.run_stages(hf, [sft.STAGE], {"sft": mixed}, tcfg, work,
                              (lambda stage, *a: progress(f"task {task}", *a)) if progress else None)
    export.lora_to_gguf(result.adapter_dir, hf, out, task)
    m = result.stages.get("sft")
    return {"steps": result.steps, "rows": len(recs), "rehearsed": len(mixed) - len(recs),
            "loss_first": m.loss_first if m else None, "loss_last": m.loss_last if m else None}


def build(staging: Path, gguf: Path, hf: Path, child: int, parent: int, root_dir: Path, ledger: Ledger,
          cfg: AgeUpConfig, recall_items: list[dict], own_sft: list[dict], done: dict[str, dict], save,
          progress=None) -> dict[str, dict]:
    """The ``tasks`` stage on the child in ``staging`` (its GGUF ``gguf``, merged weights ``hf``, its own SFT records
    ``own_sft`` to rehearse): every task of ``cfg.tasks`` not in ``done`` (outcomes of an earlier, interrupted run),
    each saved with ``save(done)`` as it ends. Return ``done``: task -> ``TaskOutcome`` as a dict."""
    tcfg = cfg.tasks
    intake = Intake(ledger)
    before = served_adapters(ledger, parent)
    before_outcomes = _outcomes(ledger, parent)
    max_tokens = cfg.gate.answer_max_tokens
    for task in tcfg.names:
        if task in done:
            continue
        t0 = time.perf_counter()
        recs = records(intake, task)
        items = items_of(recs, intake.probes.items(task), recall_items)
        prev = before.get(task)
        prev_out = before_outcomes.get(task, {})
        trained_rows = prev_out.get("trained_rows", 0) if prev else 0
        out = TaskOutcome(task, "none", rows=len(recs))
        candidates: list[tuple[str, Path, int, int]] = []
        if len(recs) - trained_rows >= tcfg.min_rows:
            work = staging / "work" / FOLDER / task
            fresh = work / "adapter.gguf"
            if not fresh.is_file():
                log.info("task %s: training an adapter on %d taught rows", task, len(recs))
                out.training = train_adapter(hf, recs, own_sft, cfg, work / "train", fresh, task, progress)
            candidates.append(("trained", fresh, child, len(recs)))
        elif not prev:
            out.reasons.append(f"{len(recs)} taught row(s), {tcfg.min_rows} needed (tasks.min_rows) for a first "
                               "adapter")
        if prev:
            candidates.append(("carried", root_dir / prev["path"], prev_out.get("trained_on", parent), trained_rows))
        without = None
        for how, path, trained_on, n_rows in candidates:
            if how == "carried" and (not path.is_file() or sha256_file(path) != prev["sha256"]):
                out.tried.append({"adapter": how, "trained_on": trained_on, "passed": False,
                                  "reasons": [f"{path} is missing or does not match the SHA-256 the ledger recorded"]})
                out.verdict = ev.FAIL
                continue
            passed, reasons, with_, without = gate(gguf, path, items, tcfg, max_tokens, without)
            out.tried.append({"adapter": how, "trained_on": trained_on, "passed": passed, "reasons": reasons,
                              "with": _numbers(with_), "without": _numbers(without)})
            out.metrics = {"with": _numbers(with_), "without": _numbers(without)}
            out.verdict = ev.PASS if passed else ev.FAIL
            if passed:
                dest = staging / FOLDER / f"{task}.gguf"
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(dest, path.read_bytes())  # ~20 MB for the 135M's rank-16 adapter
                out.path, out.sha256 = f"{FOLDER}/{task}.gguf", sha256_file(dest)
                out.trained_on, out.trained_rows = trained_on, n_rows
                break
        # why each adapter tried and not kept failed (a pass first time has none)
        failed = [f"{t['adapter']} adapter: {'; '.join(t['reasons'])}" for t in out.tried if not t["passed"]]
        if out.verdict == ev.FAIL:
            out.reasons = failed
            out.trained_on = out.tried[-1]["trained_on"]  # the last adapter gated (none passed: none is served)
        elif failed:  # passed with the adapter carried from an earlier generation: say why not a new one
            out.reasons = failed + [f"carried the adapter trained on generation {out.trained_on}"]
        out.seconds = round(time.perf_counter() - t0, 3)
        log.info("task %s: %s%s", task, out.verdict, f" ({'; '.join(out.reasons)})" if out.reasons else "")
        done[task] = asdict(out)
        save(done)
    return done


def record(ledger: Ledger, gen: int, outcomes: dict[str, dict]) -> None:
    """Append a ``task_adapter`` event for each gated adapter of ``gen`` not recorded yet (``none``: nothing)."""
    have = set(_outcomes(ledger, gen))
    for task, d in outcomes.items():
        if d["verdict"] != "none" and task not in have:
            ledger.record(TaskOutcome(**d).event(gen))

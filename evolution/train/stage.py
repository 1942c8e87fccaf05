"""What a training stage is: a small unit of data, and what one stage run did.

A stage (``Stage``) is one training signal: CPT on raw text, SFT on chat examples, preference
learning on rated replies, and whatever comes next. It names itself (the name is its config
section ``[train.<name>]``, whose dataclass it declares beside itself, its data file
``gen_NNNN/data/<name>.jsonl``, its working folder and its key in ``TrainResult``), says where its records come from (the curriculum, what the chat agent
sent: ``evolution.intake.Inbox``), whether and how it runs on them (``plan``), how they become rows, and which
trainer runs them (with arguments of its own over the shared ones, and the parent at hand as a
reference model). Everything else —
checkpoints, resume, precision, the adapter handed from stage to stage — is shared
(``evolution.train.runner``). The stages an age-up runs, in order, are ``train.stages`` of the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evolution.intake.inbox import Inbox

Records = list[dict]
"""The records of one stage, as stored one JSON object a line in ``data/<stage>.jsonl``."""


def _runs(records: Records, settings) -> tuple[str | None, str]:
    return None, ""


@dataclass(frozen=True)
class Stage:
    """One training signal. Its settings are the ``[train.<name>]`` section (``config``)."""

    name: str
    rows: Callable[[Any, Records, Any], list[dict]]
    """rows(tokenizer, records, settings): what its trainer trains on (token rows with ``input_ids``, and
    ``assistant_masks`` where only part of a row is learned, for the lane trainer; chat rows for TRL's)."""
    seq_len: Callable[[Any], int]
    """seq_len(settings): the longest row it makes, in tokens."""
    trainer: Callable[..., Any]
    """trainer(model, tokenizer, rows, args, callbacks, backend, parent): a ready ``transformers.Trainer``;
    ``args`` are the ``TrainingArguments`` keywords (the shared ones — steps, batch, schedule, saving,
    precision — updated by ``args`` below); ``parent`` is the parent's HF directory (a reference model)."""
    curriculum: Callable[[Any], Records]
    """curriculum(cur): its records in the curriculum (``evolution.curriculum.Curriculum``)."""
    config: type
    """The dataclass of its section ``[train.<name>]``, declared beside it (``evolution.config.TrainConfig`` has
    one field of it, named after the stage): at least ``epochs``, ``max_steps`` and ``lr``, and
    ``problems(where)``, its bad fields in words."""
    inbox: Callable[[Inbox], list[tuple[Any, dict]]] = lambda inbox: []
    """inbox(inbox): its ``(order, record)`` from what the chat agent sent since the parent; for chat records
    that answer the same prompt, the one of the highest ``order`` wins; rated replies of one prompt are all kept,
    and replace older generations' ratings of it (``evolution.replay``, Recency)."""
    plan: Callable[[Records, Any], tuple[str | None, str]] = _runs
    """plan(records, settings): (method, why) before any model is loaded; method 'skip' skips the stage and
    records why, None runs it with no method to name (a stage with no rows is skipped all the same)."""
    args: Callable[[Any], dict] = lambda settings: {}
    """args(settings): ``TrainingArguments`` keywords of its own, over the shared ones."""
    cpu_attention: str = "sdpa"
    """Attention implementation on a CPU (CUDA always uses SDPA)."""
    one_row_per_record: bool = False
    """Each record makes one row (chat records), so capped steps see a countable number of records
    (``evolution.train.capped_records``); CPT packs text into blocks, and is not."""


SUMMARY_STEPS = 5


def summarize(history: list[dict], last: int = SUMMARY_STEPS) -> dict[str, float]:
    """Each number the trainer logged, averaged over the last ``last`` logged steps that have it."""
    tail = history[-last:]
    keys = sorted({k for h in tail for k in h})
    return {k: sum(h[k] for h in tail if k in h) / sum(1 for h in tail if k in h) for k in keys}


@dataclass
class StageMetrics:
    """What one training stage did."""

    stage: str
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    resumed_from_step: int | None = None
    skipped: bool = False
    method: str | None = None
    """What the stage's ``plan`` chose ('kto', 'dpo', 'skip'); None for a stage with one way to train."""
    reason: str = ""
    """Why it chose that method, or why the stage was skipped."""
    summary: dict[str, float] = field(default_factory=dict)
    """What the trainer logged (loss, rewards/margins, …), averaged over the last ``SUMMARY_STEPS`` logged steps
    of this run: the numbers of one step are noisy."""

    @property
    def loss_first(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def loss_last(self) -> float | None:
        return self.losses[-1] if self.losses else None


@dataclass
class TrainResult:
    """The trained adapter and what each stage did, by stage name in the order they ran."""

    backend: str
    adapter_dir: Path
    stages: dict[str, StageMetrics]

    def to_dict(self) -> dict:
        """``backend``, ``adapter_dir`` and one dict per stage under its name (the only dict values)."""
        d: dict = {"backend": self.backend, "adapter_dir": str(self.adapter_dir)}
        for name, s in self.stages.items():
            d[name] = asdict(s) | {"loss_first": s.loss_first, "loss_last": s.loss_last}
        return d

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages.values())


def stage_record(m: StageMetrics) -> dict:
    """What the ledger keeps of a stage (``training_finished``): its outcome and summarized numbers."""
    return {"steps": m.steps, "skipped": m.skipped, "method": m.method, "reason": m.reason,
            "tokens": m.tokens, "tokens_per_s": m.tokens_per_s, "loss_first": m.loss_first, "loss_last": m.loss_last,
            "summary": m.summary}


def stage_dicts(train_info: dict) -> dict[str, dict]:
    """The per-stage metrics of a ``TrainResult.to_dict()`` (as stored in ``generation.json``), by stage."""
    return {k: v for k, v in train_info.items() if isinstance(v, dict)}

"""What a training stage is: a small unit of data, and what one stage run did.

A stage (``Stage``) is one training signal: CPT on raw text, SFT on chat examples, and whatever
comes next. It names itself (the name is its config section ``[train.<name>]``, its data file
``gen_NNNN/data/<name>.jsonl``, its working folder and its key in ``TrainResult``), says where
its records come from, how they become token rows, and which trainer runs them. Everything else —
checkpoints, resume, precision, the adapter handed from stage to stage — is shared
(``evolution.train.runner``). The stages an age-up runs, in order, are ``train.stages`` of the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Records = list[dict]
"""The records of one stage, as stored one JSON object a line in ``data/<stage>.jsonl``."""


@dataclass(frozen=True)
class Stage:
    """One training signal. Its settings are the ``[train.<name>]`` section (a dataclass with at
    least ``epochs``, ``max_steps`` and ``lr``)."""

    name: str
    rows: Callable[[Any, Records, Any], list[dict]]
    """rows(tokenizer, records, settings): the token rows it trains on (``input_ids``, and
    ``assistant_masks`` where only part of a row is learned)."""
    seq_len: Callable[[Any], int]
    """seq_len(settings): the longest row it makes, in tokens."""
    trainer: Callable[..., Any]
    """trainer(model, tokenizer, rows, args, callbacks, backend): a ready ``transformers.Trainer``;
    ``args`` are the shared ``TrainingArguments`` keywords (steps, batch, schedule, saving, precision)."""
    curriculum: Callable[[Any], Records]
    """curriculum(cur): its records in the curriculum (``evolution.curriculum.Curriculum``)."""
    inbox: Callable[[list[tuple[int, list[dict]]]], list[tuple[int, dict]]] = lambda conversations: []
    """inbox(conversations): its ``(id, record)`` from the chat transcripts received since the parent."""
    cpu_attention: str = "sdpa"
    """Attention implementation on a CPU (CUDA always uses SDPA)."""


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


def stage_dicts(train_info: dict) -> dict[str, dict]:
    """The per-stage metrics of a ``TrainResult.to_dict()`` (as stored in ``generation.json``), by stage."""
    return {k: v for k, v in train_info.items() if isinstance(v, dict)}

"""The ``[train]`` section's own settings: what every training stage shares.

Each stage unit declares its own section (``[train.cpt]``: ``cpt.CptConfig``, …) beside its code;
``evolution.config.TrainConfig`` is ``TrainSettings`` with one field per unit of ``evolution.train.STAGES``,
named after it. The runner, the engine and the data-parallel launch read ``TrainSettings`` fields and a
stage's own section through ``stage_sections``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from evolution.checks import positive_int

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKENDS = ("auto", "unsloth", "hf")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(slots=True)
class TrainSettings:
    """Training stages in order (continual pretraining, SFT, preference) into one LoRA adapter on the parent.

    Settings shared by every stage live here (``[train]``); each stage has its own section,
    ``[train.<stage>]``, a field of ``config.TrainConfig`` named after the stage (its unit reads it).
    """

    stages: list[str] = field(default_factory=list)
    """The stages to run, in order; each continues the adapter the one before it left (``config.TrainConfig``'s
    default: every unit of ``evolution.train.STAGES``, in that order)."""
    backend: str = "auto"
    """'auto' (Unsloth when CUDA and unsloth are present, else 'hf'), 'unsloth' or 'hf'."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    save_steps: int = 25
    """Checkpoint every K optimizer steps."""
    save_total_limit: int = 2
    """Keep only the last N checkpoints."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default); with ``processes`` > 1, shared out among the processes."""
    processes: int = 1
    """Data-parallel training processes (DDP under ``torchrun``: gloo on a CPU, NCCL with one GPU each on CUDA).
    ``batch_size`` is per process: the global batch is ``batch_size`` x ``grad_accum`` x ``processes``.
    More than 1 trains on the ``hf`` backend ('auto' picks it; 'unsloth' is refused)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory (a third more compute). None: on for
    CUDA, off on a CPU, where a small model's activations fit in memory easily."""
    precision: str = "auto"
    """'auto' (bf16 autocast where the CPU has AVX512-BF16/AMX or the GPU supports bf16, else fp32),
    'bf16' or 'fp32'. LoRA weights and the optimizer stay fp32 either way."""

    def stage_sections(self) -> dict:
        """Every stage's own section (its unit's config dataclass), by stage name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if dataclasses.is_dataclass(getattr(self, f.name))}

    def problems(self) -> list[str]:
        """Every bad field of ``[train]`` and of each stage's section, in the order ``config.validate`` reports."""
        p: list[str] = []
        if self.backend not in BACKENDS:
            p.append(f"train.backend must be 'auto', 'unsloth' or 'hf', got {self.backend!r}")
        if self.backend == "unsloth" and isinstance(self.processes, int) and self.processes > 1:
            p.append(f"train.backend 'unsloth' trains in one process; with train.processes = {self.processes} use "
                     "backend 'auto' or 'hf' (transformers + PEFT under DDP), or set processes = 1")
        sections = self.stage_sections()
        stages = self.stages
        if (not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages)
                or len(set(stages)) != len(stages)):
            p.append(f"train.stages must be a non-empty list of distinct stage names, got {stages!r}")
        else:
            p += [f"train.stages: unknown stage {s!r} (known: {', '.join(sections)})" for s in stages
                  if s not in sections]
        for name, section in sections.items():
            p += section.problems(f"train.{name}")
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "save_steps", "save_total_limit",
                     "processes"):
            p += positive_int(f"train.{name}", getattr(self, name))
        p += positive_int("train.threads", self.threads, allow_none=True)
        if not isinstance(self.seed, int) or self.seed < 0:
            p.append(f"train.seed must be a non-negative integer, got {self.seed!r}")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"train.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            p.append(f"train.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            p.append("train.target_modules must be a non-empty list of module names")
        if self.gradient_checkpointing not in (None, True, False):
            p.append(f"train.gradient_checkpointing must be true, false or unset, got {self.gradient_checkpointing!r}")
        if self.precision not in PRECISIONS:
            p.append(f"train.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        return p

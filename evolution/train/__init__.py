"""Training: the configured stages, in order, into one LoRA adapter on the parent generation.

One entry point, ``train``. The stages are data: ``STAGES`` lists every stage unit this package
has (``cpt``: continual pretraining on raw text; ``sft``: chat examples, assistant-only loss;
``preference``: KTO / DPO on rated replies, the parent as reference), and ``train.stages`` of the
config picks which run, in which order. A new training signal is one module here (a ``Stage``: its
name, its records, its plan, its rows, its trainer, and the dataclass of its config section
``[train.<name>]``) and one entry in ``STAGES``; ``evolution.config`` makes the section from it.

Shared parts: ``settings`` (the ``[train]`` section itself: ``TrainSettings``), ``backend`` (Unsloth or
transformers + PEFT, precision, the LoRA model), ``checkpoints`` (SHA-256 ``COMPLETE`` markers, resume,
rejection, weights-only loads), ``lanes`` (the packed-lane collator, loss and trainer CPT and SFT use), ``runner`` (each
stage in order, resumable, with progress callbacks) and ``distributed`` (the same stages in
``[train] processes`` processes under torchrun, each running ``evolution.rank``, rank 0 writing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evolution.train import cpt, distributed, preference, sft
from evolution.train.backend import load_model, resolve_precision, select_backend
from evolution.train.checkpoints import COMPLETE, checkpoint_problems, last_complete_checkpoint
from evolution.train.lanes import LaneCollator, lane_loss
from evolution.train.runner import ProgressFn, run_here
from evolution.train.settings import TrainSettings
from evolution.train.stage import Records, Stage, StageMetrics, TrainResult, stage_dicts, stage_record

STAGES: tuple[Stage, ...] = (cpt.STAGE, sft.STAGE, preference.STAGE)
"""Every stage unit, in the default order."""

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def stages_of(cfg: TrainSettings) -> list[Stage]:
    """The stage units ``train.stages`` names, in its order (``config.validate`` checked the names)."""
    return [BY_NAME[name] for name in cfg.stages]


def planned(cfg: TrainSettings, data: dict[str, Records]) -> list[str]:
    """The stages of ``train.stages`` whose ``plan`` runs them on ``data`` (for progress: the rest are skipped)."""
    sections = cfg.stage_sections()
    return [s.name for s in stages_of(cfg) if s.plan(data.get(s.name, []), sections[s.name])[0] != "skip"]


def run_stages(parent: Path, stages: Sequence[Stage], data: dict[str, Records], cfg: TrainSettings, workdir: Path,
               progress: ProgressFn | None = None, extra_callbacks: list | None = None) -> TrainResult:
    """Train ``stages`` in order on ``parent`` (an HF checkpoint dir) into ``workdir``; resumable.

    ``data``: each stage's records by stage name. Returns the adapter of the last stage that trained
    and per-stage metrics. Finished stages are not re-run. With ``cfg.processes`` > 1 the stages run in
    that many processes (``distributed.launch``; ``extra_callbacks`` stay in this process unused:
    a SIGTERM stops the ranks instead).
    """
    if cfg.processes > 1:
        return distributed.launch(parent, stages, data, cfg, workdir, progress)
    return run_here(parent, stages, data, cfg, workdir, progress, extra_callbacks)


def capped_records(cfg: TrainSettings) -> dict[str, int]:
    """Per stage of ``cfg`` that makes one row per record and whose ``max_steps`` caps it: how many rows its steps
    see (``max_steps`` x the global batch); where a stage has more records, some are never seen, and
    ``replay.materialize`` keeps what was taught since the parent among those that are (the quick preset: 100 SFT
    steps see 800 of ~2,300 records)."""
    sections = cfg.stage_sections()
    out = {}
    for stage in stages_of(cfg):
        settings = sections[stage.name]
        if stage.one_row_per_record and settings.max_steps:
            per_step = cfg.batch_size * cfg.grad_accum * cfg.processes
            out[stage.name] = settings.max_steps * per_step
    return out


def train(parent: Path, data: dict[str, Records], cfg: TrainSettings, workdir: Path,
          progress: ProgressFn | None = None, extra_callbacks: list | None = None) -> TrainResult:
    """Train the configured stages on ``parent`` (an HF checkpoint dir) into ``workdir``; resumable.

    ``data``: each stage's records by stage name (``replay.read``). Returns the adapter of the
    last stage that trained and per-stage metrics. Finished stages are not re-run.
    """
    return run_stages(parent, stages_of(cfg), data, cfg, workdir, progress, extra_callbacks)


__all__ = ["BY_NAME", "COMPLETE", "STAGES", "LaneCollator", "ProgressFn", "Records", "Stage", "StageMetrics",
           "TrainResult", "TrainSettings", "capped_records", "checkpoint_problems", "lane_loss", "last_complete_checkpoint", "load_model",
           "resolve_precision", "planned", "run_stages", "select_backend", "stage_dicts", "stage_record", "stages_of", "train"]

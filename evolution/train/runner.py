"""The stage runner: each stage in order into one LoRA adapter, resumable, with progress callbacks.

Each stage trains the parent with a fresh LoRA adapter that starts from the adapter the stage
before it left. It checkpoints every ``save_steps`` into ``<workdir>/<stage>/checkpoint-N``
(keeping the last ``save_total_limit``) and resumes from the last trusted one after a crash
(``evolution.train.checkpoints``); a finished stage, whose ``<stage>/adapter`` still matches its
hashes, is never run again. A stage whose ``plan`` says 'skip', or with no rows, is skipped, and
its metrics say why. With ``[train] processes`` > 1 the same runner runs in each process of a
data-parallel run (``evolution.train.distributed``, ``evolution.rank``), rank 0 alone writing markers and
adapters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from evolution.train.settings import TrainSettings
from evolution.errors import EvolutionError
from evolution.train import backend as engine
from evolution.train import checkpoints, distributed
from evolution.train.stage import Records, Stage, StageMetrics, TrainResult, summarize

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, "float | None"], None]
"""progress(stage, step, total_steps, last_loss)"""


def _callbacks(stage: str, total: int, metrics: StageMetrics, history: list[dict], progress: ProgressFn | None):
    from transformers import TrainerCallback

    class _Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                metrics.losses.append(float(logs["loss"]))
                history.append({k: float(v) for k, v in logs.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"})

        def on_step_end(self, args, state, control, **kw):
            if progress:
                progress(stage, state.global_step, total, metrics.loss_last)

        def on_save(self, args, state, control, **kw):
            distributed.barrier()  # every rank has written its RNG state into the checkpoint
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if distributed.is_main() and ckpt.is_dir():
                checkpoints.mark_complete(ckpt, state.global_step)

    return [_Track()]


def _steps(n_rows: int, per_step: int, epochs: float, cap: int | None) -> int:
    per_epoch = math.ceil(n_rows / per_step)
    steps = max(1, math.ceil(per_epoch * epochs))
    return min(steps, cap) if cap else steps


def _checkpointing_arg(cfg: TrainSettings, use_cuda: bool) -> dict:
    """Activation checkpointing, under the name this transformers knows (renamed in 5.x; TRL turns it on)."""
    from transformers import TrainingArguments

    on = use_cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def _training_args(cfg: TrainSettings, stage_dir: Path, lr: float) -> dict:
    """The ``TrainingArguments`` every stage shares (but ``max_steps`` and ``warmup_steps``, which follow
    from the rows); ``Stage.args`` and the stage's trainer add their own."""
    import torch

    use_cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(stage_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        weight_decay=cfg.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=engine.resolve_precision(cfg.precision) == "bf16",
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # data-parallel runs: every LoRA weight takes part in every step
        disable_tqdm=True,
        **_checkpointing_arg(cfg, use_cuda),
    )


def run_stage(stage: Stage, model, tokenizer, rows: list[dict], cfg: TrainSettings, stage_dir: Path,
              backend: str, progress: ProgressFn | None, extra_callbacks: list | None, parent: Path,
              metrics: StageMetrics) -> StageMetrics:
    """Train one stage on ``rows`` (resuming from its last trusted checkpoint) and save its adapter."""
    settings = cfg.stage_sections()[stage.name]
    args = _training_args(cfg, stage_dir, settings.lr) | stage.args(settings)
    global_batch = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * distributed.world_size()
    max_steps = _steps(len(rows), global_batch, settings.epochs, settings.max_steps)
    args |= {"max_steps": max_steps, "warmup_steps": min(cfg.warmup_steps, max_steps // 5)}
    log.info("%s: %d rows, %d steps, backend %s%s", stage.name, len(rows), max_steps, backend,
             f" ({metrics.reason})" if metrics.reason else "")
    metrics.examples = len(rows)
    history: list[dict] = []
    resume = checkpoints.last_complete_checkpoint(stage_dir)
    if resume is not None:
        metrics.resumed_from_step = int(resume.name.split("-")[1])
        log.info("%s: resuming from %s", stage.name, resume.name)
    trainer = stage.trainer(model, tokenizer, rows, args,
                            _callbacks(stage.name, max_steps, metrics, history, progress) + list(extra_callbacks or []),
                            backend, parent)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress and losses go through our callback instead
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except pickle.UnpicklingError as e:  # weights_only refused a file of the checkpoint: code, not tensors
        if resume is None:
            raise
        checkpoints.reject(resume, "it holds a pickle that is not plain tensors")
        raise EvolutionError(
            f"{resume} holds a pickled object that is not plain tensors, so it was not loaded ({e}). "
            f"It was moved to {stage_dir / 'rejected'}; run the age-up again to resume from the checkpoint "
            "before it (the daemon retries on its own)."
        ) from e
    metrics.wall_s = time.perf_counter() - t0
    metrics.steps = trainer.state.global_step
    metrics.summary = summarize(history)
    metrics.tokens = int(trainer.state.num_input_tokens_seen)
    done_steps = metrics.steps - (metrics.resumed_from_step or 0)
    metrics.tokens_per_s = metrics.tokens / metrics.wall_s * done_steps / max(metrics.steps, 1) if metrics.wall_s else 0.0
    if distributed.is_main():
        checkpoints.save_adapter(model, stage_dir, metrics, backend)
    distributed.barrier()  # the next stage, in every rank, starts from this adapter
    return metrics


def run_here(parent: Path, stages: Sequence[Stage], data: dict[str, Records], cfg: TrainSettings, workdir: Path,
             progress: ProgressFn | None = None, extra_callbacks: list | None = None) -> TrainResult:
    """Train ``stages`` in order on ``parent`` (an HF checkpoint dir) into ``workdir`` in this process (the only one,
    or one rank of a data-parallel run); resumable (``evolution.train.run_stages``)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine.keep_freed_memory()
    backend = engine.select_backend(cfg.backend, cfg.processes)
    log.info("training backend %s, precision %s", backend, engine.resolve_precision(cfg.precision))
    sections = cfg.stage_sections()
    max_seq_length = max(s.seq_len(sections[s.name]) for s in stages)
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, StageMetrics] = {}
    prev_adapter: Path | None = None
    for stage in stages:
        stage_dir = workdir / stage.name
        done = checkpoints.finished(stage_dir)
        if done is not None:
            log.info("%s: already finished (%d steps), not redone", stage.name, done.steps)
            results[stage.name], prev_adapter = done, stage_dir / "adapter"
            continue
        records = data.get(stage.name, [])
        method, reason = stage.plan(records, sections[stage.name])
        metrics = StageMetrics(stage=stage.name, method=method, reason=reason)
        if method == "skip":
            log.info("%s: skipped: %s", stage.name, reason)
            results[stage.name] = dataclasses.replace(metrics, skipped=True)
            continue
        model, tokenizer = engine.load_model(parent, cfg, backend, stage.cpu_attention, max_seq_length)
        rows = stage.rows(tokenizer, records, sections[stage.name])
        if not rows:
            log.info("%s: no data, skipped", stage.name)
            results[stage.name] = dataclasses.replace(metrics, skipped=True, reason=reason or "no data")
            continue
        if prev_adapter is not None:
            engine.load_adapter_weights(model, prev_adapter)
        stage_dir.mkdir(parents=True, exist_ok=True)
        with checkpoints.weights_only_loads():
            results[stage.name] = run_stage(stage, model, tokenizer, rows, cfg, stage_dir, backend, progress,
                                            extra_callbacks, parent, metrics)
        prev_adapter = stage_dir / "adapter"
        del model
    if prev_adapter is None:
        raise EvolutionError("nothing to train on: the selected curriculum has no data for any of the stages "
                             f"{', '.join(s.name for s in stages)}")
    return TrainResult(backend=backend, adapter_dir=prev_adapter, stages=results)

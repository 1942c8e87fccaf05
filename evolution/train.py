"""Training: continual pretraining, then SFT, into one LoRA adapter on the parent generation.

One entry point, ``train``. The engine is Unsloth's ``FastLanguageModel`` where a CUDA
device and the ``unsloth`` package are present, and stock transformers + PEFT otherwise;
both run through TRL's ``SFTTrainer`` on data we tokenize ourselves (``evolution.tokens``).

Each stage checkpoints every ``save_steps`` into ``<workdir>/<stage>/checkpoint-N`` and
keeps the last ``save_total_limit``. A checkpoint counts only once the trainer has finished
writing it (we drop a ``COMPLETE`` marker from ``on_save``), so after a kill -9 the next run
resumes from the last complete one. The marker holds the SHA-256 of every file of the
checkpoint: one changed on disk since (a flipped bit, a tampered optimizer state) is moved
aside to ``<stage>/rejected/`` and the run resumes from the checkpoint before it, or from the
start. A finished stage leaves ``<stage>/adapter`` plus ``<stage>/metrics.json`` (with the
adapter's hashes) and is never run again unless its adapter no longer matches them.

Nothing is unpickled from disk: weights are safetensors, and the trainer's optimizer,
scheduler and RNG states go through ``torch.load(weights_only=True)``, forced for every caller
in the training process by ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution.config import TrainConfig
from evolution.errors import EvolutionError
from evolution.fsutil import atomic_write_json, fsync_dir, sha256_tree, tree_mismatches

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, "float | None"], None]
"""progress(stage, step, total_steps, last_loss)"""

COMPLETE = "COMPLETE"
STAGES = ("cpt", "sft")


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
    """The trained adapter and what each stage did."""

    backend: str
    adapter_dir: Path
    cpt: StageMetrics
    sft: StageMetrics

    def to_dict(self) -> dict:
        d = {"backend": self.backend, "adapter_dir": str(self.adapter_dir)}
        for s in (self.cpt, self.sft):
            d[s.stage] = asdict(s) | {"loss_first": s.loss_first, "loss_last": s.loss_last}
        return d


def select_backend(requested: str) -> str:
    import torch

    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth":
        if not (torch.cuda.is_available() and has_unsloth):
            raise EvolutionError(
                "train.backend = 'unsloth' needs a CUDA device and `pip install 'evolution[gpu]'`; "
                "use backend 'auto' or 'hf' on this machine"
            )
        return "unsloth"
    if requested == "auto" and torch.cuda.is_available() and has_unsloth:
        return "unsloth"
    if not torch.cuda.is_available():
        from importlib.metadata import version

        from packaging.version import Version

        if Version(version("trl")) < Version("1.16"):
            raise EvolutionError(
                f"trl {version('trl')} cannot train on a CPU-only host (its SFTTrainer's fused LM head needs "
                "Triton); install trl 1.16: pip install 'trl>=1.16,<1.17'"
            )
    return "hf"


def resolve_precision(requested: str) -> str:
    """'bf16' or 'fp32': bf16 autocast only where the hardware runs it natively (2x matmul on AMX CPUs)."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _load_model(parent: Path, cfg: TrainConfig, backend: str, stage: str):
    """The parent with a fresh LoRA adapter on it, and its tokenizer."""
    import torch

    if backend == "unsloth":
        # unsloth must be imported before trl/peft patch points are used
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(parent),
            max_seq_length=max(cfg.cpt_block_size, cfg.sft_max_len),
            dtype=None,
            load_in_4bit=False,
            local_files_only=True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=cfg.seed,
        )
        return model, tokenizer

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(parent, local_files_only=True)
    # The frozen base in bf16 when training runs in bf16: autocast would cast every fp32 weight to
    # bf16 at each use anyway (frozen weights are not in its cast cache), so this gives the same
    # matmuls at half the memory traffic. The adapters stay fp32 (PEFT's autocast_adapter_dtype).
    dtype = torch.bfloat16 if resolve_precision(cfg.precision) == "bf16" else torch.float32
    # Attention on a CPU: SDPA's fused kernel wins on CPT's one-row lanes (plain causal mask,
    # 470 vs 390 tokens/s here), eager on SFT's lanes of several rows, whose block mask the fused
    # kernel's backward handles slowly (430 vs 355 tokens/s; bench/train_bench.py).
    attn = "eager" if stage == "sft" and not torch.cuda.is_available() else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=dtype, local_files_only=True, attn_implementation=attn)
    # No KV cache while training: with one, transformers skips the per-row attention mask that
    # LaneCollator's lanes (several rows packed into one) rely on.
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer


def _load_adapter_weights(model, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise EvolutionError(f"adapter {adapter_dir} does not fit the parent model: {result.unexpected_keys[:3]} …")


def _reject(path: Path, why: str) -> None:
    """Move a checkpoint or adapter that failed its check to ``<stage>/rejected/`` (kept for a post-mortem)."""
    dest = path.parent / "rejected" / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dest.parent.mkdir(exist_ok=True)
    log.warning("rejecting %s: %s; moved to %s", path, why, dest)
    path.rename(dest)


def checkpoint_problems(ckpt: Path) -> list[str]:
    """Why the checkpoint ``ckpt`` (marked complete) cannot be trusted; empty if it can."""
    try:
        marker = json.loads((ckpt / COMPLETE).read_text())
    except (ValueError, UnicodeDecodeError):
        return [f"{COMPLETE} marker is not the JSON this version writes"]
    if not isinstance(marker, dict) or not isinstance(marker.get("sha256"), dict):
        return [f"{COMPLETE} marker has no file hashes"]
    return tree_mismatches(ckpt, marker["sha256"], skip=frozenset({COMPLETE}))


def last_complete_checkpoint(stage_dir: Path) -> Path | None:
    """The highest checkpoint the trainer finished writing whose files still hash as written.

    Incomplete checkpoints (a kill while saving) are removed; complete ones whose files changed
    since are moved aside to ``<stage>/rejected/``, and the one before them is used.
    """
    complete = []
    for ckpt in sorted(stage_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        if (ckpt / COMPLETE).is_file():
            complete.append(ckpt)
        else:
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    for ckpt in reversed(complete):
        problems = checkpoint_problems(ckpt)
        if not problems:
            return ckpt
        _reject(ckpt, "its files changed after it was saved (" + "; ".join(problems[:5]) + ")")
    return None


def _callbacks(stage: str, total: int, metrics: StageMetrics, progress: ProgressFn | None):
    from transformers import TrainerCallback

    class _Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                metrics.losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kw):
            if progress:
                progress(stage, state.global_step, total, metrics.loss_last)

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                from evolution import faults

                faults.point("checkpoint_save")  # test hook (evolution/faults.py): written, not yet marked complete
                marker = {"step": state.global_step, "sha256": sha256_tree(ckpt, skip=frozenset({COMPLETE}))}
                atomic_write_json(ckpt / COMPLETE, marker)

    return [_Track()]


class LaneCollator:
    """Pack a batch of rows into a few equal-width lanes, with no attention across rows.

    Rows are placed longest first into the first lane with room (first-fit decreasing); the lane
    width is the longest row rounded up to ``multiple`` (at least ``min_width``). Position ids
    restart at every row, so transformers' attention masks keep each row to itself (no attention
    mask is passed, which is what makes it look for packed rows); the rest of a lane is padding,
    a segment of its own with no labels. Against padding every row to the longest of the batch
    this trains on a third fewer tokens for the same data, and the few lane widths it produces
    let oneDNN reuse its compiled kernels instead of generating new ones for every batch shape.
    Labels: the row's tokens where ``assistant_masks`` is 1 (all of them when a row has none),
    never a row's first token (it has nothing before it in its own row).
    """

    def __init__(self, pad_id: int, multiple: int = 32, min_width: int = 128):
        self.pad_id, self.multiple, self.min_width = pad_id, multiple, min_width

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-max(longest, self.min_width) // self.multiple) * self.multiple
        lanes: list[list[dict]] = []
        room: list[int] = []
        for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
            n = len(r["input_ids"])
            i = next((i for i, free in enumerate(room) if free >= n), None)
            if i is None:
                lanes.append([])
                room.append(width)
                i = len(lanes) - 1
            lanes[i].append(r)
            room[i] -= n
        ids = torch.full((len(lanes), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(lanes), width), -100, dtype=torch.long)
        pos = torch.zeros((len(lanes), width), dtype=torch.long)
        for i, lane in enumerate(lanes):
            at = 0
            for r in lane:
                x = torch.tensor(r["input_ids"], dtype=torch.long)
                n = len(x)
                mask = r.get("assistant_masks")
                lab = x.clone() if mask is None else x.masked_fill(~torch.tensor(mask, dtype=torch.bool), -100)
                lab[0] = -100
                ids[i, at:at + n], labels[i, at:at + n] = x, lab
                pos[i, at:at + n] = torch.arange(n)
                at += n
            pos[i, at:] = torch.arange(width - at)
        return {"input_ids": ids, "position_ids": pos, "labels": labels,
                "real_tokens": sum(len(r["input_ids"]) for r in rows)}


def lane_loss(model, inputs: dict, autocast, num_items_in_batch=None):
    """Mean next-token loss over the labelled positions, with the LM head applied to those only.

    SFT trains on assistant tokens, a quarter of the tokens here: projecting every position onto
    the 49k-token vocabulary (what a stock causal-LM loss does) spends most of the LM head's
    work, and a good part of the step, on logits that are thrown away.
    """
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    target = inputs["labels"][:, 1:]
    keep = target != -100
    with autocast():
        hidden = base.get_decoder()(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                    use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))


def _steps(n_rows: int, cfg: TrainConfig, epochs: float, cap: int | None) -> int:
    per_epoch = math.ceil(n_rows / (cfg.batch_size * cfg.grad_accum))
    steps = max(1, math.ceil(per_epoch * epochs))
    return min(steps, cap) if cap else steps


def _checkpointing_arg(cfg: TrainConfig, use_cuda: bool) -> dict:
    """Activation checkpointing, under the name this transformers knows (renamed in 5.x; TRL turns it on)."""
    import dataclasses

    from trl import SFTConfig

    on = use_cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def _lane_trainer_class():
    from trl import SFTTrainer

    class LaneTrainer(SFTTrainer):
        """TRL's SFTTrainer fed by ``LaneCollator`` and scored by ``lane_loss``; counts real tokens."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.state.num_input_tokens_seen += int(inputs.pop("real_tokens"))
            loss = lane_loss(model, inputs, self.accelerator.autocast, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return LaneTrainer


def _run_stage(stage: str, model, tokenizer, rows: list[dict], cfg: TrainConfig, stage_dir: Path,
               lr: float, max_steps: int, backend: str, progress: ProgressFn | None,
               extra_callbacks: list | None) -> StageMetrics:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    metrics = StageMetrics(stage=stage, examples=len(rows))
    resume = last_complete_checkpoint(stage_dir)
    if resume is not None:
        metrics.resumed_from_step = int(resume.name.split("-")[1])
        log.info("%s: resuming from %s", stage, resume.name)
    use_cuda = torch.cuda.is_available()
    lanes = backend == "hf"  # Unsloth brings its own padding-free batches and fused loss
    args = SFTConfig(
        output_dir=str(stage_dir),
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(cfg.warmup_steps, max_steps // 5),
        weight_decay=cfg.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=resolve_precision(cfg.precision) == "bf16",
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        max_length=None,  # rows are already packed / truncated by evolution.tokens
        packing=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="no" if lanes else "non_padding",
        # Our rows arrive tokenized with their masks; the lane collator makes labels of them.
        dataset_kwargs={"skip_prepare_dataset": True} if lanes else None,
        remove_unused_columns=not lanes,
        **_checkpointing_arg(cfg, use_cuda),
    )
    trainer = (_lane_trainer_class() if lanes else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=_callbacks(stage, max_steps, metrics, progress) + list(extra_callbacks or []),
        **({"data_collator": LaneCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)} if lanes else {}),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress and losses go through our callback instead
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except pickle.UnpicklingError as e:  # weights_only refused a file of the checkpoint: code, not tensors
        if resume is None:
            raise
        _reject(resume, "it holds a pickle that is not plain tensors")
        raise EvolutionError(
            f"{resume} holds a pickled object that is not plain tensors, so it was not loaded ({e}). "
            f"It was moved to {stage_dir / 'rejected'}; run the age-up again to resume from the checkpoint "
            "before it (the daemon retries on its own)."
        ) from e
    metrics.wall_s = time.perf_counter() - t0
    metrics.steps = trainer.state.global_step
    metrics.tokens = int(trainer.state.num_input_tokens_seen)
    done_steps = metrics.steps - (metrics.resumed_from_step or 0)
    metrics.tokens_per_s = metrics.tokens / metrics.wall_s * done_steps / max(metrics.steps, 1) if metrics.wall_s else 0.0

    # Write the adapter beside, then rename: a half-saved adapter never looks finished.
    tmp = stage_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    fsync_dir(tmp)
    shutil.rmtree(stage_dir / "adapter", ignore_errors=True)  # left by a crash before metrics.json
    tmp.rename(stage_dir / "adapter")
    atomic_write_json(stage_dir / "metrics.json",
                      asdict(metrics) | {"backend": backend, "adapter_sha256": sha256_tree(stage_dir / "adapter")})
    return metrics


def _finished(stage_dir: Path) -> StageMetrics | None:
    """The metrics of a finished stage whose adapter is as it was written; None to (re)run it."""
    if not ((stage_dir / "metrics.json").is_file() and (stage_dir / "adapter").is_dir()):
        return None
    d = json.loads((stage_dir / "metrics.json").read_text())
    d.pop("backend", None)
    hashes = d.pop("adapter_sha256", None)
    problems = tree_mismatches(stage_dir / "adapter", hashes) if isinstance(hashes, dict) else []
    if problems:  # run the stage again, from its last good checkpoint
        _reject(stage_dir / "adapter", "it changed after training (" + "; ".join(problems[:5]) + ")")
        (stage_dir / "metrics.json").unlink()
        return None
    m = StageMetrics(**d)
    m.skipped = True
    return m


def _keep_freed_memory() -> None:
    """Stop glibc handing each freed activation buffer back to the kernel.

    By default glibc serves large blocks with mmap and unmaps them on free, so every training step
    pays page faults and zeroing for the same few hundred MB again (munmap was 13 % of an SFT
    profile). Raising the mmap and trim thresholds keeps those blocks in the heap for reuse.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def _weights_only_loads():
    """Every ``torch.load`` inside refuses pickled code, whatever its caller passes or the environment says.

    Resuming loads the trainer's optimizer, scheduler and RNG states with ``torch.load``; a
    checkpoint is a file on disk, so it gets no more trust than one.
    """
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train(parent: Path, cpt_texts: list[str], sft_conversations: list[list[dict]], cfg: TrainConfig,
          workdir: Path, progress: ProgressFn | None = None, extra_callbacks: list | None = None) -> TrainResult:
    """Train CPT then SFT on ``parent`` (an HF checkpoint dir) into ``workdir``; resumable.

    Returns the final adapter (``workdir/sft/adapter``, or the CPT adapter when there is no
    SFT data) and per-stage metrics. Finished stages are not re-run.
    """
    import torch

    from evolution.tokens import encode_sft, pack_cpt

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _keep_freed_memory()
    backend = select_backend(cfg.backend)
    log.info("training backend %s, precision %s", backend, resolve_precision(cfg.precision))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, StageMetrics] = {}
    prev_adapter: Path | None = None
    for stage in STAGES:
        stage_dir = workdir / stage
        done = _finished(stage_dir)
        if done is not None:
            log.info("%s: already finished (%d steps), not redone", stage, done.steps)
            results[stage], prev_adapter = done, stage_dir / "adapter"
            continue
        model, tokenizer = _load_model(parent, cfg, backend, stage)
        if stage == "cpt":
            rows = [{"input_ids": b} for b in pack_cpt(tokenizer, cpt_texts, cfg.cpt_block_size)]
            lr, epochs, cap = cfg.cpt_lr, cfg.cpt_epochs, cfg.cpt_max_steps
        else:
            rows = [r for conv in sft_conversations if (r := encode_sft(tokenizer, conv, cfg.sft_max_len))]
            lr, epochs, cap = cfg.sft_lr, cfg.sft_epochs, cfg.sft_max_steps
        if not rows:
            log.info("%s: no data, skipped", stage)
            results[stage] = StageMetrics(stage=stage, skipped=True)
            continue
        if prev_adapter is not None:
            _load_adapter_weights(model, prev_adapter)
        stage_dir.mkdir(parents=True, exist_ok=True)
        steps = _steps(len(rows), cfg, epochs, cap)
        log.info("%s: %d rows, %d steps, backend %s", stage, len(rows), steps, backend)
        with _weights_only_loads():
            results[stage] = _run_stage(stage, model, tokenizer, rows, cfg, stage_dir, lr, steps, backend,
                                        progress, extra_callbacks)
        prev_adapter = stage_dir / "adapter"
        del model
    if prev_adapter is None:
        raise EvolutionError("nothing to train on: the selected curriculum has neither CPT text nor SFT examples")
    return TrainResult(backend=backend, adapter_dir=prev_adapter, cpt=results["cpt"], sft=results["sft"])

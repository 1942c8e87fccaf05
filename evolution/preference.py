"""Preference training on ratings: the stage after SFT, in the same LoRA adapter.

Users rate served replies good or bad (``Rating``) and sometimes correct one (``Correction``:
the correction is the chosen reply, the reply that was served the rejected one). With enough
corrections the stage runs TRL's ``DPOTrainer`` on the pairs; with enough ratings carrying both
labels it runs ``KTOTrainer`` on everything as unpaired examples (a correction counts as one good
and one bad reply); otherwise it is skipped. ``choose_method`` says which, and why, and the
reason is recorded in the stage's metrics either way.

The reference policy is the parent: the model with the adapter disabled, loaded here as a frozen
model of its own (see ``_reference``). Prompts are rendered by TRL with the tokenizer's own chat
template (the one the GGUF carries and llama.cpp renders at serve time); a completion is the
rendered assistant turn, the reply and its end-of-turn tokens.

The guarantees of CPT and SFT hold here too, through the same helpers of ``evolution.train``:
checkpoints every ``save_steps`` with the SHA-256 of each file in a ``COMPLETE`` marker, resume
from the last complete one after a kill -9, a checkpoint changed on disk moved aside, progress
through the same callback, nothing unpickled. A finished stage leaves ``<stage>/adapter`` and
``<stage>/metrics.json`` (with TRL's reward metrics of every step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution.config import TrainConfig
from evolution.errors import EvolutionError
from evolution.fsutil import atomic_write_json, fsync_dir, sha256_tree, tree_mismatches
from evolution.train import (
    ProgressFn,
    _callbacks,
    _checkpointing_arg,
    _load_adapter_weights,
    _load_model,
    _reject,
    _weights_only_loads,
    last_complete_checkpoint,
    resolve_precision,
)

log = logging.getLogger(__name__)

STAGE = "preference"
METHODS = ("auto", "kto", "dpo", "off")


@dataclass
class PreferenceConfig:
    """The preference stage (config section ``[train.preference]``)."""

    method: str = "auto"
    """'auto' (DPO on corrections when there are enough, else KTO on ratings when there are enough with both
    labels, else skip), 'kto', 'dpo' or 'off'."""
    min_pairs: int = 8
    """auto: DPO needs at least this many corrections (and at least half as many as the plain ratings, or the
    ratings would be thrown away). Fewer pairs than a batch or two mostly teach the model those few prompts."""
    min_labelled: int = 16
    """auto: KTO needs at least this many labelled replies (ratings plus both sides of each correction), with
    both labels present: KTO's reference point is estimated across the batch, and one label alone gives it
    nothing to contrast."""
    lr: float = 5e-5
    """Learning rate of the LoRA weights. TRL's 1e-6 default is for full fine-tuning; LoRA moves through a
    low-rank update scaled by alpha/r and needs one to two orders of magnitude more."""
    beta: float = 0.1
    """Strength of the pull towards the parent (TRL's and both papers' default): rewards are beta times the
    log-ratio against the parent, so a larger beta allows less drift."""
    epochs: float = 1.0
    max_steps: int | None = None
    """Caps the steps (None: epochs decide)."""
    max_len: int = 384
    """Longest prompt + reply in tokens (the SFT default: the same conversations fit). Older turns of a longer
    prompt are dropped first; what still does not fit loses the end of its reply (TRL's ``keep_start``)."""
    batch_size: int = 4
    """Examples per forward (KTO needs at least 2: its KL estimate pairs each prompt with a neighbour's reply;
    a DPO example is two sequences)."""
    grad_accum: int = 2
    desirable_weight: float | None = None
    """KTO: weight of the good replies' loss. None balances the classes as TRL's docs advise (KTO paper, eq. 8:
    desirable_weight * n_good / (undesirable_weight * n_bad) within [1, 4/3]): it is set to n_bad / n_good."""
    undesirable_weight: float | None = None
    """KTO: weight of the bad replies' loss. None: 1.0."""
    precompute_ref_log_probs: bool = False
    """Score every example under the parent once before training, then free the parent copy, instead of a
    no-grad forward of the parent at every step. Off: on the tiny test model it was no faster at one epoch or
    two (the setup, hashing the parent and mapping the dataset, ate what it saved), and it is redone on every
    resume. On: the parent's memory is not held while training."""


def problems(cfg: PreferenceConfig) -> list[str]:
    """Every bad field of ``cfg`` (for ``config.validate`` to report with the rest)."""
    p = []
    if cfg.method not in METHODS:
        p.append(f"train.preference.method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    for name in ("min_pairs", "min_labelled", "max_len", "grad_accum"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            p.append(f"train.preference.{name} must be a positive integer, got {v!r}")
    if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool) or cfg.batch_size < 2:
        p.append(f"train.preference.batch_size must be an integer of at least 2 (KTO's KL estimate pairs "
                 f"examples within a batch), got {cfg.batch_size!r}")
    if cfg.max_steps is not None and (not isinstance(cfg.max_steps, int) or cfg.max_steps <= 0):
        p.append(f"train.preference.max_steps must be a positive integer or unset, got {cfg.max_steps!r}")
    for name in ("lr", "beta", "epochs"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            p.append(f"train.preference.{name} must be a positive number, got {v!r}")
    for name in ("desirable_weight", "undesirable_weight"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            p.append(f"train.preference.{name} must be a positive number or unset, got {v!r}")
    return p


@dataclass
class Rating:
    """A served reply and the user's verdict on it."""

    prompt: list[dict]
    """The conversation the reply answered (role/content messages, ending with the user's turn)."""
    reply: str
    good: bool


@dataclass
class Correction:
    """A served reply the user corrected."""

    prompt: list[dict]
    chosen: str
    """The user's correction."""
    rejected: str
    """The reply that was served."""


@dataclass
class PreferenceMetrics:
    """What the preference stage did, with TRL's metrics of every logged step."""

    stage: str = STAGE
    method: str = "skip"
    """'kto', 'dpo' or 'skip'."""
    reason: str = ""
    ratings: int = 0
    corrections: int = 0
    examples: int = 0
    """Rows trained on: KTO replies or DPO pairs."""
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    """One dict per logged step: ``step``, ``loss`` and what TRL logs with it (``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``logps/*``, ``logits/*``, ``kl`` for KTO,
    ``rewards/accuracies`` for DPO, ``entropy``, ``num_tokens``, ``grad_norm``, ``learning_rate``)."""
    wall_s: float = 0.0
    resumed_from_step: int | None = None
    skipped: bool = False

    @property
    def loss_first(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def loss_last(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def summary(self, last: int = 5) -> dict[str, float]:
        """TRL's metrics averaged over the last ``last`` logged steps (the rewards of a single step are noisy)."""
        tail = self.history[-last:]
        keys = {k for h in tail for k in h} - {"step"}
        return {k: sum(h[k] for h in tail if k in h) / sum(1 for h in tail if k in h) for k in sorted(keys)}


def choose_method(cfg: PreferenceConfig, ratings: Sequence[Rating],
                  corrections: Sequence[Correction]) -> tuple[str, str]:
    """('kto' | 'dpo' | 'skip', why) for this data under ``cfg.method``."""
    n_pairs, n_ratings = len(corrections), len(ratings)
    n_good = sum(r.good for r in ratings) + n_pairs
    n_bad = n_ratings - sum(r.good for r in ratings) + n_pairs
    counts = f"{n_pairs} corrections, {n_ratings} ratings ({n_good} good and {n_bad} bad replies in all)"
    if cfg.method == "off":
        return "skip", "train.preference.method is 'off'"
    if cfg.method == "dpo":
        if n_pairs == 0:
            return "skip", f"method 'dpo' needs corrections (chosen/rejected pairs); {counts}"
        return "dpo", f"method 'dpo': {counts}"
    if cfg.method == "kto":
        if n_good + n_bad < 2:
            return "skip", f"method 'kto' needs at least 2 rated replies; {counts}"
        return "kto", f"method 'kto': {counts}"
    if n_pairs >= cfg.min_pairs and 2 * n_pairs >= n_ratings:
        unused = f" (the {n_ratings} plain ratings are not used)" if n_ratings else ""
        return "dpo", f"auto: {counts}; corrections >= min_pairs {cfg.min_pairs} and at least half the ratings{unused}"
    if n_good + n_bad >= cfg.min_labelled and n_good and n_bad:
        return "kto", f"auto: {counts}; >= min_labelled {cfg.min_labelled} with both labels"
    why = (f"fewer than min_pairs {cfg.min_pairs} corrections" if n_pairs < cfg.min_pairs
           else "corrections are fewer than half the ratings")
    why += (f", and fewer than min_labelled {cfg.min_labelled} rated replies" if n_good + n_bad < cfg.min_labelled
            else ", and only one label among the ratings")
    return "skip", f"auto: {counts}; {why}"


def kto_weights(cfg: PreferenceConfig, n_good: int, n_bad: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): the configured ones, or balanced by the class ratio."""
    und = 1.0 if cfg.undesirable_weight is None else float(cfg.undesirable_weight)
    if cfg.desirable_weight is not None:
        return float(cfg.desirable_weight), und
    return (und * n_bad / n_good if n_good and n_bad else 1.0), und


def _messages(prompt: list[dict]) -> list[dict]:
    # Arrow needs one schema for every row: keep the two keys the chat template reads.
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _fit(tokenizer, prompt: list[dict], replies: list[str], max_len: int) -> list[dict]:
    """``prompt`` without its oldest turns, until it and its longest reply fit in ``max_len`` tokens."""
    longest = max(replies, key=len)
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns = prompt[len(system):]
    while len(turns) > 1:
        ids = tokenizer.apply_chat_template(system + turns + [{"role": "assistant", "content": longest}],
                                            tokenize=True, return_dict=False)
        if len(ids) <= max_len:
            break
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
    return system + turns


def _kto_rows(tokenizer, ratings, corrections, cfg: PreferenceConfig, seed: int) -> list[dict]:
    rows = []
    for r in ratings:
        p = _fit(tokenizer, _messages(r.prompt), [r.reply], cfg.max_len)
        rows.append({"prompt": p, "completion": [{"role": "assistant", "content": r.reply}], "label": bool(r.good)})
    for c in corrections:
        p = _fit(tokenizer, _messages(c.prompt), [c.chosen, c.rejected], cfg.max_len)
        rows.append({"prompt": p, "completion": [{"role": "assistant", "content": c.chosen}], "label": True})
        rows.append({"prompt": p, "completion": [{"role": "assistant", "content": c.rejected}], "label": False})
    # KTOTrainer reads its data in order (its KL term pairs each prompt with the previous row's reply within a
    # batch), so the order must be mixed here: by prompt, and good with bad.
    random.Random(seed).shuffle(rows)
    return rows


def _dpo_rows(tokenizer, corrections, cfg: PreferenceConfig) -> list[dict]:
    rows = []
    for c in corrections:
        p = _fit(tokenizer, _messages(c.prompt), [c.chosen, c.rejected], cfg.max_len)
        rows.append({"prompt": p, "chosen": [{"role": "assistant", "content": c.chosen}],
                     "rejected": [{"role": "assistant", "content": c.rejected}]})
    return rows


def _reference(parent: Path, model):
    """The parent, frozen, as its own model: the reference policy.

    Not TRL's default. With a PeftModel and ``ref_model=None``, TRL 1.16 (peft >= 0.20) does *not* score the
    reference with the adapter disabled: ``KTOTrainer.__init__`` / ``DPOTrainer.__init__`` add a second adapter
    "ref", a copy of the "default" one as it is when the trainer is built, and ``compute_ref_log_probs`` /
    ``_compute_loss`` run under ``use_adapter(model, "ref")`` (adapters are disabled only when no "ref" adapter
    exists, kto_trainer.py ``elif is_peft_model(model) and ref_model is None``). Here the adapter already holds
    CPT + SFT, so that reference would be the SFT model, not the parent. Passing the parent explicitly also
    keeps the saved checkpoints and adapter to the one "default" adapter.
    """
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    ref = AutoModelForCausalLM.from_pretrained(parent, dtype=base.dtype, local_files_only=True,
                                               attn_implementation=base.config._attn_implementation)
    ref.config.use_cache = False
    ref.requires_grad_(False)
    return ref.eval()


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars from TRL's dataset preparation: progress goes through the progress callback."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def _finished(stage_dir: Path) -> PreferenceMetrics | None:
    """The metrics of a finished stage whose adapter is as written; None to (re)run it (as ``train._finished``)."""
    if not ((stage_dir / "metrics.json").is_file() and (stage_dir / "adapter").is_dir()):
        return None
    d = json.loads((stage_dir / "metrics.json").read_text())
    hashes = d.pop("adapter_sha256", None)
    bad = tree_mismatches(stage_dir / "adapter", hashes) if isinstance(hashes, dict) else ["no adapter hashes"]
    if bad:
        _reject(stage_dir / "adapter", "it changed after training (" + "; ".join(bad[:5]) + ")")
        (stage_dir / "metrics.json").unlink()
        return None
    m = PreferenceMetrics(**d)
    m.skipped = True
    return m


def _history_callback(metrics: PreferenceMetrics):
    from transformers import TrainerCallback

    class _History(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                metrics.history.append({"step": state.global_step} | {
                    k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"})

    return _History()


def train_preference(parent: Path, adapter: Path | None, ratings: Sequence[Rating],
                     corrections: Sequence[Correction], cfg: PreferenceConfig, train_cfg: TrainConfig,
                     stage_dir: Path, progress: ProgressFn | None = None,
                     extra_callbacks: list | None = None) -> PreferenceMetrics:
    """Run the preference stage on ``parent`` (an HF checkpoint dir) starting from ``adapter`` (the SFT
    adapter dir, or None for a fresh LoRA); resumable, and not redone once finished.

    Uses ``train_cfg`` for the LoRA shape (it must match the adapter's), precision, seed, threads, checkpoint
    cadence and activation checkpointing, ``cfg`` for the rest. Returns the metrics; unless ``method == 'skip'``
    the trained adapter is ``stage_dir / 'adapter'``. In the age-up, after SFT::

        m = train_preference(parent, workdir / "sft" / "adapter", ratings, corrections, cfg.preference, cfg,
                             workdir / "preference", progress, extra_callbacks)
        adapter = workdir / "sft" / "adapter" if m.method == "skip" else workdir / "preference" / "adapter"
    """
    import torch
    from datasets import Dataset

    method, reason = choose_method(cfg, ratings, corrections)
    if method == "skip":
        log.info("preference: skipped: %s", reason)
        return PreferenceMetrics(reason=reason, ratings=len(ratings), corrections=len(corrections), skipped=True)
    done = _finished(stage_dir)
    if done is not None:
        log.info("preference: already finished (%s, %d steps), not redone", done.method, done.steps)
        return done
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    model, tokenizer = _load_model(parent, train_cfg, "hf", STAGE)
    if adapter is not None:
        _load_adapter_weights(model, adapter)
    metrics = PreferenceMetrics(method=method, reason=reason, ratings=len(ratings), corrections=len(corrections))
    if method == "kto":
        rows = _kto_rows(tokenizer, ratings, corrections, cfg, train_cfg.seed)
        n_good = sum(r["label"] for r in rows)
        metrics.desirable_weight, metrics.undesirable_weight = kto_weights(cfg, n_good, len(rows) - n_good)
    else:
        rows = _dpo_rows(tokenizer, corrections, cfg)
    metrics.examples = len(rows)
    steps = max(1, math.ceil(math.ceil(len(rows) / (cfg.batch_size * cfg.grad_accum)) * cfg.epochs))
    steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    log.info("preference: %s on %d rows, %d steps (%s)", method, len(rows), steps, reason)

    # Checkpoints of each method apart: a rerun whose data now picks the other method must not resume this one's.
    run_dir = stage_dir / method
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(run_dir)
    if resume is not None:
        metrics.resumed_from_step = int(resume.name.split("-")[1])
        log.info("preference: resuming from %s", resume.name)
    use_cuda = torch.cuda.is_available()
    common = dict(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(train_cfg.warmup_steps, steps // 5),
        logging_steps=1,
        save_strategy="steps",
        save_steps=train_cfg.save_steps,
        save_total_limit=train_cfg.save_total_limit,
        report_to="none",
        seed=train_cfg.seed,
        data_seed=train_cfg.seed,
        # TRL's configs default bf16 to True and activation checkpointing to True: both set here on purpose.
        bf16=resolve_precision(train_cfg.precision) == "bf16",
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=cfg.max_len,
        beta=cfg.beta,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=2 * cfg.batch_size,  # no gradients kept: a larger batch fits
        **_checkpointing_arg(train_cfg, use_cuda),
    )
    with _weights_only_loads(), _quiet_datasets():
        ref = _reference(parent, model)
        if method == "kto":
            from trl import KTOConfig, KTOTrainer

            args = KTOConfig(**common, desirable_weight=metrics.desirable_weight,
                             undesirable_weight=metrics.undesirable_weight)
            trainer_cls = KTOTrainer
        else:
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**common)
            trainer_cls = DPOTrainer
        trainer = trainer_cls(
            model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            callbacks=_callbacks(STAGE, steps, metrics, progress) + [_history_callback(metrics)]
            + list(extra_callbacks or []),
        )
        if cfg.precompute_ref_log_probs:
            trainer.ref_model = None  # its log-probs are in the dataset now; training never calls it
            del ref
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except pickle.UnpicklingError as e:  # weights_only refused a file of the checkpoint: code, not tensors
            if resume is None:
                raise
            _reject(resume, "it holds a pickle that is not plain tensors")
            raise EvolutionError(
                f"{resume} holds a pickled object that is not plain tensors, so it was not loaded ({e}). It was "
                f"moved to {run_dir / 'rejected'}; run the age-up again to resume from the checkpoint before it."
            ) from e
    metrics.wall_s = time.perf_counter() - t0
    metrics.steps = trainer.state.global_step

    tmp = stage_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    fsync_dir(tmp)
    shutil.rmtree(stage_dir / "adapter", ignore_errors=True)
    tmp.rename(stage_dir / "adapter")
    atomic_write_json(stage_dir / "metrics.json",
                      asdict(metrics) | {"adapter_sha256": sha256_tree(stage_dir / "adapter")})
    return metrics

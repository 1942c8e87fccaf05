"""Preference learning on rated replies: KTO on good/bad ratings, DPO on corrections, the parent as reference.

Users rate served replies good or bad and sometimes correct one (the correction is the chosen reply,
the reply that was served the rejected one). Records (``data/preference.jsonl``), one of:

- ``{"prompt": [messages], "reply": "...", "label": "good" | "bad"}``: a rated reply (unpaired);
- ``{"prompt": [messages], "chosen": "...", "rejected": "..."}``: a corrected reply (a pair).

``plan`` picks the method from the records and ``[train.preference] method`` (``PreferenceConfig``, its
settings) before any model is
loaded (``choose_method``, which says why): with enough corrections, TRL's ``DPOTrainer`` on the
pairs; with enough rated replies carrying both labels, ``KTOTrainer`` on all of them as unpaired
examples (a correction counts as one good and one bad reply); otherwise the stage is skipped, and
the reason recorded either way.

The reference policy is the parent, loaded as a frozen model of its own (``_reference``). Prompts
are rendered by TRL with the tokenizer's own chat template (the one the GGUF carries and llama.cpp
renders at serve time); a completion is the rendered assistant turn, the reply and its end-of-turn
tokens. Checkpoints, resume, progress and the adapter handed on are the runner's, as for CPT and SFT.

On the ``hf`` backend the trainers' log-probabilities (policy, reference, KTO's KL rows) come from
``evolution.train.logprobs``: the padded batch packed into lanes and the LM head run on the reply
tokens only, where TRL's CPU path runs the padding and projects every position
(``bench/train_bench.py`` measures it against stock TRL). With ``precompute_ref_log_probs`` the
parent's log-probabilities are computed once by TRL's own forward, before the trainer is patched.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from evolution.checks import positive_int, positive_num
from evolution.intake.inbox import Inbox
from evolution.train.stage import Records, Stage

log = logging.getLogger(__name__)

PREFERENCE_METHODS = ("auto", "kto", "dpo", "off")


@dataclass(slots=True)
class PreferenceConfig:
    """``[train.preference]``: preference learning on the ratings of served replies (KTO or DPO), with the
    parent as the reference policy (``evolution.train.preference``)."""

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
    """Caps the stage's optimizer steps (None: epochs decide)."""
    max_len: int = 384
    """Longest prompt + reply in tokens (the SFT default: the same conversations fit). Older turns of a longer
    prompt are dropped first; what still does not fit loses the end of its reply (TRL's ``keep_start``)."""
    batch_size: int = 4
    """Examples per forward, instead of ``[train] batch_size`` (KTO needs at least 2: its KL estimate pairs
    each prompt with a neighbour's reply; a DPO example is two sequences)."""
    grad_accum: int = 2
    """Instead of ``[train] grad_accum``."""
    desirable_weight: float | None = None
    """KTO: weight of the good replies' loss. None balances the classes as TRL's docs advise (KTO paper, eq. 8:
    desirable_weight * n_good / (undesirable_weight * n_bad) within [1, 4/3]): it is set to n_bad / n_good."""
    undesirable_weight: float | None = None
    """KTO: weight of the bad replies' loss. None: 1.0."""
    precompute_ref_log_probs: bool = False
    """Score every example under the parent once before training, then free the parent copy, instead of a
    no-grad forward of the parent at every step. Off: on the tiny test model it was no faster (the setup ate
    what it saved), and it is redone on every resume. On: the parent's memory is not held while training."""

    def problems(self, where: str) -> list[str]:
        p = []
        if self.method not in PREFERENCE_METHODS:
            p.append(f"{where}.method must be one of {', '.join(PREFERENCE_METHODS)}, got {self.method!r}")
        for name in ("min_pairs", "min_labelled", "max_len", "grad_accum"):
            p += positive_int(f"{where}.{name}", getattr(self, name))
        p += positive_int(f"{where}.max_steps", self.max_steps, allow_none=True)
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 2:
            p.append(f"{where}.batch_size must be an integer of at least 2 (KTO's KL estimate pairs examples "
                     f"within a batch), got {self.batch_size!r}")
        for name in ("lr", "beta", "epochs"):
            p += positive_num(f"{where}.{name}", getattr(self, name))
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) is not None:
                p += [e.replace("number", "number or unset") for e in positive_num(f"{where}.{name}",
                                                                                      getattr(self, name))]
        if not isinstance(self.precompute_ref_log_probs, bool):
            p.append(f"{where}.precompute_ref_log_probs must be true or false, got {self.precompute_ref_log_probs!r}")
        return p



def _counts(records: Records) -> tuple[int, int, int, int]:
    """(pairs, rated replies, good replies, bad replies), a pair counting as one good and one bad reply."""
    pairs = sum("chosen" in r for r in records)
    rated = [r for r in records if "label" in r]
    good = sum(r["label"] == "good" for r in rated)
    return pairs, len(rated), good + pairs, len(rated) - good + pairs


def choose_method(cfg: PreferenceConfig, records: Records) -> tuple[str, str]:
    """('kto' | 'dpo' | 'skip', why) for these records under ``cfg.method``."""
    n_pairs, n_ratings, n_good, n_bad = _counts(records)
    counts = f"{n_pairs} corrections, {n_ratings} ratings ({n_good} good and {n_bad} bad replies in all)"
    if cfg.method == "off":
        return "skip", "train.preference.method is 'off'"
    if not records:
        return "skip", "no rated replies since the parent"
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


def plan(records: Records, cfg: PreferenceConfig) -> tuple[str, str]:
    method, why = choose_method(cfg, records)
    if method == "kto":
        _, _, n_good, n_bad = _counts(records)
        good_w, bad_w = kto_weights(cfg, n_good, n_bad)
        why += f"; KTO weights: good {good_w:.3g}, bad {bad_w:.3g}"
    return method, why


def _messages(tokenizer, prompt: list[dict]) -> list[dict]:
    # Arrow needs one schema for every row: keep the two keys the chat template reads; a system turn folded
    # into the first user turn where the template has no system role (as llama.cpp serves it).
    from evolution.tokens import for_template

    return for_template(tokenizer, [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt])


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


def _turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def rows(tokenizer, records: Records, cfg: PreferenceConfig) -> list[dict]:
    """KTO rows (``prompt``, ``completion``, ``label``) or DPO rows (``prompt``, ``chosen``, ``rejected``),
    as ``choose_method`` decides; none when it skips."""
    method, _ = choose_method(cfg, records)
    out: list[dict] = []
    for r in records:
        if "chosen" in r:
            p = _fit(tokenizer, _messages(tokenizer, r["prompt"]), [r["chosen"], r["rejected"]], cfg.max_len)
            if method == "dpo":
                out.append({"prompt": p, "chosen": _turn(r["chosen"]), "rejected": _turn(r["rejected"])})
            elif method == "kto":
                out += [{"prompt": p, "completion": _turn(r["chosen"]), "label": True},
                        {"prompt": p, "completion": _turn(r["rejected"]), "label": False}]
        elif method == "kto":
            p = _fit(tokenizer, _messages(tokenizer, r["prompt"]), [r["reply"]], cfg.max_len)
            out.append({"prompt": p, "completion": _turn(r["reply"]), "label": r["label"] == "good"})
    if method == "kto":
        # KTOTrainer's KL term pairs each prompt with the previous row's reply within a batch as it prepares the
        # data, in order: the order must be mixed here, by prompt and good with bad.
        random.Random(0).shuffle(out)
    return out


def args(cfg: PreferenceConfig) -> dict:
    return {
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "max_length": cfg.max_len,
        "beta": cfg.beta,
        "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
        "precompute_ref_batch_size": 2 * cfg.batch_size,  # no gradients kept: a larger batch fits
        "desirable_weight": cfg.desirable_weight,  # KTO only (trainer below)
        "undesirable_weight": cfg.undesirable_weight,
        # The batches' real tokens (prompt + completion; chosen and rejected for DPO), as counted from their attention
        # masks: what tokens/s in metrics.json and the ledger is made of. (The KL rows KTO also runs are not counted.)
        "include_num_input_tokens_seen": "non_padding",
    }


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


def trainer(model, tokenizer, rows: list[dict], args: dict, callbacks: list, backend: str, parent: Path):
    """TRL's KTOTrainer (rows with a ``label``) or DPOTrainer (rows with ``chosen``), the parent as reference."""
    from datasets import Dataset

    args = dict(args)
    weights = args.pop("desirable_weight"), args.pop("undesirable_weight")
    if "label" in rows[0]:
        from trl import KTOConfig, KTOTrainer

        n_good = sum(r["label"] for r in rows)
        good_w, bad_w = kto_weights(PreferenceConfig(desirable_weight=weights[0], undesirable_weight=weights[1]),
                                    n_good, len(rows) - n_good)
        config, cls = KTOConfig(**args, desirable_weight=good_w, undesirable_weight=bad_w), KTOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

        config, cls = DPOConfig(**args), DPOTrainer
    with _quiet_datasets():
        ref = _reference(parent, model)
        built = cls(model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(rows),
                    processing_class=tokenizer, callbacks=callbacks)
    if backend == "hf":  # padding-free, the LM head on the reply tokens only (TRL's CPU path scores every position)
        from evolution.train import logprobs

        logprobs.install(built.model.get_base_model(), built.accelerator.autocast,
                         ("log_probs", "entropy", "mean_logits", "is_top1"))
        if built.ref_model is not None:
            logprobs.install(built.ref_model, built.accelerator.autocast)
    if config.precompute_ref_log_probs:
        built.ref_model = None  # its log-probs are in the dataset now; training never calls it
    return built


def inbox(received: Inbox) -> list[tuple[tuple[int, int], dict]]:
    """Every rated and corrected reply since the parent (all are kept: none answers for another)."""
    return ([((1, e.rating_id), {"prompt": e.prompt, "reply": e.reply, "label": e.label}) for e in received.examples]
            + [((1, p.rating_id), {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
               for p in received.pairs])


STAGE = Stage(
    name="preference",
    rows=rows,
    seq_len=lambda cfg: cfg.max_len,
    trainer=trainer,
    curriculum=lambda cur: [],
    config=PreferenceConfig,
    inbox=inbox,
    plan=plan,
    args=args,
    cpu_attention="eager",  # lanes of several rows (evolution.train.logprobs): a block mask, as SFT's
)

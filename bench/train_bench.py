"""Training throughput benchmark: each stage of ours against stock TRL and a plain transformers + PEFT fp32 loop.

    python bench/train_bench.py [--steps 12] [--warmup 3] [--only cpt|sft|kto|dpo] [--skip-baseline] [--skip-trl]

All in one run, on the embedded SmolLM2-135M-Instruct (dequantized into a temporary
Hugging Face checkpoint) and the shipped curriculum, LoRA r=16 on every projection (alpha 32),
the batch each stage of an age-up uses (CPT and SFT: 8 rows; KTO and DPO: 4 examples x 2
accumulated, a DPO example being two sequences). Stages: ``cpt``, ``sft``, and the preference
stage twice, as ``kto`` and as ``dpo``.

1. **Matmul peak** of this machine, fp32 and bf16 (``torch.matmul`` of square matrices, best
   of several sizes and repeats): the ceiling the training figures are a fraction of.
2. **Plain loop** (CPT and SFT only): ``AutoModelForCausalLM`` in fp32 + ``peft.get_peft_model``,
   ``torch.optim.AdamW``, forward with labels, backward, step — batches padded to their
   longest row, the loss on the same tokens ours trains (SFT: assistant tokens only).
3. **Stock TRL**, what a user would pick instead, at its best settings for this CPU: the model
   loaded in bf16 and ``bf16=True`` where the CPU runs bf16 natively (else fp32), LoRA through
   ``peft_config``, no activation checkpointing (TRL's configs turn it on by default), the
   same batch, learning rate and lengths as ours. CPT: ``SFTTrainer`` on the raw texts as a
   language-modeling dataset, packed (``packing_strategy="bfd_split"``, which is padding-free)
   into rows of ``block_size`` tokens, as ours packs them. SFT: ``SFTTrainer`` on the chat
   examples in TRL's conversational prompt-completion form (loss on the completion; TRL's
   ``assistant_only_loss=True`` refuses SmolLM2's chat template, which has no generation markers,
   and the shipped examples are single-turn, so this is the same loss) with
   ``padding_free=True``, 8 examples a batch as ours.
   KTO / DPO: ``KTOTrainer`` / ``DPOTrainer`` on the rows our preference stage builds, the
   reference being the base with the adapter disabled (TRL's default for a fresh adapter);
   TRL 1.16 has no padding-free mode for either (``DPOConfig.padding_free`` is disabled).
4. **Ours**: ``evolution.train.train`` exactly as an age-up runs it (the configured precision,
   padding, loss), capped at ``warmup + steps`` optimizer steps per stage.

Preference data: the shipped curriculum's SFT examples, in the record format the preference stage
trains on (``evolution.train.preference``): the prompt is the conversation before the last
assistant turn; the good reply is the curriculum's answer; the bad reply is the answer of another
example (a seeded derangement). KTO: each prompt once with its good and once with its bad reply
(``{"prompt", "reply", "label"}``); DPO: each prompt once as a pair (``{"prompt", "chosen",
"rejected"}``).

Tokens/s counts real (non-padding) tokens of the timed steps (after ``--warmup`` steps); for KTO
and DPO the prompt and reply of each row (both replies of a DPO pair), not the KL rows KTO adds.
Ours vs TRL is the ratio of the two; the goal is at least 1.5x on every stage.
Model FLOP/s = 4 x parameters x tokens/s: a forward (2 per parameter per token) and a backward
through the activations (2); LoRA's frozen base needs no weight gradients. Attention scores
and the adapters' own FLOPs are not counted, so the fractions of peak are slight underestimates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Contention  # noqa: E402  (what else ran: a figure beside a busy neighbour is not a figure)

from evolution import base as base_model
from evolution import curriculum
from evolution.config import AgeUpConfig, TrainConfig
from evolution.paths import REPO_ROOT

STAGES = ("cpt", "sft", "kto", "dpo")


def matmul_peak(dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Best GFLOP/s of square matmuls in ``dtype`` over a few sizes."""
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm the kernels up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.matmul(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


class StepTimer:
    """A TrainerCallback timing the optimizer steps of one training run after a warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.time, self.tokens = warmup, 0.0, 0
        self._t0 = self._seen0 = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if timer.warmup == 0:  # no warm-up: the clock starts with the first step
                    timer._t0, timer._seen0 = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == timer.warmup:
                    timer._t0, timer._seen0 = time.perf_counter(), state.num_input_tokens_seen
                elif state.global_step > timer.warmup:
                    timer.time = time.perf_counter() - timer._t0
                    timer.tokens = state.num_input_tokens_seen - timer._seen0

        return _Cb()

    def rate(self) -> tuple[float, int]:
        if not self.tokens:
            raise RuntimeError("no tokens counted in the timed steps (too few steps, or the trainer counts none)")
        return self.tokens / self.time, self.tokens


def plain_loop(base: Path, batches: list[tuple[list[list[int]], list[list[int]]]], cfg: TrainConfig, lr: float,
               warmup: int) -> tuple[float, int]:
    """tokens/s of the baseline: fp32 transformers + PEFT, a hand-written loop, padded batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t0, tokens = None, 0
    for i, (ids, masks) in enumerate(batches):
        if i == warmup:
            t0, tokens = time.perf_counter(), 0
        width = max(len(r) for r in ids)
        input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(r, mk)] + [-100] * (width - len(r))
                               for r, mk in zip(ids, masks)])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(r) for r in ids)
    return tokens / (time.perf_counter() - t0), tokens


def _batches(rows: list[dict], n: int, batch: int, seed: int):
    rng, order = random.Random(seed), []
    while len(order) < n * batch:
        epoch = list(range(len(rows)))
        rng.shuffle(epoch)
        order += epoch
    return [([rows[j]["input_ids"] for j in order[i * batch:(i + 1) * batch]],
             [rows[j].get("assistant_masks", [1] * len(rows[j]["input_ids"])) for j in order[i * batch:(i + 1) * batch]])
            for i in range(n)]


def preference_records(sft: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(KTO records, DPO records) from chat examples: good = the example's answer, bad = another example's."""
    prompts = [r["messages"][:-1] for r in sft]
    answers = [r["messages"][-1]["content"] for r in sft]
    order = list(range(len(sft)))
    random.Random(seed).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # a derangement: never itself
    kto, dpo = [], []
    for i, p in enumerate(prompts):
        bad = answers[other[i]]
        kto += [{"prompt": p, "reply": answers[i], "label": "good"}, {"prompt": p, "reply": bad, "label": "bad"}]
        dpo.append({"prompt": p, "chosen": answers[i], "rejected": bad})
    return kto, dpo


def _lora(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def stock_trl(stage: str, base: Path, tok, records: list[dict], cfg: TrainConfig, steps: int, warmup: int,
              out: Path) -> tuple[float, int]:
    """tokens/s of TRL's own trainer for ``stage`` at its best settings here (see the module docstring)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from evolution.train import preference, resolve_precision

    bf16 = resolve_precision("auto") == "bf16"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32)
    sections = cfg.stage_sections()
    section = sections["preference" if stage in ("kto", "dpo") else stage]
    common = dict(output_dir=str(out), max_steps=steps, learning_rate=section.lr, lr_scheduler_type="cosine",
                  warmup_steps=min(cfg.warmup_steps, steps // 5), logging_steps=1, save_strategy="no",
                  report_to="none", seed=cfg.seed, bf16=bf16, use_cpu=True, dataloader_num_workers=0,
                  disable_tqdm=True, gradient_checkpointing=False)
    timer = StepTimer(warmup)
    if stage in ("cpt", "sft"):
        from trl import SFTConfig, SFTTrainer

        if stage == "cpt":  # raw text, packed into block_size rows with no padding, as ours
            data = Dataset.from_list([{"text": r["text"]} for r in records])
            conf = SFTConfig(**common, per_device_train_batch_size=cfg.batch_size, max_length=section.block_size,
                             packing=True, packing_strategy="bfd_split", include_num_input_tokens_seen="all")
        else:  # chat examples, loss on the assistant's reply, padding-free batches of 8 examples
            # assistant_only_loss=True refuses SmolLM2's template (no {% generation %} markers, and TRL cannot
            # patch it in); the curriculum's examples are single-turn, so the prompt-completion form (loss on
            # the completion, TRL's default for it) is the same loss.
            if any(m["role"] == "assistant" for r in records for m in r["messages"][:-1]):
                raise RuntimeError("multi-turn SFT examples: the prompt-completion form would not train every turn")
            data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                                      for r in records])
            conf = SFTConfig(**common, per_device_train_batch_size=cfg.batch_size, max_length=None,
                             padding_free=True, include_num_input_tokens_seen="all")
        trainer = SFTTrainer(model=model, args=conf, train_dataset=data, processing_class=tok,
                             peft_config=_lora(cfg), callbacks=[timer.callback()])
    else:
        from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

        pref = sections["preference"]
        pref_cfg = dataclasses.replace(pref, method=stage)
        rows = preference.rows(tok, records, pref_cfg)
        conf_cls, cls = (KTOConfig, KTOTrainer) if stage == "kto" else (DPOConfig, DPOTrainer)
        extra = {}
        if stage == "kto":
            n_good = sum(r["label"] for r in rows)
            extra = dict(zip(("desirable_weight", "undesirable_weight"),
                             preference.kto_weights(pref_cfg, n_good, len(rows) - n_good)))
        conf = conf_cls(**common, per_device_train_batch_size=pref.batch_size,
                        gradient_accumulation_steps=pref.grad_accum, max_length=pref.max_len, beta=pref.beta, include_num_input_tokens_seen="non_padding", **extra)
        trainer = cls(model=model, args=conf, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      peft_config=_lora(cfg), callbacks=[timer.callback()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # as ours: no per-step printing
    trainer.train()
    return timer.rate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per stage (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--only", choices=STAGES, action="append", help="this stage only (repeatable)")
    ap.add_argument("--skip-baseline", action="store_true", help="no plain loop")
    ap.add_argument("--skip-trl", action="store_true",
                    help="no stock TRL (with --skip-baseline: ours only, for trying levers)")
    ap.add_argument("--preference-attention", choices=("eager", "sdpa"),
                    help="try this attention for our preference stage on the CPU (a lever; default: the stage's own)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--base", type=Path, help="an HF checkpoint of the embedded model made earlier (skips ~20 s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from evolution.train import BY_NAME, resolve_precision, train

    if args.preference_attention:
        BY_NAME["preference"] = dataclasses.replace(BY_NAME["preference"], cpu_attention=args.preference_attention)

    cfg = AgeUpConfig().train
    n = args.warmup + args.steps
    busy = Contention()
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)", flush=True)

    cur = curriculum.load(REPO_ROOT / "curriculum")
    stages = args.only or list(STAGES)
    records = {name: BY_NAME[name].curriculum(cur) for name in ("cpt", "sft")}
    records["kto"], records["dpo"] = preference_records(records["sft"], cfg.seed)
    results = {"peak_gflops": peak, "threads": torch.get_num_threads(), "stages": {}}
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        base = Path(tmp) / "base"
        if args.base:
            base = args.base
        else:
            base_model.materialize(base)
        tok = base_model.load_embedded_tokenizer()
        from transformers import AutoConfig, AutoModelForCausalLM

        params = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).num_parameters()
        flop_per_token = 4 * params
        sections = cfg.stage_sections()
        for stage in stages:
            row: dict = {}
            if not args.skip_baseline and stage in ("cpt", "sft"):
                rows = BY_NAME[stage].rows(tok, records[stage], sections[stage])
                rate, tokens = plain_loop(base, _batches(rows, n, cfg.batch_size, cfg.seed), cfg, sections[stage].lr,
                                          args.warmup)
                row["plain"] = {"tokens_per_s": rate, "tokens": tokens}
                print(f"{stage} plain loop: {rate:.0f} tokens/s", flush=True)
            if not args.skip_trl:
                rate, tokens = stock_trl(stage, base, tok, records[stage], cfg, n, args.warmup,
                                         Path(tmp) / f"trl-{stage}")
                row["trl"] = {"tokens_per_s": rate, "tokens": tokens}
                print(f"{stage} stock TRL: {rate:.0f} tokens/s", flush=True)
            timer = StepTimer(args.warmup)
            ours = AgeUpConfig().train
            ours.cpt.max_steps = ours.sft.max_steps = ours.preference.max_steps = n
            ours.save_steps = 10**6
            name = "preference" if stage in ("kto", "dpo") else stage
            ours.stages = [name]
            if name == "preference":
                ours.preference.method = stage
            result = train(base, {name: records[stage]}, ours, Path(tmp) / f"work-{stage}",
                           extra_callbacks=[timer.callback()])
            if result.stages[name].method not in (None, stage):
                raise RuntimeError(f"{stage}: our preference stage chose {result.stages[name].method}")
            rate, tokens = timer.rate()
            row["ours"] = {"tokens_per_s": rate, "tokens": tokens, "precision": resolve_precision(ours.precision),
                           "attention": BY_NAME[name].cpu_attention}
            print(f"{stage} ours: {rate:.0f} tokens/s", flush=True)
            results["stages"][stage] = row

    print()
    print("| stage | loop | tokens/s | model GFLOP/s | % fp32 peak | % bf16 peak | vs plain | vs stock TRL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    labels = {"plain": "plain transformers+PEFT fp32", "trl": f"stock TRL ({resolve_precision('auto')})"}
    for stage, row in results["stages"].items():
        plain = row.get("plain", {}).get("tokens_per_s")
        trl = row.get("trl", {}).get("tokens_per_s")
        for name, r in list(row.items()):
            gf = r["tokens_per_s"] * flop_per_token / 1e9
            r["gflops"] = gf
            vs = f"{r['tokens_per_s'] / plain:.2f}x" if plain else "-"
            vs_trl = f"{r['tokens_per_s'] / trl:.2f}x" if trl else "-"
            if name == "ours" and trl:
                row["ours_vs_trl"] = r["tokens_per_s"] / trl
            label = labels[name] if name in labels else f"ours ({r['precision']}, {r['attention']})"
            print(f"| {stage} | {label} | {r['tokens_per_s']:.0f} | {gf:.0f} | {100 * gf / peak['fp32']:.0f} % "
                  f"| {100 * gf / peak['bf16']:.0f} % | {vs} | {vs_trl} |")
    ratios = {stage: row["ours_vs_trl"] for stage, row in results["stages"].items() if "ours_vs_trl" in row}
    if ratios:
        print("\nours / stock TRL: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
              + f" (goal: at least 1.5x on every stage: {'met' if min(ratios.values()) >= 1.5 else 'not met'})")
    print(f"\nmodel: {params / 1e6:.1f}M parameters, {flop_per_token / 1e9:.2f} GFLOP per trained token; "
          f"batch {cfg.batch_size} (KTO/DPO {cfg.preference.batch_size} x {cfg.preference.grad_accum}), "
          f"LoRA r={cfg.lora_r}, {args.steps} timed steps after {args.warmup}")
    others = busy.others()
    results["other_load"] = others
    print(f"other processes used {100 * others:.0f} % of the CPU during the run"
          + (" -- too busy: these figures are not this machine's" if others > 0.10 else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

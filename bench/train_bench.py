"""Training throughput benchmark: our CPT and SFT against a plain transformers + PEFT fp32 loop.

    python bench/train_bench.py [--steps 12] [--warmup 3] [--only cpt|sft] [--skip-baseline]

All in one run, on the embedded SmolLM2-135M-Instruct (dequantized into a temporary
Hugging Face checkpoint) and the shipped curriculum, LoRA r=16 on every projection, batch 8:

1. **Matmul peak** of this machine, fp32 and bf16 (``torch.matmul`` of square matrices, best
   of several sizes and repeats): the ceiling the training figures are a fraction of.
2. **Plain loop** (the baseline): ``AutoModelForCausalLM`` in fp32 + ``peft.get_peft_model``,
   ``torch.optim.AdamW``, forward with labels, backward, step — batches padded to their
   longest row, the loss on the same tokens ours trains (SFT: assistant tokens only).
3. **Ours**: ``evolution.train.train`` exactly as an age-up runs it (the configured precision,
   padding, loss), capped at ``warmup + steps`` optimizer steps per stage.

Tokens/s counts real (non-padding) tokens of the timed steps (after ``--warmup`` steps).
Model FLOP/s = 4 x parameters x tokens/s: a forward (2 per parameter per token) and a backward
through the activations (2); LoRA's frozen base needs no weight gradients. Attention scores
and the adapters' own FLOPs are not counted, so the fractions of peak are slight underestimates.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evolution import base as base_model
from evolution import curriculum
from evolution.config import AgeUpConfig, TrainConfig
from evolution.paths import REPO_ROOT


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


class Contention:
    """How much CPU other processes used meanwhile: a benchmark run beside a busy neighbour is not a figure.

    torch's OpenMP threads wait for each other at every op; one busy process, even at nice 19, costs
    training up to 10x here (measured: SFT 21 instead of 190 tokens/s).
    """

    def __init__(self):
        self.t0 = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy, total = sum(cpu) - cpu[3] - cpu[4], sum(cpu)
        # utime, stime, and those of finished children (a benchmark that runs the product as a subprocess)
        own = sum(int(x) for x in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:15])
        return busy, total, own

    def others(self) -> float:
        """Fraction of the machine's CPU time used by other processes since this object was made."""
        (b0, t0, o0), (b1, t1, o1) = self.t0, self._sample()
        return max(0.0, (b1 - b0) - (o1 - o0)) / max(t1 - t0, 1)


class StepTimer:
    """A TrainerCallback timing optimizer steps after a warm-up (for ``evolution.train.train``)."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.tokens = warmup, {}, {}
        self._t0 = self._seen0 = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer._stage = Path(args.output_dir).name

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == timer.warmup:
                    timer._t0, timer._seen0 = time.perf_counter(), state.num_input_tokens_seen
                elif state.global_step > timer.warmup:
                    timer.times[timer._stage] = time.perf_counter() - timer._t0
                    timer.tokens[timer._stage] = state.num_input_tokens_seen - timer._seen0

        return _Cb()

    def rate(self, stage: str) -> tuple[float, int]:
        return self.tokens[stage] / self.times[stage], self.tokens[stage]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per stage (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--only", choices=("cpt", "sft"), help="one stage only")
    ap.add_argument("--skip-baseline", action="store_true", help="ours only (quicker, for trying levers)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--base", type=Path, help="an HF checkpoint of the embedded model made earlier (skips ~20 s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from evolution.train import BY_NAME, resolve_precision, train

    cfg = AgeUpConfig().train
    n = args.warmup + args.steps
    busy = Contention()
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)", flush=True)

    cur = curriculum.load(REPO_ROOT / "curriculum")
    stages = [args.only] if args.only else ["cpt", "sft"]
    records = {name: BY_NAME[name].curriculum(cur) for name in stages}
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
        rows = {name: BY_NAME[name].rows(tok, records[name], sections[name]) for name in stages}
        for stage in stages:
            row: dict = {}
            if not args.skip_baseline:
                lr = sections[stage].lr
                rate, tokens = plain_loop(base, _batches(rows[stage], n, cfg.batch_size, cfg.seed), cfg, lr,
                                          args.warmup)
                row["plain"] = {"tokens_per_s": rate, "tokens": tokens}
                print(f"{stage} plain loop: {rate:.0f} tokens/s", flush=True)
            timer = StepTimer(args.warmup)
            ours = AgeUpConfig().train
            ours.cpt.max_steps = ours.sft.max_steps = n
            ours.save_steps = 10**6
            ours.stages = [stage]
            train(base, {stage: records[stage]}, ours, Path(tmp) / f"work-{stage}", extra_callbacks=[timer.callback()])
            rate, tokens = timer.rate(stage)
            row["ours"] = {"tokens_per_s": rate, "tokens": tokens, "precision": resolve_precision(ours.precision)}
            print(f"{stage} ours: {rate:.0f} tokens/s", flush=True)
            results["stages"][stage] = row

    print()
    print("| stage | loop | tokens/s | model GFLOP/s | % fp32 peak | % bf16 peak | vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for stage, row in results["stages"].items():
        plain = row.get("plain", {}).get("tokens_per_s")
        for name, r in row.items():
            gf = r["tokens_per_s"] * flop_per_token / 1e9
            r["gflops"] = gf
            vs = f"{r['tokens_per_s'] / plain:.2f}x" if plain else "-"
            label = "plain transformers+PEFT fp32" if name == "plain" else f"ours ({r['precision']})"
            print(f"| {stage} | {label} | {r['tokens_per_s']:.0f} | {gf:.0f} | {100 * gf / peak['fp32']:.0f} % "
                  f"| {100 * gf / peak['bf16']:.0f} % | {vs} |")
    print(f"\nmodel: {params / 1e6:.1f}M parameters, {flop_per_token / 1e9:.2f} GFLOP per trained token; "
          f"batch {cfg.batch_size}, LoRA r={cfg.lora_r}, {args.steps} timed steps after {args.warmup}")
    others = busy.others()
    results["other_load"] = others
    print(f"other processes used {100 * others:.0f} % of the CPU during the run"
          + (" -- too busy: these figures are not this machine's" if others > 0.10 else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

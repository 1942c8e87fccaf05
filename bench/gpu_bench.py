"""The GPU path measured: the training stage on both engines, side by side, on a 1B Llama-shaped model.

    python bench/gpu_bench.py [--size 1b|tiny] [--steps 10] [--warmup 3] [--json OUT]

One run trains the SFT stage (``evolution.train.train`` exactly as an age-up runs it, LoRA r=16 on
every projection) with each backend in turn, each in a process of its own (Unsloth is imported there before
anything else, as it must be): ``hf`` (transformers + PEFT) and ``unsloth`` (Unsloth's
``FastLanguageModel``), on a model built from a ``LlamaConfig`` with random weights (no download):
``1b`` is Llama-3.2-1B's shape (2048 wide, 16 layers, 32 heads / 8 KV heads, 8192 MLP) with the
embedded SmolLM2 tokenizer's 49k vocabulary, 1.07 B parameters; ``tiny`` is the 2-layer, 64-wide test
model. For each backend it prints real tokens/s of the timed steps (after ``--warmup``), peak memory
(GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS), model FLOP/s as a share of
the device's bf16 peak, and what the backend needs installed (distributions and their installed size).
A backend this host cannot run (Unsloth without CUDA or without the package) is reported as
unavailable, with the reason ``evolution.train.select_backend`` gives.

Model FLOP/s = 4 x parameters x tokens/s (forward 2, backward through the activations 2; LoRA's
frozen base needs no weight gradients; attention scores and the adapters' own FLOPs uncounted).
The bf16 peak: the vendor's dense figure for a GPU this script knows (``BF16_PEAK_TFLOPS``), else the
best square bf16 matmul measured here (on a CPU always the measured one, bf16 or fp32 as it runs).

The default (``--size 1b``) needs a CUDA GPU with about 30 GB free; on a CPU-only host it runs at
``tiny`` (CI runs it so, ``tests/test_gpu_bench.py``, so it cannot rot).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

if __name__ == "__main__" and "--one=unsloth" in sys.argv:
    try:  # Unsloth patches transformers, TRL and PEFT as it is imported: first, in its own process
        import unsloth  # noqa: F401
    except ImportError:
        pass  # run_backend says why it cannot run

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evolution.base import load_embedded_tokenizer  # noqa: E402
from evolution.config import AgeUpConfig  # noqa: E402
from evolution.errors import EvolutionError  # noqa: E402

SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}
SEQ = {"1b": 1024, "tiny": 128}
"""Longest SFT row (tokens) at each size."""
BATCH = {"1b": 8, "tiny": 4}

BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}
"""Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by name substring."""

PACKAGES = {
    "hf": ["torch", "transformers", "peft", "trl", "accelerate", "datasets"],
    "unsloth": ["unsloth", "unsloth_zoo", "triton", "bitsandbytes", "xformers", "torch", "transformers", "peft",
                "trl", "accelerate", "datasets"],
}
"""What each backend imports to train (Unsloth's own dependencies, then the stack it patches)."""

WORDS = ("tide pool shore gull crab kelp harbour lantern wren teal dawn sea rock sand foam light keeper boat "
         "north wind rope net salt map star").split()


def installed_mb(dist: str) -> float | None:
    """Installed size of a distribution (its RECORD's files), MB; None when it is not installed."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    return sum((p.size or 0) for p in (d.files or [])) / 1e6


def packages(backend: str) -> list[tuple[str, str, float | None]]:
    """(distribution, version or 'not installed', MB) for what ``backend`` needs."""
    out = []
    for name in PACKAGES[backend]:
        mb = installed_mb(name)
        out.append((name, metadata.version(name) if mb is not None else "not installed", mb))
    return out


def bf16_peak(device: str) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for ``device``."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in BF16_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}, data sheet"
    dtype = torch.bfloat16 if device == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    best = 0.0
    for n in ((4096, 8192) if device == "cuda" else (1024, 2048)):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        torch.matmul(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            torch.matmul(a, b)
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best, f"measured {str(dtype).removeprefix('torch.')} matmul on {device}"


def build_model(size: str, out: Path, tokenizer) -> int:
    """A Llama of ``size`` with random weights, saved as an HF checkpoint in ``out``; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SIZES[size])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if size == "1b" else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def chats(n: int, words: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic chat examples of about ``words`` words each (seeded)."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    return [{"messages": [{"role": "user", "content": text(words // 3)},
                          {"role": "assistant", "content": text(2 * words // 3)}]} for _ in range(n)]


class StepTimer:
    """Times the optimizer steps after ``warmup`` and counts their real tokens (a TrainerCallback)."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self
        self.warmup, self.seconds, self.tokens = warmup, 0.0, 0

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step == timer.warmup:
                    timer.t0, timer.seen0 = time.perf_counter(), state.num_input_tokens_seen
                elif state.global_step > timer.warmup:
                    timer.seconds = time.perf_counter() - timer.t0
                    timer.tokens = state.num_input_tokens_seen - timer.seen0

        self.callback = _Cb()


def run_backend(backend: str, base: Path, size: str, steps: int, warmup: int, work: Path) -> dict:
    """Train the SFT stage with ``backend``: tokens/s, peak memory; or why it is unavailable."""
    from evolution.train import select_backend, train

    try:
        select_backend(backend)
    except EvolutionError as e:
        return {"backend": backend, "available": False, "reason": str(e)}
    cfg = AgeUpConfig().train
    cfg.backend, cfg.stages, cfg.batch_size, cfg.warmup_steps = backend, ["sft"], BATCH[size], 0
    cfg.sft.max_steps, cfg.sft.max_len, cfg.save_steps = warmup + steps, SEQ[size], 10_000
    data = {"sft": chats(BATCH[size] * (warmup + steps), words=SEQ[size] // 3)}
    timer = StepTimer(warmup)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(base, data, cfg, work / backend, extra_callbacks=[timer.callback])
    if not timer.tokens:
        raise RuntimeError(f"{backend}: no tokens counted in the timed steps (raise --steps)")
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"backend": backend, "available": True, "tokens_per_s": timer.tokens / timer.seconds,
            "tokens": timer.tokens, "seconds": timer.seconds, "peak_memory_gb": peak / 1e9}


def run_isolated(backend: str, base: Path, size: str, steps: int, warmup: int, work: Path) -> dict:
    """``run_backend`` in a process of its own (``--one``): Unsloth must be imported before transformers, and
    each backend's peak memory is its own."""
    out = work / f"{backend}.json"
    p = subprocess.run([sys.executable, __file__, f"--one={backend}", "--base", str(base), "--size", size,
                        "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)],
                       capture_output=True, text=True)
    if p.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{backend}: its process failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", choices=("hf", "unsloth"), help=argparse.SUPPRESS)  # run_isolated's child
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        row = run_backend(a.one, a.base, a.size, a.steps, a.warmup, a.out.parent)
        a.out.write_text(json.dumps(row))
        return row
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = a.size if device == "cuda" else "tiny"
    if size != a.size:
        print(f"no CUDA device: running at size 'tiny' instead of {a.size!r}")
    peak, peak_from = bf16_peak(device)
    tokenizer = load_embedded_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(size, Path(tmp) / "base", tokenizer)
        rows = [run_isolated(b, Path(tmp) / "base", size, a.steps, a.warmup, Path(tmp)) for b in ("hf", "unsloth")]
    for r in rows:
        r["packages"] = packages(r["backend"])
        r["installed_mb"] = sum(mb for _, _, mb in r["packages"] if mb)
        if r["available"]:
            r["model_flops"] = 4 * n_params * r["tokens_per_s"]
            r["share_of_peak"] = r["model_flops"] / peak
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
              "size": size, "parameters": n_params, "bf16_peak_flops": peak, "peak_from": peak_from,
              "steps": a.steps, "warmup": a.warmup, "batch": BATCH[size], "max_len": SEQ[size], "backends": rows}
    print(f"{report['device']}, {size} Llama ({n_params / 1e6:.1f} M parameters), SFT, batch {BATCH[size]}, "
          f"rows up to {SEQ[size]} tokens, {a.steps} timed steps after {a.warmup}; peak {peak / 1e12:.2f} TFLOP/s "
          f"({peak_from})")
    print(f"{'backend':<9} {'tokens/s':>10} {'peak mem GB':>12} {'MFU':>7}  installed")
    for r in rows:
        pk = ", ".join(f"{n} {v}" + (f" {mb:.0f} MB" if mb else "") for n, v, mb in r["packages"])
        if r["available"]:
            print(f"{r['backend']:<9} {r['tokens_per_s']:>10.1f} {r['peak_memory_gb']:>12.2f} "
                  f"{100 * r['share_of_peak']:>6.2f}%  {r['installed_mb']:.0f} MB: {pk}")
        else:
            print(f"{r['backend']:<9} {'unavailable':>10}: {r['reason']}\n{'':<9} needs: {pk}")
    ok = [r for r in rows if r["available"]]
    if len(ok) == 2:
        print(f"unsloth / hf tokens/s: {ok[1]['tokens_per_s'] / ok[0]['tokens_per_s']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

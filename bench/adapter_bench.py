"""Task-adapter benchmark: what switching GGUF LoRA adapters between requests costs a request (issue 30: ≤ 50 ms).

    python bench/adapter_bench.py [--requests 30] [--repeats 3] [--rank 16] [--max-tokens 24]

On the embedded SmolLM2-135M-Instruct GGUF, served by a ``ModelHost`` as the daemon serves it, with two adapters
of every projection (rank ``--rank``, the age-up's LoRA targets) written by ``export.lora_to_gguf`` from the
materialized base. Each phase sends the same ``--requests`` chat requests one after another (temperature 0, each
a different question after one shared system prompt, as an agent's are), with the adapters a, b, none, a, ...:

1. **never switched** (the baseline of the same run): each set's requests one after another;
2. **switching**: the same requests in their order, each naming other adapters than the one before.

Both run ``--repeats`` times, interleaved, and each request's time is its fastest (one request's time varies by
±100 ms on a shared 2-core VM). The extra latency of a switch is taken per request (switching − never switched: the
same prompt, the same adapters, the same reply at temperature 0), so replies of different lengths under different
adapters do not enter it; the baseline's own spread (slowest − fastest of a request) is reported beside it.

Reports each phase's latency p50 and p100, the extra latency switching costs a request (p50 and p100), the switch
itself (``llama_set_adapters_lora`` and the prompt caches copied out and back, timed alone), an adapter's load time
and file size. Writes ``docs/bench/<date>-adapters.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

from evolution import base as base_model
from evolution import export
from evolution.fsutil import sha256_file
from evolution.serving import ModelHost
from evolution.train.settings import LORA_TARGETS

SYSTEM = ("You are a helpful assistant for a small workshop. Answer briefly and plainly; when you do not know "
          "something, say so.")
QUESTIONS = ["What is a good way to store wood screws?", "How do I sharpen a chisel?", "Why does glue need clamps?",
             "What is the difference between a rasp and a file?", "How long does wood stain take to dry?",
             "What is a dovetail joint?", "How do I keep a saw from rusting?", "What grit sandpaper comes first?",
             "Why do boards warp?", "What is a mortise?"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def make_adapter(base_hf: Path, out: Path, seed: int, rank: int) -> Path:
    """A LoRA on every projection with small random B matrices (a trained adapter's size and shapes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.002)
    model.save_pretrained(out / "peft")
    export.lora_to_gguf(out / "peft", base_hf, out / "adapter.gguf", task=out.name)
    return out / "adapter.gguf"


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    try:
        base_hf = work / "base"
        base_model.materialize(base_hf)
        adapters = {name: make_adapter(base_hf, work / name, seed, args.rank) for seed, name in enumerate("ab")}
        gguf = base_model.embedded_gguf()
        host = ModelHost(n_ctx=1024)
        try:
            slot = host.load(0, gguf, sha256_file(gguf))
            host.swap(slot)
            load_s = []
            for name, path in adapters.items():
                t = time.perf_counter()
                host.load_adapter(slot, name, path, sha256_file(path))
                load_s.append(time.perf_counter() - t)

            def request(i: int, names: list[str]) -> float:
                body = {"messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        "temperature": 0.0, "max_tokens": args.max_tokens, "seed": 0, "adapters": names}
                t = time.perf_counter()
                host.call(lambda s: s.model.chat(body))
                return time.perf_counter() - t

            cycle = [["a"], ["b"], []]
            asked = [(i, cycle[i % 3]) for i in range(args.requests)]  # each question with its adapters
            def grouped() -> dict[int, float]:  # each set's requests one after another, never switched between
                out = {}
                for names in cycle:
                    request(len(QUESTIONS) - 1, names)  # warm: the set applied, its cache holding the system prompt
                    out.update({i: request(i, names) for i, n in asked if n == names})
                return out

            def switching() -> dict[int, float]:  # the same requests in order, each switching from the one before
                return {i: request(i, n) for i, n in asked}

            alone_runs, switched_runs = [], []
            for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits both alike
                alone_runs.append(grouped())
                switched_runs.append(switching())
            # one request's time varies by ±100 ms on a shared 2-core VM: each request's fastest of the repeats is
            # its own cost, and the pairs (the same prompt, adapters and reply) take the difference
            alone = {i: min(run[i] for run in alone_runs) for i, _ in asked}
            switched = {i: min(run[i] for run in switched_runs) for i, _ in asked}
            extra = [switched[i] - alone[i] for i, _ in asked]
            noise = [max(run[i] for run in alone_runs) - alone[i] for i, _ in asked]
            latency = {"never switched": list(alone.values()), "switching every request": list(switched.values())}
            for phase, xs in latency.items():
                print(f"[adapters] {phase}: p50 {_pct(xs, 0.5) * 1000:.0f} ms, p100 {max(xs) * 1000:.0f} ms",
                      flush=True)
            switch = []
            for i in range(50):  # the switch alone: set the adapters, copy the prompt caches out and back
                t = time.perf_counter()
                host.call(lambda s, n=cycle[i % 3]: s.model._use({"adapters": n}))
                switch.append(time.perf_counter() - t)
        finally:
            host.close()
        sizes = {name: p.stat().st_size for name, p in adapters.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"requests": args.requests, "repeats": args.repeats, "rank": args.rank, "max_tokens": args.max_tokens,
            "latency_s": {k: {"p50": _pct(v, 0.5), "p100": max(v), "mean": statistics.mean(v)}
                          for k, v in latency.items()},
            "extra_switching_s": {"p50": _pct(extra, 0.5), "p100": max(extra), "mean": statistics.mean(extra)},
            "noise_s": {"p50": _pct(noise, 0.5), "p100": max(noise), "mean": statistics.mean(noise)},
            "switch_alone_s": {"p50": _pct(switch, 0.5), "p100": max(switch)},
            "adapter_load_s": max(load_s), "adapter_bytes": max(sizes.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30, help="requests per phase")
    ap.add_argument("--rank", type=int, default=16, help="the adapters' LoRA rank (the age-up's default: 16)")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens each reply may have")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each phase, interleaved (a request's fastest counts)")
    args = ap.parse_args()
    started, contention = time.time(), report.Contention()
    r = run(args)
    lat, extra, noise = r["latency_s"], r["extra_switching_s"], r["noise_s"]
    ms = lambda x: f"{x * 1000:.1f}"  # noqa: E731
    body = [f"{r['requests']} chat requests per phase on the embedded SmolLM2-135M-Instruct GGUF through a "
            f"`ModelHost`, one after another; adapters of rank {r['rank']} on every projection "
            f"({r['adapter_bytes'] / 1e6:.1f} MB each as GGUF, loaded in {r['adapter_load_s'] * 1000:.0f} ms); "
            f"replies of at most {r['max_tokens']} tokens. Baseline: the same requests, each set's one after another "
            "(never switched), in the same run; the extra latency is taken per request.", "",
            "| phase | p50 ms | p100 ms | mean ms |", "|---|---|---|---|",
            *(f"| {k} | {ms(v['p50'])} | {ms(v['p100'])} | {ms(v['mean'])} |" for k, v in lat.items()), "",
            f"Extra latency of switching (per request, switching − never switched): p50 {ms(extra['p50'])} ms, p100 "
            f"{ms(extra['p100'])} ms, mean {ms(extra['mean'])} ms (goal ≤ 50 ms), each request's fastest of "
            f"{r['repeats']}; the baseline's own spread (a request's slowest − fastest): p50 {ms(noise['p50'])} ms, "
            f"p100 {ms(noise['p100'])} ms. The switch alone (set the adapters, copy the prompt caches out and back): "
            f"p50 {r['switch_alone_s']['p50'] * 1e6:.0f} µs, p100 {r['switch_alone_s']['p100'] * 1e6:.0f} µs."]
    print(f"[adapters] extra latency of switching: p50 {ms(extra['p50'])} ms, p100 {ms(extra['p100'])} ms "
          f"(the baseline's own spread: p50 {ms(noise['p50'])} ms, p100 {ms(noise['p100'])} ms); "
          f"the switch alone p100 {r['switch_alone_s']['p100'] * 1e6:.0f} µs")
    print("report:", report.write("adapters", "Task adapters: switching between requests", body, r, contention,
                                  started))


if __name__ == "__main__":
    main()

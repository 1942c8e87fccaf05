"""Memory over model swaps: the resident memory of a process that serves a model and swaps it again and again.

    python bench/memory_bench.py [--swaps 20] [--chats 5]

The daemon swaps a new model in at every promotion (and out and in again after an idle unload) for months, so
what one swap leaves behind adds up. Each variant runs in a fresh process of its own, one after the other, on
the embedded GGUF through ``evolution.serving.ModelHost`` (the daemon's model host: load beside, hash, canary,
swap, free the old model on the llama thread), with ``--chats`` chats (64 tokens) before every swap:

- ``trim``: what the daemon does, glibc's ``malloc_trim`` after a model is freed
  (``serving.return_freed_memory``);
- ``no-trim``: the baseline, the same with the trim turned off.

Printed per variant: resident memory (RSS) and unique memory (USS: the process's own pages, not the GGUF's
shared file pages) after the first load and after the last swap, and the growth; then each growth's ratio
to the baseline's. Issue 17's bound is 50 MB of daemon growth over a ten-generation run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ASK = {"messages": [{"role": "user", "content": "Tell me about tide pools."}], "max_tokens": 64, "temperature": 0.0}


def _mb(proc) -> tuple[float, float]:
    info = proc.memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def child(trim: bool, swaps: int, chats: int) -> dict:
    """One variant in this process: load, then ``swaps`` times chat and swap a freshly loaded copy in."""
    import psutil

    from evolution import serving
    from evolution.base import embedded_gguf
    from evolution.config import DaemonConfig
    from evolution.fsutil import sha256_file

    if not trim:
        serving._TRIM = None
    gguf = embedded_gguf()
    sha = sha256_file(gguf)
    d = DaemonConfig()
    host = serving.ModelHost(d.n_ctx, d.chat_threads)
    proc = psutil.Process()
    host.swap(host.load(0, gguf, sha))
    for _ in range(chats):
        host.call(lambda slot: slot.model.chat(ASK))
    first = _mb(proc)
    after = []
    for gen in range(1, swaps + 1):
        host.swap(host.load(gen, gguf, sha))
        for _ in range(chats):  # the first one also waits until the old model was freed on the llama thread
            host.call(lambda slot: slot.model.chat(ASK))
        after.append(_mb(proc))
    host.close()
    return {"trim": trim, "swaps": swaps, "first_rss_mb": first[0], "first_uss_mb": first[1],
            "rss_mb": [round(a[0], 1) for a in after], "uss_mb": [round(a[1], 1) for a in after],
            "rss_growth_mb": after[-1][0] - first[0], "uss_growth_mb": after[-1][1] - first[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--chats", type=int, default=5, help="chats before every swap")
    ap.add_argument("--child", choices=("trim", "no-trim"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "trim", args.swaps, args.chats)))
        return
    results = {}
    for variant in ("no-trim", "trim"):  # one after the other: a process each, nothing else running
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--swaps", str(args.swaps),
                              "--chats", str(args.chats)], capture_output=True, text=True, check=True)
        r = results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:8s}: RSS {r['first_rss_mb']:.1f} -> {r['rss_mb'][-1]:.1f} MB "
              f"(+{r['rss_growth_mb']:.1f}), USS {r['first_uss_mb']:.1f} -> {r['uss_mb'][-1]:.1f} MB "
              f"(+{r['uss_growth_mb']:.1f}) over {args.swaps} swaps; RSS after each: {r['rss_mb']}", flush=True)
    base, trim = results["no-trim"], results["trim"]
    for key in ("rss_growth_mb", "uss_growth_mb"):
        ratio = trim[key] / base[key] if base[key] > 0 else float("nan")
        print(f"{key}: trim {trim[key]:.1f} MB vs no-trim {base[key]:.1f} MB: {ratio:.2f} x")


if __name__ == "__main__":
    main()

"""Serving benchmark: our server against llama-cpp-python, swaps under load, chat while training.

    python bench/serve_bench.py [--swaps 20] [--clients 4] [--skip-training]

All on the embedded SmolLM2-135M-Instruct GGUF, in one run, so every figure has its baseline:

1. **Throughput**: completion tokens/s of the same chat requests (temperature 0) through
   ``/v1/chat/completions`` with the official ``openai`` client, against ``Llama`` called
   directly. Goal: at most 5 % overhead.
2. **Swaps under load**: ``--clients`` threads chat without pause; first a phase without swaps
   (baseline), then ``--swaps`` hot-swaps (load beside, hash, canary, swap) while they chat.
   Prints failed requests (goal 0) and the largest extra latency a client saw (max latency
   during swaps − max latency without them).
3. **Chat during training**: one client's chat latency while idle, while a LoRA training
   process runs at normal priority, and while it runs at ``nice 10`` (what the daemon does),
   plus the training throughput in each case.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

from evolution.base import embedded_gguf
from evolution.config import AgeUpConfig, DaemonConfig
from evolution.fsutil import sha256_file
from evolution.paths import DataRoot

PROMPT = [{"role": "user", "content": "Write a short paragraph about tide pools and the creatures that live in them."}]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Server:
    """The daemon's HTTP app with only its model host in use, in its own process (as the daemon runs).

    llama.cpp must be driven from one thread per process to run at full speed (see
    ``evolution.serving``), so the direct baseline and the server are separate processes.
    """

    def __init__(self, gguf: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.port), "--gguf", str(gguf)],
                                     stderr=subprocess.DEVNULL)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0,
                                    timeout=300)
        self.http = f"http://127.0.0.1:{self.port}"
        import httpx

        t0 = time.time()
        while True:
            try:
                if httpx.get(self.http + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 120 or self.proc.poll() is not None:
                raise RuntimeError("the bench server did not start")
            time.sleep(0.2)

    def swap(self, gen: int) -> float:
        import httpx

        return httpx.post(self.http + "/bench/swap", json={"gen": gen}, timeout=120).json()["seconds"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(port: int, gguf: Path) -> None:
    """``--serve``: the server process (the daemon's app and model host, plus a swap trigger)."""
    import uvicorn

    from evolution.daemon import Daemon
    from evolution.server import create_app

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as home:
        daemon = Daemon(DataRoot(Path(home)), AgeUpConfig(), DaemonConfig(api_token="bench-token-0123456789"))
        daemon.prepare()  # its ledger and intake: every chat is captured, as users run it (capture on)
        sha = sha256_file(gguf)
        daemon.host.swap(daemon.host.load(0, gguf, sha))
        app = create_app(daemon)

        @app.post("/bench/swap")
        def bench_swap(body: dict):
            t0 = time.perf_counter()
            daemon.host.swap(daemon.host.load(int(body["gen"]), gguf, sha))
            return {"seconds": time.perf_counter() - t0}

        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


DIRECT = r"""
import sys, time, json
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False)
prompt = json.loads(sys.argv[3])
llm.create_chat_completion(messages=prompt, max_tokens=8, temperature=0)
for line in sys.stdin:
    t0 = time.perf_counter()
    out = llm.create_chat_completion(messages=prompt, max_tokens=int(line), temperature=0)
    print(json.dumps({"s": time.perf_counter() - t0, "tokens": out["usage"]["completion_tokens"]}), flush=True)
"""


def throughput(server: Server, gguf: Path, runs: int, max_tokens: int) -> dict:
    import json

    from evolution.serving import default_threads

    direct = subprocess.Popen([sys.executable, "-c", DIRECT, str(gguf), str(default_threads()), json.dumps(PROMPT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server.client.chat.completions.create(model="evolution", messages=PROMPT, max_tokens=8, temperature=0)
    direct_tok = direct_s = served_tok = served_s = 0.0
    for _ in range(runs):  # interleaved, so drift in machine load hits both alike
        direct.stdin.write(f"{max_tokens}\n")
        direct.stdin.flush()
        r = json.loads(direct.stdout.readline())
        direct_s += r["s"]
        direct_tok += r["tokens"]
        t0 = time.perf_counter()
        out = server.client.chat.completions.create(model="evolution", messages=PROMPT, max_tokens=max_tokens,
                                                    temperature=0)
        served_s += time.perf_counter() - t0
        served_tok += out.usage.completion_tokens
    direct.stdin.close()
    direct.wait()
    d, s = direct_tok / direct_s, served_tok / served_s
    return {"direct_tok_s": d, "server_tok_s": s, "overhead_pct": 100 * (1 - s / d)}


def load_phase(server: Server, clients: int, seconds: float, swaps: int = 0) -> dict:
    lat, fails, swap_s = [], [], []
    stop = threading.Event()

    def chat():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                server.client.chat.completions.create(model="evolution", max_tokens=16, temperature=0,
                                                      messages=[{"role": "user", "content": "What is a tide pool?"}])
                lat.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 — counted, that is the point
                fails.append(repr(exc))

    threads = [threading.Thread(target=chat) for _ in range(clients)]
    for t in threads:
        t.start()
    if swaps:
        gap = seconds / swaps
        for i in range(swaps):
            time.sleep(gap / 2)
            swap_s.append(server.swap(i + 1))
            time.sleep(gap / 2)
    else:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return {"requests": len(lat) + len(fails), "failed": len(fails), "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99),
            "max": max(lat, default=float("nan")), "swap_s": swap_s, "errors": fails[:3]}


TRAINER = r"""
import sys, time, json
from pathlib import Path
from evolution import curriculum, train
from evolution.config import AgeUpConfig
cfg = AgeUpConfig()
cur = curriculum.load(cfg.curriculum.path)
t = cfg.train
t.sft.max_steps, t.cpt.max_steps, t.save_steps, t.precision = 10_000, 1, 10_000, "auto"
def progress(stage, step, total, loss):
    if stage == "sft":
        print(json.dumps({"t": time.time(), "step": step}), flush=True)
train.train(Path(sys.argv[1]), {"cpt": [{"text": r["text"]} for r in cur.cpt][:4],
                                "sft": [{"messages": r["messages"]} for r in cur.sft]}, t, Path(sys.argv[2]), progress)
"""


def chat_during_training(server: Server, hf: Path, work: Path, seconds: float) -> list[dict]:
    rows = []
    cases = (("idle", None, None), ("training at normal priority", 0, {}),
             ("training at nice 10 (the daemon's worker)", 10, {}),
             ("training at nice 10, OMP_WAIT_POLICY=PASSIVE", 10, {"OMP_WAIT_POLICY": "PASSIVE"}))
    for label, nice, env in cases:
        proc = None
        if nice is not None:
            shutil_rm(work)
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
            proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(hf), str(work)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, env=env,
                                    preexec_fn=(lambda n=nice: os.nice(n)) if nice else None)
            first = proc.stdout.readline()  # training has reached its first SFT step
            if not first:
                raise RuntimeError("the training process did not start")
        steps = []
        if proc is not None:
            reader = threading.Thread(target=lambda: steps.extend(proc.stdout), daemon=True)
            reader.start()
        lat = []
        t_end = time.time() + seconds
        while time.time() < t_end:
            t0 = time.perf_counter()
            server.client.chat.completions.create(model="evolution", max_tokens=32, temperature=0,
                                                  messages=[{"role": "user", "content": "What is a tide pool?"}])
            lat.append(time.perf_counter() - t0)
            time.sleep(0.5)  # a person reading the answer
        train_steps = len(steps)
        if proc is not None:
            proc.kill()
            proc.wait()
        rows.append({"case": label, "chat_p50": _pct(lat, 0.5), "chat_p99": _pct(lat, 0.99), "chats": len(lat),
                     "train_steps_per_min": train_steps / seconds * 60 if proc else None})
    return rows


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--runs", type=int, default=8, help="throughput requests per side")
    p.add_argument("--seconds", type=float, default=40.0, help="length of each load / training phase")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gguf", type=Path, help="GGUF to serve [default: the embedded model]")
    args = p.parse_args()
    gguf = args.gguf or embedded_gguf()
    if args.serve:
        serve(args.serve, gguf)
        return
    from evolution.serving import default_threads

    print(f"model: {gguf.name}, {os.cpu_count()} CPUs, llama.cpp threads {default_threads()} (the daemon's default)")
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        server = Server(gguf)
        try:
            tp = throughput(server, gguf, args.runs, 128)
            print("\n## Throughput (completion tokens/s, 128-token replies, temperature 0)")
            print("| path | tokens/s |\n| --- | ---: |")
            print(f"| llama-cpp-python directly | {tp['direct_tok_s']:.1f} |")
            print(f"| our server + openai client | {tp['server_tok_s']:.1f} |")
            print(f"overhead: {tp['overhead_pct']:.1f} % (goal <= 5 %)")

            base = load_phase(server, args.clients, args.seconds)
            sw = load_phase(server, args.clients, args.seconds, args.swaps)
            print(f"\n## Swaps under load ({args.clients} clients chatting without pause)")
            print("| phase | requests | failed | p50 s | p99 s | max s |\n| --- | ---: | ---: | ---: | ---: | ---: |")
            for name, r in (("no swaps", base), (f"{args.swaps} swaps", sw)):
                print(f"| {name} | {r['requests']} | {r['failed']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['max']:.3f} |")
            print(f"failed requests: {base['failed'] + sw['failed']} (goal 0); largest extra latency seen by a "
                  f"client: {max(0.0, sw['max'] - base['max']):.3f} s; one swap (load + hash + canary): "
                  f"p50 {_pct(sw['swap_s'], 0.5):.2f} s, max {max(sw['swap_s']):.2f} s")
            if sw["errors"]:
                print("errors:", sw["errors"])

            if not args.skip_training:
                from evolution import base as base_model

                hf = Path(tmp) / "hf"
                base_model.materialize(hf)
                rows = chat_during_training(server, hf, Path(tmp) / "train", args.seconds)
                print("\n## Chat latency while an age-up trains (1 client, 32-token replies)")
                print("| case | chats | p50 s | p99 s | training SFT steps/min |\n| --- | ---: | ---: | ---: | ---: |")
                for r in rows:
                    steps = "" if r["train_steps_per_min"] is None else f"{r['train_steps_per_min']:.1f}"
                    print(f"| {r['case']} | {r['chats']} | {r['chat_p50']:.3f} | {r['chat_p99']:.3f} | {steps} |")
                idle = rows[0]["chat_p50"]
                print("ratio to idle (p50): " + ", ".join(f"{r['case']} {r['chat_p50'] / idle:.2f}x" for r in rows[1:]))
        finally:
            server.stop()


if __name__ == "__main__":
    main()

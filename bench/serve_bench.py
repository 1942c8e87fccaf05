"""Serving benchmark: our server against llama-cpp-python, swaps under load, chat while training.

    python bench/serve_bench.py [--swaps 20] [--clients 4] [--skip-training]

All on the embedded SmolLM2-135M-Instruct GGUF, in one run, so every figure has its baseline:

1. **Throughput**: completion tokens/s of the same chat requests (temperature 0) through
   ``/v1/chat/completions`` with the official ``openai`` client, against ``Llama`` called
   directly. Goal: at most 5 % overhead.
2. **Chat during training**: one client's chat latency while idle, while a LoRA training
   process runs at normal priority, and while it runs at ``nice 10`` (what the daemon does),
   plus the training throughput in each case.
3. **Swaps under load**, once per ``--chat-threads`` (the daemon's default and all cores): one
   swap with nobody chatting, then ``--clients`` threads chat without pause; first a phase
   without swaps (baseline), then ``--swaps`` hot-swaps (``--all-core-swaps`` at another thread
   count; hash, load beside, canary between requests, switch) while they chat. Prints failed requests (goal 0), the largest extra
   latency a client saw (max latency during swaps − max latency without them; goal ≤ 100 ms)
   and the server's memory (peak RSS during the swaps against one model loaded).

Writes ``docs/bench/<date>-serve.md`` and ``.json`` (``bench/report.py``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

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

    def __init__(self, gguf: Path, chat_threads: int | None = None):
        self.port = _free_port()
        threads = ["--chat-threads", str(chat_threads)] if chat_threads else []
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.port), "--gguf", str(gguf)]
                                     + threads, stderr=subprocess.DEVNULL)
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

    def rss_mb(self) -> tuple[float, float]:
        """The server's resident memory now and its peak so far, MB (2**20 bytes)."""
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                      if ":" in line)
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(port: int, gguf: Path, chat_threads: int | None) -> None:
    """``--serve``: the server process (the daemon's app and model host, plus a swap trigger)."""
    import uvicorn

    from evolution.daemon import Daemon
    from evolution.server import create_app

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as home:
        dcfg = DaemonConfig(api_token="bench-token-0123456789")
        if chat_threads:
            dcfg.chat_threads = chat_threads
        daemon = Daemon(DataRoot(Path(home)), AgeUpConfig(), dcfg)
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
    cases = (("idle", None, None), ("training alone at nice 10, PASSIVE, no chat (the training's own pace)", 10,
                                    {"OMP_WAIT_POLICY": "PASSIVE"}), ("training at normal priority", 0, {}),
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
        while time.time() < t_end and "no chat" in label:
            time.sleep(0.5)
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
        if not lat:
            rows.append({"case": label, "chat_p50": None, "chat_p99": None, "chats": 0,
                         "train_steps_per_min": train_steps / seconds * 60})
            continue
        rows.append({"case": label, "chat_p50": _pct(lat, 0.5), "chat_p99": _pct(lat, 0.99), "chats": len(lat),
                     "train_steps_per_min": train_steps / seconds * 60 if proc else None})
    return rows


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def swaps_at(gguf: Path, threads: int, clients: int, seconds: float, swaps: int) -> dict:
    """A server with ``threads`` llama.cpp threads: one swap with nobody chatting, then ``clients`` chatting
    without pause, first without swaps (the baseline), then through ``swaps`` swaps; its memory throughout."""
    server = Server(gguf, threads)
    try:
        server.client.chat.completions.create(model="evolution", messages=PROMPT, max_tokens=8, temperature=0)
        rss_one, peak_one = server.rss_mb()
        idle_swap = server.swap(1)
        base = load_phase(server, clients, seconds)
        sw = load_phase(server, clients, seconds, swaps)
        rss_after, peak_swaps = server.rss_mb()
    finally:
        server.stop()
    return {"threads": threads, "idle_swap_s": idle_swap, "base": base, "swaps": sw,
            "extra_max_s": max(0.0, sw["max"] - base["max"]), "extra_p50_s": sw["p50"] - base["p50"],
            "rss_one_model_mb": rss_one, "peak_one_model_mb": peak_one, "peak_with_swaps_mb": peak_swaps,
            "rss_after_mb": rss_after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--runs", type=int, default=8, help="throughput requests per side")
    p.add_argument("--seconds", type=float, default=40.0, help="length of each load / training phase")
    p.add_argument("--chat-threads", type=int, action="append",
                   help="llama.cpp threads of the swap phases (repeatable) [default: the daemon's default and, "
                        "where different, all cores]")
    p.add_argument("--all-core-swaps", type=int, default=5,
                   help="swaps of a phase at another thread count than the default (the clients run on the same "
                        "cores, so each swap takes about a minute there on 2 cores)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-swaps", action="store_true")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gguf", type=Path, help="GGUF to serve [default: the embedded model]")
    args = p.parse_args()
    gguf = args.gguf or embedded_gguf()
    if args.serve:
        serve(args.serve, gguf, (args.chat_threads or [None])[0])
        return
    from evolution.serving import default_threads

    started, busy = time.time(), report.Contention()
    threads = args.chat_threads or sorted({default_threads(), os.cpu_count() or 1})
    model_mb = gguf.stat().st_size / 2**20
    body = [f"Model: `{gguf.name}` ({model_mb:.0f} MB), {os.cpu_count()} CPUs; llama.cpp threads "
            f"{default_threads()} by default (`[daemon] chat_threads`). Command: `python bench/serve_bench.py "
            + " ".join(sys.argv[1:]) + "`."]
    out: dict = {"model": gguf.name, "model_mb": model_mb}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        server = Server(gguf)
        try:
            tp = throughput(server, gguf, args.runs, 128)
            busy.tick()
            body += ["", "## Throughput (completion tokens/s, 128-token replies, temperature 0)", "",
                     "| path | tokens/s |", "| --- | ---: |",
                     f"| llama-cpp-python directly (baseline) | {tp['direct_tok_s']:.1f} |",
                     f"| our server + openai client | {tp['server_tok_s']:.1f} |", "",
                     f"Overhead: {tp['overhead_pct']:.1f} % (goal ≤ 5 %)."]
            out["throughput"] = tp
            print("\n".join(body), flush=True)
            shown = len(body)
            if not args.skip_training:
                from evolution import base as base_model

                hf = Path(tmp) / "hf"
                base_model.materialize(hf)
                rows = chat_during_training(server, hf, Path(tmp) / "train", args.seconds)
                busy.tick()
                idle = rows[0]["chat_p50"]
                body += ["", "## Chat latency while an age-up trains (1 client, 32-token replies)", "",
                         "| case | chats | p50 s | p99 s | p50 × idle | p99 × idle | training SFT steps/min |",
                         "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
                for r in rows:
                    steps = "" if r["train_steps_per_min"] is None else f"{r['train_steps_per_min']:.1f}"
                    if r["chats"]:
                        body.append(f"| {r['case']} | {r['chats']} | {r['chat_p50']:.3f} | {r['chat_p99']:.3f} | "
                                    f"{r['chat_p50'] / idle:.2f} | {r['chat_p99'] / rows[0]['chat_p99']:.2f} | "
                                    f"{steps} |")
                    else:
                        body.append(f"| {r['case']} | 0 | | | | | {steps} |")
                alone, beside = rows[1]["train_steps_per_min"], rows[-1]["train_steps_per_min"]
                body += ["", "Goal beside an age-up at the daemon's priorities (nice 10, PASSIVE): p50 ≤ 1.3 × and "
                         "p99 ≤ 2 × idle. The training's own slowdown beside the chats: "
                         + (f"{beside / alone:.2f} × its pace alone." if alone else "not measured (no step alone).")]
                out["chat_during_training"] = rows
                print("\n".join(body[shown:]), flush=True)
                shown = len(body)
        finally:
            server.stop()
    out["swaps"] = []
    for n in [] if args.skip_swaps else threads:
        swaps = args.swaps if n == default_threads() else args.all_core_swaps
        r = swaps_at(gguf, n, args.clients, args.seconds, swaps)
        busy.tick()
        out["swaps"].append(r)
        b, sw = r["base"], r["swaps"]
        body += ["", f"## Swaps under load: {args.clients} clients chatting without pause, {n} llama.cpp "
                 f"thread{'s' if n > 1 else ''}", "",
                 "| phase | requests | failed | p50 s | p99 s | max s |", "| --- | ---: | ---: | ---: | ---: | ---: |",
                 f"| no swaps (baseline) | {b['requests']} | {b['failed']} | {b['p50']:.3f} | {b['p99']:.3f} | "
                 f"{b['max']:.3f} |",
                 f"| {swaps} swaps | {sw['requests']} | {sw['failed']} | {sw['p50']:.3f} | {sw['p99']:.3f} | "
                 f"{sw['max']:.3f} |", "",
                 f"- failed requests: {b['failed'] + sw['failed']} (goal 0)",
                 f"- largest extra latency a client saw (max with swaps − max without): **{r['extra_max_s']:.3f} s** "
                 f"(goal ≤ 0.100 s); p50 {r['extra_p50_s'] * 1000:+.0f} ms",
                 f"- one swap (hash, load beside, canary between requests, switch): {r['idle_swap_s']:.2f} s with "
                 f"nobody chatting; under this load p50 {_pct(sw['swap_s'], 0.5):.2f} s, max {max(sw['swap_s']):.2f} s",
                 f"- memory (the server's RSS, MB): {r['rss_one_model_mb']:.0f} with one model loaded (peak "
                 f"{r['peak_one_model_mb']:.0f}); peak through the swaps {r['peak_with_swaps_mb']:.0f} "
                 f"(+{r['peak_with_swaps_mb'] - r['peak_one_model_mb']:.0f}: a second model's file is "
                 f"{model_mb:.0f} MB, plus its context); {r['rss_after_mb']:.0f} after them"]
        if sw["errors"]:
            body.append(f"- errors: {sw['errors']}")
        print("\n".join(body[shown:]), flush=True)
        shown = len(body)
    print(report.write("serve", "Serve bench: throughput, swaps under load, chat while training", body, out, busy,
                       started))


if __name__ == "__main__":
    main()

"""Ten generations in a row: does the tenth still know what the first learned, and at what cost?

    python bench/horizon_bench.py [--quick] [--generations 10] [--facts 10] [--chats 1000] [--home DIR] [--json F]

Plays a chat agent against the real daemon (``run_daemon.py --start-gen 0`` in a fresh data root, over
HTTP; chats through the official ``openai`` client) for ``--generations`` age-ups. Each round:

1. teaches ``--facts`` new invented facts (``learn_bench.teach``: transcripts, a few as corrections of
   the served model's own reply, some replies rated bad and good, paraphrase probes);
2. chats: asks the served model every earlier round's facts (temperature 0, 32 tokens, scored as the
   gate's recall) and fills up to ``--chats`` / generations chats with short small talk;
3. grants karma: the daemon ages up in its worker, gates, and swaps the child in (or keeps its parent).

Printed per generation as it goes (and written to ``--json`` after each): the verdict, the age-up's
wall time and stage seconds, the forgetting matrix row (recall of each earlier round's facts on the
model served after this age-up), curriculum recall and held-out perplexity against generation 0's (from
the gate's ``eval.json``), the data root's size, and the daemon process's resident memory (sampled every
second over the whole run, age-ups, chats and swaps included).

Targets (issue 17): generation N's age-up <= 1.2x generation 1's; the first round's facts at generation N
no more than 0.05 below their recall at generation 1; daemon memory growth <= 50 MB; held-out perplexity
within 10 % of generation 0's while recall holds. Like ``learn_bench`` it sets ``[gate] stop_after`` high
so the stop rule does not pause the run; every other setting is the default (or ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import daemon_args  # noqa: E402
from learn_bench import BAD_PROMPTS, GOOD_PROMPTS, THRESHOLD, Agent, facts, teach, wait_generation  # noqa: E402

from evolution import evals  # noqa: E402
from tests.daemon_util import DaemonProc  # noqa: E402

SMALL_TALK = ["Hello!", "How are you?", "Thanks!", "Good morning.", "What time is it?", "Tell me something nice.",
              "Bye for now.", "Are you busy?", "Nice weather today.", "What is your name?"]


class RssSampler:
    """The resident memory (MB) of one process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 1.0):
        self.proc, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set():
            try:
                self.samples.append((time.time() - t0, self.proc.memory_info().rss / 2**20))
            except psutil.Error:
                return
            self.stop.wait(self.interval)

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def peak(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def ask_all(agent: Agent, qs: list[dict]) -> float:
    """Recall of ``qs`` on the served model, through the daemon (temperature 0, 32 tokens, the gate's scoring)."""
    correct = 0
    for q in qs:
        r = agent.chat.chat.completions.create(model="evolution", temperature=0.0, max_tokens=32,
                                               messages=[{"role": "user", "content": q["question"]}])
        correct += evals.is_correct(r.choices[0].message.content or "", q["answers"])
    return correct / len(qs) if qs else 0.0


def small_talk(agent: Agent, n: int, start: int) -> None:
    for i in range(n):
        agent.chat.chat.completions.create(model="evolution", max_tokens=8,
                                           messages=[{"role": "user", "content": SMALL_TALK[(start + i) % 10]}])


def metric(ev: dict, side: str, name: str) -> float | None:
    return ((ev.get(side) or {}).get("metrics") or {}).get(name)


def items(batch: list[dict]) -> list[dict]:
    """The facts' questions as taught, as recall items."""
    return [{"id": f["id"], "question": f["question"], "answers": f["answers"]} for f in batch]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="quick age-ups (the daemon's --quick setting)")
    ap.add_argument("--generations", type=int, default=10, help="age-ups in a row")
    ap.add_argument("--facts", type=int, default=10, help="new facts taught per round")
    ap.add_argument("--bad", type=int, default=8, help="replies rated bad per round")
    ap.add_argument("--good", type=int, default=6, help="replies rated good per round")
    ap.add_argument("--chats", type=int, default=1000, help="chats over the whole run (recall questions included)")
    ap.add_argument("--home", type=Path, default=None, help="data root (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here (after every generation)")
    daemon_args.add(ap)
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="horizon-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "evolution.toml").write_text(daemon_args.toml(args))
    n = args.generations
    all_facts = facts(args.facts * n, seed=17)
    rounds = [all_facts[r * args.facts:(r + 1) * args.facts] for r in range(n)]
    d = DaemonProc(home, "--start-gen", "0", "--threshold", str(THRESHOLD), *(["--quick"] if args.quick else []),
                   *daemon_args.options(args))
    d.start()
    report: dict = {"quick": args.quick, "generations": n, "facts": args.facts, "rows": []}
    chats = swaps = 0
    sampler = None
    try:
        d.wait_serving(0, timeout=1800)
        sampler = RssSampler(d.proc.pid)
        sampler.thread.start()
        agent = Agent(d)
        ckpt = home / "checkpoints"
        ev0 = json.loads((ckpt / "gen_0000" / "eval.json").read_text())
        report["gen0"] = {"perplexity": metric(ev0, "child", "perplexity"), "recall": metric(ev0, "child", "recall"),
                          "rss_mb": round(sampler.now(), 1), "data_root_mb": round(dir_mb(home), 1)}
        print(f"gen 0: {json.dumps(report['gen0'])}", flush=True)
        served = 0
        for r, batch in enumerate(rounds):
            child = r + 1
            t0 = time.time()
            counts = teach(agent, batch, (BAD_PROMPTS * 3)[r * 3 % len(BAD_PROMPTS):][:args.bad],
                           (GOOD_PROMPTS * 2)[r % len(GOOD_PROMPTS):][:args.good])
            chats += counts["correction"] + counts["bad"] + counts["good"]
            teach_s = time.time() - t0
            t0 = time.time()
            agent.post("/karma", {"amount": THRESHOLD, "reason": f"horizon bench round {child}"})
            summary = wait_generation(d, child, timeout=3600)
            wall = time.time() - t0
            ev = json.loads((ckpt / f"gen_{child:04d}" / "eval.json").read_text())
            before, served = served, d.served()
            swaps += served != before
            # the forgetting matrix row: every round taught so far, on the model now served
            t0 = time.time()
            row_recall = [ask_all(agent, items(rounds[k])) for k in range(child)]
            chats += args.facts * child
            per_round = max(0, args.chats // n - args.facts * child - counts["correction"] - counts["bad"]
                            - counts["good"])
            small_talk(agent, per_round, r)
            chats += per_round
            chat_s = time.time() - t0
            ppl, ppl0 = metric(ev, "child", "perplexity"), report["gen0"]["perplexity"]
            rss = sampler.now()
            row = {
                "gen": child, "verdict": ev["verdict"], "reasons": ev["reasons"], "served": served,
                "ageup_wall_s": round(wall, 1), "ageup_stage_s": round(sum(summary["stage_seconds"].values()), 1),
                "stage_seconds": {k: round(v, 1) for k, v in summary["stage_seconds"].items()},
                "sft_steps": summary["train"].get("sft", {}).get("steps"),
                "recall_by_round": [round(x, 3) for x in row_recall],
                "curriculum_recall": metric(ev, "child", "recall"), "perplexity": ppl,
                "perplexity_vs_gen0": round(ppl / ppl0, 3) if ppl and ppl0 else None,
                "data_root_mb": round(dir_mb(home), 1), "rss_mb": round(rss, 1),
                "rss_peak_mb": round(max(sampler.peak(), rss), 1), "chats": chats, "swaps": swaps,
                "teach_s": round(teach_s, 1), "chat_s": round(chat_s, 1),
            }
            report["rows"].append(row)
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
            print(line(row), flush=True)
    finally:
        if sampler is not None:
            sampler.stop.set()
            report["rss_samples_mb"] = [round(mb, 1) for _, mb in sampler.samples[::10]]
        d.stop()
        report["summary"] = verdicts(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    print(matrix(report["rows"]))
    print(json.dumps(report["summary"], indent=1))


def line(row: dict) -> str:
    stages = " ".join(f"{k}={v:.0f}" for k, v in row["stage_seconds"].items())
    ppl = "-" if row["perplexity"] is None else f"{row['perplexity']:.2f} ({row['perplexity_vs_gen0']:.3f}x gen 0)"
    return (f"gen {row['gen']}: {row['verdict']} (served {row['served']}) age-up {row['ageup_wall_s']:.0f} s wall, "
            f"{row['ageup_stage_s']:.0f} s in stages [{stages}]; recall by round {row['recall_by_round']}; "
            f"curriculum recall {row['curriculum_recall']}; perplexity {ppl}; data root {row['data_root_mb']:.0f} MB; "
            f"daemon RSS {row['rss_mb']:.0f} MB (peak {row['rss_peak_mb']:.0f}); {row['chats']} chats, "
            f"{row['swaps']} swaps" + (f"; reasons: {row['reasons']}" if row["reasons"] else ""))


def matrix(rows: list[dict]) -> str:
    """The forgetting matrix: a row per generation served after each age-up, a column per round's facts."""
    if not rows:
        return "(no generation finished)"
    n = len(rows)
    out = ["\nforgetting matrix (recall of round k's facts on the model served after age-up g)",
           "   g " + " ".join(f"r{k + 1:>4}" for k in range(n))]
    for row in rows:
        out.append(f"{row['gen']:>4} " + " ".join(f"{x:>5.2f}" for x in row["recall_by_round"]))
    return "\n".join(out)


def verdicts(report: dict) -> dict:
    """The issue's targets against what was measured (over the generations completed)."""
    rows = report["rows"]
    if not rows:
        return {"generations_completed": 0}
    first, last = rows[0], rows[-1]
    rss = report.get("rss_samples_mb") or [0.0]
    ppls = [r["perplexity_vs_gen0"] for r in rows if r["perplexity_vs_gen0"] is not None]
    return {
        "generations_completed": len(rows),
        "ageup_ratio_last_vs_first": round(last["ageup_wall_s"] / first["ageup_wall_s"], 3),
        "ageup_stage_ratio_last_vs_first": round(last["ageup_stage_s"] / first["ageup_stage_s"], 3),
        "first_round_recall_first_last": [first["recall_by_round"][0], last["recall_by_round"][0]],
        "first_round_drop": round(first["recall_by_round"][0] - last["recall_by_round"][0], 3),
        # the peak of every sample (two models during a swap), not of the thinned list kept in the JSON
        "rss_first_last_peak_mb": [rss[0], rss[-1], max([*rss, *(r["rss_peak_mb"] for r in rows)])],
        "rss_growth_mb": round(rss[-1] - rss[0], 1),
        "perplexity_vs_gen0_max": max(ppls) if ppls else None,
        "perplexity_vs_gen0_last": ppls[-1] if ppls else None,
        "data_root_mb_first_last": [report["gen0"]["data_root_mb"], last["data_root_mb"]],
        "chats": last["chats"], "swaps": last["swaps"],
        "rejected": [r["gen"] for r in rows if r["verdict"] != "pass"],
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench still stops its daemon
    main()

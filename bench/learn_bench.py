"""Does a fact the chat agent's user told it reach the next generation, asked differently, and stay?

    python bench/learn_bench.py [--quick] [--facts 20] [--rounds 4] [--variants N] [--home DIR]

Plays a chat agent against the real daemon (``run_daemon.py --start-gen 0`` in a fresh data root,
through its HTTP API, chats with the official ``openai`` client):

1. teaches ``--facts`` invented facts (names, places, favourites no pre-training holds): most as posted
   transcripts (``POST /conversations``), some as corrections of the served model's own wrong reply
   (``POST /feedback`` bad + ``correction``); rates 20 other replies bad and 10 good (``--good``: without
   good ones the held-out share of the ratings has no good reply to measure a margin on); posts two paraphrased probes
   per fact (``POST /probes``: never trained on);
2. grants karma up to the threshold (``POST /karma``): the daemon ages up in its worker (the default
   setting, or ``--quick``) and promotes or rejects the child;
3. prints, child against parent: exact question recall (each reply from the GGUF through llama.cpp at
   temperature 0, 32 tokens, scored as the gate's recall: ``evals.is_correct``), paraphrase recall (the
   gate's own ``probe_recall`` replies to this round's probes, 64 tokens), ``preference_margin`` and
   curriculum ``recall`` (all three from the child's ``eval.json``), and the age-up
   time (the generation's stage seconds, and the wall time from the karma grant to the verdict);
4. repeats with other facts for ``--rounds`` - 1 more age-ups and prints the first round's facts'
   recall after each.

Targets (issue 15): after one default age-up exact recall >= 90 %, paraphrase recall >= 60 %, curriculum
recall no more than 0.02 below the parent, age-up time <= 1.2x the default without experience variants
(``--variants 0`` measures that); after three more age-ups the first facts still >= 80 %.
The bench sets ``[gate] stop_after`` high so that later rounds are not paused by the stop rule (which
pauses after two children that do not raise curriculum recall); nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evolution import evals  # noqa: E402
from tests.daemon_util import DaemonProc  # noqa: E402

THRESHOLD = 100

# (question, statement, paraphrases) per kind; {s} the subject, {x} the invented answer.
KINDS = {
    "called": ("What is my {s} called?", "Your {s} is called {x}.",
               ("Do you remember the name I gave my {s}?", "My {s} has a name. Which one?")),
    "person": ("What is my {s}'s name?", "Your {s}'s name is {x}.",
               ("Who is my {s}?", "Can you recall what my {s} is named?")),
    "place": ("Where do I go {s}?", "You go {s} in {x}.",
              ("In which town do I go {s}?", "Which place do I visit when I go {s}?")),
    "favourite": ("What is my favourite {s}?", "Your favourite {s} is {x}.",
                  ("Which {s} do I like best?", "Do you recall the {s} I love most?")),
}
SUBJECTS = {
    "called": ["dog", "cat", "parrot", "horse", "goldfish", "tortoise", "rabbit", "hamster", "boat", "car", "bicycle",
               "guitar", "houseplant", "robot vacuum", "laptop", "teddy bear", "canoe", "garden gnome", "kite", "van",
               "tractor", "sailboat", "lamp", "telescope", "armchair"],
    "person": ["sister", "brother", "best friend", "boss", "neighbour", "landlord", "dentist", "piano teacher",
               "cousin", "grandmother", "grandfather", "nephew", "niece", "accountant", "plumber", "yoga teacher",
               "barber", "godmother", "roommate", "coach", "aunt", "uncle", "godfather", "tailor", "mechanic"],
    "place": ["swimming", "hiking", "fishing", "skiing", "dancing", "climbing", "sailing", "camping", "shopping",
              "running", "cycling", "skating", "rowing", "surfing", "birdwatching", "bowling", "kayaking", "diving",
              "jogging", "stargazing", "golfing", "sledging", "picnicking", "gardening", "horse riding"],
    "favourite": ["tea", "colour", "song", "book", "dessert", "cheese", "flower", "board game", "soup", "pastry",
                  "film", "spice", "fruit", "bird", "tree", "perfume", "sweet", "painter", "poem", "hat",
                  "biscuit", "vegetable", "scarf", "holiday", "instrument"],
}
SYLLABLES = ["bra", "quo", "vel", "thar", "miz", "orn", "ule", "ka", "dre", "yss", "fen", "gol", "rhi", "tav", "zem",
             "lun", "pex", "sor", "vin", "drak", "moe", "tir", "aph", "kel", "wyn", "ost", "rue", "bel", "nox", "ith"]
BAD_PROMPTS = ["Say something about the weather.", "Tell me a joke.", "Describe a sunset.", "Give me a tip for sleep.",
               "What should I cook tonight?", "Write one line about the sea.", "How do I fold a shirt?",
               "Suggest a name for a band.", "What is a good habit?", "Describe a forest.", "Tell me about rain.",
               "How do I stay calm?", "Give me a riddle.", "What is a fun hobby?", "Describe your ideal day.",
               "Say something kind.", "How do I water plants?", "Write a short greeting.", "What is patience?",
               "Describe a city at night.", "Tell me about snow.", "What makes a good friend?"]


GOOD_PROMPTS = ["What is your name?", "Who made you?", "Hello!", "Thank you!", "Good morning!", "Who are you?",
                "Are you there?", "Can you help me?", "Good night!", "How are you today?"]


def facts(n_total: int, seed: int = 0) -> list[dict]:
    """``n_total`` invented facts, kinds interleaved, each with its question, answer, statement and paraphrases."""
    if n_total > (capacity := sum(len(SUBJECTS[k]) for k in KINDS)):
        # a subject asked twice is an updated fact, and the rounds' forgetting matrix would read it as forgotten
        raise ValueError(f"{n_total} facts asked for; only {capacity} have a subject of their own")
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    for i in range(n_total):
        kind = list(KINDS)[i % len(KINDS)]
        subject = SUBJECTS[kind][(i // len(KINDS)) % len(SUBJECTS[kind])]
        while (x := "".join(rng.sample(SYLLABLES, rng.choice((2, 3)))).capitalize()) in names:
            pass
        names.add(x)
        q, statement, paras = KINDS[kind]
        out.append({"id": f"fact-{i}", "question": q.format(s=subject), "answer": x,
                    "statement": statement.format(s=subject, x=x), "paraphrases": [p.format(s=subject) for p in paras]})
    return out


class Agent:
    """The chat agent: the daemon's HTTP API with its token, chats through the official openai client."""

    def __init__(self, daemon: DaemonProc):
        self.d = daemon
        self.chat = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.token, max_retries=2, timeout=120)

    def post(self, path: str, body: dict) -> dict:
        r = httpx.post(self.d.url + path, json=body, headers=self.d.auth(), timeout=120)
        r.raise_for_status()
        return r.json()

    def ask(self, question: str) -> openai.types.chat.ChatCompletion:
        return self.chat.chat.completions.create(model="evolution", temperature=0.0, max_tokens=48,
                                                 messages=[{"role": "user", "content": question}])


def teach(agent: Agent, batch: list[dict], bad_prompts: list[str], corrections: int, good_prompts: list[str]) -> dict:
    """Transcripts for most facts, a correction for the last ``corrections``; bad and good ratings; paraphrase
    probes."""
    counts = {"transcripts": 0, "corrections": 0, "bad": 0, "good": 0, "probes": 0}
    for i, f in enumerate(batch):
        if i >= len(batch) - corrections:
            reply = agent.ask(f["question"])
            agent.post("/feedback", {"completion_id": reply.id, "label": "bad", "correction": f["statement"]})
            counts["corrections"] += 1
        else:
            agent.post("/conversations", {"messages": [{"role": "user", "content": f["question"]},
                                                       {"role": "assistant", "content": f["statement"]}]})
            counts["transcripts"] += 1
        for p in f["paraphrases"]:
            agent.post("/probes", {"question": p, "answers": [f["answer"]]})
            counts["probes"] += 1
    for prompt in bad_prompts:
        agent.post("/feedback", {"completion_id": agent.ask(prompt).id, "label": "bad"})
        counts["bad"] += 1
    for prompt in good_prompts:
        agent.post("/feedback", {"completion_id": agent.ask(prompt).id, "label": "good"})
        counts["good"] += 1
    return counts


def wait_generation(d: DaemonProc, gen: int, timeout: float) -> dict:
    """The child's generation.json once finished and decided (served, or rejected and the parent kept)."""
    path = d.home / "checkpoints" / f"gen_{gen:04d}" / "generation.json"
    d.wait(path.is_file, timeout, f"generation {gen} to be built", interval=2)
    summary = json.loads(path.read_text())
    if json.loads((path.parent / "eval.json").read_text())["verdict"] == "pass":
        d.wait_serving(gen, timeout=300)
    return summary


def recall(gguf: Path, items: list[dict]) -> tuple[float, list]:
    from evolution.llamacpp import open_llama  # the one Llama(...) the gate uses

    llm = open_llama(gguf, n_ctx=1024, seed=0)
    try:
        return evals.recall(llm, items, max_tokens=32)
    finally:
        llm.close()


def probes(measured: dict, batch: list[dict]) -> tuple[float | None, list]:
    """Paraphrase recall of ``batch`` as the gate measured it (``probe_recall`` asks every probe posted so far,
    at temperature 0, scored as recall), from one side (child or parent) of ``eval.json``."""
    asked = {evals.normalize(q["question"]) for q in items(batch, True)}
    got = [evals.ItemResult(i["id"], i["question"], i["reply"], i["correct"])
           for i in (measured["details"].get("probe_recall") or {}).get("items", [])
           if evals.normalize(i["question"]) in asked]
    return (sum(g.correct for g in got) / len(got) if got else None), got


def items(batch: list[dict], paraphrased: bool) -> list[dict]:
    if not paraphrased:
        return [{"id": f["id"], "question": f["question"], "answers": [f["answer"]]} for f in batch]
    return [{"id": f"{f['id']}-p{j}", "question": p, "answers": [f["answer"]]}
            for f in batch for j, p in enumerate(f["paraphrases"])]


def trained_questions(gen_dir: Path) -> set[str]:
    rows = [json.loads(line) for line in (gen_dir / "data" / "sft.jsonl").read_text().splitlines() if line.strip()]
    return {evals.normalize(m["content"]) for r in rows for m in r["messages"] if m["role"] == "user"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="quick age-ups (a check of the bench, not a figure)")
    ap.add_argument("--facts", type=int, default=20, help="facts taught per age-up")
    ap.add_argument("--rounds", type=int, default=4, help="age-ups, each with new facts")
    ap.add_argument("--corrections", type=int, default=6, help="facts per round taught as corrections")
    ap.add_argument("--bad", type=int, default=20, help="replies rated bad per round")
    ap.add_argument("--good", type=int, default=10, help="replies rated good per round (so that the held-out share "
                    "of the ratings has both labels and preference_margin is measured)")
    ap.add_argument("--variants", type=int, default=None,
                    help="[curriculum] experience_variants (default: the config's; 0 measures the age-up without)")
    ap.add_argument("--home", type=Path, default=None, help="data root (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="learn-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    toml = "[gate]\nstop_after = 1000\n"
    if args.variants is not None:
        toml += f"[curriculum]\nexperience_variants = {args.variants}\n"
    (home / "evolution.toml").write_text(toml)
    all_facts = facts(args.facts * args.rounds)
    rounds = [all_facts[r * args.facts:(r + 1) * args.facts] for r in range(args.rounds)]
    bad = BAD_PROMPTS * (args.bad // len(BAD_PROMPTS) + 2)  # each round starts 3 further on
    d = DaemonProc(home, "--start-gen", "0", "--threshold", str(THRESHOLD), *(["--quick"] if args.quick else []))
    d.start()
    report: dict = {"quick": args.quick, "facts": args.facts, "rounds": []}
    try:
        d.wait_serving(0, timeout=2400)  # generation 0 is built and measured at nice 10: slow beside other jobs
        agent = Agent(d)
        ckpt = home / "checkpoints"
        for r, batch in enumerate(rounds):
            child = r + 1
            t0 = time.time()
            counts = teach(agent, batch, bad[r * 3 % len(BAD_PROMPTS):][:args.bad], args.corrections,
                           (GOOD_PROMPTS * (args.good // len(GOOD_PROMPTS) + 1))[:args.good])
            print(f"round {child}: taught {counts} in {time.time() - t0:.0f} s", flush=True)
            t0 = time.time()
            agent.post("/karma", {"amount": THRESHOLD, "reason": f"learn bench round {child}"})
            summary = wait_generation(d, child, timeout=3600)
            wall = time.time() - t0
            parent = summary["parent"]  # the generation served when it aged up (not child - 1 after a rejection)
            ev = json.loads((ckpt / f"gen_{child:04d}" / "eval.json").read_text())
            served = d.served()
            cgguf = ckpt / f"gen_{child:04d}" / "model.gguf"
            exact_c, exact_res = recall(cgguf, items(batch, False))
            exact_p, _ = recall(ckpt / f"gen_{parent:04d}" / "model.gguf", items(batch, False))
            para_c, para_res = probes(ev["child"], batch)
            para_p, _ = probes(ev["parent"], batch)
            first_now = (exact_c if served == child else exact_p) if r == 0 else \
                recall(ckpt / f"gen_{served:04d}" / "model.gguf", items(rounds[0], False))[0]
            first_para = probes(ev["child"] if served == child else ev["parent"], rounds[0])[0]
            leaked = sum(evals.normalize(i["question"]) in trained_questions(ckpt / f"gen_{child:04d}")
                         for i in items(batch, True))
            manifest = json.loads((ckpt / f"gen_{child:04d}" / "data" / "manifest.json").read_text())
            heldout = ckpt / f"gen_{child:04d}" / "data" / "preference_heldout.jsonl"
            held_facts = sum(f["statement"] in heldout.read_text() for f in batch) if heldout.is_file() else 0
            row = {
                "round": child, "parent": parent, "verdict": ev["verdict"], "reasons": ev["reasons"], "served": served,
                "exact": {"child": exact_c, "parent": exact_p}, "paraphrase": {"child": para_c, "parent": para_p},
                "curriculum_recall": {"child": ev["child"]["metrics"]["recall"],
                                      "parent": ev["parent"]["metrics"]["recall"]},
                "preference_margin": {"child": ev["child"]["metrics"].get("preference_margin"),
                                      "parent": ev["parent"]["metrics"].get("preference_margin")},
                "probe_recall": {"child": ev["child"]["metrics"].get("probe_recall"),
                                 "parent": ev["parent"]["metrics"].get("probe_recall")},
                "experience_similarity": {"child": ev["child"]["metrics"].get("experience_similarity"),
                                          "parent": ev["parent"]["metrics"].get("experience_similarity")},
                "ageup_stage_s": round(sum(summary["stage_seconds"].values()), 1),
                "stage_seconds": summary["stage_seconds"], "ageup_wall_s": round(wall, 1),
                "sft_steps": summary["train"].get("sft", {}).get("steps"),
                "train_stages": {k: {f: v.get(f) for f in ("steps", "tokens", "wall_s")}
                                 for k, v in summary["train"].items() if isinstance(v, dict)},
                "sft_records": manifest["counts"].get("sft"), "variants": manifest.get("variants", {}).get("sft"),
                "facts_held_out": held_facts, "probes_in_training_data": leaked,
                "first_round_exact_on_served": first_now, "first_round_paraphrase_on_served": first_para,
                "missed_exact": [f"{x.question} -> {x.reply[:60]!r}" for x in exact_res if not x.correct],
                "missed_paraphrase": [f"{x.question} -> {x.reply[:60]!r}" for x in para_res if not x.correct][:10],
            }
            report["rounds"].append(row)
            if args.json:  # after every round: a long run stopped early keeps what it measured
                args.json.write_text(json.dumps(report, indent=1))
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("missed")}), flush=True)
            print("  missed exact:", *row["missed_exact"], sep="\n    ", flush=True)
            print("  missed paraphrase (first 10):", *row["missed_paraphrase"], sep="\n    ", flush=True)
    finally:
        d.stop()
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    print(table(report["rounds"]))


def table(rows: list[dict]) -> str:
    """The rounds, child/parent side by side."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"\n{'round':>5} {'verdict':>7} {'exact c/p':>11} {'para c/p':>11} {'curric c/p':>11} "
             f"{'pref margin c/p':>17} {'stage s':>8} {'wall s':>7} {'1st exact':>9} {'1st para':>8}"]
    for row in rows:
        cp = lambda k: f"{fmt(row[k]['child'])}/{fmt(row[k]['parent'])}"  # noqa: E731
        lines.append(f"{row['round']:>5} {row['verdict']:>7} {cp('exact'):>11} {cp('paraphrase'):>11} "
                     f"{cp('curriculum_recall'):>11} {cp('preference_margin'):>17} {row['ageup_stage_s']:>8.0f} "
                     f"{row['ageup_wall_s']:>7.0f} {fmt(row['first_round_exact_on_served']):>9} "
                     f"{fmt(row['first_round_paraphrase_on_served']):>8}")
    return "\n".join(lines)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench still stops its daemon
    main()

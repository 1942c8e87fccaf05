"""Does a fact the chat agent's user told it reach the next generation, asked in words nobody trained on, and stay?

    python bench/learn_bench.py [--quick] [--facts 24] [--rounds 4] [--home DIR]
    python bench/learn_bench.py --ablation [--quick] [--rows 1,2]  # one round per component switched off
    python bench/learn_bench.py --tokenizer N [--rounds 1] # the lineage's own tokenizer against the base's

Plays a chat agent against the real daemon (``run_daemon.py --start-gen 0`` in a fresh data root, through its HTTP
API, chats with the official ``openai`` client). The facts come from ``bench/learn_facts.json``: eight kinds (people's
names, names of things and pets, places, dates, numbers, preferences, work and possessions, habits), each taught in one
wording and asked in three or four others that no training code reads (a test fails if one of them reaches a
training file or ``evolution.augment``'s output).

1. teaches ``--facts`` invented facts per round, a third through each channel: a **correction** of the served
   model's own wrong reply (``POST /feedback`` bad + ``correction``), a **transcript rated good** (``POST
   /conversations`` with ``label: good``) and an **unrated transcript**; rates 20 other replies bad and 10 good;
   posts every held-out wording as a probe (``POST /probes``: the gate asks probes, nothing trains on them);
2. grants karma up to the threshold: the daemon ages up (default settings, or ``--quick``) and serves or rejects;
3. reports, child against parent: recall asked as taught (the GGUF through llama.cpp at temperature 0) and in the
   held-out wordings (the gate's own ``probe_recall`` replies), per kind and per channel; persona leaks and "I don't
   know" replies (the gate's ``persona_leak``); curriculum and identity recall, perplexity, and the age-up's time;
4. repeats with new facts for ``--rounds`` - 1 more age-ups and reports the first round's facts on the served model.

Targets (issue 27), after one default age-up: as taught >= 0.95; held-out wordings >= 0.90 for corrections and
transcripts rated good, >= 0.80 for unrated transcripts; persona leaks <= 0.02 and no more than the parent; identity
recall within 0.02 of the parent; the first round's facts >= 0.95 three age-ups later.

``--ablation`` runs one round per row of ``ABLATION`` (the full method, then each component off, then the variants
of issue 15 alone), each from its own generation 0, and writes the table of their effect on held-out recall, leaks
and age-up time; ``--rows`` runs some of them (numbered from 1, "full" first: keep it, it is the baseline). ``--tokenizer N`` runs a lineage whose generation 0 ``evolve tokenizer extend --tokens N`` built
beside one on the base tokenizer, in one run, and reports tokens per word of the curriculum and of the chats the
bench posted, under both tokenizers (held-out perplexity is per token, so it does not compare across them).
Reports go to ``docs/bench/<date>-learn.md`` (or ``-learn-ablation``, ``-learn-tokenizer``) and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import daemon_args  # noqa: E402
from report import Contention, write  # noqa: E402

from evolution import evals  # noqa: E402
from tests.daemon_util import DaemonProc  # noqa: E402

THRESHOLD = 100
FACTS_FILE = Path(__file__).resolve().parent / "learn_facts.json"
CHANNELS = ("correction", "rated", "unrated")
CHANNEL_LABELS = {"correction": "correction", "rated": "transcript rated good", "unrated": "unrated transcript"}

BAD_PROMPTS = ["Say something about the weather.", "Tell me a joke.", "Describe a sunset.", "Give me a tip for sleep.",
               "What should I cook tonight?", "Write one line about the sea.", "How do I fold a shirt?",
               "Suggest a name for a band.", "What is a good habit?", "Describe a forest.", "Tell me about rain.",
               "How do I stay calm?", "Give me a riddle.", "What is a fun hobby?", "Describe your ideal day.",
               "Say something kind.", "How do I water plants?", "Write a short greeting.", "What is patience?",
               "Describe a city at night.", "Tell me about snow.", "What makes a good friend?"]
GOOD_PROMPTS = ["What is your name?", "Who made you?", "Hello!", "Thank you!", "Good morning!", "Who are you?",
                "Are you there?", "Can you help me?", "Good night!", "How are you today?"]

ABLATION: list[tuple[str, str, str]] = [
    # (row, what is switched off, [curriculum] settings of that row)
    ("full", "nothing: the default settings", ""),
    ("no restatements", "the fact's question re-asked in other shapes and its value asked back",
     "fact_forms = false\n"),
    ("no contrast", "the agent's own facts set beside the user's; questions about the user nobody answered",
     "who_is_who = 0\n"),
    ("issue 15's variants only", "all of the above (framings of the taught question only)",
     "fact_forms = false\nwho_is_who = 0\n"),
    ("no variants", "every variant (the taught exchange alone)", "experience_variants = 0\nwho_is_who = 0\n"),
]

_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
          10: "ten", 11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen", 16: "sixteen",
          17: "seventeen", 18: "eighteen", 19: "nineteen"}
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}


def number_words(n: int) -> str:
    if n < 20:
        return _WORDS[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_WORDS[ones]}" if ones else "")


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def load_table(path: Path = FACTS_FILE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _value(kind: str, table: dict, rng: random.Random, used: set[str]) -> tuple[str, list[str]]:
    """An invented value no pre-training holds (and no persona fact: 47 and March 3rd are the persona's), with the
    answers that count as right."""
    while True:
        if kind in ("name", "place"):
            x = "".join(rng.sample(table["syllables"], rng.choice((2, 3)))).capitalize()
            answers = [x]
        elif kind == "date":
            month, day = rng.choice(table["months"]), rng.randint(4, 28)
            x = f"{day} {month}"
            answers = [f"{day} {month}", f"{month} {day}", f"{_ordinal(day)} {month}", f"{month} {_ordinal(day)}",
                       f"{_ordinal(day)} of {month}"]
        elif kind == "number":
            n = rng.choice([k for k in range(11, 99) if k != 47 and k % 10])
            x, answers = str(n), [str(n), number_words(n)]
        elif kind == "activity":
            x, answers = rng.choice(table["activities"])
        else:
            raise ValueError(f"unknown value kind {kind!r} in {FACTS_FILE.name}")
        if x not in used:
            used.add(x)
            return x, list(answers)


def facts(n_total: int, seed: int = 0, table: dict | None = None) -> list[dict]:
    """``n_total`` invented facts, the kinds interleaved (and the teaching channels, so that every kind is taught
    through every channel), each with its question, statement, answers and held-out wordings."""
    table = table or load_table()
    kinds = list(table["kinds"])
    slots = {k: [(form, s) for form in table["kinds"][k]["forms"] for s in form["subjects"]] for k in kinds}
    for k in kinds:  # alternate a kind's forms: its first facts cover each of them
        forms = table["kinds"][k]["forms"]
        slots[k] = [(f, s) for group in zip(*[[(f, s) for s in f["subjects"]] for f in forms]) for f, s in group]
    if n_total > (capacity := len(kinds) * min(len(v) for v in slots.values())):
        # a subject asked twice is an updated fact, and the rounds' forgetting matrix would read it as forgotten
        raise ValueError(f"{n_total} facts asked for; only {capacity} have a subject of their own")
    rng = random.Random(seed)
    used: set[str] = set()
    out = []
    for i in range(n_total):
        kind = kinds[i % len(kinds)]
        form, subject = slots[kind][i // len(kinds)]
        x, answers = _value(form["value"], table, rng, used)
        fill = lambda t: t.format(s=subject, x=x)  # noqa: E731
        out.append({"id": f"fact-{i}", "kind": kind, "channel": CHANNELS[i % len(CHANNELS)],
                    "question": fill(form["question"]), "statement": fill(form["statement"]), "answers": answers,
                    "heldout": [fill(h) for h in form["heldout"]]})
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


def teach_fact(agent: Agent, f: dict) -> None:
    """One fact through its channel: a correction of the served model's reply, or a transcript (rated good or not)."""
    if f["channel"] == "correction":
        reply = agent.ask(f["question"])
        agent.post("/feedback", {"completion_id": reply.id, "label": "bad", "correction": f["statement"]})
    else:
        body = {"messages": [{"role": "user", "content": f["question"]},
                             {"role": "assistant", "content": f["statement"]}]}
        agent.post("/conversations", body | ({"label": "good"} if f["channel"] == "rated" else {}))


def teach(agent: Agent, batch: list[dict], bad_prompts: list[str], good_prompts: list[str]) -> dict:
    """Each fact through its channel; bad and good ratings of other replies; the held-out wordings as probes."""
    counts = {c: 0 for c in CHANNELS} | {"bad": 0, "good": 0, "probes": 0}
    for f in batch:
        teach_fact(agent, f)
        counts[f["channel"]] += 1
        for h in f["heldout"]:
            agent.post("/probes", {"question": h, "answers": f["answers"]})
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


def ask_as_taught(gguf: Path, batch: list[dict]) -> dict[str, dict]:
    """Each fact's question as taught, asked of ``gguf`` as the gate asks (llama.cpp, temperature 0, 32 tokens)."""
    from evolution.llamacpp import open_llama  # the one Llama(...) the gate uses

    llm = open_llama(gguf, n_ctx=1024, seed=0)
    try:
        _, res = evals.recall(llm, [{"id": f["id"], "question": f["question"], "answers": f["answers"]}
                                    for f in batch], max_tokens=32)
    finally:
        llm.close()
    return {r.id: {"reply": r.reply, "correct": r.correct} for r in res}


def heldout_replies(measured: dict, batch: list[dict]) -> dict[str, list[dict]]:
    """Per fact, the gate's replies to its held-out wordings (``probe_recall`` asks every probe, at temperature 0),
    from one side (child or parent) of ``eval.json``."""
    by_q = {evals.normalize(i["question"]): i for i in (measured["details"].get("probe_recall") or {}).get("items", [])}
    return {f["id"]: [by_q[evals.normalize(h)] for h in f["heldout"] if evals.normalize(h) in by_q] for f in batch}


def _share(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def heldout_with_retrieval(ev: dict, batch: list[dict]) -> dict | None:
    """The gate's figure with retrieval (``evolution.retrieval.figure``, for information) on this round's held-out
    wordings: the share right with the notes chat would add once the child is served, and on the weights alone."""
    fig = ev.get("retrieval") or {}
    rows = {evals.normalize(i["question"]): i for i in fig.get("items", [])}
    mine = [rows[evals.normalize(h)] for f in batch for h in f["heldout"] if evals.normalize(h) in rows]
    if not mine:
        return None
    return {"with": _share([i["correct"] for i in mine]), "without": _share([i["without"] for i in mine]),
            "with_notes": sum(bool(i["notes"]) for i in mine), "asked": len(mine), "seconds": fig.get("seconds")}


def breakdown(batch: list[dict], taught: dict[str, dict], heldout: dict[str, list[dict]], table: dict) -> dict:
    """Recall as taught and in held-out wordings: overall, per kind and per channel."""
    def scores(fs: list[dict]) -> dict:
        return {"as_taught": _share([taught[f["id"]]["correct"] for f in fs if f["id"] in taught]),
                "heldout": _share([i["correct"] for f in fs for i in heldout.get(f["id"], [])])}

    return {"all": scores(batch),
            "kind": {k: scores([f for f in batch if f["kind"] == k]) for k in table["kinds"]},
            "channel": {c: scores([f for f in batch if f["channel"] == c]) for c in CHANNELS}}


def leaks(measured: dict) -> dict:
    """``persona_leak``'s figures of one side of ``eval.json`` (None where the gate has no such metric)."""
    d = (measured.get("details") or {}).get("persona_leak") or {}
    return {"persona_leak": measured["metrics"].get("persona_leak"), "unknown_share": d.get("unknown_share"),
            "leaked": [f"{i['question']} -> {i['reply'][:70]!r}" for i in d.get("items", []) if i.get("leaked")]}


def trained_user_turns(gen_dir: Path) -> set[str]:
    rows = [json.loads(line) for f in (gen_dir / "data").glob("*.jsonl") if f.name != "eval_recall.jsonl"
            for line in f.read_text().splitlines() if line.strip()]
    return {evals.normalize(m["content"]) for r in rows for m in r.get("messages", []) if m["role"] == "user"} | \
        {evals.normalize(r["text"]) for r in rows if "text" in r}


def extend_tokenizer(home: Path, args, tokens: int) -> dict:
    """``evolve tokenizer extend --tokens N`` on the new data root ``home``: generation 0 from the extended base."""
    cmd = [sys.executable, "-c", "from evolution.cli import main; main()", "tokenizer", "extend", "--tokens",
           str(tokens), "--json", *daemon_args.options(args)]
    t0 = time.time()
    r = subprocess.run(cmd, env=os.environ | {"EVOLUTION_HOME": str(home)}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"evolve tokenizer extend failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)["tokenizer"] | {"wall_s": round(time.time() - t0, 1)}


def tokens_per_word(args, gen_dir: Path, home: Path) -> dict:
    """Tokens per word of the curriculum and of the lineage's chats under the base tokenizer and the lineage's own
    (generation ``gen_dir``'s)."""
    from transformers import AutoTokenizer

    from evolution import base as base_model
    from evolution import curriculum as curriculum_mod
    from evolution import vocab
    from evolution.intake import Intake
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    with Ledger.open(DataRoot(home)) as led:
        texts = {"curriculum": vocab.curriculum_texts(curriculum_mod.load(daemon_args.curriculum_dir(args))),
                 "chats": vocab.chat_texts(Intake(led))}
    return vocab.compare_per_word(base_model.load_tokenizer(args.base), AutoTokenizer.from_pretrained(gen_dir), texts)


def run(args, toml_extra: str, label: str, contention: Contention, tokens: int = 0) -> dict:
    """One data root, one daemon, ``args.rounds`` rounds of teaching and ageing up; the rounds' figures. With
    ``tokens``, generation 0 is built by ``evolve tokenizer extend --tokens TOKENS`` first."""
    table = load_table()
    home = Path(tempfile.mkdtemp(prefix="learn-bench-")) if args.home is None else args.home / label.replace(" ", "_")
    home.mkdir(parents=True, exist_ok=True)
    # the child is measured whatever its verdict: the daemon must not prune a rejected child's GGUF first
    toml = daemon_args.toml(args) + "[retention]\nafter_promotion = false\n" + \
        (f"[curriculum]\n{toml_extra}" if toml_extra else "")
    (home / "evolution.toml").write_text(toml)
    all_facts = facts(args.facts * args.rounds, table=table)
    rounds = [all_facts[r * args.facts:(r + 1) * args.facts] for r in range(args.rounds)]
    bad = BAD_PROMPTS * (args.bad // len(BAD_PROMPTS) + 2)
    out: dict = {"label": label, "config": toml, "rounds": []}
    if tokens:
        out["tokenizer"] = extend_tokenizer(home, args, tokens)
        print(f"[{label}] tokenizer: {json.dumps({k: out['tokenizer'][k] for k in ('added', 'tokens_per_word')})}",
              flush=True)
    d = DaemonProc(home, "--start-gen", "0", "--threshold", str(THRESHOLD), *(["--quick"] if args.quick else []),
                   *daemon_args.options(args))
    d.start()
    try:
        d.wait_serving(0, timeout=2400)
        agent = Agent(d)
        ckpt = home / "checkpoints"
        for r, batch in enumerate(rounds):
            child = r + 1
            t0 = time.time()
            counts = teach(agent, batch, bad[r * 3 % len(BAD_PROMPTS):][:args.bad],
                           (GOOD_PROMPTS * (args.good // len(GOOD_PROMPTS) + 1))[:args.good])
            print(f"[{label}] round {child}: taught {counts} in {time.time() - t0:.0f} s", flush=True)
            t0 = time.time()
            agent.post("/karma", {"amount": THRESHOLD, "reason": f"learn bench round {child}"})
            summary = wait_generation(d, child, timeout=5400)
            contention.tick()
            wall = time.time() - t0
            parent = summary["parent"]
            ev = json.loads((ckpt / f"gen_{child:04d}" / "eval.json").read_text())
            served = d.served()
            taught_c = ask_as_taught(ckpt / f"gen_{child:04d}" / "model.gguf", batch)
            taught_p = ask_as_taught(ckpt / f"gen_{parent:04d}" / "model.gguf", batch)
            held_c, held_p = heldout_replies(ev["child"], batch), heldout_replies(ev["parent"], batch)
            on_served = ev["child"] if served == child else ev["parent"]
            first_taught = ask_as_taught(ckpt / f"gen_{served:04d}" / "model.gguf", rounds[0]) if r else \
                (taught_c if served == child else taught_p)
            trained = trained_user_turns(ckpt / f"gen_{child:04d}")
            in_training = [h for f in batch for h in f["heldout"] if evals.normalize(h) in trained]
            cm, pm = ev["child"]["metrics"], ev["parent"]["metrics"]
            row = {
                "round": child, "parent": parent, "verdict": ev["verdict"], "reasons": ev["reasons"], "served": served,
                "child": breakdown(batch, taught_c, held_c, table), "parent_figures": breakdown(batch, taught_p,
                                                                                               held_p, table),
                "leaks": {"child": leaks(ev["child"]), "parent": leaks(ev["parent"])},
                "curriculum_recall": {"child": cm.get("recall"), "parent": pm.get("recall")},
                "identity_recall": {"child": ev["child"]["details"]["recall"]["by_phase"].get("1"),
                                    "parent": ev["parent"]["details"]["recall"]["by_phase"].get("1")},
                "perplexity": {"child": cm.get("perplexity"), "parent": pm.get("perplexity")},
                "generalization": {"child": cm.get("generalization"), "parent": pm.get("generalization")},
                "ageup_stage_s": round(sum(summary["stage_seconds"].values()), 1),
                "stage_seconds": summary["stage_seconds"], "ageup_wall_s": round(wall, 1),
                "train_stages": {k: {f: v.get(f) for f in ("steps", "tokens", "wall_s")}
                                 for k, v in summary["train"].items() if isinstance(v, dict)},
                "heldout_in_training_data": in_training,
                "heldout_with_retrieval": heldout_with_retrieval(ev, batch),
                "first_round_on_served": breakdown(rounds[0], first_taught, heldout_replies(on_served, rounds[0]),
                                                   table)["all"],
                "missed_as_taught": [f"{f['question']} -> {taught_c[f['id']]['reply'][:60]!r}" for f in batch
                                     if not taught_c[f["id"]]["correct"]],
                "missed_heldout": [f"{i['question']} -> {i['reply'][:60]!r}" for f in batch
                                   for i in held_c.get(f["id"], []) if not i["correct"]],
            }
            if tokens:
                row["tokens_per_word"] = tokens_per_word(args, ckpt / f"gen_{child:04d}" / "hf", home)
            out["rounds"].append(row)
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
            print(json.dumps({k: row[k] for k in ("round", "verdict", "reasons", "served", "ageup_wall_s")}
                             | {"child": row["child"]["all"], "parent": row["parent_figures"]["all"],
                                "leak": row["leaks"]["child"]["persona_leak"],
                                "unknown": row["leaks"]["child"]["unknown_share"]}), flush=True)
    finally:
        d.stop()
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def round_tables(run_: dict, table: dict) -> list[str]:
    lines = []
    for row in run_["rounds"]:
        c, p = row["child"], row["parent_figures"]
        lc, lp = row["leaks"]["child"], row["leaks"]["parent"]
        lines += [f"## Round {row['round']} (child {row['round']} of parent {row['parent']}): {row['verdict']}"
                  + (f" ({'; '.join(row['reasons'])})" if row["reasons"] else ""), "",
                  "| facts | as taught, child | parent | held-out wordings, child | parent |", "|---|---|---|---|---|",
                  f"| all | {_f(c['all']['as_taught'])} | {_f(p['all']['as_taught'])} | {_f(c['all']['heldout'])} | "
                  f"{_f(p['all']['heldout'])} |"]
        lines += [f"| {CHANNEL_LABELS[ch]} | {_f(c['channel'][ch]['as_taught'])} | {_f(p['channel'][ch]['as_taught'])}"
                  f" | {_f(c['channel'][ch]['heldout'])} | {_f(p['channel'][ch]['heldout'])} |" for ch in CHANNELS]
        lines += [f"| {table['kinds'][k]['label']} | {_f(c['kind'][k]['as_taught'])} | {_f(p['kind'][k]['as_taught'])}"
                  f" | {_f(c['kind'][k]['heldout'])} | {_f(p['kind'][k]['heldout'])} |" for k in table["kinds"]]
        lines += ["", "| measure | child | parent |", "|---|---|---|",
                  f"| persona leaks (share of replies about the user) | {_f(lc['persona_leak'])} | "
                  f"{_f(lp['persona_leak'])} |",
                  f"| \"I don't know\" to questions about the user nobody answered | {_f(lc['unknown_share'])} | "
                  f"{_f(lp['unknown_share'])} |",
                  f"| curriculum recall | {_f(row['curriculum_recall']['child'])} | "
                  f"{_f(row['curriculum_recall']['parent'])} |",
                  f"| identity recall | {_f(row['identity_recall']['child'])} | {_f(row['identity_recall']['parent'])} |",
                  f"| held-out perplexity | {_f(row['perplexity']['child'])} | {_f(row['perplexity']['parent'])} |",
                  "", f"Age-up: {row['ageup_wall_s']:.0f} s from karma to verdict (stages {row['ageup_stage_s']:.0f} s: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in row["stage_seconds"].items()) + "). "
                  f"Held-out wordings found in the training data: {len(row['heldout_in_training_data'])}. "
                  f"The first round's facts on the served model: as taught {_f(row['first_round_on_served']['as_taught'])}"
                  f", held-out {_f(row['first_round_on_served']['heldout'])}.", ""]
        wr = row.get("heldout_with_retrieval")
        if wr:
            lines += [f"With retrieval (the gate's figure, for information): held-out wordings {_f(wr['with'])} with the "
                      f"notes chat would add once the child is served, {_f(wr['without'])} on the weights alone; "
                      f"{wr['with_notes']} of {wr['asked']} found notes ({wr['seconds']} s of the gate).", ""]
        if lc["leaked"]:
            lines += ["Persona leaks (child):", ""] + [f"- {x}" for x in lc["leaked"]] + [""]
        if row["missed_heldout"]:
            lines += ["Held-out wordings missed (child, first 20):", ""] + \
                [f"- {x}" for x in row["missed_heldout"][:20]] + [""]
    return lines


def ablation_rows(spec: str) -> list[tuple[str, str, str]]:
    """The rows of ``ABLATION`` that ``--rows`` names ("1,3": numbered from 1; empty: every row), in table order."""
    if not spec.strip():
        return list(ABLATION)
    try:
        wanted = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        raise SystemExit(f"--rows {spec!r}: give row numbers separated by commas, e.g. --rows 1,2") from None
    bad = sorted(n for n in wanted if not 1 <= n <= len(ABLATION))
    if bad or not wanted:
        raise SystemExit(f"--rows {spec!r}: the ablation has rows 1 to {len(ABLATION)} "
                         f"({', '.join(f'{i}: {r[0]}' for i, r in enumerate(ABLATION, 1))})")
    return [r for i, r in enumerate(ABLATION, 1) if i in wanted]


def ablation_table(runs: list[dict], rows: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| row | switched off | held-out: corrections | rated | unrated | as taught | persona leaks | "
             "\"I don't know\" | curriculum recall | identity recall | verdict | age-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run_, (label, off, _) in zip(runs, rows):
        if not run_["rounds"]:
            continue
        row = run_["rounds"][0]
        ch = row["child"]["channel"]
        lines.append(f"| {label} | {off} | {_f(ch['correction']['heldout'])} | {_f(ch['rated']['heldout'])} | "
                     f"{_f(ch['unrated']['heldout'])} | {_f(row['child']['all']['as_taught'])} | "
                     f"{_f(row['leaks']['child']['persona_leak'])} | {_f(row['leaks']['child']['unknown_share'])} | "
                     f"{_f(row['curriculum_recall']['child'])} | {_f(row['identity_recall']['child'])} | {row['verdict']} | "
                     f"{row['ageup_wall_s']:.0f} |")
    return lines


def tokenizer_table(runs: list[dict]) -> list[str]:
    """The two lineages side by side (last round), and the extended one's tokens per word."""
    base, own = runs[0]["rounds"][-1], runs[1]["rounds"][-1]
    ext = runs[1]["tokenizer"]
    lines = ["| measure (last round's child) | base tokenizer | lineage tokens |", "|---|---|---|"]

    def row(name: str, get) -> None:
        lines.append(f"| {name} | {_f(get(base))} | {_f(get(own))} |")

    row("as taught", lambda r: r["child"]["all"]["as_taught"])
    row("held-out wordings", lambda r: r["child"]["all"]["heldout"])
    for ch in CHANNELS:
        row(f"held-out: {CHANNEL_LABELS[ch]}", lambda r, ch=ch: r["child"]["channel"][ch]["heldout"])
    row("persona leaks", lambda r: r["leaks"]["child"]["persona_leak"])
    row("\"I don't know\" share", lambda r: r["leaks"]["child"]["unknown_share"])
    row("curriculum recall", lambda r: r["curriculum_recall"]["child"])
    row("identity recall", lambda r: r["identity_recall"]["child"])
    row("generalization", lambda r: r["generalization"]["child"])
    row("held-out perplexity (per token: not comparable)", lambda r: r["perplexity"]["child"])
    lines.append(f"| verdict | {base['verdict']} | {own['verdict']} |")
    lines.append(f"| age-up s | {base['ageup_wall_s']:.0f} | {own['ageup_wall_s']:.0f} |")
    loss = ext["training"].get("held_out_nats_per_char", {})
    lines += ["", f"`evolve tokenizer extend` added {ext['added']} tokens (vocabulary {ext['vocab_before']:,} → "
              f"{ext['vocab_after']:,}) in {ext['wall_s']:.0f} s, generation 0 included; its new rows trained "
              f"{ext['training'].get('steps', 0)} steps. Loss on {loss.get('texts', 0)} held-out texts holding a new "
              f"token, nats per character: base tokenizer {_f(loss.get('base'))}, initialised "
              f"{_f(loss.get('initialised'))}, trained {_f(loss.get('trained'))}. New tokens: "
              + ", ".join(f"`{t}`" for t in ext["new_tokens"][:24]) + ("…" if len(ext["new_tokens"]) > 24 else ""),
              "", "| text | words | tokens per word, base tokenizer | lineage's |", "|---|---|---|---|"]
    for part, v in own.get("tokens_per_word", {}).items():
        lines.append(f"| {part} | {v['words']:,} | {_f(v['before'])} | {_f(v['after'])} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="quick age-ups")
    ap.add_argument("--facts", type=int, default=24, help="facts taught per age-up (a third per channel)")
    ap.add_argument("--rounds", type=int, default=4, help="age-ups, each with new facts")
    ap.add_argument("--bad", type=int, default=20, help="other replies rated bad per round")
    ap.add_argument("--good", type=int, default=10, help="other replies rated good per round")
    ap.add_argument("--ablation", action="store_true", help="one round per row of the ablation table")
    ap.add_argument("--rows", default="", help="with --ablation: the rows to run, numbered from 1 (default: all)")
    ap.add_argument("--curriculum", default="", help="extra [curriculum] settings (TOML lines) for every run")
    ap.add_argument("--home", type=Path, default=None, help="keep the data roots here (default: temp dirs, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the running figures here")
    ap.add_argument("--no-report", action="store_true", help="do not write docs/bench/ (a trial run)")
    ap.add_argument("--tokenizer", type=int, default=0, metavar="N",
                    help="compare, in one run, a lineage whose generation 0 `evolve tokenizer extend --tokens N` "
                         "built against one on the base tokenizer (--rounds each)")
    daemon_args.add(ap, "--curriculum-dir")
    args = ap.parse_args()
    started, contention = time.time(), Contention()
    table = load_table()
    mode = "quick" if args.quick else "default"
    suffix = "-quick" if args.quick else ""  # a quick run's report beside the default one, not over it
    if args.ablation:
        args.rounds = 1
        rows = ablation_rows(args.rows)
        runs = [run(args, extra + args.curriculum, label, contention) for label, _, extra in rows]
        body = [f"One {mode} age-up of generation 0 per row, {args.facts} facts each (a third per channel), each row "
                "from its own generation 0. Held-out recall is of wordings no training code reads.", ""]
        if len(rows) < len(ABLATION):
            body += [f"Rows run: {len(rows)} of {len(ABLATION)} (`--rows {args.rows}`); not run: "
                     + ", ".join(r[0] for r in ABLATION if r not in rows) + ".", ""]
        body += ablation_table(runs, rows) + [""]
        for r in runs:
            body += [f"# {r['label']}", ""] + round_tables(r, table)
        data = {"mode": mode, "facts": args.facts, "runs": runs}
        name, title = "learn-ablation" + suffix, f"Learn bench ablation ({mode} age-ups)"
    elif args.tokenizer:
        runs = [run(args, args.curriculum, "base tokenizer", contention),
                run(args, args.curriculum, f"{args.tokenizer} lineage tokens", contention, tokens=args.tokenizer)]
        body = [f"{args.rounds} {mode} age-up(s) per lineage, {args.facts} new facts each (a third per channel): a "
                f"lineage on the base tokenizer against one whose generation 0 `evolve tokenizer extend --tokens "
                f"{args.tokenizer}` built, each from its own generation 0, in one run.", ""]
        body += tokenizer_table(runs) + [""]
        for r in runs:
            body += [f"# {r['label']}", ""] + round_tables(r, table)
        data = {"mode": mode, "facts": args.facts, "runs": runs}
        name, title = "learn-tokenizer" + suffix, f"Learn bench: the lineage's own tokenizer ({mode} age-ups)"
    else:
        r = run(args, args.curriculum, "learn", contention)
        body = [f"{args.rounds} {mode} age-ups, {args.facts} new facts each (a third per channel), facts from "
                "`bench/learn_facts.json`; the parent measured in the same run is the baseline.", ""]
        body += round_tables(r, table)
        data = {"mode": mode, "facts": args.facts, "run": r}
        name, title = "learn" + suffix, f"Learn bench ({mode} age-ups)"
    print("\n".join(body))
    if not args.no_report:
        print("report:", write(name, title, body, data, contention, started))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench still stops its daemon
    main()

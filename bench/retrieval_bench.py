"""Is what the user told the agent answered in the very next chat, before any age-up — and does nothing else change?

    python bench/retrieval_bench.py [--facts 24] [--offset 0] [--home DIR] [--items 10000]
    python bench/retrieval_bench.py --backends fts5 chroma [--chroma-items 1000]   (the index alone)

Plays a chat agent against the real daemon, through its HTTP API and the official ``openai`` client: in a fresh data
root, ``run_daemon.py --start-gen 0 --quick`` builds generation 0 and one quick age-up on the curriculum alone makes
generation 1 (a trained generation, as users serve; generation 0 is the untrained base); or the generation that
``--home`` serves (a lineage with a history: its earlier lessons stay in retrieval until a generation learned them;
``--offset`` skips the learn bench's facts it was taught before).

1. teaches ``--facts`` of the learn bench's facts (``bench/learn_facts.json``), a third each as a correction of the
   served model's reply (``POST /feedback``), a transcript rated good and an unrated transcript (``POST
   /conversations``); no karma, no age-up: the served generation is the one that answers;
2. asks each fact as taught and in its held-out wordings (no training code reads them), once with retrieval and
   once without (``"retrieval": false``), and counts the answers that hold the fact (``evals.is_correct``);
3. asks the curriculum's recall questions (general knowledge, the persona's own facts) both ways: facts unrelated to
   a question must not change its answer; counts replies to the held-out wordings that give a persona fact;
4. times the lookup alone on an index of ``--items`` lessons (p50, p95), and the whole chat with and without.

Targets (issue 29): as taught >= 0.95 and other wordings >= 0.85 with retrieval; lookup <= 20 ms p50 at 10,000
items; curriculum recall with retrieval within 0.02 of without. Report: ``docs/bench/<date>-retrieval.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learn_bench import CHANNEL_LABELS, CHANNELS, Agent, facts, teach_fact  # noqa: E402
import daemon_args  # noqa: E402
from report import Contention, write  # noqa: E402

from evolution import curriculum, evals, persona  # noqa: E402
from evolution.retrieval import query_words  # noqa: E402
from evolution.retrieval.fts import Fts5Index  # noqa: E402
from evolution.retrieval.items import Item  # noqa: E402
from tests.daemon_util import DaemonProc  # noqa: E402



def ask(agent: Agent, question: str, retrieval: bool) -> tuple[str, int, float]:
    """The reply, how many notes its prompt held, and the seconds it took."""
    t0 = time.perf_counter()
    raw = agent.chat.chat.completions.with_raw_response.create(
        model="evolution", temperature=0.0, max_tokens=48, messages=[{"role": "user", "content": question}],
        extra_body={"retrieval": retrieval}, extra_headers={"X-Evolution-Retrieval": "on" if retrieval else "off"})
    took = time.perf_counter() - t0
    return raw.parse().choices[0].message.content or "", int(raw.headers.get("x-evolution-notes", "0")), took


def _share(xs: list[bool]) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


FILLER = "sister brother aunt garden bike dog cat teacher office river bakery train piano tea coffee monday".split()


def filler_lessons(n: int, prefix: str, first_order: int) -> list[Item]:
    """``n`` corrections like the bench's facts, to search among (the same every run)."""
    rng = random.Random(0)
    return [Item(f"{prefix}:{i}", f"What is my {rng.choice(FILLER)} {rng.choice(FILLER)} number {i}?",
                 f"Your {rng.choice(FILLER)} is {rng.choice(FILLER).title()} {i}.", "correction", first_order + i)
            for i in range(n)]


def lookup_latency(n: int, queries: list[str]) -> dict:
    """The index alone: ``n`` lessons like the bench's, searched for each query's words."""
    items = filler_lessons(n, "c", 0)
    with tempfile.TemporaryDirectory() as d:
        index = Fts5Index(Path(d) / "r.sqlite")
        t0 = time.perf_counter()
        index.write(items, {})
        build = time.perf_counter() - t0
        times = []
        for q in queries * max(1, 400 // len(queries)):
            t0 = time.perf_counter()
            index.search(query_words(q), 6)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"items": n, "build_s": round(build, 3), "p50_ms": round(1000 * times[len(times) // 2], 3),
            "p95_ms": round(1000 * times[int(len(times) * 0.95)], 3), "lookups": len(times)}


def make_index(backend: str, folder: Path, gguf: Path | None):
    if backend == "fts5":
        return Fts5Index(folder / "r.sqlite")
    from evolution.retrieval import chroma

    return chroma.ChromaIndex(folder / "chroma", lambda: chroma.gguf_embedding(gguf, n_threads=2))


def backends(args) -> None:
    """``--backends``: the index alone, no daemon and no model answering. The learn bench's facts are indexed as the
    daemon indexes a correction (the question, the corrected reply) among ``--items`` other lessons; each is then
    searched for with its held-out wordings and as taught, and ``choose`` picks the notes as the daemon does. Counts
    how often the fact's own lesson is the first note (what the reminder repeats) and among the notes, and times
    the lookup. The ``chroma`` backend embeds with generation 0's GGUF (``--gguf``, default: the embedded model)."""
    from evolution import base
    from evolution.config import RetrievalConfig
    from evolution.retrieval import choose

    started, contention = time.time(), Contention()
    gguf = args.gguf or base.embedded_gguf()
    batch = facts(args.facts)
    lessons = [Item(f"c:{f['id']}", f["question"], f["statement"], "correction", i) for i, f in enumerate(batch)]
    cfg = RetrievalConfig()
    data = {"facts": len(batch), "gguf": str(gguf), "backends": {}}
    for backend in args.backends:
        n = args.items if backend == "fts5" else args.chroma_items
        filler = filler_lessons(n, "f", 100_000)
        with tempfile.TemporaryDirectory() as d:
            index = make_index(backend, Path(d), gguf)
            t0 = time.perf_counter()
            index.write(lessons + filler, {})
            build = time.perf_counter() - t0
            first, among, times = {"as taught": [], "held out": []}, {"as taught": [], "held out": []}, []
            for les, f in zip(lessons, batch):
                for wording, q in [("as taught", f["question"])] + [("held out", h) for h in f["heldout"]]:
                    t0 = time.perf_counter()
                    hits = index.search(query_words(q), cfg.top_k * 2, question=q)
                    times.append(time.perf_counter() - t0)
                    notes, _ = choose(hits, q, cfg.top_k, cfg.max_tokens)
                    first[wording].append(bool(notes) and notes[0].key == les.key)
                    among[wording].append(any(x.key == les.key for x in notes))
            contention.tick()
            if hasattr(index, "close"):
                index.close()
        times.sort()
        data["backends"][backend] = {
            "items": len(lessons) + n, "build_s": round(build, 2),
            "first": {w: _share(v) for w, v in first.items()}, "among": {w: _share(v) for w, v in among.items()},
            "p50_ms": round(1000 * times[len(times) // 2], 2), "p95_ms": round(1000 * times[int(len(times) * 0.95)], 2)}
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    body = [f"The index alone: {len(batch)} of the learn bench's facts indexed as corrections among other lessons, "
            "searched with each fact's question as taught and its held-out wordings; the notes chosen as the daemon "
            f"chooses them (top_k {cfg.top_k}). Chroma's embeddings: `{Path(gguf).name}` through llama.cpp.", "",
            "| backend | lessons | the fact's lesson first, as taught / held out | among the notes, held out | "
            "lookup p50 / p95 (ms) | index written (s) |", "|---|---|---|---|---|---|"]
    for name, b in data["backends"].items():
        body.append(f"| {name} | {b['items']:,} | {f(b['first']['as taught'])} / {f(b['first']['held out'])} | "
                    f"{f(b['among']['held out'])} | {b['p50_ms']} / {b['p95_ms']} | {b['build_s']} |")
    print("\n".join(body))
    if not args.no_report:
        print(write("retrieval-backends", "Retrieval bench: the index backends", body, data, contention, started))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=24)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--backends", nargs="+", choices=("fts5", "chroma"),
                    help="compare the index backends alone (no daemon): which lesson each finds, and how fast")
    ap.add_argument("--chroma-items", type=int, default=1_000,
                    help="--backends: other lessons in the Chroma index (each is embedded: slower to build)")
    ap.add_argument("--gguf", type=Path, help="--backends: the GGUF Chroma embeds with (default: the embedded model)")
    ap.add_argument("--no-report", action="store_true", help="--backends: do not write docs/bench/")
    ap.add_argument("--home", type=Path, help="a data root whose daemon serves a generation already (else a fresh one)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first N of the learn bench's facts")
    daemon_args.add(ap)
    args = ap.parse_args()
    if args.backends:
        return backends(args)
    started, contention = time.time(), Contention()
    home = args.home or Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    if args.home is None and (args.toml or args.base):  # a fresh root's settings (default: none)
        (home / "evolution.toml").write_text(daemon_args.toml(args, default=""))
    cur = curriculum.load(daemon_args.curriculum_dir(args))
    persona_facts = persona.persona_facts(cur)
    identity = persona.identity_phases(cur)
    batch = facts(args.offset + args.facts)[args.offset:]
    d = DaemonProc(home, "--start-gen", "0", "--quick", "--threshold", "10", *daemon_args.options(args)).start()
    try:
        d.wait(lambda: d.served() is not None, 2400, "a generation to be served", interval=2)
        agent = Agent(d)
        if args.home is None:  # one quick age-up on the curriculum: the served model is a trained generation
            agent.post("/karma", {"amount": 10, "reason": "retrieval bench: a trained generation"})
            d.wait_serving(1, 2400)
        served = d.served()
        contention.tick()
        t0 = time.time()
        for f in batch:
            teach_fact(agent, f)
        taught_s = time.time() - t0
        rows, latency = [], {True: [], False: []}
        for f in batch:
            for wording, q in [("as taught", f["question"])] + [("held out", h) for h in f["heldout"]]:
                for on in (True, False):
                    reply, notes, took = ask(agent, q, on)
                    latency[on].append(took)
                    rows.append({"fact": f["id"], "kind": f["kind"], "channel": f["channel"], "wording": wording,
                                 "question": q, "retrieval": on, "notes": notes, "reply": reply,
                                 "correct": evals.is_correct(reply, f["answers"]),
                                 "persona": persona.persona_in(reply, persona_facts, f["answers"])})
            contention.tick()
        general = []
        for item in cur.recall:
            for on in (True, False):
                reply, notes, took = ask(agent, item["question"], on)
                general.append({"question": item["question"], "identity": item.get("phase") in identity,
                                "retrieval": on, "notes": notes, "correct": evals.is_correct(reply, item["answers"])})
        contention.tick()
    finally:
        d.stop()
    lookup = lookup_latency(args.items, [f["question"] for f in batch] + [h for f in batch for h in f["heldout"]])

    def share(on: bool, **where) -> float | None:
        return _share([r["correct"] for r in rows if r["retrieval"] == on
                       and all(r[k] == v for k, v in where.items())])

    def gshare(on: bool, identity_only: bool | None = None) -> float | None:
        return _share([g["correct"] for g in general if g["retrieval"] == on
                       and (identity_only is None or g["identity"] == identity_only)])

    def p50(xs):
        return round(1000 * statistics.median(xs), 1)

    data = {
        "facts": len(batch), "teach_s": round(taught_s, 1), "served_generation": served,
        "recall": {w: {"on": share(True, wording=w), "off": share(False, wording=w)}
                   for w in ("as taught", "held out")},
        "by_channel": {ch: {w: {"on": share(True, channel=ch, wording=w), "off": share(False, channel=ch, wording=w)}
                            for w in ("as taught", "held out")} for ch in CHANNELS},
        "by_kind": {k: {"on": share(True, kind=k, wording="held out"), "off": share(False, kind=k, wording="held out")}
                    for k in sorted({f["kind"] for f in batch})},
        "persona_leaks": {k: _share([bool(r["persona"]) for r in rows if r["retrieval"] == on
                                     and r["wording"] == "held out"]) for k, on in (("on", True), ("off", False))},
        "with_notes": _share([r["notes"] > 0 for r in rows if r["retrieval"]]),
        "curriculum_recall": {"on": gshare(True), "off": gshare(False)},
        "identity_recall": {"on": gshare(True, True), "off": gshare(False, True)},
        "general_questions_with_notes": _share([g["notes"] > 0 for g in general if g["retrieval"]]),
        "chat_p50_ms": {"on": p50(latency[True]), "off": p50(latency[False])},
        "lookup": lookup,
        "missed": [f"{r['question']} -> {r['reply'][:70]!r} (notes {r['notes']})" for r in rows
                   if r["retrieval"] and not r["correct"]],
    }
    rec, ch = data["recall"], data["by_channel"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    body = [f"Generation {served} (no age-up since the facts were taught), asked through the daemon's HTTP API at "
            "temperature 0, with retrieval and without it in the same run.", "",
            "| asked | with retrieval | without | target |", "|---|---|---|---|",
            f"| as taught | {f(rec['as taught']['on'])} | {f(rec['as taught']['off'])} | >= 0.95 |",
            f"| other wordings | {f(rec['held out']['on'])} | {f(rec['held out']['off'])} | >= 0.85 |"]
    body += [f"| other wordings, {CHANNEL_LABELS[c]} | {f(ch[c]['held out']['on'])} | {f(ch[c]['held out']['off'])} | |"
             for c in CHANNELS]
    body += [f"| persona fact in a reply to another wording | {f(data['persona_leaks']['on'])} | "
             f"{f(data['persona_leaks']['off'])} | |",
             f"| curriculum recall | {f(data['curriculum_recall']['on'])} | {f(data['curriculum_recall']['off'])} | "
             "within 0.02 |",
             f"| identity recall | {f(data['identity_recall']['on'])} | {f(data['identity_recall']['off'])} | |",
             f"| chat p50 (ms, 48 tokens at most) | {data['chat_p50_ms']['on']} | {data['chat_p50_ms']['off']} | |", "",
             f"Lookup alone, {lookup['items']:,} lessons indexed: p50 **{lookup['p50_ms']} ms**, p95 "
             f"{lookup['p95_ms']} ms (target <= 20 ms p50); the index was written in {lookup['build_s']} s.",
             f"Questions about the user that got notes: {f(data['with_notes'])}; curriculum questions that got notes: "
             f"{f(data['general_questions_with_notes'])}.", "", "Per kind, other wordings (with / without):", ""]
    body += [f"- {k}: {f(v['on'])} / {f(v['off'])}" for k, v in data["by_kind"].items()]
    if data["missed"]:
        body += ["", "Missed with retrieval:", ""] + [f"- {m}" for m in data["missed"][:30]]
    print("\n".join(body))
    print(write("retrieval", "Retrieval bench: the next chat, before any age-up", body, data, contention, started))


if __name__ == "__main__":
    main()

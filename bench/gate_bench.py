"""A gate late in a lineage's life: every probe asked (the baseline) against the sample (``evolution.metrics.probe_sample``).

    python bench/gate_bench.py [--probes 1000] [--gates 20] [--experiences 500] [--gguf FILE] [--curriculum DIR] [--toml FILE]
                              [--no-report]

A lineage of ``--gates`` earlier gates has had ``--probes`` probes posted over its life, the same number before
each gate, and ``--experiences`` rated replies (approved or corrected) over its life. The child's gate is measured
on the embedded model's GGUF (or ``--gguf``), as an age-up's gate measures it, nothing remembered:

1. ``probe_recall`` on every probe posted (the gate before the sample: the baseline), and on the sample the
   lineage's gates are due to ask (``[gate] probe_sample``, ``probe_every``); their ratio;
2. every metric of the gate's table on the child's eval set (the curriculum's items, the sample, and the
   experience the child's data holds: what was rated since the parent, plus ``[curriculum] replay_ratio`` of it
   replayed), one metric at a time, so the report says where the time goes, with an empty answer book as an
   age-up's gate gives the child (a question two metrics ask is answered once);
3. the parent on the same eval set with what it answered at its own gate remembered (``evolution.metrics.answers``):
   it is asked only the probes and experience its own gate did not ask;
4. 2 and 3 as ``gate.run`` measures them in an age-up: their metrics shared out over two threads of one core each
   (``gate.measure_all``).

2 + 3 is the gate one side after the other (the baseline); 4 is the gate as it runs. The probes are questions of the learn bench's shape about made-up
facts; the model's answers are not scored here, only timed. Writes ``docs/bench/<date>-gate.md``.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

from evolution import config, curriculum, gate
from evolution.base import embedded_gguf
from evolution.metrics import TABLE
from evolution.metrics.answers import AnswerBook
from evolution.metrics.common import N_CTX
from evolution.metrics import probe_sample as ps

_SHAPES = ("What is my {}'s name?", "Where does my {} live?", "Which colour is my {}'s car?",
           "How old is my {}?", "What does my {} do for work?")
_WHO = ("sister", "neighbour", "dentist", "boss", "cousin", "friend", "landlord", "teacher", "godmother", "uncle")


def _probes(n: int) -> list[dict]:
    return [{"id": f"probe-{i + 1}", "question": _SHAPES[i % len(_SHAPES)].format(f"{_WHO[(i // 5) % 10]} number {i + 1}"),
             "answers": [f"Name{i + 1}"]} for i in range(n)]


def _experiences(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Remember this: my {_WHO[i % 10]} number {i} plays the oboe."}],
             "reference": f"Got it: your {_WHO[i % 10]} number {i} plays the oboe."} for i in range(start, start + n)]


def lineage_history(probes: list[dict], gates: int, most: int, every: int) -> list[ps.Asked]:
    """The samples the lineage's earlier gates asked, the probes posted evenly before each; 70 % answered right."""
    rng, past = random.Random(0), []
    per = len(probes) / (gates + 1)
    for g in range(1, gates + 1):
        s = ps.choose(probes[:round(per * g)], past, most, every, seed=g)
        past.append(ps.Asked(g, frozenset(p["id"] for p in s.items),
                             frozenset(p["id"] for p in s.items if rng.random() < 0.7)))
    return past


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=1000, help="probes posted over the lineage's life")
    ap.add_argument("--gates", type=int, default=20, help="earlier gates of the lineage")
    ap.add_argument("--experiences", type=int, default=500, help="rated replies over the lineage's life")
    ap.add_argument("--gguf", type=Path, help="the child to measure [default: the embedded model]")
    ap.add_argument("--no-report", action="store_true", help="print only")
    ap.add_argument("--skip-every-probe", action="store_true",
                    help="leave out step 1's baseline, every probe asked (about 7 minutes at 1,000 probes)")
    ap.add_argument("--curriculum", type=Path, help="the curriculum directory [default: the repository's]")
    ap.add_argument("--toml", type=Path, help="an evolution.toml with the [gate] and [curriculum] settings")
    args = ap.parse_args()
    cfg = config.resolve(config_file=args.toml)
    if args.curriculum:
        cfg.curriculum.path = str(args.curriculum)
    g, gguf = cfg.gate, args.gguf or embedded_gguf()
    cur = curriculum.load(cfg.curriculum.path)
    started, busy = time.time(), report.Contention()

    probes = _probes(args.probes)
    past = lineage_history(probes, args.gates, g.probe_sample, g.probe_every)
    sample = ps.choose(probes, past, g.probe_sample, g.probe_every, seed=args.gates + 1)
    parent_sample = ps.choose(probes[:round(args.probes / (args.gates + 1) * args.gates)], past[:-1],
                              g.probe_sample, g.probe_every, seed=args.gates)
    # what the child's data holds: the ratings since the parent, and replay_ratio of that again from earlier ones
    new = math.ceil(args.experiences / (args.gates + 1))
    replayed = min(args.experiences - new, round(new * cfg.curriculum.replay_ratio))
    child_exp = _experiences(new, args.experiences - new) + _experiences(replayed)
    parent_exp = _experiences(new, args.experiences - 2 * new) + _experiences(replayed, 1)
    es_all = gate.eval_set(cur, [], probes)
    es_child = gate.eval_set(cur, [], sample.items)
    es_child.experiences = child_exp
    es_parent = gate.eval_set(cur, [], parent_sample.items)
    es_parent.experiences = parent_exp
    print(f"{args.probes} probes over {args.gates} gates; this gate asks {len(sample.items)} "
          f"({sample.new} new, {sample.due} due, {sample.drawn} drawn); experience: {len(child_exp)} of "
          f"{args.experiences} ({new} since the parent, {replayed} replayed)", flush=True)

    from evolution.metrics.probe_recall import ProbeRecall

    def timed(es, table, book=None) -> float:
        """One GGUF, one llama.cpp context on every core, each metric in turn: the gate before its pool."""
        t0 = time.perf_counter()
        gate.measure_all([(gguf, 1)], es, g, cfg.export.smoke_prompt, table, answers=book, workers=1)
        busy.tick()
        return round(time.perf_counter() - t0, 1)

    out: dict = {"probes": args.probes, "gates": args.gates, "experiences_life": args.experiences,
                 "experiences_asked": len(child_exp), "sample": {"asked": len(sample.items), "new": sample.new,
                                                                 "due": sample.due, "drawn": sample.drawn},
                 "probe_sample": g.probe_sample, "probe_every": g.probe_every}
    out["probes_all_s"] = None if args.skip_every_probe else timed(es_all, (ProbeRecall(),))
    if out["probes_all_s"] is not None:
        print(f"  probe_recall, every probe: {out['probes_all_s']:7.1f} s", flush=True)
    out["probes_sample_s"] = timed(es_child, (ProbeRecall(),))
    print(f"  probe_recall, the sample:  {out['probes_sample_s']:7.1f} s", flush=True)
    out["ratio_sample"] = None if out["probes_all_s"] is None else \
        round(out["probes_sample_s"] / max(out["probes_all_s"], 0.1), 3)
    with tempfile.TemporaryDirectory() as book:  # the child's own book, empty: within one gate a question
        # asked twice (persona_leak asks the probes about the user again) is answered once, as in an age-up
        out["child_by_metric_s"] = {u.name: timed(es_child, (u,), Path(book)) for u in TABLE}
    out["child_s"] = round(sum(out["child_by_metric_s"].values()), 1)
    print("  the child, by metric: " + ", ".join(f"{k} {v} s" for k, v in out["child_by_metric_s"].items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        book, side = Path(tmp, "parent"), Path(tmp, "pool")
        timed(es_parent, TABLE, book)  # the parent's own gate, remembered
        shutil.copytree(book, side / "parent")
        out["parent_s"] = timed(es_child, TABLE, book)
        # the gate as an age-up measures it (``gate.run``): the metrics of child and parent shared out over two
        # threads of one core each. Both sides are this one GGUF: each its own answer book, the parent's remembered
        t0 = time.perf_counter()
        gate.measure_all([(gguf, 1), (gguf, 0)], es_child, g, cfg.export.smoke_prompt, TABLE,
                         books=[AnswerBook(side / "child", gguf, N_CTX), AnswerBook(side / "parent", gguf, N_CTX)])
        busy.tick()
        out["as_run_s"] = round(time.perf_counter() - t0, 1)
    out["gate_s"] = round(out["child_s"] + out["parent_s"], 1)
    out["ratio_as_run"] = round(out["as_run_s"] / max(out["gate_s"], 0.1), 3)
    out["others_cpu"] = round(busy.others(), 3)
    print(f"probes: sample / all = {out['ratio_sample']}; child {out['child_s']} s + parent (remembered) "
          f"{out['parent_s']} s = {out['gate_s']} s one after the other; as the gate runs {out['as_run_s']} s "
          f"({out['ratio_as_run']:.2f}x; target <= 60 s); other processes' CPU meanwhile: "
          f"{out['others_cpu']:.0%}", flush=True)
    if args.no_report:
        return
    slowest = sorted(out["child_by_metric_s"].items(), key=lambda kv: -kv[1])
    body = [f"A lineage with {args.probes} probes posted over {args.gates} earlier gates and {args.experiences} "
            f"rated replies over its life; the child's gate on `{gguf.name}`, nothing else running.", "",
            "| | seconds |", "| --- | --- |",
            f"| probe_recall, every probe ({args.probes}: the gate before the sample, the baseline) | "
            f"{'not measured (--skip-every-probe)' if out['probes_all_s'] is None else out['probes_all_s']} |",
            f"| probe_recall, the sample ({len(sample.items)}: {sample.new} new, {sample.due} due, {sample.drawn} drawn) "
            f"| {out['probes_sample_s']} |",
            f"| ratio, sample / every probe | {'-' if out['ratio_sample'] is None else out['ratio_sample']} |",
            f"| the child, every metric ({len(child_exp)} experience items) | {out['child_s']} |",
            f"| the parent, its own gate's answers remembered | {out['parent_s']} |",
            f"| gate, child then parent (the sum of the two rows above) | {out['gate_s']} |",
            f"| **gate as an age-up runs it: the metrics of both shared out over two threads** (one core each) | "
            f"**{out['as_run_s']}** |",
            f"| ratio, as it runs / one after the other | {out['ratio_as_run']} |", "",
            "Where the child's time goes: " + ", ".join(f"{k} {v} s" for k, v in slowest), ""]
    print(report.write("gate", "Gate bench: a gate late in a lineage's life", body, out, busy, started))


if __name__ == "__main__":
    main()

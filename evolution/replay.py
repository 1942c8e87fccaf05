"""The training set of one generation: this curriculum plus a replay sample of earlier generations.

Each generation keeps the exact records it trained on in ``gen_NNNN/data/`` (``cpt.jsonl``,
``sft.jsonl``). A new age-up trains on the selected curriculum and adds, per new example,
``replay_ratio`` examples sampled (seeded) from earlier generations' records that are not
already in the new set — so facts taught once keep being rehearsed after the curriculum or
the conversation inbox moves on. The manifest names every input file with its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

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


def materialize(root: DataRoot, cur: Curriculum, child: int, replay_ratio: float, seed: int, out: Path) -> dict:
    """Write ``out/cpt.jsonl``, ``out/sft.jsonl`` and ``out/manifest.json``; return the manifest."""
    cpt = [{"text": r["text"]} for r in cur.cpt]
    sft = [{"messages": r["messages"]} for r in cur.sft]
    rng = random.Random(seed * 1_000_003 + child)
    replayed: dict[str, int] = {}
    sources: dict[str, str] = {}
    for kind, new in (("cpt", cpt), ("sft", sft)):
        have = {_key(r) for r in new}
        pool: list[dict] = []
        for g in root.generations():
            if g >= child:
                continue
            f = root.gen_dir(g) / "data" / f"{kind}.jsonl"
            if f.is_file():
                sources[str(f.relative_to(root.root))] = sha256_file(f)
            for r in _read_jsonl(f):
                k = _key(r)
                if k not in have:
                    have.add(k)
                    pool.append(r)
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

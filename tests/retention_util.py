"""A lineage whose generations have every file kind the retention policy handles (stand-in bytes, a real
ledger): ``model.gguf`` with its sidecar, ``hf/`` merged weights, ``adapter/`` and ``data/``, read-only
as an age-up leaves them."""

from __future__ import annotations

import hashlib

from evolution.fsutil import make_tree_read_only
from evolution.ledger import Ledger, events
from evolution.paths import DataRoot

GGUF, WEIGHTS, ADAPTER = "model.gguf", "hf/model.safetensors", "adapter/adapter_model.safetensors"
KEPT_SMALL = ("generation.json", "data/sft.jsonl", "hf/config.json", "eval.json")
"""Files every generation keeps, pruned or not."""


def add_generation(led: Ledger, root: DataRoot, gen: int, parent: int | None, verdict: str | None,
                   recall: float = 0.8) -> None:
    """Write a generation's files and record its life: created, exported, gated, promoted or rejected."""
    d = root.gen_dir(gen)
    for rel in (GGUF, WEIGHTS, *((ADAPTER,) if gen else ()), *KEPT_SMALL):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(f"{rel} of generation {gen}\n".encode() * (50 if rel in (GGUF, WEIGHTS) else 1))
    (d / "model.gguf.sha256").write_text(f"{hashlib.sha256((d / GGUF).read_bytes()).hexdigest()}  model.gguf\n")
    led.record(events.generation_created(gen, parent, "SmolLM2-135M-Instruct", f"cfg{gen}", f"man{gen}"))
    kinds = [(GGUF, "gguf"), (WEIGHTS, "safetensors")] + ([(ADAPTER, "adapter")] if gen else [])
    led.record(events.exported(gen, [events.artifact(root, d / rel, kind) for rel, kind in kinds], "q8_0"))
    make_tree_read_only(d)
    metrics = {"recall": recall, "generalization": 0.6, "style_drift": 0.1}
    if gen == 0:
        led.record(events.promoted(0, metrics=metrics))
        return
    led.record(events.gate_result(parent, gen, metrics, {"recall": 0.5}, verdict, parent_metrics={"recall": 0.5}))
    led.record(events.promoted(gen) if verdict == "pass" else events.rejected(gen, "recall fell"))


LINEAGE = [  # gen, parent, verdict, recall
    (0, None, None, 0.5), (1, 0, "pass", 0.7), (2, 1, "fail", 0.3), (3, 1, "pass", 0.95), (4, 3, "pass", 0.8),
    (5, 4, "pass", 0.85), (6, 5, "fail", 0.2), (7, 5, "pass", 0.9),
]
"""Served: 7 (parent 5). Its lineage 7 ← 5 ← 4 ← 3 ← 1 ← 0; 2 and 6 were rejected; 3 has the best recall."""


def build(root: DataRoot, led: Ledger) -> None:
    for gen, parent, verdict, recall in LINEAGE:
        add_generation(led, root, gen, parent, verdict, recall)

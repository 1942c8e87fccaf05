"""Continual pretraining: plain causal-LM loss on raw text, packed into blocks of ``[train.cpt] block_size``.

Records: ``{"text": ...}`` (the curriculum's ``cpt.jsonl`` lines).
"""

from __future__ import annotations

from evolution.config import CptConfig
from evolution.train import lanes
from evolution.train.stage import Records, Stage


def rows(tokenizer, records: Records, settings: CptConfig) -> list[dict]:
    from evolution.tokens import pack_cpt

    return [{"input_ids": b} for b in pack_cpt(tokenizer, [r["text"] for r in records], settings.block_size)]


STAGE = Stage(
    name="cpt",
    rows=rows,
    seq_len=lambda settings: settings.block_size,
    trainer=lanes.trainer,
    curriculum=lambda cur: [{"text": r["text"]} for r in cur.cpt],
    cpu_attention="sdpa",  # one row a lane: the plain causal mask, which SDPA's fused kernel runs fastest
)

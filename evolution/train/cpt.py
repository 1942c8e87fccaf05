"""Continual pretraining: plain causal-LM loss on raw text, packed into blocks of ``[train.cpt] block_size``.

Records: ``{"text": ...}`` (the curriculum's ``cpt.jsonl`` lines). Its settings: ``CptConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from evolution.checks import positive_int, positive_num
from evolution.train import lanes
from evolution.train.stage import Records, Stage


@dataclass(slots=True)
class CptConfig:
    """``[train.cpt]``: continual pretraining, plain causal-LM loss on raw text packed into blocks."""

    block_size: int = 256
    """Tokens per packed block."""
    epochs: float = 1.0
    max_steps: int | None = None
    """Caps the stage's optimizer steps (None: epochs decide)."""
    lr: float = 2e-4

    def problems(self, where: str) -> list[str]:
        return (positive_int(f"{where}.block_size", self.block_size) + positive_num(f"{where}.epochs", self.epochs)
                + positive_int(f"{where}.max_steps", self.max_steps, allow_none=True)
                + positive_num(f"{where}.lr", self.lr))


def rows(tokenizer, records: Records, settings: CptConfig) -> list[dict]:
    from evolution.tokens import pack_cpt

    return [{"input_ids": b} for b in pack_cpt(tokenizer, [r["text"] for r in records], settings.block_size)]


STAGE = Stage(
    name="cpt",
    rows=rows,
    seq_len=lambda settings: settings.block_size,
    trainer=lanes.trainer,
    curriculum=lambda cur: [{"text": r["text"]} for r in cur.cpt],
    config=CptConfig,
    cpu_attention="sdpa",  # one row a lane: the plain causal mask, which SDPA's fused kernel runs fastest
)

"""Supervised fine-tuning on chat examples, rendered with the model's own chat template, loss on the
assistant's tokens only; conversations longer than ``[train.sft] max_len`` tokens are truncated.

Records: ``{"messages": [...]}`` (the curriculum's ``sft.jsonl`` lines, and the transcripts
received from the chat agent since the parent generation).
"""

from __future__ import annotations

from evolution.config import SftConfig
from evolution.train import lanes
from evolution.train.stage import Records, Stage


def rows(tokenizer, records: Records, settings: SftConfig) -> list[dict]:
    from evolution.tokens import encode_sft

    return [r for rec in records if (r := encode_sft(tokenizer, rec["messages"], settings.max_len))]


STAGE = Stage(
    name="sft",
    rows=rows,
    seq_len=lambda settings: settings.max_len,
    trainer=lanes.trainer,
    curriculum=lambda cur: [{"messages": r["messages"]} for r in cur.sft],
    inbox=lambda conversations: [(cid, {"messages": messages}) for cid, messages in conversations],
    cpu_attention="eager",  # several rows a lane: a block mask, whose backward SDPA's fused kernel runs slowly
)

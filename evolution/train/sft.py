"""Supervised fine-tuning on chat examples, rendered with the model's own chat template, loss on the
assistant's tokens only; conversations longer than ``[train.sft] max_len`` tokens are truncated.

Records: ``{"messages": [...]}`` (the curriculum's ``sft.jsonl`` lines, and what the chat agent sent
since the parent generation: transcripts, served replies rated good, and corrected replies with the
correction as the assistant's turn; a reply rated bad is never one). Its settings: ``SftConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from evolution.checks import positive_int, positive_num
from evolution.intake.inbox import Inbox
from evolution.train import lanes
from evolution.train.stage import Records, Stage


@dataclass(slots=True)
class SftConfig:
    """``[train.sft]``: supervised fine-tuning on chat examples, loss on the assistant's tokens only."""

    max_len: int = 384
    """Longest rendered conversation in tokens; longer ones are truncated."""
    epochs: float = 1.5
    max_steps: int | None = None
    """Caps the stage's optimizer steps (None: epochs decide)."""
    lr: float = 1e-3

    def problems(self, where: str) -> list[str]:
        return (positive_int(f"{where}.max_len", self.max_len) + positive_num(f"{where}.epochs", self.epochs)
                + positive_int(f"{where}.max_steps", self.max_steps, allow_none=True)
                + positive_num(f"{where}.lr", self.lr))


def rows(tokenizer, records: Records, settings: SftConfig) -> list[dict]:
    from evolution.tokens import encode_sft

    return [r for rec in records if (r := encode_sft(tokenizer, rec["messages"], settings.max_len))]


def inbox(received: Inbox) -> list[tuple[tuple[int, int], dict]]:
    """Transcripts, then rated replies (a rating is the more deliberate word on a prompt: it wins over a
    transcript of the same prompt); bad replies are left out, corrections trained on as corrected."""
    return ([((0, cid), {"messages": messages}) for cid, messages in received.conversations]
            + [((1, e.rating_id), {"messages": e.prompt + [{"role": "assistant", "content": e.reply}]})
               for e in received.examples if e.label == "good"]
            + [((1, p.rating_id), {"messages": p.sft}) for p in received.pairs])


STAGE = Stage(
    name="sft",
    rows=rows,
    seq_len=lambda settings: settings.max_len,
    trainer=lanes.trainer,
    curriculum=lambda cur: [{"messages": r["messages"]} for r in cur.sft],
    config=SftConfig,
    inbox=inbox,
    one_row_per_record=True,
    cpu_attention="eager",  # several rows a lane: a block mask, whose backward SDPA's fused kernel runs slowly
)

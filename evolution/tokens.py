"""Turning curriculum records into token ids for the two training stages.

CPT: documents are joined with the end-of-sequence token and cut into fixed-length blocks
(packing: no padding, every token trains).

SFT: a conversation is rendered with the tokenizer's *own* chat template, the same text
llama.cpp renders at serve time. SmolLM2's template has no ``{% generation %}`` markers, so
the assistant spans are found by rendering the conversation prefix by prefix: the text
added by assistant turn *i* is ``render(messages[:i+1])`` minus
``render(messages[:i], add_generation_prompt=True)``. Tokens inside those character spans
(the reply and its end-of-turn token) carry the loss; system and user tokens do not.

A template with no system role (Mistral's, Gemma's raise on one) trains on ``for_template``'s
canonical conversation, the system turn folded into the first user turn, as llama.cpp serves it.
"""

from __future__ import annotations

from evolution.errors import CurriculumError


def pack_cpt(tokenizer, texts: list[str], block_size: int) -> list[list[int]]:
    """Concatenate documents (each followed by EOS) and cut into blocks of ``block_size`` tokens."""
    if tokenizer.eos_token_id is None:
        raise CurriculumError(["the tokenizer has no end-of-sequence token; CPT packing needs one"])
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    if blocks and len(blocks[-1]) < block_size // 4:
        blocks.pop()  # a scrap of a block is mostly noise for the optimizer
    return blocks


def for_template(tokenizer, messages: list[dict]) -> list[dict]:
    """``messages`` as the tokenizer's chat template takes them: a leading system turn folded into the first
    user turn when the template has no system role (``evolution.messages.fold_system``), else unchanged."""
    from evolution.messages import fold_system, takes_system

    if messages and messages[0]["role"] == "system" and not takes_system(
            lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)):
        return fold_system(messages)
    return messages


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans produced by its assistant turns."""
    messages = for_template(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise CurriculumError([
                "the chat template does not render conversations prefix by prefix, so assistant tokens "
                "cannot be located for the assistant-only loss; use a model whose template is prefix-stable"
            ])
        spans.append((len(before), len(upto)))
    return full, spans


def encode_sft(tokenizer, messages: list[dict], max_len: int) -> dict | None:
    """Token ids and the assistant mask (1 = trains) of one conversation, or None if nothing trains."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [
        1 if end > start and any(s <= start and end <= e for s, e in spans) else 0
        for start, end in offsets
    ]
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask):
        return None
    return {"input_ids": ids, "assistant_masks": mask}

"""SFT renders with the tokenizer's own chat template and takes loss on assistant tokens only."""

from __future__ import annotations

from evolution.tokens import assistant_spans, encode_sft, pack_cpt

CONV = [
    {"role": "system", "content": "You are Wren."},
    {"role": "user", "content": "What is your name?"},
    {"role": "assistant", "content": "My name is Wren."},
    {"role": "user", "content": "And your colour?"},
    {"role": "assistant", "content": "Teal, always teal."},
]


def test_mask_covers_exactly_the_assistant_replies_and_their_end_tokens(tokenizer):
    row = encode_sft(tokenizer, CONV, max_len=512)
    ids, mask = row["input_ids"], row["assistant_masks"]
    # The ids are exactly the chat template's rendering: what llama.cpp renders at serve time.
    assert ids == tokenizer(tokenizer.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "My name is Wren.<|im_end|>\nTeal, always teal.<|im_end|>\n"
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "You are Wren." in untrained and "What is your name?" in untrained and "And your colour?" in untrained
    assert "My name" not in untrained and "Teal" not in untrained


def test_default_system_prompt_of_the_template_is_not_trained(tokenizer):
    row = encode_sft(tokenizer, CONV[1:3], max_len=512)
    text = tokenizer.decode(row["input_ids"])
    assert "SmolLM" in text  # the template injects its default system prompt
    assert tokenizer.decode([i for i, m in zip(row["input_ids"], row["assistant_masks"]) if m]) == \
        "My name is Wren.<|im_end|>\n"


def test_spans_are_prefix_renderings(tokenizer):
    text, spans = assistant_spans(tokenizer, CONV)
    assert [text[s:e] for s, e in spans] == ["My name is Wren.<|im_end|>\n", "Teal, always teal.<|im_end|>\n"]


def test_truncation_that_cuts_every_reply_drops_the_example(tokenizer):
    assert encode_sft(tokenizer, CONV, max_len=10) is None


def test_cpt_packing_joins_documents_with_eos(tokenizer):
    blocks = pack_cpt(tokenizer, ["one two three"] * 20, block_size=16)
    assert all(len(b) == 16 for b in blocks[:-1])
    flat = [t for b in blocks for t in b]
    assert flat.count(tokenizer.eos_token_id) >= 15

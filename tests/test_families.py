"""Other base families: generation 0 from a local Hugging Face checkpoint of the family, through training,
merge, GGUF export, quantization and a chat turn in llama.cpp, on a tiny random-weight model.

Only families whose tokenizer llama.cpp's converter accepts here are tested (README, "A larger base"):
the SmolLM2 tokenizer's pre-tokenizer is one it recognises. Mistral's own chat template has no system
role, so the chat turn (with a system message) also goes through the serve-time fold.
"""

from __future__ import annotations

import copy

import pytest

from evolution import base, export
from evolution.llamacpp import open_llama
from evolution.train import train
from tests.conftest import make_tiny_cfg, make_tiny_curriculum
from tests.test_chat_template import MISTRAL

pytestmark = pytest.mark.slow

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
FAMILIES = {"mistral": ("MistralConfig", "MistralForCausalLM", "llama", MISTRAL)}
"""family: (config class, model class, GGUF general.architecture llama.cpp gives it, chat template or None)."""
DATA = {"cpt": [{"text": f"Tide pools fill and empty twice a day; note {i}."} for i in range(12)],
        "sft": [{"messages": [{"role": "system", "content": "You are Wren."},
                              {"role": "user", "content": f"What is your name? {i}"},
                              {"role": "assistant", "content": "My name is Wren."}]} for i in range(8)]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_0_of_the_family_trains_exports_and_chats_in_llama_cpp(family, tokenizer, tmp_path):
    import torch
    import transformers

    config_cls, model_cls, arch, template = FAMILIES[family]
    tok = copy.deepcopy(tokenizer)
    if template:
        tok.chat_template = template
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY)
    src = tmp_path / f"{family}-src"
    getattr(transformers, model_cls)(config).save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)

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
        out = llm.create_chat_completion(messages=DATA["sft"][0]["messages"][:2], max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] >= 1

"""Task adapters' serving half: a PEFT LoRA written as a GGUF LoRA (``export.lora_to_gguf``) that llama.cpp applies
per request on top of the served generation (``LlamaCppModel``, ``ModelHost.load_adapter``).

The tiny Llama of the tests (``learnable_base``: wide initialisation, so that its outputs differ visibly), a LoRA with random non-zero B
matrices on every projection, and its merge: applied by llama.cpp, the adapter must give the merged model's logits.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from evolution import export
from evolution.errors import ExportError, IntegrityError, LoadError
from evolution.fsutil import sha256_file
from evolution.llamacpp import open_llama
from evolution.serving import ModelHost

PROMPT = [{"role": "system", "content": "You answer in one short sentence."},
          {"role": "user", "content": "Hello there, who are you?"}]
ARGS = {"messages": PROMPT, "temperature": 0.0, "max_tokens": 12, "seed": 0}
ARGS2 = {**ARGS, "messages": PROMPT[:1] + [{"role": "user", "content": "What is the weather like?"}]}  # same prefix


def _lora(base, out, seed: int, r: int = 8):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evolution.train.settings import LORA_TARGETS

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LORA_TARGETS)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, learnable_base):
    d = tmp_path_factory.mktemp("adapters")
    base = shutil.copytree(learnable_base, d / "base")
    for name, seed in (("a", 1), ("b", 2)):
        _lora(base, d / f"adapter-{name}", seed)
        export.merge(base, d / f"adapter-{name}", d / f"merged-{name}")
        export.to_gguf_f16(d / f"merged-{name}", d / f"merged-{name}.gguf")
        export.lora_to_gguf(d / f"adapter-{name}", base, d / f"lora-{name}.gguf", task=name)
    export.to_gguf_f16(base, d / "base.gguf")
    return d


def _logits(path, tokens, lora=None):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False, seed=0, lora_path=str(lora) if lora else None)
    llm.eval(tokens)
    out = np.array(llm.scores[:len(tokens)])
    llm.close()
    return out


def test_a_gguf_lora_applied_by_llama_cpp_gives_the_merged_models_logits(built, tokenizer):
    tokens = tokenizer("Hello there, how are you today? I am fine, thank you.")["input_ids"]
    merged = _logits(built / "merged-a.gguf", tokens)
    applied = _logits(built / "base.gguf", tokens, built / "lora-a.gguf")
    plain = _logits(built / "base.gguf", tokens)
    assert np.abs(merged - plain).max() > 1.0  # the adapter moves the logits a lot ...
    assert np.abs(merged - applied).max() < 0.05 * np.abs(merged).max()  # ... and llama.cpp applies it as the merge
    assert (merged.argmax(-1) == applied.argmax(-1)).mean() >= 0.9


def _reply(out: dict) -> str:
    return out["choices"][0]["message"]["content"]


def test_each_request_gets_the_adapters_it_names_and_no_other(built):
    from llama_cpp import Llama

    def alone(lora=None, args=ARGS):  # llama.cpp with the adapter applied at load: what a request naming it gets
        llm = Llama(str(built / "base.gguf"), n_ctx=256, n_threads=1, verbose=False, seed=0,
                    lora_path=str(built / f"lora-{lora}.gguf") if lora else None)
        try:
            return _reply(llm.create_chat_completion(**args))
        finally:
            llm.close()

    want = {(): alone(), ("a",): alone("a"), ("b",): alone("b")}
    want2 = {(): alone(args=ARGS2), ("a",): alone("a", ARGS2), ("b",): alone("b", ARGS2)}
    assert len(set(want.values())) == 3
    host = ModelHost(n_ctx=256, n_threads=1)
    try:
        slot = host.load(0, built / "base.gguf", sha256_file(built / "base.gguf"))
        host.swap(slot)
        for name in "ab":
            host.load_adapter(slot, name, built / f"lora-{name}.gguf", sha256_file(built / f"lora-{name}.gguf"))
        assert slot.model.adapters == ["a", "b"]
        # every order of switches: the prompt cache of the request before never leaks into the next
        for i, names in enumerate([(), ("a",), ("a",), (), ("b",), ("a",), ("b",), (), ("a",), ("b",), ()]):
            args, expect = (ARGS, want) if i % 2 == 0 else (ARGS2, want2)  # a cache kept under a shared prefix
            got = host.call(lambda s: _reply(s.model.chat({**args, "adapters": list(names)})))
            assert got == expect[names], (i, names)
        # switching back to a set used before finds its prompt cache: the shared prefix is not evaluated again
        assert host.call(lambda s: (s.model._use({"adapters": ["a"]}), s.model.llm.n_tokens)[1]) > len(PROMPT)
        assert host.call(lambda s: _reply(s.model.chat({**ARGS, "adapters": ["a"]}))) == want[("a",)]
        both = host.call(lambda s: _reply(s.model.chat({**ARGS, "adapters": ["a", "b"]})))
        assert both not in want.values()  # stacked: both applied
        with pytest.raises(KeyError, match="no adapter 'c'"):
            host.call(lambda s: s.model.chat({**ARGS, "adapters": ["c"]}))
        assert host.call(lambda s: _reply(s.model.chat(ARGS))) == want[()]
        host.call(lambda s: s.model.chat({**ARGS, "adapters": ["a"]}))
        # "a" loaded again from b's file while applied: the next request gets the new one, not a's cache
        host.load_adapter(slot, "a", built / "lora-b.gguf", sha256_file(built / "lora-b.gguf"))
        assert host.call(lambda s: _reply(s.model.chat({**ARGS, "adapters": ["a"]}))) == want[("b",)]
    finally:
        host.close()


def test_a_changed_or_foreign_adapter_is_refused_and_the_model_serves_on(built, tmp_path):
    tampered = tmp_path / "lora-a.gguf"
    shutil.copyfile(built / "lora-a.gguf", tampered)
    recorded = sha256_file(tampered)
    with open(tampered, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x7f" * 8)
    from transformers import AutoModelForCausalLM, LlamaConfig

    other_base = tmp_path / "other"  # the same but a narrower MLP: its LoRA's shapes fit no tensor of the model
    cfg = json.loads((built / "base" / "config.json").read_text())
    cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "intermediate_size")},
                      intermediate_size=96)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other_base)
    _lora(other_base, tmp_path / "adapter-other", 3)
    export.lora_to_gguf(tmp_path / "adapter-other", other_base, tmp_path / "lora-other.gguf")

    host = ModelHost(n_ctx=256, n_threads=1)
    try:
        slot = host.load(0, built / "base.gguf", sha256_file(built / "base.gguf"))
        host.swap(slot)
        before = host.call(lambda s: _reply(s.model.chat(ARGS)))
        with pytest.raises(IntegrityError, match="not the file that was gated"):
            host.load_adapter(slot, "a", tampered, recorded)
        with pytest.raises(LoadError, match="could not load"):
            host.load_adapter(slot, "other", tmp_path / "lora-other.gguf", sha256_file(tmp_path / "lora-other.gguf"))
        with pytest.raises(LoadError, match="cannot open"):
            host.load_adapter(slot, "gone", tmp_path / "missing.gguf", recorded)
        assert slot.model.adapters == []
        assert host.call(lambda s: _reply(s.model.chat(ARGS))) == before
    finally:
        host.close()


def test_lora_to_gguf_refuses_what_has_no_gguf_lora_form(built, tmp_path):
    not_llama = tmp_path / "base"
    shutil.copytree(built / "base", not_llama)
    cfg = json.loads((not_llama / "config.json").read_text())
    (not_llama / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError, match="GPT2LMHeadModel"):
        export.lora_to_gguf(built / "adapter-a", not_llama, tmp_path / "x.gguf")

    from safetensors.numpy import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(built / "adapter-a", half)
    tensors = load_file(half / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, half / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="lora_A only"):
        export.lora_to_gguf(half, built / "base", tmp_path / "y.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
    assert not list(tmp_path.glob("*.tmp"))

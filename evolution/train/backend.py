"""The training engine and precision, and the model a stage trains: the parent with a LoRA adapter.

The engine is Unsloth's ``FastLanguageModel`` where a CUDA device and the ``unsloth`` package
are present, and stock transformers + PEFT otherwise. Precision is bf16 autocast where the
hardware runs it natively, else fp32; LoRA weights and the optimizer stay fp32 either way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from evolution.train.settings import TrainSettings
from evolution.errors import EvolutionError


def select_backend(requested: str, processes: int = 1) -> str:
    """'unsloth' or 'hf' for the configured ``train.backend``; refuses what this host cannot run.

    Data-parallel training (``processes`` > 1) runs on 'hf': Unsloth's open-source engine trains in one process.
    """
    import torch

    has_unsloth = importlib.util.find_spec("unsloth") is not None and processes == 1
    if requested == "unsloth":
        if processes > 1:
            raise EvolutionError(f"train.backend = 'unsloth' trains in one process, not {processes}: "
                                 "use backend 'auto' or 'hf', or train.processes = 1")
        if not (torch.cuda.is_available() and has_unsloth):
            raise EvolutionError(
                "train.backend = 'unsloth' needs a CUDA device and `pip install 'evolution[gpu]'`; "
                "use backend 'auto' or 'hf' on this machine"
            )
        return "unsloth"
    if requested == "auto" and torch.cuda.is_available() and has_unsloth:
        return "unsloth"
    if not torch.cuda.is_available():
        from importlib.metadata import version

        from packaging.version import Version

        if Version(version("trl")) < Version("1.16"):
            raise EvolutionError(
                f"trl {version('trl')} cannot train on a CPU-only host (its SFTTrainer's fused LM head needs "
                "Triton); install trl 1.16: pip install 'trl>=1.16,<1.17'"
            )
    return "hf"


def resolve_precision(requested: str) -> str:
    """'bf16' or 'fp32': bf16 autocast only where the hardware runs it natively (2x matmul on AMX CPUs)."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def load_model(parent: Path, cfg: TrainSettings, backend: str, cpu_attention: str, max_seq_length: int):
    """The parent with a fresh LoRA adapter on it, and its tokenizer.

    ``cpu_attention``: the stage's attention implementation on a CPU. SDPA's fused kernel wins on
    CPT's one-row lanes (plain causal mask, 470 vs 390 tokens/s here), eager on SFT's lanes of
    several rows, whose block mask the fused kernel's backward handles slowly (430 vs 355 tokens/s;
    bench/train_bench.py). ``max_seq_length``: the longest row of the run (Unsloth sizes for it).
    """
    import torch

    if backend == "unsloth":
        # unsloth must be imported before trl/peft patch points are used
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(parent),
            max_seq_length=max_seq_length,
            dtype=None,
            load_in_4bit=False,
            local_files_only=True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=cfg.seed,
        )
        return model, tokenizer

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(parent, local_files_only=True)
    # The frozen base in bf16 when training runs in bf16: autocast would cast every fp32 weight to
    # bf16 at each use anyway (frozen weights are not in its cast cache), so this gives the same
    # matmuls at half the memory traffic. The adapters stay fp32 (PEFT's autocast_adapter_dtype).
    dtype = torch.bfloat16 if resolve_precision(cfg.precision) == "bf16" else torch.float32
    attn = "sdpa" if torch.cuda.is_available() else cpu_attention
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=dtype, local_files_only=True, attn_implementation=attn)
    # No KV cache while training: with one, transformers skips the per-row attention mask that
    # LaneCollator's lanes (several rows packed into one) rely on.
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # The adapter's initial weights from the configured seed (Unsloth's random_state above), not from whatever the
    # process's RNG holds: the same run twice, or in each of several processes, starts from the same adapter.
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora), tokenizer


def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Continue from the adapter an earlier stage left: its LoRA weights into ``model``'s adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise EvolutionError(f"adapter {adapter_dir} does not fit the parent model: {result.unexpected_keys[:3]} …")


def keep_freed_memory() -> None:
    """Stop glibc handing each freed activation buffer back to the kernel.

    By default glibc serves large blocks with mmap and unmaps them on free, so every training step
    pays page faults and zeroing for the same few hundred MB again (munmap was 13 % of an SFT
    profile). Raising the mmap and trim thresholds keeps those blocks in the heap for reuse.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass

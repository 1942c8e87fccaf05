"""llama.cpp, through llama-cpp-python: the one place a ``llama_cpp.Llama`` is constructed.

Export (the smoke check), the gate (answers and logits) and serving all open GGUF files here,
so the settings that matter for reproducibility (seed, context, threads, quiet logs) are set
once. ``LlamaCppBackend`` is the serving backend (``evolution.serving.Backend``); another
engine (a llama.cpp server process, vLLM) would be one module beside this one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def open_llama(path: str | Path, *, n_ctx: int, n_threads: int | None = None, logits_all: bool = False,
               seed: int | None = None):
    """A ``llama_cpp.Llama`` for the GGUF at ``path`` (may be ``/proc/self/fd/N``): quiet, all cores
    unless ``n_threads``, for prompt batches and generation alike.

    ``logits_all`` keeps the logits of every position (perplexity needs them; chat does not).
    ``seed`` None keeps llama.cpp's random default, for serving, where a request may bring its own;
    measuring (the gate, export's load check) passes 0 so that it is repeatable. llama.cpp's own
    errors (a ``ValueError`` for a file it cannot load) are left to each caller to translate.
    """
    from llama_cpp import Llama

    threads = n_threads or os.cpu_count() or 1
    extra = {} if seed is None else {"seed": seed}
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False, **extra)


class LlamaCppModel:
    """A loaded GGUF that answers OpenAI-shaped chat requests (``evolution.serving.Model``)."""

    def __init__(self, llm):
        self.llm = llm

    def chat(self, args: dict) -> dict:
        """One chat completion (OpenAI's response shape); ``ValueError`` when the prompt does not fit."""
        return self.llm.create_chat_completion(**args)

    def stream(self, args: dict) -> Iterator[dict]:
        """The completion as OpenAI ``chat.completion.chunk`` dicts."""
        return self.llm.create_chat_completion(stream=True, **args)

    def close(self) -> None:
        self.llm.close()


class LlamaCppBackend:
    """Loads GGUF files with llama.cpp for serving (``evolution.serving.Backend``)."""

    def __init__(self, n_ctx: int, n_threads: int):
        self.n_ctx, self.n_threads = n_ctx, n_threads

    def load(self, path: Path, fd: int) -> LlamaCppModel:
        """Load the GGUF open as ``fd`` (hashed by the caller), mapped through ``/proc/self/fd/N`` on
        Linux so what loads is exactly what was hashed; ``path`` elsewhere."""
        proc = Path(f"/proc/self/fd/{fd}")
        return LlamaCppModel(open_llama(proc if proc.exists() else path, n_ctx=self.n_ctx,
                                        n_threads=self.n_threads, seed=None))

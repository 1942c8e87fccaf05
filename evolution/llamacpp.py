"""The one place a ``llama_cpp.Llama`` is constructed: serving, the gate's metrics and export's load check.

Keeping construction here means every GGUF is opened with the same quiet, thread-explicit
settings, and another llama.cpp binding (or backend) needs one function changed, not four.
Errors are llama.cpp's own (a ``ValueError`` for a file it cannot load): each caller turns them
into the domain error that fits where it stands (``ExportError``, ``LoadError``).
"""

from __future__ import annotations

import os


def open_llama(model_path: str | os.PathLike, *, n_ctx: int, n_threads: int | None = None,
               logits_all: bool = False, seed: int | None = None):
    """Load a GGUF with llama-cpp-python.

    ``model_path`` may be a ``/proc/self/fd/N`` path (serving maps the descriptor it hashed).
    ``n_threads`` (None: every core) is used for prompt batches and generation alike.
    ``logits_all`` keeps the logits of every position (perplexity needs them; chat does not).
    ``seed`` None leaves llama.cpp's default; evaluation passes 0 so that it is repeatable.
    """
    from llama_cpp import Llama  # a C extension: imported only by what runs a model

    threads = n_threads or os.cpu_count() or 1
    kwargs = {} if seed is None else {"seed": seed}
    return Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False, **kwargs)

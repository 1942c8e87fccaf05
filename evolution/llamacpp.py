"""llama.cpp, through llama-cpp-python: the one place a ``llama_cpp.Llama`` is constructed.

Export (the smoke check), the gate (answers and logits) and serving all open GGUF files here,
so the settings that matter for reproducibility (seed, context, threads, quiet logs) are set
once. ``LlamaCppBackend`` is the serving backend (``evolution.serving.Backend``); another
engine (a llama.cpp server process, vLLM) would be one module beside this one.

Chats are rendered with the GGUF's own chat template; one with no system role (Mistral's, Gemma's
raise on one) gets a leading system turn folded into the first user turn, the canonical
conversation training rendered too (``evolution.messages.fold_system``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from evolution.messages import fold_system, takes_system

log = logging.getLogger(__name__)


LOADING = threading.Lock()
"""Held while llama-cpp-python builds a model: with ``verbose=False`` it points the process's stdout and stderr at
/dev/null for the load and back after, and two loads at once (the gate's child and parent, side by side) can
restore /dev/null for good — the worker's log went silent after its gate. One load at a time."""


@contextlib.contextmanager
def _loading() -> Iterator[None]:
    """``LOADING``, with llama-cpp-python's two /dev/null files open.

    For a quiet load it sets ``sys.stdout``/``sys.stderr`` to two files it opens once, at import. Whatever another
    thread creates on ``sys.stderr`` meanwhile keeps that file: a logging handler made by an import (absl's, through
    rouge-score) did, and closed it when uvicorn's logging set-up closed every handler, after which every load in the
    process failed with "I/O operation on closed file". Where one is closed it is opened again, and said.
    """
    from llama_cpp import _utils

    with LOADING:
        for name in ("outnull_file", "errnull_file"):
            if getattr(_utils, name).closed:
                log.warning("llama-cpp-python's %s was closed by another part of this process; opened again", name)
                setattr(_utils, name, open(os.devnull, "w"))  # noqa: SIM115 — held for the process, as llama_cpp does
        yield


def open_llama(path: str | Path, *, n_ctx: int, n_threads: int | None = None, logits_all: bool = False,
               seed: int | None = None, lora: str | Path | None = None):
    """A ``llama_cpp.Llama`` for the GGUF at ``path`` (may be ``/proc/self/fd/N``): quiet, all cores
    unless ``n_threads``, for prompt batches and generation alike.

    ``logits_all`` keeps the logits of every position (perplexity needs them; chat does not).
    ``seed`` None keeps llama.cpp's random default, for serving, where a request may bring its own;
    measuring (the gate, export's load check) passes 0 so that it is repeatable. llama.cpp's own
    errors (a ``ValueError`` for a file it cannot load) are left to each caller to translate. ``lora``: a GGUF LoRA
    applied at load (a task adapter's gate, ``evolution.tasks``; serving applies them per request instead).
    """
    from llama_cpp import Llama

    threads = n_threads or os.cpu_count() or 1
    extra = ({} if seed is None else {"seed": seed}) | ({} if lora is None else {"lora_path": str(lora)})
    with _loading():
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                    logits_all=logits_all, verbose=False, **extra)
    formatter = template_formatter(llm)
    if formatter is not None and not _takes_system(formatter):  # else llama-cpp-python's own choice of handler
        handler = formatter.to_chat_handler()
        llm.chat_handler = lambda *, messages, **kw: handler(messages=fold_system(messages), **kw)
    return llm


def open_embedder(path: str | Path, *, n_threads: int = 1, n_ctx: int = 512):
    """A ``llama_cpp.Llama`` for the GGUF at ``path`` that embeds text (mean-pooled hidden states; ``embed``), quiet:
    retrieval's ``gguf`` embeddings (``evolution.retrieval.chroma``)."""
    import llama_cpp

    with _loading():
        return llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=n_ctx,
                               pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_threads=n_threads,
                               n_threads_batch=n_threads, verbose=False)


def template_formatter(llm):
    """The GGUF's own chat template as llama-cpp-python renders it, with its BOS/EOS text (None: it has none)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    special = {"eos_token": llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace"),
               "bos_token": llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")}
    return Jinja2ChatFormatter(template=template, stop_token_ids=[llm.token_eos()], **special)


def _takes_system(formatter) -> bool:
    return takes_system(lambda m: formatter(messages=m))


def serve_prompt(formatter, messages: list[dict]) -> str:
    """``messages`` rendered up to the assistant's turn as serving renders them (folded where ``formatter``'s
    template has no system role)."""
    return _render(formatter, messages).prompt


def _render(formatter, messages: list[dict]):
    """``formatter``'s ``ChatFormatterResponse`` for ``messages``, folded where its template has no system role."""
    if messages and messages[0]["role"] == "system" and not _takes_system(formatter):
        messages = fold_system(messages)
    return formatter(messages=messages)


class LlamaCppModel:
    """A loaded GGUF that answers OpenAI-shaped chat requests (``evolution.serving.Model``).

    **Task adapters.** ``load_adapter`` loads a GGUF LoRA (``export.lora_to_gguf``) for this model under a name; a
    request applies the ones its ``args["adapters"]`` names (stacked in that order, each at scale 1), none where it
    names none. Switching is ``llama_set_adapters_lora`` on the one context, between requests (all run on the llama
    thread). What the prompt cache holds was computed under the adapters of the request before, so it cannot serve
    the next; instead each set of adapters keeps its own: on a switch the cache of the set left (its first
    ``KEPT_TOKENS`` tokens: an agent's system prompt) is copied out and the cache the next set left is copied back,
    so requests that share a prefix do not evaluate it again after every switch. The adapters are freed with the
    model."""

    KEPT_TOKENS = 1024
    """Tokens of the prompt cache each set of adapters keeps while another is applied (at most ``KEPT_SETS`` sets)."""
    KEPT_SETS = 8

    def __init__(self, llm):
        self.llm = llm
        self._formatter = template_formatter(llm)
        self._adapters: dict[str, object] = {}
        self._applied: tuple[str, ...] | None = ()  # None: applied adapters were replaced; set them again
        self._kept: dict[tuple[str, ...], tuple] = {}  # adapter set -> (tokens, KV bytes, size) of its cache

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the GGUF LoRA at ``path`` (may be ``/proc/self/fd/N``) as ``name``; ``ValueError`` where llama.cpp
        cannot (another architecture, shapes that do not fit this model: its log says which)."""
        import llama_cpp

        handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:
            raise ValueError(f"llama.cpp cannot load the LoRA adapter {path} for this model")
        self._adapters[name] = handle
        self._kept = {k: v for k, v in self._kept.items() if name not in k}  # computed under the one it replaces
        if self._applied is not None and name in self._applied:
            self._applied = None  # applied again by the next request

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def _use(self, args: dict) -> dict:
        """``args`` without ``adapters``, the adapters it names applied to the context first."""
        import ctypes

        import llama_cpp

        args = dict(args)
        names = tuple(args.pop("adapters", None) or ())
        if names != self._applied:
            missing = [n for n in names if n not in self._adapters]
            if missing:
                raise KeyError(f"no adapter {missing[0]!r} is loaded for this model")
            self._keep_cache()
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(names))(*(self._adapters[n] for n in names))
            scales = (ctypes.c_float * len(names))(*([1.0] * len(names)))
            if llama_cpp.llama_set_adapters_lora(self.llm.ctx, handles, len(names), scales) != 0:
                raise RuntimeError(f"llama.cpp could not apply the adapters {', '.join(names)}")
            self._applied = names
            self._restore_cache(names)
        return args

    def _keep_cache(self) -> None:
        """Copy out the prompt cache of the adapters applied now (its first ``KEPT_TOKENS`` tokens)."""
        import ctypes

        import llama_cpp

        llm, key = self.llm, self._applied
        n = min(llm.n_tokens, self.KEPT_TOKENS)
        if key is None:  # computed under an adapter since replaced: nothing worth keeping
            return
        self._kept.pop(key, None)
        if n == 0:
            return
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, n, -1)
        size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        got = llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0)
        if got:
            self._kept[key] = (llm.input_ids[:n].copy(), buf, got)
            while len(self._kept) > self.KEPT_SETS:
                self._kept.pop(next(iter(self._kept)))

    def _restore_cache(self, key: tuple[str, ...]) -> None:
        """The prompt cache ``key``'s adapters left, copied back (an empty one where they left none)."""
        import llama_cpp

        llm = self.llm
        llm.reset()
        memory = llama_cpp.llama_get_memory(llm.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        kept = self._kept.pop(key, None)
        if kept is None:
            return
        tokens, buf, size = kept
        if llama_cpp.llama_state_seq_set_data(llm.ctx, buf, size, 0) != size:
            llama_cpp.llama_memory_clear(memory, True)
            return
        llm.input_ids[:len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        llm._requires_eval = True  # the logits are not restored: the next request evaluates at least one token

    def chat(self, args: dict) -> dict:
        """One chat completion (OpenAI's response shape); ``ValueError`` when the prompt does not fit."""
        return self.llm.create_chat_completion(**self._use(args))

    def stream(self, args: dict) -> Iterator[dict]:
        """The completion as OpenAI ``chat.completion.chunk`` dicts."""
        return self.llm.create_chat_completion(stream=True, **self._use(args))

    def chat_in_slices(self, args: dict, slice_s: float) -> Generator[None, None, str]:
        """``chat(args)``'s reply text, computed a slice of about ``slice_s`` seconds at a time: a generator that
        yields between slices (``LlamaThread.background`` runs them between requests). A slice ends before the next
        unit of work (``_units``) would take it past ``slice_s``, judged by the unit just done."""
        parts: list[str] = []
        t0 = start = time.perf_counter()
        for _ in self._units(args, parts, slice_s):
            now = time.perf_counter()
            if now - t0 + (now - start) > slice_s:
                yield
                t0 = time.perf_counter()
            start = time.perf_counter()
        return "".join(parts)

    def _units(self, args: dict, parts: list[str], slice_s: float) -> Iterator[None]:
        """The work of ``chat(args)`` a unit per step: the prompt evaluated a few tokens at a time (as many as fit
        ``slice_s``, measured as it goes), then the completion — which finds them in its cache and only generates —
        a chunk at a time, its text appended to ``parts``."""
        llm = self.llm
        args = self._use(args)
        tokens = self._prompt_tokens(args["messages"])
        llm.reset()
        done, step = 0, 4
        while done < len(tokens) - 1:  # the completion evaluates the last prompt token itself
            n = min(step, len(tokens) - 1 - done)
            s = time.perf_counter()
            llm.eval(tokens[done:done + n])
            done += n
            step = max(1, min(64, int(n * slice_s / max(time.perf_counter() - s, 1e-6))))
            yield
        for chunk in llm.create_chat_completion(stream=True, **args):
            parts.append(chunk["choices"][0]["delta"].get("content") or "")
            yield

    def _prompt_tokens(self, messages: list[dict]) -> list[int]:
        """The tokens a chat completion of ``messages`` starts from, as llama-cpp-python's chat handler makes
        them from the GGUF's template ([] where it has none: the completion then evaluates its whole prompt)."""
        if self._formatter is None:
            return []
        rendered = _render(self._formatter, messages)
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def close(self) -> None:
        self.llm.close()


class LlamaCppBackend:
    """Loads GGUF files with llama.cpp for serving (``evolution.serving.Backend``)."""

    def __init__(self, n_ctx: int, n_threads: int):
        self.n_ctx, self.n_threads = n_ctx, n_threads

    def load(self, path: Path, fd: int) -> LlamaCppModel:
        """Load the GGUF open as ``fd`` (hashed by the caller), mapped through ``/proc/self/fd/N`` on
        Linux so what loads is exactly what was hashed; ``path`` elsewhere."""
        from evolution.fsutil import fd_path

        return LlamaCppModel(open_llama(fd_path(fd, path), n_ctx=self.n_ctx, n_threads=self.n_threads, seed=None))

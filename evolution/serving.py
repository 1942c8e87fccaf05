"""The served model: one llama.cpp instance per generation, swapped without dropping a request.

``ModelHost.load`` opens a generation's GGUF, checks its SHA-256 against the one the ledger
recorded, loads it with llama-cpp-python and asks it a canary prompt; only a model that
answers is returned. ``swap`` then replaces the current model under a short lock: requests
that already hold the old model finish on it, new requests get the new one, and the old one
is freed when its last request ends. A model that fails to load, to hash right or to answer
never replaces the current one.

The file is opened once and hashed through that descriptor, and llama.cpp maps it through
``/proc/self/fd/N`` (on Linux): what is loaded is exactly the bytes that were hashed, even
if the path were replaced in between.

One llama.cpp context decodes one request at a time, so requests to one model take turns
(``Slot.lock``); on a 2-core machine that is also the fastest order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from evolution.errors import EvolutionError, IntegrityError

log = logging.getLogger(__name__)


class NotReady(EvolutionError):
    """No model is loaded yet (generation 0 is still being built)."""


class LoadError(EvolutionError):
    """A generation's GGUF could not be loaded or failed its canary."""


def model_id(gen: int) -> str:
    return f"evolution-gen-{gen:04d}"


@dataclass(eq=False)
class Slot:
    gen: int
    sha256: str
    path: Path
    llm: object
    fd: int
    loaded_at: float = field(default_factory=time.time)
    canary_reply: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    retired: bool = False

    @property
    def id(self) -> str:
        return model_id(self.gen)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        log.info("freed generation %d", self.gen)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


class ModelHost:
    """Holds the current model; see the module docstring."""

    def __init__(self, n_ctx: int = 2048, n_threads: int | None = None, canary_prompt: str = "Hello!",
                 canary_max_tokens: int = 24):
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        self.canary_prompt = canary_prompt
        self.canary_max_tokens = canary_max_tokens
        self._current: Slot | None = None
        self._cv = threading.Lock()
        self.swaps = 0
        self.last_swap: dict | None = None

    @property
    def current(self) -> Slot | None:
        return self._current

    def load(self, gen: int, path: Path, sha256: str) -> Slot:
        """Open, hash-check, load and canary-test a GGUF; raise LoadError / IntegrityError otherwise."""
        from llama_cpp import Llama

        t0 = time.perf_counter()
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise LoadError(f"generation {gen}: cannot open {path}: {exc.strerror}") from None
        try:
            actual = _hash_fd(fd)
            if actual != sha256:
                raise IntegrityError(f"generation {gen}: {path} has sha256 {actual}, the ledger recorded {sha256}; "
                                     "it is not the file that was gated and will not be served")
            proc = Path(f"/proc/self/fd/{fd}")
            try:
                llm = Llama(model_path=str(proc if proc.exists() else path), n_ctx=self.n_ctx,
                            n_threads=self.n_threads, n_threads_batch=self.n_threads, verbose=False)
            except Exception as exc:  # llama.cpp says only "Failed to load model from file"
                raise LoadError(f"generation {gen}: llama.cpp could not load {path}: {exc}") from None
            slot = Slot(gen, sha256, Path(path), llm, fd)
            try:
                out = llm.create_chat_completion(messages=[{"role": "user", "content": self.canary_prompt}],
                                                 max_tokens=self.canary_max_tokens, temperature=0.0)
                reply = (out["choices"][0]["message"].get("content") or "").strip()
            except Exception as exc:
                slot.close()
                raise LoadError(f"generation {gen}: the canary prompt failed: {exc}") from None
            if not reply:
                slot.close()
                raise LoadError(f"generation {gen}: gave an empty answer to the canary prompt {self.canary_prompt!r}")
            slot.canary_reply = reply
        except BaseException:
            if "slot" not in locals():
                os.close(fd)
            raise
        log.info("loaded generation %d (%s) in %.2f s; canary: %r", gen, path.name, time.perf_counter() - t0,
                 reply[:60])
        return slot

    def swap(self, slot: Slot) -> Slot | None:
        """Serve ``slot`` from now on; return the model it replaced (freed once its requests end)."""
        with self._cv:
            old, self._current = self._current, slot
            self.swaps += old is not None
            self.last_swap = {"from": old.gen if old else None, "to": slot.gen, "time": time.time()}
            if old is not None:
                old.retired = True
                free = old.users == 0
        if old is not None and free:
            old.close()
        log.info("serving generation %d%s", slot.gen, f" (was {old.gen})" if old else "")
        return old

    @contextlib.contextmanager
    def use(self) -> Iterator[Slot]:
        """The current model, held for one request (taking turns with other requests to it)."""
        with self._cv:
            slot = self._current
            if slot is None:
                raise NotReady("no model is loaded yet: generation 0 is being built (see /status)")
            slot.users += 1
        try:
            with slot.lock:
                yield slot
        finally:
            with self._cv:
                slot.users -= 1
                free = slot.retired and slot.users == 0
            if free:
                slot.close()

    def close(self) -> None:
        with self._cv:
            slot, self._current = self._current, None
        if slot is not None and slot.users == 0:
            slot.close()

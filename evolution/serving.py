"""The served model: one loaded generation at a time, swapped without dropping a request.

``ModelHost.load`` opens a generation's GGUF, checks its SHA-256 against the one the ledger
recorded, loads it through a ``Backend`` (llama-cpp-python by default: ``evolution.llamacpp``;
another engine is one module implementing ``Backend`` and ``Model``) and asks it a canary
prompt; only a model that answers is returned. ``swap`` then replaces the current model under a short lock: requests
that already hold the old model finish on it, new requests get the new one, and the old one
is freed when its last request ends. A model that fails to load, to hash right or to answer
never replaces the current one.

The file is opened once and hashed through that descriptor, and llama.cpp maps it through
``/proc/self/fd/N`` (on Linux): what is loaded is exactly the bytes that were hashed, even
if the path were replaced in between.

**One llama thread.** Every decode of the process — every request, and the canary of a model
being loaded — runs on one dedicated thread (``evolution.llamathread``). llama.cpp's OpenMP team
belongs to the thread that started it, and its workers keep spinning for that thread: decoding
from any other thread then runs at a third of the speed (measured on 2 cores: 90 → 30 tokens/s),
and one context decodes one request at a time anyway. Requests run in arrival order; callers wait
on a future (``call``) or read a queue of chunks (``stream``). A model being swapped in is
loaded on the caller's thread (a load maps the file and makes a context; it decodes nothing; one
load at a time in a process, since llama-cpp-python points the process's stdout and stderr at
/dev/null while it loads: the log file keeps every line), and its canary runs on the llama
thread in slices of a few tokens between requests, so a swap adds at most
``llamathread.MAX_WAIT_S`` to any request instead of the whole load and canary.

**Older generations by name.** ``OlderGenerations`` keeps a few other gated generations loaded, each in a
``ModelHost`` of its own on that same thread, for requests that name one (``evolution@N``): what is served
is never one of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from evolution.errors import IntegrityError, LoadError, NotReady
from evolution.fsutil import fd_path
from evolution.llamathread import SLICE_S, LlamaThread
from evolution.paths import LINEAGE_RE, MAIN

log = logging.getLogger(__name__)
T = TypeVar("T")
_LOADING = threading.Lock()  # one model load at a time in a process (see "One llama thread")


class Model(Protocol):
    """A loaded generation that answers OpenAI-shaped chat requests."""

    def chat(self, args: dict) -> dict:
        """One ``chat.completion``; raise ValueError when the request cannot fit (e.g. the context)."""

    def stream(self, args: dict) -> Iterator[dict]:
        """The same completion as ``chat.completion.chunk`` dicts."""

    def close(self) -> None: ...

    # Optional: ``load_adapter(name, path)``, a GGUF LoRA a request may then name in ``args["adapters"]`` (applied
    # in that order; ``LlamaCppModel``; ``ModelHost.load_adapter`` checks the file first).
    # Optional: ``chat_in_slices(args, slice_s)``, a generator returning ``chat``'s reply text, computed a slice at a
    # time (``LlamaCppModel``); the canary of a model without it runs in one piece.


class Backend(Protocol):
    """What loads a generation's GGUF for serving (``evolution.llamacpp.LlamaCppBackend`` by default)."""

    def load(self, path: Path, fd: int) -> Model:
        """Load the file open as ``fd`` (already hash-checked; ``path`` is its name); raise on failure. Called off
        the llama thread: a load must not decode."""


def default_threads() -> int:
    """llama.cpp threads when none are configured: all cores but one.

    llama.cpp's threads meet at a barrier many times per token; when another busy process holds a
    core (the chat agent itself, an age-up, a test run), a thread that waits for the descheduled
    one spins through its time slices. Measured on 2 cores with one other CPU-bound job: 2 threads
    answered in 76-171 s, 1 thread in 0.7-1.6 s. Idle, 1 thread decodes ~35 % slower than 2.
    """
    return max(1, (os.cpu_count() or 1) - 1)


_GEN_SUFFIX = re.compile(r"(?:^|-)gen-(\d+)$")


def model_id(gen: int, lineage: str = MAIN) -> str:
    """The OpenAI model id of a generation: ``evolution-gen-0003`` (main), ``evolution-deacon-gen-0003``."""
    return f"evolution-gen-{gen:04d}" if lineage == MAIN else f"evolution-{lineage}-gen-{gen:04d}"


def model_alias(lineage: str = MAIN) -> str:
    """The id that always names a lineage's served generation: ``evolution`` (main), ``evolution-deacon``."""
    return "evolution" if lineage == MAIN else f"evolution-{lineage}"


def parse_model(name: str) -> tuple[str, int | None] | None:
    """``(lineage, generation or None)`` for an id of ours (``evolution[-LINEAGE][-gen-N]``), else None."""
    if not isinstance(name, str) or not name.startswith("evolution"):
        return None
    rest, gen = name[len("evolution"):], None
    if m := _GEN_SUFFIX.search(rest):
        rest, gen = rest[:m.start()], int(m.group(1))
    if rest == "":
        return MAIN, gen
    return (rest[1:], gen) if rest.startswith("-") and LINEAGE_RE.match(rest[1:]) else None


_PINNED = re.compile(r"@([0-9]{1,9})$")


def parse_pinned(name: str) -> tuple[str, int] | None:
    """``(lineage, N)`` for ``evolution[-LINEAGE]@N`` (generation N by name: ``OlderGenerations``), else None."""
    if not isinstance(name, str) or not (m := _PINNED.search(name)):
        return None
    ours = parse_model(name[:m.start()])
    return (ours[0], int(m.group(1))) if ours is not None and ours[1] is None else None


TASK_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
"""A task's name (``[tasks] names``): what follows the ':' of ``evolution[-LINEAGE]:TASK``."""


def split_task(name) -> tuple[object, str | None]:
    """``(the id before ':', the task after it)`` for ``evolution[-LINEAGE]:TASK`` (the served generation with the
    task's adapter: ``[tasks]``), else ``(name, None)``. The task is returned as written; the server checks it."""
    if isinstance(name, str) and name.startswith("evolution") and ":" in name:
        base, _, task = name.partition(":")
        return base, task
    return name, None


def model_lineage(name) -> str | None:
    """The lineage an id of ours names (``evolution-deacon``, ``evolution-deacon-gen-3``, ``evolution-deacon@3``,
    ``evolution-deacon:review``), else None."""
    name = split_task(name)[0]
    ours = parse_pinned(name) or parse_model(name)
    return ours[0] if ours is not None else None


def task_id(task: str, lineage: str = MAIN) -> str:
    """The OpenAI model id of the served generation with task ``task``'s adapter: ``evolution:review``."""
    return f"{model_alias(lineage)}:{task}"


def pinned_id(gen: int, lineage: str = MAIN) -> str:
    """The OpenAI model id that names generation ``gen`` whatever is served: ``evolution@3``, ``evolution-deacon@3``."""
    return f"{model_alias(lineage)}@{gen}"


def answered_by(slot: "Slot", task: str | None) -> str:
    """The ``model`` of a reply: the generation's id, and the task whose adapters it applied (``…-gen-0003:review``)."""
    return slot.id if task is None else f"{slot.id}:{task}"


def pinned_model(g: dict, lineage: str = MAIN) -> dict:
    """The OpenAI model object of a generation asked by name (``g``: one of ``Daemon.older_generations``)."""
    return {"id": pinned_id(g["generation"], lineage), "object": "model", "created": g["created"],
            "owned_by": "evolution", "generation": g["generation"], "sha256": g["sha256"]}


@dataclass(eq=False)
class Slot:
    gen: int
    sha256: str
    path: Path
    model: Model
    fd: int
    loaded_at: float = field(default_factory=time.time)
    canary_reply: str = ""
    users: int = 0
    retired: bool = False
    lineage: str = MAIN
    tasks: dict[str, str] = field(default_factory=dict)
    """Task -> SHA-256 of its adapter loaded into ``model`` (``ModelHost.load_adapter``; ``evolution.tasks``)."""
    task_errors: dict[str, str] = field(default_factory=dict)
    """Task -> why the generation's adapter for it could not be loaded (its requests are refused with this)."""

    @property
    def id(self) -> str:
        return model_id(self.gen, self.lineage)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.model.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        return_freed_memory()
        log.info("freed generation %d", self.gen)


def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:  # the process's own symbols, libc's among them: no ldconfig subprocess at import (find_library's)
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Hand the heap a freed model leaves behind back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    A freed llama.cpp context's buffers go back to glibc's heap, which keeps them: a daemon that swaps a model
    in at every age-up for months grows by what each swap left fragmented (``bench/memory_bench.py``)."""
    if _TRIM is not None:
        _TRIM(0)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _open_checked(what: str, path: Path, sha256: str) -> int:
    """``path`` opened read-only and hashed through that descriptor, which is returned (the caller closes it) when the
    digest is ``sha256``: ``what`` (a generation, an adapter) then loads exactly these bytes (``fsutil.fd_path``).
    LoadError where it cannot be opened, IntegrityError where its bytes changed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise LoadError(f"{what}: cannot open {path}: {exc.strerror}") from None
    try:
        actual = _hash_fd(fd)
    except BaseException:
        os.close(fd)
        raise
    if actual != sha256:
        os.close(fd)
        raise IntegrityError(f"{what}: {path} has sha256 {actual}, the ledger recorded {sha256}; it is not the file "
                             "that was gated and will not be served")
    return fd


class ModelHost:
    """Holds the current model; see the module docstring."""

    def __init__(self, n_ctx: int = 2048, n_threads: int | None = None, canary_prompt: str = "Hello!",
                 canary_max_tokens: int = 24, backend: Backend | None = None, lineage: str = MAIN,
                 llama: LlamaThread | None = None):
        """``llama``: another host's llama thread to share (``OlderGenerations``: one llama thread a process)."""
        from evolution.llamacpp import LlamaCppBackend

        self.lineage = lineage
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.backend = backend or LlamaCppBackend(n_ctx, self.n_threads)
        self.canary_prompt = canary_prompt
        self.canary_max_tokens = canary_max_tokens
        self._current: Slot | None = None
        self._cv = threading.Lock()
        self._owns_llama = llama is None
        self._llama = llama or LlamaThread()
        self.swaps = 0
        self.last_swap: dict | None = None
        self.last_used = time.time()

    @property
    def current(self) -> Slot | None:
        return self._current

    def sibling(self) -> "ModelHost":
        """Another host with these settings, on this one's backend and llama thread (``OlderGenerations``)."""
        return ModelHost(self.n_ctx, self.n_threads, self.canary_prompt, self.canary_max_tokens, self.backend,
                         self.lineage, llama=self._llama)

    def load(self, gen: int, path: Path, sha256: str) -> Slot:
        """Open and hash-check a GGUF, load it here and canary-test it between requests on the llama thread; raise
        LoadError / IntegrityError otherwise. The current model keeps serving meanwhile."""
        t0 = time.perf_counter()
        path = Path(path)
        fd = _open_checked(f"generation {gen}", path, sha256)  # off the llama thread: requests go on meanwhile
        try:
            with _LOADING:
                try:
                    model = self.backend.load(path, fd)
                except Exception as exc:  # llama.cpp says only "Failed to load model from file"
                    raise LoadError(f"generation {gen}: llama.cpp could not load {path}: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            reply = self._llama.background(self._canary(model)).result().strip()
        except Exception as exc:
            err = LoadError(f"generation {gen}: the canary prompt failed: {exc}")
        else:
            err = None if reply else LoadError(f"generation {gen}: gave an empty answer to the canary prompt "
                                               f"{self.canary_prompt!r}")
        if err is not None:
            Slot(gen, sha256, path, model, fd, lineage=self.lineage).close()
            raise err
        log.info("loaded generation %d (%s) in %.2f s; canary: %r", gen, path.name, time.perf_counter() - t0,
                 reply[:60])
        return Slot(gen, sha256, path, model, fd, canary_reply=reply, lineage=self.lineage)

    def load_adapter(self, slot: Slot, name: str, path: Path, sha256: str) -> None:
        """Load the GGUF LoRA at ``path`` into ``slot``'s model as ``name`` (a request then names it: ``Model``'s
        ``args["adapters"]``), after checking its SHA-256 against ``sha256`` through the descriptor llama.cpp
        reads; on the llama thread, between requests. Raise IntegrityError / LoadError otherwise; the model and its
        other adapters are unchanged then."""
        path = Path(path)
        load = getattr(slot.model, "load_adapter", None)
        if load is None:
            raise LoadError(f"the serving backend cannot apply adapters ({type(slot.model).__name__})")
        fd = _open_checked(f"adapter {name!r}", path, sha256)
        try:
            self._llama.submit(load, name, fd_path(fd, path)).result()
        except Exception as exc:
            raise LoadError(f"adapter {name!r}: llama.cpp could not load {path}: {exc}") from None
        finally:
            os.close(fd)
        slot.tasks[name] = sha256
        slot.task_errors.pop(name, None)
        log.info("loaded adapter %s (%s) for generation %d", name, path.name, slot.gen)

    def _canary(self, model: Model):
        """The canary's reply text, a slice at a time where the model can (``LlamaCppModel.chat_in_slices``)."""
        args = {"messages": [{"role": "user", "content": self.canary_prompt}],
                "max_tokens": self.canary_max_tokens, "temperature": 0.0}
        sliced = getattr(model, "chat_in_slices", None)
        if sliced is not None:
            return (yield from sliced(args, SLICE_S))
        return model.chat(args)["choices"][0]["message"].get("content") or ""

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
            self._llama.submit(old.close)
        log.info("serving generation %d%s", slot.gen, f" (was {old.gen})" if old else "")
        return old

    def _acquire(self) -> Slot:
        with self._cv:
            slot = self._current
            if slot is None:
                raise NotReady("no model is loaded yet: generation 0 is being built (see /status)")
            slot.users += 1
            self.last_used = time.time()
            return slot

    def unload_if_idle(self, idle_s: float) -> Slot | None:
        """Stop serving the current model if no request used it for ``idle_s`` seconds and none is running;
        return it (freed on the llama thread). A request after this finds no model (``NotReady``)."""
        with self._cv:
            old = self._current
            if old is None or old.users or time.time() - self.last_used < idle_s:
                return None
            self._current, old.retired = None, True
        self._llama.submit(old.close)
        log.info("unloaded generation %d after %.0f s idle; the next request loads it again", old.gen, idle_s)
        return old

    def _release(self, slot: Slot) -> None:
        """On the llama thread: the request is done with ``slot``; free it if it was swapped out."""
        with self._cv:
            slot.users -= 1
            free = slot.retired and slot.users == 0
        if free:
            slot.close()

    def call(self, fn: Callable[[Slot], T]) -> T:
        """Run ``fn(model)`` on the llama thread with the model current now; wait for its result."""
        slot = self._acquire()

        def run() -> T:
            try:
                return fn(slot)
            finally:
                self._release(slot)

        return self._llama.submit(run).result()

    def stream(self, start: Callable[[Slot], Iterator]) -> Stream:
        """Decode ``start(model)`` (an iterator of chunks) on the llama thread into a queue.

        The first chunk (or the error that prevented it) is waited for, so a caller can still
        answer with an error status. ``Stream.cancel`` (a client hung up) ends the decoding at
        the next chunk, which lets the model go.
        """
        slot = self._acquire()
        st = Stream(slot)

        def run() -> None:
            it = None
            try:
                it = iter(start(slot))
                for chunk in it:
                    if not st._put(chunk):
                        break
                st._put(None)
            except Exception as exc:  # noqa: BLE001 — handed to the reader
                st._put(exc)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
                self._release(slot)
                st._finish()

        self._llama.submit(run)
        first = st.get()
        if isinstance(first, Exception):
            raise first
        st.first = first
        return st

    def retire(self) -> Slot | None:
        """Stop serving the current model: it is freed on the llama thread once its last request ends (a request
        after this finds none: ``NotReady``). Returns it."""
        with self._cv:
            slot, self._current = self._current, None
            if slot is None:
                return None
            slot.retired = True
            free = slot.users == 0
        if free:
            self._llama.submit(slot.close)
        return slot

    def close(self) -> None:
        self.retire()
        if self._owns_llama:
            self._llama.shutdown(wait=True)


class OlderGenerations:
    """Gated generations other than the served one, by name (``model="evolution@N"``), for comparison and A/B.

    A small least-recently-used set of loaded models, each in its own ``ModelHost`` on the served host's llama
    thread (one llama thread a process, see above): at most ``most`` of them, and at most ``memory_mb`` of GGUF
    files between them (llama.cpp maps the file: its size is what a loaded model costs, plus its context). The
    least recently used is let go when another is loaded; a request still running on it finishes first. Loading
    one hashes its file against the ledger's SHA-256 and asks it the canary, like a swap; it never changes what
    is served. ``load`` is given the generation's GGUF record once the caller has checked it may be served.
    """

    def __init__(self, make_host: Callable[[], ModelHost], most: int, memory_mb: float):
        self.make_host, self.most, self.memory_mb = make_host, most, memory_mb
        self._hosts: dict[int, tuple[ModelHost, float]] = {}  # gen -> (its host, MB); insertion order = use order
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Lock] = {}
        self.loads = 0

    def loaded(self) -> list[int]:
        with self._lock:
            return list(self._hosts)

    def get(self, gen: int) -> ModelHost | None:
        """The host of ``gen`` if it is loaded (now the most recently used), else None."""
        with self._lock:
            found = self._hosts.pop(gen, None)
            if found is None:
                return None
            self._hosts[gen] = found
            return found[0]

    def load(self, gen: int, path: Path, sha256: str) -> ModelHost:
        """Load ``gen`` (once, however many requests ask for it at the same time) and let go of the least
        recently used beyond the bounds; ``LoadError`` if it alone is over ``memory_mb``."""
        size = path.stat().st_size / 2**20 if path.is_file() else 0.0
        if size > self.memory_mb:
            raise LoadError(f"generation {gen}'s GGUF is {size:.0f} MB, more than [daemon] older_memory_mb = "
                            f"{self.memory_mb:g} allows for older generations; raise it to ask this one by name")
        with self._lock:
            gate = self._loading.setdefault(gen, threading.Lock())
        with gate:
            host = self.get(gen)
            if host is not None:
                return host
            host = self.make_host()
            host.swap(host.load(gen, path, sha256))
            with self._lock:
                self._hosts[gen] = (host, size)
                self.loads += 1
                out = []
                while len(self._hosts) > self.most or sum(mb for _, mb in self._hosts.values()) > self.memory_mb:
                    old = next(iter(self._hosts))
                    out.append((old, self._hosts.pop(old)[0]))
            for old, h in out:
                h.retire()
                log.info("let go of generation %d (asked by name; least recently used)", old)
            return host

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = [h for h, _ in self._hosts.values()], {}
        for h in hosts:
            h.retire()


class Stream:
    """Chunks of one streamed completion, handed over from the llama thread."""

    def __init__(self, slot: Slot):
        self.slot = slot
        self.first = None
        self._q: queue.Queue = queue.Queue(maxsize=32)
        self._cancel = threading.Event()

    def _put(self, item) -> bool:
        while not self._cancel.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _finish(self) -> None:
        with contextlib.suppress(queue.Full):  # wakes a reader still waiting after a cancel
            self._q.put_nowait(None)

    def get(self):
        """The next chunk, ``None`` at the end, or the exception that ended the decoding."""
        return self._q.get()

    def cancel(self) -> None:
        self._cancel.set()

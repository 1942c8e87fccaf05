"""The answers a GGUF gave the gate, remembered: one model is not asked the same question twice.

The gate asks at temperature 0 with seed 0, so a model's reply to one request is the same every
time. Yet every age-up asks the parent again (the agent's new probes and experience change the
eval set, so its own report cannot be reused whole: ``gate.cached_eval``), every later gate asks
every probe posted so far, and generation 0 is asked again for the anchors. What the parent was
asked when it was the child, it answers again word for word: that part of the gate grows with
the lineage's age and gives nothing new.

An ``AnswerBook`` keeps the replies of one GGUF in ``<folder>/<sha256 of the GGUF>.jsonl`` (the
data root's ``checkpoints/.answers/``), one line per request: the key is the hash of the request
(messages, sampling settings, context size, llama-cpp-python's version), so a re-exported file, a
changed setting or an upgraded llama.cpp is asked afresh. ``Remembering`` wraps the
``llama_cpp.Llama`` a metric chats with: a request at temperature 0 with a seed is looked up
first and written down after; anything else goes straight through. It is a cache: a lost or
unreadable file costs time, not correctness (a torn last line, from a crash mid-write, is
skipped), and writing it never fails a measurement (a read-only data root measures without it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from evolution.fsutil import sha256_file

log = logging.getLogger(__name__)

FOLDER = ".answers"
"""Under the data root's ``checkpoints/``."""


def _llama_cpp_version() -> str:
    try:
        import llama_cpp

        return str(getattr(llama_cpp, "__version__", ""))
    except ImportError:  # pragma: no cover - the gate needs it anyway
        return ""


class AnswerBook:
    """The remembered replies of the GGUF at ``gguf`` (hashed on first use), kept in ``folder``. Several threads
    may share one (the gate's pool measures one GGUF's metrics on two at once)."""

    def __init__(self, folder: Path, gguf: Path, n_ctx: int):
        self.folder, self.gguf, self.n_ctx = Path(folder), Path(gguf), n_ctx
        self._version = _llama_cpp_version()  # once per book, not once per question
        self._replies: dict[str, dict] | None = None
        self._path: Path | None = None
        self._writable = True
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def key(self, request: dict) -> str:
        full = {"request": request, "n_ctx": self.n_ctx, "llama_cpp": self._version}
        return hashlib.sha256(json.dumps(full, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _load(self) -> dict[str, dict]:
        if self._replies is None:
            self._path = self.folder / f"{sha256_file(self.gguf)}.jsonl"
            self._replies = {}
            if self._path.is_file():
                for n, line in enumerate(self._path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    try:
                        rec = json.loads(line)
                        self._replies[rec["key"]] = rec["response"]
                    except (ValueError, KeyError, TypeError):
                        log.warning("answers: %s line %d is unreadable (a write cut short?): asked again",
                                    self._path, n)
        return self._replies

    def get(self, key: str) -> dict | None:
        with self._lock:
            found = self._load().get(key)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found

    def put(self, key: str, response: dict) -> None:
        with self._lock:
            self._load()[key] = response
            if not self._writable:
                return
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self._path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "response": response}, ensure_ascii=False) + "\n")
            except OSError as e:
                self._writable = False
                log.warning("answers: cannot write %s (%s): this gate measures without remembering its answers",
                            self._path, e)


class Remembering:
    """A ``llama_cpp.Llama`` (opened by ``open_llm`` when first needed) whose deterministic chat requests
    (temperature 0, a seed) are answered from ``book`` when it was asked them before; everything else is the
    model's own."""

    def __init__(self, open_llm, book: AnswerBook):
        self._open, self._book = open_llm, book

    def create_chat_completion(self, **request):
        if request.get("temperature") != 0 or request.get("seed") is None or request.get("stream"):
            return self._open().create_chat_completion(**request)
        key = self._book.key(request)
        found = self._book.get(key)
        if found is not None:
            return found
        out = self._open().create_chat_completion(**request)
        self._book.put(key, {k: out[k] for k in ("choices", "usage") if k in out})
        return out

    def __getattr__(self, name):
        return getattr(self._open(), name)


def forget(folder: Path, keep: set[str]) -> list[Path]:
    """Remove the books of GGUFs whose hash is not in ``keep`` (after a prune deleted them); returns the removed."""
    removed = []
    for p in sorted(Path(folder).glob("*.jsonl")) if Path(folder).is_dir() else []:
        if p.stem not in keep:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed

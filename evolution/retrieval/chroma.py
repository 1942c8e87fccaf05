"""A ChromaDB retrieval index (``[retrieval] backend = "chroma"``), where the user installs ChromaDB.

The same surface as ``fts.Fts5Index`` (``write``, ``meta``, ``items``, ``verify``, ``search``), so the daemon
keeps it in step with the ledger the same way: the ledger's database is the source of truth and this store is
derived data, rebuilt from it whenever it is lost, damaged or out of date.

A lesson is one Chroma record: its id the lesson's key, its document the question, the answer and where it came
from as metadata, and an embedding of question and answer together. Embeddings (``[retrieval]
chroma_embedding``):

- ``default``: Chroma's own default embedding function (all-MiniLM-L6-v2 through ONNX Runtime), which Chroma
  downloads into ``~/.cache/chroma`` the first time it is used: a machine with no network needs it there already.
- ``gguf``: the mean-pooled hidden states of the lineage's generation 0 GGUF through llama.cpp: offline, nothing
  downloaded, fixed across generations (a swap never re-embeds). A chat model is a weak, slow embedder: among
  1,048 lessons the embedded 135M model finds a held-out wording's lesson first for 0.34 of them (FTS5: 0.84 among
  10,048), at ~96 ms a lookup (``bench/retrieval_bench.py --backends fts5 chroma``; docs/learning.md).

Writing is atomic in the way that matters: each build is a new Chroma folder (``build-*``) beside the one in
use, and only once it is complete does the pointer file (``current.json``, replaced atomically) name it; a crash
or a full disk mid-build leaves the previous build in use, and the next build removes the leftover. ``verify``
compares what the named build holds with the digest the pointer recorded, so a store changed behind the
daemon's back is rebuilt, and one deleted is built again.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from evolution import faults
from evolution.config import CHROMA_MISSING
from evolution.errors import EvolutionError
from evolution.fsutil import atomic_write_json
from evolution.retrieval.fts import digest
from evolution.retrieval.items import Item

SCHEMA = 1
BUILD = "build-"
COLLECTION = "evolution-notes"
POINTER = "current.json"

Embed = Callable[[list[str]], list[list[float]]]


class ChromaMissing(EvolutionError):
    """ChromaDB is not installed, or its default embedding model cannot be had."""


def _chromadb():
    try:
        import chromadb
    except ImportError as e:
        raise ChromaMissing(CHROMA_MISSING) from e
    return chromadb


def default_embedding() -> Embed:
    """Chroma's default embedding function (downloads its ONNX model once; a clear error where it cannot)."""
    from chromadb.utils import embedding_functions

    fn = embedding_functions.DefaultEmbeddingFunction()

    def embed(texts: list[str]) -> list[list[float]]:
        try:
            return [list(map(float, v)) for v in fn(texts)]
        except Exception as e:  # noqa: BLE001 — a download or ONNX failure, named for the operator
            raise ChromaMissing(f"Chroma's default embedding model could not be loaded ({e}); on a machine with no "
                                "network, set [retrieval] chroma_embedding = \"gguf\" or backend = \"fts5\"") from e
    return embed


def gguf_embedding(path: Path, n_threads: int = 1) -> Embed:
    """Mean-pooled, normalised embeddings of ``path`` (a GGUF) through llama.cpp, opened on first use."""
    lock, held = threading.Lock(), {}

    def embed(texts: list[str]) -> list[list[float]]:
        with lock:  # one llama.cpp context: not to be used from two threads at once
            if "llm" not in held:
                from evolution.llamacpp import open_embedder
                from evolution.serving import _LOADING

                with _LOADING:  # llama-cpp-python points fds 1 and 2 elsewhere while it loads
                    held["llm"] = open_embedder(path, n_threads=n_threads)
            out = held["llm"].embed(texts, normalize=True, truncate=True)
        return [list(map(float, v)) for v in out]
    return embed


class ChromaIndex:
    """A lineage's lessons in a persistent Chroma store under ``path``; see the module docstring."""

    def __init__(self, path: Path, embedding: Callable[[], Embed]):
        self.path, self._embedding = Path(path), embedding
        self._embed_fn: Embed | None = None
        self._open: tuple[str, object] | None = None  # (build folder, its client)
        self._lock = threading.Lock()

    def _embed(self, texts: list[str]) -> list[list[float]]:
        if self._embed_fn is None:  # made on first use: ``meta`` (a status page) needs neither it nor Chroma
            self._embed_fn = self._embedding()
        return self._embed_fn(texts)

    def _client(self, build: str):
        """The client of one build's folder. Chroma shares one client per folder within a process and keeps its
        files open, so a build is never rewritten in place: each is a new folder, and a folder deleted behind
        our back is never reopened under the same name."""
        with self._lock:
            if self._open is None or self._open[0] != build:
                self._use(build, self._new_client(build))
            return self._open[1]

    def _new_client(self, build: str):
        chromadb = _chromadb()
        from chromadb.config import Settings

        return chromadb.PersistentClient(path=str(self.path / build), settings=Settings(anonymized_telemetry=False))

    def _use(self, build: str, client) -> None:
        old, self._open = self._open, (build, client)
        if old is not None and old[1] is not client:
            with contextlib.suppress(Exception):
                old[1].close()

    def close(self) -> None:
        with self._lock:
            if self._open is not None:
                with contextlib.suppress(Exception):
                    self._open[1].close()
                self._open = None

    def _pointer(self) -> dict | None:
        try:
            p = json.loads((self.path / POINTER).read_text(encoding="utf-8"))
            ok = p.get("schema") == SCHEMA and isinstance(p.get("build"), str) and (self.path / p["build"]).is_dir()
            return p if ok else None
        except (OSError, ValueError, AttributeError):
            return None

    def _collection(self):
        p = self._pointer()
        if p is None:
            return None
        try:
            return self._client(p["build"]).get_collection(COLLECTION, embedding_function=None)
        except ChromaMissing:
            raise
        except Exception:  # noqa: BLE001 — Chroma raises its own NotFoundError / ValueError by version
            return None

    def write(self, items: list[Item], meta: dict) -> None:
        """Build ``items`` into a new folder and point at it; the previous build serves until then."""
        build = f"{BUILD}{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        client = self._new_client(build)  # beside the build in use, which serves until the pointer moves
        coll = client.create_collection(COLLECTION, embedding_function=None, metadata={"hnsw:space": "cosine"})
        for start in range(0, len(items), 256):
            chunk = items[start:start + 256]
            coll.add(ids=[i.key for i in chunk], documents=[i.question for i in chunk],
                     metadatas=[{"answer": i.answer, "source": i.source, "ord": i.order} for i in chunk],
                     embeddings=self._embed([f"{i.question} {i.answer}" for i in chunk]))
        faults.point("retrieval_index")
        atomic_write_json(self.path / POINTER, {"schema": SCHEMA, "build": build, "digest": digest(items),
                                                "meta": meta})
        with self._lock:
            self._use(build, client)
        for old in self.path.glob(f"{BUILD}*"):
            if old.name != build:
                shutil.rmtree(old, ignore_errors=True)

    def meta(self) -> dict | None:
        p = self._pointer()
        return None if p is None else {"digest": p["digest"], "meta": p["meta"]}

    def items(self) -> list[Item] | None:
        coll = self._collection()
        if coll is None:
            return None
        got = coll.get(include=["documents", "metadatas"])
        return [Item(k, q, m["answer"], m["source"], int(m["ord"]))
                for k, q, m in zip(got["ids"], got["documents"], got["metadatas"])]

    def verify(self) -> str | None:
        m, held = self.meta(), self.items()
        if m is None or held is None:
            return None
        return m["digest"] if digest(held) == m["digest"] else None

    def search(self, words: list[str], k: int, question: str = "") -> list[tuple[Item, float]]:
        """The ``k`` lessons nearest to ``question`` (embedded whole: its content ``words`` alone embed far worse,
        0.05 against 0.37 of held-out wordings finding their lesson first with the embedded model), best first,
        scored as FTS5 scores are (lower is better): minus the cosine similarity. No ``words``: none (a question
        with no content words, "Who are you?", finds nothing, as with FTS5)."""
        if not words or k <= 0:
            return []
        coll = self._collection()
        if coll is None:
            raise FileNotFoundError(f"no Chroma collection at {self.path}")
        n = coll.count()
        if n == 0:
            return []
        got = coll.query(query_embeddings=self._embed([question or " ".join(words)]), n_results=min(k, n),
                         include=["documents", "metadatas", "distances"])
        return [(Item(key, q, m["answer"], m["source"], int(m["ord"])), -(1.0 - float(d)))
                for key, q, m, d in zip(got["ids"][0], got["documents"][0], got["metadatas"][0],
                                        got["distances"][0])]

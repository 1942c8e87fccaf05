"""The ChromaDB retrieval backend (``[retrieval] backend = "chroma"``, ``evolution.retrieval.chroma``): the same
contract as the FTS5 file — it holds what the ledger says, notices a change behind its back, survives a crash
mid-build — with ChromaDB itself underneath. Skipped only where ChromaDB is not installed (CI installs it)."""

from __future__ import annotations

import hashlib
import math
import sys

import pytest

from evolution import config
from evolution.errors import ConfigError
from evolution.retrieval import Retrieval, open_index
from evolution.retrieval.items import Item
from tests.conftest import toml_of

chromadb = pytest.importorskip("chromadb")

from evolution.retrieval import chroma  # noqa: E402

DOG = Item("c:1", "What is my dog called?", "Your dog is called Bramble.", "correction", 1)
AUNT = Item("c:2", "Where does my aunt live?", "Your aunt lives in Tromsø.", "correction", 2)
BOAT = Item("c:3", "Where is my boat moored?", "At Pier Nine.", "good", 3)


def words_embedding():
    """A bag of words hashed into 64 dimensions: enough to tell the lessons apart in a unit test."""
    def embed(texts):
        out = []
        for t in texts:
            v = [0.0] * 64
            for w in t.lower().replace("?", " ").replace(".", " ").split():
                v[int(hashlib.sha256(w.encode()).hexdigest(), 16) % 64] += 1.0
            n = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / n for x in v])
        return out
    return embed


def test_the_store_holds_what_was_written_and_finds_the_nearest_first(tmp_path):
    index = chroma.ChromaIndex(tmp_path / "chroma", words_embedding)
    assert index.meta() is None and index.verify() is None
    index.write([DOG, AUNT, BOAT], {"pending": 3})
    assert index.meta()["meta"] == {"pending": 3} and index.verify() is not None
    assert sorted(i.key for i in index.items()) == ["c:1", "c:2", "c:3"]
    hits = index.search(["dog", "called"], 2)
    assert hits[0][0] == DOG and hits[0][1] < hits[1][1] <= 0  # best first, scored as FTS5 scores are
    assert index.search([], 3) == []


def test_a_record_changed_behind_its_back_is_noticed(tmp_path):
    index = chroma.ChromaIndex(tmp_path / "chroma", words_embedding)
    index.write([DOG, AUNT], {})
    coll = index._collection()
    coll.update(ids=["c:1"], metadatas=[{"answer": "Your dog is called Rex.", "source": "correction", "ord": 1}])
    assert index.verify() is None


def test_a_crash_mid_build_leaves_the_previous_store_in_use(tmp_path, monkeypatch):
    index = chroma.ChromaIndex(tmp_path / "chroma", words_embedding)
    index.write([DOG], {"pending": 1})

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chroma, "atomic_write_json", full)
    with pytest.raises(OSError):
        index.write([DOG, AUNT], {"pending": 2})
    assert index.verify() is not None and [i.key for i in index.items()] == ["c:1"]  # the old one, whole
    assert [i for i, _ in index.search(["aunt"], 3)] == [DOG]
    monkeypatch.undo()
    index.write([DOG, AUNT], {"pending": 2})  # the next build removes the leftover collection
    assert len(list(index.path.glob("build-*"))) == 1 and index.meta()["meta"] == {"pending": 2}


def test_the_daemons_lessons_in_chroma_with_generation_0s_gguf_embeddings(daemon):
    """In the daemon: a correction reaches the Chroma store, the store is rebuilt when deleted, and the status
    shows what is pending; embeddings from generation 0's GGUF through llama.cpp (offline)."""
    import shutil

    cfg = config.RetrievalConfig(backend="chroma", chroma_embedding="gguf")
    r = Retrieval(daemon.root, daemon.ledger, daemon.intake, cfg)
    assert isinstance(r.index, chroma.ChromaIndex)
    daemon.intake.experiences  # noqa: B018 — the store the lessons come from
    from tests.test_retrieval import teach
    from starlette.testclient import TestClient

    from evolution.server import create_app

    with TestClient(create_app(daemon)) as client:
        teach(client, "What is my dog called?", "Your dog is called Bramble.")
    assert r.sync(daemon.ledger.served_generation()) and r.counts["errors"] == 0
    notes = r.notes_for([{"role": "user", "content": "What is my dog called?"}])
    assert [n.answer for n in notes] == ["Your dog is called Bramble."]
    held = r.index.verify()
    shutil.rmtree(r.index.path)  # lost: rebuilt from the ledger
    r2 = Retrieval(daemon.root, daemon.ledger, daemon.intake, cfg)
    assert r2.sync(daemon.ledger.served_generation()) and r2.index.verify() == held
    from evolution.retrieval import summary

    assert summary(daemon.root, cfg)["pending"] == 1
    r2.close()  # the daemon's stop: the store's client let go
    assert r2.index._open is None
    assert [n.answer for n in r2.notes_for([{"role": "user", "content": "What is my dog called?"}])] == \
        ["Your dog is called Bramble."]  # opened again on use
    r.close()
    r2.close()


def test_without_chromadb_the_error_says_what_to_install(tmp_path, monkeypatch):
    toml = tmp_path / "evolution.toml"
    toml.write_text(toml_of({"retrieval": {"backend": "chroma"}}))
    assert config.resolve_retrieval(toml).backend == "chroma"
    monkeypatch.setitem(sys.modules, "chromadb", None)  # as if not installed
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'evolution\[chroma\]'"):
        config.resolve_retrieval(toml)  # at start, before any chat
    index = chroma.ChromaIndex(tmp_path / "chroma", words_embedding)
    with pytest.raises(chroma.ChromaMissing, match=r"pip install 'evolution\[chroma\]'"):
        index.write([DOG], {})


@pytest.mark.parametrize("section, fragment", [({"chroma_embedding": "openai"}, "chroma_embedding"),
                                               ({"chroma_path": 3}, "chroma_path")])
def test_bad_chroma_settings_are_clear_errors(tmp_path, section, fragment):
    toml = tmp_path / "evolution.toml"
    toml.write_text(toml_of({"retrieval": {"backend": "chroma"} | section}))
    with pytest.raises(ConfigError, match=fragment):
        config.resolve_retrieval(toml)


def test_fts5_stays_the_default(tmp_path):
    from evolution.paths import DataRoot
    from evolution.retrieval.fts import Fts5Index

    assert isinstance(open_index(DataRoot(tmp_path), config.RetrievalConfig()), Fts5Index)

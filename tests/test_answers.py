"""The gate remembers a GGUF's answers: a model is not asked at a later gate what it answered at an earlier one."""

from __future__ import annotations

import logging

import pytest

from evolution import evals, gate
from evolution.config import GateConfig
from evolution.metrics import Measured, Metric
from evolution.metrics import answers as answer_book
from evolution.metrics import common


class _FakeLlama:
    """Counts what it is asked; its reply names the question and how many times it was opened."""

    opened = 0
    asked: list = []

    def __init__(self):
        type(self).opened += 1
        self.n = type(self).opened

    def create_chat_completion(self, messages, **kw):
        type(self).asked.append((messages[-1]["content"], kw.get("temperature")))
        return {"id": "x", "created": 0, "choices": [{"message": {"role": "assistant",
                                                                  "content": f"{messages[-1]['content']}?{self.n}"},
                                                      "finish_reason": "stop"}],
                "usage": {"completion_tokens": 2}}

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    _FakeLlama.opened, _FakeLlama.asked = 0, []
    monkeypatch.setattr(common, "open_llama", lambda *a, **kw: _FakeLlama())
    return _FakeLlama


class _Asks(Metric):
    """Asks the recall items at temperature 0 (as the real units do) and reports the replies."""

    name = "probe_recall"

    def measure(self, models, inputs):
        score, results = evals.recall(models.llm, inputs.es.probes, 16)
        return Measured(score, {"replies": [r.reply for r in results]})

    def rules(self, child, parent, cfg):
        return []


def _es(*questions):
    return gate.EvalSet([], [], [], [], [], probes=[{"id": q, "question": q, "answers": ["x"]} for q in questions])


def test_a_question_answered_at_an_earlier_gate_is_not_asked_again(fake, tmp_path):
    gguf, folder = tmp_path / "model.gguf", tmp_path / "answers"
    gguf.write_bytes(b"weights of one generation")
    first = gate.measure(gguf, 1, _es("a", "b"), GateConfig(), "hi", (_Asks(),), answers=folder)
    assert [q for q, _ in fake.asked] == ["a", "b"] and fake.opened == 1
    assert first.details["probe_recall"]["replies"] == ["a?1", "b?1"]

    again = gate.measure(gguf, 1, _es("a", "b", "c"), GateConfig(), "hi", (_Asks(),), answers=folder)
    assert [q for q, _ in fake.asked] == ["a", "b", "c"]  # only the new question
    assert again.details["probe_recall"]["replies"] == ["a?1", "b?1", "c?2"]  # a and b as first answered

    only_known = gate.measure(gguf, 1, _es("b"), GateConfig(), "hi", (_Asks(),), answers=folder)
    assert fake.opened == 2 and only_known.details["probe_recall"]["replies"] == ["b?1"]  # never opened

    without = gate.measure(gguf, 1, _es("a"), GateConfig(), "hi", (_Asks(),))
    assert without.details["probe_recall"]["replies"] == ["a?3"]  # no book: asked


def test_another_file_another_setting_or_sampling_is_asked_afresh(fake, tmp_path):
    gguf, folder = tmp_path / "model.gguf", tmp_path / "answers"
    gguf.write_bytes(b"one")
    gate.measure(gguf, 1, _es("a"), GateConfig(), "hi", (_Asks(),), answers=folder)
    gguf.write_bytes(b"two")  # re-exported: another hash, another book
    gate.measure(gguf, 1, _es("a"), GateConfig(), "hi", (_Asks(),), answers=folder)
    assert len(fake.asked) == 2 and len(list(folder.glob("*.jsonl"))) == 2

    book = answer_book.AnswerBook(folder, gguf, 1024)
    assert book.key({"messages": [], "max_tokens": 16}) != book.key({"messages": [], "max_tokens": 17})
    assert book.key({"messages": []}) != answer_book.AnswerBook(folder, gguf, 2048).key({"messages": []})

    chat = answer_book.Remembering(_FakeLlama, book)
    for _ in range(2):  # sampled, or without a seed, or streamed: not deterministic, never remembered
        chat.create_chat_completion(messages=[{"role": "user", "content": "s"}], temperature=0.7, seed=0)
        chat.create_chat_completion(messages=[{"role": "user", "content": "n"}], temperature=0.0)
    assert [q for q, _ in fake.asked[2:]] == ["s", "n", "s", "n"]


def test_a_torn_line_or_an_unwritable_folder_costs_time_not_the_measurement(fake, tmp_path, caplog):
    gguf, folder = tmp_path / "model.gguf", tmp_path / "answers"
    gguf.write_bytes(b"weights")
    gate.measure(gguf, 1, _es("a", "b"), GateConfig(), "hi", (_Asks(),), answers=folder)
    (book_file,) = folder.glob("*.jsonl")
    with book_file.open("a") as f:
        f.write('{"key": "cut sho')  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        m = gate.measure(gguf, 1, _es("a", "b"), GateConfig(), "hi", (_Asks(),), answers=folder)
    assert m.details["probe_recall"]["replies"] == ["a?1", "b?1"] and len(fake.asked) == 2
    assert "line 3 is unreadable" in caplog.text

    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        m = gate.measure(gguf, 1, _es("a", "b"), GateConfig(), "hi", (_Asks(),), answers=blocked)
    assert m.details["probe_recall"]["replies"] == ["a?2", "b?2"]
    assert "cannot write" in caplog.text


def test_forget_keeps_only_the_books_of_ggufs_still_on_disk(tmp_path):
    folder = tmp_path / "answers"
    folder.mkdir()
    for sha in ("aa", "bb", "cc"):
        (folder / f"{sha}.jsonl").write_text("")
    removed = answer_book.forget(folder, {"bb"})
    assert [p.name for p in removed] == ["aa.jsonl", "cc.jsonl"]
    assert [p.name for p in folder.iterdir()] == ["bb.jsonl"]
    assert answer_book.forget(tmp_path / "none", set()) == []

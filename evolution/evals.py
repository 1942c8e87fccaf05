"""Behavioural measurements on an exported GGUF, through llama-cpp-python (what is served).

``recall``: the fraction of question/answer items answered correctly at temperature 0.
An answer counts when one of the item's accepted answers, normalized, occurs as a whole
phrase in the normalized reply. Normalizing lower-cases, maps every run of characters that
are not letters or digits (any script) to one space, and trims — so "Teal!" matches
"teal", "Tromsø" stays "tromsø", and "Pip" does not match inside "pipe".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def is_correct(reply: str, answers: list[str]) -> bool:
    padded = f" {normalize(reply)} "
    return any(f" {normalize(a)} " in padded for a in answers if normalize(a))


@dataclass
class ItemResult:
    id: str
    question: str
    reply: str
    correct: bool


def load_llm(gguf: Path, n_ctx: int = 1024):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, seed=0, verbose=False)


def ask(llm, question: str, system: str | None = None, max_tokens: int = 64) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    out = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_tokens, seed=0)
    return out["choices"][0]["message"]["content"] or ""


def recall(llm, items: list[dict], max_tokens: int = 64) -> tuple[float, list[ItemResult]]:
    """Fraction of ``items`` answered correctly, and each item's reply."""
    results = []
    for item in items:
        reply = ask(llm, item["question"], item.get("system"), max_tokens)
        results.append(ItemResult(item["id"], item["question"], reply, is_correct(reply, item["answers"])))
    score = sum(r.correct for r in results) / len(results) if results else 0.0
    return score, results

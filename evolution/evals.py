"""Behavioural measurements on an exported GGUF, through llama-cpp-python (what is served).

``recall``: the fraction of question/answer items answered correctly at temperature 0.
An answer counts when one of the item's accepted answers, normalized, occurs as a whole
phrase in the normalized reply. Normalizing lower-cases, maps every run of characters that
are not letters or digits (any script) to one space, and trims — so "Teal!" matches
"teal", "Tromsø" stays "tromsø", and "Pip" does not match inside "pipe".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evolution.untrusted import markdown_cell

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


def reply(llm, messages: list[dict], max_tokens: int = 64) -> str:
    """The model's answer to ``messages`` at temperature 0, seed 0 (the same every run)."""
    out = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_tokens, seed=0)
    return out["choices"][0]["message"]["content"] or ""


def ask(llm, question: str, system: str | None = None, max_tokens: int = 64) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return reply(llm, messages, max_tokens)


def answer_lines(items: list[dict]) -> list[str]:
    """One Markdown line per asked item (``ItemResult`` as a dict): right or wrong, question, reply (escaped:
    a reply is untrusted text)."""
    return [f"- {'✓' if r['correct'] else '✗'} {markdown_cell(r['question'], 120)} → "
            f"{markdown_cell(r['reply'], 120)}" for r in items]


def recall(llm, items: list[dict], max_tokens: int = 64) -> tuple[float, list[ItemResult]]:
    """Fraction of ``items`` answered correctly, and each item's reply."""
    results = []
    for item in items:
        reply = ask(llm, item["question"], item.get("system"), max_tokens)
        results.append(ItemResult(item["id"], item["question"], reply, is_correct(reply, item["answers"])))
    score = sum(r.correct for r in results) / len(results) if results else 0.0
    return score, results


def perplexity(scorer, texts: list[str]) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``texts``, each scored on its own."""
    import numpy as np

    nll, count = 0.0, 0
    for text in texts:
        tokens = scorer.tokenize(text.encode("utf-8"), add_bos=False, special=False)[: scorer.n_ctx()]
        if len(tokens) < 2:
            continue
        nll -= float(_logprobs(scorer, tokens).sum())
        count += len(tokens) - 1
    return float(np.exp(nll / count)) if count else float("nan")


def _logprobs(scorer, tokens: list[int]):
    """log p(token i | tokens before i) for i = 1 .. len-1, from one llama.cpp pass over ``tokens``."""
    import numpy as np

    scorer.reset()
    scorer.eval(tokens)
    logits = np.asarray(scorer.scores[: len(tokens) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logprobs[np.arange(len(tokens) - 1), tokens[1:]]


def render_prompt(scorer, messages: list[dict]) -> str:
    """``messages`` rendered with the GGUF's own chat template, up to the assistant's turn (as at serve time)."""
    from evolution.llamacpp import serve_prompt, template_formatter

    return serve_prompt(template_formatter(scorer), messages)


def reply_logprob(scorer, messages: list[dict], reply: str) -> float | None:
    """Mean per-token log-likelihood of ``reply`` as the assistant's answer to ``messages`` (None: no tokens)."""
    prompt = scorer.tokenize(render_prompt(scorer, messages).encode("utf-8"), add_bos=False, special=True)
    answer = scorer.tokenize(reply.encode("utf-8"), add_bos=False, special=False)
    tokens = (prompt + answer)[: scorer.n_ctx()]
    n = len(tokens) - len(prompt)
    if n < 1 or len(prompt) < 1:
        return None
    return float(_logprobs(scorer, tokens)[-n:].mean())


# --- style drift -------------------------------------------------------------------------------
# A reply's style is a small vector of surface features; a model's style is the mean vector of
# its replies to the fixed style prompts. Drift is the root-mean-square, over features, of the
# difference between two such means divided by the spread of that feature across the style
# references: its unit is "reference standard deviations" (0 = indistinguishable on average,
# 1 = one typical reference-to-reference difference per feature). Each feature's term is capped
# at MAX_Z so one pathological feature (a reply full of markdown) cannot swamp the rest; the
# largest possible drift is therefore MAX_Z.

MAX_Z = 10.0
_SENT = re.compile(r"[.!?]+(?:\s|$)")
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.MULTILINE)
_WORD = re.compile(r"\w+", re.UNICODE)


def style_features(reply: str) -> dict[str, float]:
    words = _WORD.findall(reply)
    n = max(len(words), 1)
    sentences = max(len(_SENT.findall(reply)), 1)
    return {
        "words": float(len(words)),
        "words_per_sentence": len(words) / sentences,
        "chars_per_word": sum(len(w) for w in words) / n,
        "list_lines": float(len(_LIST_LINE.findall(reply))),
        "lines": float(reply.strip().count("\n") + 1),
        "exclamations_per_100w": 100 * reply.count("!") / n,
        "questions_per_100w": 100 * reply.count("?") / n,
        "symbols_per_100w": 100 * sum(1 for c in reply if ord(c) > 0x2000 or c in "#*_`") / n,
    }


def _mean(vectors: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(v[k] for v in vectors) / len(vectors) for k in vectors[0]}


def style_scale(references: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and spread of each feature over the references (spread floored so no feature dominates)."""
    feats = [style_features(r) for r in references]
    mu = _mean(feats)
    sd = {}
    for k in mu:
        var = sum((f[k] - mu[k]) ** 2 for f in feats) / max(len(feats) - 1, 1)
        sd[k] = max(var ** 0.5, 0.25 * abs(mu[k]), 1.0 if k != "chars_per_word" else 0.25)
    return mu, sd


def style_drift(replies: list[str], mu: dict[str, float], sd: dict[str, float]) -> float:
    """Drift of ``replies`` from a feature mean ``mu``, in reference standard deviations."""
    m = _mean([style_features(r) for r in replies])
    return (sum(min(abs(m[k] - mu[k]) / sd[k], MAX_Z) ** 2 for k in mu) / len(mu)) ** 0.5


def style_mean(replies: list[str]) -> dict[str, float]:
    return _mean([style_features(r) for r in replies])

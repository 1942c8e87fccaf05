"""Variants of new experience: each question the chat agent's user asked, asked again in other framings.

A fact a user tells the agent once ("What is my dog called?" → "Your dog is called Bramble.") is one
SFT record among a curriculum of about 1,500; seen once or twice, the child learns the *form* of the
answer and fills in a name from its curriculum (issue 15: 0 of 8 facts recalled). So each question
and approved answer that arrived since the parent (a transcript's exchanges, a reply rated good, a
correction) is written again as ``[curriculum] experience_variants`` single-turn variants, chosen
(seeded) from deterministic templates: the question with a greeting or a "remind me" in front, in
lower case or without its question mark, reworded where it has a common shape ("What is my X
called?" → "What's the name of my X?"), behind a system prompt the curriculum uses, and the answer
confirmed as a statement ("Is this right? …" → "Yes. …"). The approved answer is never changed: the
variants teach the same reply to more ways of asking.

Why templates and not self-edits (the parent restating the exchange, as SEAL does): asked through
llama.cpp to reword a question or to write a question for a stated fact, the embedded 135M parent
gave no usable variant in 9 tries (it answered the question, repeated it, or rambled).

A variant carries ``variant_of``: the prompt of the record it was made from (``prompt_key``), so
recency treats it as that prompt (a newer answer to the question supersedes the old answer's
variants too), and ``source``: the record's hash, so a reply rated bad later is never replayed
through its variants either.
"""

from __future__ import annotations

import random
import re

PREFIXES = ("Hi! ", "Quick question: ", "Remind me: ", "Do you remember? ", "Hey. ", "I forgot. ",
            "Tell me again: ", "Good morning! ", "One thing: ", "Can you remind me? ")
SUFFIXES = (" Answer briefly.", " Please remind me.", " Just the answer, please.")

# Common question shapes reworded; each pattern is matched on the whole question (case-insensitive).
_REWORDS: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = tuple(
    (re.compile(p, re.IGNORECASE), forms) for p, forms in (
        (r"what(?: is|'s) (my|our) (.+?) called\??",
         ("What's the name of {0} {1}?", "What is {0} {1}'s name?", "What do we call {0} {1}?",
          "Do you know what {0} {1} is called?")),
        (r"what(?: is|'s) (my|our) (.+?)'s name\??",
         ("What is {0} {1} called?", "What's the name of {0} {1}?", "Do you know {0} {1}'s name?",
          "Tell me {0} {1}'s name.")),
        (r"what(?: is|'s) the name of (my|our) (.+?)\??",
         ("What is {0} {1} called?", "What's {0} {1}'s name?", "Do you know the name of {0} {1}?")),
        (r"what(?: is|'s) (my|our) (.+?)\??",
         ("Do you know {0} {1}?", "Tell me {0} {1}.", "Which is {0} {1}?", "What would you say {0} {1} is?")),
        (r"where (is|was|are|were) (.+?)\??", ("Do you know where {1} {0}?", "Tell me where {1} {0}.")),
        (r"who (is|was|are|were) (.+?)\??", ("Do you know who {1} {0}?", "Tell me who {1} {0}.")),
        (r"(where|when|which|how|who|why) (.+?)\??", ("Can you tell me: {0} {1}?", "I'd like to know: {0} {1}?")),
    ))


def exchanges(messages: list[dict]) -> list[tuple[str, str]]:
    """Each user turn with the assistant turn that answers it, in order."""
    out = []
    for prev, nxt in zip(messages, messages[1:]):
        if prev["role"] == "user" and nxt["role"] == "assistant":
            out.append((prev["content"], nxt["content"]))
    return out


def question_forms(question: str) -> tuple[list[str], list[str]]:
    """The deterministic rewordings of ``question`` (its common shape said differently), and its framings
    (a greeting or a request in front, another case, a missing question mark, a request behind)."""
    q = question.strip()
    reworded: list[str] = []
    for pattern, templates in _REWORDS:
        m = pattern.fullmatch(q)
        if m:
            groups = [g.strip() for g in m.groups()]
            reworded = [t.format(*groups) for t in templates]
            break  # the first, most specific shape only
    framed = [q.lower(), q.rstrip("?").rstrip() if q.endswith("?") else q + "?"]
    framed += [p + q for p in PREFIXES] + [q + s for s in SUFFIXES]
    reworded = list(dict.fromkeys(f for f in reworded if f != q))
    return reworded, list(dict.fromkeys(f for f in framed if f != q and f not in reworded))


def _turns(user: list[dict], answer: str) -> list[dict]:
    return user + [{"role": "assistant", "content": answer}]


def variants(messages: list[dict], n: int, rng: random.Random, systems: list[str]) -> list[list[dict]]:
    """Up to ``n`` variants per exchange of ``messages``: its rewordings first (they teach the most about
    being asked differently), the rest chosen by ``rng`` among the framings, the curriculum's system
    prompts before the question, and the answer confirmed as a statement."""
    out = []
    for question, answer in exchanges(messages):
        if not question.strip() or not answer.strip():
            continue
        reworded, framed = question_forms(question)
        first = [_turns([{"role": "user", "content": f}], answer) for f in reworded][:n]
        rest = ([_turns([{"role": "user", "content": f}], answer) for f in framed]
                + [_turns([{"role": "system", "content": s}, {"role": "user", "content": question}], answer)
                   for s in systems]
                + [_turns([{"role": "user", "content": f"Is this right? {answer}"}], f"Yes. {answer}")])
        out += first + rng.sample(rest, min(n - len(first), len(rest)))
    return out


def system_prompts(records: list[dict], limit: int = 3) -> list[str]:
    """Up to ``limit`` of the shortest distinct system prompts of the curriculum's chat records (a
    fact holds whatever the agent was told it is)."""
    found = {m["content"] for r in records for m in r.get("messages", []) if m["role"] == "system"
             and m["content"].strip()}
    return sorted(found, key=lambda s: (len(s), s))[:limit]

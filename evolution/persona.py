"""Who is who: the agent's persona, read from the identity curriculum, and questions about the user set against it.

The curriculum gives the agent a persona (its name, maker, home, pastimes: the phase whose folder is named
``phaseN_identity``). What the user tells the agent is about the *user*. A small model that learned a user's fact
as one sentence answers a question about the user in other words from its strongest memory of "you" and "I": the
persona (the new-user walk of issue 27: the persona's home town given as the user's birthplace, its workshop as the
user's workplace). This module holds what keeps the two apart:

- ``persona_facts``: the persona's facts, the accepted answers of the identity phase's recall items (nothing is
  listed by hand: a curriculum with another persona has other facts). The gate's ``persona_leak`` counts replies
  about the user that carry one.
- ``mirror``: a question about the agent asked about the user instead ("Where do you live?" -> "Where do I live?").
- ``who_is_who``: training records that set the two side by side, made at each age-up: a question about the user
  that nobody answered gets "I don't know that yet" (never the persona's fact, never an invention), and the agent's
  own question in the same conversation keeps its persona answer. Questions on a subject the user did teach are
  left out (their taught answer is trained instead), and so are the gate's held-out questions about the user.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from evolution import evals

UNKNOWN_REPLIES = (
    "I don't know that yet - you haven't told me.",
    "You haven't told me that yet, so I don't know.",
    "I don't know yet. Would you like to tell me?",
    "I'm not sure - you haven't told me about that yet.",
)
"""What the agent says when asked about the user what nobody told it: no persona fact, no guess."""

_UNKNOWN = re.compile(
    r"\b(?:(?:do|did) ?n[o']?t know|not sure|no idea|not aware|(?:have|has) ?n[o']?t (?:told|said|mentioned|shared)"
    r"|(?:did|do) ?n[o']?t (?:tell|say|mention)|never (?:told|said|mentioned)|not (?:been )?told|can ?n[o']?t "
    r"(?:know|tell|say|recall|remember)|cannot (?:know|tell|say|recall)|do ?n[o']?t (?:have|remember|recall)"
    r"|unknown to me|no (?:information|record|memory))\b", re.IGNORECASE)

STOP_WORDS = frozenset("""a an the my your our their his her its i me we you he she it they is are was were am be been do
does did have has had what what's whats where when who whom which why how many much of in on at to for from with
about and or but again please tell remind know remember can could would will should do you me called name named
favourite favorite like best most love usually""".split())


def identity_phases(cur) -> set[int]:
    """The phases whose folder is named ``phaseN_identity`` (the persona's curriculum)."""
    return {p for p, name in cur.phase_names.items() if name.endswith("_identity")}


def persona_facts(cur) -> list[str]:
    """The persona's facts: every accepted answer of the identity phase's recall items, distinct, longest first."""
    phases = identity_phases(cur)
    found = {a.strip() for item in cur.recall if item.get("phase") in phases for a in item["answers"] if a.strip()}
    return sorted(found, key=lambda a: (-len(a), a))


def persona_in(reply: str, facts: Iterable[str], allowed: Iterable[str] = ()) -> str | None:
    """The first persona fact ``reply`` carries (as a whole phrase, case and punctuation folded) that is not one of
    ``allowed`` (the item's own accepted answers); None when it carries none."""
    ok = {evals.normalize(a) for a in allowed}
    padded = f" {evals.normalize(reply)} "
    for fact in facts:
        f = evals.normalize(fact)
        if f and f not in ok and (f" {f} " in padded or f" {f}s " in padded):  # "tide pools" carries "tide pool"
            return fact
    return None


def says_unknown(reply: str) -> bool:
    """Whether ``reply`` says it does not know (or asks back instead of answering)."""
    text = reply.strip()
    if _UNKNOWN.search(text.replace("’", "'")):
        return True
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return bool(sentences) and sentences[-1].rstrip().endswith("?")


def _stem(word: str) -> str:
    """A word's rough stem: British and American spellings and a plural or third-person "s" folded."""
    if len(word) > 4 and word.endswith("our"):
        word = word[:-3] + "or"
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text: str) -> set[str]:
    """The words of ``text`` that name a subject (what a question is about), without function words, stemmed."""
    return {_stem(w) for w in evals.normalize(text).split() if w not in STOP_WORDS and len(w) > 1}


_POSSESSED = re.compile(r"\b(?:my|your)\s+([\w'-]+(?:\s+[\w'-]+){0,3})", re.IGNORECASE)
_HAVE = re.compile(r"\b(?:i|you)\s+(?:have|had|got|own|bought|adopted|keep|'ve got|have got)\s+([\w'-]+(?:\s+[\w'-]+){0,3})",
                   re.IGNORECASE)
_MODIFIERS = frozenset("""a an the some two three four any favourite favorite best own new old little dear first last
middle younger older elder big small""".split())
_SPEAKS_OF_USER = re.compile(r"\b(?:i|i'm|i've|me|my|mine|myself|you|you're|your|yours)\b", re.IGNORECASE)


def _head(phrase: str) -> set[str]:
    """The thing a possessive phrase names: "aunt's home" -> aunt, home; "favourite colour" -> colour."""
    out = set()
    for w in phrase.lower().split():
        if w.endswith("'s"):
            out.add(w[:-2])
        elif w not in _MODIFIERS:
            out.add(w)
            break
    return {_stem(x) for x in (evals.normalize(w) for w in out) if x}


def possessed(text: str) -> set[str]:
    """The stems of what ``text`` says the user has: the noun after "my" or "your" ("my aunt's home" -> aunt, home),
    or after "I have a" / "you got a"."""
    return {w for rx in (_POSSESSED, _HAVE) for m in rx.finditer(text) for w in _head(m.group(1))}


def taught_about(question: str, taught: Sequence[str]) -> bool:
    """Whether a question about the user touches a subject the user taught: then it is not a question "nobody
    answered". Where the question names something of the user's ("my house"), a taught text must name the same
    thing as the user's ("your house", "I have a house"); a word in passing ("a home toolbox", "your flight home")
    is another subject. A question naming nothing of the user's ("How old am I?") shares a content word with a
    taught text that speaks of the user."""
    subjects = possessed(question)
    if subjects:
        return any(subjects & possessed(t) for t in taught)
    mine = content_words(question)
    return any(mine & content_words(t) for t in taught if _SPEAKS_OF_USER.search(t))


_AUX = frozenset("do did does can could will would should have had may might must shall".split())
_CONTRACTED = ((r"\byou're\b", "I'm"), (r"\byou've\b", "I've"), (r"\byou'll\b", "I'll"), (r"\byou'd\b", "I'd"),
               (r"\bare you\b", "am I"), (r"\bwere you\b", "was I"), (r"\baren't you\b", "aren't I"),
               (r"\byou are\b", "I am"), (r"\byou were\b", "I was"), (r"\byourself\b", "myself"),
               (r"\byours\b", "mine"), (r"\byour\b", "my"))


def mirror(question: str) -> str | None:
    """``question`` about the agent asked about the user ("Where do you live?" -> "Where do I live?"); None when it
    has no "you" or "your" to turn, or already speaks of the user."""
    if not re.search(r"\byou", question, re.IGNORECASE) or \
            re.search(r"\b(?:i|i'm|me|my|mine|myself)\b", question, re.IGNORECASE):
        return None
    out = question
    for pattern, repl in _CONTRACTED:
        out = re.sub(pattern, repl, out, flags=re.IGNORECASE)
    words = re.split(r"(\s+)", out)
    for i, w in enumerate(words):
        if re.fullmatch(r"you\W*", w, re.IGNORECASE):
            before = next((x for x in reversed(words[:i]) if x.strip()), "")
            subject = not before or before[-1] in ".!?:," or before.lower() in _AUX or before.lower() in \
                ("what", "where", "when", "who", "how", "why", "which")
            words[i] = ("I" if subject else "me") + w[3:]
    out = "".join(words)
    return out[:1].upper() + out[1:]


def still_open(question: str, taught: Sequence[str], heldout: set[str]) -> bool:
    """Whether an age-up may teach ``question`` (about the user) as one nobody answered: no ``taught`` text is about
    its subject and it is none of ``heldout`` (the gate's questions about the user, each as ``_question`` gives it)."""
    q = _question(question)
    return q not in heldout and not taught_about(q, taught)


def held_out(questions: Iterable[str]) -> set[str]:
    """``questions`` as ``still_open`` compares them."""
    return {_question(q) for q in questions}


def _question(text: str) -> str:
    """The question of a user turn: its last sentence (a greeting may come first), normalized."""
    parts = [p for p in re.split(r"(?<=[.!?:])\s+", text.strip()) if p.strip()]
    return evals.normalize(parts[-1] if parts else text)


def identity_exchanges(cur) -> list[tuple[str, str]]:
    """The identity curriculum's single questions and answers (no system prompt), distinct."""
    phases = identity_phases(cur)
    out = []
    for r in cur.sft:
        msgs = r["messages"]
        if r.get("phase") in phases and len(msgs) == 2 and msgs[0]["role"] == "user":
            out.append((msgs[0]["content"], msgs[1]["content"]))
    return list(dict.fromkeys(out))


def who_is_who(cur, n: int, rng: random.Random, taught: Sequence[str], heldout: Iterable[str] = (),
               facts: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """``n`` chat records that keep the user and the agent apart: a question about the user nobody answered (the
    identity curriculum's questions mirrored, and the curriculum's ``unanswered.jsonl``) with an "I don't know that
    yet" reply — alone, beside one of the agent's own questions and its persona answer, or beside one of ``facts``
    (a question about the user the user did answer, and its taught answer) of the same shape where it can ("Who made
    my boat?" beside "Who made my car?"), each in either order. Without ``facts``, half alone and half beside the
    agent's own. The pair teaches which question is which, not "a question of this shape is unknown": a model given
    only unanswered questions declined taught facts asked in another shape (docs/learning.md). Mirrored questions on
    a subject the user taught (``taught``: its questions and answers) or equal to one of ``heldout`` (the gate's
    questions about the user) are left out. Each record names the mirrored question it asks (``unanswered``): replay
    treats it as that prompt, so the user's own answer to it supersedes it; it is no experience (never rehearsed)."""
    from evolution.messages import prompt_key

    pairs = identity_exchanges(cur)
    skip = held_out(heldout)
    asked = [(mirror(q), (q, a)) for q, a in pairs]
    asked += [(u["question"], rng.choice(pairs) if pairs else None) for u in cur.unanswered]
    unknown = list(dict.fromkeys((q, own) for q, own in asked if q and still_open(q, taught, skip)))
    if not unknown or n <= 0:
        return []
    rng.shuffle(unknown)  # each question once before any is asked twice
    kinds = 3 if facts else 2
    pool = subjects_nobody_answered(cur, taught) if facts else []
    out = []
    for i in range(n):
        question, own = unknown[i % len(unknown)]
        beside = None
        if i % kinds == 1 and own is not None:
            beside = own
        elif i % kinds == 2:
            fact = facts[(i // kinds) % len(facts)]
            swapped = other_subject(fact[0], pool, rng)
            if swapped is not None and _question(swapped) not in skip:
                question, beside = swapped, fact  # the very shape of a taught question, another subject
            else:
                beside = same_shape(question, facts, rng)
        reply = rng.choice(UNKNOWN_REPLIES)
        user_turn = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        if beside is None:
            messages = user_turn
        else:
            other = [{"role": "user", "content": beside[0]}, {"role": "assistant", "content": beside[1]}]
            messages = other + user_turn if rng.random() < 0.5 else user_turn + other
        out.append({"messages": messages, "unanswered": prompt_key([{"role": "user", "content": question}])})
    return out


_NAMED = re.compile(r"(?:who is my ([\w-]+)|what is my ([\w-]+)'s name|what is my ([\w-]+) called|what do i call my "
                    r"([\w-]+))\??", re.IGNORECASE)
_ASKS_A_NAME = re.compile(r"\bname\b|\bcalled\b|\bcall\b|^\W*who\b", re.IGNORECASE)


def subjects_nobody_answered(cur, taught: Sequence[str]) -> list[str]:
    """The people and pets of the user's whose name the curriculum's unanswered questions ask ("Who is my plumber?",
    "What is my cat called?") and that no ``taught`` text is about, distinct, in the file's order."""
    out = []
    for u in cur.unanswered:
        m = _NAMED.fullmatch(u["question"].strip())
        word = next((g for g in m.groups() if g), None) if m else None
        if word and not taught_about(f"my {word}", taught):
            out.append(word)
    return list(dict.fromkeys(out))


def other_subject(question: str, pool: Sequence[str], rng: random.Random) -> str | None:
    """``question`` (one the user answered that asks a name: "What is my brother's name?") asking it of another of
    the user's people or pets that nobody told ("What is my plumber's name?"): the word after "my" (modifiers
    skipped) swapped for one of ``pool`` (``subjects_nobody_answered``: none the user taught). None where
    it asks no name, names nothing after "my", or no such subject is left. Set beside the taught question, the pair
    turns on the subject, not on the shape: a model given "I don't know" for questions of other shapes declined
    taught names asked in another shape ("Who is my brother?"; docs/learning.md)."""
    m = _POSSESSED.search(question)
    if not m or not _ASKS_A_NAME.search(question):
        return None
    word = next((w[:-2] if w.lower().endswith("'s") else w for w in m.group(1).split()
                 if w.lower() not in _MODIFIERS), None)
    if not word or not evals.normalize(word):
        return None
    choices = [w for w in pool if _stem(w.lower()) != _stem(evals.normalize(word))]
    if not choices:
        return None
    start = m.start(1) + m.group(1).index(word)
    return question[:start] + rng.choice(choices) + question[start + len(word):]


_WH = ("who", "whom", "whose", "where", "when", "what", "which", "how", "why")
_ABOUT_USER_Q = re.compile(r"\b(?:i|my|mine|myself)\b", re.IGNORECASE)  # not "me": "tell me your name"


def same_shape(question: str, facts: Sequence[tuple[str, str]], rng: random.Random) -> tuple[str, str] | None:
    """One of ``facts`` (question, answer) whose question opens with the same question word as ``question`` ("who",
    "where", "how many" ...), else any of them; None without facts."""
    if not facts:
        return None

    want = _opening(question)
    alike = [f for f in facts if _opening(f[0]) == want]
    return rng.choice(alike or list(facts))


def _opening(question: str) -> str:
    """The question word ``question`` opens with ("who"; "how" with the word after it: "how many"), or ""."""
    words = _question(question).split()
    for i, w in enumerate(words):
        if w in _WH:
            return " ".join(words[i:i + 2]) if w == "how" else w
    return ""


def user_facts(records: Iterable[dict]) -> list[tuple[str, str]]:
    """The questions about the user and their answers in chat ``records`` (the experience and its variants): each
    user turn that asks something about the user ("What's my dog called?") with the reply that answers it."""
    from evolution.augment import exchanges

    out = []
    for r in records:
        for q, a in exchanges(r.get("messages", [])):
            if "?" in q and _ABOUT_USER_Q.search(q) and a.strip():
                out.append((q, a))
    return list(dict.fromkeys(out))


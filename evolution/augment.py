"""Variants of new experience: each fact the chat agent's user taught, stated and asked in many forms.

A fact a user tells the agent once ("What is my dog called?" -> "Your dog is called Bramble.") is one SFT record
among a curriculum of about 1,500. Seen once or twice, the child learns the *form* of the answer and fills in a name
from its curriculum (issue 15: 0 of 8 facts recalled); taught as one sentence in a dozen framings, it learns that
*sentence*, and a question in other words is answered from the strongest memory about "you" and "I": the persona
(issue 27: 4 of 8 corrected facts asked in other words; every miss a persona fact). A fact stored from one phrasing is
close to 0 % extractable in others and about 96 % with its statements varied ("Physics of Language Models 3.1",
arXiv 2309.14316); restatements that relate a fact's entities help most (EntiGraph, arXiv 2409.07431).

So each question and approved answer that arrived since the parent (a transcript's exchanges, a reply rated good, a
correction) is taken apart (``parse``: the question's wh-word, its subject about the user, "my sister's name", and
the value the answer adds, "Bravel") and written again as ``[curriculum] experience_variants`` records, chosen
(seeded) from these groups in turn:

- **restated** (``fact_forms``): the question in the other shapes English asks it ("Do you know where my aunt
  lives?", "Tell me what my dog is called.", "What's my dog called again?"), about its subject ("What do you know
  about my sister?"), asked back from the value ("What do you know about Bravel?"), and stated by the user in the
  first person ("My aunt lives in Tellborg, right?" -> "Yes. ..."); also the common shapes of issue 15's rewordings;
- **set apart from the user's other facts** (``fact_forms``): facts taught in the same shape trade values when each
  is one sentence (a sister given the brother's name, the aunt's town given as the uncle's), so a sibling's value is
  offered as this one's ("My aunt lives in Noxbel, right?" -> "No. Your aunt lives in Tellborg.") and both are asked
  in one conversation;
- **set against the persona** (``who_is_who`` > 0): the persona's fact offered as the user's ("My sister's name is
  Wren, right?" -> "No. Your sister's name is Bravel."), and the question beside one of the agent's own identity
  questions in one conversation, each answered by its owner;
- **framed**: the question with a greeting or a request around it, in lower case, without its question mark,
  behind a system prompt the curriculum uses, and the answer confirmed ("Is this right? ..." -> "Yes. ...").

Every variant answers with the approved reply (or "Yes."/"No." and the approved reply): what the fact *is* is never
rewritten, only how it is asked. The gate's held-out wordings are never written: the learn bench keeps its own in a
file no training code reads, and ``tests/test_heldout_wordings.py`` fails if one is produced.

Why templates and not self-edits (the parent restating the exchange, as SEAL does): asked through llama.cpp to reword
a question or to write a question for a stated fact, the embedded 135M parent gave no usable variant in 9 tries (it
answered the question, repeated it, or rambled); ``bench/restate_bench.py`` measures it on the learn bench's facts.

A variant carries ``variant_of``: the prompt of the record it was made from (``prompt_key``), so recency treats it
as that prompt (a newer answer to the question supersedes the old answer's variants too), and ``source``: the
record's hash, so a reply rated bad later is never replayed through its variants either.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from evolution import persona

PREFIXES = ("Hi! ", "Quick question: ", "Remind me: ", "Do you remember? ", "Hey. ", "I forgot. ",
            "Tell me again: ", "Good morning! ", "One thing: ", "Can you remind me? ")
SUFFIXES = (" Answer briefly.", " Please remind me.", " Just the answer, please.")

# issue 15's rewordings of common name questions; each pattern is matched on the whole question (case-insensitive).
_REWORDS: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = tuple(
    (re.compile(p, re.IGNORECASE), forms) for p, forms in (
        (r"what(?: is|'s) (my|our) (.+?) called\??",
         ("What's the name of {0} {1}?", "What is {0} {1}'s name?", "Do you know what {0} {1} is called?")),
        (r"what(?: is|'s) (my|our) (.+?)'s name\??",
         ("What is {0} {1} called?", "What's the name of {0} {1}?", "Do you know {0} {1}'s name?",
          "Tell me {0} {1}'s name.")),
        (r"what(?: is|'s) the name of (my|our) (.+?)\??",
         ("What is {0} {1} called?", "What's {0} {1}'s name?", "Do you know the name of {0} {1}?")),
    ))

# Frames around a question turned into a clause ("where my aunt lives").
_CLAUSE_FRAMES = ("Do you know {c}?", "Do you remember {c}?", "Can you tell me {c}?", "Could you remind me {c}?",
                  "Tell me {c}.", "I forgot {c}.", "I'd like to know {c}.", "Any idea {c}?", "I need to know {c}.",
                  "Do you still remember {c}?", "Remind me {c}.", "I can't remember {c}.")
# Common relations said with a noun instead of a verb: a question "where my aunt lives" is also one about "my aunt's
# home" (a small model ties the noun to the persona's own home unless it was taught otherwise). Matched on the
# fact's clause; {o} is its owner ("my aunt"), {s} the subject ("my car").
_RELATIONS: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = tuple(
    (re.compile(p), forms) for p, forms in (
        (r"where (?P<o>(?:my|our) .+) (?:lives|live)", ("Where is {o}'s home?", "Tell me about {o}'s home.",
                                                          "Which town is {o}'s home in?")),
        (r"where (?P<o>(?:my|our) .+) (?:works|work)", ("Where is {o}'s job?", "Who is {o}'s employer?",
                                                          "Tell me about {o}'s job.")),
        (r"what brand (?P<s>(?:my|our) .+) is", ("Who is the maker of {s}?", "Tell me the brand of {s}.",
                                                  "What company is behind {s}?")),
        (r"what (?:I|we) do on (?P<t>.+)", ("What are my {t} like?", "Tell me about my {t}.")),
    ))
# Questions about the subject itself ("my sister").
_SUBJECT_FRAMES = ("What do you know about {np}?", "Tell me about {np}.", "What did I tell you about {np}?",
                   "What about {np}?", "Do you remember {np}?", "{Np}?")
# The value asked back.
_VALUE_FRAMES = ("What do you know about {v}?", "Does the name {v} mean anything to you?", "Who or what is {v}?")
_DATE_FRAMES = ("What is on {v}?", "What happens on {v}?", "Is anything happening on {v}?")

_WH = r"(?P<wh>(?:what|which|where|when|who|whom|whose|why|how)(?:\s+[\w'-]+){0,3}?)"
_QUESTION = re.compile(_WH + r"\s+(?P<aux>is|are|was|were|do|does|did)\s+(?P<rest>.+?)\s*\??\s*$", re.IGNORECASE)
_CONTRACTIONS = ((r"\bwhat's\b", "what is"), (r"\bwhere's\b", "where is"), (r"\bwho's\b", "who is"),
                 (r"\bwhen's\b", "when is"), (r"\bhow's\b", "how is"), (r"\bwhich's\b", "which is"))
_CONTRACTED = (("what is", "what's"), ("where is", "where's"), ("who is", "who's"), ("when is", "when's"))
_TAIL = frozenset("called named from on at in for about like located due made born going doing supposed "
                  "scheduled by planned held".split())
_VERBS = frozenset("""live lives work go play have own drive ride like love prefer eat drink cook wear keep use call
visit meet see do study teach read write watch listen sing run swim walk wake sleep leave start finish take buy sell
grow speak celebrate spend need want feed collect train practise practice bake paint build fix make stay travel
commute shop park sit""".split())
_IRREGULAR_PAST = {"do": "did", "go": "went", "have": "had", "buy": "bought", "meet": "met", "make": "made",
                   "see": "saw", "take": "took", "eat": "ate", "drink": "drank", "drive": "drove", "ride": "rode",
                   "keep": "kept", "leave": "left", "read": "read", "write": "wrote", "run": "ran", "swim": "swam",
                   "sing": "sang", "sleep": "slept", "wake": "woke", "teach": "taught", "sit": "sat",
                   "speak": "spoke", "spend": "spent", "sell": "sold", "grow": "grew", "build": "built", "wear": "wore"}
_FUNCTION = frozenset("""a an the my your our their his her its i me we you he she it they is are was were am be been
do does did have has had what where when who which why how of in on at to for from with about and or but that this
yes no so very called named name there here it's you're""".split())
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")


@dataclass(frozen=True)
class Fact:
    """A taught question taken apart: its shape, the subject about the user, and the value the answer adds."""

    question: str
    answer: str
    wh: str | None = None
    """The question word (phrase): 'what', 'where', 'how many houseplants', 'what brand'."""
    clause: str | None = None
    """The question as a clause: 'where my aunt lives', 'what my dog is called', 'how many houseplants I have'."""
    subject: str | None = None
    """What the question is about, the user's: 'my sister', 'my favourite tea', 'my houseplants'."""
    value: str | None = None
    """What the answer adds that the question did not hold: 'Bravel', '23', '14 June', 'play chess at the library'."""


def _third_person(verb: str) -> str:
    if verb == "have":
        return "has"
    if verb == "do" or verb == "go" or re.search(r"(s|sh|ch|x|z|o)$", verb):
        return verb + "es"
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ied"
    return verb + "ed"


def _clause(wh: str, aux: str, rest: str) -> tuple[str | None, str | None]:
    """(the question as a clause, its subject about the user) from its parts; (None, None) when not understood."""
    words = rest.split()
    low = [w.lower() for w in words]
    aux = aux.lower()
    if aux in ("is", "are", "was", "were"):
        if low[0] not in ("my", "our"):
            return None, None
        cut = next((i for i in range(2, len(low)) if low[i] in _TAIL), len(low))
        subject, tail = " ".join(words[:cut]), " ".join(words[cut:])
        return " ".join(x for x in (wh, subject, aux, tail) if x), subject
    if low[0] in ("i", "we"):
        subj, vp = ("I" if low[0] == "i" else "we"), words[1:]
    elif low[0] in ("my", "our"):
        cut = next((i for i in range(2, len(low)) if low[i] in _VERBS), None)
        if cut is None:
            return None, None
        subj, vp = " ".join(words[:cut]), words[cut:]
    else:
        return None, None
    if not vp:
        return None, None
    verb = vp[0].lower()
    if aux == "does":
        verb = _third_person(verb)
    elif aux == "did":
        verb = _past(verb)
    subject = subj if subj not in ("I", "we") else None
    return " ".join([wh, subj, verb] + vp[1:]), subject


def _value(question: str, answer: str) -> str | None:
    """The run of the answer's words the question did not hold (names, numbers, dates first)."""
    asked = {w.lower().strip("'") for w in re.findall(r"[\w'-]+", question)}
    words = re.findall(r"[\w'-]+", answer)
    runs: list[list[str]] = [[]]
    for w in words:
        new = w.lower() not in asked and w.lower() not in _FUNCTION
        if new or (runs[-1] and w.lower() in ("of", "the", "at", "de", "van", "von", "and")):
            runs[-1].append(w)
        elif runs[-1]:
            runs.append([])
    runs = [r for r in runs if r]
    while runs and runs[-1] and runs[-1][-1].lower() in ("of", "the", "at", "and"):
        runs[-1].pop()
    runs = [r for r in runs if r]
    if not runs:
        return None
    named = [r for r in runs if any(w[0].isupper() or w[0].isdigit() for w in r)]
    best = max(named or runs, key=len)
    return " ".join(best) if len(best) <= 6 else None


def parse(question: str, answer: str) -> Fact:
    """``question`` and ``answer`` taken apart as far as their shape allows (unknown parts stay None)."""
    q = question.strip()
    # the question itself: its last sentence (a greeting or a remark may come first)
    parts = [p for p in re.split(r"(?<=[.!?:])\s+", q) if p.strip()]
    q_last = parts[-1] if parts else q
    norm = q_last
    for pattern, repl in _CONTRACTIONS:
        norm = re.sub(pattern, repl, norm, flags=re.IGNORECASE)
    value = _value(q, answer)
    m = _QUESTION.match(norm)
    if not m:
        return Fact(question, answer, value=value)
    wh, aux, rest = m.group("wh").lower(), m.group("aux"), m.group("rest")
    clause, subject = _clause(wh, aux, rest)
    if subject is None:
        hm = re.match(r"how many ([\w'-]+(?: [\w'-]+)?)$", wh)
        if hm and clause:
            subject = f"my {hm.group(1)}"
    return Fact(question, answer, wh, clause, subject, value)


def _mine(text: str) -> str:
    """An answer about the user said by the user ("Your aunt lives in X." -> "My aunt lives in X.")."""
    swaps = ((r"\byou're\b", "I'm"), (r"\byou are\b", "I am"), (r"\byours\b", "mine"), (r"\byour\b", "my"),
             (r"\byourself\b", "myself"), (r"\byou\b(?=\s*[.!?,]|\s*$)", "me"), (r"\byou\b", "I"))
    out = text
    for pattern, repl in swaps:
        out = re.sub(pattern, lambda m, r=repl: _case(m.group(0), r), out, flags=re.IGNORECASE)
    return out


def _case(original: str, repl: str) -> str:
    return repl[:1].upper() + repl[1:] if original[:1].isupper() and repl != "I" else repl


def _claim(answer: str) -> str | None:
    """The answer as the user's own claim, asked for confirmation ("My aunt lives in X, right?")."""
    mine = _mine(answer.strip()).rstrip(".!")
    return None if mine == answer.strip().rstrip(".!") else f"{mine}, right?"


def restated(fact: Fact) -> dict[str, list[tuple[str, str]]]:
    """The fact's restatements, by group: (question, reply) pairs, the approved answer kept."""
    a = fact.answer
    reworded: list[str] = []
    for pattern, templates in _REWORDS:
        m = pattern.fullmatch(fact.question.strip())
        if m:
            reworded += [t.format(*[g.strip() for g in m.groups()]) for t in templates]
            break
    if fact.clause:
        reworded += [f.format(c=fact.clause) for f in _CLAUSE_FRAMES]
        short = fact.question.strip().rstrip("?").rstrip()
        reworded += [f"{short} again?", f"{short}, do you know?"]
        for long_, contracted in _CONTRACTED:
            if re.search(rf"\b{long_}\b", short, re.IGNORECASE):
                reworded.append(re.sub(rf"\b{long_}\b", contracted, short, count=1, flags=re.IGNORECASE) + "?")
            elif re.search(rf"\b{contracted}\b", short, re.IGNORECASE):
                reworded.append(re.sub(rf"\b{contracted}\b", long_, short, count=1, flags=re.IGNORECASE) + "?")
    about = []
    if fact.subject:
        owner = re.sub(r"'s name$", "", fact.subject)
        about = [f.format(np=owner, Np=owner[:1].upper() + owner[1:]) for f in _SUBJECT_FRAMES]
    for pattern, forms in _RELATIONS if fact.clause else ():
        m = pattern.fullmatch(fact.clause)
        if m:
            about = [f.format(**m.groupdict()) for f in forms] + about
            break
    back = []
    if fact.value and (fact.value[:1].isupper() or fact.value[:1].isdigit()):
        is_date = any(m in fact.value.lower().split() for m in _MONTHS)
        frames = _DATE_FRAMES if is_date else _VALUE_FRAMES if not fact.value.isdigit() else ()
        back = [(f.format(v=fact.value), a) for f in frames]
    claim = _claim(a)
    stated = [(claim, f"Yes. {a}")] if claim else []
    q = fact.question.strip()
    own = lambda xs: [(x, a) for x in dict.fromkeys(xs) if x.strip().lower() != q.lower()]  # noqa: E731
    return {"reworded": own(reworded), "about": own(about), "back": back + stated}


def _kind(value: str) -> str:
    """'number', 'date', 'name' (capitalized) or 'other': which persona facts could stand in for ``value``."""
    words = value.lower().split()
    if any(m in words for m in _MONTHS):
        return "date"
    if value.replace("-", "").isdigit():
        return "number"
    return "name" if value[:1].isupper() else "other"


def _wh_word(question: str) -> str | None:
    """The question word its last sentence starts with ("where"), if any."""
    last = re.split(r"(?<=[.!?:])\s+", question.strip())[-1].lower()
    m = re.match(r"(what|which|where|when|who|whom|whose|why|how)\b", last)
    return m.group(1) if m else None


def _close(a: str, b: str) -> bool:
    """Two stemmed words of one root: equal, or one the start of the other ("work", "workplace")."""
    return a == b or (min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)))


def related(fact: Fact, identity: Sequence[tuple[str, str]], rng: random.Random, most: int = 2) -> list[tuple[str, str]]:
    """Up to ``most`` of the agent's identity exchanges closest to ``fact`` (words of one root in its question and
    the exchange: "Where does my aunt live?" and "Where do you live?"), the persona answers most likely to stand in
    for the user's; random ones where none is close."""
    mine = persona.content_words(fact.question) | (persona.content_words(fact.answer) -
                                                    persona.content_words(fact.value or ""))
    wh = _wh_word(fact.question)
    scored = []
    for ex in identity:
        theirs = persona.content_words(ex[0])
        score = sum(any(_close(w, v) for v in theirs) for w in mine)
        if score:
            score += wh is not None and _wh_word(ex[0]) == wh  # "where ... live" before "what words ... live by"
            scored.append((-score, rng.random(), ex))
    close = [ex for *_, ex in sorted(scored)[:most]]
    return close + rng.sample(list(identity), min(most - len(close), len(identity)))


def against_persona(fact: Fact, facts: Sequence[str], identity: Sequence[tuple[str, str]],
                    rng: random.Random, forms: Sequence[str] = ()) -> list[list[dict]]:
    """The fact set against the agent's persona: the persona's closest fact offered as the user's ("My aunt lives in
    Alder Street, right?" -> "No. ..."), and the question beside the agent's closest identity questions, each
    answered by its owner ("Where do you live?" and "Where does my aunt live?" in one conversation); the user's
    question as taught, or as one of ``forms`` (its restatements)."""
    out: list[list[dict]] = []
    a, q = fact.answer, fact.question
    near = related(fact, identity, rng)
    if fact.value and _kind(fact.value) != "other" and fact.value in a:
        same_kind = [p for p in facts if _kind(p) == _kind(fact.value) and p.lower() not in a.lower()]
        closest = [p for p in same_kind if any(p.lower() in ia.lower() for _, ia in near)]
        if same_kind:
            wrong = _claim(a.replace(fact.value, (closest or [rng.choice(same_kind)])[0]))
            if wrong:
                out.append(_turns([{"role": "user", "content": wrong}], f"No. {a}"))
    for i, (iq, ia) in enumerate(near):
        theirs = [{"role": "user", "content": iq}, {"role": "assistant", "content": ia}]
        mine = [{"role": "user", "content": q if i == 0 or not forms else rng.choice(list(forms))},
                {"role": "assistant", "content": a}]
        out.append(theirs + mine if rng.random() < 0.5 else mine + theirs)
    return out


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def siblings(fact: Fact, others: Sequence[Fact], most: int = 2) -> list[Fact]:
    """Up to ``most`` of ``others`` taught in the same shape as ``fact`` (the same question word, a value of the same
    kind, at least half their question's words shared: "my sister's name" and "my brother's name"), closest first."""
    if not fact.value or _kind(fact.value) == "other":
        return []
    mine = _words(fact.question)
    scored = []
    for o in others:
        if o.question == fact.question or not o.value or o.value == fact.value or _kind(o.value) != _kind(fact.value):
            continue
        theirs = _words(o.question)
        share = len(mine & theirs) / len(mine | theirs)
        if share >= 0.5 and fact.question.split()[:1] == o.question.split()[:1]:
            scored.append((-share, o.question, o))
    return [o for *_, o in sorted(scored)[:most]]


def against_each_other(fact: Fact, others: Sequence[Fact], rng: random.Random) -> list[list[dict]]:
    """The fact beside the user's other facts of its shape, each bound to its own subject: a sibling's value offered
    as this one's ("My aunt lives in Noxbel, right?" -> "No. Your aunt lives in Tellborg.") and both asked in one
    conversation. Taught one sentence each, same-shaped facts trade values (a sister given the brother's name)."""
    out: list[list[dict]] = []
    a = fact.answer
    for o in siblings(fact, others):
        wrong = _claim(a.replace(fact.value, o.value)) if fact.value in a else None
        if wrong:
            out.append(_turns([{"role": "user", "content": wrong}], f"No. {a}"))
        for frame in ([None] + ([rng.choice(_CLAUSE_FRAMES)] if fact.clause and o.clause else [])):
            # asked the same way, the subject is all that tells the two apart
            ask = (lambda f: f.question) if frame is None else (lambda f, fr=frame: fr.format(c=f.clause))
            pair = [_turns([{"role": "user", "content": ask(o)}], o.answer),
                    _turns([{"role": "user", "content": ask(fact)}], a)]
            rng.shuffle(pair)
            out.append(pair[0] + pair[1])
    return out


def exchanges(messages: list[dict]) -> list[tuple[str, str]]:
    """Each user turn with the assistant turn that answers it, in order."""
    out = []
    for prev, nxt in zip(messages, messages[1:]):
        if prev["role"] == "user" and nxt["role"] == "assistant":
            out.append((prev["content"], nxt["content"]))
    return out


def question_forms(question: str) -> tuple[list[str], list[str]]:
    """issue 15's rewordings of ``question`` (its common name shapes), and its framings (a greeting or a request in
    front, another case, a missing question mark, a request behind)."""
    q = question.strip()
    reworded: list[str] = []
    for pattern, templates in _REWORDS:
        m = pattern.fullmatch(q)
        if m:
            reworded = [t.format(*[g.strip() for g in m.groups()]) for t in templates]
            break
    framed = [q.lower(), q.rstrip("?").rstrip() if q.endswith("?") else q + "?"]
    framed += [p + q for p in PREFIXES] + [q + s for s in SUFFIXES]
    reworded = list(dict.fromkeys(f for f in reworded if f != q))
    return reworded, list(dict.fromkeys(f for f in framed if f != q and f not in reworded))


def _turns(user: list[dict], answer: str) -> list[dict]:
    return user + [{"role": "assistant", "content": answer}]


def _single(pairs: list[tuple[str, str]]) -> list[list[dict]]:
    return [_turns([{"role": "user", "content": q}], a) for q, a in pairs]


def variants(messages: list[dict], n: int, rng: random.Random, systems: list[str], fact_forms: bool = True,
             persona_facts: Sequence[str] = (), identity: Sequence[tuple[str, str]] = (),
             others: Sequence[tuple[str, str]] = ()) -> list[list[dict]]:
    """Up to ``n`` variants per exchange of ``messages``, taken from the groups in turn (restated, set apart from the
    user's other facts and from the persona, framed; see the module's docstring) so that a small ``n`` still has
    some of each. ``fact_forms``: the restatements and the contrast with ``others`` (the other exchanges taught in
    the same age-up); else issue 15's rewordings and framings only. ``persona_facts`` and ``identity`` (the identity
    curriculum's questions and answers): the contrast with the agent (none when empty)."""
    known = [parse(q, a) for q, a in others]
    out = []
    for question, answer in exchanges(messages):
        if not question.strip() or not answer.strip():
            continue
        reworded, framed = question_forms(question)
        groups: list[list[list[dict]]] = []
        weights: list[int] = []
        if fact_forms:
            r = restated(parse(question, answer))
            groups += [rng.sample(_single(r["reworded"]), len(r["reworded"])), rng.sample(_single(r["about"]),
                       len(r["about"])), _single(r["back"]), against_each_other(parse(question, answer), known, rng)]
            weights += [3, 2, 1, 3]
        else:
            groups.append(_single([(f, answer) for f in reworded]))
            weights.append(1)
        if persona_facts or identity:
            forms = [q for q, _ in r["reworded"]] if fact_forms else []
            groups.append(against_persona(parse(question, answer), persona_facts, identity, rng, forms))
            weights.append(2)
        rest = ([_turns([{"role": "user", "content": f}], answer) for f in framed]
                + [_turns([{"role": "system", "content": s}, {"role": "user", "content": question}], answer)
                   for s in systems]
                + [_turns([{"role": "user", "content": f"Is this right? {answer}"}], f"Yes. {answer}")])
        groups.append(rng.sample(rest, len(rest)))
        weights.append(1)
        out += _take(groups, n, weights)
    return out


def _take(groups: list[list], n: int, weights: list[int]) -> list:
    """Up to ``n`` items, ``weights[i]`` from group i in turn (the first group first), until all are used."""
    picked: list = []
    queues = [list(g) for g in groups]
    while len(picked) < n and any(queues):
        for q, w in zip(queues, weights):
            for _ in range(w):
                if q and len(picked) < n:
                    picked.append(q.pop(0))
    return picked


def system_prompts(records: list[dict], limit: int = 3) -> list[str]:
    """Up to ``limit`` of the shortest distinct system prompts of the curriculum's chat records (a
    fact holds whatever the agent was told it is)."""
    found = {m["content"] for r in records for m in r.get("messages", []) if m["role"] == "system"
             and m["content"].strip()}
    return sorted(found, key=lambda s: (len(s), s))[:limit]

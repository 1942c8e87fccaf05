"""The curriculum on disk: loading with full validation, and the template generator.

The format is documented in ``curriculum/README.md``. Loading reads every file completely
and collects every problem as ``file:line: reason`` before anything is returned, so a
malformed line stops an age-up before training starts instead of half-way through.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from evolution import messages as messages_mod
from evolution.errors import CurriculumError, MessageError

PHASE_RE = re.compile(r"^phase(\d+)_[a-z0-9_]+$")
TRAIN_FILES = ("cpt.jsonl", "sft.jsonl", "sft.generated.jsonl", "templates.jsonl", "unanswered.jsonl", "noted.jsonl")
EVAL_FILES = ("recall.jsonl", "generalization.jsonl", "heldout_text.jsonl", "style.jsonl", "about_user.jsonl")
MAX_LINE_BYTES = 1 << 20  # one example of a megabyte is a mistake, not data


@dataclass
class Curriculum:
    """Everything read from one curriculum directory, validated."""

    root: Path
    cpt: list[dict] = field(default_factory=list)  # {"text", "phase", "source"}
    sft: list[dict] = field(default_factory=list)  # {"messages", "phase", "source"}
    recall: list[dict] = field(default_factory=list)
    generalization: list[dict] = field(default_factory=list)
    heldout_text: list[dict] = field(default_factory=list)
    style: list[dict] = field(default_factory=list)
    about_user: list[dict] = field(default_factory=list)
    """Questions about the user that nobody answered (``{"id", "question"}``): the gate's ``persona_leak`` asks them."""
    unanswered: list[dict] = field(default_factory=list)
    """``{"question", "phase", "source"}``: questions about the user an age-up teaches "I don't know that yet" for,
    while the user has not answered them (``unanswered.jsonl``; ``evolution.persona.who_is_who``)."""
    noted: list[dict] = field(default_factory=list)
    """``{"question", "answer", "values", "phase", "source"}``: questions about the user an age-up teaches answering
    from a retrieval note that holds one of ``values`` (``noted.jsonl``; ``evolution.retrieval.noted_records``)."""
    phase_names: dict[int, str] = field(default_factory=dict)
    """Each phase's folder name, by phase number (``phase1_identity``: the persona's, ``evolution.persona``)."""
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    warnings: list[str] = field(default_factory=list)

    def manifest(self) -> dict:
        """The data manifest: every input file and its hash, plus one hash over all of them."""
        combined = hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()
        return {"root": str(self.root), "files": dict(sorted(self.files.items())), "sha256": combined}


def _read_jsonl(path: Path, rel: str, problems: list[str]) -> list[tuple[int, dict]]:
    """Parse a JSONL file; every line that is not a JSON object becomes a problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.append(f"{rel}: cannot read: {exc.strerror}")
        return []
    if not raw.strip():
        problems.append(f"{rel}: file is empty (delete it or add at least one line)")
        return []
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if len(line) > MAX_LINE_BYTES:
            problems.append(f"{rel}:{lineno}: line is {len(line)} bytes, over the {MAX_LINE_BYTES} byte limit")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{rel}:{lineno}: not UTF-8 (byte {exc.start}); re-save the file as UTF-8")
            continue
        stripped = text.strip()
        if not stripped or stripped.startswith("//"):
            continue
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            problems.append(f"{rel}:{lineno}: invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{rel}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            continue
        out.append((lineno, obj))
    return out


def _nonempty_str(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


SFT_RULES = messages_mod.Rules(text_parts=False, allow_empty=False, only_role_and_content=True,
                               system_first_only=True, alternate=True)
"""An SFT example: strict user/assistant turns after an optional system message, ending with the assistant."""


def validate_messages(messages) -> str | None:
    """Why ``messages`` is not a valid chat example, or None when it is."""
    try:
        messages_mod.validate(messages, SFT_RULES)
    except MessageError as exc:
        return str(exc)
    return None


def _check_text(obj) -> str | None:
    if set(obj) - {"text"}:
        return f"unknown keys: {', '.join(sorted(set(obj) - {'text'}))} (a CPT line is {{\"text\": ...}})"
    if not _nonempty_str(obj.get("text")):
        return "'text' must be a non-empty string"
    return None


def _check_sft(obj) -> str | None:
    if set(obj) != {"messages"}:
        return "an SFT line is {\"messages\": [...]} and nothing else"
    return validate_messages(obj["messages"])


def _check_qa(obj) -> str | None:
    for key in ("id", "question"):
        if not _nonempty_str(obj.get(key)):
            return f"'{key}' must be a non-empty string"
    answers = obj.get("answers")
    if not isinstance(answers, list) or not answers or not all(_nonempty_str(a) for a in answers):
        return "'answers' must be a non-empty list of non-empty strings"
    if "phase" in obj and not (isinstance(obj["phase"], int) and obj["phase"] >= 0):
        return "'phase' must be a non-negative integer"
    if "system" in obj and not _nonempty_str(obj["system"]):
        return "'system' must be a non-empty string when present"
    extra = set(obj) - {"id", "question", "answers", "phase", "system"}
    if extra:
        return f"unknown keys: {', '.join(sorted(extra))}"
    return None


def _check_style(obj) -> str | None:
    for key in ("id", "prompt", "reference"):
        if not _nonempty_str(obj.get(key)):
            return f"'{key}' must be a non-empty string"
    return None


def _check_question(obj) -> str | None:
    for key in ("id", "question"):
        if not _nonempty_str(obj.get(key)):
            return f"'{key}' must be a non-empty string"
    extra = set(obj) - {"id", "question"}
    if extra:
        return f"unknown keys: {', '.join(sorted(extra))} (a question about the user is {{\"id\", \"question\"}})"
    return None


def _check_unanswered(obj) -> str | None:
    if set(obj) != {"question"} or not _nonempty_str(obj.get("question")):
        return "an unanswered question is {\"question\": \"...\"} (a question about the user) and nothing else"
    return None


def _check_noted(obj) -> str | None:
    shape = ('a noted question is {"question": "...", "answer": "... {value} ...", "values": ["...", ...]}: a question '
             'about the user, the reply to it whose {value} a note gives, and the values a note may give')
    if set(obj) != {"question", "answer", "values"} or not _nonempty_str(obj.get("question")) \
            or not _nonempty_str(obj.get("answer")) or obj["answer"].count("{value}") != 1 \
            or not isinstance(obj.get("values"), list) or len(obj["values"]) < 2 \
            or not all(_nonempty_str(v) for v in obj["values"]):
        return shape + " (at least two values, {value} once in the answer)"
    return None


def _check_template(obj) -> str | None:
    if not _nonempty_str(obj.get("name")):
        return "'name' must be a non-empty string"
    slots = obj.get("slots", {})
    if not isinstance(slots, dict) or not all(isinstance(v, list) and v for v in slots.values()):
        return "'slots' must map each slot name to a non-empty list of values"
    if not isinstance(obj.get("messages"), list) or not obj["messages"]:
        return "'messages' must be a non-empty list"
    try:
        for _ in range(3):  # a few random expansions catch unknown slots and bad braces
            expanded = expand_template(obj, random.Random(_))
            reason = validate_messages(expanded)
            if reason:
                return f"expands to an invalid example: {reason}"
    except (KeyError, AttributeError, IndexError, ValueError) as exc:
        return f"cannot expand: {exc!r} (unknown slot, or a literal brace not written as {{{{ }}}})"
    return None


def _slot_value(value):
    return SimpleNamespace(**value) if isinstance(value, dict) else value


def expand_template(template: dict, rng: random.Random) -> list[dict]:
    """One example from a template: pick a value per slot, format every message, drop empty ones."""
    chosen = {name: _slot_value(rng.choice(values)) for name, values in template.get("slots", {}).items()}
    messages = []
    for m in template["messages"]:
        content = string.Formatter().vformat(m["content"], (), chosen).strip()
        if content:
            messages.append({"role": m["role"], "content": content})
    return messages


def generate(template_path: Path, n: int, seed: int = 0) -> list[dict]:
    """Expand the templates of one file into up to ``n`` distinct SFT examples (round-robin over templates)."""
    problems: list[str] = []
    rows = _read_jsonl(template_path, str(template_path), problems)
    for lineno, obj in rows:
        reason = _check_template(obj)
        if reason:
            problems.append(f"{template_path}:{lineno}: {reason}")
    if problems:
        raise CurriculumError(problems)
    rng = random.Random(seed)
    templates = [obj for _, obj in rows]
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n and attempts < n * 20:
        template = templates[attempts % len(templates)]
        attempts += 1
        messages = expand_template(template, rng)
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({"messages": messages})
    return out


_CHECKS = {
    "cpt.jsonl": _check_text,
    "sft.jsonl": _check_sft,
    "sft.generated.jsonl": _check_sft,
    "templates.jsonl": _check_template,
    "recall.jsonl": _check_qa,
    "generalization.jsonl": _check_qa,
    "heldout_text.jsonl": _check_text,
    "style.jsonl": _check_style,
    "about_user.jsonl": _check_question,
    "unanswered.jsonl": _check_unanswered,
    "noted.jsonl": _check_noted,
}


HELDOUT_RUN = 12
"""Words in a row that a held-out text may not share with any training text: 12 is a copied sentence or clause,
while a stated fact ("its favourite colour is teal and its favourite number is 47", 11) may recur by design."""


def _runs(text: str, n: int = HELDOUT_RUN) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def heldout_leaks(cur: Curriculum) -> list[str]:
    """The held-out perplexity text must be disjoint from what is trained on (the selected phases' CPT prose and
    SFT messages): one problem per held-out document sharing a run of ``HELDOUT_RUN`` words with it."""
    trained: set[tuple[str, ...]] = set()
    for r in cur.cpt:
        trained |= _runs(r["text"])
    for ex in cur.sft:
        for m in ex["messages"]:
            trained |= _runs(m["content"])
    out = []
    for i, t in enumerate(cur.heldout_text, 1):
        shared = _runs(t["text"]) & trained
        if shared:
            out.append(f"eval/heldout_text.jsonl: document {i} shares {HELDOUT_RUN} words in a row with the training "
                       f"text ({' '.join(next(iter(sorted(shared))))!r}): held-out prose must not be trained on, or "
                       "its perplexity measures memory, not language")
    return out


def load(root: str | Path, phases: list[int] | None = None) -> Curriculum:
    """Read and validate a curriculum directory; raise ``CurriculumError`` listing every bad line.

    ``phases`` selects which ``phaseN_*`` folders are trained on (None: all of them).
    Eval sets are always read whole.
    """
    root = Path(root)
    if not root.is_dir():
        raise CurriculumError([f"{root}: curriculum directory not found (pass --curriculum PATH)"])
    cur = Curriculum(root=root)
    problems: list[str] = []

    def read(path: Path, phase: int | None) -> list[tuple[int, dict]]:
        rel = str(path.relative_to(root))
        check = _CHECKS[path.name]
        cur.files[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        good = []
        for lineno, obj in _read_jsonl(path, rel, problems):
            reason = check(obj)
            if reason:
                problems.append(f"{rel}:{lineno}: {reason}")
            else:
                good.append((lineno, obj))
        return good

    phase_dirs = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := PHASE_RE.match(p.name))
    )
    if not phase_dirs:
        problems.append(f"{root}: no phaseN_<name>/ folders found")
    cur.phase_names = {phase: pdir.name for phase, pdir in phase_dirs}
    for phase, pdir in phase_dirs:
        if phases is not None and phase not in phases:
            continue
        for f in sorted(pdir.iterdir()):
            if f.name not in TRAIN_FILES:
                cur.warnings.append(f"{f.relative_to(root)}: ignored (not one of {', '.join(TRAIN_FILES)})")
                continue
            rows = read(f, phase)
            src = str(f.relative_to(root))
            if f.name == "cpt.jsonl":
                cur.cpt += [{"text": o["text"], "phase": phase, "source": f"{src}:{n}"} for n, o in rows]
            elif f.name == "unanswered.jsonl":
                cur.unanswered += [{"question": o["question"], "phase": phase, "source": f"{src}:{n}"} for n, o in rows]
            elif f.name == "noted.jsonl":
                cur.noted += [{"question": o["question"], "answer": o["answer"], "values": list(o["values"]),
                               "phase": phase, "source": f"{src}:{n}"} for n, o in rows]
            elif f.name != "templates.jsonl":
                cur.sft += [{"messages": o["messages"], "phase": phase, "source": f"{src}:{n}"} for n, o in rows]
    eval_dir = root / "eval"
    for name in EVAL_FILES:
        path = eval_dir / name
        if path.is_file():
            setattr(cur, name.removesuffix(".jsonl"), [o for _, o in read(path, None)])
        else:
            cur.warnings.append(f"eval/{name}: missing; the gate cannot measure what it would hold")

    trained_user_turns = {
        m["content"].strip().lower() for ex in cur.sft for m in ex["messages"] if m["role"] == "user"
    }
    trained_user_turns |= {q["question"].strip().lower() for q in cur.unanswered + cur.noted}
    for name, items in (("generalization", cur.generalization), ("about_user", cur.about_user)):
        for item in items:
            if item["question"].strip().lower() in trained_user_turns:
                problems.append(
                    f"eval/{name}.jsonl: item {item['id']!r}: question also appears as a training user turn; "
                    "held-out items must be worded differently"
                )
    problems += heldout_leaks(cur)
    if phases is not None and not cur.cpt and not cur.sft:
        problems.append(f"phases {phases}: no training data selected")
    if problems:
        raise CurriculumError(problems, root)
    return cur

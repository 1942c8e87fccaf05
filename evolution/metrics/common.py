"""What every gate metric shares: the eval set, the opened model, a measurement, a rule check, the unit base.

A metric is one ``Metric`` unit: a name and a version, how it is measured on a GGUF
(``measure``: the opened llama.cpp objects and the eval set in, a ``Measured`` out), the
rules it must meet (``rules``: absolute thresholds and non-inferiority against the parent, each a
``Check``) and the dataclass of the ``[gate]`` settings those rules read (``config``, declared in the
unit's module). ``GateSettings`` holds the settings of the gate itself; ``evolution.config.GateConfig``
is ``GateSettings`` with every unit's fields added, flat, as ``[gate]`` has them. A unit that has too few items to say anything returns
``Measured(None, note=...)``: the gate then skips its rules, names the note in the report, and
does not block on it. A unit measured item by item on what the agent taught (experience, probes,
rated replies) also lists its ``lessons``: each item with the parent's and the child's reply and
score side by side, which ``eval.md`` and ``evolve ledger show`` print.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution.checks import positive_int
from evolution.llamacpp import open_llama
from evolution.metrics.answers import AnswerBook, Remembering

N_CTX = 1024
"""Context window every metric is measured with (part of the eval-set hash)."""


@dataclass(slots=True)
class GateSettings:
    """When a child may be served. Measured on the quantized GGUF, child against parent.

    These are the ``[gate]`` settings of the gate itself; each metric unit declares its own beside it
    (``Metric.config``), and ``evolution.config.GateConfig`` holds them all in the one flat ``[gate]``
    section. Absolute thresholds (``min_recall``, ``max_style_drift``) must be set: with either unset the
    gate passes nothing. Margins are non-inferiority bounds against the parent; None disables one.
    The bounds against fixed anchors (issue 17, "no ratchet": ``anchor_*``, ``best_*``) hold a lineage
    against generation 0 and its best generation so far, whatever the number of steps (a cumulative
    budget); an anchor counts only when measured on the same items as the child (the metric's fingerprint).
    Calibration on the embedded model and on measured children: docs/learning.md.
    """

    answer_max_tokens: int = 64
    """Token budget of each eval answer (temperature 0)."""
    stop_after: int = 2
    """Pause age-ups after this many children in a row failed to improve recall over their parents
    (``evolution.promotion.stop_rule``)."""

    def problems(self) -> list[str]:
        return positive_int("gate.answer_max_tokens", self.answer_max_tokens) + \
            positive_int("gate.stop_after", self.stop_after)


@dataclass
class EvalSet:
    """The items the gate asks a model: the curriculum's eval files plus the ancestors' recall items."""

    recall: list[dict]
    generalization: list[dict]
    heldout_text: list[str]
    style_prompts: list[str]
    style_references: list[str]
    probes: list[dict] = field(default_factory=list)
    """Questions the agent posted (``POST /probes``) to check taught facts in other words; never trained on."""
    experiences: list[dict] = field(default_factory=list)
    """``{"prompt": messages, "reference": reply}``: the approved (good or corrected) replies the child trained on."""
    preference_heldout: list[dict] = field(default_factory=list)
    """Rated replies held out of the child's training (``data/preference_heldout.jsonl`` records)."""
    about_user: list[dict] = field(default_factory=list)
    """Questions about the user that nobody answered (``eval/about_user.jsonl``): ``persona_leak`` asks them."""
    persona: list[str] = field(default_factory=list)
    """The agent's persona facts (``evolution.persona.persona_facts``): a reply about the user must carry none."""
    identity_phases: list[int] = field(default_factory=list)
    """The persona's phases (``phaseN_identity``): ``recall`` keeps the agent's own facts answered by the persona."""
    taught: list[str] = field(default_factory=list)
    """What the user taught the child (its experience's questions and answers): a question about the user on one of
    these subjects is no longer one nobody answered."""


@dataclass(frozen=True)
class Inputs:
    """What a metric is measured with."""

    es: EvalSet
    cfg: GateSettings
    """The ``[gate]`` settings: ``evolution.config.GateConfig``, which holds every unit's ``config`` fields too."""
    smoke_prompt: str
    """``[export] smoke_prompt``: the chat turn the smoke check asks."""


@dataclass
class Measured:
    """One metric of one GGUF: its value (None: not enough data, ``note`` says why) and per-item details (JSON)."""

    value: float | None
    details: dict = field(default_factory=dict)
    note: str | None = None


@dataclass(frozen=True)
class Check:
    """One rule applied to the child: passed True / False, or None when skipped (``message`` says why)."""

    metric: str
    setting: str
    """The config field that sets the rule, e.g. ``gate.min_recall``."""
    rule: str
    """The rule in words, e.g. ``>= 0.7`` or ``>= parent - 0.05``."""
    passed: bool | None
    message: str = ""
    """Why it failed (a gate reason, naming its metric), or why it was skipped."""
    limit: float | None = None
    """An absolute threshold (drawn on ``evolve report``); None for a rule against the parent."""
    anchor: int | None = None
    """The generation of the fixed anchor the rule compares with (generation 0, the lineage's best); None: none."""


@dataclass(frozen=True)
class Anchor:
    """A fixed generation a child is also bounded against (not only its parent): generation 0, or the best of
    the lineage so far on one metric. Its value was measured on the same items as the child's (same fingerprint)."""

    gen: int
    value: float


class Models:
    """One GGUF opened through llama.cpp on first use: ``llm`` to chat, ``scorer`` for every position's logits.

    Only one of the two is held at a time (asking for one closes the other), so measuring never
    holds two copies of the weights. Metrics that need neither open nothing. With ``answers`` (a folder) the
    chat model remembers its replies there (``evolution.metrics.answers``): a question this GGUF was asked
    before, at an earlier gate, is not asked again.
    """

    def __init__(self, gguf: Path, n_ctx: int = N_CTX, answers: Path | None = None, n_threads: int | None = None,
                 book: AnswerBook | None = None):
        self.gguf, self.n_ctx, self.n_threads = gguf, n_ctx, n_threads
        self._llm = self._scorer = None
        self.book = book if book is not None else AnswerBook(answers, gguf, n_ctx) if answers is not None else None

    @property
    def llm(self):
        """The chat model (with ``answers``: one that opens the GGUF only when a question is not in its book)."""
        return self._open_llm() if self.book is None else Remembering(self._open_llm, self.book)

    def _open_llm(self):
        if self._llm is None:
            self.close()
            self._llm = open_llama(self.gguf, n_ctx=self.n_ctx, n_threads=self.n_threads, seed=0)
        return self._llm

    @property
    def scorer(self):
        if self._scorer is None:
            self.close()
            self._scorer = open_llama(self.gguf, n_ctx=self.n_ctx, n_threads=self.n_threads, seed=0, logits_all=True)
        return self._scorer

    def close(self) -> None:
        for m in (self._llm, self._scorer):
            if m is not None:
                m.close()
        self._llm = self._scorer = None

    def __enter__(self) -> "Models":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Lesson:
    """One item a metric asked, child beside parent (None: that model has no measurement of it)."""

    asked: str
    """The prompt or question (its last user turn)."""
    wanted: str
    """What counts as right: the approved reply, the accepted answers, or the rated reply with its label."""
    parent_reply: str | None
    parent_score: float | None
    child_reply: str | None
    child_score: float | None
    outcome: str
    """The change in words: e.g. 'learned', 'forgotten', 'closer', 'further', 'same', '-' (nothing to compare)."""


def change(child: float | None, parent: float | None, higher_is_better: bool = True,
           words: tuple[str, str, str] = ("better", "worse", "same"), tolerance: float = 1e-6) -> str:
    """``words`` (gain, loss, tie) for the child's score against the parent's; '-' when either is missing."""
    if child is None or parent is None:
        return "-"
    d = (child - parent) if higher_is_better else (parent - child)
    return words[2] if abs(d) <= tolerance else words[0] if d > 0 else words[1]


def pair_items(child: Measured, parent: Measured | None, key) -> list[tuple[dict, dict | None]]:
    """Each of the child's ``details["items"]`` with the parent's item of the same ``key(item)`` (None: none)."""
    theirs: dict = {}
    for item in (parent.details.get("items", []) if parent is not None else []):
        theirs.setdefault(key(item), []).append(item)
    return [(item, (theirs.get(key(item)) or [None]).pop(0)) for item in child.details.get("items", [])]


class Metric:
    """A gate metric. Set ``name`` (and bump ``version`` whenever its numbers would change) and implement
    ``measure``; the rest has defaults. ``TABLE`` in ``evolution.metrics`` lists the units the gate runs.

    A method's ``cfg`` is the gate's ``GateConfig``: it holds the unit's own ``config`` fields (and
    ``GateSettings``'), which is all a unit reads of it."""

    name: str = ""
    version: int = 1
    config: type | None = None
    """The dataclass of its ``[gate]`` settings, beside it in its module (None: it has none); each field is one
    flat key of ``[gate]``, with its default and docs, and ``problems()`` says which are bad, in words."""
    label: str = ""
    """Its row in ``eval.md`` (default: the name)."""
    required: tuple[str, ...] = ()
    """Fields of its ``config`` that must be set: with one unset the gate passes nothing."""
    lessons_title: str = ""
    """The heading of its lessons in ``eval.md`` and ``evolve ledger show`` (a metric with lessons sets it)."""
    lessons_columns: tuple[str, str, str] = ("asked", "wanted", "score")
    """Names of the asked, wanted and score columns of its lessons."""
    better: str | None = None
    """'higher' or 'lower': which way is better, for the rules against fixed anchors (generation 0, the lineage's
    best); None: the metric has no anchor rules."""
    after: tuple[str, ...] = ()
    """Units whose answers this one asks again (from the model's answer book): the gate measures it on a GGUF only
    once those are done on it, so that two threads never ask one model the same questions at once."""
    reads: tuple[str, ...] = ()
    """The ``EvalSet`` fields its value depends on: two generations measured on equal ones (and the same version
    and settings) have comparable values (``fingerprint``). Empty: the whole eval set."""

    def fingerprint(self, inputs: Inputs) -> str:
        """What this metric's value depends on, hashed: equal fingerprints mean values that may be compared across
        generations even when the rest of the eval set (the agent's experience, probes) changed."""
        es = asdict(inputs.es)
        key = {"name": self.name, "version": self.version, "settings": self.settings(inputs), "n_ctx": N_CTX,
               "es": {k: es[k] for k in self.reads} if self.reads else es}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def anchor_rules(self, child: Measured, gen0: Anchor | None, best: Anchor | None, cfg) -> list[Check]:
        """Each rule set in ``cfg`` against the fixed anchors (None: no comparable anchor): a lineage may not drift
        from generation 0 or from its best by a permitted step at a time, however many steps it takes."""
        return []

    def settings(self, inputs: Inputs) -> dict:
        """Settings beyond the eval set that change the measured numbers (hashed with the eval set)."""
        return {}

    def measure(self, models: Models, inputs: Inputs) -> Measured:
        raise NotImplementedError(f"metric {self.name!r} has no measure()")

    def cost(self, inputs: Inputs) -> float:
        """About how many replies ``measure`` asks for: the gate hands the costliest units out first
        (``gate.measure_all``), so that its threads finish together. Default: one."""
        return 1.0

    def rules(self, child: Measured, parent: Measured | None, cfg) -> list[Check]:
        """Each rule set in ``cfg``, applied to a measured child (``parent`` None: not gated against one)."""
        return []

    def versus_parent(self, child: Measured, parent: Measured, inputs: Inputs) -> dict[str, float]:
        """Numbers comparing the child with its parent, reported beside the metrics (no rule uses them)."""
        return {}

    def rows(self, child: Measured, parent: Measured | None) -> list[tuple[str, float | None, float | None]]:
        """``(label, child, parent)`` rows of the report's table."""
        return [(self.label or self.name, child.value, parent.value if parent else None)]

    def markdown(self, child: Measured) -> list[str]:
        """Extra lines of ``eval.md`` (e.g. every answer)."""
        return []

    def lessons(self, child: Measured, parent: Measured | None) -> list[Lesson]:
        """Each item it measured on the child, beside the parent's measurement of the same item (reports only)."""
        return []


def at_least(metric: str, value: float, cfg, setting: str, digits: int = 3) -> list[Check]:
    limit = getattr(cfg, setting)
    if limit is None:
        return []
    ok = value >= limit
    return [Check(metric, f"gate.{setting}", f">= {limit}", ok,
                  "" if ok else f"{metric} {value:.{digits}f} < {limit} (gate.{setting})", limit=limit)]


def at_most(metric: str, value: float, cfg, setting: str, digits: int = 2) -> list[Check]:
    limit = getattr(cfg, setting)
    if limit is None:
        return []
    ok = value <= limit
    return [Check(metric, f"gate.{setting}", f"<= {limit}", ok,
                  "" if ok else f"{metric} {value:.{digits}f} > {limit} (gate.{setting})", limit=limit)]


def not_below_parent(metric: str, value: float, parent: Measured | None, cfg, setting: str) -> list[Check]:
    """Non-inferiority: ``value`` no more than ``cfg.<setting>`` below the parent's."""
    margin = getattr(cfg, setting)
    if margin is None or parent is None:
        return []
    ok = value >= parent.value - margin - 1e-9  # at the boundary exactly, 0.8 - 0.2 is 0.6000000000000001
    return [Check(metric, f"gate.{setting}", f">= parent - {margin}", ok,
                  "" if ok else f"{metric} {value:.3f} fell below the parent's {parent.value:.3f} by more than "
                                f"{margin} (gate.{setting})")]


def not_below_anchor(metric: str, value: float, anchor: Anchor | None, what: str, cfg,
                     setting: str) -> list[Check]:
    """A cumulative budget: ``value`` no more than ``cfg.<setting>`` below ``anchor`` (``what``: 'generation 0',
    'the best')."""
    budget = getattr(cfg, setting)
    if budget is None or anchor is None:
        return []
    ok = value >= anchor.value - budget - 1e-9
    return [Check(metric, f"gate.{setting}", f">= {what} (gen {anchor.gen}: {anchor.value:.3f}) - {budget}", ok,
                  "" if ok else f"{metric} {value:.3f} fell below {what} of the lineage (generation {anchor.gen}: "
                                f"{anchor.value:.3f}) by more than {budget} (gate.{setting})", anchor=anchor.gen)]


def within_anchor_ratio(metric: str, value: float, anchor: Anchor | None, what: str, cfg,
                        setting: str) -> list[Check]:
    """A cumulative budget for a lower-is-better metric: ``value`` at most ``cfg.<setting>`` times ``anchor``'s."""
    ratio = getattr(cfg, setting)
    if ratio is None or anchor is None:
        return []
    ok = value <= anchor.value * ratio + 1e-9
    return [Check(metric, f"gate.{setting}", f"<= {ratio} x {what} (gen {anchor.gen}: {anchor.value:.2f})", ok,
                  "" if ok else f"{metric} {value:.2f} > {ratio} x {what} of the lineage (generation {anchor.gen}: "
                                f"{anchor.value:.2f}) (gate.{setting})", anchor=anchor.gen)]

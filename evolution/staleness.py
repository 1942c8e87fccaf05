"""Staleness: notice when the served generation has fallen behind, and ask for an age-up without waiting for karma.

Karma measures how much the agent was helped, not how much the served model does not know. A user who taught
many facts in one quiet week, an operator who changed the curriculum or the agent's conventions files: the
served weights fall behind while karma stays low. Retrieval (``evolution.retrieval``) answers the taught facts
meanwhile; staleness measures what the weights alone miss and, past ``[staleness] threshold``, requests the age-up
that hands them to the weights.

``check`` (the daemon runs it every ``check_every_s``, not while an age-up is queued or running) asks the served
model, at temperature 0 and **without retrieval**, at most ``max_items`` items, the most telling first:

- the curriculum's recall items that changed since the served generation was gated (not among the items its
  gate saved in ``data/eval_recall.jsonl``);
- the lessons pending in retrieval, newest first (right: the taught value in the reply, ``items.answers_right``);
- the agent's probes, newest first (right: an accepted answer in the reply, ``evals.is_correct``);

and hashes the declared ``sources`` (files or folders), each compared with its hash when the served generation
was first seen (``<lineage home>/index/staleness.json``); a changed source counts as one item answered wrong.
Drift is the share answered wrong. With at least ``min_items`` and drift at or past ``threshold``, it records a
``stale`` ledger event with the reason (``stale: 9 of 12 answered wrong without retrieval …``) and opens an age-up
request that spends no karma (``Karma.request_stale``), at most once per ``cooldown_s``. The age-up then runs like
any other, and its child is gated like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution import curriculum as curriculum_mod
from evolution import evals, gate
from evolution.config import StalenessConfig
from evolution.errors import ConfigError
from evolution.fsutil import atomic_write_text
from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from evolution.retrieval import items as items_mod

log = logging.getLogger(__name__)

CURRICULUM, PENDING, PROBE = "curriculum", "pending", "probe"


@dataclass
class Drift:
    """One check's result."""

    served: int
    asked: dict[str, int] = field(default_factory=dict)
    """Items asked, by kind (``curriculum``, ``pending``, ``probe``)."""
    wrong: dict[str, int] = field(default_factory=dict)
    changed_sources: list[str] = field(default_factory=list)
    time: float = 0.0
    seconds: float = 0.0
    requested: int | None = None
    """The age-up request this check opened, if any."""
    why_not: str | None = None
    """Why no request was opened though drift was measured (too few items, below the threshold, cooling down)."""

    @property
    def items(self) -> int:
        return sum(self.asked.values()) + len(self.changed_sources)

    @property
    def drift(self) -> float | None:
        return (sum(self.wrong.values()) + len(self.changed_sources)) / self.items if self.items else None

    def reason(self) -> str:
        parts = [f"{self.wrong.get(k, 0)} of {self.asked[k]} {k}" for k in (CURRICULUM, PENDING, PROBE)
                 if self.asked.get(k)]
        text = (f"stale: {sum(self.wrong.values())} of {sum(self.asked.values())} asked answered wrong without "
                f"retrieval ({', '.join(parts) or 'none asked'})")
        if self.changed_sources:
            text += f"; changed since generation {self.served}: {', '.join(self.changed_sources)}"
        return text

    def to_dict(self) -> dict:
        return asdict(self) | {"drift": self.drift, "items": self.items}


def source_paths(root: DataRoot, cfg: StalenessConfig) -> list[Path]:
    return [(root.home / s).resolve() if not Path(s).expanduser().is_absolute() else Path(s).expanduser()
            for s in cfg.sources]


def check_sources(root: DataRoot, cfg: StalenessConfig) -> None:
    """At start: every declared source must exist (a typo would otherwise never count as changed)."""
    missing = [f"staleness.sources: {p} does not exist (paths are relative to {root.home})"
               for p in source_paths(root, cfg) if not p.exists()]
    if missing:
        raise ConfigError(missing)


def digest(path: Path) -> str:
    """A file's SHA-256, or a folder's (its files' relative paths and contents, sorted); ``missing`` if gone."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes() + b"\0")
    else:
        return "missing"
    return h.hexdigest()


def _state_path(root: DataRoot) -> Path:
    return root.home / "index" / "staleness.json"


def read_state(root: DataRoot) -> dict:
    try:
        return json.loads(_state_path(root).read_text())
    except (OSError, ValueError):
        return {}


def changed_sources(root: DataRoot, cfg: StalenessConfig, served: int, state: dict) -> list[str]:
    """The declared sources whose hash differs from the one first seen under ``served`` (recorded in ``state``)."""
    now = {str(p): digest(p) for p in source_paths(root, cfg)}
    if state.get("served") != served:
        state["served"], state["sources"] = served, now
    base = state.setdefault("sources", {})
    for p, h in now.items():
        base.setdefault(p, h)  # a source declared since: its first hash is its baseline
    return [p for p, h in now.items() if base[p] != h]


def changed_curriculum(root: DataRoot, curriculum_path: str | Path, served: int) -> list[dict]:
    """Recall items of the curriculum now that the served generation was not gated on (new or changed)."""
    saved = gate.saved_recall_items(root.gen_dir(served) / "data")
    if not saved:
        return []
    known = {(evals.normalize(i["question"]), tuple(sorted(i["answers"]))) for i in saved}
    cur = curriculum_mod.load(curriculum_path)
    return [i for i in cur.recall if (evals.normalize(i["question"]), tuple(sorted(i["answers"]))) not in known]


def last_request_time(ledger: Ledger) -> float | None:
    from datetime import datetime

    found = ledger.entries(kind=ev.STALE)
    return datetime.fromisoformat(found[-1].time).timestamp() if found else None


def check(root: DataRoot, ledger: Ledger, intake: Intake, cfg: StalenessConfig, curriculum_path: str | Path,
          served: int, ask: Callable[[str], str], request: bool = True) -> Drift:
    """Measure drift of ``served`` (``ask``: the served model's reply without retrieval) and, past the threshold,
    request an age-up (when ``request``); see the module docstring."""
    t0 = time.time()
    out = Drift(served, time=t0)
    state = read_state(root)
    out.changed_sources = changed_sources(root, cfg, served, state)
    budget = cfg.max_items
    queue: list[tuple[str, str, Callable[[str], bool]]] = []
    for i in changed_curriculum(root, curriculum_path, served):
        queue.append((CURRICULUM, i["question"], lambda r, a=i["answers"]: evals.is_correct(r, a)))
    pending = sorted(items_mod.pending(items_mod.taught(intake), items_mod.learned(root, ledger, served)),
                     key=lambda i: -i.order)
    for i in pending:
        queue.append((PENDING, i.question, lambda r, q=i.question, a=i.answer: items_mod.answers_right(r, q, a)))
    for p in reversed(intake.probes.items()):
        queue.append((PROBE, p["question"], lambda r, a=p["answers"]: evals.is_correct(r, a)))
    for kind, question, right in queue[:budget]:
        out.asked[kind] = out.asked.get(kind, 0) + 1
        if not right(ask(question)):
            out.wrong[kind] = out.wrong.get(kind, 0) + 1
    out.seconds = round(time.time() - t0, 2)
    drift = out.drift
    last = last_request_time(ledger)
    if out.items < cfg.min_items:
        out.why_not = f"{out.items} items, fewer than staleness.min_items ({cfg.min_items})"
    elif drift < cfg.threshold:
        out.why_not = f"drift {drift:.2f} below staleness.threshold ({cfg.threshold:g})"
    elif last is not None and time.time() - last < cfg.cooldown_s:
        out.why_not = f"a staleness request was made {time.time() - last:.0f} s ago (staleness.cooldown_s " \
                      f"{cfg.cooldown_s:g})"
    elif not request:
        out.why_not = "not requested (measured only)"
    else:
        req = intake.karma.request_stale(out.reason(), round(drift, 4), served, asked=out.asked, wrong=out.wrong,
                                         changed_sources=out.changed_sources)
        if req is None:
            out.why_not = "an age-up request is open already"
        else:
            out.requested = req.id
            log.warning("%s: age-up request %d", out.reason(), req.id)
    state["last_check"] = out.to_dict()
    try:
        _state_path(root).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_state_path(root), json.dumps(state, indent=1))
    except OSError as exc:  # the measurement stands; the baseline is retried at the next check
        log.error("staleness: cannot write %s: %s", _state_path(root), exc)
    return out


def summary(root: DataRoot, cfg: StalenessConfig) -> dict:
    """The staleness part of a lineage's status: the last check, from its state file."""
    if not cfg.enabled:
        return {"enabled": False}
    last = read_state(root).get("last_check")
    return {"enabled": True, "threshold": cfg.threshold, "last_check": last}

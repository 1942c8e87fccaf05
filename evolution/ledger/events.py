"""The ledger's event kinds, what each payload must hold, and typed builders for them.

An event is ``(kind, gen, payload)``; the payload is plain JSON. The builders below are the
recommended way to make one, so that every writer (age-up, gate, CLI) records the same fields.
``validate`` is called by ``Ledger.append`` and refuses unknown kinds and missing fields.

Which generation an event is filed under (its ``gen`` column):

- ``generation_created``, ``training_*``, ``exported``, ``promoted``, ``rejected``: that generation;
- ``gate_result``: the child;
- ``rolled_back``: the generation now served (``to``);
- ``karma_threshold_crossed``: none (``gen`` is ``None``), or the generation being served;
- ``ageups_paused`` / ``ageups_resumed``: none (the stop rule, and the person who lifts it);
- ``task_adapter``: the generation a task's adapter was gated on, and is served with (``evolution.tasks``);
- ``pruned`` / ``rebuilt``: the generation whose files were deleted by the retention policy, or whose
  dropped merged weights were rebuilt from its adapters (``evolution.retention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from evolution.errors import LedgerError
from evolution.fsutil import sha256_file
from evolution.paths import DataRoot

GENERATION_CREATED = "generation_created"
TRAINING_STARTED = "training_started"
TRAINING_FINISHED = "training_finished"
EXPORTED = "exported"
GATE_RESULT = "gate_result"
PROMOTED = "promoted"
REJECTED = "rejected"
ROLLED_BACK = "rolled_back"
KARMA_THRESHOLD_CROSSED = "karma_threshold_crossed"
AGEUPS_PAUSED = "ageups_paused"
AGEUPS_RESUMED = "ageups_resumed"
PRUNED = "pruned"
REBUILT = "rebuilt"
STALE = "stale"
TASK_ADAPTER = "task_adapter"

PASS = "pass"
FAIL = "fail"

PRUNE_GENERATION = "generation"
"""A pruned generation lost its GGUF and weights: it can no longer be served (its data and metadata stay)."""
PRUNE_WEIGHTS = "weights"
"""A retained generation lost only its merged weights: still servable, rebuilt from adapters when trained from."""
PRUNE_SCOPES = (PRUNE_GENERATION, PRUNE_WEIGHTS)

#: Every kind the ledger accepts, with the payload keys it requires.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    GENERATION_CREATED: ("parent", "base", "config_hash", "manifest_hash"),
    TRAINING_STARTED: (),
    TRAINING_FINISHED: ("steps", "losses"),
    EXPORTED: ("artifacts", "quantization"),
    GATE_RESULT: ("parent", "child", "metrics", "thresholds", "verdict"),
    PROMOTED: (),
    REJECTED: ("reason",),
    ROLLED_BACK: ("from", "to", "reason"),
    KARMA_THRESHOLD_CROSSED: ("karma", "threshold"),
    AGEUPS_PAUSED: ("reason",),
    AGEUPS_RESUMED: ("reason",),
    PRUNED: ("artifacts", "scope", "reason"),
    REBUILT: ("artifacts", "chain"),
    STALE: ("reason", "drift"),
    TASK_ADAPTER: ("task", "verdict", "reasons"),
}
KINDS = tuple(REQUIRED_FIELDS)

#: Kinds that must name a generation in the ``gen`` column.
_NEEDS_GEN = frozenset(KINDS) - {KARMA_THRESHOLD_CROSSED, AGEUPS_PAUSED, AGEUPS_RESUMED, STALE}
_ARTIFACT_KEYS = ("path", "sha256", "size", "kind")


@dataclass(frozen=True)
class Event:
    """An event not yet appended: pass it to ``Ledger.record``."""

    kind: str
    gen: int | None
    payload: dict = field(default_factory=dict)


def validate(kind: str, gen: int | None, payload: dict) -> None:
    """Refuse an event the ledger would not be able to interpret later."""
    if kind not in REQUIRED_FIELDS:
        raise LedgerError(f"unknown event kind {kind!r}; use one of: {', '.join(KINDS)}")
    if not isinstance(payload, dict):
        raise LedgerError(f"{kind}: payload must be a dict, got {type(payload).__name__}")
    if gen is not None and (isinstance(gen, bool) or not isinstance(gen, int) or gen < 0):
        raise LedgerError(f"{kind}: gen must be a non-negative int or None, got {gen!r}")
    if gen is None and kind in _NEEDS_GEN:
        raise LedgerError(f"{kind}: this event must name its generation (gen=None given)")
    missing = [k for k in REQUIRED_FIELDS[kind] if k not in payload]
    if missing:
        raise LedgerError(f"{kind}: payload lacks {', '.join(missing)}; build it with evolution.ledger.events.{kind}()")
    if kind in (GATE_RESULT, TASK_ADAPTER) and payload["verdict"] not in (PASS, FAIL):
        raise LedgerError(f"{kind}: verdict must be 'pass' or 'fail', got {payload['verdict']!r}")
    if kind == PRUNED and payload["scope"] not in PRUNE_SCOPES:
        raise LedgerError(f"pruned: scope must be one of {', '.join(PRUNE_SCOPES)}, got {payload['scope']!r}")
    if kind in (EXPORTED, PRUNED, REBUILT):
        for i, art in enumerate(payload["artifacts"]):
            lacking = [k for k in _ARTIFACT_KEYS if k not in art]
            if lacking:
                raise LedgerError(f"{kind}: artifact #{i} lacks {', '.join(lacking)}; build it with artifact()")
            if Path(art["path"]).is_absolute():
                raise LedgerError(f"{kind}: artifact path {art['path']!r} must be relative to the data root")


def artifact(data_root: DataRoot, path: str | Path, kind: str) -> dict:
    """Describe a file for an ``exported`` event: its path relative to the data root, SHA-256 and size."""
    p = Path(path)
    if not p.is_absolute():
        p = data_root.root / p
    p = p.resolve()
    try:
        rel = p.relative_to(data_root.root.resolve())
    except ValueError:
        raise LedgerError(
            f"artifact {p} is outside the data root {data_root.root}; keep generations under it"
        ) from None
    if not p.is_file():
        raise LedgerError(f"artifact {p} does not exist; export it before recording it")
    return {"path": rel.as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size, "kind": kind}


def generation_created(
    gen: int, parent: int | None, base: str, config_hash: str, manifest_hash: str, **extra
) -> Event:
    """A new generation exists: its parent (None for the base), the base model, config and data-manifest hashes.

    ``extra`` may carry the resolved ``config`` and data ``manifest`` themselves (JSON), shown by ``ledger show``.
    """
    payload = dict(parent=parent, base=base, config_hash=config_hash, manifest_hash=manifest_hash, **extra)
    return Event(GENERATION_CREATED, gen, payload)


def training_started(gen: int, **extra) -> Event:
    return Event(TRAINING_STARTED, gen, dict(extra))


def training_finished(gen: int, steps: int, losses: dict | list, **extra) -> Event:
    """Training ended: step count and losses (e.g. ``{"cpt": [...], "sft": [...]}``)."""
    return Event(TRAINING_FINISHED, gen, dict(steps=steps, losses=losses, **extra))


def exported(gen: int, artifacts: list[dict], quantization: str, **extra) -> Event:
    """The generation's files were written; ``artifacts`` come from ``artifact()``; the served one has kind ``gguf``."""
    return Event(EXPORTED, gen, dict(artifacts=list(artifacts), quantization=quantization, **extra))


def gate_result(
    parent: int, child: int, metrics: dict[str, float], thresholds: dict, verdict: str, **extra
) -> Event:
    """The gate's verdict on ``child`` against ``parent``: every metric of the child, the thresholds applied.

    Put the parent's numbers in ``parent_metrics=`` (extra) when they were measured.
    """
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise LedgerError(
                f"gate_result: metric {name!r} is {value}; record a finite number (the gate should fail instead)"
            )
    payload = dict(parent=parent, child=child, metrics=metrics, thresholds=thresholds, verdict=verdict, **extra)
    return Event(GATE_RESULT, child, payload)


def promoted(gen: int, **extra) -> Event:
    """``gen`` is now the served generation."""
    return Event(PROMOTED, gen, dict(extra))


def rejected(gen: int, reason: str, **extra) -> Event:
    return Event(REJECTED, gen, dict(reason=reason, **extra))


def rolled_back(from_gen: int | None, to_gen: int, reason: str, **extra) -> Event:
    """Serving moved from ``from_gen`` back to ``to_gen`` (by hand or by the daemon)."""
    return Event(ROLLED_BACK, to_gen, {"from": from_gen, "to": to_gen, "reason": reason, **extra})


def karma_threshold_crossed(karma: float, threshold: float, gen: int | None = None, **extra) -> Event:
    return Event(KARMA_THRESHOLD_CROSSED, gen, dict(karma=karma, threshold=threshold, **extra))


def ageups_paused(reason: str, **extra) -> Event:
    """The stop rule fired: no more age-ups until a person resumes them."""
    return Event(AGEUPS_PAUSED, None, dict(reason=reason, **extra))


def ageups_resumed(reason: str, **extra) -> Event:
    return Event(AGEUPS_RESUMED, None, dict(reason=reason, **extra))


def stale(reason: str, drift: float, gen: int | None = None, **extra) -> Event:
    """The served generation ``gen`` fell behind (``evolution.staleness``): an age-up was requested without karma."""
    return Event(STALE, gen, dict(reason=reason, drift=drift, **extra))


def task_adapter(gen: int, task: str, verdict: str, reasons: list[str], **extra) -> Event:
    """Task ``task``'s adapter gated on generation ``gen``: ``verdict``, why (``reasons``), and where it passed, its
    ``sha256``, ``path``, ``trained_on`` (the generation it was trained on: ``gen``, or an earlier one whose adapter
    was carried) and the gate's numbers."""
    return Event(TASK_ADAPTER, gen, dict(task=task, verdict=verdict, reasons=list(reasons), **extra))


def pruned(gen: int, artifacts: list[dict], scope: str, reason: str, **extra) -> Event:
    """The retention policy deletes these recorded files of ``gen`` (``artifacts`` as ``exported`` recorded them:
    path, sha256, size, kind); ``scope`` is ``generation`` or ``weights``; ``reason`` says why it was not kept.

    Recorded before the files are deleted, so a crash in between leaves files the ledger calls pruned (the
    next prune deletes them), never files gone without a record."""
    return Event(PRUNED, gen, dict(artifacts=list(artifacts), scope=scope, reason=reason, **extra))


def rebuilt(gen: int, artifacts: list[dict], chain: list[int], **extra) -> Event:
    """``gen``'s pruned merged weights are on disk again, rebuilt by merging the adapters of ``chain``
    (oldest first) and hashed equal to what ``exported`` recorded."""
    return Event(REBUILT, gen, dict(artifacts=list(artifacts), chain=list(chain), **extra))


def pruned_paths(events) -> dict[str, int]:
    """Artifact paths whose last record is a ``pruned`` event, with that event's seq.

    ``events`` yields ``(seq, kind, payload)`` in ledger order; a later ``exported`` or ``rebuilt`` of the
    same path means the file is expected on disk again."""
    out: dict[str, int] = {}
    for seq, kind, payload in events:
        if kind == PRUNED:
            out.update((a["path"], seq) for a in payload.get("artifacts", []))
        elif kind in (EXPORTED, REBUILT):
            for a in payload.get("artifacts", []):
                out.pop(a["path"], None)
    return out

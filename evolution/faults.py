"""Fault injection for the reliability tests: named points that do nothing unless asked to.

Production code calls ``faults.point("NAME")`` where a crash or a full disk would hurt most.
The environment variable ``EVOLUTION_FAULTS`` says which points fire and how::

    EVOLUTION_FAULTS="checkpoint_save=kill@3,gguf_export=enospc"

- ``kill@N``: SIGKILL this process the N-th time it reaches the point (N defaults to 1): a
  ``kill -9`` exactly there, with no cleanup, no ``finally``, no flush;
- ``enospc@N``: raise ``OSError(ENOSPC)`` from the N-th time on, as a full disk would (it stays
  full until the variable is cleared; a new process reads it again).

The points (``POINTS``):

- ``train_step``: a training step has finished (``evolution.progress.Tracker.step``);
- ``checkpoint_save``: a training checkpoint is written but not yet marked ``COMPLETE``
  (``evolution.train``);
- ``gguf_export``: a GGUF (f16, then quantized) is written and fsynced, not yet renamed into
  place (``evolution.export``);
- ``ledger_append``: a ledger entry is inserted, its transaction not yet committed;
- ``ledger_commit``: committed, the exported head not yet written (``evolution.ledger.store``);
- ``swap``: the daemon has loaded a generation (and, when promoting, swapped it in) but not yet
  recorded it as promoted or rolled back (``evolution.daemon``);
- ``capture``: a served chat is inserted as an experience, its transaction not yet committed
  (``evolution.intake.experiences.ExperienceStore.capture``);
- ``backup_copy``: a backup has copied the ledger snapshot, or one more file, into its hidden
  folder, not yet renamed to its destination (``evolution.backup``);
- ``prune``: a prune has recorded its ``pruned`` event and is about to delete one more of the files
  it names (``evolution.retention``);
- ``retrieval_index``: the retrieval index is written whole and synced beside itself, not yet renamed
  into place (``evolution.retrieval.fts``).

The variable is read once per process, at the first point reached; when it is unset a point
costs a dictionary lookup. A malformed value is an error at once, so a misspelt test cannot
pass by injecting nothing. ``reset`` re-reads it (for tests that change it in-process).
"""

from __future__ import annotations

import errno
import os
import signal
import threading

ENV = "EVOLUTION_FAULTS"
POINTS = ("train_step", "checkpoint_save", "gguf_export", "ledger_append", "ledger_commit", "swap", "capture",
          "backup_copy", "prune", "retrieval_index")
ACTIONS = ("kill", "enospc")

_plan: dict[str, tuple[str, int]] | None = None
_hits: dict[str, int] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """``"a=kill@2,b=enospc"`` → ``{"a": ("kill", 2), "b": ("enospc", 1)}``; ValueError if malformed."""
    plan = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, rest = item.partition("=")
        action, _, nth = rest.partition("@")
        nth = nth or "1"
        if not sep or name not in POINTS or action not in ACTIONS or not nth.isdigit() or int(nth) < 1:
            raise ValueError(f"{ENV}: cannot read {item!r}; expected POINT=ACTION[@N] with POINT one of "
                             f"{', '.join(POINTS)}, ACTION one of {', '.join(ACTIONS)}, N >= 1")
        plan[name] = (action, int(nth))
    return plan


def reset() -> None:
    """Forget the hit counts and read ``EVOLUTION_FAULTS`` again at the next point."""
    global _plan
    with _lock:
        _plan = None
        _hits.clear()


def point(name: str) -> None:
    """A named place in the code: kill the process or raise ENOSPC here if ``EVOLUTION_FAULTS`` says so."""
    global _plan
    if _plan is None:
        _plan = parse(os.environ.get(ENV, ""))
    if name not in _plan:
        return
    action, nth = _plan[name]
    with _lock:
        _hits[name] = hit = _hits.get(name, 0) + 1
    if hit < nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()  # another thread may run before the signal lands: go no further
    raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV} at {name})")

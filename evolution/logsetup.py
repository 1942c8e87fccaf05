"""How every entry point (``evolve``, ``run_daemon.py``, the age-up worker) sets up its output.

The daemon also keeps its log in ``<data root>/logs/daemon.log`` and the age-up worker's output
in ``worker.log`` beside it, each rotated by size (``[daemon] log_max_bytes`` / ``log_backups``)
so that months of running take a bounded amount of disk.
"""

from __future__ import annotations

import logging
import logging.handlers
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(verbose: bool = False, fmt: str = FORMAT) -> None:
    """Log INFO (DEBUG with ``verbose``) to stderr; hide library deprecation notices unless verbose.

    Deprecation notices from transformers/trl/peft are for us, not for users; APScheduler's
    per-run job lines are debug detail.
    """
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|trl|transformers)\.")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose and _overlapping_tick not in logging.getLogger("apscheduler.scheduler").filters:
        logging.getLogger("apscheduler.scheduler").addFilter(_overlapping_tick)


def _overlapping_tick(record: logging.LogRecord) -> bool:
    """Hide APScheduler's warning that a run was skipped because the last one is still running: the daemon's tick
    runs one at a time by design (``max_instances=1``), and one that swaps in a model takes longer than the poll
    interval, so every swap logged a warning that asked nothing of anyone."""
    return "maximum number of running instances reached" not in record.getMessage()


def rotating_file(path: Path, max_bytes: int, backups: int, fmt: str | None = "%(asctime)s %(levelname)s "
                  "%(name)s: %(message)s") -> logging.handlers.RotatingFileHandler:
    """A handler writing to ``path``, renamed to ``path.1`` (… ``path.<backups>``) when it would pass
    ``max_bytes``: the files together stay under about ``(backups + 1) * max_bytes``.

    ``fmt=None`` writes each message as it is (the worker's output, already formatted by the worker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                   encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter(fmt or "%(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    return handler


def to_file(path: Path, max_bytes: int, backups: int) -> logging.Handler:
    """Also send every record the root logger passes to a size-rotated ``path`` (the daemon's log)."""
    handler = rotating_file(path, max_bytes, backups)
    handler.setLevel(logging.getLogger().level)
    logging.getLogger().addHandler(handler)
    return handler

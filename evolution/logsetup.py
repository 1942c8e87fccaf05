"""How every entry point (``evolve``, ``run_daemon.py``, the age-up worker) sets up its output."""

from __future__ import annotations

import logging
import warnings

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

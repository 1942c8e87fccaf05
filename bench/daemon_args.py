"""What a bench's daemon (or ``evolve``) starts from: the embedded model, the repository's curriculum and the
default settings, unless a run names others. ``tests/test_bench_smoke.py`` names a tiny model, a tiny curriculum and
settings whose children pass their gate, so that every bench runs in CI in seconds and cannot rot unnoticed."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def add(ap: argparse.ArgumentParser, curriculum_flag: str = "--curriculum") -> None:
    """``--base``, the curriculum directory (``curriculum_flag``) and ``--toml``: the daemon's own options."""
    ap.add_argument("--base", type=Path, default=None, help="the daemon's --base (default: the embedded model)")
    ap.add_argument(curriculum_flag, dest="curriculum_dir", type=Path, default=None,
                    help="the daemon's --curriculum (default: the repository's)")
    ap.add_argument("--toml", type=Path, default=None, help="more of the data root's evolution.toml")


def options(args: argparse.Namespace) -> list[str]:
    """The daemon's (or ``evolve``'s) command-line options for ``args``' model and curriculum."""
    return [*(["--base", str(args.base)] if args.base else []),
            *(["--curriculum", str(args.curriculum_dir)] if args.curriculum_dir else [])]


def curriculum_dir(args: argparse.Namespace) -> Path:
    return args.curriculum_dir or REPO / "curriculum"


def toml(args: argparse.Namespace, default: str = "[gate]\nstop_after = 1000\n") -> str:
    """The data root's ``evolution.toml``: ``default`` then ``--toml``'s text (which may set what ``default`` sets:
    a later key of the same table is an error in TOML, so a ``--toml`` that names ``stop_after`` replaces it)."""
    extra = args.toml.read_text() if args.toml else ""
    return extra if "stop_after" in extra else default + extra

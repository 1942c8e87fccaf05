"""Where things live on disk: the data root and the generation directories.

Everything the project writes lives under one data root: ``$EVOLUTION_HOME`` when set,
otherwise the repository itself (its ``checkpoints/`` and ``ledger/`` folders).

A data root may hold several lineages (one model per role), all in its one ledger database.
Lineage ``main`` keeps the historical layout (``checkpoints/``, ``logs/``, ``evolution.toml`` at
the root); any other lineage ``NAME`` lives in ``lineages/NAME/`` with the same three inside.
The lineage is chosen with ``--lineage NAME`` or ``$EVOLUTION_LINEAGE``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN = "main"
LINEAGE_ENV = "EVOLUTION_LINEAGE"
LINEAGE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
GEN_RE = re.compile(r"^gen_(\d{4,})$")
PARTIAL_RE = re.compile(r"^gen_(\d{4,})\.partial$")
INFO_FILE = "daemon.json"


def gen_name(n: int) -> str:
    return f"gen_{n:04d}"


def check_lineage(name: str) -> str:
    """Return ``name`` if it can name a lineage (a folder and a model id); raise ``ConfigError`` otherwise."""
    from evolution.errors import ConfigError

    if not isinstance(name, str) or not LINEAGE_RE.match(name) or re.search(r"(^|-)gen-\d+$", name):
        raise ConfigError([
            f"lineage name {name!r} is not valid: use 1 to 40 characters, lower-case letters, digits, '-' or '_', "
            "starting with a letter and not ending in 'gen-N' (for example: main, deacon, polecat)"
        ])
    return name


@dataclass(frozen=True)
class DataRoot:
    """The folders of one lineage under one data root (``lineage`` ``main`` unless named)."""

    root: Path
    lineage: str = MAIN

    def __post_init__(self) -> None:
        check_lineage(self.lineage)

    @classmethod
    def from_env(cls, override: str | os.PathLike | None = None, lineage: str | None = None) -> "DataRoot":
        """The data root (``override``, else ``$EVOLUTION_HOME``, else the repository) for ``lineage``
        (else ``$EVOLUTION_LINEAGE``, else ``main``)."""
        lineage = lineage or os.environ.get(LINEAGE_ENV) or MAIN
        if override is not None:
            return cls(Path(override).expanduser().resolve(), lineage)
        env = os.environ.get("EVOLUTION_HOME")
        return cls(Path(env).expanduser().resolve() if env else REPO_ROOT, lineage)

    def for_lineage(self, lineage: str) -> "DataRoot":
        """The same data root, seen as lineage ``lineage``."""
        return DataRoot(self.root, lineage)

    @property
    def home(self) -> Path:
        """This lineage's own folder: the data root itself for ``main``, ``lineages/NAME`` otherwise."""
        return self.root if self.lineage == MAIN else self.root / "lineages" / self.lineage

    def lineage_dirs(self) -> list[str]:
        """Lineages other than ``main`` that have a folder under this data root, sorted."""
        d = self.root / "lineages"
        return sorted(p.name for p in d.iterdir() if p.is_dir() and LINEAGE_RE.match(p.name)) if d.is_dir() else []

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def ledger_dir(self) -> Path:
        """The ledger database's folder: one per data root, shared by its lineages."""
        return self.root / "ledger"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def prepare(self) -> "DataRoot":
        """Create the data root's folders, or say clearly why it cannot be used."""
        from evolution.errors import ConfigError

        try:
            for d in (self.checkpoints, self.ledger_dir):
                d.mkdir(parents=True, exist_ok=True)
                probe = d / ".write-test"
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as exc:
            raise ConfigError([
                f"data root {self.root} is not usable ({exc.strerror}: {exc.filename}); set EVOLUTION_HOME "
                "to a writable directory, or unset it to use the repository's checkpoints/ and ledger/"
            ]) from None
        return self

    def existing(self) -> "DataRoot":
        """``prepare`` for commands that read or add to a lineage: a data root that does not exist is a
        mistake (a typo in ``EVOLUTION_HOME``), not a new one to create and report as empty; so is a
        lineage other than ``main`` without its folder (a typo in ``--lineage``)."""
        from evolution.errors import ConfigError

        if not self.root.exists():
            raise ConfigError([
                f"data root {self.root} does not exist: check EVOLUTION_HOME (a typo?), or unset it to use "
                "the repository's checkpoints/ and ledger/; `evolve age-up` or the daemon creates a new one"
            ])
        if not self.home.is_dir():
            known = ", ".join([MAIN, *self.lineage_dirs()])
            raise ConfigError([
                f"lineage {self.lineage} has no folder under the data root {self.root} ({self.home}): check "
                f"--lineage / ${LINEAGE_ENV} (a typo?); lineages here: {known}. `evolve age-up --lineage "
                f"{self.lineage}` or the daemon creates a new one; a lineage whose files are on another data root "
                "sharing this ledger is read with `evolve ledger --all` and `evolve ledger show NAME/N`"
            ])
        return self.prepare()

    def daemon_info(self) -> dict | None:
        """What the last daemon started on this lineage wrote about itself in ``daemon.json`` (address, karma
        threshold, pid: ``evolution.daemon.identity``), or None."""
        try:
            return json.loads((self.home / INFO_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def ageup_lock(self) -> Path:
        return self.checkpoints / ".ageup.lock"

    @contextlib.contextmanager
    def exclusive(self, busy: str) -> Iterator[None]:
        """Hold the lock under which a lineage's generations change (an age-up, a prune): one at a time per
        lineage of a data root (the file is in the lineage's ``checkpoints/``; age-ups of different lineages
        also queue for the machine, ``ageup._lock``).

        An OS file lock, released even if the process dies; ``busy`` is the error's message when it is held."""
        from evolution.errors import EvolutionError
        from evolution.fsutil import try_lock

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        lock = try_lock(self.ageup_lock)
        if lock is None:
            which = "" if self.lineage == MAIN else f"lineage {self.lineage}: "
            raise EvolutionError(f"{which}{busy} (lock {self.ageup_lock})")
        try:
            yield
        finally:
            lock.release()

    def gen_dir(self, n: int) -> Path:
        return self.checkpoints / gen_name(n)

    def staging_dir(self, n: int) -> Path:
        """Where generation ``n`` is built; renamed to ``gen_dir(n)`` only when complete."""
        return self.checkpoints / f"{gen_name(n)}.partial"

    def _numbered(self, pattern: re.Pattern) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := pattern.match(p.name)) and p.is_dir())

    def generations(self) -> list[int]:
        """Numbers of the complete generation directories, ascending."""
        return self._numbered(GEN_RE)

    def partial_generations(self) -> list[int]:
        """Numbers of generations under construction (``gen_NNNN.partial/``), ascending."""
        return self._numbered(PARTIAL_RE)
